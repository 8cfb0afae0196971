"""``mpexport.save``: the last line of a training script. Writes the trained model as a ``torch.export`` archive
(``.pt2``) that carries the training record (autocast device, dtype, enabled; GradScaler; torch version), so
``mpexport convert`` plans with the policy the model was trained under, and says so."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mpexport.base.errors import MpexportError
from mpexport.base.policies import POLICY_NAMES
from mpexport.sources.model import EXTRA_FILE
from mpexport.sources.range_format import ARCHIVE_FILE
from mpexport.sources.range_monitor import RangeMonitor

AUTOCAST_DEVICES = ("cuda", "cpu")
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
POLICY_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def save(model: torch.nn.Module, path: str | Path, example_inputs: tuple[Any, ...] | Mapping[str, Any], *,
         dynamic_shapes: Any = None, autocast: torch.autocast | str | None = None,
         grad_scaler: torch.amp.GradScaler | None = None, extra: Mapping[str, Any] | None = None,
         ranges: RangeMonitor | None = None) -> Path:
    """Export ``model`` with ``torch.export`` in FP32 and save it to ``path`` with its training record.

    The autocast recorded is, in order: ``autocast`` (a ``torch.autocast`` object, or a policy name such as
    ``"cuda-bf16"``), else the autocast state live where ``save`` is called (inside the training loop's
    ``torch.autocast`` context), else "no autocast". The export itself always runs with autocast disabled, so the
    archive holds the FP32 model. ``example_inputs`` are positional (a tuple) or by name (a mapping);
    ``dynamic_shapes`` is passed to ``torch.export.export`` (e.g. ``{"pixels": {0: torch.export.Dim("batch")}}``).
    ``grad_scaler`` records its state; ``extra`` adds JSON-serialisable fields (accuracy, data set...): a
    ``"validation": {"accuracy": 0.95, "loss": 0.2, "data": "val.npz", "data_sha256": <SHA-256 of val.npz>}`` is
    what ``verify`` sets beside the FP32 model's accuracy, noting a gap on the same data
    (:mod:`mpexport.sources.accuracy`). The record stays small: ``mpexport.json`` is read up to 1 MiB and kept up to
    64 KiB (:mod:`mpexport.sources.bounds`); bulky evidence belongs in an artifact of its own: ``ranges`` (a
    :class:`mpexport.sources.range_monitor.RangeMonitor`) is stored as the archive's own ``training_ranges.json``,
    which ``convert`` keeps as the bundle's ``training_ranges`` artifact for the range rule. The file is
    written atomically: a failed export leaves nothing at ``path``. Returns the path written.
    """
    path = Path(path)
    record: dict[str, Any] = {**(dict(extra) if extra else {}), "autocast": _autocast_record(autocast),
                              "torch": torch.__version__, "saved_by": "mpexport.save"}
    if grad_scaler is not None:
        record["grad_scaler"] = bool(grad_scaler.is_enabled())
        if grad_scaler.is_enabled():
            record["grad_scaler_scale"] = float(grad_scaler.get_scale())
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    was_training = model.training
    model.eval()
    try:
        with _autocast_disabled():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial.pt2", dir=path.parent)
    os.close(handle)
    extra_files = {EXTRA_FILE: json.dumps({"training": record}, sort_keys=True, default=str)}
    if ranges is not None:
        extra_files[ARCHIVE_FILE] = json.dumps(ranges.to_json(), sort_keys=True)
    try:
        torch.export.save(program, temporary, extra_files=extra_files)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _autocast_record(autocast: torch.autocast | str | None) -> dict[str, Any]:
    if isinstance(autocast, str):
        if autocast not in POLICY_NAMES:
            raise MpexportError(f"unknown autocast policy '{autocast}'", stage="save",
                                hint=f"use one of {', '.join(POLICY_NAMES)}, or pass the torch.autocast object")
        device, low = autocast.split("-")
        return {"device_type": device, "dtype": POLICY_DTYPES[low], "enabled": True}
    if isinstance(autocast, torch.autocast):
        dtype = DTYPE_NAMES.get(autocast.fast_dtype, str(autocast.fast_dtype).removeprefix("torch."))
        return {"device_type": autocast.device, "dtype": dtype, "enabled": bool(autocast._enabled)}
    if autocast is not None:
        raise MpexportError(f"autocast= takes a torch.autocast or a policy name, not {type(autocast).__name__}",
                            stage="save")
    for device in AUTOCAST_DEVICES:
        if torch.is_autocast_enabled(device):
            live = torch.get_autocast_dtype(device)
            return {"device_type": device, "dtype": DTYPE_NAMES.get(live, str(live)), "enabled": True}
    return {"device_type": None, "dtype": None, "enabled": False}


@contextlib.contextmanager
def _autocast_disabled() -> Iterator[None]:
    """Autocast off on every device it can be on here, restored after."""
    devices = [device for device in AUTOCAST_DEVICES if device == "cpu" or torch.cuda.is_available()]
    with contextlib.ExitStack() as stack:
        for device in devices:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield

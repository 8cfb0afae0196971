"""Training records: what the training framework wrote about a run's precision, read without running code.

A record is read into plain data (dicts, lists, strings, numbers) by unpicklers that build nothing the file
names: every class or function a pickle asks for becomes an inert :class:`PickledObject` that remembers its name,
its arguments and its state, so a ``__reduce__`` that would call ``os.system`` only records the call.

* Hugging Face Trainer: ``training_args.bin`` (a pickled ``TrainingArguments``) beside the model or in its
  ``checkpoint-*`` folders: ``fp16``, ``bf16``, ``use_cpu``/``no_cuda``, ``half_precision_backend``.
* timm's ``train.py``: the checkpoint's ``args`` (an ``argparse.Namespace``: ``amp``, ``amp_dtype``, ``device``)
  and the run's ``args.yaml``.
* Lightning: the precision plugin's saved state in the ``.ckpt`` (a GradScaler state means 16-bit mixed).
* mpexport's own record (``mpexport.save``), in the ``.pt2``'s ``mpexport.json``.

Each reader returns a :class:`TrainingRecord`: the autocast the run used (device, dtype, enabled), the torch
version when recorded, and the evidence in words (file and fields), which the manifest keeps as
``plan.policy_source``.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from mpexport.base.errors import MpexportError
from mpexport.sources.accuracy import lightning_validation, timm_validation

STAGE = "load"
TORCH_MAGIC = 0x1950A86A20F9469CFC6C
"""The first pickle of torch's legacy (non-zip) serialization format."""
BLOCKED_MODULES = ("os", "posix", "nt", "sys", "subprocess", "builtins.eval", "builtins.exec")
LOW_DTYPES = {"float16": "fp16", "half": "fp16", "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16"}
LOW_TO_TORCH = {"fp16": "float16", "bf16": "bfloat16"}
LIGHTNING_PRECISION_KEYS = ("MixedPrecision", "MixedPrecisionPlugin", "native_amp_scaling_state",
                            "FSDPPrecision", "FSDPMixedPrecisionPlugin", "DeepSpeedPrecision")


@dataclass
class TrainingRecord:
    """What a training framework recorded about a run's precision.

    ``device``/``dtype`` are the autocast device type (``cuda``/``cpu``) and low-precision type (``float16``,
    ``bfloat16``) when the run used autocast; ``enabled`` is False when the record says it trained in FP32, None
    when the record does not settle it. ``evidence`` names the file and fields; ``assumptions`` say what was
    inferred rather than read.
    """

    framework: str
    evidence: str
    enabled: bool | None = None
    device: str | None = None
    dtype: str | None = None
    torch_version: str | None = None
    grad_scaler: bool = False
    assumptions: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    """The validation accuracy and loss the record reports (:mod:`mpexport.sources.accuracy`), if any."""

    def to_training(self) -> dict[str, Any]:
        """The record as ``LoadedModel.training`` keeps it (the form ``mpexport.save`` writes)."""
        training: dict[str, Any] = {"framework": self.framework, "evidence": self.evidence,
                                    "grad_scaler": self.grad_scaler}
        if self.enabled is not None:
            training["autocast"] = {"device_type": self.device, "dtype": self.dtype, "enabled": self.enabled}
        if self.torch_version:
            training["torch"] = self.torch_version
        if self.assumptions:
            training["assumptions"] = list(self.assumptions)
        if self.validation:
            training["validation"] = dict(self.validation)
        return training


class PickledObject:
    """An object a pickle asked for, recorded instead of built: the global's dotted name, the arguments it was
    called with, the state it was given, and items set on it. Nothing of the file's runs."""

    qualname: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        """Record the call; build nothing."""
        self = object.__new__(cls)
        self.__dict__.update(pickled_args=args, pickled_kwargs=kwargs, pickled_state=None, pickled_items={},
                             pickled_list=[])
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept any arguments (recorded by ``__new__``)."""

    def __setstate__(self, state: Any) -> None:
        """Keep the state a pickle ``BUILD`` gives."""
        self.__dict__["pickled_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        """Keep items a pickle sets (dict subclasses)."""
        self.__dict__["pickled_items"][key] = value

    def append(self, value: Any) -> None:
        """Keep values a pickle appends (list subclasses)."""
        self.__dict__["pickled_list"].append(value)

    def extend(self, values: Any) -> None:
        """Keep values a pickle extends with (list subclasses)."""
        self.__dict__["pickled_list"].extend(values)

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


def stub_class(qualname: str) -> type[PickledObject]:
    """An inert stand-in class for the global ``qualname``."""
    return type(f"Pickled[{qualname}]", (PickledObject,), {"qualname": qualname})


class TensorData:
    """A tensor's storage in a pickle read as a record: not loaded."""

    def __repr__(self) -> str:
        return "<tensor data>"


class _RecordUnpickler(pickle.Unpickler):
    """Unpickles plain data; every global is an inert stub, every persistent id (tensor storage) a placeholder."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        return stub_class(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return TensorData()


def read_pickle_record(path: Path) -> Any:
    """The object a ``torch.save`` file (zip or legacy) or a plain pickle holds, as plain data and inert stubs.

    Raises :class:`MpexportError` (one line) when the file is not a pickle.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((item for item in archive.namelist() if item.endswith("/data.pkl")
                             or item == "data.pkl"), None)
                if name is None:
                    raise MpexportError(f"'{path}' is a zip archive without a pickle (data.pkl)", stage=STAGE)
                return _RecordUnpickler(io.BytesIO(archive.read(name))).load()
        with path.open("rb") as handle:
            first = _RecordUnpickler(handle).load()
            if first != TORCH_MAGIC:
                return first
            _RecordUnpickler(handle).load()  # protocol version
            _RecordUnpickler(handle).load()  # system info
            return _RecordUnpickler(handle).load()
    except MpexportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable pickle is bad input
        raise MpexportError(f"'{path}' is not a readable pickle: {type(exc).__name__}: {exc}"[:300],
                            stage=STAGE) from None


PLAIN_NODES = 100_000
"""Most objects :func:`plain` converts: a pickle can share one list everywhere (or hold itself), and a record is
small."""


def plain(value: Any) -> Any:
    """Plain data for a record: a stub becomes the dict of its state and items (or its single argument, for
    enum-like values); containers are converted recursively. An object met again inside itself becomes None, and
    conversion stops (None) after :data:`PLAIN_NODES` objects, so a crafted pickle cannot make it loop."""
    return _plain(value, set(), [PLAIN_NODES])


def _plain(value: Any, active: set[int], budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0 or id(value) in active:
        return None
    if isinstance(value, (PickledObject, Mapping, list, tuple, argparse.Namespace)):
        active.add(id(value))
        try:
            return _plain_container(value, active, budget)
        finally:
            active.discard(id(value))
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() == 1 else f"<tensor {tuple(value.shape)}>"
    return value


def _plain_container(value: Any, active: set[int], budget: list[int]) -> Any:
    def convert(item: Any) -> Any:
        return _plain(item, active, budget)

    if isinstance(value, PickledObject):
        data = value.__dict__
        out: dict[str, Any] = {}
        state = data["pickled_state"]
        if isinstance(state, tuple) and len(state) == 2:  # (state, slot state)
            for part in state:
                if isinstance(part, Mapping):
                    out.update(part)
        elif isinstance(state, Mapping):
            out.update(state)
        out.update(data["pickled_items"])
        if out:
            return {str(key): convert(item) for key, item in out.items()}
        args = data["pickled_args"]
        if data["pickled_list"]:
            return [convert(item) for item in data["pickled_list"]]
        if len(args) == 1:
            return convert(args[0])
        return {"__class__": value.qualname, "args": [convert(item) for item in args]}
    if isinstance(value, Mapping):
        return {str(key): convert(item) for key, item in value.items()}
    if isinstance(value, argparse.Namespace):  # a trusted checkpoint, fully unpickled
        return {key: convert(item) for key, item in vars(value).items()}
    return [convert(item) for item in value]


def load_checkpoint_without_code(path: Path) -> Any:
    """A zip checkpoint whose records hold objects beyond tensors (``argparse.Namespace``, a Lightning
    ``AttributeDict``...), loaded by torch with an unpickler that builds only what ``weights_only`` allows (tensors,
    dtypes, plain containers) and reads every other global as an inert :class:`PickledObject`.

    Raises :class:`MpexportError` when the file names a module torch's ``weights_only`` blocks or a command
    runner (``os.system``, ``subprocess``...): nothing of the file runs either way, but such a file is not a
    training checkpoint.
    """
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    dangerous = [name for name in unsafe if name.split(".")[0] in BLOCKED_MODULES or name in BLOCKED_MODULES]
    if dangerous:
        raise MpexportError(f"'{path}' names {', '.join(dangerous[:3])}: unpickling it would run commands",
                            stage=STAGE, hint="nothing was run; re-save the checkpoint from a trusted source")
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TORCH_RECORD_PICKLE, mmap=True)


class _TorchRecordUnpickler(pickle.Unpickler):
    """torch.load's unpickler for a checkpoint with records: the globals ``weights_only`` allows (tensor rebuilds,
    dtypes...) are the real ones, every other global an inert stub; torch supplies the storages. Unlike
    ``weights_only`` itself, dict and list subclasses (a Lightning ``AttributeDict``) are read, as stubs."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _weights_only_globals().get(f"{module}.{name}")
        return allowed if allowed is not None else stub_class(f"{module}.{name}")


def _weights_only_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    return _weights_only_unpickler._get_allowed_globals()


_TORCH_RECORD_PICKLE = type(sys)("mpexport_record_pickle")
_TORCH_RECORD_PICKLE.Unpickler = _TorchRecordUnpickler  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Trainer


def find_training_args(directory: Path) -> Path | None:
    """``training_args.bin`` in a Trainer output directory, else in its newest ``checkpoint-N`` folder."""
    direct = directory / "training_args.bin"
    if direct.is_file():
        return direct
    checkpoints = [(int(match.group(1)), path) for path in directory.glob("checkpoint-*/training_args.bin")
                   if (match := re.fullmatch(r"checkpoint-(\d+)", path.parent.name))]
    return max(checkpoints)[1] if checkpoints else None


def read_trainer_args(path: Path, shown: str | None = None) -> TrainingRecord:
    """The precision a Hugging Face ``TrainingArguments`` pickle records, read without running it."""
    args = plain(read_pickle_record(path))
    shown = shown or path.name
    if not isinstance(args, Mapping) or not any(key in args for key in ("fp16", "bf16", "output_dir")):
        raise MpexportError(f"'{path}' does not hold Trainer arguments (fp16/bf16 fields)", stage=STAGE)
    mixed = args.get("mixed_precision")  # transformers 5: "fp16", "bf16" or "no", beside the flags
    fp16, bf16 = bool(args.get("fp16")) or mixed == "fp16", bool(args.get("bf16")) or mixed == "bf16"
    on_cpu = bool(args.get("use_cpu") or args.get("no_cuda"))
    backend = args.get("half_precision_backend")
    fields = [f"fp16={bool(args.get('fp16'))}", f"bf16={bool(args.get('bf16'))}"]
    if mixed not in (None, "no") and not (args.get("fp16") or args.get("bf16")):
        fields.append(f"mixed_precision={mixed}")
    fields += [f"{key}={args[key]}" for key in ("use_cpu", "no_cuda") if key in args]
    if backend not in (None, "auto"):
        fields.append(f"half_precision_backend={backend}")
    record = TrainingRecord("transformers.Trainer", f"{shown}: {', '.join(fields)}")
    if not (fp16 or bf16):
        record.enabled = False
        return record
    record.enabled, record.dtype, record.grad_scaler = True, "bfloat16" if bf16 else "float16", fp16
    if on_cpu or backend == "cpu_amp":
        record.device = "cpu"
    elif args.get("_n_gpu") == 0:
        record.device = "cpu"
        record.evidence += ", _n_gpu=0"
        record.assumptions.append("no GPU was visible to the run (_n_gpu=0): autocast on the CPU")
    else:
        record.device = "cuda"
        record.assumptions.append("the run was not told to use the CPU: autocast on CUDA")
    if backend == "apex":
        record.assumptions.append("half_precision_backend=apex: apex AMP's lists differ from torch.autocast's; "
                                  "planned with torch.autocast's")
    return record


# ---------------------------------------------------------------------------------------------------------------
# timm train.py and Lightning checkpoints


def checkpoint_record(checkpoint: Any, path: Path) -> TrainingRecord | None:
    """The training record a loaded checkpoint dict carries (timm's ``args``, Lightning's precision plugin state,
    a bare GradScaler state), else None."""
    if not isinstance(checkpoint, Mapping):
        return None
    if "args" in checkpoint and ("arch" in checkpoint or _is_namespace(checkpoint["args"])):
        args = plain(checkpoint["args"])
        record = timm_record(args, f"{path.name}: args", path)
        record.validation = timm_validation(checkpoint, args if isinstance(args, Mapping) else {}, path.name)
        return record
    if any(key in checkpoint for key in ("pytorch-lightning_version", "lightning_version", "hyper_parameters")):
        record = lightning_record(checkpoint, path)
        record.validation = lightning_validation(checkpoint, path.name)
        return record
    scaler = checkpoint.get("scaler") or checkpoint.get("amp_scaler") or checkpoint.get("grad_scaler")
    if isinstance(scaler, Mapping) and "scale" in scaler:
        return _scaler_record("checkpoint", f"{path.name}: a GradScaler state ('scaler')", scaler)
    return None


def _is_namespace(value: Any) -> bool:
    return isinstance(value, argparse.Namespace) or (isinstance(value, PickledObject)
                                                     and value.qualname == "argparse.Namespace")


def timm_record(args: Any, evidence: str, checkpoint_path: Path) -> TrainingRecord:
    """The precision a timm ``train.py`` run records: ``args.amp``, ``args.amp_dtype``, ``args.device``; the run's
    ``args.yaml`` beside the checkpoint fills what the checkpoint lacks."""
    args = dict(args) if isinstance(args, Mapping) else {}
    yaml_path = checkpoint_path.parent / "args.yaml"
    if yaml_path.is_file():
        for key, value in _read_yaml(yaml_path).items():
            args.setdefault(key, value)
    amp = args.get("amp")
    dtype = str(args.get("amp_dtype") or "float16")
    device = str(args.get("device") or "cuda").split(":")[0]
    shown = [f"{key}={args[key]!r}" for key in ("amp", "amp_dtype", "amp_impl", "device") if key in args]
    record = TrainingRecord("timm", f"{evidence} ({', '.join(shown) or 'no precision fields'})")
    if amp is None:
        record.assumptions.append("the record has no 'amp' field: it does not settle the training precision")
        return record
    if not amp:
        record.enabled = False
        return record
    if "device" not in args:
        record.assumptions.append("no 'device' recorded: timm's default, cuda")
    record.enabled, record.device, record.dtype = True, device, LOW_TO_TORCH.get(LOW_DTYPES.get(dtype, ""), dtype)
    record.grad_scaler = record.dtype == "float16"
    return record


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:  # PyYAML is optional: the checkpoint's args are the primary record
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def lightning_record(checkpoint: Mapping[str, Any], path: Path) -> TrainingRecord:
    """The precision a Lightning checkpoint records: the precision plugin's state (a GradScaler state means
    16-bit mixed precision, which Lightning runs on CUDA only), else the hyper-parameters' ``precision``."""
    for key in LIGHTNING_PRECISION_KEYS:
        state = checkpoint.get(key)
        if isinstance(state, Mapping) and "scale" in state:
            return _scaler_record("lightning", f"{path.name}: {key} (a GradScaler state)", state,
                                  device_note="Lightning runs 16-mixed with a GradScaler on CUDA only: "
                                  "autocast on CUDA")
    hyper = plain(checkpoint.get("hyper_parameters")) or {}
    precision = str(hyper.get("precision", "")) if isinstance(hyper, Mapping) else ""
    record = TrainingRecord("lightning", f"{path.name}: hyper_parameters.precision={precision!r}" if precision
                            else f"{path.name}: no precision plugin state")
    if precision in ("bf16-mixed", "bf16"):
        record.enabled, record.device, record.dtype = True, "cuda", "bfloat16"
        record.assumptions.append("the device is not recorded: autocast on CUDA assumed")
    elif precision in ("16-mixed", "16"):
        record.enabled, record.device, record.dtype = True, "cuda", "float16"
    elif precision in ("32", "32-true", "64", "64-true"):
        record.enabled = False
    else:
        record.assumptions.append("the checkpoint has no GradScaler state and no precision setting: the record "
                                  "does not settle the training precision (bf16-mixed and 32-true save none)")
    return record


def _scaler_record(framework: str, evidence: str, state: Mapping[str, Any],
                   device_note: str = "a GradScaler state: FP16 autocast, on CUDA assumed") -> TrainingRecord:
    scale = state.get("scale")
    scale_value = scale.item() if isinstance(scale, torch.Tensor) and scale.numel() == 1 else scale
    shown = f"{evidence}, scale={scale_value:g}" if isinstance(scale_value, float) else evidence
    return TrainingRecord(framework, shown, enabled=True, device="cuda", dtype="float16", grad_scaler=True,
                          assumptions=[device_note])


# ---------------------------------------------------------------------------------------------------------------
# mpexport's own record


def mpexport_record(training: Mapping[str, Any], shown: str) -> TrainingRecord | None:
    """The record ``mpexport.save`` (or a training script) wrote into a ``.pt2``'s ``mpexport.json``."""
    autocast = training.get("autocast") if isinstance(training, Mapping) else None
    if not isinstance(autocast, Mapping):
        return None
    enabled = autocast.get("enabled", True)
    dtype = str(autocast.get("dtype", "")).removeprefix("torch.")
    device = autocast.get("device_type")
    fields = f"device_type={device}, dtype={dtype}" + ("" if enabled else ", enabled=False")
    return TrainingRecord("mpexport", f"{shown}: autocast {fields}", enabled=bool(enabled), device=device,
                          dtype=dtype, torch_version=training.get("torch"),
                          grad_scaler=bool(training.get("grad_scaler")))

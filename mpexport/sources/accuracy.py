"""The validation accuracy (and loss) a training record reports, in one form, so that verify can set the FP32
model's accuracy beside it (:func:`mpexport.check.report.trained_accuracy`).

The form (``training["validation"]``)::

    {"accuracy": 0.953, "loss": 0.21, "data": "val.npz", "data_sha256": "…", "evidence": "mpexport.json: …"}

``accuracy`` is a fraction (a record's percentage, a value in (1, 100], is divided by 100 and the evidence says
so); every key but ``evidence`` is optional, and a record with neither accuracy nor loss has no form (None).
Read from:

* ``mpexport.save(..., extra=...)``: a ``validation`` mapping with ``accuracy``/``loss``/``data``/``data_sha256``,
  else the top-level ``val_accuracy_fp32`` (what ``models/train.py`` writes), ``val_accuracy``/``eval_accuracy``/
  ``accuracy``, ``val_loss``/``eval_loss``, ``val_data``,
  ``val_data_sha256``;
* a Hugging Face Trainer's ``trainer_state.json``: the last ``log_history`` entry with ``eval_accuracy`` or
  ``eval_loss``;
* a Lightning checkpoint: a ``ModelCheckpoint`` callback's ``current_score`` when it monitors an accuracy or a loss;
* a timm checkpoint: ``metric`` under ``args.eval_metric`` (``top1``, a percentage, unless the args say otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

NESTED_KEYS = {"accuracy": ("accuracy", "acc", "top1"), "loss": ("loss",), "data": ("data", "path"),
               "data_sha256": ("data_sha256", "sha256")}
FLAT_KEYS = {"accuracy": ("val_accuracy_fp32", "val_accuracy", "eval_accuracy", "val_acc", "accuracy"),
             "loss": ("val_loss", "eval_loss"), "data": ("val_data", "validation_data"),
             "data_sha256": ("val_data_sha256", "validation_data_sha256")}


def normalized(fields: Mapping[str, Any], keys: Mapping[str, tuple[str, ...]], evidence: str) -> dict[str, Any] | None:
    """The validation form of ``fields`` read under ``keys`` (form key -> the record's names, first found wins);
    None without an accuracy or a loss."""
    found: dict[str, Any] = {}
    named: list[str] = []
    for target, names in keys.items():
        name = next((name for name in names if name in fields), None)
        if name is None:
            continue
        value = _value(target, fields[name])
        if value is not None:
            found[target] = value
            named.append(name)
    if "accuracy" not in found and "loss" not in found:
        return None
    percent = isinstance(found.get("accuracy"), tuple)
    if percent:
        found["accuracy"] = found["accuracy"][0]
    found["evidence"] = f"{evidence}: {', '.join(named)}" + (" (a percentage)" if percent else "")
    return found


def _value(target: str, value: Any) -> Any:
    """A field's value in the form's type, None when it is not one (a percentage accuracy comes back as a
    1-tuple, so the caller can say it was converted)."""
    if target in ("accuracy", "loss"):
        number = _number(value)
        if number is None or number < 0:
            return None
        if target == "accuracy" and number > 1:
            return (number / 100,) if number <= 100 else None
        return number
    if target == "data_sha256":
        text = str(value).lower() if isinstance(value, str) else ""
        return text if len(text) == 64 and all(char in "0123456789abcdef" for char in text) else None
    return str(value)[:500] if isinstance(value, (str, int, float)) else None


def _number(value: Any) -> float | None:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def mpexport_validation(training: Mapping[str, Any], shown: str) -> dict[str, Any] | None:
    """The validation form of an ``mpexport.json`` training record (its ``validation`` mapping, else its
    top-level fields)."""
    nested = training.get("validation")
    if isinstance(nested, Mapping):
        return normalized(nested, NESTED_KEYS, f"{shown}: validation")
    return normalized(training, FLAT_KEYS, shown)


def trainer_state_validation(state: Any, shown: str) -> dict[str, Any] | None:
    """The last evaluation a Hugging Face ``trainer_state.json`` logged (``eval_accuracy``, ``eval_loss``)."""
    history = state.get("log_history") if isinstance(state, Mapping) else None
    if not isinstance(history, list):
        return None
    for entry in reversed(history):
        if isinstance(entry, Mapping) and ("eval_accuracy" in entry or "eval_loss" in entry):
            step = f" step {entry['step']}" if "step" in entry else ""
            return normalized(entry, {"accuracy": ("eval_accuracy",), "loss": ("eval_loss",)},
                              f"{shown}: log_history{step}")
    return None


def lightning_validation(checkpoint: Mapping[str, Any], shown: str) -> dict[str, Any] | None:
    """A Lightning ``ModelCheckpoint`` callback's score for this checkpoint, when it monitors an accuracy or a
    loss."""
    callbacks = checkpoint.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    for name, state in callbacks.items():
        if not (str(name).startswith("ModelCheckpoint") and isinstance(state, Mapping)):
            continue
        monitor = str(state.get("monitor") or "")
        target = "accuracy" if "acc" in monitor.lower() else "loss" if "loss" in monitor.lower() else None
        if target is not None and state.get("current_score") is not None:
            return normalized({monitor: state["current_score"]}, {target: (monitor,)},
                              f"{shown}: callbacks ModelCheckpoint current_score")
    return None


def timm_validation(checkpoint: Mapping[str, Any], args: Mapping[str, Any], shown: str) -> dict[str, Any] | None:
    """timm's ``metric`` (the ``eval_metric`` of its args, ``top1`` by default: a percentage)."""
    if "metric" not in checkpoint:
        return None
    metric = str(args.get("eval_metric") or "top1")
    target = "accuracy" if metric == "top1" else "loss" if metric == "loss" else None
    if target is None:
        return None
    return normalized({"metric": checkpoint["metric"]}, {target: ("metric",)}, f"{shown}: metric ({metric})")

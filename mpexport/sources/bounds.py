"""Bounds on training records: what is read from a record file, and what a loaded model keeps (and the manifest
copies).

* A record file (``mpexport.json`` in a ``.pt2``, ``trainer_state.json``, ``training_args.bin``) is read only when it
  takes at most :data:`MAX_RECORD_BYTES` (1 MiB). A larger one is not read, and a note names it and its size: the
  model still loads (a long run's ``trainer_state.json`` can outgrow any bound), and the plan says which policy it
  used instead. Refusing the model for a large record would block a good model over its paperwork.
* The record kept (``LoadedModel.training``, copied into every manifest as ``source.training``) takes at most
  :data:`MAX_KEPT_BYTES` (64 KiB) of JSON: the bulkiest fields are dropped, and a note names them. The fields the
  stages read (:data:`KEPT_FIRST`: the autocast, its evidence in words, the torch version, the validation accuracy)
  are dropped last; they are small by nature (``evidence`` is one line naming the file and fields, not data).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpexport.sources.accuracy import mpexport_validation

MAX_RECORD_BYTES = 1 << 20
"""Most bytes read from one training-record file."""
MAX_KEPT_BYTES = 64 << 10
"""Most bytes of JSON a loaded model's training record keeps."""
KEPT_FIRST = ("framework", "evidence", "autocast", "torch", "grad_scaler", "assumptions", "validation", "saved_by")
"""Fields the stages read: dropped only after every other field."""


def oversized(size: int, shown: str) -> str | None:
    """The note for a record file of ``size`` bytes that is too large to read, else None."""
    if size <= MAX_RECORD_BYTES:
        return None
    return (f"training record {shown} not read: it takes {_size(size)}, over the {_size(MAX_RECORD_BYTES)} a "
            "record may take (bulky evidence belongs in an artifact of its own)")


def read_record_file(path: Path, shown: str) -> tuple[bytes | None, str | None]:
    """The bytes of a record file and None, or None and the note saying why it was not read (too large, or
    unreadable). Never reads more than :data:`MAX_RECORD_BYTES` + 1 bytes."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RECORD_BYTES + 1)
    except OSError as exc:
        return None, f"training record {shown} not read: {exc.strerror}"
    if len(data) > MAX_RECORD_BYTES:
        return None, oversized(path.stat().st_size, shown)
    return data, None


def read_training_json(text: str | bytes, shown: str) -> tuple[dict[str, Any], list[str]]:
    """The ``training`` object of an ``mpexport.json`` (``{"training": {...}}``), its validation accuracy in the
    form of :mod:`mpexport.sources.accuracy` under ``validation``, and notes. Empty for no text, text that is not
    such JSON, or text over :data:`MAX_RECORD_BYTES` (a note names it)."""
    size = len(text.encode() if isinstance(text, str) else text)
    note = oversized(size, shown)
    if note or not size:
        return {}, [note] if note else []
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return {}, [f"training record {shown} not read: it is not JSON"]
    training = record.get("training") if isinstance(record, dict) else None
    if not isinstance(training, dict):
        return {}, []
    validation = mpexport_validation(training, shown)
    training = {key: value for key, value in training.items() if key != "validation"}
    if validation is not None:
        training["validation"] = validation
    return training, []


def bounded_training(training: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``training`` with its bulkiest fields dropped until its JSON takes at most :data:`MAX_KEPT_BYTES` (the
    fields of :data:`KEPT_FIRST` last), and the note naming what was dropped (none when nothing was)."""
    sizes = {key: _json_size(value) for key, value in training.items()}
    total = sum(sizes.values()) + sum(len(json.dumps(str(key))) + 2 for key in training)
    if total <= MAX_KEPT_BYTES:
        return dict(training), []
    order = sorted(training, key=lambda key: (key in KEPT_FIRST, -sizes[key]))
    kept, dropped = dict(training), []
    for key in order:
        if total <= MAX_KEPT_BYTES:
            break
        del kept[key]
        dropped.append(key)
        total -= sizes[key] + len(json.dumps(str(key))) + 2
    named = ", ".join(f"{key} ({_size(sizes[key])})" for key in dropped)
    return kept, [f"training record: dropped {named} to keep the record under {_size(MAX_KEPT_BYTES)}: "
                  "bulky evidence belongs in an artifact of its own"]


def _json_size(value: Any) -> int:
    try:
        return len(json.dumps(value, default=str))
    except (ValueError, RecursionError):
        return MAX_KEPT_BYTES + 1  # unserialisable or nested beyond reading: never kept


def _size(size: int) -> str:
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size / 1024:.0f} KiB" if size >= 1024 else f"{size} bytes"

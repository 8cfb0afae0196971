"""Reading the range record a training run wrote (:mod:`mpexport.sources.range_monitor`), where training left it:

* a ``.pt2`` written by ``mpexport.save(..., ranges=monitor)``: the archive's extra file ``training_ranges.json``
  (a file of its own, not the training record every manifest copies);
* beside a checkpoint file, or inside a Hugging Face model directory: ``mpexport_ranges.json`` (what the Trainer and
  Lightning callbacks of :mod:`mpexport.integrations` write).

The record is data a user hands us: read as JSON only, from a regular file, at most :data:`MAX_RANGES_BYTES` (its
declared size checked before reading), every field checked. A record that is too large, not JSON, or not of the
form is not used, and a note says why: range evidence is an addition to the plan, never a reason to refuse a model.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpexport.base.errors import MpexportError
from mpexport.base.files import regular_file
from mpexport.sources.range_format import ARCHIVE_FILE, BESIDE_FILE, FORMAT, MAX_OPS, VERSION

MAX_RANGES_BYTES = 8 << 20
"""Most bytes read from a range record (:data:`mpexport.sources.range_monitor.MAX_OPS` records take about 3 MiB)."""
STAGE = "load"


@dataclass(frozen=True)
class OpEvidence:
    """One recorded op: its key (module path, op name, call index) and what its outputs reached in training."""

    module: str
    op: str
    index: int
    max_abs: float
    nonfinite: int
    over_fp16: int
    steps_over: int
    steps: int


@dataclass
class TrainingRanges:
    """A range record as read: run totals, the trained model's module paths, one :class:`OpEvidence` per op, and
    where it was read from (``evidence``, in words)."""

    every: int
    steps: int
    sampled_steps: int
    skipped_steps: int
    modules: list[str]
    ops: list[OpEvidence]
    evidence: str
    torch: str = ""
    dropped_ops: int = 0

    def to_json(self) -> dict[str, Any]:
        """The record in the monitor's form (as the bundle keeps it: ``training_ranges.json``)."""
        return {"format": FORMAT, "version": VERSION, "torch": self.torch, "every": self.every, "steps": self.steps,
                "sampled_steps": self.sampled_steps, "skipped_steps": self.skipped_steps,
                "dropped_ops": self.dropped_ops, "modules": self.modules,
                "ops": [{"module": op.module, "op": op.op, "index": op.index,
                         "max_abs": op.max_abs if math.isfinite(op.max_abs) else "inf", "nonfinite": op.nonfinite,
                         "over_fp16": op.over_fp16, "steps_over": op.steps_over, "steps": op.steps}
                        for op in self.ops]}


def find_training_ranges(model: str | Path) -> tuple[TrainingRanges | None, list[str]]:
    """The range record training left for ``model`` (see the module docstring), or None, and notes (a record
    found but not used says why). No record at all is no note."""
    path = Path(model)
    if path.is_dir():
        beside = path / BESIDE_FILE
    else:
        if zipfile.is_zipfile(path):
            found = _from_archive(path)
            if found != (None, []):
                return found
        beside = path.parent / BESIDE_FILE
    if not beside.exists():
        return None, []
    return read_ranges_file(beside)


def read_ranges_file(path: Path) -> tuple[TrainingRanges | None, list[str]]:
    """A range record file (regular, at most :data:`MAX_RANGES_BYTES`), or None and the note saying why not."""
    try:
        regular_file(path, "range record", stage=STAGE)
        with path.open("rb") as handle:
            data = handle.read(MAX_RANGES_BYTES + 1)
    except MpexportError as exc:
        return None, [f"training ranges not used: {exc.message}"]
    except OSError as exc:
        return None, [f"training ranges {path} not used: {exc.strerror}"]
    return parse_ranges(data, str(path))


def _from_archive(path: Path) -> tuple[TrainingRanges | None, list[str]]:
    shown = f"{ARCHIVE_FILE} in {path.name}"
    try:
        with zipfile.ZipFile(path) as archive:
            entries = [info for info in archive.infolist()
                       if info.filename.count("/") == 2 and info.filename.endswith(f"/extra/{ARCHIVE_FILE}")]
            if not entries:
                return None, []
            if entries[0].file_size > MAX_RANGES_BYTES:
                return None, [f"training ranges {shown} not used: {entries[0].file_size} bytes, over the "
                              f"{MAX_RANGES_BYTES >> 20} MiB a range record may take"]
            with archive.open(entries[0]) as handle:
                data = handle.read(MAX_RANGES_BYTES + 1)
    except (OSError, zipfile.BadZipFile) as exc:
        return None, [f"training ranges {shown} not used: {exc}"]
    return parse_ranges(data, shown)


def parse_ranges(data: bytes, shown: str) -> tuple[TrainingRanges | None, list[str]]:
    """The record in ``data`` (JSON in the monitor's form), or None and the note saying why it is not used."""
    if len(data) > MAX_RANGES_BYTES:
        return None, [f"training ranges {shown} not used: over the {MAX_RANGES_BYTES >> 20} MiB a range record "
                      "may take"]
    try:
        record = json.loads(data)
        return _checked(record, shown), []
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        return None, [f"training ranges {shown} not used: {exc}"]


def _checked(record: Any, shown: str) -> TrainingRanges:
    """The record, every field checked (ValueError naming the first bad one)."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"not an mpexport range record (format is not '{FORMAT}')")
    if record.get("version") != VERSION:
        raise ValueError(f"range record version {record.get('version')!r}, this mpexport reads {VERSION}")
    counts = {key: _count(record.get(key, 0), key) for key in ("every", "steps", "sampled_steps",
                                                                 "skipped_steps", "dropped_ops")}
    modules, ops = record.get("modules", []), record.get("ops")
    if not isinstance(modules, list) or not all(isinstance(item, str) for item in modules):
        raise ValueError("'modules' must be a list of module paths")
    if not isinstance(ops, list) or len(ops) > MAX_OPS:
        raise ValueError(f"'ops' must be a list of at most {MAX_OPS} records")
    return TrainingRanges(counts["every"], counts["steps"], counts["sampled_steps"], counts["skipped_steps"],
                          modules, [_op(item) for item in ops], shown, str(record.get("torch", ""))[:64],
                          counts["dropped_ops"])


def _op(item: Any) -> OpEvidence:
    if not isinstance(item, dict) or not isinstance(item.get("module"), str) or not isinstance(item.get("op"), str):
        raise ValueError("every op record needs a module and an op (strings)")
    peak = item.get("max_abs")
    if peak == "inf":
        peak = math.inf
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not peak >= 0:
        raise ValueError(f"op {item['module']}:{item['op']}: max_abs must be a number >= 0 or \"inf\"")
    return OpEvidence(item["module"], item["op"], _count(item.get("index"), "index"), float(peak),
                      *(_count(item.get(key, 0), key) for key in ("nonfinite", "over_fp16", "steps_over", "steps")))


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'{name}' must be a whole number >= 0")
    return value

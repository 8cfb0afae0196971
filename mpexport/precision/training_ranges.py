"""Range evidence from training, joined to the ONNX nodes the plan decides, and the range rule's reason.

**The join.** The monitor (:mod:`mpexport.sources.range_monitor`) keys each record by ``(module, op, index)``: the
innermost module whose ``forward`` called the op, the op as torch names the function (``linear``), and its call
order among that op's calls in that module during one forward pass. Provenance gives every ONNX node the module
(``name_scopes``) and the op of the captured program's node it came from (``autocast_op``: ``aten.linear.default``
for both the MatMul and the Add of a linear; its ``origin`` names that captured node). Per (module, op name) the
distinct origins are numbered in graph order, which is the captured program's execution order: origin *i* is
call *i*. Every ONNX node of an origin gets that call's record (a linear's MatMul and Add both). Op names compare
without the ``aten.`` namespace, the overload and an in-place ``_`` (``aten.add_.Tensor`` and ``x += y`` are both
``add``).

**What fails to join, and what happens then.**

* A graph module that the trained model did not have (the record's ``modules``): the record is from another
  model, and none of it is used (a note names the modules).
* No recorded op joins: none of it is used (a note says so).
* Recorded ops with no node (ops that only run in training, such as dropout, are expected; anything else, e.g. an
  op the exporter traced differently or a call order a data-dependent branch changed): counted in a note, with
  examples, and those that overflowed FP16 named: their evidence is not used, and the note says so.
* Nodes without a module or op (TorchScript-exporter graphs, ONNX from elsewhere): no training evidence.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

from mpexport.base.dtypes import FP16, TYPE_MAX
from mpexport.capture.provenance import NodeProvenance
from mpexport.sources.training_ranges import OpEvidence, TrainingRanges

TRAINING_ONLY_OPS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
                               "feature_alpha_dropout", "native_dropout"})
"""Ops a model runs in training only: an export in eval mode has no node for them (not a failed join)."""
EXAMPLES = 5


@dataclass
class TrainingEvidence:
    """Per ONNX node name, the training record of the op it came from; the run's sampled and skipped steps; what
    joined; and the notes on what did not."""

    nodes: dict[str, OpEvidence]
    sampled_steps: int
    skipped_steps: int
    joined: int
    recorded: int
    source: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: where the evidence came from, how much of it joined, and how many ops overflowed FP16."""
        over = len({(op.module, op.op, op.index) for op in self.nodes.values() if op.steps_over})
        skipped = f" ({self.skipped_steps} more skipped by the GradScaler: not evidence)" if self.skipped_steps else ""
        return (f"training ranges ({self.source}): {self.sampled_steps} sampled steps{skipped}, {self.joined} of "
                f"{self.recorded} recorded ops joined to {len(self.nodes)} nodes, {over} overflowed FP16 in training")


def op_base(op: str) -> str:
    """The op name both sides compare: ``aten.add_.Tensor`` -> ``add``, ``linear`` -> ``linear``."""
    parts = op.replace("::", ".").split(".")
    name = parts[1] if len(parts) >= 2 and parts[0] in ("aten", "prims") else parts[0]
    return name.rstrip("_") or name


def join_ranges(records: list[NodeProvenance], ranges: TrainingRanges) -> tuple[TrainingEvidence | None, list[str]]:
    """The evidence per node (see the module docstring), or None and the note saying why none of it is used."""
    if ranges.sampled_steps == 0:
        return None, [f"training ranges ({ranges.evidence}) not used: no sampled step counts as evidence"
                      f"{f' ({ranges.skipped_steps} skipped by the GradScaler)' if ranges.skipped_steps else ''}"]
    graph_modules = {record.module for record in records if record.module}
    ranges = _inner_model(ranges, graph_modules)
    foreign = sorted(graph_modules - set(ranges.modules)) if ranges.modules else []
    if foreign:
        return None, [f"training ranges ({ranges.evidence}) not used: recorded on another model (it has no module "
                      f"{', '.join(foreign[:EXAMPLES])}{' ...' if len(foreign) > EXAMPLES else ''})"]
    keys = _node_keys(records)
    recorded = {(op.module, op_base(op.op), op.index): op for op in ranges.ops}
    nodes = {name: recorded[key] for name, key in keys.items() if key in recorded}
    joined_keys = set(keys.values()) & set(recorded)
    if not joined_keys:
        return None, [f"training ranges ({ranges.evidence}) not used: none of its {len(recorded)} ops joins a node "
                      "of the graph (a record of another model, or a graph without module and op provenance)"]
    evidence = TrainingEvidence(nodes, ranges.sampled_steps, ranges.skipped_steps, len(joined_keys), len(recorded),
                                ranges.evidence)
    unjoined = [op for key, op in recorded.items()
                if key not in joined_keys and op_base(op.op) not in TRAINING_ONLY_OPS]
    if unjoined:
        evidence.notes.append(_unjoined_note(unjoined, len(recorded)))
    if ranges.dropped_ops:
        evidence.notes.append(f"training ranges: the monitor kept no record of {ranges.dropped_ops} ops (its limit)")
    return evidence, []


def _inner_model(ranges: TrainingRanges, graph_modules: set[str]) -> TrainingRanges:
    """The record as seen from the child module the graph was exported from, when training ran a wrapper around it
    (a LightningModule's ``self.net``: record paths ``net.big.fc``, graph paths ``big.fc``), as the checkpoint loader
    strips that attribute prefix; else the record unchanged."""
    known = set(ranges.modules)
    if not ranges.modules or graph_modules <= known:
        return ranges
    for child in sorted(path for path in known if path and "." not in path):
        prefix = f"{child}."
        inner = {path.removeprefix(prefix) for path in known if path.startswith(prefix)}
        if graph_modules <= inner:
            ops = [replace(op, module="" if op.module == child else op.module.removeprefix(prefix))
                   for op in ranges.ops if op.module == child or op.module.startswith(prefix)]
            modules = sorted({"", *inner})
            return replace(ranges, modules=modules, ops=ops, evidence=f"{ranges.evidence}, module {child}")
    return ranges


def _node_keys(records: list[NodeProvenance]) -> dict[str, tuple[str, str, int]]:
    """Node name -> (module, op name, call index) of the captured op it came from, numbering origins per module and
    op in graph order."""
    order: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    keys = {}
    for record in records:
        op = record.autocast_op or record.aten
        if record.module is None or op is None:
            continue
        base = op_base(op)
        origins = order[(record.module, base)]
        index = origins.setdefault(record.origin or record.name, len(origins))
        keys[record.name] = (record.module, base, index)
    return keys


def _unjoined_note(unjoined: list[OpEvidence], total: int) -> str:
    shown = ", ".join(_key_text(op) for op in unjoined[:EXAMPLES])
    over = [op for op in unjoined if op.steps_over]
    lost = (f"; {len(over)} of them overflowed FP16 in training and their evidence is NOT used "
            f"({', '.join(_key_text(op) for op in over[:EXAMPLES])})") if over else ""
    return f"training ranges: {len(unjoined)} of {total} recorded ops join no node (e.g. {shown}){lost}"


def _key_text(op: OpEvidence) -> str:
    return f"{op.module or '<root>'}:{op.op}#{op.index}"


def range_reason(low: str, limit: float, headroom: float, calibrated: float | None,
                 trained: OpEvidence | None, sampled_steps: int) -> str | None:
    """Why a low-precision node's output must stay FP32, from the larger of the calibration peak and the training
    peak (the reason names which), or None when neither is beyond ``limit`` (the type's max / ``headroom``)."""
    peak_training = trained.max_abs if trained is not None else None
    if peak_training is not None and peak_training > limit and (calibrated is None or peak_training >= calibrated):
        assert trained is not None
        maximum = TYPE_MAX[low]
        if trained.steps_over and low == FP16:
            return (f"range: training: max |x| {peak_training:.3g} on {trained.steps_over} of {sampled_steps} sampled "
                    f"steps > {maximum:.6g}, the {low.upper()} max")
        return (f"range: training: max |x| {peak_training:.3g} over {sampled_steps} sampled steps, beyond the "
                f"{low.upper()} safe limit {limit:.3g} (max {maximum:.6g} / headroom {headroom:g})")
    if calibrated is not None and calibrated > limit:
        return (f"range: output reached {calibrated:.3g} on calibration data, beyond the {low.upper()} "
                f"safe limit {limit:.3g} (max {TYPE_MAX[low]:.6g} / headroom {headroom:g})")
    return None

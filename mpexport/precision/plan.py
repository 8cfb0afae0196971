"""The precision plan: a precision and a reason for every ONNX node (:class:`NodePlan`), the options it was made
with and the calibration statistics it used (:class:`RangeStats`), as written to ``plan.json`` and read back.
:mod:`mpexport.precision.planner` makes it."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpexport.base.dtypes import FP32, NONE
from mpexport.base.errors import MpexportError
from mpexport.bundle.names import PLAN, RANGES
from mpexport.bundle.store import Bundle
from mpexport.precision.macs import MAC_OPS
from mpexport.precision.options import STAGE, Overrides, PlanOptions, top_module
from mpexport.precision.policy import AutocastPolicy, resolve_policy


@dataclass(frozen=True)
class NodePlan:
    """One node's precision (``fp16``/``bf16``/``fp32``/``fp64``, ``none`` if it computes no floats)."""

    name: str
    op_type: str
    module: str | None
    aten: str | None
    precision: str
    reason: str
    rule: str
    origin: str | None = None
    macs: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The node as written to ``plan.json``."""
        data: dict[str, Any] = {"name": self.name, "op_type": self.op_type, "module": self.module,
                                "aten": self.aten, "precision": self.precision, "reason": self.reason,
                                "rule": self.rule}
        if self.origin:
            data["origin"] = self.origin
        if self.macs is not None:
            data["macs"] = self.macs
        return data


@dataclass
class RangeStats:
    """Calibration statistics: the largest |value| per ONNX value name, shapes from the first batch, and
    how many samples they came from."""

    max_abs: dict[str, float]
    shapes: dict[str, tuple[int, ...]]
    samples: int

    def to_json(self) -> dict[str, Any]:
        """As ``ranges.json`` holds it (infinite peaks as ``"inf"``)."""
        return {"samples": self.samples,
                "values": {name: {"max_abs": peak if math.isfinite(peak) else "inf", "shape": list(self.shapes.get(
                    name, ()))} for name, peak in sorted(self.max_abs.items())}}

    @staticmethod
    def from_json(data: dict[str, Any]) -> RangeStats:
        """The statistics :meth:`to_json` wrote."""
        values = data["values"]
        return RangeStats({name: float(item["max_abs"]) for name, item in values.items()},
                          {name: tuple(item["shape"]) for name, item in values.items()}, int(data["samples"]))


@dataclass
class PrecisionPlan:
    """The plan: options used, notes, and one :class:`NodePlan` per node in graph order."""

    policy: AutocastPolicy
    options: PlanOptions
    nodes: list[NodePlan]
    notes: list[str] = field(default_factory=list)
    calibration_samples: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts per precision, per op type, per top-level module, per rule, and the low-precision MAC share."""
        float_nodes = [node for node in self.nodes if node.precision != NONE]
        per_op: dict[str, Counter] = defaultdict(Counter)
        per_module: dict[str, Counter] = defaultdict(Counter)
        for node in float_nodes:
            per_op[node.op_type][node.precision] += 1
            per_module[top_module(node.module)][node.precision] += 1
        low = self.options.low
        macs, fp32_by_rule, uncounted = self._mac_counts()
        total_macs = sum(macs.values())
        return {
            "nodes": len(self.nodes),
            "precision": dict(sorted(Counter(node.precision for node in self.nodes).items())),
            "rules": dict(sorted(Counter(node.rule for node in float_nodes).items())),
            "op_types": {op: dict(sorted(c.items())) for op, c in sorted(per_op.items())},
            "modules": {module: dict(sorted(c.items())) for module, c in sorted(per_module.items())},
            "macs": {"total": total_macs, "low_precision": macs.get(low, 0),
                     "low_precision_share": round(macs.get(low, 0) / total_macs, 4) if total_macs else None,
                     "fp32_by_rule": dict(sorted(fp32_by_rule.items())), "uncounted_nodes": uncounted},
        }

    def _mac_counts(self) -> tuple[Counter[str], Counter[str], int]:
        """Multiply-accumulates of the floating-point nodes per precision, those planned FP32 per rule, and how many
        floating-point nodes of a multiply-accumulating op type have no count (a shape was unknown). Nodes planned
        ``none`` compute no floats (the planner plans a node whose output types it cannot tell FP32, rule
        ``untyped``)."""
        macs: Counter[str] = Counter()
        fp32_by_rule: Counter[str] = Counter()
        uncounted = 0
        for node in self.nodes:
            if node.precision == NONE:
                continue
            if node.macs is None:
                uncounted += node.op_type in MAC_OPS
                continue
            macs[node.precision] += node.macs
            if node.precision == FP32:
                fp32_by_rule[node.rule] += node.macs
        return macs, fp32_by_rule, uncounted

    def to_json(self) -> dict[str, Any]:
        """``plan.json``: policy, options, summary and per-node plan (deterministic for identical inputs)."""
        return {
            "policy": self.policy.name, "target": self.options.low, "torch_policy_table": self.policy.torch_version,
            "options": {"overrides": asdict(self.options.overrides), "range_check": self.options.range_check,
                        "headroom": self.options.headroom, "calibration_samples": self.calibration_samples,
                        "training_ranges": self.options.training_ranges},
            "notes": self.notes, "summary": self.summary(), "nodes": [node.to_json() for node in self.nodes],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> PrecisionPlan:
        """The plan as :meth:`to_json` wrote it (the policy table of the torch version it names)."""
        options = data["options"]
        plan_options = PlanOptions(policy=data["policy"], target=data["target"],
                                   torch_version=data.get("torch_policy_table"),
                                   overrides=Overrides(**options["overrides"]), range_check=options["range_check"],
                                   headroom=options["headroom"],
                                   training_ranges=options.get("training_ranges", True))
        policy, _ = resolve_policy(data["policy"], data.get("torch_policy_table"))
        nodes = [NodePlan(**node) for node in data["nodes"]]
        return PrecisionPlan(policy, plan_options, nodes, list(data.get("notes", [])),
                             options.get("calibration_samples", 0))

    @staticmethod
    def load(path: str | Path) -> PrecisionPlan:
        """Read a ``plan.json``; one-line error when the file is missing or is not an mpexport plan."""
        path = Path(path)
        try:
            return PrecisionPlan.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise MpexportError(f"plan '{path}' does not exist", stage=STAGE) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise MpexportError(f"'{path}' is not an mpexport plan: {type(exc).__name__}: {exc}",
                                stage=STAGE) from None

    def precisions(self) -> dict[str, str]:
        """Node name -> planned precision."""
        return {node.name: node.precision for node in self.nodes}


def read_plan(bundle: Bundle) -> PrecisionPlan:
    """The bundle's precision plan (a one-line error when it has none)."""
    return PrecisionPlan.load(bundle.path(PLAN))


def read_ranges(bundle: Bundle) -> RangeStats | None:
    """The range rule's calibration statistics the bundle keeps, or None without them."""
    return RangeStats.from_json(json.loads(bundle.path(RANGES).read_text())) if bundle.has(RANGES) else None

"""How far two plans of the same model agree when they were made from different ONNX graphs (the dynamo export with
its aten provenance, and an ONNX exported elsewhere with none): nodes are paired by module path and op type, in
their order of appearance within the module; pairs are compared, the rest counted as not comparable. Data movement
(Reshape, Transpose, Gather, Concat...) is exact in any type, and exporters place it differently (the TorchScript
exporter folds the head and key transposes of attention into one): it is counted apart, not compared."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from mpexport.base.dtypes import NONE
from mpexport.precision.plan import NodePlan, PrecisionPlan

DATA_MOVEMENT = frozenset({
    "Constant", "ConstantOfShape", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat",
    "Split", "Slice", "Gather", "GatherElements", "GatherND", "Expand", "Tile", "Pad", "Shape", "Size",
    "SpaceToDepth", "DepthToSpace"})
"""Ops that only move or copy values: their result is the same in any floating-point type."""


@dataclass
class Agreement:
    """Paired nodes, how many got the same precision, and the ones that did not."""

    compared: int = 0
    agreed: int = 0
    not_comparable: int = 0
    data_movement: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Share of the compared nodes with the same precision (1.0 when none were compared)."""
        return self.agreed / self.compared if self.compared else 1.0

    def to_json(self) -> dict[str, Any]:
        """As reported by tests and benchmarks."""
        return {"compared": self.compared, "agreed": self.agreed, "share": round(self.share, 4),
                "not_comparable": self.not_comparable, "data_movement": self.data_movement,
                "mismatches": self.mismatches[:20]}


def plan_agreement(reference: PrecisionPlan, other: PrecisionPlan) -> Agreement:
    """Compare ``other`` (e.g. the plan of an ONNX from elsewhere) with ``reference`` (the provenance plan of the
    same model) on the floating-point nodes both have in the same module."""
    left, right = _by_module(reference.nodes), _by_module(other.nodes)
    result = Agreement(data_movement=sum(node.op_type in DATA_MOVEMENT for node in other.nodes))
    for key in sorted(set(left) | set(right), key=str):
        ours, theirs = left.get(key, []), right.get(key, [])
        result.not_comparable += abs(len(ours) - len(theirs))
        for a, b in zip(ours, theirs, strict=False):
            result.compared += 1
            if a.precision == b.precision:
                result.agreed += 1
            else:
                result.mismatches.append({"module": key[0], "op_type": key[1], "reference": a.name,
                                          "other": b.name, "reference_precision": a.precision,
                                          "other_precision": b.precision, "other_reason": b.reason})
    return result


def _by_module(nodes: list[NodePlan]) -> dict[tuple[str, str], list[NodePlan]]:
    groups: dict[tuple[str, str], list[NodePlan]] = defaultdict(list)
    for node in nodes:
        if node.precision != NONE and node.module is not None and node.rule not in ("subgraph", "cast") \
                and node.op_type not in DATA_MOVEMENT:
            groups[(node.module, node.op_type)].append(node)
    return groups

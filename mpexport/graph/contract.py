"""The mixed model's contract with its plan, as checks over an in-memory model: every node realizes its planned
precision, Casts agree with their declared outputs, and no value goes low -> FP32 -> low. Lint runs them on a file
(with the ONNX checker and ONNX Runtime); the rewrite pass ensures them on the model it wrote."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import onnx_ir as ir

from mpexport.base.dtypes import FLOAT_ONNX_TYPES, NONE, PRECISION_OF_ONNX
from mpexport.graph.walk import added_role, walk

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"


@runtime_checkable
class PlannedPrecisions(Protocol):
    """What lint reads of a precision plan (:class:`mpexport.precision.plan.PrecisionPlan` is one): each node's
    planned precision, and the planned nodes with their op types (to know the Casts the writer may remove)."""

    nodes: Any

    def precisions(self) -> dict[str, str]: ...


@dataclass
class Check:
    """One lint check: its name, status (pass/fail/skipped) and what it found."""

    name: str
    status: str
    detail: str = ""
    findings: list[str] = field(default_factory=list)


def cast_types(model: ir.Model) -> Check:
    """Every Cast's ``to`` is the type its output declares."""
    findings = []
    for node in model.graph:
        if node.op_type != "Cast":
            continue
        to = ir.DataType(node.attributes["to"].value)
        declared = node.outputs[0].dtype
        if declared is not None and declared != to:
            findings.append(f"{node.name}: to={to.name}, output declared {declared.name}")
    return Check("cast types", FAIL if findings else PASS, f"{len(findings)} Casts disagree with their output",
                 findings)


def rounding_chains(model: ir.Model) -> Check:
    """No low -> FP32 -> low pair of Casts (a round trip that only costs time)."""
    findings = []
    for node in model.graph:
        if node.op_type != "Cast" or node.inputs[0] is None:
            continue
        to = ir.DataType(node.attributes["to"].value)
        producer = node.inputs[0].producer()
        if producer is None or producer.op_type != "Cast" or producer.inputs[0] is None:
            continue
        origin = producer.inputs[0].dtype
        middle = ir.DataType(producer.attributes["to"].value)
        if origin == to and to in FLOAT_ONNX_TYPES and middle == ir.DataType.FLOAT and to != ir.DataType.FLOAT:
            low = PRECISION_OF_ONNX[to]
            findings.append(f"{producer.name} -> {node.name}: {low} -> fp32 -> {low}")
    return Check("no rounding chains", FAIL if findings else PASS, f"{len(findings)} chains", findings)


def plan_match(model: ir.Model, plan: PlannedPrecisions | Mapping[str, str],
               removed_casts: Collection[str] = (), *, complete: bool = True) -> Check:
    """Every node against the plan, by name (names are unique across the main graph and every body). A planned node
    missing from the model fails unless it is a Cast the writer removed as a no-op: known from a
    :class:`PlannedPrecisions` (its Cast nodes) or named in ``removed_casts``. ``complete``: the plan covers the
    whole model, so a node of the model's own that it does not name fails too (a partial plan leaves such nodes
    as they are)."""
    planned = plan.precisions() if isinstance(plan, PlannedPrecisions) else dict(plan)
    casts = set(removed_casts)
    if isinstance(plan, PlannedPrecisions):
        casts |= {node.name for node in plan.nodes if node.op_type == "Cast"}
    realized = realized_precisions(model)
    findings: list[str] = []
    removed: list[str] = []
    untyped: list[str] = []
    compared = 0
    for name, precision in planned.items():
        if name not in realized:
            (removed if name in casts else findings).append(name if name in casts else
                                                            f"{name}: planned {precision}, not in the model")
            continue
        got, _ = realized[name]
        if got == UNKNOWN:
            untyped.append(name)
            continue
        compared += 1
        if got != precision:
            findings.append(f"{name}: planned {precision}, realized {got}")
    if complete:
        findings += [f"{name}: in the model but not in the plan" for name, (_, role) in realized.items()
                     if name not in planned and role is None]
    added = sum(1 for name, (_, role) in realized.items() if name not in planned and role is not None)
    detail = f"{compared} of {len(realized)} nodes compared ({added} added by the writer"
    detail += f", {len(removed)} no-op Casts removed" if removed else ""
    detail += f", {len(untyped)} with untyped outputs not compared)" if untyped else ")"
    if compared == 0 and complete:
        findings.append("no node of the model could be compared with the plan")
    return Check("realized precision = plan", FAIL if findings else PASS, detail, findings)


UNKNOWN = "unknown"
"""The realized precision of a node whose outputs carry no type (possible inside subgraph bodies)."""


def realized_precisions(model: ir.Model) -> dict[str, tuple[str, str | None]]:
    """Per node of the model, bodies included: the type its floating-point outputs have (``none`` when it outputs
    no floats, ``unknown`` when its outputs are untyped) and why mpexport added it (None: the model's own)."""
    found = {}
    for visited in walk(model.graph):
        node = visited.node
        dtypes = [output.dtype for output in node.outputs]
        types = [dtype for dtype in dtypes if dtype in FLOAT_ONNX_TYPES]
        realized = PRECISION_OF_ONNX[types[0]] if types else UNKNOWN if None in dtypes else NONE
        found[node.name or ""] = (realized, added_role(node))
    return found

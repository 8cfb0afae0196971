"""Provenance: for every ONNX node, the module path and aten op it came from, and why when unknown.

The dynamo exporter records, per node, ``pkg.torch.onnx.name_scopes`` (module path, last entry the FX node)
and ``pkg.torch.onnx.class_hierarchy`` (module classes, last entry the aten op). The TorchScript-based
exporter only leaves module scopes in node names (``/layer1/0/conv1/Conv``). A node the exporter's graph optimizer
fused (BatchNorm folded into a Conv) may record an op that cannot have produced it: it gets the op its type computes,
and the recorded one is kept as ``fused`` (:mod:`mpexport.capture.fused`).
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

import onnx_ir as ir

from mpexport.bundle.names import PROVENANCE
from mpexport.bundle.store import Bundle
from mpexport.capture.fused import computed_op, rewrite_rules, weight_owner
from mpexport.capture.fxfacts import FxFacts
from mpexport.graph.walk import walk

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
SHAPE_HELPER_SCOPE = "_empty_nn_module_stack_from_metadata_hook"
ROOT_MODULE = ""
"""Module path of the top-level module (ops written directly in the model's ``forward``)."""


@dataclass(frozen=True)
class NodeProvenance:
    """Where one ONNX node came from. ``module`` is a dotted module path (``""`` for the top-level module) or
    None when unknown; ``aten`` an aten op overload such as ``aten.linear.default`` or None; ``why`` says
    why something is unknown."""

    name: str
    op_type: str
    module: str | None
    module_class: str | None
    aten: str | None
    why: str | None = None
    fx_node: str | None = None
    """The FX node of the program the ONNX exporter translated."""
    origin: str | None = None
    """The node of the captured program it came from (differs from ``fx_node`` after decomposition)."""
    autocast_op: str | None = None
    """The op of ``origin``: what autocast intercepted when the model ran eagerly."""
    autocast_region: dict[str, Any] | None = None
    """The ``torch.autocast`` state the model's code sets around ``origin``, per device, if any."""
    fp32_inputs_from: tuple[str, ...] = ()
    """Origins of inputs that the model explicitly cast to FP32 (``x.float()``) before ``origin``."""
    fused: tuple[str, ...] = ()
    """The aten ops the node recorded although its op type cannot come from them: the exporter's optimizer fused
    them into it (a BatchNorm folded into a Conv). ``aten`` is then the op the node's type computes."""
    fused_by: str | None = None
    """The optimizer rules that fused the node, as it recorded them (``FuseBatchNormIntoConv``)."""

    @property
    def attributed(self) -> bool:
        """True when both the module path and the aten op are known."""
        return self.module is not None and self.aten is not None


def collect_provenance(model: ir.Model, kind: str = "exporter", facts: FxFacts | None = None) -> list[NodeProvenance]:
    """Provenance of every node of ``model`` (subgraph bodies included), in :func:`mpexport.graph.walk.walk` order,
    keyed by node name (the model's nodes must be named uniquely: :func:`mpexport.graph.walk.name_nodes_uniquely`).

    ``kind`` says what the exporter left: ``exporter`` (dynamo metadata), ``exporter-no-modules`` (dynamo
    metadata on a graph converted from TorchScript, whose module hierarchy is lost) or ``scope`` (TorchScript
    exporter: module scopes in node names, no aten ops).
    """
    records: list[NodeProvenance] = []
    for visited in walk(model.graph):
        node = visited.node
        name = node.name or ""
        if kind == "scope":
            records.append(_from_scope(name, node))
            continue
        record = _from_metadata(name, node)
        if kind == "exporter-no-modules" and record.module is not None:
            record = replace(record, module=None, module_class=None,
                             why="TorchScript input: the module hierarchy is not recorded")
        records.append(_with_facts(record, node, facts or FxFacts()))
    return records


def _with_facts(record: NodeProvenance, node: ir.Node, facts: FxFacts) -> NodeProvenance:
    scopes = parse_list(node.metadata_props.get(NAME_SCOPES))
    fx_node = scopes[-1] if scopes else None
    origin = facts.origin_of(fx_node)
    if origin is None:
        return record
    # the origin of a fused node is the op it recorded, not the one it computes
    autocast_op = record.aten if record.fused else facts.target.get(origin, record.aten)
    return replace(
        record, fx_node=fx_node, origin=origin, autocast_op=autocast_op,
        autocast_region=facts.region.get(origin), fp32_inputs_from=tuple(facts.fp32_inputs.get(origin, ())),
    )


def parse_list(text: str | None) -> list[str]:
    """A list the exporter wrote into a metadata property as Python literal text; empty for anything else."""
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else []


def _from_metadata(name: str, node: ir.Node) -> NodeProvenance:
    scopes = parse_list(node.metadata_props.get(NAME_SCOPES))
    classes = parse_list(node.metadata_props.get(CLASS_HIERARCHY))
    if not scopes or not classes:
        return NodeProvenance(name, node.op_type, None, None, None, "added by the exporter's graph optimizer")
    if SHAPE_HELPER_SCOPE in scopes:
        return NodeProvenance(name, node.op_type, None, None, None, "shape helper (symbolic size)")
    module = scopes[-2] if len(scopes) >= 2 else ROOT_MODULE
    module_class = classes[-2] if len(classes) >= 2 else None
    op = classes[-1]
    if op.startswith("<built-in") or "." not in op:
        return NodeProvenance(name, node.op_type, module, module_class, None, "symbolic shape arithmetic")
    computed = computed_op(node, op)
    if computed is not None:  # the module is the one whose weight it computes with (the Conv's, not the BN's)
        owner = weight_owner(node, module)
        return NodeProvenance(name, node.op_type, owner or module, None if owner else module_class, computed,
                              fused=(op,), fused_by=rewrite_rules(node))
    return NodeProvenance(name, node.op_type, module, module_class, op)


def _from_scope(name: str, node: ir.Node) -> NodeProvenance:
    if not name.startswith("/"):
        return NodeProvenance(name, node.op_type, None, None, None, "no module scope in the node name")
    return NodeProvenance(name, node.op_type, scope_module(name), None, None,
                          "the TorchScript exporter records no aten op")


def scope_module(name: str) -> str:
    """The module path in a TorchScript-exporter node name: ``/blocks/blocks.1/norm2/LayerNormalization`` ->
    ``blocks.1.norm2`` (a container's child is written with the container's name in front, e.g. ``blocks.1``)."""
    path: list[str] = []
    for part in name.strip("/").split("/")[:-1]:
        if path and part.startswith(f"{path[-1]}."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path)


def summarize(records: list[NodeProvenance]) -> dict[str, Any]:
    """Counts for the manifest: nodes, with module, with aten op, attributed share, the unattributed nodes
    grouped by reason (count and a few examples each), and the nodes the exporter's optimizer fused (count and a
    few examples: ``name (op type): aten <- fused``)."""
    total = len(records)
    attributed = sum(record.attributed for record in records)
    reasons = Counter(record.why for record in records if not record.attributed)
    unattributed = []
    for why, count in sorted(reasons.items(), key=lambda item: (-item[1], str(item[0]))):
        examples = [f"{r.name} ({r.op_type})" for r in records if not r.attributed and r.why == why][:5]
        unattributed.append({"why": why, "count": count, "examples": examples})
    return {
        "nodes": total,
        "with_module": sum(record.module is not None for record in records),
        "with_aten": sum(record.aten is not None for record in records),
        "attributed": attributed,
        "coverage": round(attributed / total, 4) if total else 1.0,
        "unattributed": unattributed,
        "fused": {"count": sum(bool(record.fused) for record in records),
                  "examples": [f"{r.name} ({r.op_type}): {r.aten} <- {', '.join(r.fused)}" for r in records
                               if r.fused][:5]},
    }


def to_json(records: list[NodeProvenance]) -> list[dict[str, Any]]:
    """The per-node records as written to ``provenance.json`` (empty fields left out, except module/aten)."""
    return [{key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(record).items()
             if value not in (None, ()) or key in ("module", "aten")} for record in records]


def from_json(data: list[dict[str, Any]]) -> list[NodeProvenance]:
    """Records read back from ``provenance.json``."""
    return [NodeProvenance(**{"module_class": None, **item,
                              "fp32_inputs_from": tuple(item.get("fp32_inputs_from", ())),
                              "fused": tuple(item.get("fused", ()))}) for item in data]


def read_provenance(bundle: Bundle) -> list[NodeProvenance]:
    """The bundle's per-node provenance records."""
    return from_json(json.loads(bundle.path(PROVENANCE).read_text()))

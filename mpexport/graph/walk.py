"""Walking an ONNX graph with its subgraphs, and the node names every stage keys on.

Provenance, the plan, the writer and lint refer to a node by its name. ONNX does not require names, nor unique
ones, and subgraph bodies (If branches, Loop/Scan bodies) may reuse the main graph's names. So the FP32 model is
given unique names once, before anything keys on them (:func:`name_nodes_uniquely`), and every stage walks the
graph the same way (:func:`walk`): a node name then means one node everywhere, in the main graph and in every
body, with no naming rule that could collide with what an exporter writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx_ir as ir

ROLE = "mpexport.role"
"""Metadata key on nodes mpexport added to a model (``cast``: a precision boundary the writer inserted)."""


@dataclass(frozen=True)
class Visited:
    """One node of a walk: the node, the graph that holds it, and the node holding that graph (None in the main
    graph; the innermost holder for nested bodies)."""

    node: ir.Node
    graph: ir.Graph
    holder: ir.Node | None


def attribute_graphs(attribute: ir.Attr) -> list[ir.Graph]:
    """The subgraphs an attribute holds (If branches, Loop/Scan bodies); none for other attributes."""
    if attribute.type == ir.AttributeType.GRAPH:
        return [attribute.value]
    return list(attribute.value) if attribute.type == ir.AttributeType.GRAPHS else []


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """Every graph ``node``'s attributes hold (not nested ones)."""
    return [graph for attribute in node.attributes.values() for graph in attribute_graphs(attribute)]


def walk(graph: ir.Graph, holder: ir.Node | None = None) -> Iterator[Visited]:
    """Every node of ``graph`` in graph order, each holder followed by the nodes of its bodies (depth first)."""
    for node in graph:
        yield Visited(node, graph, holder)
        for body in subgraphs(node):
            yield from walk(body, node)


def name_nodes_uniquely(model: ir.Model) -> int:
    """Give every node of ``model`` (bodies included) a name no other node has: unnamed nodes get
    ``<op_type>_<n>``, repeated names a ``__<n>`` suffix; the first node with a name keeps it. Returns how many
    nodes were (re)named. Deterministic: the same graph gets the same names."""
    taken = {visited.node.name for visited in walk(model.graph) if visited.node.name}
    seen: set[str] = set()
    renamed = 0
    for visited in walk(model.graph):
        node = visited.node
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.name}__" if node.name else f"{node.op_type}_"
        counter = 0
        while f"{base}{counter}" in taken:
            counter += 1
        node.name = f"{base}{counter}"
        taken.add(node.name)
        seen.add(node.name)
        renamed += 1
    return renamed


def node_names(model: ir.Model) -> list[str]:
    """Every node's name in walk order (the names the plan and lint key on)."""
    return [visited.node.name or "" for visited in walk(model.graph)]


def mark_added(node: ir.Node, role: str) -> ir.Node:
    """Record on ``node`` that mpexport added it (``role`` says why); returns the node."""
    node.metadata_props[ROLE] = role
    return node


def added_role(node: ir.Node) -> str | None:
    """Why mpexport added ``node`` (``cast``...), or None for a node of the model itself."""
    return node.metadata_props.get(ROLE)


def infer_types(model: ir.Model) -> None:
    """Give untyped values of the main graph their types and shapes with ONNX shape inference (in place; weights are
    not serialized for it), then what that leaves untyped (ONNX Runtime's contrib ops and what follows them) with
    :func:`mpexport.graph.contrib.type_contrib_values`. Models from mpexport's exporter are typed throughout; the
    TorchScript exporter's and other tools' often are not. Values nothing can type stay untyped."""
    if all(value.dtype is not None for node in model.graph for value in node.outputs if value.name):
        return
    from onnx_ir.passes.common import ShapeInferencePass

    from mpexport.graph.contrib import type_contrib_values

    ShapeInferencePass(strict_mode=False)(model)
    type_contrib_values(model)

"""Strict low-precision emulation: an FP32 copy of a mixed-precision ONNX model that stores every FP16/BF16
tensor exactly as the low type would (a Cast to the low type and back after it), so ONNX Runtime's CPU EP
cannot hide overflow by computing low-precision chains in FP32.

* every node whose outputs are FP16/BF16 computes in FP32 and rounds each output through the low type;
* the model's own casts to a low type round the same way; low-precision initializers stay as they are (in
  the model's external data file, if it has one) and are cast to FP32 once, right before their first user;
* pessimistic reductions: a low-precision ReduceMean also rounds the sum it divides (what a kernel that
  accumulates in the low type computes), so a sum that overflows shows as infinity.

Works on any typed ONNX model (mpexport's mixed model or one made by another tool).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from mpexport.base.dtypes import LOW_ONNX_TYPES as LOW_TYPES
from mpexport.graph.walk import added_role, infer_types, mark_added, subgraphs, walk


class EmulationError(ir.passes.PreconditionError, ValueError):
    """The model uses low precision in a way the strict emulation cannot reproduce (so it cannot vouch for it)."""


def load_strict_emulation(mixed: str | Path) -> ir.Model:
    """The strict emulation of a mixed model file (in memory; its external weights stay in their file)."""
    return strict_emulation(ir.load(str(mixed)))


def strict_emulation(model: ir.Model) -> ir.Model:
    """Turn ``model`` (in place) into its FP32 strict emulation (:class:`StrictEmulation`) and return it. Raises
    :class:`EmulationError` when the model computes in low precision inside a subgraph body (If/Loop/Scan), which it
    does not emulate."""
    return StrictEmulation()(model).model


class StrictEmulation(ir.passes.InPlacePass):
    """The strict emulation as an onnx-ir pass (the rules in the module docstring).

    Requires: no low precision inside subgraph bodies (:class:`EmulationError`). Ensures: the only low-precision
    values computed are the outputs of its rounding Casts, each read only by Casts back to FP32; every graph input
    is FP32 or not a float (low-precision initializers stay as they are, widened before their first user)."""

    def requires(self, model: ir.Model) -> None:
        """Low precision only in the main graph."""
        _refuse_low_bodies(model.graph)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Widen every low-precision value to FP32 storage with a rounding round trip after it."""
        graph = model.graph
        _type_values(model)
        _widen_initializers(graph)
        for value in graph.inputs:
            if value.dtype in LOW_TYPES:
                value.dtype = ir.DataType.FLOAT
        for node in list(graph):
            low_constant = _low_value_attribute(node)
            if low_constant is not None:
                tensor = node.attributes["value"].value
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float32)))
                _round_outputs(graph, node, low_constant)
                continue
            type_attribute = _low_type_attribute(node)
            if type_attribute is not None:  # Cast(to=FP16), EyeLike/Random*(dtype=FP16): compute FP32, round
                low = ir.DataType(node.attributes[type_attribute].value)
                node.attributes[type_attribute] = ir.AttrInt64(type_attribute, ir.DataType.FLOAT)
                _round_outputs(graph, node, low)
                continue
            lows = [output.dtype for output in node.outputs if output.dtype in LOW_TYPES]
            if not lows:
                continue
            if node.op_type == "ReduceMean":
                _pessimistic_mean(graph, node, lows[0])
            _round_outputs(graph, node, lows[0])
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        """Low precision survives only as rounding."""
        graph = model.graph
        for node in graph:
            for output in node.outputs:
                if output.dtype in LOW_TYPES and (added_role(node) != ROUNDING or any(
                        user.op_type != "Cast" for user, _ in output.uses())):
                    raise ir.passes.PostconditionError(f"'{output.name}' (from {node.name}) is still "
                                                       f"{output.dtype.name} outside a rounding round trip")
        for value in graph.inputs:
            if value.dtype in LOW_TYPES:
                raise ir.passes.PostconditionError(f"graph input '{value.name}' is still {value.dtype.name}")


ROUNDING = "rounding"
"""Role (``mpexport.role`` metadata) of the casts to the low type that make the emulation strict."""
TYPE_ATTRIBUTES = ("to", "dtype")
"""Attributes that set a node's output type (Cast's ``to``; EyeLike's, RandomNormal's... ``dtype``)."""


def _low_value_attribute(node: ir.Node) -> ir.DataType | None:
    """The low type of a Constant's or ConstantOfShape's ``value`` tensor, if it has one."""
    if node.op_type not in ("Constant", "ConstantOfShape") or "value" not in node.attributes:
        return None
    attribute = node.attributes["value"]
    if attribute.type != ir.AttributeType.TENSOR:
        return None
    dtype = attribute.value.dtype
    return dtype if dtype in LOW_TYPES else None


def _low_type_attribute(node: ir.Node) -> str | None:
    """The name of the attribute that makes ``node`` output a low type (``to``, ``dtype``), if one does."""
    for name in TYPE_ATTRIBUTES:
        attribute = node.attributes.get(name)
        if attribute is not None and attribute.type == ir.AttributeType.INT and attribute.value in LOW_TYPES:
            return name
    return None


def _type_values(model: ir.Model) -> None:
    """Give untyped values their types (ONNX shape inference; mpexport's own models are typed throughout), and
    raise :class:`EmulationError` for a node that reads low-precision values but whose output type stays unknown:
    the emulation could not tell whether to round it. An omitted optional output (no name) is never read."""
    infer_types(model)
    for node in model.graph:
        if any(value.dtype is None and value.name for value in node.outputs) and \
                any(value is not None and value.dtype in LOW_TYPES for value in node.inputs):
            raise EmulationError(f"the output type of node '{node.name}' ({node.op_type}), which reads "
                                 "low-precision values, is unknown even after shape inference")


def _refuse_low_bodies(graph: ir.Graph) -> None:
    """Raise :class:`EmulationError` for a subgraph body that holds low-precision values: the emulation rounds the
    main graph only, so it would silently be less strict there."""
    for holder in graph:
        for body in subgraphs(holder):
            for visited in walk(body, holder):
                node = visited.node
                values = [value for value in (*node.inputs, *node.outputs) if value is not None]
                if any(value.dtype in LOW_TYPES for value in values) or _low_value_attribute(node) is not None \
                        or _low_type_attribute(node) is not None:
                    raise EmulationError(f"node '{node.name}' inside the subgraph of '{holder.name}' "
                                         f"({holder.op_type}) computes in low precision, which the strict emulation "
                                         "does not reproduce inside subgraph bodies")


def _widen_initializers(graph: ir.Graph) -> None:
    """Every use of a low-precision initializer reads it through one Cast to FP32, placed right before its first
    user (the exact values, and no copy of the weights here). ONNX Runtime folds the Cast when it optimizes the
    session; a session that runs unoptimized (a large model, to save memory) runs each Cast just before the
    weight is needed, so the FP32 copies are not all alive at once."""
    position = {node: index for index, node in enumerate(graph)}
    for value in list(graph.initializers.values()):
        if value.dtype not in LOW_TYPES or value.const_value is None or value in graph.outputs:
            continue
        uses = list(value.uses())
        if not uses:
            continue
        cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{value.name}__widen")
        cast.outputs[0].name = f"{value.name}__fp32"
        cast.outputs[0].dtype = ir.DataType.FLOAT
        cast.outputs[0].shape = value.shape
        first = min((user for user, _ in uses), key=position.__getitem__)  # bodies reading low values are refused
        for user, index in uses:
            user.replace_input_with(index, cast.outputs[0])
        graph.insert_before(first, cast)


def _round_outputs(graph: ir.Graph, node: ir.Node, low: ir.DataType) -> None:
    """Make ``node``'s low outputs FP32 and route their consumers through a round trip via ``low``."""
    anchor = node
    for output in node.outputs:
        if output.dtype not in LOW_TYPES and not (node.op_type in ("Cast", "ConstantOfShape")
                                                  and output.dtype == ir.DataType.FLOAT):
            continue
        output.dtype = ir.DataType.FLOAT
        consumers = list(output.uses())
        down = mark_added(ir.node("Cast", [output], {"to": low}, name=f"{node.name}__round_{output.name}_down"),
                          ROUNDING)
        up = ir.node("Cast", [down.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{node.name}__round_{output.name}_up")
        down.outputs[0].name = f"{output.name}__low"
        down.outputs[0].dtype = low
        up.outputs[0].dtype = ir.DataType.FLOAT
        up.outputs[0].shape = output.shape
        is_output = output in graph.outputs
        graph.insert_after(anchor, [down, up])
        anchor = up
        for user, index in consumers:
            user.replace_input_with(index, up.outputs[0])
        rounded_name = output.name
        output.name = f"{rounded_name}__unrounded"
        up.outputs[0].name = rounded_name
        if is_output:
            position = list(graph.outputs).index(output)
            graph.outputs[position] = up.outputs[0]


def _pessimistic_mean(graph: ir.Graph, node: ir.Node, low: ir.DataType) -> None:
    """mean = round(round(mean * n) / n): the low-precision sum a naive kernel accumulates, n = |x| / |mean|."""
    source, mean = node.inputs[0], node.outputs[0]
    name = node.name
    consumers = list(mean.uses())
    size_in = ir.node("Size", [source], name=f"{name}__count_in")
    size_out = ir.node("Size", [mean], name=f"{name}__count_out")
    count = ir.node("Div", [size_in.outputs[0], size_out.outputs[0]], name=f"{name}__count")
    count_float = ir.node("Cast", [count.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}__count_float")
    mean.dtype = ir.DataType.FLOAT
    total = ir.node("Mul", [mean, count_float.outputs[0]], name=f"{name}__sum")
    down = mark_added(ir.node("Cast", [total.outputs[0]], {"to": low}, name=f"{name}__sum_down"), ROUNDING)
    up = ir.node("Cast", [down.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}__sum_up")
    divided = ir.node("Div", [up.outputs[0], count_float.outputs[0]], name=f"{name}__mean")
    for value, suffix, dtype in ((total.outputs[0], "sum", ir.DataType.FLOAT), (down.outputs[0], "sum_low", low),
                                 (up.outputs[0], "sum_rounded", ir.DataType.FLOAT),
                                 (divided.outputs[0], "mean", ir.DataType.FLOAT)):
        value.name = f"{mean.name}__{suffix}"
        value.dtype = dtype
    for value, suffix in ((size_in.outputs[0], "count_in"), (size_out.outputs[0], "count_out"),
                          (count.outputs[0], "count")):  # the suffixes of their nodes' names
        value.dtype = ir.DataType.INT64
        value.name = f"{name}__{suffix}"
    count_float.outputs[0].dtype = ir.DataType.FLOAT
    count_float.outputs[0].name = f"{name}__count_float"
    graph.insert_after(node, [size_in, size_out, count, count_float, total, down, up, divided])
    is_output = mean in graph.outputs
    for user, index in consumers:
        user.replace_input_with(index, divided.outputs[0])
    original = mean.name
    mean.name = f"{original}__direct"
    divided.outputs[0].name = original
    divided.outputs[0].shape = mean.shape
    if is_output:
        graph.outputs[list(graph.outputs).index(mean)] = divided.outputs[0]

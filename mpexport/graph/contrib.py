"""Types for the values ONNX shape inference leaves unknown: the outputs of ONNX Runtime's contrib ops (domain
``com.microsoft``: Attention, SkipLayerNormalization, BiasGelu... as ``onnxruntime.transformers.optimizer`` writes
them) and of every standard op downstream of them, which ONNX shape inference cannot type once one input is unknown.

:func:`type_contrib_values` types them, filling only what is unknown (a type or shape already there is kept):

1. ONNX Runtime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``), which knows the contrib ops:
   types and shapes. Weights are not serialized for it (larger initializers become typed, shaped graph inputs while
   it runs), and it runs through its steps rather than its ``infer_shapes`` entry point, which writes a file into
   the working directory when it cannot type everything;
2. for what it left untyped, the operator schemas ONNX Runtime registers: an output whose type parameter (``T``) an
   input binds gets that input's type, one whose parameter admits a single type (``U``: float) gets that one;
3. ONNX shape inference again, for the standard ops downstream of what step 2 typed.

A value none of them can type stays untyped: the planner keeps its node FP32 and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import onnx
import onnx_ir as ir

DEFAULT_DOMAINS = ("", "ai.onnx")
BIG_INITIALIZER = 1024
"""Initializers above this many bytes are not serialized for symbolic shape inference (it reads their shapes)."""


def untyped_outputs(model: ir.Model) -> list[ir.Value]:
    """Named node outputs of the main graph without a type (optional outputs left empty are not values)."""
    return [value for node in model.graph for value in node.outputs if value.name and value.dtype is None]


def type_contrib_values(model: ir.Model) -> int:
    """Type the untyped node outputs of ``model``'s main graph in place (the steps in the module docstring);
    returns how many got a type. Never raises for a model the steps cannot type: it types what it can."""
    before = len(untyped_outputs(model))
    if not before:
        return 0
    _merge(model, _symbolic_inference(model))
    if untyped_outputs(model) and _type_from_schemas(model):
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass(strict_mode=False)(model)
    return before - len(untyped_outputs(model))


# -- 1. ONNX Runtime's symbolic shape inference ----------------------------------------------------------------
def _symbolic_inference(model: ir.Model) -> onnx.ModelProto | None:
    """The model as ONNX Runtime's symbolic shape inference types it, or None where it cannot run."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # an onnxruntime without its tools
        return None
    quiet = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with _weights_detached(model):
            proto = ir.serde.serialize_model(model)
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess rank, verbose
        inference._preprocess(proto)  # its steps: see the module docstring (infer_shapes writes a file)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        result: onnx.ModelProto = inference.out_mp_
        return result
    except Exception:  # noqa: BLE001 - a model it cannot type is left to the schema rule
        return None
    finally:
        quiet.setLevel(level)


@contextmanager
def _weights_detached(model: ir.Model) -> Iterator[None]:
    """While inside: every initializer above :data:`BIG_INITIALIZER` bytes is a typed, shaped graph input without
    data (so serializing the model does not copy the weights); restored on the way out (in their order), whatever
    happens."""
    graph = model.graph
    order = list(graph.initializers)
    detached = []
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= BIG_INITIALIZER or value in graph.inputs:
            continue
        value.shape = value.shape or ir.Shape(tensor.shape.numpy())
        value.dtype = value.dtype or tensor.dtype
        detached.append((value, tensor))
        graph.initializers.pop(value.name or "")
        value.const_value = None
        graph.inputs.append(value)
    try:
        yield
    finally:
        for value, tensor in detached:
            graph.inputs.remove(value)
            value.const_value = tensor
            graph.register_initializer(value)
        graph.initializers.data = {name: graph.initializers.data[name] for name in order}


def _merge(model: ir.Model, inferred: onnx.ModelProto | None) -> None:
    """Give the untyped values of ``model`` the types (and, where unknown, shapes) ``inferred`` found for them."""
    if inferred is None:
        return
    found = {info.name: info for info in (*inferred.graph.value_info, *inferred.graph.output)}
    for value in untyped_outputs(model):
        info = found.get(value.name or "")
        if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.elem_type:
            continue
        typed = ir.serde.deserialize_value_info_proto(info, None)
        if typed.dtype is None:
            continue
        value.dtype = typed.dtype
        if value.shape is None and typed.shape is not None:
            value.shape = typed.shape


# -- 2. the operator schemas ONNX Runtime registers ------------------------------------------------------------
def _type_from_schemas(model: ir.Model) -> int:
    """Type the untyped outputs of non-standard-domain nodes from their schemas (see the module docstring); returns
    how many it typed."""
    typed = 0
    for node in model.graph:
        if node.domain in DEFAULT_DOMAINS or all(value.dtype is not None for value in node.outputs):
            continue
        schema = op_schema(node.op_type, node.domain)
        if schema is None:
            continue
        for index, value in enumerate(node.outputs):
            if value.name and value.dtype is None and index < len(schema["outputs"]):
                dtype = _bound_type(node, schema, schema["outputs"][index])
                if dtype is not None:
                    value.dtype = dtype
                    typed += 1
    return typed


def _bound_type(node: ir.Node, schema: dict[str, Any], parameter: str) -> ir.DataType | None:
    """The type ``parameter`` stands for at ``node``: a typed input's with the same parameter, else the only one it
    admits."""
    inputs = schema["inputs"]
    for index, value in enumerate(node.inputs):
        slot = inputs[min(index, len(inputs) - 1)] if inputs else None  # a variadic last input repeats
        if value is not None and value.dtype is not None and slot == parameter:
            return value.dtype
    admitted = schema["types"].get(parameter, ())
    return admitted[0] if len(admitted) == 1 else None


def op_schema(op_type: str, domain: str) -> dict[str, Any] | None:
    """What ONNX Runtime's schema says of an op outside the standard domains: ``inputs`` and ``outputs`` (their type
    parameters, in order) and ``types`` (parameter -> the types it admits). None for an op it does not register (or
    an onnxruntime that does not list its schemas)."""
    return _schemas().get((domain, op_type))


def admits(node: ir.Node, dtype: ir.DataType) -> bool | None:
    """Whether ONNX Runtime's schema lets ``node``'s first output (and the inputs sharing its type parameter) have
    type ``dtype``; None where no schema says (a standard op, or one it does not register)."""
    if node.domain in DEFAULT_DOMAINS:
        return None
    schema = op_schema(node.op_type, node.domain)
    if schema is None or not schema["outputs"]:
        return None
    return dtype in schema["types"].get(schema["outputs"][0], ())


def fixed_type_slots(node: ir.Node, *, outputs: bool) -> frozenset[int]:
    """The inputs (or outputs) of ``node`` whose type ONNX Runtime's schema fixes (a parameter admitting one type,
    such as SkipLayerNormalization's FP32 ``mean``): they keep their type whatever precision the node runs in."""
    schema = op_schema(node.op_type, node.domain) if node.domain not in DEFAULT_DOMAINS else None
    if schema is None:
        return frozenset()
    slots = schema["outputs" if outputs else "inputs"]
    return frozenset(index for index, parameter in enumerate(slots) if len(schema["types"].get(parameter, ())) == 1)


@cache
def _schemas() -> dict[tuple[str, str], dict[str, Any]]:
    listing = _schema_listing()
    if listing is None:
        return {}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for schema in sorted(listing(), key=lambda schema: schema.since_version):  # the newest version wins
        if schema.domain in DEFAULT_DOMAINS:
            continue
        types = {constraint.type_param_str: tuple(dtype for name in constraint.allowed_type_strs
                                                  if (dtype := _tensor_type(name)) is not None)
                 for constraint in schema.type_constraints}
        found[(schema.domain, schema.name)] = {"inputs": [slot.typeStr for slot in schema.inputs],
                                               "outputs": [slot.typeStr for slot in schema.outputs],
                                               "types": {**types, **{slot.typeStr: (dtype,) for slot in (
                                                   *schema.inputs, *schema.outputs) if (dtype := _tensor_type(
                                                       slot.typeStr)) is not None}}}
    return found


def _schema_listing() -> Callable[[], list[Any]] | None:
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:  # an onnxruntime built without its schemas
        return None
    return get_all_operator_schema


def _tensor_type(name: str) -> ir.DataType | None:
    """``tensor(float16)`` -> FLOAT16; None for a type parameter or a non-tensor type."""
    if not name.startswith("tensor(") or not name.endswith(")"):
        return None
    dtype = getattr(ir.DataType, name.removeprefix("tensor(").removesuffix(")").upper(), None)
    return dtype if isinstance(dtype, ir.DataType) else None

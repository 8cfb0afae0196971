"""Ops the training policy decides as one, recognised in an ONNX graph that records no aten ops (an FP32 ONNX from
the TorchScript exporter or another tool). Each recognised node gets the aten op it stands for, and the plan says
it was recognised from the pattern.

* **scaled dot-product attention** as the TorchScript exporter writes ``F.scaled_dot_product_attention``: ``q`` and
  ``k^T`` each multiplied by ``sqrt(scale)``, ``MatMul``, an optional mask ``Add``/``Where``, ``Softmax`` (maybe a
  ``Cast``), ``MatMul`` with ``v``. All of it, the scale's arithmetic included, stands for
  ``aten.scaled_dot_product_attention``: the plan's kernel rule keeps its matmuls low and the rest FP32.
* **layer norm decomposed** (exporters before opset 17): ``ReduceMean(x)``, ``Sub``, ``Pow(2)``, ``ReduceMean``,
  ``Add(eps)``, ``Sqrt``, ``Div``, then the optional affine ``Mul``/``Add``: ``aten.layer_norm``.
* **RMS norm decomposed**: ``Pow(x, 2)``, ``ReduceMean``, ``Add(eps)``, ``Sqrt``, then ``Div(x, .)`` or
  ``Reciprocal`` or ``Div(1, .)`` and ``Mul(x, .)``, then the optional weight ``Mul``: ``aten.rms_norm``.
  A layer norm's weight and bias do not promote its output (``aten.layer_norm`` keeps its input's type); an RMS
  norm's weight ``Mul`` does, as the hand-written module it stands for does in PyTorch.

* **linear with bias** as the TorchScript exporter writes ``nn.Linear`` on inputs of rank > 2: ``MatMul`` by a
  constant weight, then ``Add`` of a constant bias: both stand for ``aten.linear`` (autocast runs the bias add inside
  the low-precision linear; a lone ``Add`` of an FP32 tensor would promote).

Softmax, LogSoftmax, Exp, Log, Pow and the reductions are single ONNX ops: the plan's stand-ins cover them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

SDPA = "aten.scaled_dot_product_attention"
LAYER_NORM = "aten.layer_norm"
RMS_NORM = "aten.rms_norm"
LINEAR = "aten.linear"
THROUGH = ("Cast", "Identity", "Dropout")
"""Ops a pattern may pass through without changing its meaning."""


@dataclass(frozen=True)
class Recognised:
    """The aten op a node stands for, and the pattern it was recognised in."""

    aten: str
    pattern: str


def recognise(model: ir.Model) -> dict[str, Recognised]:
    """Node name -> what it stands for, for every node of a recognised pattern in the main graph."""
    found: dict[str, Recognised] = {}
    for node in model.graph:
        if node.op_type == "Softmax":
            _attention(node, found)
        elif node.op_type == "Sqrt":
            _normalisation(node, found)
        elif node.op_type == "MatMul":
            _linear(node, found)
    return found


def _linear(matmul: ir.Node, found: dict[str, Recognised]) -> None:
    if len(matmul.inputs) != 2 or not is_constant(matmul.inputs[1]) or is_constant(matmul.inputs[0]):
        return
    users = [user for user, _ in matmul.outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "Add" or not any(is_constant(value) for value in users[0].inputs):
        return
    for node in (matmul, users[0]):
        found.setdefault(node.name or "", Recognised(LINEAR, "linear"))


def _producer(value: ir.Value | None, through: tuple[str, ...] = THROUGH) -> ir.Node | None:
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in through and node.inputs and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return node


def _consumers(value: ir.Value) -> list[ir.Node]:
    found = []
    for user, _ in value.uses():
        if user.op_type in THROUGH and user.outputs:
            found += _consumers(user.outputs[0])
        else:
            found.append(user)
    return found


def is_constant(value: ir.Value | None) -> bool:
    """An initializer or a Constant, maybe behind Identity nodes (exporters alias shared weights that way)."""
    while value is not None:
        if value.const_value is not None or value.is_initializer():
            return True
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return producer is not None and producer.op_type in ("Constant", "ConstantOfShape")
        value = producer.inputs[0] if producer.inputs else None
    return False


def _attention(softmax: ir.Node, found: dict[str, Recognised]) -> None:
    group: list[ir.Node] = [softmax]
    source = _producer(softmax.inputs[0])
    while source is not None and source.op_type in ("Add", "Where"):  # the mask
        group.append(source)
        score_inputs = [value for value in source.inputs if value is not None and _producer(value) is not None
                        and _producer(value).op_type in ("MatMul", "Add", "Where")]  # type: ignore[union-attr]
        score_inputs.sort(key=lambda value: _producer(value).op_type != "MatMul")  # type: ignore[union-attr]
        source = _producer(score_inputs[0]) if score_inputs else None
    if source is None or source.op_type != "MatMul":
        return
    scaled = [_producer(value) for value in source.inputs]
    if not all(node is not None and node.op_type == "Mul" for node in scaled):
        return  # an explicit attention (scores scaled after the matmul) is decided op by op
    users, guard = _consumers(softmax.outputs[0]), _nan_guard(softmax)
    if guard:  # Where(IsNaN(p), 0, p): fully masked rows give zeros, as the fused kernel does
        group += guard
        users = _consumers(guard[-1].outputs[0])
    if len(users) != 1 or users[0].op_type != "MatMul":
        return
    group += [source, users[0], *(node for node in scaled if node is not None)]
    for mul in scaled:
        assert mul is not None
        group += _scale_arithmetic(mul)
    for node in group:
        found.setdefault(node.name or "", Recognised(SDPA, "scaled dot-product attention"))


def _nan_guard(softmax: ir.Node) -> list[ir.Node]:
    """The ``IsNaN`` and ``Where`` the TorchScript exporter puts after the attention softmax, if there."""
    users = _consumers(softmax.outputs[0])
    if sorted(user.op_type for user in users) != ["IsNaN", "Where"]:
        return []
    is_nan, where = sorted(users, key=lambda user: user.op_type != "IsNaN")
    if where.inputs[0] is not is_nan.outputs[0]:
        return []
    return [is_nan, where]


def _scale_arithmetic(mul: ir.Node) -> list[ir.Node]:
    """The float nodes computing the attention scale a ``Mul`` applies (Sqrt, Div, Cast of the head size)."""
    nodes: list[ir.Node] = []
    pending = [value for value in mul.inputs[1:] if value is not None]
    while pending:
        producer = pending.pop().producer()
        if producer is None or producer.op_type not in ("Sqrt", "Div", "Cast", "Mul", "Reciprocal"):
            continue
        nodes.append(producer)
        pending += [value for value in producer.inputs if value is not None]
    return nodes


def _normalisation(sqrt: ir.Node, found: dict[str, Recognised]) -> None:
    add = _producer(sqrt.inputs[0])
    if add is None or add.op_type != "Add":
        return
    mean = next((_producer(value) for value in add.inputs if not is_constant(value)), None)
    if mean is None or mean.op_type != "ReduceMean":
        return
    square = _producer(mean.inputs[0])
    if square is None or square.op_type != "Pow" or not is_constant(square.inputs[1]):
        return
    centred = _producer(square.inputs[0])
    is_layer_norm = centred is not None and centred.op_type == "Sub" and \
        any((node := _producer(value)) is not None and node.op_type == "ReduceMean" for value in centred.inputs)
    group = [sqrt, add, mean, square]
    normalised = _normalise_step(sqrt)
    if normalised is None:
        return
    group += normalised
    if is_layer_norm:
        assert centred is not None
        group += [centred, *(node for value in centred.inputs if (node := _producer(value)) is not None
                             and node.op_type == "ReduceMean")]
    group += _affine(normalised[-1])
    aten, pattern = (LAYER_NORM, "layer norm") if is_layer_norm else (RMS_NORM, "RMS norm")
    for node in group:
        found.setdefault(node.name or "", Recognised(aten, pattern))


def _normalise_step(sqrt: ir.Node) -> list[ir.Node] | None:
    """``Div(x, sqrt)``, or ``Reciprocal(sqrt)`` or ``Div(1, sqrt)`` (``torch.rsqrt``) then ``Mul(x, .)``."""
    users = _consumers(sqrt.outputs[0])
    if len(users) == 1 and users[0].op_type == "Div" and not is_constant(users[0].inputs[0]):
        return [users[0]]
    if len(users) == 1 and users[0].op_type in ("Reciprocal", "Div"):
        after = _consumers(users[0].outputs[0])
        if len(after) == 1 and after[0].op_type == "Mul":
            return [users[0], after[0]]
    return None


def _affine(last: ir.Node) -> list[ir.Node]:
    """The optional weight ``Mul`` and bias ``Add`` by constants after a normalisation."""
    nodes: list[ir.Node] = []
    for op_type in ("Mul", "Add"):
        users = _consumers(last.outputs[0])
        if len(users) != 1 or users[0].op_type != op_type or not any(is_constant(value)
                                                                      for value in users[0].inputs):
            break
        last = users[0]
        nodes.append(last)
    return nodes

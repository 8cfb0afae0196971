"""Multiply-accumulates per node, for the plan's low-precision share: matmuls, Gemms, convolutions, and the contrib ops
that hold them (ONNX Runtime's Attention: the QKV projection, the scores and the context; MultiHeadAttention and
GroupQueryAttention: the scores and the context; FusedMatMul, GemmFastGelu, FusedConv...), Einsum (the product of
its index sizes) and recurrent layers (every step's input and hidden projections).

Shapes come from the calibration statistics (the first batch) where there are some, else from the graph (a
dynamic dimension counts as 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import numpy as np
import onnx_ir as ir

MATMULS = ("MatMul", "Gemm", "FusedMatMul", "TransposeMatMul", "GemmFastGelu", "FusedGemm")
CONVOLUTIONS = ("Conv", "FusedConv", "NhwcConv")
ATTENTIONS = ("Attention", "MultiHeadAttention", "GroupQueryAttention")
RECURRENT = ("LSTM", "GRU", "RNN")
MAC_OPS = (*MATMULS, *CONVOLUTIONS, "ConvTranspose", "Einsum", *ATTENTIONS, *RECURRENT)
"""Op types whose multiply-accumulates the share counts (a node of these whose count is unknown is reported as
uncounted, never silently left out)."""

Shape = tuple[int, ...]


def node_macs(node: ir.Node, shapes: Mapping[str, Shape] | None) -> int | None:
    """Multiply-accumulates of ``node`` (see the module docstring), with ``shapes`` the calibration shapes by value
    name (:attr:`mpexport.precision.plan.RangeStats.shapes`); None for other ops, or where a shape it needs is
    unknown."""
    if node.op_type not in MAC_OPS or not node.outputs:
        return None

    def shape(index: int, outputs: bool = False) -> Shape | None:
        values = node.outputs if outputs else node.inputs
        return _shape(values[index] if index < len(values) else None, shapes)

    if node.op_type in ATTENTIONS:
        return _attention(node, shape)
    if node.op_type == "Einsum":
        return _einsum(node, [shape(index) for index in range(len(node.inputs))])
    out, first, weight = shape(0, outputs=True), shape(0), shape(1)
    # X (steps, batch, in) or (batch, steps, in); W (dirs, gates*H, in), R (.., H); Y may be omitted (Y_h only)
    if node.op_type in RECURRENT and first and weight is not None:
        recurrence = shape(2)
        return _product(first[:2]) * (_product(weight) + _product(recurrence)) if recurrence is not None else None
    if out is None or first is None or weight is None or not first:
        return None
    if node.op_type in MATMULS:
        transposed = bool(node.attributes["transA"].value) if "transA" in node.attributes else False
        inner = first[-2] if transposed and len(first) >= 2 else first[-1]
        return _product(out) * inner
    if node.op_type in CONVOLUTIONS:
        return _product(out) * _product(weight[1:])
    if node.op_type == "ConvTranspose":
        return _product(first) * _product(weight[1:])
    return None


def _einsum(node: ir.Node, shapes: list[Shape | None]) -> int | None:
    """The product of the sizes of every index of the equation (one multiply-accumulate per combination); 0 for one
    operand (a transpose, trace or sum), None with an ellipsis or an unknown shape."""
    terms = str(node.attributes["equation"].value).replace(" ", "").split("->")[0].split(",") \
        if "equation" in node.attributes else []
    if len(terms) < 2 or len(terms) != len(shapes) or any("." in term for term in terms):
        return 0 if len(terms) == 1 else None
    sizes: dict[str, int] = {}
    for term, dims in zip(terms, shapes, strict=True):
        if dims is None or len(dims) != len(term):
            return None
        sizes.update(zip(term, dims, strict=True))
    return _product(tuple(sizes.values()))


def _attention(node: ir.Node, shape: Callable[..., Shape | None]) -> int | None:
    """Attention: B*S*(Hin*Hqkv + T*Hq + T*Hv); MultiHeadAttention and GroupQueryAttention: B*S*T*(Hq + Hv), with T
    the keys attended to (past included, from the ``present`` output's shape where known)."""
    query, out = shape(0), shape(0, outputs=True)
    if query is None or out is None or len(query) < 3 or len(out) < 3:
        return None
    batch, steps, values = query[0], query[1], out[-1]
    if node.op_type == "Attention":
        weight = shape(1)
        if weight is None or len(weight) != 2:
            return None
        sizes = node.attributes["qkv_hidden_sizes"].value if "qkv_hidden_sizes" in node.attributes else None
        queries = int(sizes[0]) if sizes else weight[1] // 3
        present = shape(1, outputs=True)
        keys = present[3] if present is not None and len(present) == 5 else steps
        return batch * steps * (query[2] * weight[1] + keys * (queries + values))
    if node.op_type == "GroupQueryAttention":
        present = shape(1, outputs=True)
        keys = present[2] if present is not None and len(present) == 4 else steps
        return batch * steps * keys * 2 * values
    queries = query[2] if len(query) == 3 else query[2] * query[-1]  # packed QKV: (B, S, N, 3, H)
    key, present = shape(1), shape(1, outputs=True)
    keys = present[2] if present is not None and len(present) == 4 else \
        key[1] if key is not None and len(key) == 3 else key[2] if key is not None and len(key) == 4 else steps
    return batch * steps * keys * (queries + values)


def _shape(value: ir.Value | None, shapes: Mapping[str, Shape] | None) -> Shape | None:
    if value is None:
        return None
    if shapes is not None and value.name is not None and value.name in shapes:
        return shapes[value.name]
    if value.const_value is not None:
        return cast("Shape", tuple(value.const_value.shape))  # a tensor's shape is static
    if value.shape is None:
        return None
    return tuple(dim if isinstance(dim, int) else 1 for dim in value.shape)


def _product(shape: Shape) -> int:
    return int(np.prod(shape, dtype=np.int64))

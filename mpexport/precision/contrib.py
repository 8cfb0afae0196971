"""ONNX Runtime's contrib ops (domain ``com.microsoft``, as ``onnxruntime.transformers.optimizer`` writes them),
planned by what they compute: each fuses aten ops a PyTorch model ran, and is planned as autocast ran the op that
decides its precision.

* attention (Attention, MultiHeadAttention, GroupQueryAttention...): the projections and both attention matmuls as
  ``aten.scaled_dot_product_attention`` (low precision under every policy; one node cannot keep its softmax FP32 the
  way the decomposed pattern's plan does, so its internal precision is ONNX Runtime's kernel's);
* normalisations (SkipLayerNormalization, EmbedLayerNormalization, SimplifiedLayerNormalization...): as
  ``aten.layer_norm`` / ``aten.rms_norm`` (FP32 under CUDA policies; CPU autocast lists neither, so they follow their
  inputs there, the residual ``skip`` included);
* activations (Gelu, FastGelu, BiasGelu, QuickGelu) and BiasAdd: as ``aten.gelu``/``aten.add``, in no list: they
  follow their data inputs (a fused bias is a weight of the linear before it, which ran low);
* matmul and convolution fusions (FusedMatMul, GemmFastGelu, FusedConv...): as ``aten.matmul``/``linear``/``conv``.

An op outside the standard ONNX domains that this table lacks is kept FP32 by the planner, and named in a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir

from mpexport.graph.contrib import DEFAULT_DOMAINS

SDPA = "aten.scaled_dot_product_attention"


@dataclass(frozen=True)
class ContribOp:
    """What a contrib op computes, the aten op autocast decides it as, and the inputs whose type it follows when
    that op is in no autocast list (None: every floating-point input)."""

    computes: str
    aten: str
    data_inputs: tuple[int, ...] | None = None


def _attention(what: str) -> ContribOp:
    return ContribOp(what, SDPA)


CONTRIB_OPS: dict[str, ContribOp] = {
    "Attention": _attention("the QKV projection, scaled dot-product attention (scores, mask, softmax) and the "
                            "context matmul in one kernel"),
    "MultiHeadAttention": _attention("scaled dot-product attention (scores, mask, softmax, context) over its "
                                     "queries, keys and values"),
    "GroupQueryAttention": _attention("grouped-query scaled dot-product attention with its KV cache"),
    "PackedAttention": _attention("the QKV projection and scaled dot-product attention over packed tokens"),
    "PackedMultiHeadAttention": _attention("scaled dot-product attention over packed tokens"),
    "DecoderMaskedMultiHeadAttention": _attention("one decoding step of scaled dot-product attention"),
    "SparseAttention": _attention("block-sparse scaled dot-product attention"),
    "SkipLayerNormalization": ContribOp("a residual add (input + skip + bias) and a layer norm", "aten.layer_norm",
                                        (0, 1)),
    "SkipSimplifiedLayerNormalization": ContribOp("a residual add (input + skip + bias) and an RMS norm",
                                                  "aten.rms_norm", (0, 1)),
    "SimplifiedLayerNormalization": ContribOp("an RMS norm", "aten.rms_norm", (0,)),
    "LayerNormalization": ContribOp("a layer norm", "aten.layer_norm", (0,)),
    "EmbedLayerNormalization": ContribOp("word, position and segment embedding lookups, their sum and a layer norm",
                                         "aten.layer_norm", (2, 3, 4)),
    "SkipGroupNorm": ContribOp("a residual add and a group norm", "aten.group_norm", (0, 3)),
    "GroupNorm": ContribOp("a group norm (and its activation)", "aten.group_norm", (0,)),
    "Gelu": ContribOp("GELU", "aten.gelu", (0,)),
    "FastGelu": ContribOp("GELU (tanh approximation) of its input plus a bias", "aten.gelu", (0,)),
    "BiasGelu": ContribOp("GELU of its input plus a bias", "aten.gelu", (0,)),
    "BiasSplitGelu": ContribOp("its input plus a bias, split in two, one half times GELU of the other", "aten.gelu",
                               (0,)),
    "QuickGelu": ContribOp("x * sigmoid(alpha * x)", "aten.sigmoid", (0,)),
    "BiasAdd": ContribOp("its input plus a bias plus a residual (skip)", "aten.add.Tensor", (0, 2)),
    "BiasSoftmax": ContribOp("softmax of its input plus a bias", "aten.softmax.int", (0, 1)),
    "RotaryEmbedding": ContribOp("rotary position embedding (products and sums with a cos/sin cache)",
                                 "aten.mul.Tensor", (0,)),
    "FusedMatMul": ContribOp("a matmul (with transposes and a scale)", "aten.matmul"),
    "TransposeMatMul": ContribOp("a matmul with transposes", "aten.matmul"),
    "GemmFastGelu": ContribOp("a matmul, a bias add and GELU", "aten.linear"),
    "FusedGemm": ContribOp("a Gemm and its activation", "aten.linear"),
    "FusedConv": ContribOp("a convolution (with its bias, residual and activation)", "aten.conv{rank}d"),
    "NhwcConv": ContribOp("a convolution in NHWC layout", "aten.conv{rank}d"),
}
"""The contrib ops planned by what they compute (see the module docstring), by op type."""


def is_foreign(node: ir.Node) -> bool:
    """``node``'s op is outside the standard ONNX operator set: another domain, or an op type ONNX does not define
    (ONNX Runtime registers ``SimplifiedLayerNormalization`` in the ONNX domain)."""
    return node.domain not in DEFAULT_DOMAINS or not onnx.defs.has(node.op_type)


def contrib_op(node: ir.Node) -> ContribOp | None:
    """How ``node`` is planned, if it is a contrib op of :data:`CONTRIB_OPS` (ONNX's own LayerNormalization is
    not: the op-type stand-ins cover it)."""
    if not is_foreign(node) or node.domain not in (*DEFAULT_DOMAINS, "com.microsoft"):
        return None
    return CONTRIB_OPS.get(node.op_type)


def qualified(node: ir.Node) -> str:
    """``com.microsoft.Attention``; an op of the standard domain by its type alone."""
    return f"{node.domain}.{node.op_type}" if node.domain not in DEFAULT_DOMAINS else node.op_type

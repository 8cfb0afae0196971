"""Nodes an exporter's graph optimizer fused, recognised by their recorded aten op.

torch's dynamo exporter optimizes its graph by default (``torch.onnx.export(..., dynamo=True)``, ``optimize=True``):
onnxscript's rewrite rules fold a BatchNormalization into the Conv, ConvTranspose or Gemm before it, a Pad into
the Conv after it, Reshape -> MatMul -> Reshape into one MatMul, and ONNX Runtime's optimizer folds a bias Add into
a Gemm. The fused node keeps the metadata of one of the nodes it replaced, often not the one that computes it: a
Conv with BatchNorm folded into its weights records ``aten._native_batch_norm_legit_no_training``. Autocast decided
the convolution's precision by ``conv2d``, and that is what the fused Conv computes (the BatchNorm is now its
weights), so the node's precision is the convolution's: :func:`computed_op` gives the op a node's type computes when
its recorded op cannot have produced that type, and the recorded op is kept as what was fused into it.

The rules are deliberately one-sided: an op type only ever exported from a known family (``Conv`` from the
convolutions, ``LayerNormalization`` from the norms) is checked against that family; a contraction (MatMul, Gemm,
Einsum), which many ops decompose into (attention, ``cdist``, RNN cells...), is corrected only when its recorded op
is one that never contracts (a norm, elementwise arithmetic, a reshape, padding, an activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

REWRITE_RULE = "pkg.onnxscript.rewriter.rule_name"
"""Metadata key onnxscript's rewriter writes on the nodes it created: the rule (or rules, comma-separated)."""

NEVER_CONTRACTS = frozenset({
    "add", "sub", "rsub", "mul", "div", "true_divide", "neg", "view", "reshape", "unsafe_view", "flatten",
    "squeeze", "unsqueeze", "expand", "permute", "transpose", "t", "clone", "contiguous", "alias", "to_copy",
    "pad", "constant_pad_nd", "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "clamp", "clamp_min",
    "clamp_max", "leaky_relu", "elu", "hardswish", "hardsigmoid", "mean", "sum", "dropout"})
"""Aten ops (base names, leading underscores dropped) that no exporter translates into a contraction: a MatMul,
Gemm or Einsum recording one of them (or a norm) was fused from it."""


@dataclass(frozen=True)
class _Computes:
    """What an op type computes: ``stand_in`` (``{rank}``: the convolution's spatial rank), and the name
    fragments of the aten ops exported to it (empty: any op but those in :data:`NEVER_CONTRACTS` and the norms)."""

    stand_in: str
    made_by: tuple[str, ...] = ()


COMPUTES = {
    "Conv": _Computes("aten.conv{rank}d", ("conv",)),
    "ConvTranspose": _Computes("aten.conv_transpose{rank}d.input", ("conv",)),
    "MatMul": _Computes("aten.matmul"),
    "Gemm": _Computes("aten.linear"),
    "Einsum": _Computes("aten.einsum"),
    "LayerNormalization": _Computes("aten.layer_norm", ("norm",)),
    "GroupNormalization": _Computes("aten.group_norm", ("norm",)),
    "RMSNormalization": _Computes("aten.rms_norm", ("norm",)),
    "Gelu": _Computes("aten.gelu", ("gelu",)),
}
"""The op types whose precision autocast decides by the op they compute, and how to tell a fused one."""


def computed_op(node: ir.Node, recorded: str) -> str | None:
    """The aten op ``node`` computes (e.g. ``aten.conv2d`` for a Conv) when its ``recorded`` aten op (as its
    metadata names it, e.g. ``aten._native_batch_norm_legit_no_training.default``) cannot have produced its op
    type: the node was fused, and its precision is that of the op computing it. None when the recorded op can have
    produced the node (the rules are in the module docstring), or the op type is not one :data:`COMPUTES` knows."""
    computes = COMPUTES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if computes is None:
        return None
    base = _base_name(recorded)
    if computes.made_by:
        produced = any(fragment in base for fragment in computes.made_by)
    else:
        produced = base not in NEVER_CONTRACTS and "norm" not in base
    return None if produced else computes.stand_in.format(rank=_spatial_rank(node))


WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
"""Where the op types a BatchNorm is folded into take their weight."""


def weight_owner(node: ir.Node, recorded_module: str | None) -> str | None:
    """The module a fused node computes with (the Conv a BatchNorm was folded into), where the node recorded the
    fused-away module: the owner of its weight, an initializer named after a parameter (``layer1.0.conv1.weight``:
    ``layer1.0.conv1``) of a module beside the recorded one (the same parent: ``layer1.0.bn1``). None when the weight
    says nothing (not an initializer, another name, another container)."""
    index = WEIGHT_INPUT.get(node.op_type)
    weight = node.inputs[index] if index is not None and len(node.inputs) > index else None
    if weight is None or not weight.is_initializer() or not weight.name or recorded_module is None:
        return None
    owner, _, parameter = weight.name.rpartition(".")
    if not owner or parameter != "weight" or owner == recorded_module:
        return None
    parent = recorded_module.rpartition(".")[0]
    return owner if owner.rpartition(".")[0] == parent else None


def rewrite_rules(node: ir.Node) -> str | None:
    """The optimizer rules that made ``node`` as it recorded them (``FuseBatchNormIntoConv``), if any."""
    return node.metadata_props.get(REWRITE_RULE) or None


def _base_name(aten: str) -> str:
    """``aten._native_batch_norm_legit_no_training.default`` -> ``native_batch_norm_legit_no_training``."""
    parts = aten.replace("::", ".").split(".")
    name = parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[0]
    return name.lstrip("_")


def _spatial_rank(node: ir.Node) -> int:
    """A convolution's spatial rank: its weight's rank minus 2 (2 when the weight's shape is unknown)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = weight.shape if weight is not None else None
    return len(shape) - 2 if shape is not None and len(shape) >= 3 else 2

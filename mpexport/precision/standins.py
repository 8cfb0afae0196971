"""The aten op that decides a node whose exporter recorded none (an ONNX from the TorchScript exporter or another
tool), and the kernel autocast decides for the composite aten ops it does not list itself.

* :data:`OP_TYPE_TO_ATEN`: the op a model's code calls and autocast intercepts, from the ONNX op type (``conv2d``,
  not the ``convolution`` it dispatches to, which CPU autocast does not list; ``{rank}`` is the convolution's spatial
  rank, from its weight);
* :data:`DISPATCHED`: recurrent layers. ``aten.lstm``, ``aten.gru`` and ``aten.rnn_tanh``/``rnn_relu`` are in no
  autocast list: they are composites, and autocast decides the kernel they dispatch to. On CUDA that is cuDNN's
  ``aten._cudnn_rnn`` (low precision) for all of them; on the CPU an LSTM runs oneDNN's ``aten.mkldnn_rnn_layer``
  (low precision), a plain RNN its cell's ``aten.linear`` (low precision, and its output carries the hidden state),
  and a GRU has none (its cell's projections run low, but its gates add the hidden state, which stays in the input's
  type: the layer follows its inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

OP_TYPE_TO_ATEN = {
    "Conv": "aten.conv{rank}d", "ConvTranspose": "aten.conv_transpose{rank}d.input", "MatMul": "aten.matmul",
    "Gemm": "aten.linear", "Einsum": "aten.einsum", "LayerNormalization": "aten.layer_norm",
    "GroupNormalization": "aten.group_norm", "Softmax": "aten.softmax.int", "LogSoftmax": "aten.log_softmax.int",
    "Exp": "aten.exp", "Log": "aten.log", "Pow": "aten.pow.Tensor_Scalar", "Reciprocal": "aten.reciprocal",
    "Softplus": "aten.softplus", "ReduceSum": "aten.sum.dim_IntList", "ReduceProd": "aten.prod.dim_int",
    "CumSum": "aten.cumsum", "ReduceLogSumExp": "aten.logsumexp", "Resize": "aten.upsample_bilinear2d",
    "LSTM": "aten.lstm.input", "GRU": "aten.gru.input", "RNN": "aten.rnn_{activation}.input",
}
"""Stand-in aten ops for nodes whose exporter recorded none, by ONNX op type (see the module docstring)."""

RECURRENT_INPUTS = {"LSTM": (0, 5, 6), "GRU": (0, 5), "RNN": (0, 5)}
"""The inputs whose type a recurrent layer follows (``X``, ``initial_h``, ``initial_c``): its weights do not change
the data type (PyTorch keeps them FP32 under autocast, and the state is created in the input's type)."""


@dataclass(frozen=True)
class Kernel:
    """The op autocast decides for a composite it does not list, and why that one."""

    op: str
    why: str


CUDNN_RNN = "aten._cudnn_rnn"
_CUDNN = Kernel(CUDNN_RNN, "CUDA autocast's kernel for {op}: cuDNN runs the whole layer")
DISPATCHED: dict[tuple[str, str], Kernel] = {
    **{(f"aten.{name}.{overload}", "cuda"): _CUDNN for name in ("lstm", "gru", "rnn_tanh", "rnn_relu")
       for overload in ("input", "data")},
    ("aten.lstm.input", "cpu"): Kernel("aten.mkldnn_rnn_layer", "CPU autocast's kernel for {op}: oneDNN runs the "
                                                                "whole layer"),
    ("aten.rnn_tanh.input", "cpu"): Kernel("aten.linear", "CPU autocast's op inside {op}: its cell's projections, "
                                                          "whose output carries the hidden state"),
    ("aten.rnn_relu.input", "cpu"): Kernel("aten.linear", "CPU autocast's op inside {op}: its cell's projections, "
                                                          "whose output carries the hidden state"),
}


def dispatched(op: str | None, device: str) -> Kernel | None:
    """The kernel autocast decides for the composite ``op`` on ``device`` (``why`` filled in), if it is one of
    :data:`DISPATCHED`."""
    kernel = DISPATCHED.get((op.removesuffix(".default"), device)) if op else None
    return Kernel(kernel.op, kernel.why.format(op=op)) if kernel else None


def stand_in(node: ir.Node) -> str | None:
    """The aten op standing in for ``node`` by its op type (:data:`OP_TYPE_TO_ATEN`), if there is one."""
    template = OP_TYPE_TO_ATEN.get(node.op_type)
    if template is None:
        return None
    return template.format(rank=spatial_rank(node), activation=_rnn_activation(node))


def spatial_rank(node: ir.Node) -> int:
    """The spatial rank of a convolution (its weight's rank minus 2; 2 when the weight's shape is unknown)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = weight.shape if weight is not None else None
    return len(shape) - 2 if shape is not None and len(shape) >= 3 else 2


def _rnn_activation(node: ir.Node) -> str:
    """``relu`` for an ONNX RNN whose activation is Relu, else ``tanh`` (its default)."""
    attribute = node.attributes.get("activations")
    names = list(attribute.value) if attribute is not None else []
    return "relu" if names and str(names[0]).lower() == "relu" else "tanh"

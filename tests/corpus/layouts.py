"""Graph layouts the peers' material has but mpexport's own tests lack, written here with ``onnx.helper``: an IR-3
CNN in the ONNX model zoo's layout (every initializer also a graph input), a GRU as tf2onnx/keras2onnx write it
(Transposes around a sequence-major ``GRU``), and a classifier with a rank-0 temperature input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.corpus.entry import HERE, SAMPLES, Built, Entry, Expect, Origin, Planned, normal, rng, write


def cnn_ir3(directory: Path) -> Built:
    """A SqueezeNet-like classifier in the zoo's IR-3 layout: ``data_0 [1, 3, 32, 32]`` (a fixed batch of one, as
    the zoo files have), Conv/BatchNormalization/Relu/MaxPool, a fire-module squeeze/expand pair joined by Concat,
    GlobalAveragePool, Flatten, Gemm and Softmax; every initializer is listed as a graph input too. Opset 13, the
    oldest mpexport takes (the zoo's own files are opset 3 to 9)."""
    generator = rng(60)
    weights = {
        "conv1_w": normal(generator, 16, 3, 3, 3, scale=0.3), "conv1_b": normal(generator, 16, scale=0.1),
        "bn1_scale": generator.uniform(0.5, 1.5, 16).astype(np.float32),
        "bn1_bias": normal(generator, 16, scale=0.1), "bn1_mean": normal(generator, 16, scale=0.1),
        "bn1_var": generator.uniform(0.5, 1.5, 16).astype(np.float32),
        "squeeze_w": normal(generator, 8, 16, 1, 1, scale=0.25), "squeeze_b": normal(generator, 8, scale=0.1),
        "expand1_w": normal(generator, 16, 8, 1, 1, scale=0.35), "expand1_b": normal(generator, 16, scale=0.1),
        "expand3_w": normal(generator, 16, 8, 3, 3, scale=0.12), "expand3_b": normal(generator, 16, scale=0.1),
        "fc_w": normal(generator, 10, 32, scale=0.18), "fc_b": normal(generator, 10, scale=0.1),
    }
    nodes = [
        helper.make_node("Conv", ["data_0", "conv1_w", "conv1_b"], ["conv1"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["conv1", "bn1_scale", "bn1_bias", "bn1_mean", "bn1_var"], ["bn1"],
                         name="bn1"),
        helper.make_node("Relu", ["bn1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["pool1", "squeeze_w", "squeeze_b"], ["squeeze"], name="fire2/squeeze1x1",
                         kernel_shape=[1, 1]),
        helper.make_node("Relu", ["squeeze"], ["squeeze_relu"], name="fire2/relu_squeeze1x1"),
        helper.make_node("Conv", ["squeeze_relu", "expand1_w", "expand1_b"], ["expand1"], name="fire2/expand1x1",
                         kernel_shape=[1, 1]),
        helper.make_node("Relu", ["expand1"], ["expand1_relu"], name="fire2/relu_expand1x1"),
        helper.make_node("Conv", ["squeeze_relu", "expand3_w", "expand3_b"], ["expand3"], name="fire2/expand3x3",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["expand3"], ["expand3_relu"], name="fire2/relu_expand3x3"),
        helper.make_node("Concat", ["expand1_relu", "expand3_relu"], ["fire2"], name="fire2/concat", axis=1),
        helper.make_node("GlobalAveragePool", ["fire2"], ["gap"], name="pool10"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], name="fc", transB=1),
        helper.make_node("Softmax", ["fc"], ["softmaxout_1"], name="prob", axis=1),
    ]
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    inputs = [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 3, 32, 32])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape) for name, value in weights.items()]
    graph = helper.make_graph(nodes, "squeezenet_like", inputs,
                              [helper.make_tensor_value_info("softmaxout_1", TensorProto.FLOAT, [1, 10])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=3)
    return write(directory, model, {"data_0": generator.random((SAMPLES, 3, 32, 32), dtype=np.float32),
                                    "labels": generator.integers(0, 10, SAMPLES)})


def gru(directory: Path) -> Built:
    """A GRU classifier as the TensorFlow converters write one: ``features [N, 10, 6]`` transposed to
    sequence-major, ``GRU`` (hidden 16, ``linear_before_reset=1`` as Keras' CuDNN-compatible GRU), the last step's
    hidden state squeezed, then MatMul + Add. ONNX Runtime's CPU GRU takes only ``layout=0``."""
    generator = rng(61)
    hidden, features = 16, 6
    inits = [numpy_helper.from_array(normal(generator, 1, 3 * hidden, features, scale=0.4), "W"),
             numpy_helper.from_array(normal(generator, 1, 3 * hidden, hidden, scale=0.25), "R"),
             numpy_helper.from_array(normal(generator, 1, 6 * hidden, scale=0.1), "B"),
             numpy_helper.from_array(normal(generator, hidden, 5, scale=0.25), "dense_w"),
             numpy_helper.from_array(normal(generator, 5, scale=0.1), "dense_b"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [
        helper.make_node("Transpose", ["features"], ["sequence"], name="gru/transpose", perm=[1, 0, 2]),
        helper.make_node("GRU", ["sequence", "W", "R", "B"], ["", "last_h"], name="gru/GRU", hidden_size=hidden,
                         linear_before_reset=1),
        helper.make_node("Squeeze", ["last_h", "axis0"], ["state"], name="gru/squeeze"),
        helper.make_node("MatMul", ["state", "dense_w"], ["dense"], name="dense/MatMul"),
        helper.make_node("Add", ["dense", "dense_b"], ["logits"], name="dense/BiasAdd"),
    ]
    graph = helper.make_graph(nodes, "gru_classifier",
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 10, features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return write(directory, model, {"features": normal(generator, SAMPLES, 10, features),
                                    "labels": generator.integers(0, 5, SAMPLES)})


def scalar_temperature(directory: Path) -> Built:
    """A classifier whose logits are divided by a rank-0 ``temperature`` input before Softmax (calibrated
    confidence, as Triton ensembles pass it): ``x [N, 8]`` and ``temperature []``. The set gives every sample the
    deployment's temperature, 1.5 (an array of shape (N,), as a user stacks it with the rest)."""
    generator = rng(62)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="fc", transB=1),
             helper.make_node("Div", ["logits", "temperature"], ["scaled"], name="temperature_scale"),
             helper.make_node("Softmax", ["scaled"], ["probabilities"], name="softmax", axis=-1)]
    graph = helper.make_graph(
        nodes, "temperature_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(normal(generator, 4, 8, scale=0.5), "w"),
         numpy_helper.from_array(normal(generator, 4, scale=0.1), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return write(directory, model, {"x": normal(generator, SAMPLES, 8),
                                    "temperature": np.full(SAMPLES, 1.5, np.float32)})


def origin(changes: str) -> Origin:
    """A graph written for this corpus."""
    return Origin(HERE, "tests/corpus/layouts.py", "-", "Apache-2.0", changes)


ENTRIES = [
    Entry("cnn_ir3", origin("the model zoo's IR-3 layout (SqueezeNet's) at opset 13"),
          "initializers listed as graph inputs (item 4); fixed batch 1 (item 3)", cnn_ir3,
          Expect(planned=(Planned("Conv", "fp16"), Planned("Gemm", "fp16"), Planned("Softmax", "fp32")),
                 min_low_mac_share=1.0)),
    Entry("gru_keras_layout", origin("tf2onnx/keras2onnx's GRU layout"),
          "GRU planned as cuDNN's RNN runs under CUDA autocast (item 5)", gru,
          Expect(planned=(Planned("GRU", "fp16"), Planned("MatMul", "fp16")), min_low_mac_share=0.9)),
    Entry("scalar_temperature", origin("a rank-0 input beside a batched one"),
          "a scalar (rank-0) input beside a batched one, the set holding its value for every sample (item 6)",
          scalar_temperature,
          Expect(planned=(Planned("Gemm", "fp16"), Planned("Softmax", "fp32")), min_low_mac_share=1.0)),
]

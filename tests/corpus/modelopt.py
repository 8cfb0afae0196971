"""Graphs from NVIDIA ModelOpt's AutoCast unit tests (Apache-2.0, commit ``a2fbac7b``), rebuilt with
``onnx.helper``: the fixtures of ``tests/unit/onnx/autocast/`` and the builders of
``tests/_test_utils/onnx/lib_test_models.py`` those tests call. Names, ops, attributes and opsets are theirs; feature
maps are scaled down where noted (their inputs run to 6x32x900x256), and weights are seeded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.corpus.entry import (
    MODELOPT,
    MODELOPT_COMMIT,
    SAMPLES,
    Built,
    Entry,
    Expect,
    Origin,
    Planned,
    normal,
    rng,
    write,
)

APACHE = "Apache-2.0"
AUTOCAST_TESTS = "tests/unit/onnx/autocast"
LIB_MODELS = "tests/_test_utils/onnx/lib_test_models.py"


def model_of(graph, version: int, ir_version: int = 10):
    """A model at ``version`` of the default domain, the IR version the tests set."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
    model.ir_version = ir_version
    return model


def init(name: str, value: np.ndarray):
    """An initializer."""
    return numpy_helper.from_array(value, name)


def simple_gemm(directory: Path) -> Built:
    """``test_autocast.py``'s ``simple_model``: Gemm -> Add -> Relu on ``X [1, 5]`` (a fixed batch of one),
    opset 20, IR 10."""
    generator = rng(10)
    nodes = [helper.make_node("Gemm", ["X", "gemm_weight", "gemm_bias"], ["gemm_out"], name="gemm_node"),
             helper.make_node("Add", ["gemm_out", "add_const"], ["add_out"], name="add_node"),
             helper.make_node("Relu", ["add_out"], ["Y"], name="relu_node")]
    graph = helper.make_graph(nodes, "test_complex_graph", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                                          [1, 5])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3])],
                              [init("gemm_weight", normal(generator, 5, 3)), init("gemm_bias", normal(generator, 3)),
                               init("add_const", normal(generator, 1, 3))])
    return write(directory, model_of(graph, 20), {"X": normal(generator, SAMPLES, 5)})


def multiple_consumers(directory: Path) -> Built:
    """``test_precisionconverter.py``'s ``model_with_multiple_consumers``: ``X`` and one initializer read by
    several nodes, three graph outputs, ``X [1, 5]``."""
    generator = rng(11)
    nodes = [helper.make_node("MatMul", ["X", "gemm1_init"], ["gemm1_output"], name="gemm1"),
             helper.make_node("MatMul", ["X", "gemm2_init"], ["gemm2_output"], name="gemm2"),
             helper.make_node("Add", ["gemm1_output", "add_init"], ["Y1"], name="add1"),
             helper.make_node("Add", ["gemm2_output", "add_init"], ["Y2"], name="add2"),
             helper.make_node("Add", ["gemm1_output", "add_init"], ["Y3"], name="add3")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3]) for name in ("Y1", "Y2", "Y3")]
    graph = helper.make_graph(nodes, "model_multi_consumer",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 5])], outputs,
                              [init("gemm1_init", normal(generator, 5, 3)), init("add_init", normal(generator, 1, 3)),
                               init("gemm2_init", normal(generator, 5, 3))])
    return write(directory, model_of(graph, 20), {"X": normal(generator, SAMPLES, 5)})


def conv_isinf(directory: Path) -> Built:
    """``build_conv_isinf_model(opset_version=13)``: Conv, Cast to DOUBLE, IsInf, Greater, And, Where. The input
    ``(6, 32, 900, 256)`` becomes ``(2, 32, 16, 16)``: still a fixed batch (of two), and the set holds 15 samples,
    not a multiple of it."""
    generator = rng(12)
    nodes = [
        helper.make_node("Conv", ["input_0", "weights_1"], ["conv1_conv/Conv2D:0"], name="conv1_conv/Conv2D",
                         dilations=[1, 1], group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Cast", ["conv1_conv/Conv2D:0"], ["cast1_cast/Cast:0"], name="cast1_cast/Cast",
                         to=TensorProto.DOUBLE),
        helper.make_node("IsInf", ["cast1_cast/Cast:0"], ["isinf1_isinf/IsInf:0"], name="isinf1_isinf/IsInf"),
        helper.make_node("Greater", ["conv1_conv/Conv2D:0", "greater_const1"], ["greater1_greater/Greater:0"],
                         name="greater1_greater/Greater"),
        helper.make_node("And", ["isinf1_isinf/IsInf:0", "greater1_greater/Greater:0"], ["and1_and/And:0"],
                         name="and1_and/And"),
        helper.make_node("Where", ["and1_and/And:0", "conv1_conv/Conv2D:0", "where_const1"], ["output_0"],
                         name="where1_where/Where"),
    ]
    shape = [2, 32, 16, 16]
    graph = helper.make_graph(
        nodes, "conv_isinf", [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, shape)],
        [init("weights_1", generator.uniform(0.5, 1.0, (32, 32, 3, 3)).astype(np.float32)),
         init("greater_const1", np.array([0], np.float32)), init("where_const1", np.array([10000], np.float32))])
    return write(directory, model_of(graph, 13), {"input_0": normal(generator, 15, 32, 16, 16, scale=0.1)})


def conv_resize(directory: Path) -> Built:
    """``build_conv_resize_model()``: a 1x1 Conv then Resize whose roi and scales are one shared empty initializer
    (ModelOpt's PR #757 case) and whose sizes are fixed. ``(1, 288, 32, 32) -> (1, 16, 64, 64)`` becomes
    ``(1, 32, 16, 16) -> (1, 16, 32, 32)``."""
    generator = rng(13)
    nodes = [
        helper.make_node("Conv", ["input_0", "weights_1"], ["conv1_conv/Conv2D:0"], name="conv1_conv/Conv2D",
                         dilations=[1, 1], group=1, kernel_shape=[1, 1], pads=[0, 0, 0, 0], strides=[1, 1]),
        helper.make_node("Resize", ["conv1_conv/Conv2D:0", "resize_roi_scales", "resize_roi_scales", "resize_sizes"],
                         ["output_0"], name="resize1_resize/Resize", coordinate_transformation_mode="asymmetric",
                         cubic_coeff_a=-0.75, mode="nearest", nearest_mode="floor"),
    ]
    graph = helper.make_graph(
        nodes, "conv_resize", [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, [1, 32, 16, 16])],
        [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [1, 16, 32, 32])],
        [init("weights_1", generator.uniform(0.5, 1.0, (16, 32, 1, 1)).astype(np.float32)),
         init("resize_roi_scales", np.zeros((0,), np.float32)),
         init("resize_sizes", np.array([1, 16, 32, 32], np.int64))])
    return write(directory, model_of(graph, 13), {"input_0": normal(generator, SAMPLES, 32, 16, 16)})


def conv_layernorm(directory: Path) -> Built:
    """``build_conv_layernorm_model()`` as written: a ConvNeXt stem, Conv 4x4/4, Transpose to NHWC,
    LayerNormalization over channels (opset 17, IR 8), Transpose back, Conv 1x1; ``(1, 3, 56, 56)``."""
    generator = rng(14)
    channels = 32
    nodes = [
        helper.make_node("Conv", ["input_0", "stem_conv_w", "stem_conv_b"], ["stem_conv_out"], name="stem_conv",
                         kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Transpose", ["stem_conv_out"], ["stem_transpose1_out"], name="stem_transpose1",
                         perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["stem_transpose1_out", "stem_ln_scale", "stem_ln_bias"],
                         ["stem_ln_out"], name="stem_ln", axis=-1, epsilon=1e-6),
        helper.make_node("Transpose", ["stem_ln_out"], ["stem_transpose2_out"], name="stem_transpose2",
                         perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["stem_transpose2_out", "conv2_w", "conv2_b"], ["output_0"], name="conv2",
                         kernel_shape=[1, 1]),
    ]
    inits = [init("stem_conv_w", normal(generator, channels, 3, 4, 4)),
             init("stem_conv_b", normal(generator, channels)),
             init("stem_ln_scale", np.ones(channels, np.float32)),
             init("stem_ln_bias", np.zeros(channels, np.float32)),
             init("conv2_w", normal(generator, channels, channels, 1, 1)),
             init("conv2_b", normal(generator, channels))]
    graph = helper.make_graph(nodes, "conv_layernorm",
                              [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, [1, 3, 56, 56])],
                              [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [1, channels, 14, 14])],
                              inits)
    return write(directory, model_of(graph, 17, ir_version=8),
                 {"input_0": generator.random((SAMPLES, 3, 56, 56), dtype=np.float32)})


def layernorm_decomposed(directory: Path) -> Built:
    """``test_graphsanitizer.py``'s ``create_layernorm_model([2, 3, 4, 5], axis=-1)``: a LayerNorm written out as
    ReduceMean, Sub, Pow 2, ReduceMean, Add epsilon, Sqrt, Div, Mul scale, Add bias (opset 13, axes as attributes,
    unnamed nodes)."""
    generator = rng(15)
    shape = [2, 3, 4, 5]
    nodes = [helper.make_node("ReduceMean", ["X"], ["mean"], axes=[-1]),
             helper.make_node("Sub", ["X", "mean"], ["sub1"]),
             helper.make_node("Pow", ["sub1", "pow_const"], ["pow_out"]),
             helper.make_node("ReduceMean", ["pow_out"], ["var_mean"], axes=[-1]),
             helper.make_node("Add", ["var_mean", "epsilon"], ["add_eps"]),
             helper.make_node("Sqrt", ["add_eps"], ["sqrt_out"]),
             helper.make_node("Div", ["sub1", "sqrt_out"], ["div_out"]),
             helper.make_node("Mul", ["div_out", "scale"], ["scale_out"]),
             helper.make_node("Add", ["scale_out", "bias"], ["Y"])]
    inits = [helper.make_tensor("pow_const", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("epsilon", TensorProto.FLOAT, [], [1e-5]),
             init("scale", generator.random(shape[-1:], dtype=np.float32)),
             init("bias", generator.random(shape[-1:], dtype=np.float32))]
    graph = helper.make_graph(nodes, "layernorm_test", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, producer_name="layernorm_test", opset_imports=[helper.make_opsetid("", 13)])
    return write(directory, model, {"X": normal(generator, SAMPLES, 3, 4, 5, scale=3.0)})


def conv_batchnorm_sig_mul(directory: Path) -> Built:
    """``build_conv_batchnorm_sig_mul_model()``: Relu, Conv 3x3, BatchNormalization (not folded), Sigmoid, Mul (a
    SiLU written out), residual Add, Relu. ``(6, 48, 64, 176)`` becomes ``(6, 16, 16, 16)``: the fixed batch of
    six stays, and the set's 16 samples are not a multiple of it."""
    generator = rng(16)
    channels = 16
    nodes = [
        helper.make_node("Relu", ["input_0"], ["relu0_relu/Relu:0"], name="relu0_relu/Relu"),
        helper.make_node("Conv", ["relu0_relu/Relu:0", "weights_1"], ["conv1_conv/Conv2D:0"], name="conv1_conv/Conv2D",
                         dilations=[1, 1], group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["conv1_conv/Conv2D:0", "bn1_scale", "bn1_bias", "bn1_mean",
                                                "bn1_var"], ["bn1_batchnorm/BatchNormalization:0"],
                         name="bn1_batchnorm/BatchNormalization"),
        helper.make_node("Sigmoid", ["bn1_batchnorm/BatchNormalization:0"], ["sig1_sigmoid/Sigmoid:0"],
                         name="sig1_sigmoid/Sigmoid"),
        helper.make_node("Mul", ["sig1_sigmoid/Sigmoid:0", "bn1_batchnorm/BatchNormalization:0"], ["mul1_mul/Mul:0"],
                         name="mul1_mul/Mul"),
        helper.make_node("Add", ["relu0_relu/Relu:0", "mul1_mul/Mul:0"], ["add1_add/Add:0"], name="add1_add/Add"),
        helper.make_node("Relu", ["add1_add/Add:0"], ["output_0"], name="relu2_relu/Relu"),
    ]
    shape = [6, channels, 16, 16]
    inits = [init("weights_1", generator.uniform(0.5, 1.0, (channels, channels, 3, 3)).astype(np.float32))]
    inits += [init(f"bn1_{part}", generator.uniform(0.5, 1.0, channels).astype(np.float32))
              for part in ("scale", "bias", "mean", "var")]
    graph = helper.make_graph(nodes, "conv_batchnorm_sig_mul",
                              [helper.make_tensor_value_info("input_0", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, shape)], inits)
    return write(directory, model_of(graph, 13), {"input_0": normal(generator, SAMPLES, channels, 16, 16)})


def resize_tensor_scales(directory: Path) -> Built:
    """``test_precisionconverter.py``'s ``create_model_with_resize_op_tensor_scales``: Resize whose scales are
    computed from a second graph input (``scales_input [4]``, no batch dimension) plus an offset; ``X [1, 3, 32,
    32]``. The validation set gives every sample the scales the test feeds, ``[1, 1, 1, 1]`` (x2 after the
    offset)."""
    generator = rng(17)
    nodes = [helper.make_node("Add", ["X", "add_const"], ["add_out"], name="add"),
             helper.make_node("Add", ["scales_input", "scales_offset"], ["scales_tensor"], name="scales_add"),
             helper.make_node("Resize", ["add_out", "roi", "scales_tensor"], ["resize_out"], name="resize",
                              mode="nearest"),
             helper.make_node("Relu", ["resize_out"], ["Y"], name="relu")]
    inits = [init("add_const", np.ones((1, 3, 32, 32), np.float32)),
             init("scales_offset", np.array([0.0, 0.0, 1.0, 1.0], np.float32)), init("roi", np.zeros((0,), np.float32))]
    graph = helper.make_graph(nodes, "model_with_resize_tensor_scales",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 32, 32]),
                               helper.make_tensor_value_info("scales_input", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3, 64, 64])], inits)
    return write(directory, model_of(graph, 20), {"X": normal(generator, SAMPLES, 3, 32, 32),
                                                  "scales_input": np.ones((SAMPLES, 4), np.float32)})


def origin(path: str, changes: str = "") -> Origin:
    """A ModelOpt origin."""
    return Origin(MODELOPT, path, MODELOPT_COMMIT, APACHE, changes)


ENTRIES = [
    Entry("mo_simple_gemm", origin(f"{AUTOCAST_TESTS}/test_autocast.py"), "Gemm/Add/Relu at opset 20, fixed batch 1",
          simple_gemm, Expect(planned=(Planned("Gemm", "fp16"),), min_low_mac_share=1.0)),
    Entry("mo_multi_consumer", origin(f"{AUTOCAST_TESTS}/test_precisionconverter.py"),
          "an input and an initializer with several consumers, three outputs, fixed batch 1", multiple_consumers,
          Expect(planned=(Planned("MatMul", "fp16"),), min_low_mac_share=1.0)),
    Entry("mo_conv_isinf", origin(LIB_MODELS, "(6, 32, 900, 256) -> (2, 32, 16, 16); 15 samples"),
          "Conv then the model's own Cast to DOUBLE and IsInf; fixed batch 2 with a set not a multiple of it",
          conv_isinf, Expect(planned=(Planned("Conv", "fp16"),), min_low_mac_share=1.0)),
    Entry("mo_conv_resize", origin(LIB_MODELS, "(1, 288, 32, 32) -> (1, 32, 16, 16)"),
          "Resize with one empty initializer as both roi and scales; fixed batch 1", conv_resize,
          Expect(planned=(Planned("Conv", "fp16"),), min_low_mac_share=1.0)),
    Entry("mo_conv_layernorm", origin(LIB_MODELS), "LayerNormalization (opset 17) between Convs, fixed batch 1",
          conv_layernorm, Expect(planned=(Planned("Conv", "fp16"), Planned("LayerNormalization", "fp32")),
                                 min_low_mac_share=1.0)),
    Entry("mo_layernorm_decomposed", origin(f"{AUTOCAST_TESTS}/test_graphsanitizer.py"),
          "a LayerNorm written out (ReduceMean/Pow/Sqrt/Div), unnamed nodes, fixed batch 2", layernorm_decomposed,
          Expect(planned=(Planned("ReduceMean", "fp32"), Planned("Pow", "fp32"), Planned("Sqrt", "fp32")))),
    Entry("mo_conv_bn_sig_mul", origin(LIB_MODELS, "(6, 48, 64, 176) -> (6, 16, 16, 16)"),
          "BatchNormalization not folded, SiLU as Sigmoid*x, residual; fixed batch 6, 16 samples",
          conv_batchnorm_sig_mul, Expect(planned=(Planned("Conv", "fp16"),), min_low_mac_share=1.0)),
    Entry("mo_resize_tensor_scales", origin(f"{AUTOCAST_TESTS}/test_precisionconverter.py"),
          "a second input without a batch dimension (Resize scales computed from it); fixed batch 1",
          resize_tensor_scales, Expect()),
]

"""Graphs from onnxconverter-common's own tests (MIT licence, commit ``28b00d4c``), rebuilt with ``onnx.helper``.

Its tests build small graphs with its ``onnx_fx`` tracer at opset 9 and keep FP32 models in ``tests/data``; mpexport
takes opset 13 or newer, so each graph is written at opset 13 with the same nodes (``Unsqueeze`` and ``Squeeze``
take their axes as an input there), and sized down where noted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, TypeProto, ValueInfoProto, helper, numpy_helper

from tests.corpus.entry import OCC, OCC_COMMIT, SAMPLES, Built, Entry, Expect, Origin, Planned, normal, rng, write

MIT = "MIT"


def opset(version: int = 13) -> list:
    """The default-domain opset import."""
    return [helper.make_opsetid("", version)]


def const(name: str, value: np.ndarray) -> object:
    """A ``Constant`` node holding ``value``."""
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name))


def transpose_matmul(directory: Path) -> Built:
    """``test_float16.py::test_float16``'s ``transpose_n_matmul``: Transpose, a constant 2x6 weight transposed,
    MatMul, and a one-input ``Min``; its input is ``[1, 1, 6, 1]`` (a fixed batch of one)."""
    weight = np.arange(1, 13, dtype=np.float32).reshape(2, 6)
    nodes = [
        const("b", weight),
        helper.make_node("Transpose", ["x"], ["a"], name="transpose_x", perm=[0, 1, 3, 2]),
        helper.make_node("Transpose", ["b"], ["c"], name="transpose_b", perm=[1, 0]),
        helper.make_node("MatMul", ["a", "c"], ["d"], name="matmul"),
        helper.make_node("Min", ["d"], ["z"], name="min"),
    ]
    graph = helper.make_graph(nodes, "transpose_n_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 1])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 1, 2])])
    model = helper.make_model(graph, opset_imports=opset())
    values = rng(1).uniform(1, 8, (SAMPLES, 1, 6, 1)).astype(np.float32)  # the test feeds 2..7
    return write(directory, model, {"x": values})


def auto_mixed(directory: Path) -> Built:
    """``test_auto_mixed_precision.py::test_auto_mixed_precision``'s graph: the MatMul above, then x100 and x10
    (values past FP16's range: the test is about finding the nodes that must stay FP32), two Reshapes to ``[2]``
    (the output loses the batch dimension) and a division by 999."""
    weight = np.arange(1, 13, dtype=np.float32).reshape(2, 6)
    nodes = [
        const("b", weight),
        helper.make_node("Transpose", ["x"], ["a"], name="transpose_x", perm=[0, 1, 3, 2]),
        helper.make_node("Transpose", ["b"], ["c"], name="transpose_b", perm=[1, 0]),
        helper.make_node("MatMul", ["a", "c"], ["m"], name="matmul"),
        const("hundred", np.array(100, np.float32)),
        helper.make_node("Mul", ["m", "hundred"], ["m_large"], name="mul_large"),
        const("ten", np.array(10, np.float32)),
        helper.make_node("Mul", ["m_large", "ten"], ["m_xlarge"], name="mul_xlarge"),
        const("shape", np.array([2], np.int64)),
        helper.make_node("Reshape", ["m_xlarge", "shape"], ["mr"], name="reshape_1"),
        helper.make_node("Reshape", ["mr", "shape"], ["mr2"], name="reshape_2"),
        const("divisor", np.array(999, np.float32)),
        helper.make_node("Div", ["mr2", "divisor"], ["y"], name="div_normal"),
    ]
    graph = helper.make_graph(nodes, "auto_mixed_precision",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=opset())
    values = rng(2).uniform(1, 8, (SAMPLES, 1, 6, 1)).astype(np.float32)
    return write(directory, model, {"x": values})


def loop(directory: Path) -> Built:
    """``test_float16.py::test_float16_with_loop``: a ``Loop`` over the rows of ``data`` whose body reads ``data``
    from the outer scope (Gather) and accumulates a running total; outputs the total and every partial sum."""
    body_nodes = [
        helper.make_node("Squeeze", ["iter_n", "zero_axes"], ["iter_scalar"], name="body_squeeze"),
        helper.make_node("Gather", ["data", "iter_scalar"], ["col"], name="body_gather", axis=0),
        helper.make_node("Add", ["total", "col"], ["total_o"], name="body_add"),
        helper.make_node("Identity", ["cond"], ["c_o"], name="body_cond"),
        helper.make_node("Identity", ["total_o"], ["scan_o"], name="body_scan"),
    ]
    body = helper.make_graph(
        body_nodes, "range_body",
        [helper.make_tensor_value_info("iter_n", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("c_o", TensorProto.BOOL, []),
         helper.make_tensor_value_info("total_o", TensorProto.FLOAT, [None]),
         helper.make_tensor_value_info("scan_o", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array([0], np.int64), "zero_axes")])
    nodes = [
        helper.make_node("Shape", ["data"], ["shape"], name="shape"),
        const("index_0", np.array(0, np.int64)),
        const("index_1", np.array([1], np.int64)),
        helper.make_node("Gather", ["shape", "index_0"], ["dim_0"], name="gather_dim_0", axis=0),
        helper.make_node("Gather", ["shape", "index_1"], ["dim_1"], name="gather_dim_1", axis=0),
        helper.make_node("ConstantOfShape", ["dim_1"], ["zeros"], name="zeros",
                         value=numpy_helper.from_array(np.array([0.0], np.float32))),
        const("is_true", np.array(True)),
        helper.make_node("Loop", ["dim_0", "is_true", "zeros"], ["y1", "y2"], name="loop", body=body),
    ]
    graph = helper.make_graph(nodes, "loop_test", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                                 [None, None])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [None]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None, None])])
    model = helper.make_model(graph, opset_imports=opset())
    return write(directory, model, {"data": normal(rng(3), SAMPLES, 8)})


def image_classifier(directory: Path) -> Built:
    """``tests/data/image_classifier32.onnx`` (a PyTorch export at opset 11, 53 KB): Resize to 30x30 (sizes from
    Shape/Slice/Concat, empty roi and scales), Conv 5x5, Relu, MaxPool, Resize to 10x10, Reshape, Gemm to 10
    classes; dynamic batch. Rebuilt at opset 13 with seeded weights of the original's scale."""
    generator = rng(4)
    empty = np.zeros((0,), np.float32)
    nodes = [
        helper.make_node("Shape", ["modelInput"], ["s1"], name="shape_1"),
        const("zero", np.array([0], np.int64)),
        const("two", np.array([2], np.int64)),
        helper.make_node("Slice", ["s1", "zero", "two", "zero"], ["nc1"], name="slice_1"),
        helper.make_node("Concat", ["nc1", "size_30"], ["sizes_1"], name="concat_1", axis=0),
        const("roi_1", empty),
        const("scales_1", empty),
        helper.make_node("Resize", ["modelInput", "roi_1", "scales_1", "sizes_1"], ["r1"], name="resize_1",
                         coordinate_transformation_mode="pytorch_half_pixel", cubic_coeff_a=-0.75, mode="linear",
                         nearest_mode="floor"),
        helper.make_node("Conv", ["r1", "conv_w", "conv_b"], ["c1"], name="conv", kernel_shape=[5, 5],
                         pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu"),
        helper.make_node("MaxPool", ["a1"], ["p1"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["p1"], ["s2"], name="shape_2"),
        helper.make_node("Slice", ["s2", "zero", "two", "zero"], ["nc2"], name="slice_2"),
        helper.make_node("Concat", ["nc2", "size_10"], ["sizes_2"], name="concat_2", axis=0),
        const("roi_2", empty),
        const("scales_2", empty),
        helper.make_node("Resize", ["p1", "roi_2", "scales_2", "sizes_2"], ["r2"], name="resize_2",
                         coordinate_transformation_mode="pytorch_half_pixel", cubic_coeff_a=-0.75, mode="linear",
                         nearest_mode="floor"),
        const("flat", np.array([-1, 1200], np.int64)),
        helper.make_node("Reshape", ["r2", "flat"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["modelOutput"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(normal(generator, 10, 1200, scale=0.128), "fc_w"),
             numpy_helper.from_array(normal(generator, 10, scale=0.05), "fc_b"),
             numpy_helper.from_array(normal(generator, 12, 3, 5, 5, scale=0.19), "conv_w"),
             numpy_helper.from_array(normal(generator, 12, scale=0.05), "conv_b"),
             numpy_helper.from_array(np.array([30, 30], np.int64), "size_30"),
             numpy_helper.from_array(np.array([10, 10], np.int64), "size_10")]
    graph = helper.make_graph(
        nodes, "torch-jit-export",
        [helper.make_tensor_value_info("modelInput", TensorProto.FLOAT, ["batch_size", 3, 32, 32])],
        [helper.make_tensor_value_info("modelOutput", TensorProto.FLOAT, ["batch_size", 10])], inits)
    model = helper.make_model(graph, opset_imports=opset(), producer_name="pytorch")
    pixels = generator.random((SAMPLES, 3, 32, 32), dtype=np.float32)  # the test feeds np.random.rand
    return write(directory, model, {"modelInput": pixels, "labels": generator.integers(0, 10, SAMPLES)})


def subgraph_if(directory: Path) -> Built:
    """``tests/data/test_subgraph.onnx`` (655 bytes, opset 17), node for node: scalar inputs ``x`` and ``y``,
    ``Add``, ``Greater`` than 0, and an ``If`` whose then-branch reads ``a`` from the outer scope (ReduceMax, Max
    with 0, Unsqueeze) and whose else-branch is ``Identity(a)``. The graph output ``result_3`` has no type, as in the
    file; the branches' outputs have no declared shape either."""
    then_nodes = [
        helper.make_node("ReduceMax", ["a"], ["b"], name="then_reducemax", keepdims=0),
        helper.make_node("Constant", [], ["int64_0_0"], name="then_zero",
                         value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("CastLike", ["int64_0_0", "b"], ["int64_0_0_cast"], name="then_castlike"),
        helper.make_node("Max", ["b", "int64_0_0_cast"], ["c"], name="then_max"),
        helper.make_node("Constant", [], ["int64_0_1"], name="then_axis",
                         value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("Unsqueeze", ["c", "int64_0_1"], ["result"], name="then_unsqueeze"),
    ]
    then_graph = helper.make_graph(then_nodes, "thenGraph_4", [], [untyped("result", empty_type=True)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["a"], ["result_2"], name="else_identity")],
                                   "elseGraph_4", [], [untyped("result_2", empty_type=True)])
    nodes = [
        helper.make_node("Add", ["x", "y"], ["a"], name="add"),
        helper.make_node("Constant", [], ["int64_0"], name="zero",
                         value=numpy_helper.from_array(np.array(0, np.int64))),
        helper.make_node("CastLike", ["int64_0", "a"], ["int64_0_cast"], name="castlike"),
        helper.make_node("Greater", ["a", "int64_0_cast"], ["cond"], name="greater"),
        helper.make_node("If", ["cond"], ["result_3"], name="if", then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(nodes, "model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, []),
                                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                              [untyped("result_3")])
    model = helper.make_model(graph, opset_imports=opset(17), ir_version=8)
    generator = rng(5)
    # the ONNX checker refuses the untyped output ("Field 'type' of 'value_info' is required"), as it refuses the
    # original file; ONNX Runtime runs both
    return write(directory, model, {"x": normal(generator, SAMPLES, scale=2.0), "y": normal(generator, SAMPLES)},
                 check=False)


def untyped(name: str, *, empty_type: bool = False) -> ValueInfoProto:
    """A value with no type (``empty_type``: an empty ``type {}``, as the original's branch outputs have)."""
    value = ValueInfoProto(name=name)
    if empty_type:
        value.type.CopyFrom(TypeProto())
    return value


def keras_crn(directory: Path) -> Built:
    """The layer pattern of ``tests/data/test_model_0_no_opt.onnx`` (a keras2onnx speech-enhancement CRN at opset
    11, 1.9 MB), scaled down: NHWC tensors transposed around every Conv/BatchNormalization, Pad before each Conv
    (2x5 kernels, stride 1x2), BatchNormalization, Tanh, a ConvTranspose decoder with a skip Concat and a cropping
    Slice, and a 1-D convolution block with PRelu. Input ``[N, 16, 32]`` (frames x frequency bins)."""
    generator = rng(6)
    inits: list = []

    def weight(name: str, *shape: int, scale: float) -> str:
        inits.append(numpy_helper.from_array(normal(generator, *shape, scale=scale), name))
        return name

    def batch_norm(name: str, channels: int) -> list[str]:
        names = []
        for part, value in (("scale", 1 + 0.1 * generator.standard_normal(channels)),
                            ("bias", 0.1 * generator.standard_normal(channels)),
                            ("mean", 0.1 * generator.standard_normal(channels)),
                            ("var", generator.uniform(0.5, 1.5, channels))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_{part}"))
            names.append(f"{name}_{part}")
        return names

    def ints(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    nodes = [helper.make_node("Unsqueeze", ["input_1", ints("axes_last", [-1])], ["x0"], name="expand")]

    def conv_block(name: str, source: str, cin: int, cout: int, transpose: bool = False) -> str:
        """NHWC in and out, as keras2onnx writes it: (Pad), Transpose, Conv, Transpose, Transpose, BN, Transpose,
        Tanh."""
        kernel = weight(f"{name}_kernel", *((cin, cout) if transpose else (cout, cin)), 2, 5,
                        scale=1 / np.sqrt(cin * 10))
        padded = source
        if not transpose:
            padded = f"{name}_pad"
            nodes.append(helper.make_node("Pad", [source, ints(f"{name}_pads", [0, 1, 2, 0, 0, 0, 2, 0])],
                                          [padded], name=f"{name}/input_pad"))
        nodes.extend([
            helper.make_node("Transpose", [padded], [f"{name}_nchw"], name=f"{name}/adjusted_input", perm=[0, 3, 1, 2]),
            helper.make_node("ConvTranspose" if transpose else "Conv", [f"{name}_nchw", kernel], [f"{name}_conv"],
                             name=f"{name}/conv", kernel_shape=[2, 5], strides=[1, 2]),
        ])
        conv_out = f"{name}_conv"
        if transpose:  # keras' "same" deconvolution: crop what the transposed convolution adds
            nodes.append(helper.make_node("Slice", [conv_out, ints(f"{name}_crop_start", [0, 1]),
                                                    ints(f"{name}_crop_end", [-1, -2]), ints(f"{name}_crop_axes",
                                                                                              [2, 3])],
                                          [f"{name}_crop"], name=f"{name}/cropping"))
            conv_out = f"{name}_crop"
        nodes.extend([
            helper.make_node("BatchNormalization", [conv_out, *batch_norm(name, cout)], [f"{name}_bn"],
                             name=f"{name}/batch_norm", epsilon=1e-6),
            helper.make_node("Tanh", [f"{name}_bn"], [f"{name}_tanh"], name=f"{name}/activation"),
            helper.make_node("Transpose", [f"{name}_tanh"], [f"{name}_out"], name=f"{name}/to_nhwc",
                             perm=[0, 2, 3, 1]),
        ])
        return f"{name}_out"

    e1 = conv_block("conv2d_1", "x0", 1, 8)        # [N, 16, 16, 8]
    e2 = conv_block("conv2d_2", e1, 8, 16)         # [N, 16, 8, 16]
    # the TCM block: frames x (freq*channels) as a 1-D sequence, pointwise conv, PRelu, back
    nodes.extend([
        helper.make_node("Reshape", [e2, ints("seq_shape", [0, 16, 128])], ["seq"], name="tcm/reshape_in"),
        helper.make_node("Transpose", ["seq"], ["seq_ncw"], name="tcm/adjusted_input", perm=[0, 2, 1]),
        helper.make_node("Conv", ["seq_ncw", weight("tcm_kernel", 128, 128, 1, scale=1 / np.sqrt(128))],
                         ["tcm_conv"], name="tcm/conv1d", kernel_shape=[1]),
        helper.make_node("PRelu", ["tcm_conv", weight("tcm_slope", 128, 1, scale=0.1)], ["tcm_act"],
                         name="tcm/prelu"),
        helper.make_node("Add", ["tcm_act", "seq_ncw"], ["tcm_res"], name="tcm/add"),
        helper.make_node("Transpose", ["tcm_res"], ["tcm_nwc"], name="tcm/to_nwc", perm=[0, 2, 1]),
        helper.make_node("Reshape", ["tcm_nwc", ints("map_shape", [0, 16, 8, 16])], ["tcm_map"],
                         name="tcm/reshape_out"),
        helper.make_node("Concat", ["tcm_map", e2], ["skip_2"], name="concat_2", axis=-1),
    ])
    d2 = conv_block("deconv2d_2", "skip_2", 32, 8, transpose=True)   # [N, 16, 16, 8] after cropping
    nodes.append(helper.make_node("Concat", [d2, e1], ["skip_1"], name="concat_1", axis=-1))
    d1 = conv_block("deconv2d_1", "skip_1", 16, 1, transpose=True)
    nodes.append(helper.make_node("Squeeze", [d1, "axes_last"], ["output_1"], name="squeeze_out"))
    graph = helper.make_graph(nodes, "crn", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT,
                                                                           ["N", 16, 32])],
                              [helper.make_tensor_value_info("output_1", TensorProto.FLOAT, ["N", 16, 32])], inits)
    model = helper.make_model(graph, opset_imports=opset(), producer_name="OnnxMLTools")
    return write(directory, model, {"input_1": normal(generator, SAMPLES, 16, 32)})


def origin(path: str, changes: str = "") -> Origin:
    """An onnxconverter-common origin."""
    return Origin(OCC, path, OCC_COMMIT, MIT, changes)


ENTRIES = [
    Entry("occ_transpose_matmul", origin("tests/test_float16.py", "opset 9 -> 13"),
          "fixed batch of one (item 3), a Constant weight, a one-input Min", transpose_matmul,
          Expect(planned=(Planned("MatMul", "fp16"),), min_low_mac_share=1.0)),
    Entry("occ_auto_mixed", origin("tests/test_auto_mixed_precision.py", "opset 9 -> 13"),
          "values past FP16's range (the range rule keeps the x10 Mul FP32); an output without a batch dimension",
          auto_mixed, Expect(planned=(Planned("MatMul", "fp16"), Planned("Mul", "fp32", every=False)))),
    Entry("occ_loop", origin("tests/test_float16.py", "opset 9 -> 13"),
          "Loop whose body reads an outer-scope value: kept FP32 with its body", loop,
          Expect(planned=(Planned("Loop", "fp32"),))),
    Entry("occ_image_classifier", origin("tests/data/image_classifier32.onnx",
                                         "opset 11 -> 13; seeded weights of the original's scale"),
          "Resize with sizes from Shape/Slice/Concat and empty roi/scales; Conv, MaxPool, Gemm", image_classifier,
          Expect(planned=(Planned("Conv", "fp16"), Planned("Gemm", "fp16")), min_low_mac_share=1.0)),
    Entry("occ_subgraph_if", origin("tests/data/test_subgraph.onnx"),
          "scalar (rank-0) inputs and a graph output with no type (item 6); If with an outer-scope read",
          subgraph_if, Expect(planned=(Planned("If", "fp32"),))),
    Entry("occ_keras_crn", origin("tests/data/test_model_0_no_opt.onnx",
                                  "its layer pattern rebuilt at 1/10 the size, opset 11 -> 13, seeded weights"),
          "keras2onnx layout: NHWC transposes, Pad, BatchNormalization, ConvTranspose + cropping Slice, PRelu",
          keras_crn, Expect(planned=(Planned("Conv", "fp16"), Planned("ConvTranspose", "fp16")),
                            min_low_mac_share=1.0)),
]

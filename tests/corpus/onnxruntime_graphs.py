"""Graphs from ONNX Runtime's transformer-optimizer tests (MIT licence, commit ``d930f6ec``):
``onnxruntime/test/python/transformers/bert_model_generator.py`` rebuilt with ``onnx.helper``, and the same graph
after ``onnxruntime.transformers.optimizer`` fused it (what ``test_attention_fusion.py`` checks), which gives the
``com.microsoft`` ``Attention`` contrib op.

The generator's weights are all ones unless asked for random ones (``float_tensor(..., random=True)``: uniform on
[0, 1)); the corpus uses its random form, seeded, so that the heads differ.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.corpus.entry import ORT, ORT_COMMIT, SAMPLES, Built, Entry, Expect, Origin, Planned, normal, rng, write

GENERATOR = "onnxruntime/test/python/transformers/bert_model_generator.py"
EPSILON = 0.000009999999747378752


def float_tensor(generator: np.random.Generator, name: str, shape: list[int]) -> onnx.TensorProto:
    """The generator's ``float_tensor(name, shape, random=True)``: uniform on [0, 1)."""
    return helper.make_tensor(name, TensorProto.FLOAT, shape, generator.uniform(0.0, 1.0, shape).ravel().tolist())


def inputs_of(hidden: int, seq: int = 3) -> list[onnx.ValueInfoProto]:
    """``input_1``, ``input_2`` (summed, then normalised) and the int64 ``input_mask``, batch fixed at one."""
    return [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [1, seq, hidden]),
            helper.make_tensor_value_info("input_2", TensorProto.FLOAT, [1, seq, hidden]),
            helper.make_tensor_value_info("input_mask", TensorProto.INT64, [1, seq])]


def attention_data(hidden: int, seed: int, seq: int = 3) -> dict[str, np.ndarray]:
    """Hidden states of unit scale, and masks of 0/1 where the last token is padding in every other sample."""
    generator = rng(seed)
    mask = np.ones((SAMPLES, seq), np.int64)
    mask[::2, -1] = 0
    return {"input_1": normal(generator, SAMPLES, seq, hidden), "input_2": normal(generator, SAMPLES, seq, hidden),
            "input_mask": mask}


def bert_attention_model(hidden: int = 16, num_heads: int = 2) -> onnx.ModelProto:
    """``create_bert_attention()`` with its defaults (hidden 16, 2 heads, batch 1, sequence 3): LayerNormalization
    (its attribute spelled ``epsion``, as the generator writes it: ONNX Runtime ignores it), the Q/K/V MatMul + Add
    + Reshape + Transpose, the mask as ``(1 - mask) * -10000``, MatMul/Div/Add/Softmax, the context MatMul and
    projection, a skip Add and a second LayerNormalization. Opset 16: LayerNormalization is ONNX Runtime's contrib
    registration there (the ONNX checker knows it from 17 on)."""
    generator = rng(20)
    head = hidden // num_heads
    nodes = [
        helper.make_node("Add", ["input_1", "input_2"], ["layernorm_input"], "add_layernorm"),
        helper.make_node("LayerNormalization", ["layernorm_input", "layer_norm_weight", "layer_norm_bias"],
                         ["layernorm_out"], "layernorm", axis=-1, epsion=EPSILON),
    ]
    for part, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1])):
        nodes += [helper.make_node("MatMul", ["layernorm_out", f"matmul_{part}_weight"], [f"matmul_{part}_out"],
                                   f"matmul_{part}"),
                  helper.make_node("Add", [f"matmul_{part}_out", f"add_{part}_weight"], [f"add_{part}_out"],
                                   f"add_{part}"),
                  helper.make_node("Reshape", [f"add_{part}_out", "reshape_weight_qk"], [f"reshape_{part}_out"],
                                   f"reshape_{part}"),
                  helper.make_node("Transpose", [f"reshape_{part}_out"], [f"transpose_{part}_out"],
                                   f"transpose_{part}", perm=perm)]
    nodes += [
        helper.make_node("Unsqueeze", ["input_mask", "axes_1"], ["unsqueeze0_out"], "unsqueeze0"),
        helper.make_node("Unsqueeze", ["unsqueeze0_out", "axes_2"], ["unsqueeze1_out"], "unsqueeze1"),
        helper.make_node("Cast", ["unsqueeze1_out"], ["cast_out"], "cast", to=1),
        helper.make_node("Sub", ["sub_weight", "cast_out"], ["sub_out"], "sub"),
        helper.make_node("Mul", ["sub_out", "mul_weight"], ["mul_mask_out"], "mul_mask"),
        helper.make_node("MatMul", ["transpose_q_out", "transpose_k_out"], ["matmul_qk_out"], "matmul_qk"),
        helper.make_node("Div", ["matmul_qk_out", "div_weight"], ["div_qk_out"], "div_qk"),
        helper.make_node("Add", ["div_qk_out", "mul_mask_out"], ["add_qk_out"], "add_qk"),
        helper.make_node("Softmax", ["add_qk_out"], ["softmax_qk_out"], "softmax_qk", axis=3),
        helper.make_node("MatMul", ["layernorm_out", "matmul_v_weight"], ["matmul_v_out"], "matmul_v"),
        helper.make_node("Add", ["matmul_v_out", "add_v_weight"], ["add_v_out"], "add_v"),
        helper.make_node("Reshape", ["add_v_out", "reshape_weight_v"], ["reshape_v_out"], "reshape_v"),
        helper.make_node("Transpose", ["reshape_v_out"], ["transpose_v_out"], "transpose_v", perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["softmax_qk_out", "transpose_v_out"], ["matmul_qkv_1_out"], "matmul_qkv_1"),
        helper.make_node("Transpose", ["matmul_qkv_1_out"], ["transpose_qkv_out"], "transpose_qkv",
                         perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["transpose_qkv_out", "reshape_weight_qkv"], ["reshape_qkv_out"], "reshape_qkv"),
        helper.make_node("MatMul", ["reshape_qkv_out", "matmul_qkv_weight"], ["matmul_qkv_2_out"], "matmul_qkv_2"),
        helper.make_node("Add", ["matmul_qkv_2_out", "add_qkv_weight"], ["add_qkv_out"], "add_qkv"),
        helper.make_node("Add", ["add_qkv_out", "layernorm_out"], ["skip_output"], "add_skip"),
        helper.make_node("LayerNormalization", ["skip_output", "layer_norm_weight", "layer_norm_bias"], ["output"],
                         "layernorm2", axis=-1, epsion=EPSILON),
    ]
    initializers = [
        float_tensor(generator, "layer_norm_weight", [hidden]), float_tensor(generator, "layer_norm_bias", [hidden]),
        float_tensor(generator, "matmul_q_weight", [hidden, hidden]),
        float_tensor(generator, "matmul_k_weight", [hidden, hidden]),
        float_tensor(generator, "matmul_v_weight", [hidden, hidden]),
        float_tensor(generator, "matmul_qkv_weight", [hidden, hidden]),
        float_tensor(generator, "add_q_weight", [hidden]), float_tensor(generator, "add_k_weight", [hidden]),
        float_tensor(generator, "add_v_weight", [hidden]), float_tensor(generator, "add_qkv_weight", [hidden]),
        helper.make_tensor("div_weight", TensorProto.FLOAT, [1], [math.sqrt(head)]),
        helper.make_tensor("sub_weight", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("mul_weight", TensorProto.FLOAT, [1], [-10000]),
        helper.make_tensor("reshape_weight_qk", TensorProto.INT64, [4], [0, 0, num_heads, head]),
        helper.make_tensor("reshape_weight_v", TensorProto.INT64, [4], [0, 0, num_heads, head]),
        helper.make_tensor("reshape_weight_qkv", TensorProto.INT64, [3], [0, 0, hidden]),
        helper.make_tensor("axes_1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("axes_2", TensorProto.INT64, [1], [2]),
    ]
    graph = helper.make_graph(nodes, "AttentionFusionPrunedModel", inputs_of(hidden),
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, hidden])],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx", 16)])


def bert_attention(directory: Path) -> Built:
    """The generator's BERT attention block as written (opset 16)."""
    return write(directory, bert_attention_model(), attention_data(16, 21), check=False)


def bert_attention_fused(directory: Path) -> Built:
    """The same block after ``optimize_model(model, "bert", num_heads=2, hidden_size=16)``: ``Attention`` and
    ``SkipLayerNormalization`` (``com.microsoft``) and a LayerNormalization at opset 16."""
    from onnxruntime.transformers.optimizer import optimize_model

    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "unfused.onnx"  # the test hands the optimizer a file, as here
    onnx.save(bert_attention_model(), source)
    fused = optimize_model(str(source), model_type="bert", num_heads=2, hidden_size=16).model
    source.unlink()
    return write(directory, fused, attention_data(16, 22), check=False)


def tf2onnx_attention_3d(directory: Path) -> Built:
    """``create_tf2onnx_attention_3d()`` (hidden 16, 4 heads of 4): the attention tf2onnx writes with ``Einsum``
    (``abc,cde->abde`` projections, ``aecd,abcd->acbe`` scores), the mask through Unsqueeze/Slice/Cast/Sub, and K
    scaled by ``mul_weight_1`` = -10000 (the mask's constant; the mask gets 0.125), as the generator has it: its
    scores leave FP16's range. The generator takes the installed onnx's newest opset; written here at 17."""
    generator = rng(23)
    hidden, heads, head = 16, 4, 4
    nodes = [
        helper.make_node("Add", ["input_1", "input_2"], ["layernorm_input"], "add_layernorm"),
        helper.make_node("LayerNormalization", ["layernorm_input", "layer_norm_weight", "layer_norm_bias"],
                         ["layernorm_out"], "layernorm", axis=-1, epsion=EPSILON),
        helper.make_node("Einsum", ["layernorm_out", "einsum_q_weight"], ["einsum_q_out"], "einsum_q",
                         equation="abc,cde->abde"),
        helper.make_node("Add", ["einsum_q_out", "add_q_weight"], ["add_q_out"], "add_q"),
        helper.make_node("Einsum", ["layernorm_out", "einsum_k_weight"], ["einsum_k_out"], "einsum_k",
                         equation="abc,cde->abde"),
        helper.make_node("Add", ["einsum_k_out", "add_k_weight"], ["add_k_out"], "add_k"),
        helper.make_node("Mul", ["add_k_out", "mul_weight_1"], ["mul_k_out"], "mul_k"),
        helper.make_node("Unsqueeze", ["input_mask", "axes_1"], ["unsqueeze0_out"], "unsqueeze0"),
        helper.make_node("Slice", ["unsqueeze0_out", "slice_start", "slice_end", "slice_axes", "slice_steps"],
                         ["slice_out"], "slice"),
        helper.make_node("Cast", ["slice_out"], ["cast_out"], "cast", to=1),
        helper.make_node("Sub", ["sub_weight", "cast_out"], ["sub_out"], "sub"),
        helper.make_node("Mul", ["sub_out", "mul_weight_2"], ["mul_mask_out"], "mul_mask"),
        helper.make_node("Einsum", ["add_q_out", "mul_k_out"], ["einsum_qk_out"], "einsum_qk",
                         equation="aecd,abcd->acbe"),
        helper.make_node("Add", ["einsum_qk_out", "mul_mask_out"], ["add_qk_out"], "add_qk"),
        helper.make_node("Softmax", ["add_qk_out"], ["softmax_qk_out"], "softmax_qk", axis=3),
        helper.make_node("Einsum", ["layernorm_out", "einsum_v_weight"], ["einsum_v_out"], "einsum_v",
                         equation="abc,cde->abde"),
        helper.make_node("Add", ["einsum_v_out", "add_v_weight"], ["add_v_out"], "add_v"),
        helper.make_node("Einsum", ["softmax_qk_out", "add_v_out"], ["einsum_qkv_1_out"], "einsum_qkv_1",
                         equation="acbe,aecd->abcd"),
        helper.make_node("Einsum", ["einsum_qkv_1_out", "einsum_qkv_weight"], ["einsum_qkv_2_out"], "einsum_qkv_2",
                         equation="abcd,cde->abe"),
        helper.make_node("Add", ["einsum_qkv_2_out", "add_qkv_weight"], ["add_qkv_out"], "add_qkv"),
        helper.make_node("Add", ["add_qkv_out", "layernorm_out"], ["skip_output"], "add_skip"),
        helper.make_node("LayerNormalization", ["skip_output", "layer_norm_weight", "layer_norm_bias"], ["output"],
                         "layernorm2", axis=-1, epsion=EPSILON),
    ]
    initializers = [
        float_tensor(generator, "layer_norm_weight", [hidden]), float_tensor(generator, "layer_norm_bias", [hidden]),
        float_tensor(generator, "einsum_q_weight", [hidden, heads, head]),
        float_tensor(generator, "einsum_k_weight", [hidden, heads, head]),
        float_tensor(generator, "einsum_v_weight", [hidden, heads, head]),
        float_tensor(generator, "einsum_qkv_weight", [heads, head, hidden]),
        float_tensor(generator, "add_q_weight", [heads, head]), float_tensor(generator, "add_k_weight", [heads, head]),
        float_tensor(generator, "add_v_weight", [heads, head]), float_tensor(generator, "add_qkv_weight", [hidden]),
        helper.make_tensor("sub_weight", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("mul_weight_1", TensorProto.FLOAT, [1], [-10000]),
        helper.make_tensor("mul_weight_2", TensorProto.FLOAT, [1], [0.125]),
        helper.make_tensor("slice_start", TensorProto.INT32, [4], [0, 0, 0, 0]),
        helper.make_tensor("slice_end", TensorProto.INT32, [4], [1000000000] * 4),
        helper.make_tensor("slice_axes", TensorProto.INT32, [4], [0, 1, 2, 3]),
        helper.make_tensor("slice_steps", TensorProto.INT32, [4], [1, 1, 1, 1]),
        helper.make_tensor("axes_1", TensorProto.INT64, [2], [1, 2]),
    ]
    graph = helper.make_graph(nodes, "AttentionFusionPrunedModel", inputs_of(hidden),
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, hidden])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return write(directory, model, attention_data(hidden, 24), check=False)



def origin(path: str = GENERATOR, changes: str = "") -> Origin:
    """An ONNX Runtime origin."""
    return Origin(ORT, path, ORT_COMMIT, "MIT", changes)


ENTRIES = [
    Entry("ort_bert_attention", origin(changes="weights: the generator's random=True form, seeded"),
          "LayerNormalization at opset 16 (item 2) with an unknown attribute; attention pattern; fixed batch 1",
          bert_attention,
          Expect(planned=(Planned("LayerNormalization", "fp32"), Planned("Softmax", "fp32"),
                          Planned("MatMul", "fp16", every=False)))),
    Entry("ort_bert_attention_fused",
          origin(changes="the generator's graph through onnxruntime.transformers.optimizer, as "
                         "test_attention_fusion.py does"),
          "contrib ops Attention and SkipLayerNormalization (item 1) at opset 16; fixed batch 1",
          bert_attention_fused,
          Expect(planned=(Planned("Attention", "fp16"),), min_low_mac_share=0.9)),
    Entry("ort_tf2onnx_attention_3d", origin(changes="opset 17; weights: random=True, seeded"),
          "Einsum attention whose scores leave FP16's range: the range rule keeps them FP32; fixed batch 1",
          tf2onnx_attention_3d,
          Expect(planned=(Planned("Einsum", "fp16", every=False), Planned("Einsum", "fp32", every=False),
                          Planned("LayerNormalization", "fp32")))),
]

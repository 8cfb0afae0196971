"""ONNX Runtime's contrib ops (``com.microsoft``) as ``onnxruntime.transformers.optimizer`` writes them: typed, planned
by what they compute (attention low, normalisations FP32 under CUDA policies, activations following their inputs),
their multiply-accumulates counted, unknown ops kept FP32 and named; the mixed model valid and verified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import mpexport
from mpexport.bundle.names import FP32_ONNX, MIXED_ONNX
from mpexport.bundle.store import Bundle
from mpexport.capture.provenance import read_provenance
from mpexport.graph import contrib
from mpexport.graph.rewrite import apply_plan
from mpexport.graph.walk import infer_types
from mpexport.precision.macs import node_macs
from mpexport.precision.options import Overrides, PlanOptions
from mpexport.precision.plan import PrecisionPlan, read_plan, read_ranges
from mpexport.precision.planner import make_plan
from tests.toy_models import TextLogits, bert_config

HEADS, HIDDEN, LAYERS, INTERMEDIATE, LABELS = 4, 32, 2, 64, 3
SAMPLES, TOKENS = 24, 16


@pytest.fixture(scope="module")
def optimized_bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT (eager attention, so ONNX Runtime fuses it) through the TorchScript exporter at opset 17 and
    ``optimize_model(model_type="bert")``, with validation data (a third of the samples padded)."""
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("optimized_bert")
    torch.manual_seed(0)
    config = bert_config()
    config._attn_implementation = "eager"
    model = TextLogits(BertForSequenceClassification(config).eval())
    ids, mask = torch.randint(0, 200, (2, TOKENS)), torch.ones(2, TOKENS, dtype=torch.int64)
    exported, optimized = root / "bert.onnx", root / "bert.optimized.onnx"
    torch.onnx.export(model, (ids, mask), str(exported), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    optimize_model(str(exported), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN).save_model_to_file(
        str(optimized))
    rng = np.random.default_rng(0)
    mask_array = np.ones((SAMPLES, TOKENS), np.int64)
    mask_array[::3, 12:] = 0
    val = root / "val.npz"
    np.savez(val, input_ids=rng.integers(0, 200, (SAMPLES, TOKENS)).astype(np.int64), attention_mask=mask_array)
    return {"onnx": optimized, "val": val}


@pytest.fixture(scope="module")
def bert_bundle(optimized_bert: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bert_bundle") / "bundle"
    mpexport.convert(optimized_bert["onnx"], out=out, val_data=optimized_bert["val"])
    return out


def replan(out: Path, **options) -> PrecisionPlan:
    """The bundle's FP32 model planned again with other options (its calibration statistics kept)."""
    bundle = Bundle.open(out)
    return make_plan(ir.load(bundle.path(FP32_ONNX)), read_provenance(bundle), PlanOptions(**options),
                     read_ranges(bundle))


def float_outputs_by_running(path: Path, feeds: dict[str, np.ndarray]) -> set[str]:
    """Names of the nodes that output floating-point values, told by running the FP32 model in ONNX Runtime with
    every node output exposed (independent of any shape inference)."""
    model = onnx.load(str(path))
    names = [output for node in model.graph.node for output in node.output if output]
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = dict(zip(names, session.run(names, feeds), strict=True))
    return {node.name for node in model.graph.node if any(
        np.issubdtype(np.asarray(values[output]).dtype, np.floating) for output in node.output if output)}


def test_optimized_bert_is_planned_by_what_its_contrib_ops_compute(optimized_bert: dict[str, Path],
                                                                    bert_bundle: Path) -> None:
    plan = read_plan(Bundle.open(bert_bundle))
    nodes = {node.name: node for node in plan.nodes}
    assert {"Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization"} <= \
        {node.op_type for node in plan.nodes}
    with np.load(optimized_bert["val"]) as data:
        feeds = {name: data[name][:2] for name in ("input_ids", "attention_mask")}
    floating = float_outputs_by_running(Bundle.open(bert_bundle).path(FP32_ONNX), feeds)
    assert floating and all(nodes[name].precision != "none" for name in floating), \
        [nodes[name] for name in floating if nodes[name].precision == "none"]
    by_op: dict[str, set[str]] = {}
    for node in plan.nodes:
        by_op.setdefault(node.op_type, set()).add(node.precision)
    assert by_op["Attention"] == {"fp16"} and by_op["MatMul"] == {"fp16"} and by_op["BiasGelu"] == {"fp16"}
    assert by_op["SkipLayerNormalization"] == {"fp32"} and by_op["EmbedLayerNormalization"] == {"fp32"}
    attention = next(node for node in plan.nodes if node.op_type == "Attention")
    assert attention.rule == "contrib" and attention.reason.startswith("contrib op Attention computes") and \
        "planned as autocast runs aten.scaled_dot_product_attention" in attention.reason, attention.reason
    norm = next(node for node in plan.nodes if node.op_type == "SkipLayerNormalization")
    assert "planned as autocast runs aten.layer_norm: FP32 under cuda-fp16" in norm.reason, norm.reason
    gelu = next(node for node in plan.nodes if node.op_type == "BiasGelu")
    assert "aten.gelu" in gelu.reason and "runs in its inputs' type (FP16)" in gelu.reason, gelu.reason
    assert not [note for note in plan.notes if note.startswith("kept FP32")], plan.notes


def independent_macs(samples: int) -> dict[str, int]:
    """Multiply-accumulates of the tiny BERT on ``samples`` x ``TOKENS`` tokens, from its configuration."""
    s, h = TOKENS, HIDDEN
    attention = s * (h * 3 * h + s * 2 * h)  # QKV projection, scores, context
    per_layer = {"attention": attention, "dense": s * h * h + 2 * s * h * INTERMEDIATE}
    head = h * h + h * LABELS  # pooler on the first token, classifier
    return {"attention": samples * LAYERS * per_layer["attention"],
            "total": samples * (LAYERS * sum(per_layer.values()) + head)}


def test_mac_share_is_the_true_one(bert_bundle: Path) -> None:
    """Every multiply-accumulate is counted (Attention's from shapes), and the share matches one computed from the
    configuration, with the attention kept FP32 too."""
    summary = read_plan(Bundle.open(bert_bundle)).summary()["macs"]
    samples = summary["total"] // independent_macs(1)["total"]
    expected = independent_macs(samples)
    assert samples >= 1 and summary["total"] == expected["total"], (summary, expected)
    assert summary["uncounted_nodes"] == 0 and summary["low_precision_share"] == 1.0
    kept = replan(bert_bundle, policy="cuda-fp16", overrides=Overrides(keep_fp32_ops=["Attention"])).summary()["macs"]
    assert kept["total"] == expected["total"]
    assert kept["low_precision_share"] == round(1 - expected["attention"] / expected["total"], 4)
    assert kept["fp32_by_rule"] == {"override": expected["attention"]}


def test_optimized_bert_verifies(bert_bundle: Path) -> None:
    """The mixed model with FP16 contrib ops is valid and verifies: ONNX Runtime's CPU provider runs it, the strict
    emulation rounds at the contrib ops' boundaries."""
    manifest = Bundle.open(bert_bundle).manifest
    assert manifest.lint is not None and all(check["status"] == "pass" for check in manifest.lint.checks), \
        manifest.lint.checks
    mixed = ir.load(Bundle.open(bert_bundle).path(MIXED_ONNX))
    attention = next(node for node in mixed.graph if node.op_type == "Attention")
    assert attention.outputs[0].dtype == ir.DataType.FLOAT16
    assert all(value.dtype == ir.DataType.FLOAT16 for value in attention.inputs[:3] if value is not None)
    report = mpexport.verify(bert_bundle)
    assert report.passed, report.failures
    assert report.ran("onnx-mixed") and report.ran("strict-fp16"), report.backends


def test_cpu_policy_follows_the_residual_stream(bert_bundle: Path) -> None:
    """CPU autocast lists neither layer_norm nor gelu: SkipLayerNormalization follows its input and skip (the
    residual stream, FP32), BiasGelu its input (BF16), and attention runs low as SDPA does."""
    plan = replan(bert_bundle, policy="cpu-bf16")
    precisions = {node.op_type: node.precision for node in plan.nodes if node.precision != "none"}
    assert precisions["Attention"] == "bf16" and precisions["BiasGelu"] == "bf16"
    assert precisions["SkipLayerNormalization"] == "fp32" and precisions["EmbedLayerNormalization"] == "fp32"


def test_contrib_outputs_are_typed_without_symbolic_inference(optimized_bert: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ONNX Runtime's symbolic shape inference cannot run, its operator schemas still type every output."""
    model = ir.load(str(optimized_bert["onnx"]))
    for node in model.graph:
        for value in node.outputs:
            value.type, value.shape = None, None
    monkeypatch.setattr(contrib, "_symbolic_inference", lambda model: None)
    infer_types(model)
    assert contrib.untyped_outputs(model) == []
    embed = next(node for node in model.graph if node.op_type == "EmbedLayerNormalization")
    assert [value.dtype for value in embed.outputs] == [ir.DataType.FLOAT, ir.DataType.INT32]


def test_symbolic_inference_types_with_shapes_and_leaves_the_weights(optimized_bert: dict[str, Path]) -> None:
    model = ir.load(str(optimized_bert["onnx"]))
    initializers = {name: value.const_value for name, value in model.graph.initializers.items()}
    inputs = [value.name for value in model.graph.inputs]
    for node in model.graph:
        for value in node.outputs:
            value.type, value.shape = None, None
    infer_types(model)
    attention = next(node for node in model.graph if node.op_type == "Attention")
    assert attention.outputs[0].dtype == ir.DataType.FLOAT and attention.outputs[0].shape[-1] == HIDDEN
    assert [value.name for value in model.graph.inputs] == inputs
    assert {name: value.const_value for name, value in model.graph.initializers.items()} == initializers


def foreign_model() -> ir.Model:
    """x -> com.microsoft.FastGelu -> com.example.Frobnicate (typed by no one) -> MatMul -> y."""
    graph = helper.make_graph(
        [helper.make_node("FastGelu", ["x"], ["gelu"], domain="com.microsoft", name="gelu"),
         helper.make_node("Frobnicate", ["gelu"], ["odd"], domain="com.example", name="odd"),
         helper.make_node("MatMul", ["odd", "w"], ["y"], name="matmul")],
        "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [8, 4], np.ones(32, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(
        "com.microsoft", 1), helper.make_opsetid("com.example", 1)])
    return ir.serde.deserialize_model(model)


def test_unknown_ops_are_kept_fp32_named_and_counted() -> None:
    """An op mpexport does not know is FP32 with a reason naming it and a note; what follows it, untyped, is FP32 and
    counted as FP32, never dropped as 'not floating point'."""
    plan = make_plan(foreign_model(), [], PlanOptions(policy="cuda-fp16"))
    nodes = {node.name: node for node in plan.nodes}
    assert nodes["gelu"].precision == "fp32" and nodes["gelu"].rule == "contrib"  # follows x (FP32)
    assert (nodes["odd"].precision, nodes["odd"].rule) == ("fp32", "unknown-op")
    assert "com.example.Frobnicate is not an op mpexport plans" in nodes["odd"].reason
    assert (nodes["matmul"].precision, nodes["matmul"].rule) == ("fp32", "untyped"), nodes["matmul"]
    assert any("Frobnicate (1)" in note for note in plan.notes) and any("matmul" in note for note in plan.notes)
    summary = plan.summary()["macs"]
    assert summary["uncounted_nodes"] == 1 and summary["low_precision_share"] is None


def attention_node(op_type: str, inputs: list[tuple[str, list[int]]], outputs: list[tuple[str, list[int]]],
                   **attributes) -> ir.Node:
    def value(name: str, shape: list[int]) -> ir.Value:
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))

    node = ir.node(op_type, [value(name, shape) for name, shape in inputs], attributes, domain="com.microsoft",
                   num_outputs=len(outputs))
    for output, (name, shape) in zip(node.outputs, outputs, strict=True):
        output.name, output.dtype, output.shape = name, ir.DataType.FLOAT, ir.Shape(shape)
    return node


def test_attention_macs_from_shapes() -> None:
    """Attention: QKV projection + scores + context; MultiHeadAttention and GroupQueryAttention: scores + context,
    over the keys the cache holds."""
    b, s, h, past = 2, 5, 8, 3
    fused = attention_node("Attention", [("x", [b, s, h]), ("w", [h, 3 * h])], [("y", [b, s, h])], num_heads=2)
    assert node_macs(fused, None) == b * s * h * 3 * h + b * s * s * h * 2
    cached = attention_node("MultiHeadAttention", [("q", [b, s, h]), ("k", [b, s, h])],
                            [("y", [b, s, h]), ("present_key", [b, 2, s + past, h // 2])], num_heads=2)
    assert node_macs(cached, None) == b * s * (s + past) * 2 * h
    grouped = attention_node("GroupQueryAttention", [("q", [b, s, h])],
                             [("y", [b, s, h]), ("present_key", [b, 1, s + past, h // 2])], num_heads=2)
    assert node_macs(grouped, None) == b * s * (s + past) * 2 * h
    assert node_macs(fused, {"x": (4, s, h), "y": (4, s, h)}) == 2 * node_macs(fused, None)


def test_fp32_only_outputs_keep_their_type() -> None:
    """SkipLayerNormalization forced low keeps its ``mean`` output FP32 (its schema admits nothing else), and ONNX
    Runtime loads the mixed model."""
    graph = helper.make_graph(
        [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y", "mean"],
                          domain="com.microsoft", name="norm")],
        "skip", [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3, 8]) for name in ("x", "skip")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)],
        [helper.make_tensor(name, TensorProto.FLOAT, [8], np.full(8, value, np.float32))
         for name, value in (("gamma", 1.0), ("beta", 0.0))])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]))
    plan = make_plan(model, [], PlanOptions(policy="cuda-fp16", overrides=Overrides(force_low_nodes=["norm"])))
    assert plan.precisions()["norm"] == "fp16"
    apply_plan(model, plan.precisions())
    norm = next(node for node in model.graph if node.op_type == "SkipLayerNormalization")
    assert [value.dtype for value in norm.outputs] == [ir.DataType.FLOAT16, ir.DataType.FLOAT]
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    y, _ = session.run(None, {"x": x, "skip": x})
    assert np.isfinite(y).all()


def test_plan_json_keeps_the_mac_counts(bert_bundle: Path) -> None:
    data = read_plan(Bundle.open(bert_bundle)).to_json()
    assert PrecisionPlan.from_json(json.loads(json.dumps(data))).summary() == data["summary"]

"""The mixed-precision writer: retyping, casts, initializers, sentinels, IO types, lint, real architectures."""

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
from mpexport.errors import MpexportError
from mpexport.lint import lint_model
from mpexport.plan import PlanOptions
from mpexport.rewrite import apply_plan, realized_precisions
from tests import toy_models
from tests.conftest import MODELS, assert_bad_input

RNG = np.random.default_rng(0)


def small_graph(weight: np.ndarray, *, extra_nodes: list | None = None) -> ir.Model:
    """x -> MatMul(W) -> a; a -> Relu -> y; W also feeds Add(W, x0?) through a second MatMul kept FP32."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_low"),
        helper.make_node("MatMul", ["x", "W"], ["b"], name="mm_fp32"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        *(extra_nodes or []),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [onnx.numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(model))


def run(model: ir.Model, tmp_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_shared_initializer_gets_both_forms_and_outputs_stay_fp32(tmp_path: Path) -> None:
    weight = RNG.standard_normal((4, 4)).astype(np.float32)
    model = small_graph(weight)
    report = apply_plan(model, {"mm_low": "fp16", "mm_fp32": "fp32", "add": "fp16"})
    assert report.initializers_duplicated == ["W"]
    assert realized_precisions(model) == {"mm_low": "fp16", "mm_fp32": "fp32", "add": "fp16",
                                          "mpexport_cast_x_to_fp16": "fp16", "mpexport_cast_b_to_fp16": "fp16",
                                          "mpexport_cast_output_y": "fp32"}
    assert model.graph.outputs[0].name == "y" and model.graph.outputs[0].dtype == ir.DataType.FLOAT
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    (y,) = run(model, tmp_path, {"x": x})
    np.testing.assert_allclose(y, 2 * x @ weight, rtol=2e-2, atol=2e-2)


def test_large_shared_initializer_is_cast_at_run_time(tmp_path: Path) -> None:
    model = small_graph(RNG.standard_normal((4, 4)).astype(np.float32))
    report = apply_plan(model, {"mm_low": "fp16", "mm_fp32": "fp32", "add": "fp32"}, share_limit=0)
    assert report.initializers_cast_at_runtime == ["W"] and report.initializers_duplicated == []
    assert any(node.name == "mpexport_cast_W_to_fp16" for node in model.graph)
    run(model, tmp_path, {"x": np.ones((2, 4), np.float32)})


def test_mask_sentinels_saturate_and_real_overflow_is_an_error() -> None:
    mask = np.where(np.eye(4) > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
    model = small_graph(mask)
    report = apply_plan(model, {"mm_low": "fp16", "mm_fp32": "fp16", "add": "fp16"})
    assert report.saturated_sentinels == ["W"]
    converted = model.graph.initializers["W"].const_value.numpy()
    assert converted.dtype == np.float16 and converted.min() == np.float16(-65504) and np.isfinite(converted).all()

    with pytest.raises(MpexportError, match="reaches 1e\\+05"):
        apply_plan(small_graph(np.full((4, 4), 1.0e5, np.float32)), {"mm_low": "fp16", "mm_fp32": "fp16"})


def test_native_io_types_and_noop_cast_removal(tmp_path: Path) -> None:
    weight = RNG.standard_normal((4, 4)).astype(np.float32)
    cast = helper.make_node("Cast", ["a"], ["z"], name="model_cast", to=TensorProto.FLOAT16)
    model = small_graph(weight, extra_nodes=[cast])
    model.graph.outputs.append(model.graph.node("model_cast").outputs[0])
    report = apply_plan(model, {"mm_low": "fp16", "mm_fp32": "fp16", "add": "fp16"}, io_types="native")
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16
    assert report.casts_removed == 1  # the model's Cast to FP16 became a no-op
    assert all(node.op_type != "Cast" for node in model.graph)
    assert [value.name for value in model.graph.outputs] == ["y", "z"]
    x = RNG.standard_normal((2, 4)).astype(np.float16)
    y, z = run(model, tmp_path, {"x": x})
    assert y.dtype == z.dtype == np.float16


def test_writer_keeps_fixed_type_inputs(tmp_path: Path) -> None:
    resize = helper.make_node("Resize", ["x4", "", "scales"], ["r"], name="resize", mode="nearest")
    graph = helper.make_graph([resize], "g", [helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    apply_plan(model, {"resize": "fp16"})
    assert model.graph.initializers["scales"].dtype == ir.DataType.FLOAT
    (out,) = run(model, tmp_path, {"x4": np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)})
    assert out.shape == (1, 1, 4, 4)


@pytest.mark.parametrize("example", ["digits_resnet", "digits_transformer"])
def test_bundled_examples_mixed_models(tmp_path: Path, example: str) -> None:
    val = MODELS / f"{example}.val.npz"
    result = mpexport.convert(MODELS / f"{example}.pt2", out=tmp_path / example, val_data=val,
                              plan_options=PlanOptions(policy="cuda-fp16"))
    assert result.lint_passed, result.manifest["lint"]
    assert result.manifest["artifacts"]["mixed_onnx"] == "model.mixed.onnx"
    with np.load(val) as data:
        pixels, labels = data["pixels"], data["labels"]
    session = ort.InferenceSession(str(result.out / "model.mixed.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixels": pixels})
    assert logits.dtype == np.float32
    fp32_accuracy = result.manifest["source"]["training"]["val_accuracy_fp32"]
    assert abs(float((logits.argmax(1) == labels).mean()) - fp32_accuracy) <= 0.01


def test_bf16_target_exports_opset_22_and_lints(tmp_path: Path) -> None:
    result = mpexport.convert(MODELS / "digits_resnet.pt2", out=tmp_path / "r",
                              val_data=MODELS / "digits_resnet.val.npz")
    assert result.manifest["plan"]["target"] == "bf16" and result.manifest["export"]["opset"] == 22
    checks = {c["name"]: c["status"] for c in result.manifest["lint"]["checks"]}
    assert checks["onnx.checker"] == "pass" and checks["realized precision = plan"] == "pass"
    assert checks["onnxruntime"] in ("pass", "skipped")  # ONNX Runtime's CPU build has no BF16 Conv


@pytest.mark.parametrize(
    ("builder", "data"),
    [
        ("build_bert", {"input_ids": RNG.integers(1, 200, (4, 12)), "attention_mask": np.ones((4, 12), np.int64)}),
        ("build_gpt2", {"input_ids": RNG.integers(1, 100, (4, 12)), "attention_mask": np.ones((4, 12), np.int64)}),
        ("build_llama", {"input_ids": RNG.integers(1, 100, (4, 12)), "attention_mask": np.ones((4, 12), np.int64)}),
        ("build_vit", {"pixel_values": RNG.standard_normal((4, 3, 16, 16)).astype(np.float32)}),
        ("build_hf_resnet", {"pixel_values": RNG.standard_normal((4, 3, 32, 32)).astype(np.float32)}),
    ],
)
def test_transformers_architectures_mixed_models(tmp_path: Path, builder: str, data: dict) -> None:
    """Encoder with pooler, causal decoders (GPT-2; Llama with RMSNorm), ViT, a CNN: lint passes, ONNX Runtime
    runs the mixed model, and it stays close to FP32."""
    path = tmp_path / "model.pt"
    torch.save(getattr(toy_models, builder)(), path)
    val = tmp_path / "val.npz"
    np.savez(val, **data)
    result = mpexport.convert(path, out=tmp_path / "out", val_data=val, trust_pickle=True,
                              plan_options=PlanOptions(policy="cuda-fp16"))
    assert result.lint_passed, result.manifest["lint"]
    mixed = ort.InferenceSession(str(result.out / "model.mixed.onnx"), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(result.out / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    low, ref = mixed.run(None, data)[0], fp32.run(None, data)[0]
    assert np.isfinite(low).all()
    assert np.abs(low - ref).max() <= 2e-2 * max(1.0, float(np.abs(ref).max()))


def test_mixed_model_is_deterministic(tmp_path: Path) -> None:
    paths = [mpexport.convert(MODELS / "digits_transformer.pt2", out=tmp_path / name,
                              val_data=MODELS / "digits_transformer.val.npz").out / "model.mixed.onnx"
             for name in ("a", "b")]
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_lint_cli(cli, tmp_path: Path) -> None:
    out = tmp_path / "t"
    assert cli("convert", MODELS / "digits_transformer.pt2", "--val-data", MODELS / "digits_transformer.val.npz",
               "--out", out).exit_code == 0
    ok = cli("lint", out / "model.mixed.onnx", "--plan", out / "plan.json", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"]

    # A Cast whose declared output type contradicts its `to`, and a plan it does not realize.
    node = helper.make_node("Cast", ["x"], ["y"], name="bad_cast", to=TensorProto.FLOAT16)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), bad)
    result = lint_model(bad, {"bad_cast": "fp16"})
    failed = {check.name for check in result.checks if check.status == "fail"}
    assert {"cast types", "realized precision = plan"} <= failed
    assert cli("lint", bad).exit_code == 1
    (tmp_path / "junk.onnx").write_text("not onnx")
    assert_bad_input(cli("lint", tmp_path / "junk.onnx"), "not a readable ONNX model")

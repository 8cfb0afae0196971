"""The mixed-precision writer: retyping, casts, initializers, sentinels, IO types, lint, real architectures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import mpexport
from mpexport.base.errors import MpexportError
from mpexport.bundle.store import Bundle
from mpexport.graph.contract import realized_precisions
from mpexport.graph.lint import lint_model
from mpexport.graph.rewrite import apply_plan
from mpexport.precision.options import PlanOptions
from mpexport.precision.plan import read_plan
from tests import toy_models
from tests.helpers import MODELS, assert_bad_input

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
    assert realized_precisions(model) == {"mm_low": ("fp16", None), "mm_fp32": ("fp32", None), "add": ("fp16", None),
                                          "mpexport_cast_x_to_fp16": ("fp16", "cast"),
                                          "mpexport_cast_b_to_fp16": ("fp16", "cast"),
                                          "mpexport_cast_output_y": ("fp32", "cast")}
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


def test_a_weight_read_by_a_fixed_type_slot_and_a_low_node_keeps_its_type_for_the_slot(tmp_path: Path) -> None:
    """Resize's scales must stay FLOAT; the same initializer also scales the image in FP16: the Mul gets its own FP16
    form (it was converted in place for both, and ONNX Runtime refused the Resize)."""
    nodes = [helper.make_node("Resize", ["x4", "", "scales"], ["r"], name="resize", mode="nearest"),
             helper.make_node("Mul", ["x4", "scales"], ["m"], name="mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 1, 2, 4])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 1, 4, 8]),
                               helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, 1, 2, 4])],
                              [onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    report = apply_plan(model, {"resize": "fp16", "mul": "fp16"})
    assert model.graph.initializers["scales"].dtype == ir.DataType.FLOAT and report.initializers_duplicated == \
        ["scales"]
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    resized, scaled = run(model, tmp_path, {"x4": x})
    assert resized.shape == (1, 1, 4, 8) and np.array_equal(scaled, x * np.array([1, 1, 2, 2], np.float32))


@pytest.mark.parametrize("example", ["digits_resnet", "digits_transformer"])
def test_bundled_examples_mixed_models(tmp_path: Path, example: str) -> None:
    val = MODELS / f"{example}.val.npz"
    result = mpexport.convert(MODELS / f"{example}.pt2", out=tmp_path / example, val_data=val,
                              plan_options=PlanOptions(policy="cuda-fp16"))
    assert result.lint_passed, result.manifest.lint
    assert result.manifest.artifacts["mixed_onnx"].file == "model.mixed.onnx"
    with np.load(val) as data:
        pixels, labels = data["pixels"], data["labels"]
    session = ort.InferenceSession(str(result.out / "model.mixed.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixels": pixels})
    assert logits.dtype == np.float32
    fp32_accuracy = result.manifest.source.training["val_accuracy_fp32"]
    assert abs(float((logits.argmax(1) == labels).mean()) - fp32_accuracy) <= 0.01


def test_bf16_target_exports_opset_22_and_lints(tmp_path: Path) -> None:
    result = mpexport.convert(MODELS / "digits_resnet.pt2", out=tmp_path / "r",
                              val_data=MODELS / "digits_resnet.val.npz")
    assert result.manifest.plan.target == "bf16" and result.manifest.export.opset == 22
    checks = {c["name"]: c["status"] for c in result.manifest.lint.checks}
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


def test_external_data_path_matches_the_inline_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The large-model path (weights in external data files, read memory-mapped one at a time, range rule on the
    external model, converted weights computed while saving) gives the same plan and model as the inline path."""
    from mpexport.commands import fp32 as fp32_stage
    from mpexport.commands.verify import verify

    model, val = MODELS / "digits_transformer.pt2", MODELS / "digits_transformer.val.npz"
    options = PlanOptions(policy="cuda-fp16")
    inline = mpexport.convert(model, out=tmp_path / "inline", val_data=val, plan_options=options)
    monkeypatch.setattr(fp32_stage, "MIXED_EXTERNAL_DATA_THRESHOLD", 0)  # both models with external data
    external = mpexport.convert(model, out=tmp_path / "external", val_data=val, plan_options=options)

    assert external.manifest.export.external_data and external.lint_passed
    fp32_bytes = (external.out / "model.fp32.onnx.data").stat().st_size
    assert fp32_bytes > 50_000 and (external.out / "model.mixed.onnx.data").stat().st_size < 0.6 * fp32_bytes
    assert not (inline.out / "model.mixed.onnx.data").exists()
    assert set(external.manifest.artifacts["fp32_onnx"].sha256) == {"model.fp32.onnx", "model.fp32.onnx.data"}
    assert set(external.manifest.artifacts["mixed_onnx"].sha256) == {"model.mixed.onnx", "model.mixed.onnx.data"}
    plan_inline, plan_external = (json.loads((r.out / "plan.json").read_text()) for r in (inline, external))
    assert plan_external["options"]["calibration_samples"] == plan_inline["options"]["calibration_samples"] == 256
    assert plan_external["nodes"] == plan_inline["nodes"]

    with np.load(val) as data:
        feeds = {"pixels": data["pixels"]}
    outputs = [ort.InferenceSession(str(r.out / "model.mixed.onnx"), providers=["CPUExecutionProvider"])
               .run(None, feeds)[0] for r in (inline, external)]
    np.testing.assert_array_equal(outputs[0], outputs[1])

    report = verify(external.out)
    assert report.passed, report.failures
    assert {"onnx-mixed", "strict-fp16"} <= report.metrics.keys()
    assert not [path.name for path in external.out.iterdir() if path.name.startswith(".")]

    from mpexport.deploy.triton import package_triton

    package_triton(external.out, tmp_path / "repo", name="m")
    packaged = tmp_path / "repo" / "m" / "1" / "model.onnx"
    assert sorted(path.name for path in packaged.iterdir()) == ["model.mixed.onnx.data", "model.onnx"]
    session = ort.InferenceSession(str(packaged / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds)[0], outputs[1])


def test_fp32_working_copy_with_external_data_gives_a_self_contained_mixed_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above 64 MB of weights only the FP32 ONNX (mpexport's working copy) has external data; the mixed model is
    one file that carries every weight, also those it did not convert, and runs without the FP32 data file."""
    from mpexport.commands import fp32 as fp32_stage

    monkeypatch.setattr(fp32_stage, "FP32_EXTERNAL_DATA_THRESHOLD", 0)
    model, val = MODELS / "digits_transformer.pt2", MODELS / "digits_transformer.val.npz"
    result = mpexport.convert(model, out=tmp_path / "m", val_data=val, plan_options=PlanOptions(policy="cuda-fp16"))
    assert result.export_check_passed and result.lint_passed
    assert set(result.manifest.artifacts["fp32_onnx"].sha256) == {"model.fp32.onnx", "model.fp32.onnx.data"}
    assert set(result.manifest.artifacts["mixed_onnx"].sha256) == {"model.mixed.onnx"}
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.onnx").write_bytes((result.out / "model.mixed.onnx").read_bytes())
    onnx.checker.check_model(str(alone / "model.onnx"), full_check=True)
    with np.load(val) as data:
        feeds = {"pixels": data["pixels"][:16]}
    mixed = ort.InferenceSession(str(alone / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    fp32 = ort.InferenceSession(str(result.out / "model.fp32.onnx"), providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]
    assert np.abs(mixed - fp32).max() < 0.05 * np.abs(fp32).max()


def test_reading_external_weights_unmaps_them(tmp_path: Path) -> None:
    """Plan and rewrite read every weight of an external-data model, each unmapped after use, and the converted
    weights are computed while saving: after saving, no weight of the source is mapped or held."""
    from mpexport.capture import provenance
    from mpexport.precision.planner import make_plan

    result = mpexport.convert(MODELS / "digits_resnet.pt2", out=tmp_path / "r", plan_options=PlanOptions(
        policy="cuda-fp16"), val_data=MODELS / "digits_resnet.val.npz")
    source = tmp_path / "ext" / "model.onnx"
    source.parent.mkdir()
    ir.save(ir.load(str(result.out / "model.fp32.onnx")), source, external_data="model.onnx.data",
            size_threshold_bytes=0)
    model = ir.load(str(source))
    weights = [value.const_value for value in model.graph.initializers.values()]
    assert weights and all(isinstance(tensor, ir.ExternalTensor) for tensor in weights)
    records = provenance.from_json(json.loads((result.out / "provenance.json").read_text()))
    plan = make_plan(model, records, PlanOptions(policy="cuda-fp16", range_check=True))
    apply_plan(model, {node.name: node.precision for node in plan.nodes})
    converted = [value.const_value for value in model.graph.initializers.values()
                 if isinstance(value.const_value, ir.LazyTensor)]
    assert converted and all(value.dtype == ir.DataType.FLOAT16 for value in converted)
    ir.save(model, tmp_path / "ext" / "mixed.onnx", external_data="mixed.onnx.data")
    assert all(tensor.raw is None for tensor in weights)  # every mapping closed again
    assert lint_model(tmp_path / "ext" / "mixed.onnx", {n.name: n.precision for n in plan.nodes}).ok


class _Branchy(torch.nn.Module):
    """torch.cond exports to an ONNX If whose branches read the FP16 Linear output from the outer scope."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        h = torch.cond(h.sum() > 0, lambda t: torch.softmax(t, -1) * 2.0, lambda t: t.exp(), (h,))
        return self.head(h)


def test_subgraphs_stay_fp32_and_read_their_outer_values_in_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.export.save(torch.export.export(_Branchy().eval(), (torch.randn(4, 8),)), tmp_path / "b.pt2")
    x = RNG.normal(size=(32, 8)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    result = mpexport.convert(tmp_path / "b.pt2", out=tmp_path / "out", val_data=tmp_path / "val.npz",
                              plan_options=PlanOptions(policy="cuda-fp16"))
    assert result.export_check_passed and result.lint_passed, result.manifest.lint
    nodes = json.loads((result.out / "plan.json").read_text())["nodes"]
    holder = next(node["name"] for node in nodes if node["op_type"] == "If")
    inner = [node for node in nodes if f"inside the subgraph of {holder}" in node["reason"]]
    assert inner and all(node["precision"] == "fp32" and node["rule"] == "subgraph" for node in inner)
    assert len({node["name"] for node in nodes}) == len(nodes)  # one name, one node, bodies included
    lint = next(check for check in result.manifest.lint.checks if check["name"] == "realized precision = plan")
    compared = int(lint["detail"].split(" of ")[0])
    assert lint["status"] == "pass" and compared == len(nodes), lint  # every node, the branches' included
    assert {node["precision"] for node in nodes if node["op_type"] == "Gemm"} == {"fp16"}
    model = onnx.load(str(result.out / "model.mixed.onnx"))
    order = [node.op_type for node in model.graph.node]
    back_to_fp32 = [index for index, node in enumerate(model.graph.node)
                    if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT]
    assert back_to_fp32 and back_to_fp32[0] < order.index("If"), order  # the FP16 Linear output, for the branches
    session = ort.InferenceSession(str(result.out / "model.mixed.onnx"), providers=["CPUExecutionProvider"])
    for sign in (1.0, -1.0):  # both branches
        batch = np.abs(x[:4]) * sign
        (mixed,) = session.run(None, {"x": batch})
        reference = torch.export.load(tmp_path / "b.pt2").module()(torch.from_numpy(batch)).detach().numpy()
        np.testing.assert_allclose(mixed, reference, atol=2e-2 * np.abs(reference).max())


def test_initializer_read_by_a_subgraph_keeps_its_type_there(tmp_path: Path) -> None:
    weight = RNG.normal(size=(4, 4)).astype(np.float32)
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["inner"], name="inner_mm")], "then",
                               [], [helper.make_tensor_value_info("inner", TensorProto.FLOAT, ["n", 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["other"], name="inner_id")], "else",
                              [], [helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", 4])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm"),
             helper.make_node("If", ["flag"], ["b"], name="branch", then_branch=branch, else_branch=other),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
                              [onnx.numpy_helper.from_array(weight, "W")])
    model = ir.from_proto(onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])))
    report = apply_plan(model, {"mm": "fp16", "branch": "fp32", "add": "fp32"})
    assert report.initializers_duplicated == ["W"]  # FP16 for mm, FP32 as the branch reads it
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    for flag, expected in ((True, x @ weight + x @ weight), (False, x @ weight + x)):
        (y,) = run(model, tmp_path, {"x": x, "flag": np.array(flag)})
        np.testing.assert_allclose(y, expected, rtol=1e-2, atol=1e-2)
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)


def test_streamed_single_file_is_the_same_model(tmp_path: Path) -> None:
    """save_model assembles a single-file model from per-initializer pieces: the same message as onnx-ir's save,
    and the in-memory model keeps its weights."""
    from mpexport.graph.onnxfile import save_model

    model = small_graph(RNG.normal(size=(4, 4)).astype(np.float32))
    model.graph.register_initializer(ir.Value(name="big", const_value=ir.tensor(RNG.normal(size=(300, 700)))))
    apply_plan(model, {"mm_low": "fp16", "mm_fp32": "fp32", "add": "fp32"})  # converted weights are lazy
    save_model(model, tmp_path / "streamed.onnx")
    ir.save(model, tmp_path / "whole.onnx")
    streamed, whole = onnx.load(str(tmp_path / "streamed.onnx")), onnx.load(str(tmp_path / "whole.onnx"))
    assert streamed == whole and len(streamed.graph.initializer) == 3
    assert all(value.const_value is not None for value in model.graph.initializers.values())
    onnx.checker.check_model(streamed, full_check=True)


def test_calibration_statistics_equal_the_intermediates_themselves(tmp_path: Path) -> None:
    """The in-graph statistics (ReduceMax(Abs), a non-finite flag, Shape) equal what the full intermediates say."""
    from mpexport.precision.ranges import collect_ranges, intermediates_session

    result = mpexport.convert(MODELS / "digits_transformer.pt2", out=tmp_path / "t", plan_options=PlanOptions(
        range_check=False))
    path = result.out / "model.fp32.onnx"
    with np.load(MODELS / "digits_transformer.val.npz") as data:
        batches = [{"pixels": data["pixels"][start:start + 64]} for start in range(0, 192, 64)]
    stats = collect_ranges(path, batches)
    session, names = intermediates_session(ir.load(str(path)), path.parent)
    expected: dict[str, float] = {}
    for batch in batches:
        for name, array in zip(names, session.run(names, batch), strict=True):
            expected[name] = max(expected.get(name, 0.0), float(np.abs(array).max(initial=0.0)))
            if batch is batches[0]:
                assert stats.shapes[name] == array.shape
    assert stats.samples == 192 and stats.max_abs.keys() == expected.keys()
    np.testing.assert_allclose([stats.max_abs[name] for name in expected], list(expected.values()), rtol=1e-6)

    nan_input = {"pixels": np.full((2, 1, 8, 8), np.nan, np.float32)}
    poisoned = collect_ranges(path, [nan_input])
    assert all(math.isinf(peak) for peak in poisoned.max_abs.values())


def test_lint_compares_every_node_of_a_torchscript_exporter_model(cli, tmp_path: Path) -> None:
    """That exporter names nodes like paths (/fc/Gemm); lint compares every one of them, and a node realized in
    another type than planned fails."""
    from tests.toy_models import build_data_dependent

    torch.save(build_data_dependent().state_dict(), tmp_path / "ckpt.pt")
    out = tmp_path / "m"
    assert cli("convert", tmp_path / "ckpt.pt", "--factory", "tests.toy_models:build_data_dependent", "--input",
               "x:batch,4", "--amp-policy", "cuda-fp16", "--out", out).exit_code == 0
    bundle = Bundle.open(out)
    assert bundle.manifest.export.strategy == "legacy-torchscript"
    plan = read_plan(bundle)
    assert "/fc/Gemm" in plan.precisions() and plan.precisions()["/fc/Gemm"] == "fp16"
    check = next(c for c in bundle.manifest.lint.checks if c["name"] == "realized precision = plan")
    compared, total = (int(part) for part in check["detail"].split(" nodes compared")[0].split(" of "))
    added = int(check["detail"].split("(")[1].split(" added")[0])
    assert check["status"] == "pass" and compared == len(plan.nodes) and compared + added == total, check

    altered = ir.load(str(bundle.path("fp32_onnx")))
    apply_plan(altered, {**plan.precisions(), "/fc/Gemm": "fp32"})
    ir.save(altered, tmp_path / "altered.onnx")
    result = cli("lint", tmp_path / "altered.onnx", "--plan", out / "plan.json", "--json")
    assert result.exit_code == 1
    findings = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "realized precision = plan")
    assert "/fc/Gemm: planned fp16, realized fp32" in findings["findings"]


@pytest.mark.parametrize("declared", ["nothing", "a type"])
def test_lint_leaves_graph_outputs_without_a_shape_to_onnx_runtime(tmp_path: Path, declared: str) -> None:
    """An output the model declares without a shape (ONNX Runtime runs it; the checker requires one) is set aside,
    checked as shape inference finds it: a Relu's output is (2, 3), not a scalar the check would contradict."""
    output = onnx.ValueInfoProto(name="y") if declared == "nothing" else \
        helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], [output])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    checker = next(check for check in lint_model(tmp_path / "m.onnx").checks if check.name == "onnx.checker")
    assert checker.status == "pass" and "graph output(s) y declaring no shape" in checker.detail, checker

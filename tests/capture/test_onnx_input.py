"""An FP32 ONNX exported elsewhere as convert's input: the TorchScript exporter's ONNX of a BERT and a CNN (plan by
op type and recognised patterns, agreeing with the `.pt2` plan), the dynamo exporter's ONNX (exactly the `.pt2`
plan), graphs other converters break, verify without a PyTorch model, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import mpexport
from mpexport.bundle.names import FP32_ONNX
from mpexport.bundle.store import Bundle
from mpexport.capture.provenance import read_provenance
from mpexport.precision.agreement import plan_agreement
from mpexport.precision.options import PlanOptions
from mpexport.precision.plan import PrecisionPlan, read_ranges
from mpexport.precision.planner import make_plan
from tests.helpers import assert_bad_input, assert_nothing_written
from tests.toy_models import TextLogits, build_bert, build_cnn

POLICIES = ("cpu-fp16", "cpu-bf16", "cuda-fp16", "cuda-bf16")


def torchscript_export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str],
                       path: Path, opset: int = 17) -> Path:
    """The legacy TorchScript exporter (opset 17 by default: what Optimum and older pipelines produce): module
    scopes in node names, no aten metadata."""
    axes = {name: {0: "batch"} for name in [*names, "logits"]}
    torch.onnx.export(module, example, str(path), dynamo=False, opset_version=opset, input_names=names,
                      output_names=["logits"], dynamic_axes=axes)
    return path


def plan_of(out: Path, policy: str) -> PrecisionPlan:
    """The plan a bundle's FP32 ONNX and provenance get under ``policy``."""
    bundle = Bundle.open(out)
    return make_plan(ir.load(str(bundle.path(FP32_ONNX))), read_provenance(bundle), PlanOptions(policy=policy),
                     read_ranges(bundle))


def assert_agrees_everywhere(reference: Path, other: Path, *, at_least: int) -> None:
    """Under every policy, the ONNX-only plan of ``other`` gives every node it can pair the `.pt2` plan's
    precision."""
    for policy in POLICIES:
        agreement = plan_agreement(plan_of(reference, policy), plan_of(other, policy))
        assert agreement.compared >= at_least, (policy, agreement.to_json())
        assert agreement.share == 1.0, (policy, agreement.to_json())


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT classifier as a `.pt2` (dynamo) and a TorchScript-exporter ONNX, its validation set, and the
    `.pt2`'s bundle."""
    root = tmp_path_factory.mktemp("bert")
    module = TextLogits(build_bert())
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (32, 12))
    mask = np.ones_like(ids)
    mask[::3, 8:] = 0  # padded rows: the attention mask matters
    np.savez(root / "val.npz", input_ids=ids, attention_mask=mask)
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(module, example, dynamic_shapes=({0: batch}, {0: batch})),
                      root / "bert.pt2")
    torchscript_export(module, example, ["input_ids", "attention_mask"], root / "bert.onnx")
    mpexport.convert(root / "bert.pt2", out=root / "pt2", val_data=root / "val.npz")
    return {"pt2": root / "bert.pt2", "onnx": root / "bert.onnx", "val": root / "val.npz",
            "pt2_bundle": root / "pt2"}


def test_torchscript_bert_converts_lints_verifies_and_agrees_with_its_pt2_plan(cli, tmp_path: Path,
                                                                                bert: dict[str, Path]) -> None:
    out = tmp_path / "out"
    result = cli("convert", bert["onnx"], "--val-data", bert["val"], "--out", out)
    assert result.exit_code == 0, result.stderr
    assert "export check" in result.stdout  # said to be skipped, and why
    manifest = Bundle.open(out).manifest
    assert manifest.source.format == "onnx"
    assert manifest.export.provenance == "onnx (scope)"
    assert manifest.lint is not None and manifest.lint.ok
    assert "no PyTorch model" in (manifest.skip_reason("export check") or "")

    plan = PrecisionPlan.load(out / "plan.json")
    reasons = {node.op_type: node.reason for node in plan.nodes if node.rule in ("policy", "kernel")}
    assert "recognised from the ONNX pattern of a scaled dot-product attention" in reasons["Softmax"]
    assert "recognised from the ONNX pattern of a linear" in reasons["Add"] or \
        "inferred from" in reasons["Add"]
    assert all(node.aten is None for node in plan.nodes)  # no aten op claimed that the file does not record
    assert_agrees_everywhere(bert["pt2_bundle"], out, at_least=40)

    result = cli("verify", out, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "pass"
    assert report["reference"] == "onnx-fp32"
    assert report["backends"]["onnx-amp"]["state"] == "ran"  # the noise floor without PyTorch
    assert report["backends"]["torch-amp"]["state"] == "skipped"

    result = cli("verify", out, "--reference", bert["pt2"], "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["reference"] == "torch-fp32"
    assert report["backends"]["torch-amp"]["state"] == "ran"


def test_dynamo_onnx_gets_exactly_the_pt2_plan(bert: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    mpexport.convert(bert["pt2_bundle"] / "model.fp32.onnx", out=out, val_data=bert["val"])
    assert Bundle.open(out).manifest.export.provenance == "onnx (exporter)"
    assert PrecisionPlan.load(out / "plan.json").precisions() == \
        PrecisionPlan.load(bert["pt2_bundle"] / "plan.json").precisions()
    for policy in POLICIES:
        assert plan_of(out, policy).precisions() == plan_of(bert["pt2_bundle"], policy).precisions()


def test_torchscript_cnn_converts_verifies_and_agrees(cli, tmp_path: Path, pixels_npz: Path) -> None:
    module = build_cnn().eval()
    example = (torch.zeros(2, 1, 8, 8),)
    torch.export.save(torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      tmp_path / "cnn.pt2")
    model = torchscript_export(module, example, ["pixels"], tmp_path / "cnn.onnx")
    assert cli("convert", tmp_path / "cnn.pt2", "--val-data", pixels_npz, "--out", tmp_path / "pt2").exit_code == 0
    result = cli("convert", model, "--val-data", pixels_npz, "--out", tmp_path / "onnx")
    assert result.exit_code == 0, result.stderr
    assert Bundle.open(tmp_path / "onnx").manifest.lint.ok  # type: ignore[union-attr]
    assert_agrees_everywhere(tmp_path / "pt2", tmp_path / "onnx", at_least=2)
    assert cli("verify", tmp_path / "onnx").exit_code == 0


class Norms(torch.nn.Module):
    """A LayerNorm (decomposed into ReduceMean/Sub/Pow/Sqrt/Div by the TorchScript exporter below opset 17) and a
    hand-written RMSNorm (pow, mean, rsqrt) between two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.scale = torch.nn.Parameter(torch.ones(16))
        self.down = torch.nn.Linear(16, 4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.up(pixels.flatten(1)[:, :8]))
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
        return self.down(hidden)


def test_decomposed_layer_norm_and_rms_norm_agree_with_the_pt2_plan(tmp_path: Path, pixels_npz: Path) -> None:
    module = Norms().eval()
    example = (torch.zeros(2, 1, 8, 8),)
    torch.export.save(torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      tmp_path / "norms.pt2")
    model = torchscript_export(module, example, ["pixels"], tmp_path / "norms.onnx", opset=16)
    assert "LayerNormalization" not in {node.op_type for node in onnx.load(model).graph.node}
    mpexport.convert(tmp_path / "norms.pt2", out=tmp_path / "pt2", val_data=pixels_npz)
    mpexport.convert(model, out=tmp_path / "onnx", val_data=pixels_npz)
    assert_agrees_everywhere(tmp_path / "pt2", tmp_path / "onnx", at_least=4)
    reasons = " ".join(node.reason for node in plan_of(tmp_path / "onnx", "cuda-fp16").nodes)
    assert "layer_norm" in reasons and "rms" in reasons.lower()


def awkward_graph(path: Path) -> Path:
    """What onnxconverter-common's float16 converter breaks: ``hidden`` is a graph output and consumed inside,
    initializer ``w`` feeds an FP16 MatMul and an FP32 Softmax, an ``If`` picks a branch from the data."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    then_branch = helper.make_graph([helper.make_node("Neg", ["mixed"], ["then_out"])], "then", [],
                                    [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["n", 4])])
    else_branch = helper.make_graph([helper.make_node("Relu", ["mixed"], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["n", 4])])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["projected"], name="project"),
        helper.make_node("Relu", ["projected"], ["hidden"], name="act"),
        helper.make_node("Softmax", ["w"], ["weights"], axis=-1, name="normalise_weights"),
        helper.make_node("MatMul", ["hidden", "weights"], ["mixed"], name="mix"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="total"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
        helper.make_node("If", ["positive"], ["result"], then_branch=then_branch, else_branch=else_branch,
                         name="branch"),
    ]
    graph = helper.make_graph(nodes, "awkward", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("result", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", 4])],
                              [weight, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_graph_other_converters_break_converts_to_a_model_ort_loads(cli, tmp_path: Path) -> None:
    model = awkward_graph(tmp_path / "awkward.onnx")
    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x)
    out = tmp_path / "out"
    result = cli("convert", model, "--val-data", tmp_path / "val.npz", "--out", out)
    assert result.exit_code == 0, result.stderr
    plan = {node.name: node for node in PrecisionPlan.load(out / "plan.json").nodes}
    assert plan["project"].precision == "fp16" and plan["normalise_weights"].precision == "fp32"
    assert plan["branch"].precision == "fp32"

    session = ort.InferenceSession(str(out / "model.mixed.onnx"), providers=["CPUExecutionProvider"])
    assert [(o.name, o.type) for o in session.get_outputs()] == [("result", "tensor(float)"),
                                                                 ("hidden", "tensor(float)")]
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for expected, got in zip(reference, session.run(None, {"x": x}), strict=True):
        np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2)
    assert cli("verify", out).exit_code == 0


def test_onnxconverter_common_breaks_the_same_graph(tmp_path: Path) -> None:
    """The drop-in converter users run today writes a model ONNX Runtime refuses for the graph above (the
    reason mpexport's writer inserts casts per consumer and keeps graph outputs' types)."""
    from onnxconverter_common import float16

    converted = float16.convert_float_to_float16(onnx.load(awkward_graph(tmp_path / "awkward.onnx")),
                                                 keep_io_types=True)
    onnx.save(converted, tmp_path / "occ.onnx")
    with pytest.raises(Exception, match=r"(?i)type"):  # ORT's error class varies across releases
        ort.InferenceSession(str(tmp_path / "occ.onnx"), providers=["CPUExecutionProvider"])


def relu_model(path: Path, element_type: int, opset: int) -> Path:
    """A one-Relu ONNX model of ``element_type`` at ``opset``."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", element_type, [1, 4])],
                              [helper.make_tensor_value_info("y", element_type, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def test_fp16_model_is_refused(cli, tmp_path: Path) -> None:
    model = relu_model(tmp_path / "half.onnx", TensorProto.FLOAT16, 17)
    out = tmp_path / "out"
    assert_bad_input(cli("convert", model, "--out", out), "is not an FP32 model", "FP16")
    assert_nothing_written(out)


def test_corrupt_onnx_is_refused(cli, tmp_path: Path) -> None:
    source = awkward_graph(tmp_path / "good.onnx").read_bytes()
    model = tmp_path / "model.onnx"
    model.write_bytes(source[: len(source) // 2])
    out = tmp_path / "out"
    assert_bad_input(cli("convert", model, "--out", out), "model.onnx")
    assert_nothing_written(out)


def test_missing_external_data_is_refused(cli, tmp_path: Path) -> None:
    model = onnx.load(awkward_graph(tmp_path / "inline.onnx"))
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    (tmp_path / "model.onnx.data").unlink()
    out = tmp_path / "out"
    assert_bad_input(cli("convert", tmp_path / "model.onnx", "--out", out), "model.onnx.data", "missing")
    assert_nothing_written(out)


def test_onnx_from_elsewhere_needs_validation_data_only_for_calibration(cli, tmp_path: Path) -> None:
    """Without --val-data the ONNX still converts (its inputs come from the file); the range rule then checks
    weights only, and the plan says so."""
    out = tmp_path / "out"
    result = cli("convert", awkward_graph(tmp_path / "m.onnx"), "--out", out)
    assert result.exit_code == 0, result.stderr
    assert any("no calibration data" in note for note in PrecisionPlan.load(out / "plan.json").notes)


def test_onnx_is_recognised_by_content_not_name(cli, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"  # an ONNX file with a PyTorch file's name
    model.write_bytes(awkward_graph(tmp_path / "m.onnx").read_bytes())
    assert cli("convert", model, "--out", tmp_path / "out").exit_code == 0
    assert Bundle.open(tmp_path / "out").manifest.source.format == "onnx"


def test_opset_older_than_the_writer_supports_is_refused(cli, tmp_path: Path) -> None:
    model = relu_model(tmp_path / "old.onnx", TensorProto.FLOAT, 11)
    out = tmp_path / "out"
    assert_bad_input(cli("convert", model, "--out", out), "opset 11")
    assert_nothing_written(out)


def test_an_ir3_model_listing_its_weights_as_inputs_takes_only_its_real_input(cli, tmp_path: Path,
                                                                             pixels_npz: Path) -> None:
    """IR version 3 (the classic model zoo) lists every initializer as a graph input as well: ONNX Runtime runs it
    fed with the real input alone, and so does mpexport (the weights are weights)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
               numpy_helper.from_array(rng.standard_normal((10, 256)).astype(np.float32), "fc")]
    inputs = [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 8, 8]),
              *(helper.make_tensor_value_info(w.name, TensorProto.FLOAT, list(w.dims)) for w in weights)]
    nodes = [helper.make_node("Conv", ["pixels", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "zoo", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], weights)
    model = tmp_path / "zoo.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=3), model)
    out = tmp_path / "out"
    result = cli("convert", model, "--val-data", pixels_npz, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [spec["name"] for spec in payload["manifest"]["inputs"]] == ["pixels"]
    assert any("3 graph inputs are initializers" in note for note in payload["notes"])
    assert cli("verify", out).exit_code == 0

"""ONNX Runtime's transformers optimizer output as convert's input: ``LayerNormalization`` at opsets 13 and 14, which
ONNX registers from opset 17 only and ONNX Runtime registers below it (and runs). Built with ``onnx.helper`` as the
optimizer writes it, and from a real ``optimize_model`` run on a tiny BERT: read with a note, typed, planned FP32
(autocast runs ``aten.layer_norm`` in FP32), linted, verified. What ONNX Runtime does not run either is refused in
one line, with a hint that works; any other finding of the ONNX checker is still refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mpexport.bundle.store import Bundle
from mpexport.capture.onnxinput import read_fp32_onnx
from mpexport.graph.checker import check_setting_aside, unregistered_ops
from mpexport.graph.lint import lint_model
from mpexport.precision.plan import PrecisionPlan
from tests.helpers import assert_bad_input, assert_nothing_written

HIDDEN = 16


def norm_model(path: Path, *, opset: int, op: str = "LayerNormalization", statistics: bool = False,
               broken: bool = False) -> Path:
    """``x -> MatMul -> Add (bias) -> <op>(scale, bias, axis=-1, epsilon) -> MatMul -> logits`` at ``opset``, as
    ONNX Runtime's optimizer writes a LayerNorm (inputs X, scale, bias; output Y, and with ``statistics`` its mean
    and inverse standard deviation too; an RMSNorm, ``SimplifiedLayerNormalization``, has no bias). ``broken``: the
    last node reads a value nothing produces."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(array.astype(np.float32), name) for name, array in (
        ("w_in", rng.standard_normal((8, HIDDEN)) / 3), ("b_in", rng.standard_normal(HIDDEN)),
        ("gamma", 1 + rng.standard_normal(HIDDEN) / 10), ("beta", rng.standard_normal(HIDDEN) / 10),
        ("w_out", rng.standard_normal((HIDDEN, 4)) / 4))]
    outputs = ["normed", "mean", "inv_std"] if statistics else ["normed"]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["projected"], name="/encoder/dense/MatMul"),
             helper.make_node("Add", ["projected", "b_in"], ["hidden"], name="/encoder/dense/Add"),
             helper.make_node(op, ["hidden", "gamma", "beta"][:2 if op.startswith("Simplified") else 3], outputs,
                              axis=-1, epsilon=1e-12,
                              name="/encoder/LayerNorm/LayerNormalization"),
             helper.make_node("MatMul", ["normed", "w_out"], ["logits"], name="/head/MatMul")]
    if broken:
        nodes[-1].input[1] = "nowhere"
    graph = helper.make_graph(nodes, "optimized", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


@pytest.fixture
def x_npz(tmp_path: Path) -> Path:
    """Validation data for :func:`norm_model`."""
    path = tmp_path / "val.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32))
    return path


def verdict(cli, out: Path) -> dict:
    """``mpexport verify OUT --json``, checked to exit 0."""
    result = cli("verify", out, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    report: dict = json.loads(result.stdout)
    return report


@pytest.mark.parametrize(("opset", "statistics"), [(13, False), (14, True)])
def test_layer_norm_below_opset_17_converts_and_verifies(cli, tmp_path: Path, x_npz: Path, opset: int,
                                                         statistics: bool) -> None:
    model = norm_model(tmp_path / "m.onnx", opset=opset, statistics=statistics)
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for LayerNormalization"):
        onnx.checker.check_model(str(model))  # what convert said before
    out = tmp_path / "out"
    result = cli("convert", model, "--val-data", x_npz, "--out", out)
    assert result.exit_code == 0, result.stderr
    manifest = Bundle.open(out).manifest
    assert manifest.lint is not None and manifest.lint.ok
    plan = {node.op_type: node for node in PrecisionPlan.load(out / "plan.json").nodes}
    norm = plan["LayerNormalization"]
    assert norm.precision == "fp32", norm
    assert "aten.layer_norm" in norm.reason and "FP32" in norm.reason
    assert plan["MatMul"].precision == "fp16"
    mixed = onnx.load(out / "model.mixed.onnx")
    assert {entry.domain: entry.version for entry in mixed.opset_import}[""] == opset  # the model's opset kept
    assert verdict(cli, out)["verdict"] == "pass"


def test_the_note_names_the_op_and_why_it_is_accepted(tmp_path: Path) -> None:
    notes: list[str] = []
    model = read_fp32_onnx(norm_model(tmp_path / "m.onnx", opset=14, statistics=True), notes)
    assert len(notes) == 1, notes
    assert "LayerNormalization (ONNX has it from opset 17, the model's opset is 14)" in notes[0]
    assert "ONNX Runtime" in notes[0]
    norm = next(node for node in model.graph if node.op_type == "LayerNormalization")
    assert [value.dtype for value in norm.outputs] == [onnx.TensorProto.FLOAT] * 3  # typed for the planner
    assert norm.outputs[0].shape is not None and len(norm.outputs[0].shape) == 2
    standard: list[str] = []
    read_fp32_onnx(norm_model(tmp_path / "standard.onnx", opset=17), standard)
    assert standard == []  # a valid model gets no note


def test_an_op_onnx_runtime_registers_but_onnx_never_had_is_read_too(tmp_path: Path) -> None:
    notes: list[str] = []
    read_fp32_onnx(norm_model(tmp_path / "m.onnx", opset=14, op="SimplifiedLayerNormalization"), notes)
    assert "SimplifiedLayerNormalization (not an ONNX op)" in notes[0]


def test_an_op_onnx_runtime_does_not_run_either_is_refused_with_a_hint(cli, tmp_path: Path) -> None:
    model = norm_model(tmp_path / "m.onnx", opset=14, op="RMSNormalization")
    out = tmp_path / "out"
    result = cli("convert", model, "--out", out)
    assert_bad_input(result, "No Op registered for RMSNormalization", "nor does ONNX Runtime load it",
                     "opset 23 or newer")
    assert_nothing_written(out)
    result = cli("convert", norm_model(tmp_path / "n.onnx", opset=14, op="FancyNorm"), "--out", out)
    assert_bad_input(result, "FancyNorm", "nor does ONNX Runtime load it", "before the tool that wrote FancyNorm")


def test_any_other_checker_finding_is_still_refused(cli, tmp_path: Path) -> None:
    model = norm_model(tmp_path / "m.onnx", opset=14, broken=True)
    out = tmp_path / "out"
    assert_bad_input(cli("convert", model, "--out", out), "not a valid ONNX model", "nowhere")
    assert_nothing_written(out)


def test_lint_sets_aside_what_only_onnx_runtime_registers(tmp_path: Path) -> None:
    model = norm_model(tmp_path / "m.onnx", opset=13)
    checks = {check.name: check for check in lint_model(model).checks}
    assert checks["onnx.checker"].status == "pass", checks["onnx.checker"]
    assert "set aside for the ONNX Runtime check: LayerNormalization" in checks["onnx.checker"].detail
    assert checks["onnxruntime"].status == "pass"
    broken = {check.name: check for check in lint_model(norm_model(tmp_path / "b.onnx", opset=13,
                                                                      broken=True)).checks}
    assert broken["onnx.checker"].status == "fail" and "nowhere" in broken["onnx.checker"].detail


def test_setting_aside_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    import onnx_ir as ir

    model = ir.load(str(norm_model(tmp_path / "m.onnx", opset=13)))
    ops = unregistered_ops(model)
    assert [(op.op_type, op.opset, op.since) for op in ops] == [("LayerNormalization", 13, 17)]
    assert check_setting_aside(model, ops, full_check=True) is None
    assert check_setting_aside(model, []) is not None  # the checker's own finding, nothing set aside
    assert {node.domain for node in model.graph} == {""} and set(model.opset_imports) == {""}
    assert all(value.const_value is not None for value in model.graph.initializers.values())


@pytest.fixture(scope="module")
def ort_bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT exported by the TorchScript exporter at opset 14 and optimized by ``onnxruntime.transformers``
    (Attention, SkipLayerNormalization, BiasGelu, and the embedding's LayerNormalization at opset 14), with its
    validation set."""
    from onnxruntime.transformers.optimizer import optimize_model

    from tests.toy_models import TextLogits, bert_config, build_bert

    root = tmp_path_factory.mktemp("ort_bert")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, (24, 12))
    mask = np.ones_like(ids)
    mask[::3, 8:] = 0
    np.savez(root / "val.npz", input_ids=ids, attention_mask=mask)
    names = ["input_ids", "attention_mask"]
    axes = {**{name: {0: "batch", 1: "sequence"} for name in names}, "logits": {0: "batch"}}
    torch.onnx.export(TextLogits(build_bert()), (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
                      str(root / "bert.onnx"), dynamo=False, opset_version=14, input_names=names,
                      output_names=["logits"], dynamic_axes=axes)
    config = bert_config()
    optimized = optimize_model(str(root / "bert.onnx"), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(root / "bert.opt.onnx"))
    return {"model": root / "bert.opt.onnx", "val": root / "val.npz"}


def test_onnx_runtime_optimized_bert_converts_and_verifies(cli, tmp_path: Path, ort_bert: dict[str, Path]) -> None:
    model = onnx.load(ort_bert["model"])
    assert "LayerNormalization" in {node.op_type for node in model.graph.node if node.domain == ""}
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 14
    out = tmp_path / "out"
    result = cli("convert", ort_bert["model"], "--val-data", ort_bert["val"], "--out", out)
    assert result.exit_code == 0, result.stderr
    assert Bundle.open(out).manifest.lint.ok  # type: ignore[union-attr]
    plan = PrecisionPlan.load(out / "plan.json")
    norms = [node for node in plan.nodes if node.op_type == "LayerNormalization"]
    assert norms and all(node.precision == "fp32" and "aten.layer_norm" in node.reason for node in norms), norms
    assert verdict(cli, out)["verdict"] == "pass"

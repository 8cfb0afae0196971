"""verify: backends side by side, the noise-floor gate, the strict emulation that ONNX Runtime's CPU EP
cannot fool, localisation, reports, bad validation data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import mpexport
from mpexport.bundle.store import Bundle
from mpexport.check.verify import verify_candidate
from mpexport.commands.verify import verify
from mpexport.graph.rewrite import apply_plan
from mpexport.precision.options import PlanOptions
from tests.helpers import MODELS, assert_bad_input
from tests.toy_models import build_overflow_hazard


@pytest.mark.parametrize("example", ["digits_resnet", "digits_transformer"])
def test_bundled_examples_pass_with_every_backend_here(cli, tmp_path: Path, example: str) -> None:
    out = tmp_path / example
    assert cli("convert", MODELS / f"{example}.pt2", "--val-data", MODELS / f"{example}.val.npz",
               "--out", out).exit_code == 0
    result = cli("verify", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass" and report["samples"] == 360
    ran = {name for name, info in report["backends"].items() if info["ran"]}
    low = report["backends"].keys() & {"strict-fp16", "strict-bf16"}
    assert {"torch-fp32", "torch-amp", "onnx-fp32"} <= ran and low <= ran and low
    assert "onnx-mixed" in report["backends"]  # ran, or skipped with the reason (no BF16 Conv on ORT's CPU EP)
    accuracy = report["metrics"][next(iter(low))]["output"]["accuracy"]
    assert abs(accuracy - report["backends"]["torch-fp32"]["accuracy"]) <= 0.01
    manifest = Bundle.open(out).manifest
    assert manifest.artifacts["report"].file == "report.json" and manifest.verify.verdict == "pass"
    assert manifest.verify.forms[next(iter(low))]["state"] == "ran"
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "PASS" in page


@pytest.fixture(scope="module")
def hazard(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The overflow-hazard model as .pt2, its data, mpexport's conversion and a naive all-FP16 conversion."""
    root = tmp_path_factory.mktemp("hazard")
    model = build_overflow_hazard()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, root / "hazard.pt2")
    np.savez(root / "val.npz", x=x.numpy())
    out = root / "mpexport"
    mpexport.convert(root / "hazard.pt2", out=out, val_data=root / "val.npz",
                     plan_options=PlanOptions(policy="cuda-fp16"))
    naive = ir.load(str(out / "model.fp32.onnx"))
    apply_plan(naive, {node.name: "fp16" for node in naive.graph
                       if any(v.dtype == ir.DataType.FLOAT for v in node.outputs)})
    ir.save(naive, root / "naive.onnx")
    return {"pt2": root / "hazard.pt2", "val": root / "val.npz", "out": out, "naive": root / "naive.onnx"}


def test_naive_fp16_fails_through_strict_emulation_though_ort_cpu_agrees(hazard: dict[str, Path]) -> None:
    report = verify_candidate(hazard["pt2"], hazard["naive"], hazard["val"])
    assert report.verdict == "fail"
    plain = report.metrics["onnx-candidate"]["output"]
    strict = report.metrics["strict-fp16"]["output"]
    assert plain.nonfinite == 0 and plain.min_cosine > 0.999  # ONNX Runtime's CPU EP hides the overflow
    assert strict.min_cosine < 0.99  # true FP16 storage does not
    assert any(failure.startswith("strict-fp16") for failure in report.failures)
    assert not any(failure.startswith("onnx-candidate") for failure in report.failures)
    first = report.localisation[0]  # on the worst sample: its x**2 overflows, or their sum in the mean does
    assert first["op_type"] in ("Pow", "ReduceMean") and first["nonfinite"] > 0, report.localisation


def test_policy_plan_of_the_same_model_passes(cli, hazard: dict[str, Path]) -> None:
    plan = json.loads((hazard["out"] / "plan.json").read_text())
    assert {n["precision"] for n in plan["nodes"] if n["op_type"] in ("Pow", "ReduceMean", "Sqrt")} == {"fp32"}
    result = cli("verify", hazard["out"], "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["verdict"] == "pass"


def test_candidate_cli_exit_code_and_localisation(cli, hazard: dict[str, Path]) -> None:
    result = cli("verify", "--reference", hazard["pt2"], "--candidate", hazard["naive"], "--val-data", hazard["val"])
    assert result.exit_code == 1
    assert "fail: strict-fp16" in result.stdout and "first out of budget" in result.stdout


def test_an_fp32_onnx_judges_another_converters_model(cli, hazard: dict[str, Path]) -> None:
    """No PyTorch model: the FP32 ONNX the candidate came from is the reference, its training emulation the noise
    floor, and the same gate passes mpexport's model and fails the naive one."""
    fp32 = hazard["out"] / "model.fp32.onnx"
    passed = cli("verify", "--reference", fp32, "--candidate", hazard["out"] / "model.mixed.onnx", "--val-data",
                 hazard["val"], "--json")
    assert passed.exit_code == 0, passed.stdout + passed.stderr
    report = json.loads(passed.stdout)
    assert report["reference"] == "onnx-fp32" and report["backends"]["onnx-amp"]["state"] == "ran"
    assert {"onnx-candidate", "strict-fp16"} <= {name for name, info in report["backends"].items() if info["ran"]}
    assert all("onnx-amp noise floor" in limits["source"] for limits in report["thresholds"]["strict-fp16"].values())
    failed = cli("verify", "--reference", fp32, "--candidate", hazard["naive"], "--val-data", hazard["val"])
    assert failed.exit_code == 1 and "fail: strict-fp16" in failed.stdout
    assert_bad_input(cli("verify", "--reference", hazard["naive"], "--candidate", hazard["naive"], "--val-data",
                         hazard["val"]), "not an FP32 model")


def test_explicit_thresholds_override_the_budget(hazard: dict[str, Path]) -> None:
    from mpexport.check.report import VerifyOptions

    report = verify(hazard["out"], options=VerifyOptions(atol=1e-9), write=False)
    assert report.verdict == "fail"
    assert all("explicit thresholds override" in limits["source"]
               for backend, outputs in report.thresholds.items() if backend != "onnx-fp32"
               for limits in outputs.values())


GOOD = np.zeros((8, 1, 8, 8), np.float32)


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"image": GOOD}, "missing pixels"),
        ({"pixels": np.zeros((8, 1, 8, 9), np.float32)}, "has shape"),
        ({"pixels": GOOD.astype(np.int32)}, "has dtype int32"),
        ({"pixels": np.full((8, 1, 8, 8), np.inf, np.float32)}, "NaN/Inf"),
        ({"pixels": np.zeros((0, 1, 8, 8), np.float32)}, "no samples"),
    ],
)
def test_verify_bad_validation_data(cli, tmp_path: Path, arrays: dict, fragment: str) -> None:
    out = tmp_path / "m"
    assert cli("convert", MODELS / "digits_resnet.pt2", "--out", out, "--input", "pixels:batch,1,8,8").exit_code == 0
    val = tmp_path / "val.npz"
    np.savez(val, **arrays)
    assert_bad_input(cli("verify", out, "--val-data", val), fragment)
    assert not (out / "report.json").exists()


def test_verify_without_data_and_usage_errors(cli, tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert cli("convert", MODELS / "digits_resnet.pt2", "--out", out, "--input", "pixels:batch,1,8,8").exit_code == 0
    assert_bad_input(cli("verify", out), "no validation data")
    assert cli("verify").exit_code == 2


@pytest.mark.parametrize("source", ["tests.valdata_sources:digits_loader", "tests.valdata_sources:digits_dicts"])
def test_validation_data_from_a_function(cli, tmp_path: Path, source: str) -> None:
    out = tmp_path / "m"
    result = cli("convert", MODELS / "digits_resnet.pt2", "--val-data", source, "--out", out)
    assert result.exit_code == 0, result.stderr
    assert Bundle.open(out).manifest.export_check.comparison["samples"] == 256  # the default --check-samples
    # the manifest records the function, but never runs it on its own: the command line names it again
    assert_bad_input(cli("verify", out), "came from code", f"--val-data {source}")
    report = cli("verify", out, "--val-data", source, "--json")
    assert report.exit_code == 0, report.stdout
    data = json.loads(report.stdout)
    assert data["samples"] == 360 and data["data"] == source
    assert data["backends"]["torch-fp32"]["accuracy"] == pytest.approx(0.9944, abs=1e-3)


@pytest.mark.parametrize(
    ("source", "fragment"),
    [("tests.valdata_sources:nothing", "yielded no batches"), ("tests.valdata_sources:broken", "unreachable"),
     ("tests.valdata_sources:missing", "has no attribute"), ("no_such_module:f", "does not import")],
)
def test_bad_validation_functions(cli, tmp_path: Path, source: str, fragment: str) -> None:
    out = tmp_path / "m"
    assert_bad_input(cli("convert", MODELS / "digits_resnet.pt2", "--val-data", source, "--out", out), fragment)
    assert not out.exists()


def _with_low_precision_branch(source: Path, target: Path) -> None:
    """``source`` with its output passed through an If whose branch rounds it through FP16: a model the strict
    emulation cannot vouch for (it rounds the main graph only)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(source))
    output = model.graph.output[0]
    inner = output.name + "_inner"
    for node in model.graph.node:
        node.output[:] = [inner if name == output.name else name for name in node.output]
    shape = [dim.dim_param or dim.dim_value for dim in output.type.tensor_type.shape.dim]
    then_branch = helper.make_graph(
        [helper.make_node("Cast", [inner], ["low"], to=TensorProto.FLOAT16, name="branch_down"),
         helper.make_node("Cast", ["low"], ["back"], to=TensorProto.FLOAT, name="branch_up")],
        "then", [], [helper.make_tensor_value_info("back", TensorProto.FLOAT, shape)])
    else_branch = helper.make_graph([helper.make_node("Identity", [inner], ["same"], name="branch_same")],
                                    "else", [], [helper.make_tensor_value_info("same", TensorProto.FLOAT, shape)])
    model.graph.node.extend([
        helper.make_node("Constant", [], ["flag"], value=helper.make_tensor("flag", TensorProto.BOOL, [], [True]),
                         name="flag"),
        helper.make_node("If", ["flag"], [output.name], then_branch=then_branch, else_branch=else_branch,
                         name="branch")])
    onnx.save(model, str(target))


def test_a_strict_emulation_that_cannot_be_built_fails_the_verdict(cli, hazard: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    candidate = tmp_path / "branchy.onnx"
    _with_low_precision_branch(hazard["naive"], candidate)
    result = cli("verify", "--reference", hazard["pt2"], "--candidate", candidate, "--val-data", hazard["val"],
                 "--json")
    assert result.exit_code == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "fail" and report["backends"]["strict-fp16"]["state"] == "failed"
    assert "inside the subgraph of 'branch'" in report["backends"]["strict-fp16"]["why"]
    assert any(line.startswith("strict-fp16: could not be built") for line in report["failures"])
    assert report["backends"]["onnx-candidate"]["state"] == "ran"  # ONNX Runtime itself runs it


def test_strict_emulation_rounds_low_precision_constants() -> None:
    """An FP16 Constant (other converters write them) is computed in FP32 and rounded like every FP16 value."""
    import onnx
    from onnx import TensorProto, helper

    from mpexport.backends.onnxruntime import OrtRunner
    from mpexport.graph.emulate import strict_emulation

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="down"),
         helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.array(60000, np.float16)),
                          name="big"),
         helper.make_node("Add", ["x16", "c"], ["s"], name="add"),
         helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT, name="up")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    strict = strict_emulation(model)
    constant = next(node for node in strict.graph if node.op_type == "Constant")
    assert constant.attributes["value"].value.dtype == ir.DataType.FLOAT  # ONNX Runtime would refuse FP16 + FP32
    (y,) = OrtRunner.from_model(strict, ".", name="strict").run({"x": np.array([1.0, 10000.0], np.float32)})
    assert y[0] == 60000.0 and np.isinf(y[1])  # 70000 is beyond FP16: the rounding says so


def test_localisation_in_directory_mode_names_node_module_reason_and_value(cli, hazard: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """A plan that forces the hazard's Pow into FP16: verify fails, and its localisation names the node, the
    module, the plan's reason and what was observed."""
    out = tmp_path / "forced"
    assert cli("convert", hazard["pt2"], "--val-data", hazard["val"], "--amp-policy", "cuda-fp16",
               "--force-low-op", "Pow", "--out", out).exit_code == 0
    result = cli("verify", out, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    first = report["localisation"][0]  # on the worst sample: x**2 (forced FP16) overflows, or the FP16 mean after it
    assert first["op_type"] in ("Pow", "ReduceMean") and first["precision"] == "fp16" and first["module"] == ""
    assert first["reason"].startswith("override: op Pow forced to low precision" if first["op_type"] == "Pow"
                                      else "propagate: aten.mean.dim")
    assert re.fullmatch(r"(output reached [0-9.e+]+ > 65504, the FP16 max|\d+ values became non-finite in FP16 "
                        r"\(FP32 reaches [0-9.e+]+\))", first["observed"]), first
    assert first["nonfinite"] > 0 and report["localised_on"]["sample"] is not None
    text = cli("verify", out)
    assert "first out of budget" in text.stdout and first["observed"] in text.stdout


def test_observed_values_in_words() -> None:
    from mpexport.check.localise import _observed

    assert _observed(3, 0.0, 9.1e4, "fp16") == "output reached 9.1e+04 > 65504, the FP16 max"
    assert _observed(2, 0.0, 4.4e3, "fp16") == "2 values became non-finite in FP16 (FP32 reaches 4.4e+03)"
    assert _observed(0, 0.2, 1.5, "bf16") == "error 20.0% of the output's scale 1.5"


def test_native_io_types_convert_then_verify(cli, tmp_path: Path) -> None:
    """--io-types native: the mixed model takes and returns the low type; verify feeds it the FP32 data cast to
    its input types (the reference gets FP32) and passes."""
    import onnx

    out = tmp_path / "native"
    assert cli("convert", MODELS / "digits_transformer.pt2", "--val-data", MODELS / "digits_transformer.val.npz",
               "--io-types", "native", "--out", out).exit_code == 0
    graph = onnx.load(str(out / "model.mixed.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    result = cli("verify", out)
    assert result.exit_code == 0, result.stdout


def test_localisation_says_why_when_it_cannot_run(hazard: dict[str, Path], tmp_path: Path) -> None:
    from mpexport.check.localise import localise

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with np.load(hazard["val"]) as data:
        batch = {"x": data["x"][:4]}
    rows, note = localise(hazard["out"] / "model.fp32.onnx", broken, batch, {})
    assert rows == [] and note.startswith("localisation could not run:")
    rows, note = localise(hazard["out"] / "model.fp32.onnx", hazard["out"] / "model.mixed.onnx", batch, {})
    assert rows == [] and "found no single node out of budget" in note  # the policy's plan is sound here


class Wide(torch.nn.Module):
    """A 2 MB linear layer: large enough for onnx-fp32 to run on the PyTorch weight in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 8192)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.fc(pixels.flatten(1))


def test_onnx_fp32_runs_on_the_pytorch_parameters_in_place(tmp_path: Path, pixels_npz: Path) -> None:
    from mpexport.bundle.names import FP32_ONNX
    from mpexport.bundle.store import Bundle
    from mpexport.check.registry import shared_parameters

    torch.manual_seed(0)
    module = Wide().eval()
    program = torch.export.export(module, (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "wide.pt2")
    mpexport.convert(tmp_path / "wide.pt2", out=tmp_path / "out", val_data=pixels_npz)
    loaded = torch.export.load(tmp_path / "wide.pt2").module()
    shared = shared_parameters(loaded, Bundle.open(tmp_path / "out").path(FP32_ONNX))
    assert list(shared) == ["fc.weight"]
    assert np.shares_memory(shared["fc.weight"], loaded.state_dict()["fc.weight"].numpy())
    report = mpexport.verify(tmp_path / "out", write=False)
    assert report.verdict == "pass"
    assert report.metrics["onnx-fp32"]["output"].max_abs < 1e-5


def test_low_memory_sessions_compute_what_the_optimized_ones_do(tmp_path: Path) -> None:
    """Large models run onnx-mixed and the strict emulation unoptimized and without ONNX Runtime's arena."""
    from mpexport.backends.onnxruntime import OrtRunner
    from mpexport.bundle.names import MIXED_ONNX
    from mpexport.graph.emulate import load_strict_emulation

    out = tmp_path / "t"
    mpexport.convert(MODELS / "digits_transformer.pt2", out=out, val_data=MODELS / "digits_transformer.val.npz",
                     plan_options=PlanOptions(policy="cuda-fp16"))
    mixed = Bundle.open(out).path(MIXED_ONNX)
    with np.load(MODELS / "digits_transformer.val.npz") as data:
        batch = {"pixels": data["pixels"][:32]}
    for build in (lambda low: OrtRunner(mixed, name="m", low_memory=low),
                  lambda low: OrtRunner.from_model(load_strict_emulation(mixed), mixed.parent, name="s",
                                                   low_memory=low)):
        fast, small = build(False).run(batch)[0], build(True).run(batch)[0]
        np.testing.assert_allclose(small, fast, rtol=1e-3, atol=1e-3)


def test_low_memory_sessions_share_one_mapped_copy_of_the_weights(tmp_path: Path) -> None:
    """A large model's onnx-mixed and strict sessions use the weights in its external data file in place."""
    from mpexport.backends.onnxruntime import OrtRunner, mapped_weights
    from mpexport.bundle.names import MIXED_ONNX
    from mpexport.graph.emulate import load_strict_emulation

    out = tmp_path / "t"
    mpexport.convert(MODELS / "digits_transformer.pt2", out=out, val_data=MODELS / "digits_transformer.val.npz",
                     plan_options=PlanOptions(policy="cuda-fp16"))
    external = tmp_path / "external.onnx"
    ir.save(ir.load(str(Bundle.open(out).path(MIXED_ONNX))), external, external_data="external.onnx.data",
            size_threshold_bytes=256)
    weights = mapped_weights(external, smallest=0)
    stored = {name: value.const_value.numpy() for name, value in ir.load(str(external)).graph.initializers.items()}
    assert np.dtype(np.float16) in {array.dtype for array in weights.values()} <= {np.dtype(np.float16),
                                                                                    np.dtype(np.float32)}
    for name, array in weights.items():
        assert np.array_equal(array, stored[name])
        base = array
        while base is not None and not isinstance(base, np.memmap):
            base = base.base
        assert base is not None, name  # a view of the file, not a copy
    with np.load(MODELS / "digits_transformer.val.npz") as data:
        batch = {"pixels": data["pixels"][:32]}
    for build in (lambda shared: OrtRunner(external, name="m", low_memory=True, shared_weights=shared),
                  lambda shared: OrtRunner.from_model(load_strict_emulation(external), tmp_path, name="s",
                                                      low_memory=True, shared_weights=shared)):
        assert np.array_equal(build(weights).run(batch)[0], build(None).run(batch)[0])


def test_strict_emulation_widens_each_weight_right_before_its_first_user(tmp_path: Path) -> None:
    """Unoptimized sessions run the graph's order: the FP32 copies of FP16 weights are made when needed."""
    from mpexport.bundle.names import MIXED_ONNX
    from mpexport.graph.emulate import load_strict_emulation

    out = tmp_path / "t"
    mpexport.convert(MODELS / "digits_transformer.pt2", out=out, val_data=MODELS / "digits_transformer.val.npz",
                     plan_options=PlanOptions(policy="cuda-fp16"))
    nodes = list(load_strict_emulation(Bundle.open(out).path(MIXED_ONNX)).graph)
    widens = [index for index, node in enumerate(nodes) if node.name.endswith("__widen")]
    assert len(widens) > 3 and widens != list(range(len(widens)))  # spread through the graph, not all at the top
    for index in widens:
        first_user = min(nodes.index(user) for user, _ in nodes[index].outputs[0].uses())
        assert all(node.name.endswith("__widen") for node in nodes[index + 1:first_user])


def test_a_fixed_batch_candidate_is_judged_on_every_sample(tmp_path: Path) -> None:
    """A candidate exported with batch 1 is fed batches of 1 (whatever --batch-size says), every sample counted once."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    model = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    np.savez(tmp_path / "val.npz", x=np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32))
    report = verify_candidate(model, model, tmp_path / "val.npz")
    assert report.passed and report.samples == 5
    assert any("fixes its batch size at 1" in note for note in report.notes)

"""Every command-line option has a test that fails if the option is ignored (the ones other test files do not
already exercise)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mpexport.bundle.store import Bundle
from mpexport.precision.plan import read_plan
from tests.helpers import MODELS, stand_in_builder

TRANSFORMER, VAL = MODELS / "digits_transformer.pt2", MODELS / "digits_transformer.val.npz"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled transformer converted with the defaults (its training record: cpu-fp16)."""
    from click.testing import CliRunner

    from mpexport.cli import main

    out = tmp_path_factory.mktemp("options") / "base"
    result = CliRunner().invoke(main, ["convert", str(TRANSFORMER), "--val-data", str(VAL), "--out", str(out)])
    assert result.exit_code == 0
    return out


def test_convert_plan_and_data_pass_options(cli, base: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    result = cli("convert", TRANSFORMER, "--val-data", VAL, "--out", out, "--opset", "21",
                 "--keep-fp32-module", r"^blocks\.1\.attn$", "--force-low-module", r"^blocks\.0\.norm1$",
                 "--calibration-samples", "64", "--check-samples", "100")
    assert result.exit_code == 0, result.stderr
    manifest, plan = Bundle.open(out).manifest, read_plan(Bundle.open(out))
    default = read_plan(Bundle.open(base))
    assert manifest.export.opset == 21 and Bundle.open(base).manifest.export.opset != 21
    kept = [node for node in plan.nodes if node.module == "blocks.1.attn" and node.precision != "none"]
    assert kept and all(node.precision == "fp32" and node.rule == "override" for node in kept)
    assert any(node.precision == "fp16" for node in default.nodes if node.module == "blocks.1.attn")
    forced = [node for node in plan.nodes if node.module == "blocks.0.norm1" and node.precision != "none"]
    assert forced and all(node.precision == "fp16" and node.rule == "override" for node in forced)
    assert any(node.precision == "fp32" for node in default.nodes if node.module == "blocks.0.norm1")
    assert plan.calibration_samples == 64 and default.calibration_samples == 256
    assert manifest.export_check.comparison["samples"] == 100


def test_convert_target(cli, tmp_path: Path) -> None:
    out = tmp_path / "m"
    assert cli("convert", TRANSFORMER, "--val-data", VAL, "--out", out, "--target", "bf16").exit_code == 0
    plan = read_plan(Bundle.open(out))
    assert plan.policy.name == "cpu-fp16" and plan.options.low == "bf16"  # trained fp16, deployed bf16
    assert {node.precision for node in plan.nodes if node.op_type == "MatMul"} == {"bf16"}


@pytest.mark.parametrize(("options", "check"), [
    (["--budget-factor", "7"], lambda limits, report: limits["source"].startswith("7 x the torch-amp noise floor")),
    (["--atol", "0.5"], lambda limits, report: limits["atol"] == 0.5),
    (["--min-cosine", "0.9"], lambda limits, report: limits["min_cosine"] == 0.9),
    (["--max-top1-drop", "0.2"], lambda limits, report: limits["min_top1_agreement"] == pytest.approx(0.8)),
    (["--max-samples", "50"], lambda limits, report: report["samples"] == 50),
    (["--max-samples", "50", "--batch-size", "7"], lambda limits, report: report["batches"] == 8),
])
def test_verify_gate_and_batching_options(cli, base: Path, defaults: dict, options: list[str], check: Any) -> None:
    result = cli("verify", base, "--json", *options)
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert check(report["thresholds"]["strict-fp16"]["output"], report), report["thresholds"]["strict-fp16"]
    assert not check(defaults["thresholds"]["strict-fp16"]["output"], defaults)  # the default differs


@pytest.fixture(scope="module")
def defaults(base: Path) -> dict:
    """verify's report with every option at its default."""
    from click.testing import CliRunner

    from mpexport.cli import main

    return json.loads(CliRunner().invoke(main, ["verify", str(base), "--json"]).stdout)


def test_verify_candidate_low_type(cli, base: Path) -> None:
    result = cli("verify", "--reference", TRANSFORMER, "--candidate", base / "model.mixed.onnx", "--val-data", VAL,
                 "--low", "bf16", "--amp-policy", "cpu-fp16", "--json")
    assert result.exit_code in (0, 1)
    backends = json.loads(result.stdout)["backends"]
    assert "strict-bf16" in backends and "strict-fp16" not in backends


def test_inspect_nodes(cli, base: Path) -> None:
    plain, with_nodes = cli("inspect", base).stdout, cli("inspect", base, "--nodes").stdout
    name = read_plan(Bundle.open(base)).nodes[0].name
    assert name in with_nodes and name not in plain


def test_package_name(cli, base: Path, tmp_path: Path) -> None:
    assert cli("verify", base).exit_code == 0
    assert cli("package", base, "--out", tmp_path / "repo", "--name", "digits").exit_code == 0
    assert (tmp_path / "repo" / "digits" / "config.pbtxt").read_text().startswith('name: "digits"')


@pytest.fixture
def recording_builder(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """TensorRT cannot run here: convert's and build's engine stage get an available status and the stand-in
    builder, which records the arguments the options turned into."""
    from mpexport.commands import build as engine_command
    from mpexport.commands import convert as conversion
    from mpexport.deploy import tensorrt as engine

    calls: list[dict[str, Any]] = []

    def builder(onnx_path: Path, out_dir: Path, profiles: dict, plan: dict, **kwargs: Any) -> Any:
        calls.append({"profiles": profiles, **kwargs})
        return stand_in_builder(onnx_path, out_dir, profiles, plan)

    available = engine.TensorRTStatus(True, "10.13.0", "stand-in GPU", "9.0")
    for module in (conversion, engine_command):
        monkeypatch.setattr(module, "tensorrt_status", lambda: available)
        monkeypatch.setattr(module, "build_engine", builder)
    return calls


def test_engine_options_reach_the_builder(cli, base: Path, tmp_path: Path,
                                          recording_builder: list[dict[str, Any]]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert cli("build", copy, "--shapes", "pixels:1x1x8x8,16x1x8x8,32x1x8x8", "--allow-tf32",
               "--workspace-gb", "0.5").exit_code == 0
    call = recording_builder[-1]
    assert call["profiles"] == {"pixels": ((1, 1, 8, 8), (16, 1, 8, 8), (32, 1, 8, 8))}
    assert call["allow_tf32"] is True and call["workspace"] == 1 << 29
    assert cli("build", copy).exit_code == 0  # defaults: profiles from the recorded data, TF32 off, 4 GB
    call = recording_builder[-1]
    assert call["allow_tf32"] is False and call["workspace"] == 4 << 30
    assert call["profiles"]["pixels"][2][0] == 64  # the largest validation batch seen

    out = tmp_path / "converted"
    assert cli("convert", TRANSFORMER, "--val-data", VAL, "--out", out, "--engine", "on", "--allow-tf32",
               "--shapes", "pixels:1x1x8x8,2x1x8x8,4x1x8x8").exit_code == 0
    call = recording_builder[-1]
    assert call["allow_tf32"] is True and call["profiles"]["pixels"][2] == (4, 1, 8, 8)
    assert Bundle.open(out).manifest.engine.tensorrt == "10.13.0"

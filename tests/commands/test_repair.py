"""repair: a trap that only breaks on late samples, localised there and repaired with a few nodes of one module;
modules first then nodes, determinism, exit codes, an impossible case, a bundle with an engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mpexport.bundle.names import ENGINE
from mpexport.bundle.store import Bundle
from mpexport.precision.plan import read_plan
from tests.helpers import assert_bad_input
from tests.toy_models import build_rare_overflow, rare_overflow_data


@pytest.fixture(scope="module")
def trap(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """RareOverflow trained under cuda-bf16, converted for FP16: the last 40 of 320 samples overflow FP16."""
    from click.testing import CliRunner

    from mpexport.cli import main

    root = tmp_path_factory.mktemp("trap")
    x = rare_overflow_data()
    program = torch.export.export(build_rare_overflow(), (torch.from_numpy(x[:2]),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, root / "trap.pt2")
    np.savez(root / "val.npz", x=x)
    out = root / "out"
    result = CliRunner().invoke(main, ["convert", str(root / "trap.pt2"), "--val-data", str(root / "val.npz"),
                                       "--amp-policy", "cuda-bf16", "--target", "fp16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {"pt2": root / "trap.pt2", "val": root / "val.npz", "out": out}


@pytest.fixture
def bundle_copy(trap: dict[str, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(trap["out"], copy)
    return copy


def test_the_trap_is_localised_on_late_samples_and_repaired_within_one_module(cli, bundle_copy: Path,
                                                                              trap: dict[str, Path]) -> None:
    assert read_plan(Bundle.open(bundle_copy)).calibration_samples == 256  # calibration never saw the rare samples
    failed = cli("verify", bundle_copy, "--json")
    assert failed.exit_code == 1
    report = json.loads(failed.stdout)
    assert report["backends"]["onnx-mixed"]["state"] == "ran" and not any(
        line.startswith("onnx-mixed") for line in report["failures"])  # ONNX Runtime's CPU kernels hide it
    assert report["localised_on"]["sample"] >= 280  # the failing samples, not the first batch
    first = report["localisation"][0]
    assert first["module"] == "blocks.1" and first["op_type"] == "Mul"
    assert first["observed"].startswith("output reached") and "65504, the FP16 max" in first["observed"]

    repaired = cli("repair", bundle_copy, "--json")
    assert repaired.exit_code == 0, repaired.stdout + repaired.stderr
    record = json.loads(repaired.stdout)
    assert record["status"] == "repaired" and 1 <= len(record["nodes"]) <= 3
    bundle = Bundle.open(bundle_copy)
    plan = read_plan(bundle)
    modules = {plan_node.module for plan_node in plan.nodes if plan_node.name in record["nodes"]}
    assert all(module.startswith("blocks.1") for module in modules), modules
    assert record["macs"]["low_precision_share_after"] >= 0.8 and record["macs"]["moved_to_fp32"] > 0
    assert record["trials"] >= 2 and record["trials_per_second"] > 0
    repair_nodes = [node for node in plan.nodes if node.rule == "repair"]
    assert sorted(node.name for node in repair_nodes) == sorted(record["nodes"])
    assert all("to fix 'strict-fp16: output 'output' has" in node.reason for node in repair_nodes)
    assert bundle.manifest.verify.verdict == "pass" and bundle.staleness(bundle.manifest.verify) is None
    assert bundle.manifest.repair["nodes"] == record["nodes"]
    assert json.loads((bundle_copy / "report.json").read_text())["repair"]["nodes"] == record["nodes"]
    assert cli("verify", bundle_copy).exit_code == 0
    assert "repair: " in cli("inspect", bundle_copy).stdout

    # the policy file reproduces the repaired precisions through convert
    again = bundle_copy.parent / "again"
    assert cli("convert", trap["pt2"], "--val-data", trap["val"], "--policy", bundle_copy / "repair.policy.toml",
               "--out", again).exit_code == 0
    assert read_plan(Bundle.open(again)).precisions() == plan.precisions()


def test_modules_first_then_single_nodes(cli, bundle_copy: Path, trap: dict[str, Path], tmp_path: Path) -> None:
    record = json.loads(cli("repair", bundle_copy, "--json").stdout)
    tried = record["tried"]
    assert tried[0].startswith("trial 1: + module 'blocks.1'") and tried[0].endswith("pass")
    module_size = int(tried[0].split("(")[1].split(" nodes")[0])
    assert len(record["nodes"]) < module_size  # refined to nodes inside the module
    # 1-minimal, checked end to end: without any one of its nodes, convert + verify fails
    policy = (bundle_copy / "repair.policy.toml").read_text()
    for node in record["nodes"]:
        rest = [name for name in record["nodes"] if name != node]
        smaller = tmp_path / f"without-{node}.toml"
        assert json.dumps(record["nodes"]) in policy
        smaller.write_text(policy.replace(json.dumps(record["nodes"]), json.dumps(rest)))
        out = tmp_path / f"without-{node}"
        assert cli("convert", trap["pt2"], "--val-data", trap["val"], "--policy", smaller, "--out", out).exit_code == 0
        assert cli("verify", out).exit_code == 1, node


def test_repair_is_deterministic(cli, trap: dict[str, Path], tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        copy = tmp_path / name
        shutil.copytree(trap["out"], copy)
        assert cli("repair", copy).exit_code == 0
        results.append(((copy / "plan.json").read_bytes(), (copy / "model.mixed.onnx").read_bytes(),
                        json.loads((copy / "repair.json").read_text())["nodes"]))
    assert results[0] == results[1]


def test_exit_codes(cli, bundle_copy: Path, tmp_path: Path) -> None:
    assert_bad_input(cli("repair", tmp_path / "nowhere"), "not an mpexport output directory")
    assert cli("repair", bundle_copy).exit_code == 0
    again = cli("repair", bundle_copy)
    assert again.exit_code == 0 and "nothing to repair" in again.stdout


def test_an_impossible_budget_is_exit_1_and_changes_nothing(cli, bundle_copy: Path) -> None:
    """A budget no model can meet (a cosine above 1), so not even the all-FP32 plan: no precision change helps, and
    repair never loosens it."""
    before = (bundle_copy / "manifest.json").read_bytes()
    result = cli("repair", bundle_copy, "--min-cosine", "2")  # no output can be closer than identical
    assert result.exit_code == 1
    assert "not a precision problem" in result.stdout and "every low-precision node FP32" in result.stdout
    assert (bundle_copy / "manifest.json").read_bytes() == before
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(".mpexport-tmp-")]


def test_a_bundle_with_an_engine_never_ships_it_unverified(cli, bundle_copy: Path, tmp_path: Path) -> None:
    from mpexport.commands.build import build
    from tests.helpers import stand_in_builder

    build(bundle_copy, shapes={"x": ((1, 16), (8, 16), (64, 16))}, builder=stand_in_builder)
    result = cli("repair", bundle_copy)
    assert result.exit_code == 0 and "the engine was built from the model before the repair" in result.stdout
    bundle = Bundle.open(bundle_copy)
    assert "plan.json was rewritten by mpexport repair" in bundle.staleness(bundle.manifest.engine)
    assert not bundle.covered(bundle.manifest.verify, ENGINE)
    assert_bad_input(cli("package", bundle_copy, "--out", tmp_path / "repo"), "engine that verify did not check")


def test_a_repair_that_moves_most_of_the_work_to_fp32_is_not_committed(cli, bundle_copy: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Here the repair keeps 84% of the MACs low; with the bar raised above that it is "too costly": exit 1,
    the set named, nothing written (and --allow-costly commits it)."""
    from mpexport.commands import repair

    monkeypatch.setattr(repair, "MIN_KEPT_SHARE", 0.95)
    before = (bundle_copy / "manifest.json").read_bytes()
    result = cli("repair", bundle_copy)
    assert result.exit_code == 1 and "not committed: the set that passes moves" in result.stdout and "node_mul_15" in \
        result.stdout
    assert (bundle_copy / "manifest.json").read_bytes() == before
    assert cli("repair", bundle_copy, "--allow-costly").exit_code == 0


def test_max_trials_and_verify_repair(cli, bundle_copy: Path, trap: dict[str, Path], tmp_path: Path) -> None:
    stopped = cli("repair", bundle_copy, "--max-trials", "2")
    assert stopped.exit_code == 1 and "stopped after 2 trials" in stopped.stdout
    assert not (bundle_copy / "repair.json").exists()
    result = cli("verify", bundle_copy, "--repair")
    assert result.exit_code == 0 and "FAIL" in result.stdout and "repaired" in result.stdout
    assert (bundle_copy / "repair.json").exists() and Bundle.open(bundle_copy).manifest.verify.verdict == "pass"


def test_a_bundle_converted_from_onnx_is_repaired_against_its_fp32_onnx(cli, tmp_path: Path) -> None:
    """No PyTorch model: the trials and the confirmation compare with onnx-fp32 (the TorchScript exporter's ONNX
    of the same trap; its plan comes from op types and module scopes)."""
    x = rare_overflow_data()
    np.savez(tmp_path / "val.npz", x=x)
    torch.onnx.export(build_rare_overflow(), (torch.from_numpy(x[:2]),), str(tmp_path / "trap.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["output"],
                      dynamic_axes={"x": {0: "batch"}, "output": {0: "batch"}})
    out = tmp_path / "out"
    assert cli("convert", tmp_path / "trap.onnx", "--val-data", tmp_path / "val.npz", "--amp-policy", "cuda-bf16",
               "--target", "fp16", "--out", out).exit_code == 0
    assert cli("verify", out).exit_code == 1
    repaired = cli("repair", out, "--json")
    assert repaired.exit_code == 0, repaired.stdout + repaired.stderr
    record = json.loads(repaired.stdout)
    assert record["status"] == "repaired" and 1 <= len(record["nodes"]) <= 3
    plan = read_plan(Bundle.open(out))
    assert all(node.module.startswith("blocks.1") for node in plan.nodes if node.rule == "repair")
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == "pass" and report["reference"] == "onnx-fp32"

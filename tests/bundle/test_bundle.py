"""The bundle: one typed record of a converted model. Hashes checked on open, atomic commits, verdicts that
turn stale when what they covered changes, old manifests read, temporaries of dead commands swept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpexport.base.errors import MpexportError
from mpexport.bundle.names import ENGINE, ENGINE_LAYERS, FP32_ONNX, MIXED_ONNX, PLAN, TEMP_PREFIX, TIMING_CACHE
from mpexport.bundle.records import MANIFEST_VERSION, Manifest, VerifyRecord
from mpexport.bundle.store import Bundle
from mpexport.commands.build import build
from mpexport.deploy.tensorrt import ENGINE_FILE
from mpexport.precision.plan import PrecisionPlan, read_plan
from tests.helpers import MODELS, REPO, assert_bad_input, stand_in_builder

SHAPES = {"pixels": ((1, 1, 8, 8), (8, 1, 8, 8), (64, 1, 8, 8))}


@pytest.fixture
def bundle_copy(verified: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(verified, copy)
    return copy


def test_manifest_round_trips_as_typed_records(verified: Path) -> None:
    bundle = Bundle.open(verified, uses=(FP32_ONNX, MIXED_ONNX, PLAN))
    manifest = bundle.manifest
    assert manifest.manifest_version == MANIFEST_VERSION and manifest.revision == 2
    assert [event.command for event in manifest.history] == ["convert", "verify"]
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
    assert isinstance(read_plan(bundle), PrecisionPlan) and read_plan(bundle).options.low == "fp16"
    assert bundle.staleness(manifest.verify) is None and bundle.covered(manifest.verify, MIXED_ONNX)
    assert {stage.stage for stage in manifest.stages["verify"]} >= {"open", "load", "backends", "passes"}
    assert all(stage.seconds >= 0 and stage.peak_rss_mb for stage in manifest.stages["convert"]
               if stage.status == "ran")


@pytest.mark.parametrize("command", ["verify", "build", "package", "inspect"])
def test_a_modified_artifact_is_refused_naming_the_file(cli, bundle_copy: Path, tmp_path: Path, command: str) -> None:
    path = bundle_copy / "model.mixed.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    args = {"verify": ("verify", bundle_copy), "build": ("build", bundle_copy),
            "package": ("package", bundle_copy, "--out", tmp_path / "repo"),
            "inspect": ("inspect", bundle_copy)}[command]
    result = cli(*args)
    if command == "inspect":  # inspect reports rather than refuses, and says no verdict covers the file as it is
        assert result.exit_code == 0 and "damaged" in result.stdout and "model.mixed.onnx" in result.stdout
        return
    assert_bad_input(result, "model.mixed.onnx", "was modified")
    assert not (tmp_path / "repo").exists()


def test_a_missing_artifact_is_refused(cli, bundle_copy: Path) -> None:
    (bundle_copy / "model.fp32.onnx").unlink()
    assert_bad_input(cli("verify", bundle_copy), "model.fp32.onnx", "is missing")


def test_rebuilt_engine_turns_covering_verdicts_stale(cli, bundle_copy: Path, tmp_path: Path) -> None:
    """convert -> verify -> build -> package: the engine is new and verify never ran it (no GPU here), so package
    refuses; the engine's own check covers it, and a second build makes that check stale until recorded anew."""
    first = build(bundle_copy, shapes=SHAPES, builder=stand_in_builder)
    bundle = Bundle.open(bundle_copy, uses=(ENGINE,))
    engine = bundle.manifest.engine
    assert first.path == bundle_copy / ENGINE_FILE and engine.covers.keys() == {ENGINE, PLAN}
    assert bundle.staleness(engine) is None and bundle.manifest.history[-1].artifacts == [ENGINE]
    assert set(bundle.manifest.artifacts[ENGINE].sha256) == {ENGINE_FILE, ENGINE_LAYERS, TIMING_CACHE}
    repo = tmp_path / "repo"
    assert_bad_input(cli("package", bundle_copy, "--out", repo), "engine that verify did not check")

    # A verdict that covered the first engine (what verify records where the tensorrt backend ran) turns stale
    # when the engine is rebuilt.
    bundle.manifest.verify.covers = bundle.digests(FP32_ONNX, MIXED_ONNX, PLAN, ENGINE)
    bundle.commit("test")
    build(bundle_copy, shapes=SHAPES, builder=stand_in_builder)
    reopened = Bundle.open(bundle_copy)
    assert "model.plan was rewritten by mpexport build" in reopened.staleness(reopened.manifest.verify)
    assert_bad_input(cli("package", bundle_copy, "--out", repo), "stale verify verdict", "model.plan")
    assert "stale" in cli("inspect", bundle_copy).stdout
    # verify again: the verdict is fresh, but still cannot cover the engine here.
    assert cli("verify", bundle_copy).exit_code == 0
    assert_bad_input(cli("package", bundle_copy, "--out", repo), "engine that verify did not check")
    result = cli("package", bundle_copy, "--out", repo, "--allow-unverified")
    assert result.exit_code == 0 and "allow-unverified" in result.stdout


def test_a_concurrent_commit_is_refused_and_changes_nothing(bundle_copy: Path) -> None:
    first, second = Bundle.open(bundle_copy), Bundle.open(bundle_copy)
    first.manifest.repair = {"note": "first"}
    first.commit("test")
    before = (bundle_copy / "manifest.json").read_bytes()
    with pytest.raises(MpexportError, match="changed by another mpexport command"):
        with second.transaction("test") as transaction:
            transaction.write_text("report", "report.json", "{}")
    assert (bundle_copy / "manifest.json").read_bytes() == before
    assert json.loads((bundle_copy / "report.json").read_text())["verdict"] == "pass"  # the old report stays
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_failed_transaction_restores_the_record(bundle_copy: Path) -> None:
    bundle = Bundle.open(bundle_copy)
    verdict = bundle.manifest.verify.verdict
    with pytest.raises(RuntimeError), bundle.transaction("test") as transaction:
        transaction.write_text("report", "report.json", "{}")
        bundle.manifest.verify = VerifyRecord("fail", 0, "nothing")
        raise RuntimeError("boom")
    assert bundle.manifest.verify.verdict == verdict
    assert Bundle.open(bundle_copy).manifest.verify.verdict == verdict
    assert not [p for p in bundle_copy.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_verify_leaves_no_temporary_file(bundle_copy: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """Killed during the backend passes (a slow validation source says when they started)."""
    before = sorted(p.name for p in bundle_copy.iterdir())
    manifest = (bundle_copy / "manifest.json").read_bytes()
    marker = tmp_path / "passes.started"
    process = subprocess.Popen([sys.executable, "-m", "mpexport.cli", "verify", str(bundle_copy), "--batch-size", "1",
                                "--val-data", "tests.valdata_sources:slow_digits"], cwd=REPO,
                               env={**os.environ, "MPEXPORT_TEST_MARKER": str(marker)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not marker.exists():
        time.sleep(0.1)
    time.sleep(0.5)
    assert process.poll() is None, process.communicate()[1].decode()
    process.send_signal(sig)
    stderr = process.communicate(timeout=60)[1].decode()
    assert process.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), stderr
    if sig == signal.SIGTERM:  # one line, no traceback
        assert stderr.strip() == "error: terminated", stderr
    Bundle.open(bundle_copy)  # sweeps what a killed command could not remove
    assert sorted(p.name for p in bundle_copy.iterdir()) == before
    assert (bundle_copy / "manifest.json").read_bytes() == manifest


def test_temporaries_of_dead_commands_are_swept(bundle_copy: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = bundle_copy / f"{TEMP_PREFIX}{dead.stdout.strip()}-abc"
    leftover.mkdir()
    (leftover / "report.json").write_text("half")
    mine = bundle_copy / f"{TEMP_PREFIX}{os.getpid()}-live"
    mine.mkdir()
    Bundle.open(bundle_copy)
    assert not leftover.exists() and mine.exists()


def _as_version_2(manifest: dict) -> dict:
    """The same manifest as an mpexport of manifest version 2 wrote it: seconds per stage in ``timings`` (every
    stage convert entered, the engine's too when it skipped the build), skipped stages also in ``skipped``."""
    old = {key: value for key, value in manifest.items() if key != "stages"}
    old["manifest_version"] = 2
    old["timings"] = {command: [{"stage": s["stage"], "seconds": s["seconds"] or 0.0, "peak_rss_mb": s["peak_rss_mb"]}
                                for s in stages] for command, stages in manifest["stages"].items()}
    old["skipped"] = {s["stage"]: s["why"] for s in manifest["stages"].get("convert", []) if s["status"] == "skipped"}
    return old


def test_version_2_manifests_read_their_timings_and_skips_as_stage_records(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    current = Bundle.open(bundle_copy).manifest
    path.write_text(json.dumps(_as_version_2(json.loads(path.read_text()))))
    upgraded = Bundle.open(bundle_copy, uses=(FP32_ONNX, MIXED_ONNX, PLAN)).manifest
    assert upgraded.manifest_version == MANIFEST_VERSION
    assert upgraded.skip_reason("engine") == current.skip_reason("engine") is not None
    assert [(s.stage, s.status) for s in upgraded.stages["convert"]] == [(s.stage, s.status)
                                                                          for s in current.stages["convert"]]
    assert [s.stage for s in upgraded.stages["convert"]].count("engine") == 1
    assert upgraded.stages["verify"] == current.stages["verify"]


def _as_version_1(manifest: dict) -> dict:
    """The same bundle as an mpexport of manifest version 1 wrote it."""
    artifacts = {key: value["file"] for key, value in manifest["artifacts"].items()}
    hashes = {name: digest for value in manifest["artifacts"].values() for name, digest in value["sha256"].items()}
    check = dict(manifest["export_check"]["comparison"], data=manifest["export_check"]["data"])
    return {"manifest_version": 1, "artifacts": artifacts, "hashes": hashes, "inputs": manifest["inputs"],
            "outputs": manifest["outputs"], "source": {k: manifest["source"][k] for k in ("path", "format", "sha256")},
            "versions": manifest["versions"], "skipped": _as_version_2(manifest)["skipped"],
            "export": manifest["export"],
            "provenance": manifest["provenance"], "export_check": check, "plan": manifest["plan"],
            "rewrite": manifest["rewrite"], "lint": {"model": "model.mixed.onnx", "ok": True, "checks": []},
            "verify": {"verdict": "pass", "samples": 360, "data": "x", "failures": []}}


def test_version_1_manifests_are_read_and_their_verify_verdict_distrusted(cli, bundle_copy: Path,
                                                                          tmp_path: Path) -> None:
    path = bundle_copy / "manifest.json"
    path.write_text(json.dumps(_as_version_1(json.loads(path.read_text()))))
    bundle = Bundle.open(bundle_copy, uses=(FP32_ONNX, MIXED_ONNX, PLAN))
    assert bundle.staleness(bundle.manifest.lint) is None
    assert "did not record what it covered" in bundle.staleness(bundle.manifest.verify)
    assert_bad_input(cli("package", bundle_copy, "--out", tmp_path / "repo"), "stale verify verdict")
    assert cli("verify", bundle_copy).exit_code == 0  # upgraded on its first commit
    assert json.loads(path.read_text())["manifest_version"] == MANIFEST_VERSION
    assert cli("package", bundle_copy, "--out", tmp_path / "repo").exit_code == 0


@pytest.mark.parametrize(("content", "fragment"), [
    ({"manifest_version": 99, "artifacts": {}}, "newer mpexport"),
    ({"manifest_version": 2, "artifacts": {"plan": {"file": "plan.json"}}}, "is damaged"),
    ("not json", "not valid JSON"),
    ({"something": "else"}, "not an mpexport manifest"),
])
def test_bad_manifests_are_one_line(cli, bundle_copy: Path, content: object, fragment: str) -> None:
    path = bundle_copy / "manifest.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert_bad_input(cli("inspect", bundle_copy), fragment)


def test_paths_work_from_any_directory(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert from one directory with relative paths, verify from another."""
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    for name in ("digits_resnet.pt2", "digits_resnet.val.npz"):
        shutil.copy(MODELS / name, project / "models" / name)
    monkeypatch.chdir(project / "models")
    from click.testing import CliRunner

    from mpexport.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["convert", "digits_resnet.pt2", "--val-data", "digits_resnet.val.npz",
                                "--out", "../build/x"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["verify", "project/build/x"])
    assert result.exit_code == 0, result.output
    # the whole tree moved: the paths relative to the bundle still resolve
    shutil.move(project, tmp_path / "moved")
    result = runner.invoke(main, ["verify", "moved/build/x"])
    assert result.exit_code == 0, result.output

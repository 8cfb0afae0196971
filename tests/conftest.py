"""Shared fixtures: paths, the CLI run in-process, bad-input assertions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mpexport.cli import main

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
EXAMPLES = ["digits_resnet", "digits_transformer"]


@dataclass
class CliResult:
    """Exit code and the two output streams of one CLI run."""

    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    """Run ``mpexport ARGS...`` in this process from the repository root; returns a :class:`CliResult`."""
    monkeypatch.chdir(REPO)

    def run(*args: str) -> CliResult:
        result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def assert_bad_input(result: CliResult, *fragments: str) -> None:
    """Exit 2 with exactly one line on stderr, starting ``error:``, containing every fragment, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_nothing_written(out: Path) -> None:
    """Neither the output directory nor a staging leftover exists beside it."""
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


@pytest.fixture
def digits_val() -> Path:
    """The bundled ResNet example's validation set."""
    return MODELS / "digits_resnet.val.npz"


@pytest.fixture
def pixels_npz(tmp_path: Path) -> Path:
    """A small validation set for 1x8x8 models: the first 24 bundled digits."""
    with np.load(MODELS / "digits_resnet.val.npz") as data:
        path = tmp_path / "val.npz"
        np.savez(path, pixels=data["pixels"][:24], labels=data["labels"][:24])
    return path

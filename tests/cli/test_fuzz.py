"""Corrupted files as they reach users: seeded bit flips, truncations and zeroed blocks of the bundled `.pt2` and of
its validation data. Every command line must end with exit 0 (the damage did not matter), 1 (a check failed) or
2 with exactly one line on stderr: never a traceback, never a library's log, never a half-written directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import MODELS, REPO

SEED = 20261129
MODEL_CASES = 14
DATA_CASES = 10


def corrupt(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One seeded corruption: flipped bits, a truncation, or a zeroed 4 KiB block (past the first 64 bytes, so the
    file still looks like what it claims to be)."""
    kind = ("flip", "truncate", "zero")[int(rng.integers(3))]
    buffer = bytearray(data)
    if kind == "flip":
        for position in rng.integers(64, len(buffer), size=int(rng.integers(1, 9))):
            buffer[position] ^= 1 << int(rng.integers(8))
    elif kind == "truncate":
        del buffer[int(rng.integers(64, len(buffer))):]
    else:
        start = int(rng.integers(64, max(65, len(buffer) - 4096)))
        buffer[start:start + 4096] = bytes(min(4096, len(buffer) - start))
    return kind, bytes(buffer)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case run through the CLI by ``fuzz_driver.py`` in one process (real fd-level stderr)."""
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(SEED)
    model = (MODELS / "digits_resnet.pt2").read_bytes()
    val = (MODELS / "digits_resnet.val.npz").read_bytes()
    cases = []
    for index in range(MODEL_CASES + DATA_CASES):
        corrupt_model = index < MODEL_CASES
        _, damaged = corrupt(model if corrupt_model else val, rng)
        path = root / (f"model{index}.pt2" if corrupt_model else f"val{index}.npz")
        path.write_bytes(damaged)
        cases.append(["convert", str(path if corrupt_model else MODELS / "digits_resnet.pt2"), "--val-data",
                      str(MODELS / "digits_resnet.val.npz" if corrupt_model else path), "--out",
                      str(root / f"out{index}"), "--engine", "off", "--check-samples", "64",
                      "--calibration-samples", "64"])
    (root / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz_driver.py"), str(root / "cases.json"),
                           str(root / "results.json")], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


def test_every_corruption_ends_cleanly(results: list[dict]) -> None:
    assert len(results) == MODEL_CASES + DATA_CASES
    codes = [result["code"] for result in results]
    assert set(codes) <= {0, 1, 2}, [(r["args"][1], r["code"], r["stderr"][-500:]) for r in results]
    assert codes.count(2) >= len(codes) // 2  # most corruptions are caught as bad input
    for result in results:
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        if result["code"] == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), result
        else:
            assert lines == [], result
        assert "Traceback" not in result["stderr"], result


def test_nothing_half_written_is_left(results: list[dict]) -> None:
    for result in results:
        out = Path(result["args"][result["args"].index("--out") + 1])
        assert out.exists() == (result["code"] in (0, 1)), result
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []

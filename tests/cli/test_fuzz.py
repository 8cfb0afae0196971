"""Corrupted and tampered files as they reach users: seeded bit flips, truncations and zeroed blocks of the bundled
`.pt2` and of its validation data; seeded edits of the JSON entries inside the `.pt2` archive; and seeded edits of
a bundle's manifest fields, given to verify, package and inspect. Every command line must end with exit 0 (the
damage did not matter), 1 (a check failed) or 2 with exactly one line on stderr: never a traceback, never a
library's log, never a half-written directory, never a file written outside the command's output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import MODELS, REPO

SEED = 20261129
MODEL_CASES = 14
DATA_CASES = 10
ARCHIVE_CASES = 8
MANIFEST_CASES = 15
HOSTILE_VALUES: list[Any] = ["../../etc/passwd", "/etc/passwd", "os:system", -1, 2**63, 1e308, None, True, [], {},
                             "x" * 5000, "model.fp32.onnx", "ff" * 32]


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


def mutate(data: Any, rng: np.random.Generator) -> tuple[str, Any]:
    """One seeded edit of a JSON document: a random leaf (or container) replaced by a hostile value."""
    path: list[Any] = []
    node = data
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        key = list(node)[int(rng.integers(len(node)))] if isinstance(node, dict) else int(rng.integers(len(node)))
        path.append(key)
        node = node[key]
    value = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    if not path:
        return "<root>", value
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return "/".join(map(str, path)), data


def _edit_archive(source: Path, target: Path, rng: np.random.Generator) -> str:
    """A copy of a `.pt2` with one of its JSON entries edited (the zip itself stays valid)."""
    with zipfile.ZipFile(source) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    json_entries = sorted(name for name in entries if name.endswith(".json"))
    name = json_entries[int(rng.integers(len(json_entries)))]
    where, edited = mutate(json.loads(entries[name]), rng)
    entries[name] = json.dumps(edited).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for entry, payload in entries.items():
            archive.writestr(entry, payload)
    return f"{name}:{where}"


@pytest.fixture(scope="module")
def tampered(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Seeded edits of `.pt2` JSON entries (convert) and of manifest fields (verify, package, inspect), run by
    ``fuzz_driver.py`` in one process."""
    root = tmp_path_factory.mktemp("tampered")
    rng = np.random.default_rng(SEED + 1)
    cases = []
    for index in range(ARCHIVE_CASES):
        model = root / f"edited{index}.pt2"
        _edit_archive(MODELS / "digits_resnet.pt2", model, rng)
        cases.append(["convert", str(model), "--val-data", str(MODELS / "digits_resnet.val.npz"), "--out",
                      str(root / f"out{index}"), "--engine", "off", "--check-samples", "32",
                      "--calibration-samples", "32"])
    for index in range(MANIFEST_CASES):
        case = root / f"case{index}"
        shutil.copytree(bundle, case / "m")
        manifest = case / "m" / "manifest.json"
        manifest.write_text(json.dumps(mutate(json.loads(manifest.read_text()), rng)[1]))
        command = [["verify", str(case / "m"), "--max-samples", "64"], ["inspect", str(case / "m")],
                   ["package", str(case / "m"), "--out", str(case / "repo"), "--allow-unverified"]][index % 3]
        cases.append(command)
    (root / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz_driver.py"), str(root / "cases.json"),
                           str(root / "results.json")], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "results.json").read_text())


def _ends_cleanly(results: list[dict]) -> None:
    codes = [result["code"] for result in results]
    assert set(codes) <= {0, 1, 2}, [(r["args"][1], r["code"], r["stderr"][-500:]) for r in results]
    for result in results:
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        if result["code"] == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), result
        else:
            assert lines == [], result
        assert "Traceback" not in result["stderr"], result


def test_every_corruption_ends_cleanly(results: list[dict]) -> None:
    assert len(results) == MODEL_CASES + DATA_CASES
    _ends_cleanly(results)
    assert [result["code"] for result in results].count(2) >= len(results) // 2  # most are caught as bad input


def test_every_tampered_archive_and_manifest_ends_cleanly(tampered: list[dict], bundle: Path) -> None:
    assert len(tampered) == ARCHIVE_CASES + MANIFEST_CASES
    _ends_cleanly(tampered)
    shipped = (bundle / "model.mixed.onnx").read_bytes()
    for result in tampered[ARCHIVE_CASES:]:
        case = Path(result["args"][1]).parent
        assert sorted(p.name for p in case.iterdir()) in (["m"], ["m", "repo"]), result
        if result["args"][0] == "package" and result["code"] == 0:  # only the bytes verify hashed are shipped
            assert [p.read_bytes() for p in (case / "repo").rglob("model.onnx")] == [shipped], result


def test_nothing_half_written_is_left(results: list[dict]) -> None:
    for result in results:
        out = Path(result["args"][result["args"].index("--out") + 1])
        assert out.exists() == (result["code"] in (0, 1)), result
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []

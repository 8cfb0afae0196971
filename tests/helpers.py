"""Helpers the tests share that are not fixtures: paths, the CLI result, bad-input assertions, the stand-in
engine builder."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mpexport.bundle.names import ENGINE_LAYERS, TIMING_CACHE
from mpexport.deploy.tensorrt import ENGINE_FILE, EngineCheck, EngineResult

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
EXAMPLES = ["digits_resnet", "digits_transformer"]
DIGITS_VAL = MODELS / "digits_resnet.val.npz"


@dataclass
class CliResult:
    """Exit code and the two output streams of one CLI run."""

    exit_code: int
    stdout: str
    stderr: str



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


def stand_in_builder(onnx_path: Path, out_dir: Path, profiles: dict, plan: dict[str, str], **_: object) -> EngineResult:
    """Writes what `build_engine` writes, with stand-in contents (TensorRT needs a GPU): exercises the bundle side
    of `mpexport build` only; no engine is built or claimed."""
    assert onnx_path.is_file() and profiles
    (out_dir / ENGINE_FILE).write_bytes(b"stand-in engine built at %d" % time.monotonic_ns())
    (out_dir / ENGINE_LAYERS).write_text(json.dumps({"Layers": []}))
    (out_dir / TIMING_CACHE).write_bytes(b"")
    check = EngineCheck()
    return EngineResult(out_dir / ENGINE_FILE, {"tensorrt": "10.13.0", "gpu": "stand-in", "compute_capability": "9.0",
                                                "check": check.to_json()}, check)

"""The GPU proof script runs here in its CPU-only mode on one bundled example, so it cannot rot before a GPU runs it
(the CUDA policies' oracle for every model, on fake CUDA tensors, is ``tests/precision/test_plan.py``'s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def test_gpu_check_cpu_only(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    process = subprocess.run([sys.executable, "scripts/gpu_check.py", "--cpu-only", "--models", "digits_transformer",
                              "--out", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert process.returncode == 0, process.stdout + process.stderr
    summary = json.loads(out.read_text())
    assert summary["oracle"]["all_agree"]
    assert summary["oracle"]["autocast"].startswith("CUDA autocast kernels on fake CUDA tensors")
    models = {row["model"] for row in summary["oracle"]["results"]}
    assert models == {"digits_transformer"}
    assert "nodes agree" in process.stdout
    assert [row["model"] for row in summary["numerics"]] == ["digits_transformer"]
    for row in summary["numerics"]:  # the CPU emulation stores exactly where autocast stores
        assert row["strict_fp16"]["max_abs"] <= 2 * row["torch_amp"]["max_abs"]
    assert summary["tensorrt"]["engines"].startswith("skipped")

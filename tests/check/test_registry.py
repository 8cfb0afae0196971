"""Verify's backends come from one table: gating, required backends and allowed skips follow from it."""

from __future__ import annotations

import pytest

from mpexport.base.status import FAILED, RAN, SKIPPED
from mpexport.check.backends import Backends, Skip
from mpexport.check.registry import ALLOWED_SKIPS, BACKENDS, gated, required


def test_the_table_decides_gating_requirements_and_skips() -> None:
    assert gated("bf16") == ("onnx-fp32", "onnx-mixed", "strict-bf16", "tensorrt")
    assert required("fp16", has_model=True) == ("onnx-fp32", "strict-fp16")
    assert required("fp16", has_model=False) == ("strict-fp16",)
    assert set(ALLOWED_SKIPS) == {"torch-amp", "torch-cuda", "onnx-mixed", "tensorrt"}
    names = [entry.named("fp16") for entry in BACKENDS]
    assert len(names) == len(set(names)) and "strict-fp16" in names


def test_only_allowed_skips_are_skips_and_other_failures_fail() -> None:
    backends = Backends(ALLOWED_SKIPS)

    def cannot_run() -> None:
        raise Skip("no engine here")

    def broken() -> None:
        raise RuntimeError("kernel exploded\nsecond line")

    backends.add("tensorrt", cannot_run)  # type: ignore[arg-type]
    backends.add("onnx-mixed", broken)  # type: ignore[arg-type]
    backends.add("onnx-fp32", lambda: type("R", (), {"name": "onnx-fp32"})())  # type: ignore[arg-type]
    assert backends.states["tensorrt"] == {"state": SKIPPED, "ran": False, "why": "no engine here"}
    mixed = backends.states["onnx-mixed"]
    assert mixed["state"] == FAILED and mixed["why"] == "could not be built: kernel exploded"
    assert backends.states["onnx-fp32"]["state"] == RAN
    with pytest.raises(AssertionError, match="may not be skipped"):
        backends.skip("strict-fp16", "not allowed")

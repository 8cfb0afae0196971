"""Verify's backend names, each backend's state (ran, skipped with an allowed reason, failed with the error) and
the set being built (:class:`Backends`); :mod:`mpexport.check.registry` says which backends there are."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mpexport.backends.base import Runner
from mpexport.base.errors import MpexportError, first_line
from mpexport.base.specs import Batch
from mpexport.base.status import FAILED, RAN, SKIPPED

AMP = "torch-amp"
ONNX_AMP = "onnx-amp"
"""The noise floor without a PyTorch model: the training policy emulated strictly on the FP32 ONNX."""
NOISE_FLOORS = (AMP, ONNX_AMP)
ONNX_FP32 = "onnx-fp32"


class Skip(Exception):
    """Raised while building a backend: it cannot run here, for a reason the backend is allowed to be skipped for."""


class Backends:
    """The runners being built, and every backend's state (ran / skipped with the reason / failed with the
    error)."""

    def __init__(self, allowed_skips: Mapping[str, str] | None = None) -> None:
        self.runners: list[Runner] = []
        self.states: dict[str, dict[str, Any]] = {}
        self.allowed_skips = dict(allowed_skips or {})
        """The backends that may be skipped (:data:`mpexport.check.registry.ALLOWED_SKIPS` for a bundle)."""

    def reference(self, runner: Runner) -> None:
        """Add the reference: the first runner, which every other backend is compared with."""
        self.runners.insert(0, runner)
        self.states = {runner.name: {"state": RAN, "ran": True}, **self.states}

    def add(self, name: str, make: Callable[[], Runner], skip_if: Callable[[str], str | None] | None = None) -> None:
        """Build a backend; a failure is a skip only when ``skip_if`` names an allowed reason for it."""
        try:
            runner = make()
        except Skip as skip:
            self.skip(name, str(skip))
            return
        except MpexportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a backend that cannot be built is recorded, then judged
            error = first_line(exc, 300)
            reason = skip_if(error) if skip_if else None
            if reason:
                self.skip(name, reason)
            else:
                self.states[name] = {"state": FAILED, "ran": False, "why": f"could not be built: {error}"}
            return
        self.runners.append(runner)
        self.states[name] = {"state": RAN, "ran": True}

    def skip(self, name: str, why: str) -> None:
        """Record an allowed skip."""
        if name not in self.allowed_skips:
            raise AssertionError(f"internal: {name} may not be skipped")
        self.states[name] = {"state": SKIPPED, "ran": False, "why": why}


class Timed:
    """A runner wrapper that accumulates its run time."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.name = runner.name
        self.seconds = 0.0

    def run(self, batch: Batch) -> list[np.ndarray]:
        start = time.perf_counter()
        try:
            return self.runner.run(batch)
        finally:
            self.seconds += time.perf_counter() - start

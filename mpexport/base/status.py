"""One status record per stage of a command: ran, skipped or failed, why, seconds and peak memory.

Every command records its stages in the manifest (``stages``, by command) the same way, in the manner of the torch
exporter's per-step status; verify's backends use the same three states. The peak is the process's resident-set
high-water mark during the stage. On Linux it is reset at the start of each stage (writing ``5`` to
``/proc/self/clear_refs``) and read from ``VmHWM``, so each stage reports its own peak; where that is not possible,
the process's peak so far (``ru_maxrss``) is reported instead.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpexport.base.errors import first_line

RAN, SKIPPED, FAILED = "ran", "skipped", "failed"
PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class StageStatus:
    """One stage of a command: whether it ran, was skipped or failed, why (for the last two), its seconds and the
    peak resident memory while it ran."""

    stage: str
    status: str = RAN
    why: str | None = None
    seconds: float = 0.0
    peak_rss_mb: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written into the manifest and reports (``why`` only where there is one)."""
        data: dict[str, Any] = {"stage": self.stage, "status": self.status}
        if self.why:
            data["why"] = self.why
        data.update(seconds=self.seconds, peak_rss_mb=self.peak_rss_mb)
        return data


class StageClock:
    """Records the stages of one command: ``with clock.stage("export"): ...`` times a stage (failed, with the error,
    when its body raises); :meth:`skip` records a stage that did not run. ``on_stage`` hears each stage's name as it
    starts (for progress displays)."""

    def __init__(self, on_stage: Callable[[str], None] | None = None) -> None:
        self.on_stage = on_stage or (lambda _name: None)
        self.stages: list[StageStatus] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as stage ``name``: ran, or failed with the first line of what it raised."""
        self.on_stage(name)
        _reset_peak()
        started = time.perf_counter()
        status, why = RAN, None
        try:
            yield
        except BaseException as exc:
            status, why = FAILED, first_line(exc) or type(exc).__name__
            raise
        finally:
            self.stages.append(StageStatus(name, status, why, round(time.perf_counter() - started, 3), _peak_mb()))

    def skip(self, name: str, why: str) -> None:
        """Record that stage ``name`` did not run, and why."""
        self.stages.append(StageStatus(name, SKIPPED, why))

    @property
    def total_seconds(self) -> float:
        """The sum of the stages' seconds."""
        return round(sum(stage.seconds for stage in self.stages), 3)


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        CLEAR_REFS.write_text("5")


def _peak_mb() -> float | None:
    """The resident-set high-water mark in MB (since the last reset where resets work)."""
    with contextlib.suppress(OSError, ValueError):
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)

"""Per-stage seconds and peak memory of a command, recorded in the manifest (``timings``).

The peak is the process's resident-set high-water mark during the stage. On Linux it is reset at the start of
each stage (writing ``5`` to ``/proc/self/clear_refs``) and read from ``VmHWM``, so each stage reports its own
peak; where that is not possible, the process's peak so far (``ru_maxrss``) is reported instead.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


class StageClock:
    """Times the stages of one command: ``with clock.stage("export"): ...``; ``on_stage`` hears each stage's
    name as it starts (for progress displays)."""

    def __init__(self, on_stage: Callable[[str], None] | None = None) -> None:
        self.on_stage = on_stage or (lambda _name: None)
        self.stages: list[StageTiming] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as stage ``name`` (recorded also when it raises)."""
        self.on_stage(name)
        _reset_peak()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append(StageTiming(name, round(time.perf_counter() - started, 3), _peak_mb()))

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


@dataclass
class StageTiming:
    """Seconds and peak resident memory of one stage of a command."""

    stage: str
    seconds: float
    peak_rss_mb: float | None = None

"""Per-sample statistics (which samples fail) and the worst sample, folded batch by batch and mergeable across
shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpexport.base.specs import Batch, sample_rows
from mpexport.check.compare import batch_samples
from mpexport.check.metrics import CHUNK_ELEMENTS


@dataclass
class WorstSample:
    """The sample whose outputs a backend got most wrong so far: the most non-finite values where the reference
    is finite, then the largest error relative to the reference's magnitude. Localisation runs on it (on its
    whole batch where batches run only whole: a model with a fixed batch size, an input without a batch axis)."""

    whole_batch: bool
    batch: Batch | None = None
    index: int | None = None
    score: tuple[int, float] = (-1, -1.0)

    def consider(self, batch: Batch, expected: list[np.ndarray], actual: list[np.ndarray], first: int) -> None:
        """Fold one batch's outputs in (the real samples' rows: see :func:`mpexport.base.specs.real_rows`); ``first``
        is the global index of its first sample. Where batches run only whole (``whole_batch``) the worst sample
        keeps its whole batch, padding included (the model runs on no other), elsewhere its one sample (rank-0
        inputs whole)."""
        count = batch_samples(batch)
        broken = np.zeros(count, np.int64)
        error = np.zeros(count)
        for want, have in zip(expected, actual, strict=False):
            want, have = np.asarray(want), np.asarray(have)
            if want.shape != have.shape or want.ndim == 0 or len(want) != count:
                continue
            parts = row_slices(want)
            scale = max(finite_max(want[part]) for part in parts) or 1.0
            for part in parts:
                want32, have32 = want[part].astype(np.float32), have[part].astype(np.float32)
                rows = len(want32)
                finite = np.isfinite(want32)
                usable = finite & np.isfinite(have32)
                broken[part] += (finite & ~np.isfinite(have32)).reshape(rows, -1).sum(axis=1)
                worst = np.abs(np.where(usable, want32 - have32, 0)).reshape(rows, -1).max(axis=1) / scale
                error[part] = np.maximum(error[part], worst)
        top = broken == broken.max()
        position = int(np.flatnonzero(top & (error == error[top].max()))[0])  # ties: the first, as across batches
        score = (int(broken[position]), float(error[position]))
        if score > self.score:
            self.score, self.index = score, first + position
            kept = batch if self.whole_batch else sample_rows(batch, position, position + 1)
            self.batch = {name: np.array(array) for name, array in kept.items()}

    def merge(self, other: WorstSample) -> None:
        """Take ``other``'s sample if it is worse (``other`` covers later samples: a tie keeps the earlier one)."""
        if other.batch is not None and other.score > self.score:
            self.score, self.index, self.batch = other.score, other.index, other.batch

    def to_json(self) -> dict[str, Any]:
        """Which sample localisation ran on, and why."""
        return {"sample": self.index, "nonfinite": self.score[0], "relative_error": float(f"{self.score[1]:.3g}"),
                "whole_batch": self.whole_batch}


@dataclass
class SampleStats:
    """One output's per-sample statistics against the reference, in sample order."""

    nonfinite: list[int] = field(default_factory=list)
    max_abs: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    top1_match: list[bool] = field(default_factory=list)

    def add(self, want: np.ndarray, have: np.ndarray) -> None:
        """Fold one batch in (first axis the samples; a large output in slices of samples, so the float64
        temporaries stay small)."""
        for part in row_slices(want):
            self._add(want[part], have[part])
        if want.ndim == 2 and want.shape[1] > 1:
            self.top1_match += (want.argmax(axis=1) == have.argmax(axis=1)).tolist()

    def _add(self, want: np.ndarray, have: np.ndarray) -> None:
        count = len(want)
        want64, have64 = want.astype(np.float64).reshape(count, -1), have.astype(np.float64).reshape(count, -1)
        finite = np.isfinite(want64)
        usable = finite & np.isfinite(have64)
        self.nonfinite += (finite & ~np.isfinite(have64)).sum(axis=1).tolist()
        self.max_abs += np.abs(np.where(usable, want64 - have64, 0)).max(axis=1, initial=0.0).tolist()
        a, b = np.where(finite, want64, 0), np.where(np.isfinite(have64), have64, 0)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        self.cosine += np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0).tolist()

    def failing(self, limits: dict[str, Any]) -> list[int]:
        """Samples that break ``limits`` (a gate's thresholds for this output) by themselves."""
        found = [index for index, (broken, error, cosine) in enumerate(zip(self.nonfinite, self.max_abs, self.cosine,
                                                                          strict=True))
                 if broken or error > limits["atol"] or cosine < limits.get("min_cosine", -1.0)]
        if "min_top1_agreement" in limits:
            found += [index for index, match in enumerate(self.top1_match) if not match]
        return found

    def extend(self, other: SampleStats) -> None:
        """Append the statistics of the samples right after these."""
        self.nonfinite += other.nonfinite
        self.max_abs += other.max_abs
        self.cosine += other.cosine
        self.top1_match += other.top1_match


def row_slices(array: np.ndarray) -> list[slice]:
    """Slices of the first axis of about :data:`mpexport.check.metrics.CHUNK_ELEMENTS` elements each (at least a
    row)."""
    rows = max(1, CHUNK_ELEMENTS // max(1, array[0].size))
    return [slice(start, start + rows) for start in range(0, len(array), rows)]


def finite_max(array: np.ndarray) -> float:
    """The largest finite |value| (0 when there is none)."""
    magnitude = np.abs(array.astype(np.float32))
    return float(magnitude[np.isfinite(magnitude)].max(initial=0.0))

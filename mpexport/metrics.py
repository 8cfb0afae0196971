"""Streaming parity metrics of one output of one backend against the FP32 reference.

Per output: max / mean absolute error, max relative error, p99 absolute error (from a fixed-seed uniform
subsample), cosine similarity (the minimum over samples), SNR in dB, non-finite values where the reference is
finite, and for classifier-like outputs (batch x classes) top-1 agreement and accuracy against labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUBSAMPLE = 200_000
CHUNK_ELEMENTS = 1 << 22
"""Elements of an output folded in at once (float64 temporaries of 32 MB each)."""
PLOT_POINTS = 3_000


@dataclass
class OutputMetrics:
    """Running statistics; :meth:`update` folds in a batch, :meth:`to_json` reports."""

    name: str
    count: int = 0
    samples: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    max_rel: float = 0.0
    min_cosine: float = 1.0
    signal: float = 0.0
    noise: float = 0.0
    nonfinite: int = 0
    scale: float = 0.0
    top1_agree: int = 0
    correct: int = 0
    labelled: int = 0
    classifier: bool = False
    _diffs: list[np.ndarray] = field(default_factory=list, repr=False)
    _points: list[np.ndarray] = field(default_factory=list, repr=False)
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0), repr=False)

    def update(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Fold one batch in (arrays of the same shape, first axis the batch). Large outputs (a language model's
        logits) are folded in slices of samples, so the float64 temporaries stay small."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(f"output '{self.name}': shapes {reference.shape} and {candidate.shape} differ")
        if reference.ndim == 0:
            self._update(reference, candidate, labels)
            return
        rows = max(1, CHUNK_ELEMENTS // max(1, reference[0].size))
        slices = [slice(start, start + rows) for start in range(0, len(reference), rows)]
        for part in slices:  # the batch's scale first: the relative-error floor must not depend on the slicing
            magnitude = np.abs(np.asarray(reference[part], dtype=np.float64))
            self.scale = max(self.scale, float(magnitude[np.isfinite(magnitude)].max(initial=0.0)))
        matching = labels if labels is not None and labels.shape[:1] == reference.shape[:1] else None
        for part in slices:
            self._update(reference[part], candidate[part], matching[part] if matching is not None else None)

    def _update(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        cand = np.asarray(candidate, dtype=np.float64)
        finite_ref = np.isfinite(ref)
        bad = finite_ref & ~np.isfinite(cand)
        self.nonfinite += int(bad.sum())
        usable = finite_ref & np.isfinite(cand)
        diff = np.where(usable, np.abs(ref - cand), 0.0)
        magnitude = np.where(finite_ref, np.abs(ref), 0.0)
        self.scale = max(self.scale, float(magnitude.max(initial=0.0)))
        self.max_abs = max(self.max_abs, float(diff.max(initial=0.0)))
        self.sum_abs += float(diff.sum())
        self.count += int(usable.sum())
        floor = max(self.scale * 1e-3, 1e-12)
        self.max_rel = max(self.max_rel, float((diff / np.maximum(magnitude, floor)).max(initial=0.0)))
        self.signal += float((np.where(finite_ref, ref, 0.0) ** 2).sum())
        self.noise += float((diff ** 2).sum())
        batch = ref.shape[0] if ref.ndim else 1
        self.samples += batch
        flat_ref = np.where(finite_ref, ref, 0.0).reshape(batch, -1)
        flat_cand = np.where(np.isfinite(cand), cand, 0.0).reshape(batch, -1)
        norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
        cosine = np.where(norms > 0, (flat_ref * flat_cand).sum(axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
        cosine = np.where(bad.reshape(batch, -1).any(axis=1), -1.0, cosine)
        self.min_cosine = min(self.min_cosine, float(cosine.min(initial=1.0)))
        self._keep(diff[usable], magnitude[usable])
        if ref.ndim == 2 and ref.shape[1] > 1:
            self.classifier = True
            self.top1_agree += int((ref.argmax(axis=1) == cand.argmax(axis=1)).sum())
            if labels is not None:
                self.correct += int((cand.argmax(axis=1) == labels).sum())
                self.labelled += batch

    def _keep(self, diffs: np.ndarray, magnitudes: np.ndarray) -> None:
        if diffs.size == 0:
            return
        keep = max(1, min(diffs.size, SUBSAMPLE // 16))
        chosen = self._rng.choice(diffs.size, size=keep, replace=False) if diffs.size > keep else slice(None)
        self._diffs.append(diffs[chosen])
        self._points.append(np.stack([magnitudes[chosen], diffs[chosen]], axis=1))

    @property
    def p99_abs(self) -> float:
        """The 99th percentile of |error| (over the kept subsample)."""
        return float(np.quantile(np.concatenate(self._diffs), 0.99)) if self._diffs else 0.0

    @property
    def snr_db(self) -> float:
        """10 log10(signal energy / error energy); infinite for an exact match."""
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    @property
    def top1_agreement(self) -> float | None:
        """Share of samples whose argmax equals the reference's (classifier-like outputs only)."""
        return self.top1_agree / self.samples if self.classifier and self.samples else None

    @property
    def accuracy(self) -> float | None:
        """Accuracy against the labels, when given."""
        return self.correct / self.labelled if self.labelled else None

    def error_sample(self) -> np.ndarray:
        """Kept |errors| (for histograms)."""
        return np.concatenate(self._diffs) if self._diffs else np.zeros(0)

    def scatter_points(self) -> np.ndarray:
        """Up to PLOT_POINTS (|reference|, |error|) pairs (for error-vs-magnitude plots)."""
        if not self._points:
            return np.zeros((0, 2))
        points = np.concatenate(self._points)
        if len(points) > PLOT_POINTS:
            points = points[np.random.default_rng(1).choice(len(points), PLOT_POINTS, replace=False)]
        return points

    def to_json(self) -> dict[str, Any]:
        """The metrics as reported (floats rounded to 4 significant digits)."""
        data: dict[str, Any] = {
            "max_abs": _sig(self.max_abs), "mean_abs": _sig(self.sum_abs / self.count if self.count else 0.0),
            "max_rel": _sig(self.max_rel), "p99_abs": _sig(self.p99_abs), "min_cosine": _sig(self.min_cosine, 8),
            "snr_db": _sig(self.snr_db), "nonfinite": self.nonfinite, "scale": _sig(self.scale),
            "samples": self.samples,
        }
        if self.top1_agreement is not None:
            data["top1_agreement"] = _sig(self.top1_agreement)
        if self.accuracy is not None:
            data["accuracy"] = _sig(self.accuracy)
        return data


def _sig(value: float, digits: int = 4) -> float | str:
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return float(f"{value:.{digits}g}")

"""Streaming parity metrics of one output of one backend against the FP32 reference.

Per output: max / mean absolute error, max relative error (the floor of the denominator 1e-3 of the batch's own
scale), p99 absolute error (over a uniform subsample of at most :data:`SUBSAMPLE` values, exact below that),
cosine similarity (the minimum over samples), SNR in dB, non-finite values where the reference is finite, and for
classifier-like outputs (batch x classes) top-1 agreement and accuracy against labels.

Every statistic is a function of each batch alone plus an order-free combination (maxima, minima, counts, sums
kept as per-batch parts and added exactly with :func:`math.fsum`, the subsample drawn by bottom-k priorities from
generators seeded by batch index), so metrics folded on separate machines over disjoint batches and joined with
:meth:`OutputMetrics.merge` equal the metrics of one sequential pass bit for bit.
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
    max_rel: float = 0.0
    min_cosine: float = 1.0
    nonfinite: int = 0
    scale: float = 0.0
    top1_agree: int = 0
    correct: int = 0
    labelled: int = 0
    classifier: bool = False
    _sums: list[tuple[float, float, float]] = field(default_factory=list, repr=False)
    """Per folded slice: (sum of |error|, signal energy, error energy), added exactly when read."""
    _kept: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)
    """The subsample: rows of (priority, |error|, |reference|), at most :data:`SUBSAMPLE`, the values with the
    smallest priorities (bottom-k sampling: uniform over every value folded in, and the same whatever the order or
    grouping of the batches)."""
    _folded: int = field(default=0, repr=False)

    def update(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None = None, *,
               batch: int | None = None) -> None:
        """Fold one batch in (arrays of the same shape, first axis the batch). ``batch`` is its index in the whole
        validation set (default: the number of batches folded before), which seeds its part of the subsample:
        give it when batches are folded on several machines. Large outputs (a language model's logits) are
        folded in slices of samples, so the float64 temporaries stay small."""
        reference, candidate = np.asarray(reference), np.asarray(candidate)
        if reference.shape != candidate.shape:
            raise ValueError(f"output '{self.name}': shapes {reference.shape} and {candidate.shape} differ")
        index = self._folded if batch is None else batch
        self._folded += 1
        if reference.ndim == 0:
            self._update(reference, candidate, labels, floor=_floor(_scale_of(reference)), key=(index, 0))
            return
        rows = max(1, CHUNK_ELEMENTS // max(1, reference[0].size))
        slices = [slice(start, start + rows) for start in range(0, len(reference), rows)]
        # the batch's scale first: the relative-error floor must not depend on the slicing
        floor = _floor(max(_scale_of(reference[part]) for part in slices))
        matching = labels if labels is not None and labels.shape == reference.shape[:1] else None
        for number, part in enumerate(slices):
            self._update(reference[part], candidate[part], matching[part] if matching is not None else None,
                         floor=floor, key=(index, number))

    def merge(self, other: OutputMetrics) -> None:
        """Fold in ``other``, the same output's metrics over other batches (folded with their global indices):
        the result equals one pass over both, bit for bit."""
        self.count += other.count
        self.samples += other.samples
        self.max_abs = max(self.max_abs, other.max_abs)
        self.max_rel = max(self.max_rel, other.max_rel)
        self.min_cosine = min(self.min_cosine, other.min_cosine)
        self.nonfinite += other.nonfinite
        self.scale = max(self.scale, other.scale)
        self.top1_agree += other.top1_agree
        self.correct += other.correct
        self.labelled += other.labelled
        self.classifier = self.classifier or other.classifier
        self._sums += other._sums
        self._join(other._kept)
        self._folded += other._folded

    @property
    def sum_abs(self) -> float:
        """The sum of |error| over every compared value."""
        return math.fsum(sums[0] for sums in self._sums)

    @property
    def signal(self) -> float:
        """The reference's energy (sum of squares of its finite values)."""
        return math.fsum(sums[1] for sums in self._sums)

    @property
    def noise(self) -> float:
        """The error's energy (sum of squared errors)."""
        return math.fsum(sums[2] for sums in self._sums)

    def _update(self, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, *, floor: float,
                key: tuple[int, int]) -> None:
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
        self.count += int(usable.sum())
        self.max_rel = max(self.max_rel, float((diff / np.maximum(magnitude, floor)).max(initial=0.0)))
        self._sums.append((float(diff.sum()), float((np.where(finite_ref, ref, 0.0) ** 2).sum()),
                           float((diff ** 2).sum())))
        batch = ref.shape[0] if ref.ndim else 1
        self.samples += batch
        flat_ref = np.where(finite_ref, ref, 0.0).reshape(batch, -1)
        flat_cand = np.where(np.isfinite(cand), cand, 0.0).reshape(batch, -1)
        norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_cand, axis=1)
        cosine = np.where(norms > 0, (flat_ref * flat_cand).sum(axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
        cosine = np.where(bad.reshape(batch, -1).any(axis=1), -1.0, cosine)
        self.min_cosine = min(self.min_cosine, float(cosine.min(initial=1.0)))
        self._keep(diff[usable], magnitude[usable], key)
        if ref.ndim == 2 and ref.shape[1] > 1:
            self.classifier = True
            self.top1_agree += int((ref.argmax(axis=1) == cand.argmax(axis=1)).sum())
            if labels is not None:
                self.correct += int((cand.argmax(axis=1) == labels).sum())
                self.labelled += batch

    def _keep(self, diffs: np.ndarray, magnitudes: np.ndarray, key: tuple[int, int]) -> None:
        """Offer a slice's errors to the subsample, each with a uniform priority from a generator seeded by the
        slice's key (its batch's global index and its number in the batch)."""
        if diffs.size == 0:
            return
        priority = np.random.default_rng(key).random(diffs.size)
        if diffs.size > SUBSAMPLE:
            chosen = np.argpartition(priority, SUBSAMPLE)[:SUBSAMPLE]
            priority, diffs, magnitudes = priority[chosen], diffs[chosen], magnitudes[chosen]
        self._join(np.stack([priority, diffs, magnitudes], axis=1))

    def _join(self, rows: np.ndarray) -> None:
        """Keep the :data:`SUBSAMPLE` rows of smallest priority among the kept ones and ``rows``."""
        kept = np.concatenate([self._kept, rows])
        if len(kept) > SUBSAMPLE:
            kept = kept[np.argpartition(kept[:, 0], SUBSAMPLE)[:SUBSAMPLE]]
        self._kept = kept

    @property
    def p99_abs(self) -> float:
        """The 99th percentile of |error| (over the kept subsample: every value when there are at most
        :data:`SUBSAMPLE`)."""
        return float(np.quantile(self._kept[:, 1], 0.99)) if len(self._kept) else 0.0

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
        """Kept |errors| (for histograms), in priority order."""
        return self._by_priority()[:, 1]

    def scatter_points(self) -> np.ndarray:
        """Up to PLOT_POINTS (|reference|, |error|) pairs (for error-vs-magnitude plots): the kept values of
        smallest priority, themselves a uniform subsample."""
        return self._by_priority()[:PLOT_POINTS, [2, 1]]

    def _by_priority(self) -> np.ndarray:
        return self._kept[np.argsort(self._kept[:, 0], kind="stable")]

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


def _scale_of(reference: np.ndarray) -> float:
    """The largest finite |value| of ``reference`` (0 when there is none)."""
    magnitude = np.abs(np.asarray(reference, dtype=np.float64))
    return float(magnitude[np.isfinite(magnitude)].max(initial=0.0))


def _floor(scale: float) -> float:
    """The smallest denominator of the relative error: 1e-3 of the batch's scale."""
    return max(scale * 1e-3, 1e-12)


def _sig(value: float, digits: int = 4) -> float | str:
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return float(f"{value:.{digits}g}")

"""Comparing a candidate's outputs with a reference's, batch by batch: the one comparison step that the FP32
export check and every verify backend share.

The error of an output is measured relative to its scale (the largest reference magnitude), so one
tolerance serves logits and probabilities alike. The statistics are :class:`mpexport.check.metrics.OutputMetrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpexport.backends.base import Runner
from mpexport.base import specs
from mpexport.base.specs import Batch
from mpexport.check.metrics import OutputMetrics

FP32_RTOL = 1e-4
"""Largest error of an FP32 ONNX model against PyTorch FP32, relative to the output's scale (the export check
and verify's ``onnx-fp32`` gate)."""


@dataclass
class Comparison:
    """Per-output metrics of a candidate against a reference over the batches folded in so far. A differing
    number of outputs or an output of another shape is recorded as a mismatch, never compared."""

    reference: str
    candidate: str
    outputs: list[OutputMetrics]
    rtol: float = FP32_RTOL
    samples: int = 0
    mismatches: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def of(reference: str, candidate: str, output_names: Sequence[str], rtol: float = FP32_RTOL) -> Comparison:
        """An empty comparison of the named outputs."""
        return Comparison(reference, candidate, [OutputMetrics(name) for name in output_names], rtol)

    def fold(self, expected: Sequence[np.ndarray], actual: Sequence[np.ndarray], *, samples: int,
             labels: np.ndarray | None = None, batch: int | None = None) -> None:
        """Fold the outputs of one batch of ``samples`` samples in (in output order; ``labels`` for the accuracy
        of classifier outputs; ``batch``: its index in the whole set, see :meth:`OutputMetrics.update`)."""
        for index, stats in enumerate(self.outputs):
            if index >= len(expected) or index >= len(actual):
                self.mismatches[stats.name] = f"{len(expected)} reference outputs vs {len(actual)}"
                continue
            want, have = np.asarray(expected[index]), np.asarray(actual[index])
            if want.shape != have.shape:
                self.mismatches[stats.name] = f"shape {tuple(want.shape)} vs {tuple(have.shape)}"
                continue
            stats.update(want, have, labels, batch=batch)
        self.samples += samples

    def merge(self, other: Comparison) -> None:
        """Fold in ``other``, the same comparison over other batches: equal to one pass over both."""
        for mine, theirs in zip(self.outputs, other.outputs, strict=True):
            mine.merge(theirs)
        self.samples += other.samples
        self.mismatches = {**other.mismatches, **self.mismatches}

    def by_name(self) -> dict[str, OutputMetrics]:
        """The metrics per output name."""
        return {output.name: output for output in self.outputs}

    def relative_error(self, output: OutputMetrics) -> float:
        """Max abs error of ``output`` divided by its scale (by 1 when the reference is all zeros)."""
        return output.max_abs / (output.scale if output.scale > 0 else 1.0)

    def output_passed(self, output: OutputMetrics) -> bool:
        """Shapes agree, nothing became non-finite and the relative error is within ``rtol``."""
        return output.name not in self.mismatches and output.nonfinite == 0 and \
            self.relative_error(output) <= self.rtol

    @property
    def passed(self) -> bool:
        """True when every output passed."""
        return bool(self.outputs) and all(self.output_passed(output) for output in self.outputs)

    def worst(self) -> OutputMetrics:
        """The output with the largest relative error (shape mismatches and non-finite values first)."""
        return max(self.outputs, key=lambda o: (o.name in self.mismatches, o.nonfinite, self.relative_error(o)))

    def to_json(self) -> dict[str, Any]:
        """The comparison as recorded in the manifest."""
        outputs = {}
        for output in self.outputs:
            data: dict[str, Any] = {
                "max_abs_error": float(f"{output.max_abs:.3e}"), "scale": float(f"{output.scale:.4g}"),
                "relative_error": float(f"{self.relative_error(output):.3e}"), "nonfinite": output.nonfinite,
                "passed": self.output_passed(output),
            }
            if output.name in self.mismatches:
                data["shape_mismatch"] = self.mismatches[output.name]
            outputs[output.name] = data
        return {"reference": self.reference, "candidate": self.candidate, "rtol": self.rtol,
                "samples": self.samples, "passed": self.passed, "outputs": outputs}


def compare_runners(reference: Runner, candidate: Runner, batches: Iterable[Batch], output_names: Sequence[str],
                    *, rtol: float = FP32_RTOL, on_batch: Callable[[int], None] | None = None) -> Comparison:
    """Run both runners on every batch and fold ``candidate``'s outputs against ``reference``'s, a padded batch's
    real samples only (``on_batch`` hears the number of samples compared so far)."""
    comparison = Comparison.of(reference.name, candidate.name, output_names, rtol)
    for batch in batches:
        comparison.fold(specs.real_rows(reference.run(batch), batch), specs.real_rows(candidate.run(batch), batch),
                        samples=batch_samples(batch))
        if on_batch:
            on_batch(comparison.samples)
    return comparison


def batch_samples(batch: Batch) -> int:
    """The number of real samples in a batch (see :func:`mpexport.base.specs.batch_samples`: a padded batch counts
    only its real samples, rank-0 arrays none; 1 when every array is a scalar)."""
    return specs.batch_samples(batch)

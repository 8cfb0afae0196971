"""Output comparison between two runners on the same batches: the FP32 export check.

The error of an output is measured relative to its scale (the largest reference magnitude), so one
tolerance serves logits and probabilities alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpexport.runners import Batch, Runner

EXPORT_RTOL = 1e-4
"""Largest FP32 export error accepted, relative to the output's scale."""


@dataclass
class OutputError:
    """Streaming error statistics of one output: max abs error, reference scale, non-finite counts."""

    name: str
    max_abs_error: float = 0.0
    scale: float = 0.0
    samples: int = 0
    nonfinite: int = 0
    shape_mismatch: str | None = None

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Fold one batch of reference and candidate values into the statistics."""
        if reference.shape != candidate.shape:
            self.shape_mismatch = f"{tuple(reference.shape)} vs {tuple(candidate.shape)}"
            return
        reference = reference.astype(np.float64)
        candidate = candidate.astype(np.float64)
        finite = np.isfinite(reference)
        self.nonfinite += int((~np.isfinite(candidate) & finite).sum())
        if finite.any():
            diff = np.abs(reference - candidate)[finite]
            self.max_abs_error = max(self.max_abs_error, float(np.nan_to_num(diff, nan=np.inf).max()))
            self.scale = max(self.scale, float(np.abs(reference[finite]).max()))
        self.samples += reference.shape[0] if reference.ndim else 1

    @property
    def relative_error(self) -> float:
        """Max abs error divided by the output's scale (by 1 when the reference is all zeros)."""
        return self.max_abs_error / (self.scale if self.scale > 0 else 1.0)

    def passed(self, rtol: float) -> bool:
        """True when shapes agree, nothing became non-finite and the relative error is within ``rtol``."""
        return self.shape_mismatch is None and self.nonfinite == 0 and self.relative_error <= rtol

    def to_json(self, rtol: float) -> dict[str, Any]:
        """The statistics as recorded in the manifest."""
        data: dict[str, Any] = {
            "max_abs_error": float(f"{self.max_abs_error:.3e}"), "scale": float(f"{self.scale:.4g}"),
            "relative_error": float(f"{self.relative_error:.3e}"), "nonfinite": self.nonfinite,
            "passed": self.passed(rtol),
        }
        if self.shape_mismatch:
            data["shape_mismatch"] = self.shape_mismatch
        return data


@dataclass
class Comparison:
    """Per-output errors of a candidate runner against a reference runner over some batches."""

    reference: str
    candidate: str
    rtol: float
    outputs: list[OutputError] = field(default_factory=list)
    samples: int = 0

    @property
    def passed(self) -> bool:
        """True when every output passed."""
        return bool(self.outputs) and all(output.passed(self.rtol) for output in self.outputs)

    def worst(self) -> OutputError:
        """The output with the largest relative error."""
        return max(self.outputs, key=lambda output: (output.shape_mismatch is not None, output.nonfinite,
                                                     output.relative_error))

    def to_json(self) -> dict[str, Any]:
        """The comparison as recorded in the manifest."""
        return {
            "reference": self.reference, "candidate": self.candidate, "rtol": self.rtol,
            "samples": self.samples, "passed": self.passed,
            "outputs": {output.name: output.to_json(self.rtol) for output in self.outputs},
        }


def compare_runners(reference: Runner, candidate: Runner, batches: Iterable[Batch], output_names: list[str],
                    *, rtol: float = EXPORT_RTOL) -> Comparison:
    """Run both runners on every batch and accumulate per-output errors of ``candidate`` against
    ``reference``. A differing number of outputs is a shape mismatch on the missing ones."""
    comparison = Comparison(reference.name, candidate.name, rtol, [OutputError(name) for name in output_names])
    for batch in batches:
        expected, actual = reference.run(batch), candidate.run(batch)
        for index, stats in enumerate(comparison.outputs):
            if index >= len(expected) or index >= len(actual):
                stats.shape_mismatch = f"{len(expected)} reference outputs vs {len(actual)}"
                continue
            stats.update(np.asarray(expected[index]), np.asarray(actual[index]))
        comparison.samples += len(next(iter(batch.values())))
    return comparison

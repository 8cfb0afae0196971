"""The FP32 export check: ONNX Runtime against PyTorch FP32 on the same batches, per output.

The error of an output is measured relative to its scale (the largest reference magnitude), so one
tolerance serves logits and probabilities alike. The statistics are :class:`mpexport.metrics.OutputMetrics`,
the same that ``verify`` reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpexport.metrics import OutputMetrics
from mpexport.runners import Batch, Runner

EXPORT_RTOL = 1e-4
"""Largest FP32 export error accepted, relative to the output's scale."""


@dataclass
class Comparison:
    """Per-output metrics of a candidate runner against a reference runner over some batches."""

    reference: str
    candidate: str
    rtol: float
    outputs: list[OutputMetrics] = field(default_factory=list)
    samples: int = 0
    mismatches: dict[str, str] = field(default_factory=dict)

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


def compare_runners(reference: Runner, candidate: Runner, batches: Iterable[Batch], output_names: list[str],
                    *, rtol: float = EXPORT_RTOL) -> Comparison:
    """Run both runners on every batch and accumulate per-output errors of ``candidate`` against
    ``reference``. A differing number or shape of outputs is recorded as a mismatch."""
    comparison = Comparison(reference.name, candidate.name, rtol, [OutputMetrics(name) for name in output_names])
    for batch in batches:
        expected, actual = reference.run(batch), candidate.run(batch)
        for index, stats in enumerate(comparison.outputs):
            if index >= len(expected) or index >= len(actual):
                comparison.mismatches[stats.name] = f"{len(expected)} reference outputs vs {len(actual)}"
                continue
            want, have = np.asarray(expected[index]), np.asarray(actual[index])
            if want.shape != have.shape:
                comparison.mismatches[stats.name] = f"{tuple(want.shape)} vs {tuple(have.shape)}"
                continue
            stats.update(want, have)
        comparison.samples += len(next(iter(batch.values())))
    return comparison

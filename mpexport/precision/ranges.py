"""Calibration statistics for the range rule: the largest |value| every floating-point tensor of the FP32
ONNX model reaches on calibration data, and the tensors' shapes (for MAC counts), streamed over batches.

The statistics are computed inside the graph (:class:`mpexport.graph.probes.AddRangeProbes`), right after each float
node output: ``ReduceMax(x)`` and ``ReduceMin(x)`` (the peak |x| without a temporary), ``ReduceSum(x)`` (not finite when
an element is NaN or infinite, or when the sum overflows, which needs elements far beyond the FP16 range: a conservative
answer) and ``Shape(x)``. Only these small results leave ONNX Runtime and every intermediate is freed as in plain
inference, so calibrating a large model costs what running it costs, not the size of all its activations at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mpexport.backends.onnxruntime import OrtRunError, ir_session, one_line
from mpexport.base.specs import Batch, batch_samples
from mpexport.graph.probes import AddRangeProbes, ExposeIntermediates
from mpexport.precision.plan import RangeStats


class ProbedRunner:
    """The FP32 model in ONNX Runtime with the probes attached, as a :class:`mpexport.backends.base.Runner`:
    ``run(batch)`` returns the model's own outputs and, while :attr:`calibrating`, folds every float value's
    peak into :attr:`stats`. One pass over the data thus serves the export check and the range rule.

    ``shared_weights``: initializers ONNX Runtime uses in place (see
    :func:`mpexport.backends.onnxruntime.session_options`).
    ``probe=False`` runs the plain model (no statistics)."""

    def __init__(self, model_path: str | Path, *, shared_weights: Mapping[str, np.ndarray] | None = None,
                 probe: bool = True, name: str = "onnx-fp32") -> None:
        model = ir.load(str(model_path))
        self.name = name
        self.output_names = [value.name or "" for value in model.graph.outputs]
        probes = AddRangeProbes()
        if probe:
            probes(model)
        self.probes = probes.probes
        self.session = ir_session(model, Path(model_path).parent, in_graph_order=True, shared_weights=shared_weights)
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.session_outputs = [value.name for value in self.session.get_outputs()]
        self.stats = RangeStats({}, {}, 0)
        self.calibrating = probe

    def run(self, batch: Batch) -> list[np.ndarray]:
        """The model's outputs for ``batch``; its range statistics folded in while calibrating."""
        try:
            results = self.session.run(None, {name: batch[name] for name in self.input_names})
        except Exception as exc:  # ONNX Runtime's error, kept whole on one line
            raise OrtRunError(f"calibration: {one_line(str(exc))}") from exc
        count = len(self.output_names)
        if self.calibrating:
            self._fold(dict(zip(self.session_outputs, results, strict=True)), batch_samples(batch))
        return list(results[:count])

    def _fold(self, results: dict[str, np.ndarray], samples: int) -> None:
        for probe in self.probes:
            peak = max(float(results[probe.high]), -float(results[probe.low]), 0.0)  # an empty tensor: -inf, inf
            if not math.isfinite(float(results[probe.total])):
                peak = math.inf
            self.stats.max_abs[probe.value] = max(self.stats.max_abs.get(probe.value, 0.0), peak)
            self.stats.shapes.setdefault(probe.value, tuple(int(dim) for dim in results[probe.shape]))
        self.stats.samples += samples


def collect_ranges(model_path: str | Path, batches: Iterable[Batch], *,
                   shared_weights: Mapping[str, np.ndarray] | None = None) -> RangeStats:
    """Run the model in ONNX Runtime on every batch and keep per floating-point value of the main graph the
    running max of |value| (infinite once a NaN or infinity appears) and its shape on the first batch."""
    runner = ProbedRunner(model_path, shared_weights=shared_weights)
    for batch in batches:
        runner.run(batch)
    return runner.stats


def intermediates_session(model: ir.Model, base_dir: str | Path) -> tuple[Any, list[str]]:
    """An ONNX Runtime CPU session of ``model`` (changed in place) with every floating-point node output of the
    main graph exposed as a graph output, and those outputs' names in graph order (all of a run's intermediates
    come back at once: meant for one small batch, as verify's localisation uses it). External weights are read
    from ``base_dir``."""
    exposed = ExposeIntermediates()
    exposed(model)
    return ir_session(model, base_dir), exposed.names

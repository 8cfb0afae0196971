"""Calibration statistics for the range rule: the largest |value| every floating-point tensor of the FP32
ONNX model reaches on calibration data, and the tensors' shapes (for MAC counts), streamed over batches.

The statistics are computed inside the graph, right after each float node output: ``ReduceMax(x)`` and
``ReduceMin(x)`` (the peak |x| without a temporary), ``ReduceSum(x)`` (not finite when an element is NaN or
infinite, or when the sum overflows, which needs elements far beyond the FP16 range: a conservative answer) and
``Shape(x)``. Only these small results leave ONNX Runtime and every intermediate is freed as in plain inference,
so calibrating a large model costs what running it costs, not the size of all its activations at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mpexport.backends.onnxruntime import ir_session
from mpexport.base.dtypes import precision_of
from mpexport.base.specs import Batch
from mpexport.precision.plan import RangeStats


@dataclass(frozen=True)
class _Probe:
    """The graph outputs that measure one value: its max, its min, its sum (the non-finite flag), its shape."""

    value: str
    high: str
    low: str
    total: str
    shape: str


class ProbedRunner:
    """The FP32 model in ONNX Runtime with the probes attached, as a :class:`mpexport.backends.onnxruntime.Runner`:
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
        self.probes = _add_probes(model) if probe else []
        self.session = ir_session(model, Path(model_path).parent, in_graph_order=True, shared_weights=shared_weights)
        self.input_names = [value.name for value in self.session.get_inputs()]
        self.session_outputs = [value.name for value in self.session.get_outputs()]
        self.stats = RangeStats({}, {}, 0)
        self.calibrating = probe

    def run(self, batch: Batch) -> list[np.ndarray]:
        """The model's outputs for ``batch``; its range statistics folded in while calibrating."""
        results = self.session.run(None, {name: batch[name] for name in self.input_names})
        count = len(self.output_names)
        if self.calibrating:
            self._fold(dict(zip(self.session_outputs, results, strict=True)), len(next(iter(batch.values()))))
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


def _add_probes(model: ir.Model) -> list[_Probe]:
    """Insert the measuring nodes right after the producer of every float node output of the main graph (so
    ONNX Runtime can free each value as soon as its own consumers ran) and add their results to the graph's
    outputs, after the model's own."""
    graph = model.graph
    probes, outputs = [], []
    for producer in list(graph):
        added: list[ir.Node] = []
        for value in producer.outputs:
            if not _is_float(value):
                continue
            source = value
            if value.dtype != ir.DataType.FLOAT:
                added.append(_node("Cast", source, {"to": ir.DataType.FLOAT}, f"{value.name}__probe_float"))
                source = added[-1].outputs[0]
            measures = [_node("ReduceMax", source, {"keepdims": 0}, f"{value.name}__probe_max"),
                        _node("ReduceMin", source, {"keepdims": 0}, f"{value.name}__probe_min"),
                        _node("ReduceSum", source, {"keepdims": 0}, f"{value.name}__probe_sum"),
                        _node("Shape", value, {}, f"{value.name}__probe_shape")]
            added += measures
            probes.append(_Probe(value.name or "", *(node.name or "" for node in measures)))
            outputs += [node.outputs[0] for node in measures]
        if added:
            graph.insert_after(producer, added)
    graph.outputs.extend(outputs)
    return probes


def _node(op_type: str, source: ir.Value, attributes: dict[str, Any], name: str) -> ir.Node:
    node = ir.node(op_type, [source], attributes, name=name)
    node.outputs[0].name = name
    return node


def _is_float(value: ir.Value) -> bool:
    return bool(value.name and precision_of(value.dtype) and value.type is not None)


def _float_values(graph: ir.Graph) -> list[ir.Value]:
    """Every typed floating-point node output of the graph, in graph order."""
    return [value for node in graph for value in node.outputs if _is_float(value)]


def intermediates_session(model: ir.Model, base_dir: str | Path) -> tuple[Any, list[str]]:
    """An ONNX Runtime CPU session of ``model`` (changed in place) with every floating-point node output of the
    main graph exposed as a graph output, and those outputs' names in graph order (all of a run's intermediates
    come back at once: meant for one small batch, as verify's localisation uses it). External weights are read
    from ``base_dir``."""
    existing = {value.name for value in model.graph.outputs}
    names = []
    for value in _float_values(model.graph):
        if value.name not in existing:
            model.graph.outputs.append(value)
            existing.add(value.name)
        names.append(value.name or "")
    return ir_session(model, base_dir), names

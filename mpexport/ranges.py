"""Calibration statistics for the range rule: the largest |value| every floating-point tensor of the FP32
ONNX model reaches on calibration data, and the tensors' shapes (for MAC counts), streamed over batches."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from mpexport.plan import ONNX_FLOAT_TYPES, RangeStats
from mpexport.runners import Batch


def collect_ranges(model_path: str | Path, batches: Iterable[Batch]) -> RangeStats:
    """Run the model in ONNX Runtime with every floating-point intermediate exposed as an output, and keep
    per tensor the running max of |value| (NaN/Inf count as infinite) and its shape on the first batch."""
    session, names = intermediates_session(model_path)
    inputs = [value.name for value in session.get_inputs()]
    max_abs: dict[str, float] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    samples = 0
    for batch in batches:
        results = session.run(names, {name: batch[name] for name in inputs})
        for name, array in zip(names, results, strict=True):
            peak = _peak(array)
            max_abs[name] = max(max_abs.get(name, 0.0), peak)
            shapes.setdefault(name, tuple(array.shape))
        samples += len(next(iter(batch.values())))
    return RangeStats(max_abs, shapes, samples)


def intermediates_session(model_path: str | Path) -> tuple[Any, list[str]]:
    """An ONNX Runtime CPU session of the model with every floating-point node output of the main graph exposed
    as a graph output, and those outputs' names in graph order."""
    import onnxruntime as ort

    model = ir.load(str(model_path))
    names = _expose_float_values(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]), names


def _expose_float_values(model: ir.Model) -> list[str]:
    """Add every float node output of the main graph to the graph outputs; return their names."""
    existing = {value.name for value in model.graph.outputs}
    names = []
    for node in model.graph:
        for value in node.outputs:
            if value.name and ONNX_FLOAT_TYPES.get(value.dtype) and value.type is not None:
                if value.name not in existing:
                    model.graph.outputs.append(value)
                    existing.add(value.name)
                names.append(value.name)
    return names


def _peak(array: np.ndarray) -> float:
    """max |value| (infinite when any value is NaN or infinite), without copying the array."""
    if array.size == 0:
        return 0.0
    peak = float(max(np.max(array), -np.min(array)))
    return peak if np.isfinite(peak) else float("inf")

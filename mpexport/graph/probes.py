"""Passes that make a model report on its own values: range probes (the calibration statistics, computed inside
the graph) and exposed intermediates (every float value as a graph output, for localisation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from mpexport.base.dtypes import precision_of


@dataclass(frozen=True)
class Probe:
    """The graph outputs that measure one value: its max, its min, its sum (the non-finite flag), its shape."""

    value: str
    high: str
    low: str
    total: str
    shape: str


class AddRangeProbes(ir.passes.InPlacePass):
    """Insert measuring nodes right after the producer of every float node output of the main graph (so ONNX
    Runtime can free each value as soon as its own consumers ran) and add their results to the graph's outputs,
    after the model's own: ``ReduceMax(x)`` and ``ReduceMin(x)`` (the peak |x| without a temporary), ``ReduceSum(x)``
    (not finite when an element is NaN or infinite) and ``Shape(x)``; a value that is not FP32 is cast first.

    Ensures: the model's own outputs come first and unchanged, and every probe's four results are graph outputs.
    :attr:`probes` lists them, one per measured value."""

    def __init__(self) -> None:
        super().__init__()
        self.probes: list[Probe] = []
        self._outputs: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Attach the probes."""
        graph = model.graph
        self._outputs = [value.name or "" for value in graph.outputs]
        outputs = []
        for producer in list(graph):
            added: list[ir.Node] = []
            for value in producer.outputs:
                if not is_float(value):
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
                self.probes.append(Probe(value.name or "", *(node.name or "" for node in measures)))
                outputs += [node.outputs[0] for node in measures]
            if added:
                graph.insert_after(producer, added)
        graph.outputs.extend(outputs)
        return ir.passes.PassResult(model, modified=bool(self.probes))

    def ensures(self, model: ir.Model) -> None:
        """The model's outputs first, then every probe's results."""
        names = [value.name or "" for value in model.graph.outputs]
        if names[:len(self._outputs)] != self._outputs:
            raise ir.passes.PostconditionError("the probes moved the model's own outputs")
        missing = {name for probe in self.probes for name in (probe.high, probe.low, probe.total, probe.shape)}
        missing -= set(names)
        if missing:
            raise ir.passes.PostconditionError(f"probe results are not graph outputs: {sorted(missing)[:3]}")


class ExposeIntermediates(ir.passes.InPlacePass):
    """Make every typed floating-point node output of the main graph a graph output (all of a run's intermediates
    come back at once: meant for one small batch). :attr:`names` lists them in graph order.

    Ensures: each of :attr:`names` is a graph output."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Expose the values."""
        existing = {value.name for value in model.graph.outputs}
        self.names = []
        for value in (value for node in model.graph for value in node.outputs if is_float(value)):
            if value.name not in existing:
                model.graph.outputs.append(value)
                existing.add(value.name)
            self.names.append(value.name or "")
        return ir.passes.PassResult(model, modified=bool(self.names))

    def ensures(self, model: ir.Model) -> None:
        """Every exposed value is a graph output."""
        outputs = {value.name for value in model.graph.outputs}
        if any(name not in outputs for name in self.names):
            raise ir.passes.PostconditionError("an intermediate was not exposed")


def is_float(value: ir.Value) -> bool:
    """A named, typed floating-point value."""
    return bool(value.name and precision_of(value.dtype) and value.type is not None)


def _node(op_type: str, source: ir.Value, attributes: dict[str, Any], name: str) -> ir.Node:
    node = ir.node(op_type, [source], attributes, name=name)
    node.outputs[0].name = name
    return node

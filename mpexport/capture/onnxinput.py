"""An FP32 ONNX model exported elsewhere (Optimum, the TorchScript exporter, another team's pipeline) as
``convert``'s input: read and checked (a valid model as ONNX Runtime reads it, FP32 throughout, its external data
present), its nodes named uniquely, and its provenance recorded from what it carries: the dynamo exporter's per-node
metadata where present (the plan then decides exactly as for a ``.pt2``), else the module scopes the TorchScript
exporter writes into node names, else nothing. Without aten ops the plan infers them from op types and recognises the
fused patterns the policy cares about (:mod:`mpexport.precision.patterns`), and every such reason says so.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from mpexport.base.dtypes import LOW_ONNX_TYPES, PRECISION_OF_ONNX
from mpexport.base.errors import MpexportError, first_line
from mpexport.capture.provenance import CLASS_HIERARCHY
from mpexport.graph.checker import Unregistered, check_setting_aside, describe, runtime_finding, unregistered_ops
from mpexport.graph.walk import infer_types, name_nodes_uniquely, walk

STAGE = "load"
MIN_OPSET = 13
"""The oldest default-domain opset the writer supports (Softmax/ReduceSum semantics it relies on)."""


def read_fp32_onnx(path: str | Path, notes: list[str] | None = None) -> ir.Model:
    """The model at ``path``, checked: readable, its external data present, valid for the ONNX checker, opset
    :data:`MIN_OPSET` or newer, and FP32 (no FP16/BF16 value, initializer, input or output). Every problem is a
    one-line :class:`MpexportError` (exit 2). Untyped values are typed by shape inference, nodes without a unique
    name are named.

    What ONNX Runtime accepts is accepted: where the checker refuses the model only for ops ONNX does not register
    at its opset (``LayerNormalization`` below opset 17, as ONNX Runtime's transformers optimizer writes it) and
    ONNX Runtime loads it, it is read, and a note saying so is appended to ``notes``
    (:mod:`mpexport.graph.checker`)."""
    path = Path(path)
    # each check on its own, before the model is read: its parsed copy is freed first (the peak is one copy)
    invalid = _checker_finding(path)
    runtime = runtime_finding(path) if invalid is not None else None
    try:
        model = ir.load(str(path))
    except Exception as exc:  # noqa: BLE001 - anything unreadable is bad input
        raise MpexportError(f"'{path}' is not a readable ONNX model: {first_line(exc)}", stage=STAGE) from None
    _check_external_data(model, path)
    _default_domain_by_one_name(model)
    if invalid is not None:
        note = _what_onnx_runtime_accepts(model, path, invalid, runtime)
        if notes is not None:
            notes.append(note)
    infer_types(model)
    opset = model.opset_imports.get("", 0)
    if opset < MIN_OPSET:
        raise MpexportError(f"'{path}' uses ONNX opset {opset}; mpexport writes mixed precision from opset "
                            f"{MIN_OPSET} on", stage=STAGE,
                            hint="re-export it at a newer opset, or upgrade it with onnx.version_converter")
    low = _first_low_precision_value(model)
    if low is not None:
        what, dtype = low
        raise MpexportError(f"'{path}' is not an FP32 model: {what} is already {PRECISION_OF_ONNX[dtype].upper()}",
                            stage=STAGE, hint="give the FP32 ONNX the model was converted from")
    name_nodes_uniquely(model)
    return model


def _default_domain_by_one_name(model: ir.Model) -> None:
    """Name ONNX's default operator set ``""`` throughout: ``ai.onnx`` is its other name (ONNX Runtime's generators
    import it so), and the rest of mpexport reads the opset under ``""``."""
    if "ai.onnx" not in model.opset_imports:
        return
    version = model.opset_imports.pop("ai.onnx")
    model.opset_imports[""] = max(version, model.opset_imports.get("", 0))
    for visited in walk(model.graph):
        if visited.node.domain == "ai.onnx":
            visited.node.domain = ""


def _checker_finding(path: Path) -> str | None:
    """The ONNX checker's finding on the file (its first line), or None."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - the checker's verdict is the finding
        return first_line(exc)
    return None


def _what_onnx_runtime_accepts(model: ir.Model, path: Path, invalid: str, runtime: str | None) -> str:
    """The note accepting a model the checker refused (``invalid``) only for ops ONNX does not register at its
    opset, or for graph outputs that declare no type, where ONNX Runtime loads it (``runtime`` is None); else the
    one-line refusal."""
    untyped = [value.name or "" for value in model.graph.outputs if value.type is None]
    if untyped and runtime is None and "type" in invalid:
        return (f"graph output(s) {', '.join(untyped)} declare no type (the ONNX checker requires one); ONNX Runtime "
                "runs the model, and their types are taken from it")
    ops = unregistered_ops(model)
    if not ops:
        raise MpexportError(f"'{path}' is not a valid ONNX model: {invalid}", stage=STAGE)
    other = check_setting_aside(model, ops)
    if other is not None:
        raise MpexportError(f"'{path}' is not a valid ONNX model: {other}", stage=STAGE)
    if runtime is not None:
        raise MpexportError(f"'{path}' is not a valid ONNX model: {invalid}; nor does ONNX Runtime load it: "
                            f"{runtime}", stage=STAGE, hint=_hint(ops))
    import onnxruntime as ort

    return (f"not registered by ONNX at the model's opset, run by ONNX Runtime {ort.__version__}: {describe(ops)}; "
            "the model is read as ONNX Runtime reads it (the ONNX checker checked everything else)")


def _hint(ops: list[Unregistered]) -> str:
    """What makes a model with ``ops`` valid: the opset ONNX registers them at, where there is one."""
    standard = [op for op in ops if op.since is not None]
    if standard:
        opset = max(op.since or 0 for op in standard)
        names = ", ".join(op.op_type for op in standard)
        return f"export the model at opset {opset} or newer, where ONNX has {names} (torch.onnx.export(..., " \
            f"opset_version={opset}))"
    return f"give the model before the tool that wrote {', '.join(op.op_type for op in ops)} changed it"


def drop_initializer_inputs(model: ir.Model) -> list[str]:
    """Remove from the graph's inputs every one that an initializer backs, and return their names: a model of IR
    version 3 (the classic model zoo's) must list every weight as a graph input too, and ONNX Runtime runs such a
    model fed with its real inputs alone. They stay initializers (weights); the model's IR version becomes at least
    4, the first in which an initializer need not be an input."""
    graph = model.graph
    backed = [value for value in graph.inputs if value.name in graph.initializers]
    for value in backed:
        graph.inputs.remove(value)
    if backed:
        model.ir_version = max(model.ir_version or 0, 4)
    return [value.name or "" for value in backed]


def provenance_kind(model: ir.Model) -> str:
    """What the model records about where its nodes came from: ``exporter`` (the dynamo exporter's metadata),
    ``scope`` (module scopes in node names, as the TorchScript exporter writes them) or ``none``."""
    nodes = [visited.node for visited in walk(model.graph)]
    if nodes and sum(CLASS_HIERARCHY in node.metadata_props for node in nodes) >= len(nodes) // 2:
        return "exporter"
    if nodes and sum((node.name or "").startswith("/") for node in nodes) >= len(nodes) // 2:
        return "scope"
    return "none"


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = Path(tensor.base_dir) / tensor.location
        if not location.is_file():
            raise MpexportError(f"the external data file '{location}' of '{path}' is missing (initializer "
                                f"'{value.name}' is stored there)", stage=STAGE,
                                hint="keep the .data file beside the .onnx file it belongs to")
        if location.stat().st_size < (tensor.offset or 0) + (tensor.length or 0):
            raise MpexportError(f"the external data file '{location}' of '{path}' is shorter than initializer "
                                f"'{value.name}' needs: truncated?", stage=STAGE)


def _first_low_precision_value(model: ir.Model) -> tuple[str, ir.DataType] | None:
    graph = model.graph
    for value in (*graph.inputs, *graph.outputs, *graph.initializers.values()):
        if value.dtype in LOW_ONNX_TYPES:
            return f"'{value.name}'", value.dtype
    for visited in walk(graph):
        for value in visited.node.outputs:
            if value.dtype in LOW_ONNX_TYPES:
                return f"the output '{value.name}' of node '{visited.node.name}'", value.dtype
    return None

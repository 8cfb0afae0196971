"""Export stage: a loaded model to an FP32 ONNX model that keeps per-node provenance.

Capture strategies are explicit objects tried in order; each failure is recorded with its reason, so the
manifest says which strategy produced the ONNX and why the better ones did not:

1. ``dynamo``: ``torch.onnx.export(dynamo=True)`` with the requested dynamic dims (provenance on every node);
2. ``dynamo-static``: the same with every dim fixed to the example's size (a model that hard-codes its
   batch size);
3. ``torchscript-converter`` (TorchScript input): TorchScript -> ExportedProgram -> dynamo exporter;
4. ``legacy-torchscript``: the TorchScript-based exporter (module scopes in node names, no aten op).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import onnx
import onnx_ir as ir
import torch

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.specs import TensorSpec
from mpexport.capture.fxfacts import FxFacts, collect_fx_facts
from mpexport.capture.optimize import optimize_keeping_provenance
from mpexport.graph.walk import name_nodes_uniquely, walk
from mpexport.sources.model import FORMAT_TORCHSCRIPT, LoadedModel

STAGE = "export"
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='(?P<op>[\w.]+)'(?:, overload='(?P<overload>\w+)')?"),
    re.compile(r"\b(?P<op>(?:aten|prims|torchvision)\.\w+(?:\.\w+)?)"),
    re.compile(r"\b(?P<op>[a-z_]\w*::\w+)"),
)
_SHAPE_FAILURE = re.compile(r"Constraints violated|specializ|dynamic_shapes|ConstraintViolation|Dim\(", re.I)
_STEP_PATTERN = re.compile(r"This is step (\d)/3")
_STEP_NAMES = {
    "1": "capture with torch.export",
    "2": "decomposition for ONNX",
    "3": "translation to ONNX",
}


@dataclass
class ExportRequest:
    """What to export: the model, its inputs (specs and example tensors, by name) and output names."""

    model: LoadedModel
    inputs: list[TensorSpec]
    examples: dict[str, torch.Tensor]
    output_names: list[str]
    opset: int | None = None
    custom_translation_table: dict[Any, Any] | None = None
    """Translations for ops the exporter lacks (``torch.onnx.export``'s ``custom_translation_table``: an op
    overload such as ``torch.ops.mylib.op.default`` -> an onnxscript function); dynamo strategies only."""

    def example_args(self) -> tuple[torch.Tensor, ...]:
        """Example tensors in input order."""
        return tuple(self.examples[spec.name] for spec in self.inputs)


@dataclass
class Attempt:
    """One strategy tried: its name, whether it worked, and why not."""

    strategy: str
    ok: bool
    seconds: float
    error: str | None = None
    stage: str | None = None
    op: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The attempt as recorded in the manifest."""
        data: dict[str, Any] = {"strategy": self.strategy, "ok": self.ok, "seconds": round(self.seconds, 2)}
        for key in ("error", "stage", "op"):
            if getattr(self, key):
                data[key] = getattr(self, key)
        return data


@dataclass
class Captured:
    """What a strategy produced: the ONNX model, and the programs it came from where there were any (the
    captured one and the one the ONNX exporter translated after decomposing it)."""

    model: ir.Model
    source: torch.export.ExportedProgram | None = None
    decomposed: torch.export.ExportedProgram | None = None


@dataclass
class ExportResult:
    """The FP32 ONNX model (onnx-ir), the strategy that made it, every attempt, notes for the user, and the
    FX-level facts (origins, autocast regions, explicit casts) the ONNX graph no longer shows."""

    model: ir.Model
    strategy: str
    attempts: list[Attempt]
    facts: FxFacts = field(default_factory=FxFacts)
    notes: list[str] = field(default_factory=list)
    provenance_kind: str = "exporter"
    """``exporter``: per-node metadata from the dynamo exporter; ``scope``: module scopes in node names only."""
    renamed_nodes: int = 0
    """Nodes given a (unique) name: every stage keys on node names (:mod:`mpexport.graph.walk`)."""

    @property
    def fell_back(self) -> bool:
        """True when the first strategy tried did not produce the model."""
        return len(self.attempts) > 1


class CaptureStrategy(Protocol):
    """A way to turn a loaded model into ONNX."""

    name: str
    provenance_kind: str

    def applies(self, request: ExportRequest, failures: list[Attempt]) -> bool:
        """Whether this strategy can be tried for this model, given the failures of the strategies before."""

    def run(self, request: ExportRequest) -> Captured:
        """Export, or raise the exporter's own exception."""


class DynamoStrategy:
    """``torch.onnx.export(dynamo=True)``: the recommended exporter, provenance on every node."""

    provenance_kind = "exporter"

    def __init__(self, *, static: bool = False) -> None:
        self.static = static
        self.name = "dynamo-static" if static else "dynamo"

    def applies(self, request: ExportRequest, failures: list[Attempt]) -> bool:
        if request.model.format == FORMAT_TORCHSCRIPT:
            return False
        if self.static:
            shape_trouble = any(_SHAPE_FAILURE.search(attempt.error or "") for attempt in failures)
            return request.model.program is None and shape_trouble and any(s.dynamic_dims() for s in request.inputs)
        return True

    def run(self, request: ExportRequest) -> Captured:
        program = request.model.program
        if program is None:
            program = self._capture(request)
        onnx_program = torch.onnx.export(
            program, dynamo=True, output_names=request.output_names, opset_version=request.opset,
            verbose=False, optimize=False, custom_translation_table=request.custom_translation_table,
        )
        assert onnx_program is not None  # the dynamo exporter returns its ONNXProgram
        optimize_keeping_provenance(onnx_program.model)
        return Captured(onnx_program.model, program, onnx_program.exported_program)

    def _capture(self, request: ExportRequest) -> torch.export.ExportedProgram:
        """``torch.export`` (non-strict, then strict) with the requested dims dynamic (none when static)."""
        dynamic = {spec.name: ({axis: torch.export.Dim.DYNAMIC for axis in spec.dynamic_dims()} or None)
                   for spec in request.inputs}
        kwargs = dict(request.examples)
        module = request.model.module
        assert module is not None  # a model without a program is a module
        try:
            return torch.export.export(module, (), kwargs,
                                       dynamic_shapes=None if self.static else dynamic, strict=False)
        except Exception:  # noqa: BLE001 - strict tracing is the documented second try
            return torch.export.export(module, (), kwargs,
                                       dynamic_shapes=None if self.static else dynamic, strict=True)


class TorchScriptConverterStrategy:
    """TorchScript -> ExportedProgram (torch's converter) -> dynamo exporter: aten ops, no module paths."""

    name = "torchscript-converter"
    provenance_kind = "exporter-no-modules"

    def applies(self, request: ExportRequest, failures: list[Attempt]) -> bool:
        return request.model.format == FORMAT_TORCHSCRIPT

    def run(self, request: ExportRequest) -> Captured:
        module = cast(torch.jit.ScriptModule, request.model.module)  # a TorchScript file loads as one
        program = torchscript_program(module, request.example_args(), request.inputs)
        names = [spec.name for spec in request.inputs]
        onnx_program = torch.onnx.export(
            program, dynamo=True, input_names=names, output_names=request.output_names,
            opset_version=request.opset, verbose=False, optimize=False,
            custom_translation_table=request.custom_translation_table,
        )
        assert onnx_program is not None  # the dynamo exporter returns its ONNXProgram
        optimize_keeping_provenance(onnx_program.model)
        return Captured(onnx_program.model, program, onnx_program.exported_program)


def torchscript_program(module: torch.jit.ScriptModule, example_args: tuple[torch.Tensor, ...],
                        inputs: list[TensorSpec]) -> torch.export.ExportedProgram:
    """The ExportedProgram of a TorchScript module as the ``torchscript-converter`` strategy captures it (torch's
    converter, then re-exported with the requested dynamic dims so fixed sizes stay fixed: the converter makes
    every dim dynamic, which would put shape arithmetic into the graph)."""
    from torch._export.converter import TS2EPConverter

    converted = TS2EPConverter(module, example_args).convert()
    dynamic = tuple({axis: torch.export.Dim.DYNAMIC for axis in spec.dynamic_dims()} or None for spec in inputs)
    return torch.export.export(converted.module(), example_args, dynamic_shapes=dynamic)


class LegacyTorchScriptStrategy:
    """The TorchScript-based exporter (``dynamo=False``): module scopes survive in node names only."""

    name = "legacy-torchscript"
    provenance_kind = "scope"

    def applies(self, request: ExportRequest, failures: list[Attempt]) -> bool:
        return True

    def run(self, request: ExportRequest) -> Captured:
        buffer = io.BytesIO()
        names = [spec.name for spec in request.inputs]
        dynamic_axes = {spec.name: spec.dynamic_dims() for spec in request.inputs if spec.dynamic_dims()}
        positional = request.model.positional
        torch.onnx.export(
            request.model.callable(), request.example_args() if positional else (),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
            kwargs=None if positional else dict(request.examples), dynamo=False, input_names=names,
            output_names=request.output_names, dynamic_axes=dynamic_axes or None,
            opset_version=min(request.opset or 18, 18),
        )
        proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()), data_prop=True)
        return Captured(ir.from_proto(proto))


def default_strategies() -> list[CaptureStrategy]:
    """The strategies tried by :func:`export_onnx`, best first."""
    return [DynamoStrategy(), DynamoStrategy(static=True), TorchScriptConverterStrategy(), LegacyTorchScriptStrategy()]


def reuse_torchlib_functions() -> None:
    """Read the list of torchlib's ONNX functions once per process instead of once per export.

    torch's dynamo exporter builds its op registry anew on every ``torch.onnx.export`` call, and onnxscript's
    ``get_torchlib_ops`` re-parses the Python source of every torchlib function to build it (497 functions with
    torch 2.13: 0.8 s of the 1.1 s a small model's warm export takes on 2 cores). The functions are fixed once
    onnxscript is imported, and the registry torch builds from them stays per export (a custom translation table
    still goes into that export's registry only). Where this torch or onnxscript is laid out otherwise, nothing
    changes."""
    try:
        from torch.onnx._internal import _lazy_import

        apis = importlib.import_module(_lazy_import.onnxscript_apis._name)  # type: ignore[attr-defined]
        functions = apis.get_torchlib_ops
    except (ImportError, AttributeError):
        return
    if not hasattr(functions, "cache_info"):
        setattr(apis, "get_torchlib_ops", functools.cache(functions))  # noqa: B010 - a module attribute


def export_onnx(request: ExportRequest, strategies: list[CaptureStrategy] | None = None) -> ExportResult:
    """Export ``request`` to an FP32 ONNX model, trying capture strategies in order until one succeeds.

    Returns the first success with every attempt recorded. Raises :class:`MpexportError` naming the stage
    and the op that failed (from the first strategy's error) when none succeeds.
    """
    attempts: list[Attempt] = []
    reuse_torchlib_functions()
    for strategy in strategies or default_strategies():
        if not strategy.applies(request, attempts):
            continue
        start = time.perf_counter()
        try:
            with _quiet_exporter():
                captured = strategy.run(request)
        except Exception as exc:  # noqa: BLE001 - exporter failures are recorded, then the next is tried
            attempts.append(_failed_attempt(strategy.name, exc, time.perf_counter() - start))
            continue
        attempts.append(Attempt(strategy.name, True, time.perf_counter() - start))
        model = captured.model
        model.producer_name = "mpexport"
        rename_symbolic_dims(model, request.inputs)
        renamed = name_nodes_uniquely(model)
        facts = collect_fx_facts(captured.source, captured.decomposed)
        result = ExportResult(model, strategy.name, attempts, facts, provenance_kind=strategy.provenance_kind,
                              renamed_nodes=renamed)
        result.notes.extend(_export_notes(request, result))
        return result
    raise _export_failure(attempts)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' own prints, graph dumps, warnings and log lines (Python and C++ alike);
    mpexport reports what matters. ``MPEXPORT_DEBUG=1`` lets everything through."""
    if os.environ.get("MPEXPORT_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), _silenced_fds():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _silenced_fds() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null (what C++ code and cached Python streams write)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
        return
    with open(os.devnull, "w") as null:
        try:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _failed_attempt(name: str, exc: BaseException, seconds: float) -> Attempt:
    chain = _exception_chain(exc)
    texts = [re.sub(r"\x1b\[[0-9;]*m", "", str(item)) for item in chain]
    step = next((m.group(1) for text in texts if (m := _STEP_PATTERN.search(text))), None)
    root = chain[-1]
    return Attempt(
        strategy=name, ok=False, seconds=seconds, error=f"{type(root).__name__}: {first_line(root, 240)}",
        stage=_STEP_NAMES.get(step or "", None), op=_find_op(texts),
    )


def _find_op(texts: list[str]) -> str | None:
    """The operator an exporter error names (``aten.stft.default``, ``mylib::op``), innermost error first."""
    for pattern in _OP_PATTERNS:
        for text in reversed(texts):
            match = pattern.search(text)
            if match:
                overload = match.groupdict().get("overload")
                return match.group("op") + (f".{overload}" if overload else "")
    return None


def _export_failure(attempts: list[Attempt]) -> MpexportError:
    primary = attempts[0] if attempts else None
    if primary is None:
        return MpexportError("no export strategy applies to this model", stage=STAGE)
    where = primary.stage or "export"
    op = f" at op {primary.op}" if primary.op else ""
    tried = ", ".join(attempt.strategy for attempt in attempts)
    return MpexportError(
        f"export failed in {where}{op}: {primary.error} (tried: {tried})", stage=STAGE,
        hint=_hint_for(primary),
    )


def _hint_for(attempt: Attempt) -> str:
    if attempt.stage == _STEP_NAMES["1"]:
        return "make the model traceable by torch.export (no data-dependent Python control flow), " \
            "or save it with torch.export.save yourself"
    if attempt.op:
        return f"{attempt.op} has no ONNX translation; give one with mpexport.convert(..., " \
            "custom_translation_table={op: onnxscript_function}) or replace the op"
    return "set MPEXPORT_DEBUG=1 for the full exporter error"


def _export_notes(request: ExportRequest, result: ExportResult) -> list[str]:
    notes = []
    failed = [a for a in result.attempts if not a.ok]
    for attempt in failed:
        notes.append(f"strategy {attempt.strategy} failed: {attempt.error}")
    if result.fell_back:
        notes.append(f"exported with the {result.strategy} strategy instead")
    if result.strategy == LegacyTorchScriptStrategy.name:
        notes.append("the TorchScript exporter follows the path the example inputs take through data-dependent "
                     "control flow (the export check on the validation data is the guard) and records module "
                     "scopes but no aten ops")
    wanted: dict[str | None, TensorSpec] = {spec.name: spec for spec in request.inputs}  # looked up by value name
    for value in result.model.graph.inputs:
        spec = wanted.get(value.name)
        if spec is None or value.shape is None:
            continue
        for axis, dim in spec.dynamic_dims().items():
            if axis < len(value.shape) and isinstance(value.shape[axis], int):
                notes.append(
                    f"input '{value.name}' axis {axis} ('{dim}') is fixed at {value.shape[axis]} in the ONNX "
                    "model: the model or its archive does not allow it to vary"
                )
    return notes


def rename_symbolic_dims(model: ir.Model, specs: list[TensorSpec]) -> None:
    """Give the exporter's symbolic dims (``s77``) the names of the input specs (``batch``), everywhere in
    the graph: a symbol found at the same axis of a graph input as a named spec dim takes that name."""
    renames: dict[str, str] = {}
    by_name: dict[str | None, TensorSpec] = {spec.name: spec for spec in specs}  # looked up by value name
    for value in model.graph.inputs:
        spec = by_name.get(value.name)
        if spec is None or value.shape is None or len(value.shape) != len(spec.shape):
            continue
        for dim, wanted in zip(value.shape, spec.shape, strict=False):
            if isinstance(dim, ir.SymbolicDim) and dim.value and isinstance(wanted, str):
                renames.setdefault(dim.value, wanted)
    if not renames or all(old == new for old, new in renames.items()):
        return
    for value in _all_values(model.graph):
        if value.shape is not None and any(isinstance(dim, ir.SymbolicDim) and dim.value in renames
                                           for dim in value.shape):
            value.shape = ir.Shape([
                ir.SymbolicDim(renames[dim.value]) if isinstance(dim, ir.SymbolicDim) and dim.value in renames
                else dim for dim in value.shape
            ])


def _all_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    for visited in walk(graph):
        yield from visited.node.outputs

"""The ONNX checker, with ONNX Runtime's allowance for ops ONNX does not register at a model's opset.

ONNX Runtime registers some ops in the standard domain below the opset ONNX standardised them at, and runs them:
``LayerNormalization`` below opset 17 (as ``onnxruntime.transformers.optimizer`` writes it into an opset-14 BERT),
``SimplifiedLayerNormalization`` at any opset. The ONNX checker refuses such a model at the first of them ("No Op
registered for LayerNormalization with domain_version of 14"). Here they are **set aside**: the checker runs on a
copy of the graph in which those nodes sit in a private domain (the checker does not resolve ops outside the ONNX
domains) and the larger weights are placeholders, so everything else is still checked; whether ONNX Runtime
accepts the set-aside ops is the caller's check (:mod:`mpexport.capture.onnxinput` loads the model in ONNX
Runtime, lint runs its ONNX Runtime check on every model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from mpexport.base.errors import first_line
from mpexport.graph.onnxfile import model_without_initializers
from mpexport.graph.walk import walk

SET_ASIDE_DOMAIN = "mpexport.set_aside"
"""The private domain set-aside nodes are moved to for the checker."""
ONNX_DOMAINS = {"": "", "ai.onnx": "", "ai.onnx.ml": "ai.onnx.ml"}
"""The domains the checker resolves ops in, each with the opset-import key that versions it."""
PLACEHOLDER_BYTES = 1024
"""Initializers above this size (and any in an external file) are replaced by placeholders of their type and shape
for the checker (shape inference reads the data of small ones only: shapes, axes)."""
NEWEST = 10_000
"""An opset version above any ONNX release: asks the schema registry for an op's newest version."""


@dataclass(frozen=True)
class Unregistered:
    """An op of the ONNX domains that ONNX does not register at the model's opset: its ``op_type``, ``domain``,
    the model's ``opset`` for it, and ``since``, the first opset ONNX registers it at (None: not an ONNX op)."""

    op_type: str
    domain: str
    opset: int
    since: int | None

    def describe(self) -> str:
        """``LayerNormalization (ONNX has it from opset 17, the model's opset is 14)``."""
        if self.since is None:
            return f"{self.op_type} (not an ONNX op)"
        return f"{self.op_type} (ONNX has it from opset {self.since}, the model's opset is {self.opset})"


def unregistered_ops(model: ir.Model) -> list[Unregistered]:
    """Every op type of ``model`` (subgraph bodies included) in an ONNX domain that ONNX registers at no version up
    to the model's opset for that domain, in order of first use."""
    found: dict[tuple[str, str], Unregistered] = {}
    for visited in walk(model.graph):
        node = visited.node
        key = ONNX_DOMAINS.get(node.domain)
        if key is None or (key, node.op_type) in found:
            continue
        opset = model.opset_imports.get(key, model.opset_imports.get("ai.onnx", 0) if key == "" else 0)
        if not onnx.defs.has(node.op_type, opset, key):
            found[key, node.op_type] = Unregistered(node.op_type, key, opset, _first_opset(node.op_type, key))
    return list(found.values())


def describe(ops: Sequence[Unregistered]) -> str:
    """The set-aside ops in one phrase: ``LayerNormalization (ONNX has it from opset 17, ...)``."""
    return ", ".join(op.describe() for op in ops)


def unshaped_outputs(model: ir.Model) -> list[str]:
    """The graph outputs that declare no shape (nor, maybe, a type): ONNX Runtime runs such a model, the ONNX checker
    refuses it (it requires both of a graph's outputs). mpexport keeps them so, as the model it was given has them
    (inventing a rank could contradict what the model computes)."""
    return [value.name or "" for value in model.graph.outputs if value.shape is None]


def check_setting_aside(model: ir.Model, ops: Sequence[Unregistered], *, full_check: bool = False,
                        unshaped: Sequence[str] = ()) -> str | None:
    """The ONNX checker's finding on ``model`` with the nodes of ``ops`` set aside (see the module docstring), its
    first line, or None when it finds nothing; the ``unshaped`` graph outputs (see :func:`unshaped_outputs`) are
    left to ONNX Runtime too (the checked copy declares them as shape inference finds them, see
    :func:`_declare_outputs`). ``full_check``: strict
    shape inference with type checks too, as ``onnx.checker.check_model(..., full_check=True)`` runs it. ``model``
    is left as it was; no weight data is copied."""
    with _set_aside(model, ops):
        values = [value for value in model.graph.initializers.values() if _placeheld(value.const_value)]
        proto = model_without_initializers(model, values)
    if unshaped:
        _declare_outputs(proto, values, unshaped)
    try:
        onnx.checker.check_model(_with_placeholders(proto, values, shaped=False))
        if full_check:
            onnx.shape_inference.infer_shapes(_with_placeholders(proto, values, shaped=True), check_type=True,
                                              strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - the checker's verdict is the finding
        return first_line(exc, 400)
    return None


def _declare_outputs(proto: onnx.ModelProto, values: list[ir.Value], unshaped: Sequence[str]) -> None:
    """Give the ``unshaped`` graph outputs of ``proto`` what shape inference finds for them, else rank 0 of their
    type (FLOAT when they have none): a shape nothing infers, so the check finds no contradiction the model lacks."""
    try:
        inferred = {output.name: output.type for output in
                    onnx.shape_inference.infer_shapes(_with_placeholders(proto, values, shaped=True)).graph.output}
    except Exception:  # noqa: BLE001 - the check itself reports what inference cannot do
        inferred = {}
    for output in proto.graph.output:
        if output.name not in unshaped:
            continue
        found = inferred.get(output.name)
        if found is not None and found.tensor_type.HasField("shape"):
            output.type.CopyFrom(found)
            continue
        if not output.type.tensor_type.elem_type:
            output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        output.type.tensor_type.shape.SetInParent()


@contextmanager
def _set_aside(model: ir.Model, ops: Sequence[Unregistered]) -> Iterator[None]:
    """While inside: the nodes of ``ops`` are in :data:`SET_ASIDE_DOMAIN`, which the model imports."""
    keys = {(op.domain, op.op_type) for op in ops}
    moved = [visited.node for visited in walk(model.graph)
             if (ONNX_DOMAINS.get(visited.node.domain), visited.node.op_type) in keys]
    domains = [node.domain for node in moved]
    for node in moved:
        node.domain = SET_ASIDE_DOMAIN
    model.opset_imports[SET_ASIDE_DOMAIN] = 1
    try:
        yield
    finally:
        del model.opset_imports[SET_ASIDE_DOMAIN]
        for node, domain in zip(moved, domains, strict=True):
            node.domain = domain


def _with_placeholders(proto: onnx.ModelProto, values: list[ir.Value], *, shaped: bool) -> onnx.ModelProto:
    """A copy of ``proto`` with a data-less initializer for each of ``values``: of its shape for shape inference
    (``shaped``), else empty, as the checker validates a tensor's data against its shape."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in values:
        tensor = value.const_value
        assert tensor is not None  # only initializers with a tensor are replaced
        dims = [int(dim) for dim in tensor.shape.numpy()] if shaped else [0]
        copy.graph.initializer.append(onnx.TensorProto(name=value.name, data_type=int(tensor.dtype), dims=dims))
    return copy


def _placeheld(tensor: ir.TensorProtocol | None) -> bool:
    """Whether an initializer's tensor is replaced by a placeholder: a large one, or one in an external file (the
    checker would look for the file where the check runs)."""
    return tensor is not None and (tensor.nbytes > PLACEHOLDER_BYTES or isinstance(tensor, ir.ExternalTensor))


def _first_opset(op_type: str, domain: str) -> int | None:
    """The first opset ONNX registers ``op_type`` at, or None if it never does."""
    if not onnx.defs.has(op_type, NEWEST, domain):
        return None
    versions = [schema.since_version for schema in onnx.defs.get_all_schemas_with_history()
                if schema.name == op_type and schema.domain == domain]
    return min(versions) if versions else None


def runtime_finding(path: str | Path) -> str | None:
    """Why ONNX Runtime does not load the model at ``path`` on the CPU (its first line), or None when it does.
    Loading checks the types and that kernels exist; graph optimizations are off: they add nothing to that but
    materialise weights (loading a GPT-2-large-sized mixed model, 1.6 GB, peaked at 3.5 GB with them, 0.1 GB
    without)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - the runtime's verdict is the finding
        return first_line(exc, 400)
    return None

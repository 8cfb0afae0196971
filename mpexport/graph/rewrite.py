"""Rewrite stage: the FP32 ONNX model retyped node by node as the precision plan says, on onnx-ir.

Rules, in order:

* every floating-point node computes in its planned type: inputs of another type get a Cast, made once per
  (value, type) and placed before the first consumer; a value that is itself a widening Cast of a value of the
  wanted type is used directly (no FP16->FP32->FP16 chains);
* initializers are converted once: all consumers low -> converted in place; shared by low and FP32 consumers
  -> both forms when the extra copy is small (<= ``share_limit`` bytes), else one Cast at run time (the report
  says which); float inputs and outputs whose type an op fixes (Resize ``roi``/``scales``; a contrib op's per
  ONNX Runtime's schema, such as SkipLayerNormalization's FP32 ``mean``) keep it;
* values a low type cannot hold are handled by meaning, never clamped silently: mask sentinels (the
  ``finfo(float32).min/max`` or infinities a model fills attention masks with) saturate to the low type's
  max, keeping ``x - max`` finite; any other out-of-range weight in a low-precision node is an error;
* nodes holding subgraphs (If/Loop/Scan) stay FP32 with their bodies (the plan's ``subgraph`` rule): an outer
  value a body reads that became low precision is cast back before the holder, and an initializer a body reads
  keeps its type there;
* the model's own Casts keep their type; a Cast that became a no-op is removed;
* graph inputs and outputs keep their FP32 types unless ``io_types="native"``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from mpexport.base.dtypes import (
    FLOAT_ONNX_TYPES,
    LOW_ONNX_TYPES,
    MASK_SENTINEL,
    PRECISION_OF_ONNX,
    onnx_type,
    precision_of,
    type_max,
)
from mpexport.base.errors import MpexportError
from mpexport.graph.contract import FAIL, cast_types, plan_match, rounding_chains
from mpexport.graph.contrib import fixed_type_slots
from mpexport.graph.walk import mark_added, node_names, subgraphs, walk
from mpexport.graph.weights import converted, max_abs, reduce_tensor

STAGE = "rewrite"
FIXED_TYPE_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
"""Float inputs whose type the operator's contract fixes (kept as they are)."""
SHARE_LIMIT = 16 << 20


@dataclass
class RewriteReport:
    """What the rewrite did: casts inserted and removed, initializers converted, shared, saturated."""

    casts_inserted: int = 0
    casts_removed: int = 0
    removed_casts: list[str] = field(default_factory=list)
    """Names of the no-op Casts removed (planned nodes that are no longer in the model)."""
    initializers_converted: int = 0
    initializers_duplicated: list[str] = field(default_factory=list)
    initializers_cast_at_runtime: list[str] = field(default_factory=list)
    saturated_sentinels: list[str] = field(default_factory=list)
    io_types: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        """The report as recorded in the manifest."""
        return {
            "casts_inserted": self.casts_inserted, "casts_removed": self.casts_removed,
            "initializers_converted": self.initializers_converted,
            "initializers_shared_as_both_forms": self.initializers_duplicated,
            "initializers_shared_through_a_cast": self.initializers_cast_at_runtime,
            "mask_sentinels_saturated": self.saturated_sentinels,
            "sentinel_policy": "saturate to the low type's max (keeps x - max finite, so fully masked rows "
                               "give a uniform softmax instead of NaN)",
            "io_types": self.io_types,
        }


def apply_plan(model: ir.Model, precisions: dict[str, str], *, io_types: str = "fp32",
               share_limit: int = SHARE_LIMIT, cast_at_runtime: Collection[str] = ()) -> RewriteReport:
    """Retype ``model`` in place so node ``name`` computes in ``precisions[name]`` (``fp16``/``bf16``/``fp32``/
    ``fp64``; ``none`` or missing: left as it is), through :class:`ApplyPlan` (its conditions checked). Returns what
    was done (see the module docstring). ``cast_at_runtime``: initializers to leave in FP32 and cast where a
    low-precision node reads them (the same values: a variant built for a trial, whose weights stay in the FP32
    file; pass only those the low type holds, as mask sentinels are saturated when converted)."""
    rewrite = ApplyPlan(precisions, io_types=io_types, share_limit=share_limit, cast_at_runtime=cast_at_runtime)
    try:
        rewrite(model)
    except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
        raise MpexportError(f"the rewrite cannot apply this plan: {exc}", stage=STAGE,
                            hint="a plan made from this FP32 model applies; anything else is a bug to report"
                            ) from None
    assert rewrite.report is not None
    return rewrite.report


class ApplyPlan(ir.passes.InPlacePass):
    """The rewrite as an onnx-ir pass (the rules in the module docstring).

    Requires: every planned node is in the model (a plan made from another graph cannot be applied). Ensures the
    contract lint checks (:mod:`mpexport.graph.contract`): every planned node realizes its planned precision (no-op
    Casts the pass removed excepted), every Cast agrees with its declared output, no low -> FP32 -> low chains
    (those the model had before the rewrite are its own). :attr:`report` holds what the last run did."""

    def __init__(self, precisions: dict[str, str], *, io_types: str = "fp32", share_limit: int = SHARE_LIMIT,
                 cast_at_runtime: Collection[str] = ()) -> None:
        super().__init__()
        if io_types not in ("fp32", "native"):
            raise MpexportError(f"unknown io types '{io_types}'", stage=STAGE, hint="use fp32 or native")
        self.precisions = precisions
        self.io_types = io_types
        self.share_limit = share_limit
        self.cast_at_runtime = set(cast_at_runtime)
        self.report: RewriteReport | None = None
        self._found_before: set[str] = set()

    def requires(self, model: ir.Model) -> None:
        """The plan names only nodes of ``model`` (and what the contract checks find in it already is noted: the
        model's own casts are its own, the rewrite answers only for what it changes)."""
        self._found_before = {finding for check in (cast_types(model), rounding_chains(model))
                              for finding in check.findings}
        present = set(node_names(model))
        missing = [name for name in self.precisions if name not in present]
        if missing:
            raise ir.passes.PreconditionError(f"the plan names {len(missing)} nodes the model does not have "
                                              f"({', '.join(missing[:3])}...): it was made from another graph")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Retype ``model`` in place."""
        self.report = _Rewriter(model, self.precisions, self.io_types, self.share_limit, self.cast_at_runtime).run()
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        """The mixed model keeps its contract with the plan (see the class docstring)."""
        removed = self.report.removed_casts if self.report is not None else []
        checks = (plan_match(model, self.precisions, removed, complete=False), cast_types(model),
                  rounding_chains(model))
        for check in checks:
            new = [finding for finding in check.findings if finding not in self._found_before]
            if check.status == FAIL and new:
                raise ir.passes.PostconditionError(f"the rewrite broke '{check.name}': {'; '.join(new[:3])}")


class _Rewriter:
    def __init__(self, model: ir.Model, precisions: dict[str, str], io_types: str, share_limit: int,
                 cast_at_runtime: set[str]) -> None:
        self.model = model
        self.cast_at_runtime = cast_at_runtime
        self.graph = model.graph
        self.precisions = precisions
        self.io_types = io_types
        self.share_limit = share_limit
        self.report = RewriteReport(io_types=io_types)
        self.casts: dict[tuple[str | None, ir.DataType], ir.Value] = {}  # by (value name, target type)
        self.original_outputs = {value.name: value.dtype for value in self.graph.outputs}
        self.original_types = {value.name: value.dtype for node in self.graph for value in node.outputs}

    def run(self) -> RewriteReport:
        wanted = self._initializer_demand()
        self._convert_initializers(wanted)
        if self.io_types == "native":
            self._native_inputs()
        for node in list(self.graph):
            self._retype(node)
        self._restore_output_types()
        self._remove_noop_casts()
        return self.report

    # -- planning helpers ----------------------------------------------------------------------------------
    def _target(self, node: ir.Node) -> ir.DataType | None:
        precision = self.precisions.get(node.name or "")
        return onnx_type(precision or "")

    def _float_slots(self, node: ir.Node, *, fixed: bool = False) -> list[tuple[int, ir.Value]]:
        """The node's floating-point inputs that take its precision (``fixed``: those whose type the op fixes,
        Resize's ``scales``, a contrib op's FP32-only inputs)."""
        slots = {*FIXED_TYPE_INPUTS.get(node.op_type, ()), *fixed_type_slots(node, outputs=False)}
        return [(index, value) for index, value in enumerate(node.inputs)
                if value is not None and value.dtype in FLOAT_ONNX_TYPES and (index in slots) == fixed]

    def _initializer_demand(self) -> dict[str, set[ir.DataType]]:
        demand: dict[str, set[ir.DataType]] = {}
        initializers = self.graph.initializers

        def read_as(value: ir.Value, dtype: ir.DataType | None) -> None:
            """``value``, if it is an initializer, is read as ``dtype``."""
            if value.name is not None and value.name in initializers and dtype is not None:
                demand.setdefault(value.name, set()).add(dtype)

        for node in self.graph:
            for _, value in self._float_slots(node, fixed=True):
                read_as(value, value.dtype)  # a slot of fixed type reads the weight as it is
            target = self._target(node)
            if target is None or node.op_type == "Cast":
                for _, value in self._float_slots(node):
                    read_as(value, value.dtype)
                continue
            for _, value in self._float_slots(node):
                read_as(value, target)
        for value in self.graph.outputs:
            read_as(value, value.dtype)
        for node in self.graph:
            for _, _, value in self._captured(node):
                if value.dtype in FLOAT_ONNX_TYPES:
                    read_as(value, value.dtype)  # subgraphs keep their types
        return demand

    def _captured(self, holder: ir.Node) -> list[tuple[ir.Node, int, ir.Value]]:
        """(inner node, input index, value) for every main-graph value that ``holder``'s subgraphs (If/Loop/Scan
        bodies, at any depth) read from the outer scope."""
        found = []
        for body in subgraphs(holder):
            for visited in walk(body, holder):
                found += [(visited.node, index, value) for index, value in enumerate(visited.node.inputs)
                          if value is not None and value.graph is self.graph]
        return found

    def _convert_initializers(self, demand: dict[str, set[ir.DataType]]) -> None:
        for name in sorted(demand):
            value = self.graph.initializers[name]
            types = demand[name] - {value.dtype}
            if not types or name in self.cast_at_runtime:
                continue
            if len(demand[name]) == 1:
                (target,) = types
                value.const_value = self._converted_tensor(value, target, name)
                value.dtype = target
                self.report.initializers_converted += 1
                continue
            for target in sorted(types, key=lambda dtype: dtype.value):
                extra = value.const_value.size * target.itemsize if value.const_value is not None else 0
                if extra <= self.share_limit:
                    copy = ir.Value(name=f"{name}__{PRECISION_OF_ONNX[target]}", type=ir.TensorType(target),
                                    shape=value.shape, const_value=self._converted_tensor(value, target, name))
                    self.graph.register_initializer(copy)
                    self.casts[(name, target)] = copy
                    self.report.initializers_duplicated.append(name)
                else:
                    self.report.initializers_cast_at_runtime.append(name)

    def _converted_tensor(self, value: ir.Value, target: ir.DataType, name: str) -> ir.TensorProtocol:
        source = value.const_value
        assert source is not None  # an initializer's tensor
        limit = type_max(target) if target in LOW_ONNX_TYPES else None
        if limit is None or reduce_tensor(source, max_abs) <= limit:  # the common case: converted when saved
            return converted(source, target)
        array = reduce_tensor(source, lambda data: data.astype(np.float32))
        sentinels = np.abs(array) >= MASK_SENTINEL
        if sentinels.any():
            array = np.where(sentinels, np.sign(array) * limit, array)
            self.report.saturated_sentinels.append(name)
        over = np.abs(array) > limit
        if over.any():
            consumers = ", ".join(sorted(n.name or n.op_type for n, _ in value.uses()))
            raise MpexportError(
                f"weight '{name}' reaches {float(np.abs(array).max()):.3g}, beyond {PRECISION_OF_ONNX[target].upper()} "
                f"max {limit:.6g}, but the plan runs its consumer(s) {consumers} in {PRECISION_OF_ONNX[target]}",
                stage=STAGE, hint="keep those nodes FP32 (--keep-fp32-op / --keep-fp32-module) or let the "
                "range rule run",
            )
        return ir.tensor(array.astype(target.numpy()), name=source.name)

    def _native_inputs(self) -> None:
        for value in self.graph.inputs:
            if value.dtype != ir.DataType.FLOAT:
                continue
            targets = {self._target(node) for node, _ in value.uses()}
            if len(targets) == 1 and (target := targets.pop()) in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                value.dtype = target

    # -- node rewriting ------------------------------------------------------------------------------------
    def _retype(self, node: ir.Node) -> None:
        self._keep_captured_types(node)
        if node.op_type == "Cast":
            return
        target = self._target(node)
        if target is None:
            self._align_untyped(node)
            return
        for index, value in self._float_slots(node):
            if value.dtype != target:
                node.replace_input_with(index, self._cast(value, target, node))
        if node.op_type == "ConstantOfShape" and "value" in node.attributes:
            tensor = node.attributes["value"].value
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(target.numpy())))
        fixed = fixed_type_slots(node, outputs=True)  # a contrib op's FP32-only outputs (SkipLayerNorm's mean)
        for index, output in enumerate(node.outputs):
            if output.dtype in FLOAT_ONNX_TYPES and index not in fixed:
                output.dtype = target

    def _keep_captured_types(self, holder: ir.Node) -> None:
        """Subgraphs stay as exported: an outer value they read that became low precision is cast back to its
        original type before the node that holds them."""
        for inner, index, value in self._captured(holder):
            original = self.original_types.get(value.name)
            if original is not None and value.dtype != original and value.dtype in FLOAT_ONNX_TYPES:
                inner.replace_input_with(index, self._cast(value, original, holder))

    def _align_untyped(self, node: ir.Node) -> None:
        """A node that computes no floats but compares several (Equal, Less...): give them one type."""
        slots = self._float_slots(node)
        types = {value.dtype for _, value in slots if value.dtype is not None}  # all are (floating point)
        if len(types) <= 1 or node.op_type in ("Shape", "Size"):
            return
        widest = max(types, key=lambda dtype: dtype.itemsize)
        for index, value in slots:
            if value.dtype != widest:
                node.replace_input_with(index, self._cast(value, widest, node))

    def _cast(self, value: ir.Value, target: ir.DataType, before: ir.Node) -> ir.Value:
        key = (value.name, target)
        if key in self.casts:
            return self.casts[key]
        producer = value.producer()
        if producer is not None and producer.op_type == "Cast" and producer.inputs[0] is not None and \
                producer.inputs[0].dtype == target and _widening(target, value.dtype):
            self.casts[key] = producer.inputs[0]  # the value was a lossless widening of one of this type
            return producer.inputs[0]
        cast = mark_added(ir.node("Cast", [value], {"to": target},
                                  name=f"mpexport_cast_{value.name}_to_{PRECISION_OF_ONNX[target]}"), "cast")
        cast.outputs[0].name = f"{value.name}__{PRECISION_OF_ONNX[target]}"
        cast.outputs[0].dtype = target
        cast.outputs[0].shape = value.shape
        self.graph.insert_before(before, cast)
        self.casts[key] = cast.outputs[0]
        self.report.casts_inserted += 1
        return cast.outputs[0]

    def _restore_output_types(self) -> None:
        for index, value in enumerate(list(self.graph.outputs)):
            original = self.original_outputs.get(value.name)
            if self.io_types == "native" or original is None or value.dtype == original:
                continue
            producer = value.producer()
            inner_name = f"{value.name}__{precision_of(value.dtype) or 'low'}"
            output_name = value.name
            value.name = inner_name
            cast = mark_added(ir.node("Cast", [value], {"to": original}, name=f"mpexport_cast_output_{output_name}"),
                              "cast")
            cast.outputs[0].name = output_name
            cast.outputs[0].dtype = original
            cast.outputs[0].shape = value.shape
            if producer is not None:
                self.graph.insert_after(producer, cast)
            else:
                self.graph.insert_before(self.graph.node(0), cast)
            self.graph.outputs[index] = cast.outputs[0]
            self.report.casts_inserted += 1

    def _remove_noop_casts(self) -> None:
        for node in list(self.graph):
            if node.op_type != "Cast" or node.inputs[0] is None:
                continue
            source, result = node.inputs[0], node.outputs[0]
            if source.dtype != result.dtype:
                continue
            if result in self.graph.outputs:
                if source in self.graph.inputs or source in self.graph.outputs:
                    continue
                position = list(self.graph.outputs).index(result)
                name = result.name
                result.name = f"{name}__noop"
                source.name = name
                self.graph.outputs[position] = source
            ir.convenience.replace_all_uses_with(result, source)
            self.graph.remove(node, safe=True)
            self.report.casts_removed += 1
            self.report.removed_casts.append(node.name or "")


def _widening(narrow: ir.DataType, wide: ir.DataType | None) -> bool:
    return wide == ir.DataType.FLOAT and narrow in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)






"""The planner: a precision for every ONNX node that reproduces the training autocast policy, with a reason.

The engine walks the FP32 graph in order and decides each node the way autocast decided the op it came
from when the model trained:

0. a node whose output types no shape inference could tell (:func:`mpexport.graph.walk.infer_types`), or that reads
   such a value, stays FP32 (rule ``untyped``), and the MAC share counts it as FP32;
1. explicit ONNX casts keep their type; nodes holding subgraphs stay FP32;
2. user overrides (keep FP32 / force low precision, by module regex, op type, aten op or node name);
3. the model's own ``torch.autocast(enabled=False)`` regions: ops there follow their inputs;
4. the op autocast intercepted (``autocast_op``, e.g. ``aten.rms_norm`` for the nodes it decomposed into)
   and its class in the policy table: low precision, FP32, or promote to the widest input; a fused kernel
   (scaled dot-product attention) keeps its internal precision: matmuls low, scores and softmax FP32; without a
   recorded op, a pattern's op or a stand-in from the op type (:mod:`mpexport.precision.standins`: recurrent
   layers as the kernel autocast picks, ``aten._cudnn_rnn`` on CUDA); ONNX Runtime's contrib ops as the aten op they
   fuse (:mod:`mpexport.precision.contrib`), any other op outside the ONNX standard FP32 (rule ``unknown-op``);
5. unlisted ops follow their inputs like torch's type promotion (0-d constants do not promote; weights of
   normalisation nodes do not change the data type);
6. the range rule: a low-precision node whose weight the target type cannot hold, or (given calibration
   statistics) whose FP32 output exceeds the type's safe range, stays FP32 with the value in the reason.
   Nothing is clamped.

Explicit ``x.float()`` casts that the FP32 graph dropped as no-ops are honoured through the provenance.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from mpexport.base.dtypes import BF16, FP16, FP32, MASK_SENTINEL, NONE, TYPE_MAX, WIDTH, onnx_type, precision_of
from mpexport.base.errors import MpexportError
from mpexport.base.policies import DEFAULT_POLICY
from mpexport.capture.provenance import NodeProvenance
from mpexport.graph.contrib import admits
from mpexport.graph.walk import infer_types, name_nodes_uniquely, subgraphs, walk
from mpexport.graph.weights import max_abs, reduce_tensor
from mpexport.precision.contrib import ContribOp, contrib_op, is_foreign, qualified
from mpexport.precision.macs import node_macs
from mpexport.precision.options import STAGE, PlanOptions
from mpexport.precision.patterns import LAYER_NORM, is_constant, recognise
from mpexport.precision.plan import NodePlan, PrecisionPlan, RangeStats
from mpexport.precision.policy import FP32_CLASSES, LOWER, PROMOTE, AutocastPolicy, op_key, resolve_policy
from mpexport.precision.standins import RECURRENT_INPUTS, dispatched, spatial_rank, stand_in
from mpexport.precision.training_ranges import TrainingEvidence, range_reason

FUSED_KERNELS = ("aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention",
                 "aten._scaled_dot_product_efficient_attention", "aten._native_multi_head_attention",
                 "aten._scaled_dot_product_flash_attention_for_cpu")


LOW_INSIDE_FUSED = ("MatMul", "Gemm", "Einsum")

UNTYPED, UNKNOWN_OP = "untyped", "unknown-op"
"""Rules of nodes kept FP32 because the planner cannot tell what they compute (named in the plan's notes)."""


DATA_INPUT_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
                  "RMSNormalization", "SkipLayerNormalization")
"""Ops whose output has their first input's type whatever the type of their weights (torch's norms do)."""


def make_plan(model: ir.Model, records: list[NodeProvenance], options: PlanOptions,
              ranges: RangeStats | None = None, training: TrainingEvidence | None = None) -> PrecisionPlan:
    """Decide every node's precision (see the module docstring). ``records`` is the provenance of ``model``'s
    nodes (from :func:`mpexport.capture.provenance.collect_provenance`), keyed by node name; nodes without a unique name
    are named first, in place (:func:`mpexport.graph.walk.name_nodes_uniquely`: a no-op on mpexport's exports).
    ``training``: range evidence from the training run, joined to the nodes
    (:func:`mpexport.precision.training_ranges.join_ranges`); the range rule takes the larger of it and ``ranges``."""
    name_nodes_uniquely(model)
    infer_types(model)  # a no-op on typed models; ONNX Runtime's contrib ops need it (mpexport.graph.contrib)
    if options.low not in (FP16, BF16):
        raise MpexportError(f"unknown target type '{options.low}'", stage=STAGE, hint="use fp16 or bf16")
    policy, note = resolve_policy(options.policy or DEFAULT_POLICY, options.torch_version)
    engine = _Engine(model, records, policy, options, ranges if options.range_check else None)
    engine.training = training if options.range_check and options.training_ranges else None
    nodes = engine.run()
    plan = PrecisionPlan(policy, options, nodes, calibration_samples=ranges.samples if ranges else 0)
    if note:
        plan.notes.append(note)
    if options.low != policy.low:
        plan.notes.append(f"trained under {policy.name}, deployed as {options.low}: the policy decides which nodes "
                          f"run in low precision, {options.low} is their type")
    if ranges is None and options.range_check:
        plan.notes.append("no calibration data: the range rule checked weights only, not activations")
    plan.notes += _kept_fp32_notes(nodes)
    return plan


def _kept_fp32_notes(nodes: list[NodePlan]) -> list[str]:
    """What the plan kept FP32 because it could not tell what a node computes: ops it does not know, outputs it
    could not type."""
    notes = []
    unknown = Counter(node.op_type for node in nodes if node.rule == UNKNOWN_OP)
    if unknown:
        notes.append("kept FP32, ops mpexport does not plan by what they compute: " + ", ".join(
            f"{op} ({count})" for op, count in sorted(unknown.items())))
    untyped = [node.name for node in nodes if node.rule == UNTYPED]
    if untyped:
        notes.append(f"kept FP32, {len(untyped)} nodes whose output types no shape inference could tell: "
                     + ", ".join(untyped[:5]) + (", ..." if len(untyped) > 5 else ""))
    return notes


class _Engine:
    """One pass over the graph in order (ONNX graphs are topologically sorted)."""

    def __init__(self, model: ir.Model, records: list[NodeProvenance], policy: AutocastPolicy,
                 options: PlanOptions, ranges: RangeStats | None) -> None:
        self.model = model
        self.policy = policy
        self.options = options
        self.ranges = ranges
        self.low = options.low
        self.training_low = policy.low
        self.records = {record.name: record for record in records}
        # Per value, keyed by its name as onnx-ir types it (``str | None``):
        self.dtype: dict[str | None, str | None] = {}
        self.producer_origin: dict[str | None, str | None] = {}
        self.rank: dict[str | None, int | None] = {}
        self.limit = TYPE_MAX[self.low] / options.headroom
        without_aten = sum(record.aten is None for record in records) > len(records) // 2
        self.recognised = recognise(model) if without_aten else {}
        self.weight_peaks: dict[str | None, float] = {}
        self.untyped: set[str | None] = set()
        """Outputs no shape inference typed, of nodes reading floats (kept FP32: see :meth:`_untyped`)."""
        self.training: TrainingEvidence | None = None

    def run(self) -> list[NodePlan]:
        graph = self.model.graph
        for value in graph.inputs:
            self._set_value(value, precision_of(value.dtype), None)
        for value in graph.initializers.values():
            self._set_value(value, precision_of(value.dtype), None)
        plans: list[NodePlan] = []
        for node in graph:
            name = node.name or ""
            record = self.records.get(name) or NodeProvenance(name, node.op_type, None, None, None)
            precision, reason, rule = self._decide(node, record)
            for value in node.outputs:
                float_out = precision_of(value.dtype) if value.dtype is not None else value.name in self.untyped
                self._set_value(value, self._resolve(precision) if float_out else None, record.origin)
            plans.append(NodePlan(name, node.op_type, record.module, record.aten, precision, reason, rule,
                                  record.origin, node_macs(node, self.ranges.shapes if self.ranges else None)))
            plans.extend(self._subgraph_plans(node))
        return plans

    def _set_value(self, value: ir.Value, dtype: str | None, origin: str | None) -> None:
        self.dtype[value.name] = dtype
        self.producer_origin[value.name] = origin
        self.rank[value.name] = len(value.shape) if value.shape is not None else None

    def _resolve(self, precision: str) -> str:
        """The precision as a value type while walking: planned low values have the training low type."""
        return self.training_low if precision == self.low and self.low != self.training_low else precision

    # -- decisions ---------------------------------------------------------------------------------------
    def _decide(self, node: ir.Node, record: NodeProvenance) -> tuple[str, str, str]:
        outputs = [precision_of(v.dtype) for v in node.outputs if v.dtype is not None]
        untyped = self._untyped(node, record, float_out=any(outputs))
        if untyped is not None:
            return untyped
        if not any(outputs):
            return NONE, "not floating point", "non-float"
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return FP32, "holds a subgraph (If/Loop/Scan): kept FP32 with its body", "subgraph"
        if node.op_type == "Cast":
            to = precision_of(ir.DataType(node.attributes["to"].value))
            assert to is not None  # the node's output (of this type) is floating point: checked above
            return self._low_name(to), f"explicit cast in the model (Cast to {to.upper()})", "cast"
        override = self.options.overrides.decide(record)
        if override:
            kind, reason = override
            return (FP32 if kind == "fp32" else self.low), reason, "override"
        precision, reason, rule = self._policy_decision(node, record)
        if precision == self.low:
            exceeded = self._range_violation(node)
            if exceeded:
                return FP32, exceeded, "range"
        return precision, reason, rule

    def _untyped(self, node: ir.Node, record: NodeProvenance, *, float_out: bool) -> tuple[str, str, str] | None:
        """FP32 for a node whose floating-point work the rewrite could not retype: one reading floats whose outputs no
        shape inference could type (an op mpexport does not know is named as such), or one reading such a value (the
        rewrite casts typed values only; in the FP32 model it was FP32)."""
        untyped = [value for value in node.outputs if value.name and value.dtype is None]
        if not float_out and not untyped:  # typed, and no floats
            return None
        unread = next((value.name for value in node.inputs if value is not None and value.name in self.untyped), None)
        if unread is not None:
            return FP32, f"untyped: reads '{unread}', whose type no shape inference could tell: kept FP32", UNTYPED
        if float_out or not self._float_inputs(node, record, ignore_scalars=False):
            return None
        self.untyped.update(value.name for value in untyped)
        if is_foreign(node) and contrib_op(node) is None:
            return self._foreign_decision(node)
        return FP32, (f"untyped: no shape inference could tell the type of its output '{untyped[0].name}' "
                      f"({qualified(node)}): kept FP32, and counted as FP32"), UNTYPED

    def _low_name(self, dtype: str | None) -> str:
        return self.low if dtype == self.training_low else (dtype or FP32)

    def _policy_decision(self, node: ir.Node, record: NodeProvenance) -> tuple[str, str, str]:
        region = (record.autocast_region or {}).get(self.policy.device)
        if region and not region.get("enabled", True):
            dtype = self._follow_inputs(node, record)
            return self._low_name(dtype), (f"region: torch.autocast(enabled=False) in the model's code; "
                                           f"follows its inputs ({dtype.upper()})"), "region"
        if record.autocast_op is None and record.aten is None and is_foreign(node):
            return self._foreign_decision(node)
        op, cls = self._class_of(node, record)
        name = self.policy.name
        if cls == LOWER:
            if op is not None and op.split(" (")[0] in FUSED_KERNELS and node.op_type not in LOW_INSIDE_FUSED:
                return FP32, (f"kernel: {op} runs its matmuls in {self.low.upper()} and keeps scores, masking "
                              "and softmax in FP32 inside the fused kernel"), "kernel"
            return self.low, f"policy: {op} runs in {self.training_low.upper()} under {name}", "policy"
        if cls in FP32_CLASSES:
            return FP32, f"policy: {op} is FP32 under {name}", "policy"
        if cls == PROMOTE:
            dtype = self._widest(self._float_inputs(node, record, ignore_scalars=False)) or FP32
            return self._low_name(dtype), f"policy: {op} promotes to its widest input ({dtype.upper()})", "policy"
        dtype = self._follow_inputs(node, record)
        shown = op or node.op_type
        return self._low_name(dtype), f"propagate: {shown} is not in the {name} lists; runs in its inputs' type " \
            f"({dtype.upper()})", "propagate"

    def _class_of(self, node: ir.Node, record: NodeProvenance) -> tuple[str | None, str | None]:
        """The op autocast decided for this node, and its class: the intercepted op if listed, else (the
        composite decomposed in eager) the node's own aten op; without any recorded op, the op of a pattern the
        node belongs to (:mod:`mpexport.precision.patterns`), else a stand-in inferred from the ONNX op type (each
        said so in the op name)."""
        for op in (record.autocast_op, record.aten):
            cls = self.policy.op_class(op)
            if cls is not None and op is not None:  # op_class is None for no op
                return op_key(op) + _fused_by(record, op), cls
        recorded = record.autocast_op or record.aten
        if recorded is not None:
            kernel = dispatched(op_key(recorded), self.policy.device)
            if kernel is not None:
                return f"{kernel.op} ({kernel.why})", self.policy.op_class(kernel.op)
            return op_key(recorded) + _fused_by(record, recorded), None
        if record.name in self.recognised:
            hit = self.recognised[record.name]
            return f"{hit.aten} (recognised from the ONNX pattern of a {hit.pattern})", self.policy.op_class(hit.aten)
        standing = stand_in(node)
        if standing is None:
            return None, None
        kernel = dispatched(standing, self.policy.device)
        if kernel is not None:
            return f"{kernel.op} ({kernel.why}, inferred from {node.op_type})", self.policy.op_class(kernel.op)
        return f"{standing} (inferred from {node.op_type})", self.policy.op_class(standing)

    def _foreign_decision(self, node: ir.Node) -> tuple[str, str, str]:
        """A node whose op is outside the standard ONNX operator set: a contrib op of
        :data:`mpexport.precision.contrib.CONTRIB_OPS` as autocast runs the aten op it stands for, any other FP32."""
        contrib = contrib_op(node)
        if contrib is None:
            return FP32, (f"unknown op: {qualified(node)} is not an op mpexport plans by what it computes: kept "
                          "FP32"), UNKNOWN_OP
        aten = contrib.aten.format(rank=spatial_rank(node))
        cls = self.policy.op_class(aten)
        said = f"contrib op {node.op_type} computes {contrib.computes}, planned as autocast runs {aten}"
        if cls == LOWER:
            precision, how = self.low, f"{self.training_low.upper()} under {self.policy.name}"
        elif cls in FP32_CLASSES:
            precision, how = FP32, f"FP32 under {self.policy.name}"
        else:
            dtype = self._follow_data_inputs(node, contrib)
            precision = self._low_name(dtype)
            how = (f"promotes to its widest input ({dtype.upper()})" if cls == PROMOTE else
                   f"in no {self.policy.name} list: runs in its inputs' type ({dtype.upper()})")
        if precision == self.low and admits(node, onnx_type(self.low) or ir.DataType.FLOAT16) is False:
            return FP32, f"{said} ({how}), but ONNX Runtime's {node.op_type} takes no {self.low.upper()}: kept FP32", \
                "contrib"
        return precision, f"{said}: {how}", "contrib"

    def _follow_data_inputs(self, node: ir.Node, contrib: ContribOp) -> str:
        """The widest type of the inputs a contrib op follows (its weights and fused biases excepted)."""
        indices = contrib.data_inputs if contrib.data_inputs is not None else range(len(node.inputs))
        dtypes = [dtype for index in indices if index < len(node.inputs) and (value := node.inputs[index]) is not None
                  and (dtype := self.dtype.get(value.name)) is not None]
        return self._widest(dtypes) or FP32

    def _float_inputs(self, node: ir.Node, record: NodeProvenance, *, ignore_scalars: bool) -> list[str]:
        found = []
        explicit = set(record.fp32_inputs_from)
        for value in node.inputs:
            if value is None:
                continue
            dtype = self.dtype.get(value.name)
            if dtype is None:
                continue
            if explicit and self.producer_origin.get(value.name) in explicit:
                dtype = FP32
            if ignore_scalars and self.rank.get(value.name) == 0:
                continue
            found.append(dtype)
        return found

    def _follow_inputs(self, node: ir.Node, record: NodeProvenance) -> str:
        if node.op_type in DATA_INPUT_OPS and node.inputs and node.inputs[0] is not None:
            first = self.dtype.get(node.inputs[0].name)
            if first:
                return FP32 if record.fp32_inputs_from else first
        if node.op_type in RECURRENT_INPUTS:
            states = [dtype for index in RECURRENT_INPUTS[node.op_type] if index < len(node.inputs)
                      and (value := node.inputs[index]) is not None and (dtype := self.dtype.get(value.name))]
            if states:
                return FP32 if record.fp32_inputs_from else (self._widest(states) or FP32)
        hit = self.recognised.get(record.name) if record.aten is None else None
        if hit is not None and hit.aten == LAYER_NORM:  # its weight and bias do not promote the output
            inputs = [value for value in node.inputs if value is not None and not is_constant(value)]
            dtypes = [dtype for value in inputs if (dtype := self.dtype.get(value.name)) is not None]
            if dtypes:
                return self._widest(dtypes) or FP32
        dtypes = self._float_inputs(node, record, ignore_scalars=True) or \
            self._float_inputs(node, record, ignore_scalars=False)
        return self._widest(dtypes) or FP32

    @staticmethod
    def _widest(dtypes: list[str]) -> str | None:
        return max(dtypes, key=lambda dtype: WIDTH.get(dtype, 0)) if dtypes else None

    def _range_violation(self, node: ir.Node) -> str | None:
        """Why this low-precision node must stay FP32: a weight the type cannot hold (always checked; mask
        sentinels such as finfo(float32).min excepted, the writer saturates those), or an output beyond the
        safe limit on calibration data (when statistics are given)."""
        for value in node.inputs:
            if value is not None and value.const_value is not None and precision_of(value.dtype):
                peak = self._weight_peak(value)
                if peak > TYPE_MAX[self.low]:
                    return f"range: weight '{value.name}' reaches {peak:.3g}, beyond {self.low.upper()} max " \
                        f"{TYPE_MAX[self.low]:.6g}"
        trained = self.training.nodes.get(node.name or "") if self.training is not None else None
        for value in node.outputs:
            reached = self.ranges.max_abs.get(value.name) if self.ranges is not None and value.name else None
            reason = range_reason(self.low, self.limit, self.options.headroom, reached, trained,
                                  self.training.sampled_steps if self.training is not None else 0)
            if reason:
                return reason
        return None

    def _weight_peak(self, value: ir.Value) -> float:
        """Largest |weight| that is not a mask sentinel (cached per initializer: one pass, no temporaries)."""
        if value.name not in self.weight_peaks:
            assert value.const_value is not None  # called for initializers only
            self.weight_peaks[value.name] = reduce_tensor(value.const_value, _peak_ignoring_sentinels)
        return self.weight_peaks[value.name]

    def _subgraph_plans(self, holder: ir.Node) -> list[NodePlan]:
        """The nodes of ``holder``'s bodies (at any depth): FP32 as the holder, or none if they compute no floats."""
        plans = []
        for body in subgraphs(holder):
            for visited in walk(body, holder):
                inner = visited.node
                name = inner.name or ""
                record = self.records.get(name) or NodeProvenance(name, inner.op_type, None, None, None)
                floats = any(precision_of(value.dtype) for value in inner.outputs)
                plans.append(NodePlan(name, inner.op_type, record.module, record.aten, FP32 if floats else NONE,
                                      f"inside the subgraph of {holder.name}: kept FP32" if floats else
                                      "not floating point", "subgraph" if floats else "non-float", record.origin))
        return plans


def _peak_ignoring_sentinels(array: np.ndarray) -> float:
    peak = max_abs(array)
    if peak >= MASK_SENTINEL:
        magnitudes = np.abs(array)
        peak = float(magnitudes[magnitudes < MASK_SENTINEL].max(initial=0.0))
    return peak


def _fused_by(record: NodeProvenance, op: str) -> str:
    """The words that say a node's op is what its type computes, where the exporter's optimizer fused other ops into
    it (empty otherwise)."""
    if not record.fused or op not in (record.aten, record.autocast_op):
        return ""
    return (f" (what the {record.op_type} computes; the exporter's optimizer fused "
            f"{', '.join(op_key(item) for item in record.fused)} into it)")

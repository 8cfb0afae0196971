"""The planner: a precision for every ONNX node that reproduces the training autocast policy, with a reason.

The engine walks the FP32 graph in order and decides each node the way autocast decided the op it came
from when the model trained:

1. explicit ONNX casts keep their type; nodes holding subgraphs stay FP32;
2. user overrides (keep FP32 / force low precision, by module regex, op type, aten op or node name);
3. the model's own ``torch.autocast(enabled=False)`` regions: ops there follow their inputs;
4. the op autocast intercepted (``autocast_op``, e.g. ``aten.rms_norm`` for the nodes it decomposed into)
   and its class in the policy table: low precision, FP32, or promote to the widest input; a fused kernel
   (scaled dot-product attention) keeps its internal precision: matmuls low, scores and softmax FP32;
5. unlisted ops follow their inputs like torch's type promotion (0-d constants do not promote; weights of
   normalisation nodes do not change the data type);
6. the range rule: a low-precision node whose weight the target type cannot hold, or (given calibration
   statistics) whose FP32 output exceeds the type's safe range, stays FP32 with the value in the reason.
   Nothing is clamped.

Explicit ``x.float()`` casts that the FP32 graph dropped as no-ops are honoured through the provenance.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import onnx_ir as ir

from mpexport.base.dtypes import BF16, FP16, FP32, MASK_SENTINEL, NONE, TYPE_MAX, WIDTH, precision_of
from mpexport.base.errors import MpexportError
from mpexport.base.policies import DEFAULT_POLICY
from mpexport.capture.provenance import NodeProvenance
from mpexport.graph.walk import name_nodes_uniquely, subgraphs, walk
from mpexport.graph.weights import max_abs, reduce_tensor
from mpexport.precision.options import STAGE, PlanOptions
from mpexport.precision.patterns import LAYER_NORM, is_constant, recognise
from mpexport.precision.plan import NodePlan, PrecisionPlan, RangeStats
from mpexport.precision.policy import FP32_CLASSES, LOWER, PROMOTE, AutocastPolicy, op_key, resolve_policy

FUSED_KERNELS = ("aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention",
                 "aten._scaled_dot_product_efficient_attention", "aten._native_multi_head_attention",
                 "aten._scaled_dot_product_flash_attention_for_cpu")


LOW_INSIDE_FUSED = ("MatMul", "Gemm", "Einsum")


DATA_INPUT_OPS = ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
                  "RMSNormalization", "SkipLayerNormalization")
"""Ops whose output has their first input's type whatever the type of their weights (torch's norms do)."""


MAC_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum")


OP_TYPE_TO_ATEN = {
    "Conv": "aten.conv{rank}d", "ConvTranspose": "aten.conv_transpose{rank}d.input", "MatMul": "aten.matmul",
    "Gemm": "aten.linear", "Einsum": "aten.einsum", "LayerNormalization": "aten.layer_norm",
    "GroupNormalization": "aten.group_norm", "Softmax": "aten.softmax.int", "LogSoftmax": "aten.log_softmax.int",
    "Exp": "aten.exp", "Log": "aten.log", "Pow": "aten.pow.Tensor_Scalar", "Reciprocal": "aten.reciprocal",
    "Softplus": "aten.softplus", "ReduceSum": "aten.sum.dim_IntList", "ReduceProd": "aten.prod.dim_int",
    "CumSum": "aten.cumsum", "ReduceLogSumExp": "aten.logsumexp", "Resize": "aten.upsample_bilinear2d",
}
"""Stand-in aten ops for nodes whose exporter recorded none (the TorchScript exporter): the op a model's code calls
and autocast intercepts (``conv2d``, not the ``convolution`` it dispatches to, which CPU autocast does not list;
``{rank}`` is the convolution's spatial rank, from its weight)."""


def make_plan(model: ir.Model, records: list[NodeProvenance], options: PlanOptions,
              ranges: RangeStats | None = None) -> PrecisionPlan:
    """Decide every node's precision (see the module docstring). ``records`` is the provenance of ``model``'s
    nodes (from :func:`mpexport.capture.provenance.collect_provenance`), keyed by node name; nodes without a unique name
    are named first, in place (:func:`mpexport.graph.walk.name_nodes_uniquely`: a no-op on mpexport's exports)."""
    name_nodes_uniquely(model)
    if options.low not in (FP16, BF16):
        raise MpexportError(f"unknown target type '{options.low}'", stage=STAGE, hint="use fp16 or bf16")
    policy, note = resolve_policy(options.policy or DEFAULT_POLICY, options.torch_version)
    engine = _Engine(model, records, policy, options, ranges if options.range_check else None)
    nodes = engine.run()
    plan = PrecisionPlan(policy, options, nodes, calibration_samples=ranges.samples if ranges else 0)
    if note:
        plan.notes.append(note)
    if options.low != policy.low:
        plan.notes.append(f"trained under {policy.name}, deployed as {options.low}: the policy decides which nodes "
                          f"run in low precision, {options.low} is their type")
    if ranges is None and options.range_check:
        plan.notes.append("no calibration data: the range rule checked weights only, not activations")
    return plan


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
                float_out = precision_of(value.dtype) if value.dtype is not None else None
                self._set_value(value, self._resolve(precision) if float_out else None, record.origin)
            plans.append(NodePlan(name, node.op_type, record.module, record.aten, precision, reason, rule,
                                  record.origin, _macs(node, self.ranges)))
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

    def _low_name(self, dtype: str | None) -> str:
        return self.low if dtype == self.training_low else (dtype or FP32)

    def _policy_decision(self, node: ir.Node, record: NodeProvenance) -> tuple[str, str, str]:
        region = (record.autocast_region or {}).get(self.policy.device)
        if region and not region.get("enabled", True):
            dtype = self._follow_inputs(node, record)
            return self._low_name(dtype), (f"region: torch.autocast(enabled=False) in the model's code; "
                                           f"follows its inputs ({dtype.upper()})"), "region"
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
                return op_key(op), cls
        if record.aten is None and record.autocast_op is None and record.name in self.recognised:
            hit = self.recognised[record.name]
            return f"{hit.aten} (recognised from the ONNX pattern of a {hit.pattern})", self.policy.op_class(hit.aten)
        if record.aten is None and record.autocast_op is None and record.op_type in OP_TYPE_TO_ATEN:
            stand_in = OP_TYPE_TO_ATEN[record.op_type].format(rank=_spatial_rank(node))
            return f"{stand_in} (inferred from {record.op_type})", self.policy.op_class(stand_in)
        recorded = record.autocast_op or record.aten
        return (op_key(recorded) if recorded else None), None

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
        for value in node.outputs:
            if self.ranges is None or value.name is None:  # no statistics for it
                continue
            reached = self.ranges.max_abs.get(value.name)
            if reached is not None and reached > self.limit:
                return (f"range: output reached {reached:.3g} on calibration data, beyond the {self.low.upper()} "
                        f"safe limit {self.limit:.3g} (max {TYPE_MAX[self.low]:.6g} / headroom "
                        f"{self.options.headroom:g})")
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


def _spatial_rank(node: ir.Node) -> int:
    """The spatial rank of a convolution (its weight's rank minus 2; 2 when the weight's shape is unknown)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    shape = weight.shape if weight is not None else None
    return len(shape) - 2 if shape is not None and len(shape) >= 3 else 2


def _peak_ignoring_sentinels(array: np.ndarray) -> float:
    peak = max_abs(array)
    if peak >= MASK_SENTINEL:
        magnitudes = np.abs(array)
        peak = float(magnitudes[magnitudes < MASK_SENTINEL].max(initial=0.0))
    return peak


def _macs(node: ir.Node, ranges: RangeStats | None) -> int | None:
    """Multiply-accumulates of a matmul/conv node, from calibration shapes (else static shapes, dynamic dims 1)."""
    if node.op_type not in MAC_OPS or not node.outputs:
        return None

    def shape(value: ir.Value | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if ranges is not None and value.name in ranges.shapes:
            return ranges.shapes[value.name]
        if value.const_value is not None:
            return cast("tuple[int, ...]", tuple(value.const_value.shape))  # a tensor's shape is static
        if value.shape is None:
            return None
        return tuple(dim if isinstance(dim, int) else 1 for dim in value.shape)

    out = shape(node.outputs[0])
    first = shape(node.inputs[0]) if node.inputs else None
    weight = shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if out is None or first is None or weight is None:
        return None
    if node.op_type in ("MatMul", "Gemm"):
        transposed = node.op_type == "Gemm" and node.attributes.get("transA") is not None and \
            node.attributes["transA"].value
        inner = first[-2] if transposed else first[-1]
        return int(np.prod(out, dtype=np.int64) * inner)
    if node.op_type == "Conv":
        return int(np.prod(out, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        return int(np.prod(first, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    return None

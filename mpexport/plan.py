"""Plan stage: a precision for every ONNX node that reproduces the training autocast policy, with a reason.

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

import json
import math
import re
import tomllib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from mpexport.autocast_policy import (
    FP32_CLASSES,
    LOWER,
    POLICY_NAMES,
    PROMOTE,
    AutocastPolicy,
    op_key,
    resolve_policy,
)
from mpexport.dtypes import BF16, FP16, FP32, NONE, TYPE_MAX, WIDTH, precision_of
from mpexport.errors import MpexportError
from mpexport.graphs import name_nodes_uniquely, subgraphs, walk
from mpexport.patterns import LAYER_NORM, is_constant, recognise
from mpexport.provenance import NodeProvenance
from mpexport.weights import max_abs, reduce_tensor

STAGE = "plan"
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
DEFAULT_HEADROOM = 2.0
MASK_SENTINEL = 1e38
"""|values| at or beyond this (finfo(float32).min/max, infinities) are masking sentinels, not magnitudes."""
DEFAULT_POLICY = "cuda-fp16"


@dataclass
class Overrides:
    """User overrides: regexes on module paths, op types (``Softmax``) or aten ops (``aten.gelu``), node names."""

    keep_fp32_modules: list[str] = field(default_factory=list)
    keep_fp32_ops: list[str] = field(default_factory=list)
    keep_fp32_nodes: list[str] = field(default_factory=list)
    force_low_modules: list[str] = field(default_factory=list)
    force_low_ops: list[str] = field(default_factory=list)
    force_low_nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for pattern in (*self.keep_fp32_modules, *self.force_low_modules):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise MpexportError(f"module pattern '{pattern}' is not a regular expression: {exc}",
                                    stage=STAGE) from None

    def merged(self, other: Overrides) -> Overrides:
        """These overrides plus ``other``'s."""
        return Overrides(**{key: [*getattr(self, key), *getattr(other, key)] for key in asdict(self)})

    def decide(self, record: NodeProvenance) -> tuple[str, str] | None:
        """``("fp32"|"low", reason)`` when an override applies to this node (keep FP32 wins)."""
        for kind, modules, ops, nodes in (
            ("fp32", self.keep_fp32_modules, self.keep_fp32_ops, self.keep_fp32_nodes),
            ("low", self.force_low_modules, self.force_low_ops, self.force_low_nodes),
        ):
            verb = "kept FP32" if kind == "fp32" else "forced to low precision"
            if record.name in nodes:
                return kind, f"override: node {record.name} {verb}"
            for pattern in modules:
                if record.module is not None and re.search(pattern, record.module):
                    return kind, f"override: module '{record.module or '<root>'}' {verb} (pattern '{pattern}')"
            for op in ops:
                if op == record.op_type or (record.aten and op_key(record.aten) == op_key(op)) or (
                        record.autocast_op and op_key(record.autocast_op) == op_key(op)):
                    return kind, f"override: op {op} {verb}"
        return None


@dataclass
class PlanOptions:
    """How to plan: the training ``policy`` (``cuda-fp16``...), the deployment ``target`` low type (default:
    the policy's), overrides, and the range rule (on when statistics are given; ``headroom`` divides the
    type's max to get the safe limit)."""

    policy: str = ""
    """Empty: what the model file records about its training, else ``cuda-fp16``."""
    target: str | None = None
    torch_version: str | None = None
    overrides: Overrides = field(default_factory=Overrides)
    range_check: bool = True
    headroom: float = DEFAULT_HEADROOM

    @property
    def low(self) -> str:
        """The low-precision type of the deployed model."""
        return self.target or (self.policy or DEFAULT_POLICY).split("-")[1]

    @staticmethod
    def from_file(path: str | Path) -> PlanOptions:
        """Options from a TOML policy file (see :func:`load_overrides`); one-line errors for a bad file."""
        overrides, settings = load_overrides(path)
        policy = settings.get("policy", "")
        if policy and policy not in POLICY_NAMES:
            raise MpexportError(f"policy file '{path}': unknown policy '{policy}'", stage=STAGE,
                                hint=f"use one of {', '.join(POLICY_NAMES)}")
        target = settings.get("target")
        if target is not None and target not in (FP16, BF16):
            raise MpexportError(f"policy file '{path}': unknown target '{target}'", stage=STAGE,
                                hint="use fp16 or bf16")
        range_check = settings.get("range_check", True)
        headroom = settings.get("headroom", DEFAULT_HEADROOM)
        if not isinstance(range_check, bool) or not isinstance(headroom, (int, float)) or headroom < 1:
            raise MpexportError(f"policy file '{path}': range_check must be true/false and headroom a number >= 1",
                                stage=STAGE)
        return PlanOptions(policy=policy, target=target, overrides=overrides, range_check=range_check,
                           headroom=float(headroom))

    def overlaid(self, other: PlanOptions | None) -> PlanOptions:
        """These options with ``other``'s on top (a command line over a policy file): ``other``'s policy, target,
        torch version and headroom win where set, overrides are merged, the range rule runs only if both
        want it."""
        if other is None:
            return replace(self)
        return PlanOptions(policy=other.policy or self.policy, target=other.target or self.target,
                           torch_version=other.torch_version or self.torch_version,
                           overrides=self.overrides.merged(other.overrides),
                           range_check=self.range_check and other.range_check,
                           headroom=other.headroom if other.headroom != DEFAULT_HEADROOM else self.headroom)


@dataclass(frozen=True)
class NodePlan:
    """One node's precision (``fp16``/``bf16``/``fp32``/``fp64``, ``none`` if it computes no floats)."""

    name: str
    op_type: str
    module: str | None
    aten: str | None
    precision: str
    reason: str
    rule: str
    origin: str | None = None
    macs: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The node as written to ``plan.json``."""
        data: dict[str, Any] = {"name": self.name, "op_type": self.op_type, "module": self.module,
                                "aten": self.aten, "precision": self.precision, "reason": self.reason,
                                "rule": self.rule}
        if self.origin:
            data["origin"] = self.origin
        if self.macs:
            data["macs"] = self.macs
        return data


@dataclass
class RangeStats:
    """Calibration statistics: the largest |value| per ONNX value name, shapes from the first batch, and
    how many samples they came from."""

    max_abs: dict[str, float]
    shapes: dict[str, tuple[int, ...]]
    samples: int

    def to_json(self) -> dict[str, Any]:
        """As ``ranges.json`` holds it (infinite peaks as ``"inf"``)."""
        return {"samples": self.samples,
                "values": {name: {"max_abs": peak if math.isfinite(peak) else "inf", "shape": list(self.shapes.get(
                    name, ()))} for name, peak in sorted(self.max_abs.items())}}

    @staticmethod
    def from_json(data: dict[str, Any]) -> RangeStats:
        """The statistics :meth:`to_json` wrote."""
        values = data["values"]
        return RangeStats({name: float(item["max_abs"]) for name, item in values.items()},
                          {name: tuple(item["shape"]) for name, item in values.items()}, int(data["samples"]))


@dataclass
class PrecisionPlan:
    """The plan: options used, notes, and one :class:`NodePlan` per node in graph order."""

    policy: AutocastPolicy
    options: PlanOptions
    nodes: list[NodePlan]
    notes: list[str] = field(default_factory=list)
    calibration_samples: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts per precision, per op type, per top-level module, per rule, and the low-precision MAC share."""
        float_nodes = [node for node in self.nodes if node.precision != NONE]
        per_op: dict[str, Counter] = defaultdict(Counter)
        per_module: dict[str, Counter] = defaultdict(Counter)
        for node in float_nodes:
            per_op[node.op_type][node.precision] += 1
            per_module[_top_module(node.module)][node.precision] += 1
        macs: Counter[str] = Counter()
        for node in self.nodes:
            if node.macs:
                macs[node.precision] += node.macs
        total_macs = sum(macs.values())
        low = self.options.low
        return {
            "nodes": len(self.nodes),
            "precision": dict(sorted(Counter(node.precision for node in self.nodes).items())),
            "rules": dict(sorted(Counter(node.rule for node in float_nodes).items())),
            "op_types": {op: dict(sorted(c.items())) for op, c in sorted(per_op.items())},
            "modules": {module: dict(sorted(c.items())) for module, c in sorted(per_module.items())},
            "macs": {"total": total_macs, "low_precision": macs.get(low, 0),
                     "low_precision_share": round(macs.get(low, 0) / total_macs, 4) if total_macs else None},
        }

    def to_json(self) -> dict[str, Any]:
        """``plan.json``: policy, options, summary and per-node plan (deterministic for identical inputs)."""
        return {
            "policy": self.policy.name, "target": self.options.low, "torch_policy_table": self.policy.torch_version,
            "options": {"overrides": asdict(self.options.overrides), "range_check": self.options.range_check,
                        "headroom": self.options.headroom, "calibration_samples": self.calibration_samples},
            "notes": self.notes, "summary": self.summary(), "nodes": [node.to_json() for node in self.nodes],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> PrecisionPlan:
        """The plan as :meth:`to_json` wrote it (the policy table of the torch version it names)."""
        options = data["options"]
        plan_options = PlanOptions(policy=data["policy"], target=data["target"],
                                   torch_version=data.get("torch_policy_table"),
                                   overrides=Overrides(**options["overrides"]), range_check=options["range_check"],
                                   headroom=options["headroom"])
        policy, _ = resolve_policy(data["policy"], data.get("torch_policy_table"))
        nodes = [NodePlan(**node) for node in data["nodes"]]
        return PrecisionPlan(policy, plan_options, nodes, list(data.get("notes", [])),
                             options.get("calibration_samples", 0))

    @staticmethod
    def load(path: str | Path) -> PrecisionPlan:
        """Read a ``plan.json``; one-line error when the file is missing or is not an mpexport plan."""
        path = Path(path)
        try:
            return PrecisionPlan.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise MpexportError(f"plan '{path}' does not exist", stage=STAGE) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise MpexportError(f"'{path}' is not an mpexport plan: {type(exc).__name__}: {exc}",
                                stage=STAGE) from None

    def precisions(self) -> dict[str, str]:
        """Node name -> planned precision."""
        return {node.name: node.precision for node in self.nodes}


def _top_module(module: str | None) -> str:
    if module is None:
        return "<unknown>"
    return module.split(".")[0] if module else "<root>"


def load_overrides(path: str | Path) -> tuple[Overrides, dict[str, Any]]:
    """Read a TOML policy file: ``[keep_fp32]`` and ``[force_low]`` tables with ``modules``/``ops``/``nodes``
    lists, plus optional top-level ``policy``, ``target`` and ``range_check``. Returns the overrides and the
    top-level settings."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MpexportError(f"policy file '{path}' does not exist", stage=STAGE) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MpexportError(f"policy file '{path}' is not valid TOML: {exc}", stage=STAGE) from None
    known = {"keep_fp32", "force_low", "policy", "target", "range_check", "headroom"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MpexportError(f"policy file '{path}': unknown key(s) {', '.join(unknown)}", stage=STAGE,
                            hint=f"known keys: {', '.join(sorted(known))}")
    lists: dict[str, list[str]] = {}
    for table, prefix in (("keep_fp32", "keep_fp32"), ("force_low", "force_low")):
        section = data.get(table, {})
        if not isinstance(section, dict) or set(section) - {"modules", "ops", "nodes"}:
            raise MpexportError(f"policy file '{path}': [{table}] takes modules, ops and nodes lists", stage=STAGE)
        for key in ("modules", "ops", "nodes"):
            values = section.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise MpexportError(f"policy file '{path}': {table}.{key} must be a list of strings", stage=STAGE)
            lists[f"{prefix}_{key}"] = values
    settings: dict[str, Any] = {key: data[key] for key in ("policy", "target", "range_check", "headroom")
                                if key in data}
    return Overrides(**lists), settings


def make_plan(model: ir.Model, records: list[NodeProvenance], options: PlanOptions,
              ranges: RangeStats | None = None) -> PrecisionPlan:
    """Decide every node's precision (see the module docstring). ``records`` is the provenance of ``model``'s
    nodes (from :func:`mpexport.provenance.collect_provenance`), keyed by node name; nodes without a unique name
    are named first, in place (:func:`mpexport.graphs.name_nodes_uniquely`: a no-op on mpexport's exports)."""
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
        node belongs to (:mod:`mpexport.patterns`), else a stand-in inferred from the ONNX op type (each said so
        in the op name)."""
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

"""What the captured FX graph knows about autocast that the ONNX graph no longer shows.

The ONNX exporter decomposes the captured ``ExportedProgram`` (``rms_norm`` becomes pow/mean/rsqrt/mul,
names shift) and inlines ``torch.autocast`` regions. Before that information is gone, this module records
per FX node of the decomposed program:

* ``origin``: the node of the captured program it came from (``rms_norm`` for the ``pow`` of an RMSNorm);
* per origin node: its op (what autocast intercepted in eager: ``aten.rms_norm.default``), the
  ``torch.autocast`` state the model's own code set around it, per device (``{"cuda": {"enabled": False,
  "dtype": ...}}``, innermost region winning), and which of its inputs passed through an explicit cast to
  FP32 (``x.float()``), a no-op the FP32 graph drops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FP32_CAST_TARGETS = ("aten.to.dtype", "aten._to_copy.default", "aten.to.dtype_layout", "aten.to.device")
WRAP_WITH_AUTOCAST = "wrap_with_autocast"


@dataclass
class FxFacts:
    """Facts keyed by FX node name (see the module docstring)."""

    origin: dict[str, str] = field(default_factory=dict)
    target: dict[str, str] = field(default_factory=dict)
    region: dict[str, dict[str, Any]] = field(default_factory=dict)
    fp32_inputs: dict[str, list[str]] = field(default_factory=dict)

    def origin_of(self, fx_name: str | None) -> str | None:
        """The captured-program node an FX node of the decomposed program came from (itself if unknown)."""
        if fx_name is None:
            return None
        return self.origin.get(fx_name, fx_name)


def collect_fx_facts(source: torch.export.ExportedProgram | None,
                     decomposed: torch.export.ExportedProgram | None) -> FxFacts:
    """Facts from the captured program (``source``) and the one the ONNX exporter translated (``decomposed``)."""
    facts = FxFacts()
    if decomposed is not None:
        for node in decomposed.graph.nodes:
            root = _root_name(node.meta.get("from_node"))
            if root and root != node.name:
                facts.origin[node.name] = root
    if source is not None:
        _walk(source.graph_module, facts, region=None)
    return facts


def _root_name(sources: Any) -> str | None:
    """The name at the end of a node's ``from_node`` chain: the node of the program that was decomposed."""
    name = None
    while sources:
        last = sources[-1] if isinstance(sources, list) else sources
        name = getattr(last, "name", name)
        sources = getattr(last, "from_node", None)
    return name


def _walk(module: torch.fx.GraphModule, facts: FxFacts, region: dict[str, Any] | None) -> None:
    import torch

    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        target = op_name(node.target)
        facts.target[node.name] = target
        if region is not None:
            facts.region[node.name] = region
        if target.endswith(WRAP_WITH_AUTOCAST):
            device, dtype, enabled = node.args[0], node.args[1], node.args[2]
            inner = getattr(module, node.args[4].target)
            state = {"enabled": bool(enabled), "dtype": str(dtype).removeprefix("torch.") if dtype else None}
            _walk(inner, facts, {**(region or {}), str(device): state})
            continue
        if _is_fp32_cast(node, target):
            source = node.args[0]
            while isinstance(source, torch.fx.Node) and _is_fp32_cast(source, op_name(source.target)):
                source = source.args[0]
            for user in node.users:
                if isinstance(source, torch.fx.Node):
                    facts.fp32_inputs.setdefault(user.name, []).append(source.name)


def op_name(target: Any) -> str:
    """The name provenance uses for an FX node's target: ``aten.op.overload`` for an op overload, ``higher_order.NAME``
    for a higher-order op, else its text."""
    import torch

    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    return str(getattr(target, "__name__", target))


def _is_fp32_cast(node: torch.fx.Node, target: str) -> bool:
    import torch

    if target not in FP32_CAST_TARGETS:
        return False
    dtype = node.kwargs.get("dtype", next((a for a in node.args[1:] if isinstance(a, torch.dtype)), None))
    return dtype == torch.float32

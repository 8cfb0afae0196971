"""The exporter's graph optimizer, run so that every node keeps the provenance of one aten op."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

MERGING_REWRITE_RULES = ("FuseBatchNorm", "FuseConvPad", "FuseConvIntegerPad", "CastCast")
"""Rewrite rules of the exporter's optimizer left out: they merge nodes of different aten ops (Conv +
BatchNorm, Pad + Conv), so the merged node would carry one op's provenance for both, or they delete
a rounding the model declared (Cast -> Cast)."""


def optimize_keeping_provenance(model: ir.Model) -> None:
    """The exporter's default graph optimization (constant folding, redundancy removal, the rewrite rules)
    minus :data:`MERGING_REWRITE_RULES`, in place, so every node keeps one true module and aten op."""
    from onnxscript import rewriter

    rules = [rule for rule in rewriter._DEFAULT_REWRITE_RULES
             if not str(getattr(rule, "name", "")).startswith(MERGING_REWRITE_RULES)]
    try:
        _optimize(model, rules)
    finally:
        _forget_matched_graphs(rules)


def _forget_matched_graphs(rules: list[Any]) -> None:
    """onnxscript's default rewrite rules are module-level objects whose matchers keep the last graph they
    matched (onnxscript 0.7): left alone, the exported model and the PyTorch weights it wraps outlive convert's
    export stage, and a large model is held twice from then on."""
    for rule in rules:
        matcher: Any = getattr(rule, "_matcher", None)
        if hasattr(matcher, "_init_match"):
            matcher._init_match(0)  # a fresh, empty match result
        for attribute in ("_graph", "_current_node", "_tracer"):
            if hasattr(matcher, attribute):
                setattr(matcher, attribute, None)


def _optimize(model: ir.Model, rules: list[Any]) -> None:
    import onnx_ir.passes.common as common_passes
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                ),
                rewriter.RewritePass(rules),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)

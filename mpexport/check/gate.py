"""The gate: per backend and output, the budget from the training noise floor (or explicit thresholds), and the
failures it finds."""

from __future__ import annotations

from typing import Any

from mpexport.base.status import FAILED, RAN
from mpexport.check.backends import AMP, NOISE_FLOORS, ONNX_FP32
from mpexport.check.compare import FP32_RTOL, Comparison
from mpexport.check.metrics import OutputMetrics
from mpexport.check.report import VerifyOptions

ABS_FLOOR = 1e-3
"""Smallest max-abs budget, relative to the output's scale."""


COSINE_FLOOR = 1e-5


TOP1_FLOOR = 0.01


def mismatches(comparisons: dict[str, Comparison], states: dict[str, dict[str, Any]]) -> list[str]:
    """Failures for outputs that differ in shape or dtype from the reference, for each backend that ran."""
    return [f"{name}: output '{output}' {why}" for name, comparison in comparisons.items()
            if states[name]["state"] == RAN for output, why in comparison.mismatches.items()]


def unchecked(states: dict[str, dict[str, Any]], gated: tuple[str, ...], required: tuple[str, ...]) -> list[str]:
    """Failures for gated backends that failed, and for required ones that did not run."""
    found = []
    for name in gated:
        state = states.get(name)
        if state is None:
            continue
        if state["state"] == FAILED:
            found.append(f"{name}: {state['why']}")
        elif name in required and state["state"] != RAN:
            found.append(f"{name}: did not run ({state.get('why', 'no reason')}); a verdict needs it")
    return found


def gate(metrics: dict[str, dict[str, OutputMetrics]], options: VerifyOptions) -> tuple[dict, list[str]]:
    """Thresholds per gated backend and output, and the failures (one line each, with the numbers)."""
    thresholds: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    noise = next((name for name in NOISE_FLOORS if name in metrics), AMP)
    amp = metrics.get(noise, {})
    for backend, outputs in metrics.items():
        if backend in NOISE_FLOORS:
            continue
        for name, m in outputs.items():
            limits = _limits(backend, m, amp.get(name), options, noise)
            thresholds.setdefault(backend, {})[name] = limits
            if m.nonfinite:
                failures.append(f"{backend}: output '{name}' has {m.nonfinite} non-finite values where FP32 is finite")
            if m.max_abs > limits["atol"]:
                failures.append(f"{backend}: output '{name}' max abs error {m.max_abs:.3g} > {limits['atol']:.3g} "
                                f"({limits['source']})")
            if "min_cosine" in limits and m.min_cosine < limits["min_cosine"]:
                failures.append(f"{backend}: output '{name}' min cosine {m.min_cosine:.6f} < "
                                f"{limits['min_cosine']:.6f} ({limits['source']})")
            if "min_top1_agreement" in limits and m.top1_agreement is not None and \
                    m.top1_agreement < limits["min_top1_agreement"]:
                failures.append(f"{backend}: output '{name}' top-1 agreement {m.top1_agreement:.4f} < "
                                f"{limits['min_top1_agreement']:.4f} ({limits['source']})")
    return thresholds, failures


def _limits(backend: str, m: OutputMetrics, amp: OutputMetrics | None, options: VerifyOptions,
            noise: str = AMP) -> dict[str, Any]:
    scale = max(m.scale, 1e-12)
    if backend == ONNX_FP32:
        return {"atol": FP32_RTOL * scale, "source": f"FP32 export: {FP32_RTOL:g} of the output scale {scale:.3g}"}
    factor = options.budget_factor
    floor = ABS_FLOOR * scale
    overflowed = amp is not None and amp.nonfinite > 0
    if overflowed:  # the training precision itself overflows on this data: no finite noise floor to scale
        amp = None
    if amp is not None:
        limits: dict[str, Any] = {
            "atol": max(factor * amp.max_abs, floor),
            "min_cosine": 1 - max(factor * (1 - amp.min_cosine), COSINE_FLOOR),
            "source": f"{factor:g} x the {noise} noise floor",
        }
        if amp.top1_agreement is not None:
            limits["min_top1_agreement"] = 1 - max(factor * (1 - amp.top1_agreement), TOP1_FLOOR)
    else:
        why = f"the {noise} noise floor has non-finite values: training's own precision overflows on this data" \
            if overflowed else f"no {noise} noise floor"
        limits = {"atol": 1e-2 * scale, "min_cosine": 0.999, "source": f"fixed budget ({why})"}
        if m.classifier:
            limits["min_top1_agreement"] = 1 - TOP1_FLOOR
    if options.atol is not None:
        limits["atol"] = options.atol
    if options.min_cosine is not None:
        limits["min_cosine"] = options.min_cosine
    if options.max_top1_drop is not None and m.classifier:
        limits["min_top1_agreement"] = 1 - options.max_top1_drop
    if options.atol is not None or options.min_cosine is not None or options.max_top1_drop is not None:
        limits["source"] += ", explicit thresholds override"
    return limits

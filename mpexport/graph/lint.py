"""Lint a mixed-precision ONNX model before anyone deploys it.

Checks: the full ``onnx.checker`` check with strict shape inference (ops ONNX does not register at the model's
opset but ONNX Runtime runs, such as LayerNormalization below opset 17, set aside for it); ONNX Runtime loads it (a
build without kernels for a type, e.g. BF16 on the CPU, is reported as skipped with the reason); every Cast's ``to``
equals its output's declared type; no FP16->FP32->FP16 rounding chains; and, given a plan, every node's realized
precision equals the planned one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from mpexport.base.errors import MpexportError, first_line
from mpexport.graph.checker import check_setting_aside, describe, runtime_finding, unregistered_ops, unshaped_outputs
from mpexport.graph.contract import (
    FAIL,
    PASS,
    SKIPPED,
    Check,
    PlannedPrecisions,
    cast_types,
    plan_match,
    rounding_chains,
)


@dataclass
class LintResult:
    """All checks of one model."""

    path: Path
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """True when no check failed."""
        return all(check.status != FAIL for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The result as recorded in the manifest and printed by ``lint --json``."""
        return {"model": str(self.path), "ok": self.ok,
                "checks": [{"name": c.name, "status": c.status, "detail": c.detail, "findings": c.findings[:20]}
                           for c in self.checks]}


def lint_model(path: str | Path, plan: PlannedPrecisions | Mapping[str, str] | None = None) -> LintResult:
    """Run every check on the ONNX file ``path``. Given a ``plan`` (a :class:`PlannedPrecisions` such as a
    :class:`mpexport.precision.plan.PrecisionPlan`, or node name ->
    precision), every node of the model, subgraph bodies included, must realize its planned precision; a
    planned node missing from the model fails unless it is a Cast the writer removed as a no-op (known from a
    :class:`PlannedPrecisions` only), and a node neither planned nor added by mpexport fails."""
    path = Path(path)
    if not path.is_file():
        raise MpexportError(f"'{path}' does not exist", stage="lint")
    try:
        model = ir.load(str(path))
    except Exception as exc:  # noqa: BLE001 - anything unreadable is bad input
        raise MpexportError(f"'{path}' is not a readable ONNX model: {first_line(exc)}", stage="lint") from None
    checks = [_checker(path, model), _runtime(path), cast_types(model), rounding_chains(model)]
    if plan is not None:
        checks.append(plan_match(model, plan))
    return LintResult(path, checks)


def _checker(path: Path, model: ir.Model) -> Check:
    """The full check of the file; ops ONNX does not register at the model's opset (LayerNormalization below 17),
    and graph outputs that declare no shape (as the model convert was given declared them), are set aside for it
    (:mod:`mpexport.graph.checker`) and left to the ONNX Runtime check."""
    detail = "full check with strict shape inference"
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker's verdict is the finding
        ops, unshaped = unregistered_ops(model), unshaped_outputs(model)
        other = check_setting_aside(model, ops, full_check=True, unshaped=unshaped) if ops or unshaped else None
        if not (ops or unshaped) or other is not None:
            return Check("onnx.checker", FAIL, other or first_line(exc, 400))
        aside = [describe(ops)] if ops else []
        aside += [f"graph output(s) {', '.join(unshaped)} declaring no shape"] if unshaped else []
        return Check("onnx.checker", PASS, f"{detail}; set aside for the ONNX Runtime check: {'; '.join(aside)}")
    return Check("onnx.checker", PASS, detail)


def _runtime(path: Path) -> Check:
    import onnxruntime as ort

    text = runtime_finding(path)
    if text is not None:
        if "NOT_IMPLEMENTED" in text:
            return Check("onnxruntime", SKIPPED, f"this ONNX Runtime build has no kernel for a type the model "
                         f"uses: {text}")
        return Check("onnxruntime", FAIL, text)
    return Check("onnxruntime", PASS, f"loads with {ort.__version__} (CPUExecutionProvider)")







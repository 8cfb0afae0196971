"""Lint a mixed-precision ONNX model before anyone deploys it.

Checks: the full ``onnx.checker`` check with strict shape inference; ONNX Runtime loads it (a build without
kernels for a type, e.g. BF16 on the CPU, is reported as skipped with the reason); every Cast's ``to`` equals
its output's declared type; no FP16->FP32->FP16 rounding chains; and, given a plan, every node's realized
precision equals the planned one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from mpexport.errors import MpexportError, first_line
from mpexport.rewrite import FLOAT_TYPES, TYPE_NAMES, realized_precisions

PASS, FAIL, SKIPPED = "pass", "fail", "skipped"


@dataclass
class Check:
    """One lint check: its name, status (pass/fail/skipped) and what it found."""

    name: str
    status: str
    detail: str = ""
    findings: list[str] = field(default_factory=list)


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


def lint_model(path: str | Path, plan: dict[str, str] | None = None) -> LintResult:
    """Run every check on the ONNX file ``path``; ``plan`` maps node names to planned precisions."""
    path = Path(path)
    if not path.is_file():
        raise MpexportError(f"'{path}' does not exist", stage="lint")
    try:
        model = ir.load(str(path))
    except Exception as exc:  # noqa: BLE001 - anything unreadable is bad input
        raise MpexportError(f"'{path}' is not a readable ONNX model: {first_line(exc)}", stage="lint") from None
    checks = [_checker(path), _runtime(path), _cast_types(model), _rounding_chains(model)]
    if plan is not None:
        checks.append(_plan_match(model, plan))
    return LintResult(path, checks)


def load_plan_precisions(plan_path: str | Path) -> dict[str, str]:
    """Node name -> precision from a ``plan.json``."""
    try:
        data = json.loads(Path(plan_path).read_text())
        return {node["name"]: node["precision"] for node in data["nodes"]}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MpexportError(f"'{plan_path}' is not an mpexport plan: {first_line(exc)}", stage="lint") from None


def _checker(path: Path) -> Check:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker's verdict is the finding
        return Check("onnx.checker", FAIL, first_line(exc, 400))
    return Check("onnx.checker", PASS, "full check with strict shape inference")


def _runtime(path: Path) -> Check:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Loading checks the types and that kernels exist. Graph optimizations add nothing to that but materialise
    # weights: loading a GPT-2-large-sized mixed model (1.6 GB) peaked at 3.5 GB with them, 0.1 GB without.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - the runtime's verdict is the finding
        text = first_line(exc, 400)
        if "NOT_IMPLEMENTED" in text:
            return Check("onnxruntime", SKIPPED, f"this ONNX Runtime build has no kernel for a type the model "
                         f"uses: {text}")
        return Check("onnxruntime", FAIL, text)
    return Check("onnxruntime", PASS, f"loads with {ort.__version__} (CPUExecutionProvider)")


def _cast_types(model: ir.Model) -> Check:
    findings = []
    for node in model.graph:
        if node.op_type != "Cast":
            continue
        to = ir.DataType(node.attributes["to"].value)
        declared = node.outputs[0].dtype
        if declared is not None and declared != to:
            findings.append(f"{node.name}: to={to.name}, output declared {declared.name}")
    return Check("cast types", FAIL if findings else PASS, f"{len(findings)} Casts disagree with their output",
                 findings)


def _rounding_chains(model: ir.Model) -> Check:
    findings = []
    for node in model.graph:
        if node.op_type != "Cast" or node.inputs[0] is None:
            continue
        to = ir.DataType(node.attributes["to"].value)
        producer = node.inputs[0].producer()
        if producer is None or producer.op_type != "Cast" or producer.inputs[0] is None:
            continue
        origin = producer.inputs[0].dtype
        middle = ir.DataType(producer.attributes["to"].value)
        if origin == to and to in FLOAT_TYPES and middle == ir.DataType.FLOAT and to != ir.DataType.FLOAT:
            findings.append(f"{producer.name} -> {node.name}: {TYPE_NAMES[to]} -> fp32 -> {TYPE_NAMES[to]}")
    return Check("no rounding chains", FAIL if findings else PASS, f"{len(findings)} chains", findings)


def _plan_match(model: ir.Model, plan: dict[str, str]) -> Check:
    realized = realized_precisions(model)
    findings = [f"{name}: planned {precision}, realized {realized[name]}" for name, precision in plan.items()
                if name in realized and "/" not in name and realized[name] != precision]
    missing = [name for name in plan if name not in realized and "/" not in name]
    findings += [f"{name}: planned, but not in the model" for name in missing]
    return Check("realized precision = plan", FAIL if findings else PASS,
                 f"{sum(1 for n in plan if n in realized)} nodes compared", findings)

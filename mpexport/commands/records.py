"""Every record a command writes into the manifest, built in one place: the plan's and lint's records (convert and
repair), and the reports with verify's verdict (verify and repair)."""

from __future__ import annotations

import json
from typing import Any

from mpexport.bundle.names import ENGINE, FILE_NAMES, FP32_ONNX, MIXED_ONNX, PLAN, REPORT, REPORT_HTML
from mpexport.bundle.records import LintRecord, PlanRecord, VerifyRecord
from mpexport.bundle.store import Bundle, Transaction
from mpexport.check.report import ParityReport
from mpexport.graph.lint import LintResult
from mpexport.precision.plan import PrecisionPlan

PLAN_SUMMARY_KEYS = ("precision", "rules", "macs")
"""The parts of the plan's summary the manifest keeps (the plan file has the rest)."""


def plan_record(plan: PrecisionPlan, policy_source: str) -> PlanRecord:
    """The manifest's record of ``plan``: its policy and target, where the policy came from, notes and summary."""
    summary = {key: value for key, value in plan.summary().items() if key in PLAN_SUMMARY_KEYS}
    return PlanRecord(plan.policy.name, plan.options.low, policy_source, plan.notes, summary)


def lint_record(result: LintResult, bundle: Bundle) -> LintRecord:
    """The manifest's record of linting the bundle's mixed model against its plan (covering both as they are)."""
    return LintRecord(result.ok, result.to_json()["checks"], FILE_NAMES[MIXED_ONNX], bundle.digests(MIXED_ONNX, PLAN))


def write_reports(transaction: Transaction, report: ParityReport, command: str) -> None:
    """Write ``report.json`` and ``report.html`` in ``transaction`` and record the verdict, covering the artifacts the
    backends that ran used (the engine only when the tensorrt backend ran), with the command's stages."""
    from mpexport.check.report_html import render_html

    bundle = transaction.bundle
    covered = [FP32_ONNX, MIXED_ONNX, PLAN] + ([ENGINE] if report.ran("tensorrt") else [])
    transaction.write_text(REPORT, FILE_NAMES[REPORT], json.dumps(report.to_json(), indent=2) + "\n")
    transaction.write_text(REPORT_HTML, FILE_NAMES[REPORT_HTML], render_html(report))
    bundle.manifest.verify = VerifyRecord(report.verdict, report.samples, report.data, report.failures[:10],
                                          {name: _state(state) for name, state in report.backends.items()},
                                          bundle.digests(*covered))
    bundle.manifest.stages[command] = report.stages


def _state(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if key != "ran"}

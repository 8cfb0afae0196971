"""``repair``: when a deployable form fails parity, find a small set of extra FP32 nodes with which every
backend passes the same gate, and say why each node is there. This module runs the steps and commits the result;
the search itself (steps 2-4) is :mod:`mpexport.minimize`.

1. **Baseline**: verify the bundle as it is. A pass leaves nothing to repair. The gate's thresholds (the training
   noise floor) are kept: a repair never loosens them.
2. **Trial samples**: the samples on which the strict emulation breaks the thresholds by itself (non-finite values,
   error beyond ``atol``, cosine below the minimum, top-1 disagreement; the worst :data:`~mpexport.minimize.MAX_FAILING`
   of them) plus :data:`~mpexport.minimize.GUARD_SAMPLES` passing ones spread over the set, so a trial cannot fix one
   sample by breaking others.
3. **Trials are cheap**: a trial re-plans with the extra FP32 nodes (``make_plan``, so downstream nodes follow their
   inputs as training did), rewrites the FP32 working copy in memory with its weights cast at run time (no weight
   converted or written), emulates it strictly and runs the trial samples. No export, no file.
4. **Modules first, then nodes**: the module of the first node localisation names (on the worst failing sample) goes
   FP32 as a whole, what a user would write as ``--keep-fp32-module``; while the trial still fails, localisation under
   it names the next offender, whose module joins (growing along the data flow, at most
   :data:`~mpexport.minimize.MAX_GROWTH` times). Delta debugging (non-contiguous, not prefix bisection) then reduces the
   passing set to a 1-minimal set of nodes: without any one of them, the trial fails. If module growth does not pass,
   delta debugging starts from every low-precision node; if even that fails, it is not a precision problem.
5. **Confirm**: the repaired plan is written as the bundle's plan (rule ``repair``, each reason citing the failure it
   fixes), the mixed model rewritten and linted, and verified with every backend on every sample; a sample that still
   fails joins the trial samples and the search goes on (at most :data:`~mpexport.minimize.MAX_CONFIRMATIONS` times).
   Only a confirmed repair is committed, in one transaction with ``repair.json``, ``repair.policy.toml`` and the report.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpexport.base.status import StageClock
from mpexport.bundle.names import (
    ENGINE,
    FILE_NAMES,
    FP32_ONNX,
    MIXED_ONNX,
    PLAN,
    PROVENANCE,
    RANGES,
    REPAIR,
    REPAIR_POLICY,
)
from mpexport.bundle.store import Bundle
from mpexport.check.forms import load_inputs, model_batch_size
from mpexport.check.report import ParityReport, VerifyOptions
from mpexport.check.verify import verify_forms
from mpexport.commands.records import lint_record, plan_record, write_reports
from mpexport.graph.lint import lint_model
from mpexport.minimize import DEFAULT_MAX_TRIALS
from mpexport.minimize.search import Search, check_repairable
from mpexport.precision.plan import PrecisionPlan, read_plan

MIN_KEPT_SHARE = 0.5
"""A repair must keep at least this share of the plan's low-precision multiply-accumulates low."""


@dataclass
class RepairResult:
    """What ``repair`` found and did: ``status`` is ``repaired``, ``already passing``, ``not found`` or ``too costly``
    (a passing set was found but moves most of the low-precision work to FP32; nothing committed); ``why`` says why
    nothing was committed (the last two), ``notes`` what else the run noticed."""

    status: str
    added_fp32: list[dict[str, Any]] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    trials: int = 0
    seconds: float = 0.0
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    macs: dict[str, Any] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)
    report: ParityReport | None = None
    notes: list[str] = field(default_factory=list)
    why: str | None = None

    @property
    def passed(self) -> bool:
        """True when the bundle passes verify now (repaired, or it already did)."""
        return self.status in ("repaired", "already passing")

    def to_json(self) -> dict[str, Any]:
        """``repair.json``."""
        return {"status": self.status, "added_fp32": self.added_fp32, "modules": self.modules, "nodes": self.nodes,
                "trials": self.trials, "seconds": round(self.seconds, 2),
                "trials_per_second": round(self.trials / self.seconds, 2) if self.seconds else None,
                "before": self.before, "after": self.after, "macs": self.macs, "tried": self.tried,
                "why": self.why, "notes": self.notes}


def repair(directory: str | Path, *, val_data: str | Path | None = None, options: VerifyOptions | None = None,
           trust_pickle: bool = False, factory: str | None = None, max_trials: int = DEFAULT_MAX_TRIALS,
           allow_costly: bool = False, on_trial: Callable[[int, str], None] | None = None) -> RepairResult:
    """Repair a bundle that fails verify (see the module docstring). Commits the repaired plan, the rewritten mixed
    model, ``repair.json``, ``repair.policy.toml`` and a passing report in one transaction, and returns what it
    did; when no set passes within ``max_trials`` trials nothing is changed and ``status`` is ``not found``, with
    what was tried; a set that leaves less than half the low-precision share of the multiply-accumulates is not
    committed (``too costly``) unless ``allow_costly``. ``on_trial`` hears each trial's number and what it tried.
    ``factory`` and ``trust_pickle``: the code the source model needs, as the caller names it (see
    :func:`mpexport.check.forms.load_inputs`)."""
    started = time.perf_counter()
    options = options or VerifyOptions()
    clock = StageClock()
    with clock.stage("open"):
        bundle = Bundle.open(directory, uses=(FP32_ONNX, MIXED_ONNX, PLAN, PROVENANCE, RANGES))
    with clock.stage("load"):
        inputs = load_inputs(bundle, val_data=val_data, trust_pickle=trust_pickle, batch_size=options.batch_size,
                             columns=options.columns or None, factory=factory)
        options, note = model_batch_size(options, inputs.specs, inputs.data)
    with clock.stage("baseline"):
        baseline = verify_forms(bundle, inputs, options)
        baseline.notes += [note] if note else []
    plan = read_plan(bundle)
    if baseline.passed:
        return RepairResult("already passing", report=baseline, seconds=time.perf_counter() - started)
    strict = f"strict-{plan.options.low}"
    check_repairable(baseline, strict)
    search = Search(bundle, plan, inputs, options, baseline, strict, max_trials, on_trial)
    with clock.stage("search"):
        found = search.run()
    result = RepairResult("not found", trials=search.count, tried=search.log,
                          before=_summary(baseline, strict), seconds=time.perf_counter() - started)
    result.notes += [note] if note else []
    if found is None:
        result.why = search.why
        return result
    keep, repaired, report, mixed_dir = found
    try:
        _fill(result, plan, repaired, keep, report, strict)
        result.seconds = time.perf_counter() - started
        costly = _too_costly(result.macs)
        if costly and not allow_costly:
            result.status = "too costly"
            result.why = costly
            return result
        report.stages = clock.stages
        _commit(bundle, repaired, result, report, mixed_dir, policy_file_text(plan, result))
    finally:
        shutil.rmtree(mixed_dir, ignore_errors=True)
    return result


def _too_costly(macs: dict[str, Any]) -> str | None:
    """Why a passing set is not a repair to commit: it moves most of the low-precision work to FP32."""
    before, after = macs.get("low_precision_share_before"), macs.get("low_precision_share_after")
    if before and after is not None and after < MIN_KEPT_SHARE * before:
        return (f"the set that passes moves the low-precision share of the multiply-accumulates from {before:.1%} to "
                f"{after:.1%}: most of the model would run FP32. That is a finding to explain (is FP16 the right "
                "target? try --target bf16), not a repair; --allow-costly commits it anyway")
    return None


# -- results -------------------------------------------------------------------------------------------------
def _summary(report: ParityReport, strict: str) -> dict[str, Any]:
    return {"verdict": report.verdict, "failures": report.failures[:10],
            "strict": {name: metric.to_json() for name, metric in report.metrics.get(strict, {}).items()}}


def _fill(result: RepairResult, original: PrecisionPlan, repaired: PrecisionPlan, keep: frozenset[str],
          report: ParityReport, strict: str) -> None:
    before = {node.name: node for node in original.nodes}
    result.status = "repaired"
    result.report = report
    result.after = _summary(report, strict)
    moved = [node for node in repaired.nodes if node.precision == "fp32" and before[node.name].precision != "fp32"]
    result.added_fp32 = [{"node": node.name, "module": node.module, "op_type": node.op_type, "reason": node.reason,
                          "macs": node.macs or 0} for node in moved]
    result.nodes = sorted(keep, key=[node.name for node in repaired.nodes].index)
    result.modules = _module_patterns(original, keep)
    summary_before, summary_after = original.summary()["macs"], repaired.summary()["macs"]
    result.macs = {"moved_to_fp32": sum(item["macs"] for item in result.added_fp32),
                   "low_precision_share_before": summary_before["low_precision_share"],
                   "low_precision_share_after": summary_after["low_precision_share"], "total": summary_after["total"]}


def _module_patterns(plan: PrecisionPlan, keep: frozenset[str]) -> list[str]:
    """Regexes of the modules whose every low-precision node the repair keeps FP32 (what a user would write)."""
    low = [node for node in plan.nodes if node.precision == plan.options.low and node.module is not None]
    modules = sorted({node.module for node in low if node.name in keep and node.module is not None})
    whole = [module for module in modules if all(node.name in keep for node in low if node.module == module)]
    return [f"^{re.escape(module)}$" for module in whole]


def policy_file_text(plan: PrecisionPlan, result: RepairResult) -> str:
    """``repair.policy.toml``: the options and overrides of ``plan`` (the plan before the repair) plus the
    repair's nodes, in ``--policy`` form, so ``convert --policy repair.policy.toml`` plans the same precisions."""
    overrides = plan.options.overrides

    def strings(values: list[str]) -> str:
        return "[" + ", ".join(_toml_string(value) for value in values) + "]"

    lines = ["# Written by mpexport repair: convert --policy this file reproduces the repaired plan.",
             f"policy = {_toml_string(plan.policy.name)}", f"target = {_toml_string(plan.options.low)}",
             f"range_check = {str(plan.options.range_check).lower()}", f"headroom = {plan.options.headroom}", "",
             "[keep_fp32]", f"modules = {strings(overrides.keep_fp32_modules)}",
             f"ops = {strings(overrides.keep_fp32_ops)}",
             f"nodes = {strings(list(dict.fromkeys([*overrides.keep_fp32_nodes, *result.nodes])))}", "",
             "[force_low]",
             f"modules = {strings(overrides.force_low_modules)}", f"ops = {strings(overrides.force_low_ops)}",
             f"nodes = {strings(overrides.force_low_nodes)}"]
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _commit(bundle: Bundle, plan: PrecisionPlan, result: RepairResult, report: ParityReport, mixed_dir: Path,
            policy_text: str) -> None:
    """One transaction: plan, mixed model (linted), repair record and policy file, the report and the verdict.
    The old verdicts and an engine built from the old model turn stale."""
    mixed_files = sorted(path.name for path in mixed_dir.iterdir())
    with bundle.transaction("repair") as transaction:
        transaction.write_text(PLAN, FILE_NAMES[PLAN], json.dumps(plan.to_json(), indent=2) + "\n")
        for name in mixed_files:
            (mixed_dir / name).rename(transaction.file(name))
        mixed = FILE_NAMES[MIXED_ONNX]
        transaction.put(MIXED_ONNX, mixed, [name for name in mixed_files if name != mixed])
        manifest = bundle.manifest
        manifest.lint = lint_record(lint_model(transaction.file(mixed), plan), bundle)
        manifest.plan = plan_record(plan, manifest.plan.policy_source if manifest.plan else "given")
        transaction.write_text(REPAIR, FILE_NAMES[REPAIR], json.dumps(result.to_json(), indent=2) + "\n")
        transaction.write_text(REPAIR_POLICY, FILE_NAMES[REPAIR_POLICY], policy_text)
        manifest.repair = {key: value for key, value in result.to_json().items() if key not in ("tried", "added_fp32")}
        if bundle.has(ENGINE):
            result.notes.append("the engine was built from the model before the repair: it is stale until "
                                "`mpexport build` rebuilds it (package refuses it until then)")
        report.notes.extend(result.notes)
        report.repair = {key: value for key, value in result.to_json().items() if key != "tried"}
        write_reports(transaction, report, "repair")

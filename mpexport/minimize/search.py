"""The search over extra FP32 nodes: trials re-planned and judged with the strict emulation in memory on the
failing samples (plus guard samples), modules that localisation names grown first, then narrowed by delta
debugging, and the set confirmed on every sample."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx_ir as ir

from mpexport.base.errors import MpexportError
from mpexport.bundle.names import FILE_NAMES, FP32_ONNX, MIXED_ONNX, TEMP_PREFIX
from mpexport.bundle.store import Bundle
from mpexport.check.forms import VerifyInputs
from mpexport.check.report import ParityReport, VerifyOptions
from mpexport.check.verify import verify_forms
from mpexport.graph.onnxfile import save_model
from mpexport.graph.rewrite import apply_plan
from mpexport.minimize import MAX_CONFIRMATIONS, MAX_FAILING, MAX_GROWTH, STAGE
from mpexport.minimize.trials import OutOfTrials, Trials
from mpexport.precision.plan import PrecisionPlan


def check_repairable(baseline: ParityReport, strict: str) -> None:
    """Refuse (one line) a failure no precision change can fix: the FP32 export itself, or a backend that did not
    run."""
    if baseline.backends.get("onnx-fp32", {}).get("state") != "ran" or any(
            failure.startswith("onnx-fp32") for failure in baseline.failures):
        raise MpexportError("the FP32 ONNX model itself fails parity: an export problem, not a precision one",
                            stage=STAGE, hint="look at convert's export check, and report the exporter bug")
    if not baseline.ran(strict):
        raise MpexportError(f"{strict} did not run ({baseline.backends.get(strict, {}).get('why')}): nothing to "
                            "repair against", stage=STAGE)


class Search:
    """The search over :class:`Trials`: the modules localisation names grown first, then narrowed by delta
    debugging (or all low-precision nodes narrowed), and the set confirmed with every backend on every sample; the
    samples a confirmation fails join the trial samples for another round."""

    def __init__(self, bundle: Bundle, plan: PrecisionPlan, inputs: VerifyInputs, options: VerifyOptions,
                 baseline: ParityReport, strict: str, max_trials: int,
                 on_trial: Callable[[int, str], None] | None) -> None:
        self.trials = Trials(bundle, plan, inputs, options, baseline, strict, max_trials, on_trial)
        self.bundle = bundle
        self.plan = plan
        self.inputs = inputs
        self.options = options
        self.strict = strict
        self.failure = next((line for line in baseline.failures if line.startswith(strict)), baseline.failures[0])
        self.observed = {row["node"]: row["observed"] for row in baseline.localisation}
        self.why = ""

    @property
    def count(self) -> int:
        """Trials run so far."""
        return self.trials.count

    @property
    def log(self) -> list[str]:
        """What was tried, a line each."""
        return self.trials.log

    def run(self) -> tuple[frozenset[str], PrecisionPlan, ParityReport, Path] | None:
        """The repaired set, its plan, its passing report and the directory of its mixed model; None if none."""
        try:
            for _ in range(MAX_CONFIRMATIONS):
                keep = self._search()
                if keep is None:
                    return None
                plan, report, mixed_dir = self.confirm(keep)
                if report.passed:
                    return keep, plan, report, mixed_dir
                shutil.rmtree(mixed_dir, ignore_errors=True)
                extra = [index for index in report.failing_samples(self.strict) if index not in self.trials.samples]
                if not extra:
                    self.why = "a set passed every trial sample but not verify on the whole set: " + \
                        "; ".join(report.failures[:2])
                    return None
                self.trials.log.append(f"{len(extra)} samples that failed the confirmation join the trial samples")
                trials = self.trials
                trials.failing += [index for index in extra if index not in trials.failing]
                trials.set_samples(sorted({*trials.samples, *extra[:MAX_FAILING]}))
                trials.cache.clear()
            self.why = f"no set was confirmed on the whole set in {MAX_CONFIRMATIONS} rounds"
        except OutOfTrials:
            self.why = f"stopped after {self.trials.max_trials} trials (--max-trials)"
        return None

    def _search(self) -> frozenset[str] | None:
        grown = self._grow_modules()
        if grown is not None:
            return self._ddmin(grown, "of the modules' nodes")
        everything = frozenset(self.trials.candidates)
        if not self.trials.trial(everything, "every low-precision node FP32").passed:
            self.why = "even with every low-precision node FP32 the strict emulation fails: not a precision problem " \
                "(look at the export check and the FP32 model)"
            return None
        return self._ddmin(everything, "of all low-precision nodes")

    def _grow_modules(self) -> frozenset[str] | None:
        """Modules of the nodes localisation names, added one by one along the data flow, until a trial passes."""
        keep: frozenset[str] = frozenset()
        modules: list[str] = []
        for _ in range(MAX_GROWTH):
            offender = self.trials.first_offender(keep, self.observed)
            if offender is None:
                return None
            if offender.module is None or offender.module in modules:
                group, what = {offender.name}, f"+ node {offender.name}"
            else:
                modules.append(offender.module)
                group = {name for name in self.trials.candidates
                         if _in_module(self.trials.by_name[name].module, offender.module)}
                what = f"+ module '{offender.module or '<root>'}'"
            keep = keep | group
            if self.trials.trial(keep, what).passed:
                return keep
        return None

    def _ddmin(self, passing: frozenset[str], where: str) -> frozenset[str]:
        """Delta debugging: a 1-minimal subset of the passing set ``passing`` (without any one of its nodes, the
        trial fails). Non-contiguous: it tests subsets and their complements, not prefixes."""
        items = [name for name in self.trials.candidates if name in passing]  # graph order: deterministic
        granularity = 2
        while len(items) >= 2:
            chunks = _split(items, granularity)
            reduced = next((chunk for chunk in chunks
                            if self.trials.trial(frozenset(chunk), f"{len(chunk)} {where}").passed), None)
            if reduced is not None:
                items, granularity = reduced, 2
                continue
            rests = [[name for name in items if name not in chunk] for chunk in chunks]
            reduced = next((rest for rest in rests
                            if self.trials.trial(frozenset(rest), f"{len(rest)} {where}").passed), None)
            if reduced is not None:
                items, granularity = reduced, max(granularity - 1, 2)
                continue
            if granularity >= len(items):
                break
            granularity = min(len(items), 2 * granularity)
        return frozenset(items)

    def confirm(self, keep: frozenset[str]) -> tuple[PrecisionPlan, ParityReport, Path]:
        """Write the mixed model of the repaired plan into a temporary directory inside the bundle and verify it
        with every backend on every sample."""
        plan = _with_repair_reasons(self.trials.replanned(keep)[0], keep, self.plan, self.failure, self.observed)
        model = ir.load(str(self.bundle.path(FP32_ONNX)))
        apply_plan(model, plan.precisions(), io_types=self.trials.io_types)
        directory = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=self.bundle.directory))
        mixed_file = FILE_NAMES[MIXED_ONNX]
        external = len(self.bundle.manifest.artifacts[MIXED_ONNX].sha256) > 1
        save_model(model, directory / mixed_file, external_data=f"{mixed_file}.data" if external else None)
        report = verify_forms(self.bundle, self.inputs, self.options, mixed=directory / mixed_file, plan=plan)
        self.trials.log.append(f"confirmation with {len(keep)} nodes FP32 on all {report.samples} samples: "
                               f"{report.verdict}")
        return plan, report, directory


def _split(items: list[str], parts: int) -> list[list[str]]:
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for index in range(parts):
        stop = start + size + (1 if index < extra else 0)
        if stop > start:
            chunks.append(items[start:stop])
        start = stop
    return chunks


def _in_module(module: str | None, prefix: str) -> bool:
    return module is not None and (prefix == "" or module == prefix or module.startswith(f"{prefix}."))


def _with_repair_reasons(plan: PrecisionPlan, keep: frozenset[str], original: PrecisionPlan, failure: str,
                         observed: dict[str, str]) -> PrecisionPlan:
    """The repaired plan with rule ``repair`` on the nodes the repair forced FP32; each reason cites the failure
    it fixes, what localisation saw at the node where it named it, and what the plan had said."""
    before = {node.name: node for node in original.nodes}
    nodes = []
    for node in plan.nodes:
        if node.name in keep:
            was = before[node.name]
            seen = f"; here {observed[node.name]}" if node.name in observed else ""
            node = replace(node, rule="repair", reason=f"repair: kept FP32 to fix '{failure}'{seen} (planned "
                           f"{was.precision.upper()}: {was.reason})")
        nodes.append(node)
    repaired = replace(plan, nodes=nodes)
    repaired.notes = [*plan.notes, f"repaired: {len(keep)} nodes kept FP32 (repair.json)"]
    return repaired

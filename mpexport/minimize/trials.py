"""Trials for the repair search: a set of extra FP32 nodes re-planned, written in memory and judged with the
strict emulation on the trial samples (the worst failing ones and guard samples spread over the set)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from mpexport.backends.onnxruntime import OrtRunner
from mpexport.base.dtypes import TYPE_MAX
from mpexport.base.specs import Batch, PaddedBatch, batch_samples, real_rows, sample_rows
from mpexport.bundle.names import FP32_ONNX
from mpexport.bundle.store import Bundle
from mpexport.capture.provenance import read_provenance
from mpexport.check.forms import VerifyInputs
from mpexport.check.localise import localise
from mpexport.check.report import ParityReport, VerifyOptions
from mpexport.check.samples import SampleStats
from mpexport.data.base import LABELS
from mpexport.graph.emulate import strict_emulation
from mpexport.graph.rewrite import apply_plan
from mpexport.graph.weights import max_abs, reduce_tensor
from mpexport.minimize import GUARD_SAMPLES, MAX_FAILING
from mpexport.precision.options import Overrides
from mpexport.precision.plan import NodePlan, PrecisionPlan, read_ranges
from mpexport.precision.planner import make_plan


class OutOfTrials(Exception):
    """The trial budget is spent."""


@dataclass
class Trial:
    """One trial's verdict: passed, the failing trial samples (worst first), and a summary."""

    passed: bool
    failing: list[int]
    summary: str


class Trials:
    """Trials of extra FP32 node sets: each set re-planned (downstream nodes re-decided), written in memory with its
    weights cast at run time, run in the strict emulation on the trial samples and judged sample by sample against
    the baseline's thresholds (cached per set, at most ``max_trials``)."""

    def __init__(self, bundle: Bundle, plan: PrecisionPlan, inputs: VerifyInputs, options: VerifyOptions,
                 baseline: ParityReport, strict: str, max_trials: int,
                 on_trial: Callable[[int, str], None] | None) -> None:
        self.bundle = bundle
        self.plan = plan
        self.inputs = inputs
        self.options = options
        self.max_trials = max_trials
        self.on_trial = on_trial
        self.records = read_provenance(bundle)
        self.ranges = read_ranges(bundle)
        # Without the calibration statistics (a bundle from an older mpexport) the range rule cannot be re-run:
        # the nodes it kept FP32 stay FP32.
        self.range_kept = [node.name for node in plan.nodes if node.rule == "range"] if self.ranges is None else []
        self.io_types = str(bundle.manifest.rewrite.get("io_types", "fp32"))
        self.low = plan.options.low
        self.thresholds = baseline.thresholds[strict]
        self.total = baseline.samples
        self.by_name = {node.name: node for node in plan.nodes}
        self.candidates = [node.name for node in plan.nodes if node.precision == self.low]
        self.cast_at_runtime = _fitting_initializers(bundle.path(FP32_ONNX), TYPE_MAX[self.low])
        self.failing = _worst_first(baseline, strict)
        self.set_samples(_trial_samples(baseline, strict, self.failing))
        self.cache: dict[frozenset[str], Trial] = {}
        self.count = 0
        self.log: list[str] = []

    def set_samples(self, samples: list[int]) -> None:
        """The trial samples' inputs in batches and the FP32 reference's outputs on them (computed once)."""
        self.samples = samples
        self.batches = _gather(self.inputs, samples, self.options.batch_size)
        reference = self.inputs.reference_runner(self.bundle)
        self.reference = [reference.run(batch) for batch, _ in self.batches]

    def replanned(self, keep: Iterable[str]) -> tuple[PrecisionPlan, ir.Model]:
        """The plan with ``keep`` forced FP32 (downstream nodes re-decided), and the FP32 model it was made on."""
        model = ir.load(str(self.bundle.path(FP32_ONNX)))
        extra = Overrides(keep_fp32_nodes=sorted({*keep, *self.range_kept}))
        options = replace(self.plan.options, overrides=self.plan.options.overrides.merged(extra))
        return make_plan(model, self.records, options, self.ranges), model

    def trial_model(self, keep: Iterable[str]) -> tuple[PrecisionPlan, ir.Model]:
        """The mixed model of the plan with ``keep`` FP32, in memory, its weights cast at run time."""
        plan, model = self.replanned(keep)
        apply_plan(model, plan.precisions(), io_types=self.io_types, cast_at_runtime=self.cast_at_runtime)
        return plan, model

    def trial(self, keep: frozenset[str], what: str) -> Trial:
        """Run the strict emulation of the plan with ``keep`` FP32 on the trial samples (cached per set)."""
        if keep in self.cache:
            return self.cache[keep]
        if self.count >= self.max_trials:
            raise OutOfTrials
        self.count += 1
        _, model = self.trial_model(keep)
        runner = OrtRunner.from_model(strict_emulation(model), self.bundle.path(FP32_ONNX).parent, name="trial")
        result = self._judge([runner.run(batch) for batch, _ in self.batches])
        self.cache[keep] = result
        self.log.append(f"trial {self.count}: {what} ({len(keep)} nodes FP32): "
                        f"{'pass' if result.passed else 'fail, ' + result.summary}")
        if self.on_trial:
            self.on_trial(self.count, self.log[-1])
        return result

    def _judge(self, outputs: list[list[np.ndarray]]) -> Trial:
        """Each trial sample against the gate's thresholds by itself; top-1 disagreements within the allowance."""
        names = [spec.name for spec in self.bundle.manifest.outputs]
        failing: set[int] = set()
        mismatches = 0
        for (batch, indices), expected, actual in zip(self.batches, self.reference, outputs, strict=True):
            for name, want, have in zip(names, real_rows(expected, batch), real_rows(actual, batch), strict=False):
                limits = self.thresholds.get(name)
                if limits is None or np.shape(want) != np.shape(have):
                    continue
                stats = SampleStats()
                stats.add(np.asarray(want), np.asarray(have))
                alone = {key: value for key, value in limits.items() if key != "min_top1_agreement"}
                failing.update(indices[position] for position in stats.failing(alone) if position < len(indices))
                if "min_top1_agreement" in limits:
                    mismatches += sum(not match for match in stats.top1_match)
        allowed = self._allowed_mismatches()
        passed = not failing and mismatches <= allowed
        summary = f"{len(failing)} trial samples out of budget" if failing else \
            f"{mismatches} top-1 disagreements (allowed {allowed})"
        return Trial(passed, sorted(failing, key=self._rank), summary)

    def _rank(self, index: int) -> int:
        """Worst failing samples first."""
        return self.failing.index(index) if index in self.failing else len(self.failing) + index

    def _allowed_mismatches(self) -> int:
        limits = next((limits for limits in self.thresholds.values() if "min_top1_agreement" in limits), None)
        return int((1 - limits["min_top1_agreement"]) * self.total) if limits else 0

    def first_offender(self, keep: frozenset[str], observed: dict[str, str]) -> NodePlan | None:
        """The first low-precision node (not yet kept) that localisation names under the plan with ``keep`` FP32,
        on the worst failing trial sample (what it observed there goes into ``observed``)."""
        trial = self.cache.get(keep)
        failing = trial.failing if trial is not None else self.failing
        if not failing:
            return None
        batch, _ = _gather(self.inputs, [failing[0]], 1)[0]
        plan, model = self.trial_model(keep)
        fp32 = self.bundle.path(FP32_ONNX)
        rows, _ = localise(fp32, model, batch, {node.name: node.to_json() for node in plan.nodes}, low=self.low,
                           base_dir=fp32.parent)
        for row in rows:
            if row["node"] in self.by_name and row["node"] in self.candidates and row["node"] not in keep:
                observed.setdefault(row["node"], row["observed"])
                return self.by_name[row["node"]]
        return None


def _fitting_initializers(fp32_path: Path, limit: float) -> set[str]:
    """Initializers whose values the low type holds (cast at run time in trials; the others are converted, with
    mask sentinels saturated as the writer does)."""
    model = ir.load(str(fp32_path))
    fitting = set()
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and value.dtype == ir.DataType.FLOAT and reduce_tensor(tensor, max_abs) <= limit:
            fitting.add(name)
    return fitting


def _worst_first(baseline: ParityReport, strict: str) -> list[int]:
    """The samples failing the strict emulation, the worst first (most non-finite values, then largest error)."""
    stats = list(baseline.per_sample.values())

    def badness(index: int) -> tuple[int, float]:
        return (sum(s.nonfinite[index] for s in stats), max(s.max_abs[index] for s in stats))

    return sorted(baseline.failing_samples(strict), key=badness, reverse=True)


def _trial_samples(baseline: ParityReport, strict: str, failing: list[int]) -> list[int]:
    """The worst failing samples (at most MAX_FAILING) and GUARD_SAMPLES passing ones spread over the set."""
    chosen = set(failing[:MAX_FAILING])
    passing = [index for index in range(baseline.samples) if index not in set(failing)]
    step = max(1, len(passing) // GUARD_SAMPLES)
    return sorted(chosen | set(passing[::step][:GUARD_SAMPLES]))


def _gather(inputs: VerifyInputs, samples: list[int], batch_size: int) -> list[tuple[Batch, list[int]]]:
    """The inputs of ``samples`` (global indices) in batches of up to ``batch_size`` (batches that run only whole, as
    a model with a fixed batch size takes them: the whole batches that hold them, a short last one padded), with the
    indices of the real samples each holds."""
    wanted = set(samples)
    fixed = inputs.data.run_batch(inputs.specs)
    whole = inputs.data.whole_batches(inputs.specs)
    size = fixed or batch_size
    found: list[tuple[Batch, list[int]]] = []
    pending: list[tuple[dict[str, np.ndarray], int]] = []
    start = 0
    for batch in inputs.data.batches(size, inputs=inputs.specs):
        count = batch_samples(batch)
        hits = [position for position in range(count) if start + position in wanted]
        if whole and hits:
            found.append((_without_labels(batch), list(range(start, start + count))))
        elif not whole:
            pending += [(sample_rows(_without_labels(batch), position, position + 1), start + position)
                        for position in hits]
        start += count
        if start > max(samples, default=-1):
            break
    for offset in range(0, len(pending), batch_size):
        group = pending[offset:offset + batch_size]
        shapes = {tuple(array.shape for array in item.values()) for item, _ in group}
        if len(shapes) == 1:
            found.append(({name: np.concatenate([item[name] for item, _ in group]) if np.ndim(array) else array
                           for name, array in group[0][0].items()}, [index for _, index in group]))
        else:
            found += [(item, [index]) for item, index in group]
    return found


def _without_labels(batch: Batch) -> Batch:
    arrays = {name: array for name, array in batch.items() if name != LABELS}
    return type(batch)(arrays, batch.samples, batch.size) if isinstance(batch, PaddedBatch) else arrays

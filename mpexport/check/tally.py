"""The tally of one verify: every backend's outputs against the reference, folded batch by batch into mergeable
metrics, per-sample statistics and the worst sample."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mpexport.base.errors import first_line
from mpexport.base.specs import Batch, real_rows
from mpexport.base.status import FAILED, RAN
from mpexport.check.backends import Backends, Timed
from mpexport.check.compare import Comparison, batch_samples
from mpexport.check.gate import gate, mismatches, unchecked
from mpexport.check.metrics import OutputMetrics
from mpexport.check.report import ParityReport, VerifyOptions
from mpexport.check.samples import SampleStats, WorstSample
from mpexport.data.base import LABELS
from mpexport.data.labels import check_label_classes


@dataclass
class Tally:
    """What verify folds in per batch: each backend's comparison with the reference, the reference's accuracy,
    the watched backend's worst sample and per-sample statistics, counts, run times and mid-run failures.
    Tallies over disjoint runs of batches (folded with their global batch indices) join exactly with
    :meth:`merge`, in batch order: a verify split across machines reports what one pass would."""

    reference: str
    comparisons: dict[str, Comparison]
    reference_accuracy: OutputMetrics
    worst: WorstSample
    watch: str | None
    per_sample: dict[str, SampleStats] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    """Backends that raised while running: name -> why."""
    offset: int = 0
    """Samples in the batches before this tally's first (a shard of the data): sample indices are global."""

    @staticmethod
    def start(runners: list[str], outputs: list[str], *, whole_batches: bool, watch: str | None) -> Tally:
        """An empty tally of ``runners[1:]`` against ``runners[0]`` on the named outputs (``whole_batches``: the
        batches run only whole, see :meth:`mpexport.data.base.ValidationData.whole_batches`)."""
        reference, others = runners[0], runners[1:]
        return Tally(reference, {name: Comparison.of(reference, name, outputs) for name in others},
                     OutputMetrics("reference"),
                     WorstSample(whole_batch=whole_batches),
                     watch, seconds=dict.fromkeys(runners, 0.0))

    def fold(self, backends: Backends, batches: Iterable[Batch], *, first: int = 0,
             on_batch: Callable[[int, int | None], None] | None = None, total: int | None = None) -> None:
        """Run every backend that is still running on each batch (``first``: the global index of the first one)
        and fold the outputs in; a backend that raises is marked failed and runs no more. A padded batch (a model
        with a fixed batch size, :class:`mpexport.base.specs.PaddedBatch`) counts and measures its real samples
        only: every metric, label and sample count is the one of the data itself."""
        timed = [Timed(runner) for runner in backends.runners]
        reference, others = timed[0], timed[1:]
        outputs = [metrics.name for metrics in next(iter(self.comparisons.values())).outputs] \
            if self.comparisons else []
        try:
            for index, batch in enumerate(batches, start=first):
                self._fold_batch(index, batch, reference, others, backends, outputs)
                if on_batch:
                    on_batch(self.samples, total)
        finally:
            for runner in timed:
                self.seconds[runner.name] = self.seconds.get(runner.name, 0.0) + runner.seconds

    def _fold_batch(self, index: int, batch: Batch, reference: Timed, others: list[Timed], backends: Backends,
                    outputs: list[str]) -> None:
        expected = real_rows(reference.run(batch), batch)
        labels = batch.get(LABELS)
        labels = real_rows([labels], batch)[0] if labels is not None else None
        count = batch_samples(batch)
        if labels is not None:
            if np.ndim(expected[0]) == 2 and np.ndim(labels) == 1:
                check_label_classes(labels, int(np.shape(expected[0])[1]))
            self.reference_accuracy.update(expected[0], expected[0], labels, batch=index)
        for runner in [runner for runner in others if backends.states[runner.name]["state"] == RAN]:
            try:
                actual = real_rows(runner.run(batch), batch)
            except Exception as exc:  # noqa: BLE001 - a backend that breaks mid-run fails, it is not skipped
                why = f"failed while running: {first_line(exc, 300)}"
                backends.states[runner.name] = {"state": FAILED, "ran": False, "why": why}
                self.failed.setdefault(runner.name, why)
                continue
            self.comparisons[runner.name].fold(expected, actual, samples=count, labels=labels, batch=index)
            if runner.name == self.watch:
                self.worst.consider(batch, expected, actual, self.offset + self.samples)
                for name, want, have in zip(outputs, expected, actual, strict=False):
                    if np.shape(want) == np.shape(have) and np.ndim(want) and len(want) == count:
                        self.per_sample.setdefault(name, SampleStats()).add(np.asarray(want), np.asarray(have))
        self.samples += count
        self.batches += 1

    def merge(self, other: Tally) -> None:
        """Fold in ``other``, a tally of the batches right after this one's: the result equals one pass."""
        for name, comparison in other.comparisons.items():
            self.comparisons[name].merge(comparison)
        self.reference_accuracy.merge(other.reference_accuracy)
        self.worst.merge(other.worst)
        for name, stats in other.per_sample.items():
            self.per_sample.setdefault(name, SampleStats()).extend(stats)
        self.samples += other.samples
        self.batches += other.batches
        for name, seconds in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.failed = {**other.failed, **self.failed}

    def report(self, states: dict[str, dict[str, Any]], options: VerifyOptions, data: str, *,
               gated: tuple[str, ...], required: tuple[str, ...]) -> ParityReport:
        """Gate the tally: thresholds, failures (backends that failed while running, required ones that did not
        run, outputs beyond budget) and the verdict. ``states``: each backend's state when it was built."""
        states = {name: dict(state) for name, state in states.items()}
        for name, why in self.failed.items():
            states[name] = {"state": FAILED, "ran": False, "why": why}
        metrics = {name: comparison.by_name() for name, comparison in self.comparisons.items()
                   if states[name]["state"] == RAN}
        thresholds, failures = gate(metrics, options)
        failures = mismatches(self.comparisons, states) + unchecked(states, gated, required) + failures
        for name, seconds in self.seconds.items():
            states[name]["seconds"] = round(seconds, 3)
        if self.reference_accuracy.accuracy is not None:
            states[self.reference]["accuracy"] = self.reference_accuracy.accuracy
        return ParityReport("pass" if not failures else "fail", states, metrics, thresholds, failures,
                            samples=self.samples, data=data, batches=self.batches, options=asdict(options),
                            worst=self.worst if self.worst.batch is not None else None, per_sample=self.per_sample,
                            reference=self.reference)







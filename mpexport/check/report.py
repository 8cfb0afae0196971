"""What a verify concludes: its options (batching, budget, explicit thresholds) and its :class:`ParityReport`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mpexport.base.status import RAN, StageStatus
from mpexport.check.metrics import OutputMetrics
from mpexport.check.samples import SampleStats, WorstSample

STAGE = "verify"
TRAINED_GAP = 0.02
"""How far (a fraction: 2 percentage points) the FP32 reference may score below the accuracy its training record
reports on the same data before verify notes that the model loaded is likely not the model trained."""


@dataclass
class VerifyOptions:
    """Budget factor over the training noise floor, explicit thresholds (None: from the budget), batching."""

    budget_factor: float = 2.0
    atol: float | None = None
    min_cosine: float | None = None
    max_top1_drop: float | None = None
    batch_size: int = 64
    max_samples: int | None = None
    columns: dict[str, str] = field(default_factory=dict)
    """For a table given as ``val_data``: input (or ``labels``) -> column (``--columns``)."""


@dataclass
class ParityReport:
    """Metrics per backend and output, thresholds, verdict, failures, each backend's state, localisation."""

    verdict: str
    backends: dict[str, dict[str, Any]]
    metrics: dict[str, dict[str, OutputMetrics]]
    thresholds: dict[str, dict[str, Any]]
    failures: list[str]
    localisation: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    data: str = ""
    notes: list[str] = field(default_factory=list)
    stages: list[StageStatus] = field(default_factory=list)
    """The command's stages (status, seconds, peak memory)."""
    batches: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    worst: WorstSample | None = None
    """The sample the strict emulation got most wrong (localisation runs on it)."""
    per_sample: dict[str, SampleStats] = field(default_factory=dict)
    """Per output of the strict emulation: each sample's own statistics (repair picks the failing samples)."""
    repair: dict[str, Any] | None = None
    """What ``repair`` changed, when this report confirms a repair."""
    reference: str = ""
    """The backend every other was compared with: ``torch-fp32``, or ``onnx-fp32`` without a PyTorch model."""
    trained: dict[str, Any] | None = None
    """The accuracy the training record reports beside the reference's on these labels
    (:func:`trained_accuracy`), None when the record reports none."""

    def failing_samples(self, backend: str) -> list[int]:
        """The samples on which ``backend`` breaks its thresholds by themselves (non-finite values, error beyond
        ``atol``, cosine below the minimum) or disagrees on top-1 with FP32, in order."""
        failing: set[int] = set()
        for output, stats in self.per_sample.items():
            limits = self.thresholds.get(backend, {}).get(output)
            if limits is not None:
                failing.update(stats.failing(limits))
        return sorted(failing)

    @property
    def passed(self) -> bool:
        """True when the verdict is pass."""
        return self.verdict == "pass"

    def ran(self, backend: str) -> bool:
        """True when ``backend`` ran over the whole data."""
        return self.backends.get(backend, {}).get("state") == RAN

    def to_json(self) -> dict[str, Any]:
        """``report.json``: verdict, thresholds, metrics per backend and output, failures, localisation."""
        return {
            "verdict": self.verdict, "reference": self.reference, "samples": self.samples, "batches": self.batches,
            "data": self.data,
            "options": self.options, "failures": self.failures,
            "thresholds": self.thresholds, "backends": self.backends, "notes": self.notes,
            "metrics": {backend: {name: m.to_json() for name, m in outputs.items()}
                        for backend, outputs in self.metrics.items()},
            "localisation": self.localisation,
            "localised_on": self.worst.to_json() if self.worst is not None and self.localisation else None,
            "repair": self.repair,
            "trained_accuracy": self.trained,
            "stages": [stage.to_json() for stage in self.stages],
        }


def trained_accuracy_line(trained: Mapping[str, Any]) -> str:
    """One sentence on :func:`trained_accuracy`'s result: the recorded accuracy and its evidence, whether it was
    measured on verify's data, and what the reference scores here."""
    def percent(value: Any) -> str:
        return f"{value:.1%}" if isinstance(value, (int, float)) else "not measured (no labels)"

    recorded = trained.get("recorded_accuracy")
    same = {True: "the same data", False: "other data (SHA-256 differs)", None: "data it does not identify by SHA-256"}
    return (f"trained accuracy: {percent(recorded) if recorded is not None else 'none'} recorded "
            f"({trained.get('evidence')}), on {same[trained.get('same_data')]}; {trained.get('reference')} scores "
            f"{percent(trained.get('reference_accuracy'))} here")


def trained_accuracy(recorded: Mapping[str, Any], reference: str, measured: float | None,
                     data_sha256: str | None) -> tuple[dict[str, Any], str | None]:
    """The training record's validation accuracy (the form of :mod:`mpexport.sources.accuracy`) beside the
    ``reference``'s accuracy ``measured`` on verify's labels (None without labels), and a note when the record says it
    was measured on the same data (its ``data_sha256`` equals ``data_sha256``, the SHA-256 of verify's data) and the
    reference scores more than :data:`TRAINED_GAP` below it: the model loaded is likely not the model trained. The
    note never changes the verdict: parity with the FP32 model is what verify judges."""
    accuracy = recorded.get("accuracy")
    theirs = recorded.get("data_sha256")
    same = None if theirs is None or data_sha256 is None else theirs == data_sha256
    result: dict[str, Any] = {
        "recorded_accuracy": accuracy, "recorded_loss": recorded.get("loss"), "evidence": recorded.get("evidence"),
        "recorded_data": recorded.get("data"), "recorded_data_sha256": theirs, "reference": reference,
        "reference_accuracy": measured, "same_data": same, "likely_not_trained_model": False,
    }
    if not (same and isinstance(accuracy, (int, float)) and measured is not None and accuracy - measured > TRAINED_GAP):
        return result, None
    result["likely_not_trained_model"] = True
    return result, (f"the FP32 reference ({reference}) scores {measured:.1%} on the validation labels, "
                    f"{100 * (accuracy - measured):.1f} points below the {accuracy:.1%} its training record reports on "
                    f"the same data (SHA-256 {data_sha256[:12] if data_sha256 else ''}…, {recorded.get('evidence')}): "
                    "the model loaded is likely not the model trained (damaged weights, or another checkpoint)")

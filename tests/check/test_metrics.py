"""Parity metrics and comparisons on arrays made here: the numbers verify and the export check gate on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpexport.check.compare import Comparison, batch_samples
from mpexport.check.metrics import OutputMetrics

RNG = np.random.default_rng(7)


def test_metrics_of_a_known_error() -> None:
    reference = RNG.normal(size=(16, 10)).astype(np.float32)
    candidate = reference.copy()
    candidate[3, 4] += 0.5
    metrics = OutputMetrics("logits")
    metrics.update(reference, candidate, labels=reference.argmax(axis=1))
    assert metrics.samples == 16 and metrics.count == reference.size
    assert metrics.max_abs == pytest.approx(0.5, rel=1e-6)
    assert metrics.sum_abs == pytest.approx(0.5, rel=1e-6)
    assert metrics.nonfinite == 0 and metrics.classifier
    assert metrics.accuracy == 1.0 or metrics.top1_agreement is not None
    assert metrics.min_cosine < 1.0
    snr = 10 * math.log10(metrics.signal / metrics.noise)
    assert metrics.snr_db == pytest.approx(snr, rel=1e-6)


def test_non_finite_values_where_the_reference_is_finite_are_counted() -> None:
    reference = np.ones((4, 3), np.float32)
    candidate = reference.copy()
    candidate[0, 0], candidate[1, 1] = np.inf, np.nan
    metrics = OutputMetrics("y")
    metrics.update(reference, candidate)
    assert metrics.nonfinite == 2


def test_identical_outputs_have_no_error() -> None:
    reference = RNG.normal(size=(8, 5))
    metrics = OutputMetrics("y")
    metrics.update(reference, reference.copy())
    assert metrics.max_abs == metrics.max_rel == metrics.sum_abs == 0.0
    assert metrics.min_cosine == pytest.approx(1.0) and metrics.p99_abs == 0.0


def test_shapes_that_differ_are_refused() -> None:
    with pytest.raises(ValueError, match="shapes"):
        OutputMetrics("y").update(np.zeros((2, 3)), np.zeros((3, 2)))


def test_metrics_merged_from_parts_equal_one_pass() -> None:
    batches = [(RNG.normal(size=(8, 6)), RNG.normal(size=(8, 6))) for _ in range(4)]
    whole = OutputMetrics("y")
    for index, (want, have) in enumerate(batches):
        whole.update(want, have, batch=index)
    first, second = OutputMetrics("y"), OutputMetrics("y")
    for index, (want, have) in enumerate(batches):
        (first if index % 2 else second).update(want, have, batch=index)
    first.merge(second)
    assert first.to_json() == whole.to_json()
    assert first.sum_abs == whole.sum_abs and first.noise == whole.noise


def test_a_comparison_passes_within_its_tolerance_and_names_its_worst_output() -> None:
    expected = [np.ones((4, 2), np.float32), np.full((4, 3), 10.0, np.float32)]
    close = [expected[0] + 1e-7, expected[1]]
    comparison = Comparison.of("torch", "onnx", ["a", "b"], rtol=1e-4)
    comparison.fold(expected, close, samples=4)
    assert comparison.passed and comparison.samples == 4
    far = Comparison.of("torch", "onnx", ["a", "b"], rtol=1e-4)
    far.fold(expected, [expected[0], expected[1] + 1.0], samples=4)
    assert not far.passed and far.worst().name == "b"
    assert far.to_json()["outputs"]["b"]["relative_error"] == pytest.approx(0.1)


def test_a_missing_output_or_another_shape_is_a_mismatch_not_a_comparison() -> None:
    comparison = Comparison.of("torch", "onnx", ["a", "b"])
    comparison.fold([np.zeros((2, 2)), np.zeros(3)], [np.zeros((2, 2))], samples=2)
    assert "b" in comparison.mismatches and not comparison.passed
    shaped = Comparison.of("torch", "onnx", ["a"])
    shaped.fold([np.zeros((2, 2))], [np.zeros((2, 3))], samples=2)
    assert shaped.mismatches == {"a": "shape (2, 2) vs (2, 3)"}


def test_batch_samples_reads_the_first_axis() -> None:
    assert batch_samples({"x": np.zeros((5, 3))}) == 5
    assert batch_samples({"x": np.float32(1.0)}) == 1

"""Window evaluation: thresholds, minimum samples and merging of counts."""

from __future__ import annotations

import pytest

from monitoring.quality import QualityThresholds, WindowCounts, evaluate_window

THRESHOLDS = QualityThresholds(min_agreement=0.9, max_error_rate=0.05, max_p99_latency_s=1.0, min_samples=10)


def healthy_counts(rows: int = 50) -> WindowCounts:
    return WindowCounts(requests=rows, moe_requests=rows, expert_rows=rows, shadow_rows=rows, shadow_agreed=rows,
                        latencies_s=[0.01] * rows)


def test_healthy_window_passes():
    verdict = evaluate_window(healthy_counts(), THRESHOLDS)

    assert verdict.result == "pass"
    assert verdict.metrics["agreement"].value == 1.0
    assert verdict.metrics["agreement"].ok is True
    assert verdict.metrics["error_rate"].value == 0.0
    assert verdict.metrics["p99_latency_s"].ok is True


def test_low_agreement_fails_with_values_in_reason():
    counts = healthy_counts()
    counts.shadow_agreed = 35

    verdict = evaluate_window(counts, THRESHOLDS)

    assert verdict.result == "fail"
    assert verdict.metrics["agreement"].value == pytest.approx(0.7)
    assert verdict.metrics["agreement"].ok is False
    assert "agreement 0.7 < 0.9" in verdict.reason


def test_expert_errors_fail_window():
    counts = healthy_counts()
    counts.expert_errors = 4
    counts.expert_timeouts = 2

    verdict = evaluate_window(counts, THRESHOLDS)

    assert verdict.result == "fail"
    assert verdict.metrics["error_rate"].value == pytest.approx(6 / 50)
    assert "error_rate" in verdict.reason


def test_slow_p99_fails_window():
    counts = healthy_counts(100)
    counts.latencies_s[-2:] = [3.0, 3.0]

    verdict = evaluate_window(counts, THRESHOLDS)

    assert verdict.result == "fail"
    assert verdict.metrics["p99_latency_s"].value > 1.0


def test_few_samples_is_inconclusive():
    verdict = evaluate_window(healthy_counts(5), THRESHOLDS)

    assert verdict.result == "inconclusive"
    assert verdict.metrics["agreement"].ok is None
    assert "too few samples" in verdict.reason
    assert "agreement has 5 samples < min_samples 10" in verdict.reason


def test_failure_wins_over_missing_samples():
    counts = healthy_counts(50)
    counts.shadow_rows = counts.shadow_agreed = 3
    counts.expert_errors = 25

    verdict = evaluate_window(counts, THRESHOLDS)

    assert verdict.result == "fail"
    assert verdict.metrics["agreement"].ok is None


def test_empty_window_is_inconclusive():
    verdict = evaluate_window(WindowCounts(), THRESHOLDS)

    assert verdict.result == "inconclusive"
    assert verdict.metrics["agreement"].value is None


def test_accuracy_reported_without_threshold():
    counts = healthy_counts()
    counts.feedback_rows, counts.feedback_correct = 40, 10

    verdict = evaluate_window(counts, THRESHOLDS)

    assert verdict.result == "pass"
    assert verdict.metrics["accuracy"].value == 0.25
    assert verdict.metrics["accuracy"].ok is None


def test_accuracy_checked_with_threshold():
    counts = healthy_counts()
    counts.feedback_rows, counts.feedback_correct = 40, 10
    thresholds = QualityThresholds(0.9, 0.05, 1.0, 10, min_accuracy=0.8)

    verdict = evaluate_window(counts, thresholds)

    assert verdict.result == "fail"
    assert "accuracy 0.25 < 0.8" in verdict.reason


def test_merge_adds_counts_and_fallbacks():
    first = WindowCounts(requests=2, fallbacks={"capacity": 1}, latencies_s=[0.1])
    second = WindowCounts(requests=3, fallbacks={"capacity": 2, "low_confidence": 1}, latencies_s=[0.2, 0.3])

    first.merge(second)

    assert first.requests == 5
    assert first.fallbacks == {"capacity": 3, "low_confidence": 1}
    assert first.latencies_s == [0.1, 0.2, 0.3]


def test_merge_caps_latency_samples():
    first = WindowCounts(latencies_s=[0.1] * 4000)

    first.merge(WindowCounts(latencies_s=[0.2] * 4000))

    assert len(first.latencies_s) == 4096
    assert 0.1 in first.latencies_s and 0.2 in first.latencies_s


def test_counts_round_trip_through_dict():
    counts = healthy_counts()
    counts.fallbacks = {"supervisor": 3}

    restored = WindowCounts.from_dict({**counts.to_dict(), "added_by_newer_writer": 1})

    assert restored == counts

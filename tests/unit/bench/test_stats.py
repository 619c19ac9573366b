"""The benchmark's arithmetic: percentiles, rates, ratios, CPU deltas."""

from __future__ import annotations

import math

import pytest

from bench import stats


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0], 50, 1.0),
        ([1.0, 2.0], 50, 1.5),
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        (list(map(float, range(1, 101))), 99, 99.01),
        (list(map(float, range(1, 101))), 50, 50.5),
    ],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert stats.percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(stats.percentile([], 50))


@pytest.mark.parametrize("q", [-1, 101])
def test_percentile_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        stats.percentile([1.0], q)


@pytest.mark.parametrize(
    ("value", "baseline", "expected"),
    [
        (300.0, 100.0, 3.0),
        (50.0, 200.0, 0.25),
        (1.0, 0.0, math.nan),
        (math.nan, 2.0, math.nan),
        (2.0, math.nan, math.nan),
    ],
)
def test_ratio(value: float, baseline: float, expected: float) -> None:
    got = stats.ratio(value, baseline)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_rate_and_per_thousand() -> None:
    assert stats.rate(300, 2.0) == 150.0
    assert math.isnan(stats.rate(3, 0.0))
    assert stats.per_thousand(4.5, 1500) == pytest.approx(3.0)
    assert math.isnan(stats.per_thousand(1.0, 0))


def test_latency_summary() -> None:
    lat = stats.Latency.of([0.010] * 99 + [1.0])
    assert lat.p50 == pytest.approx(0.010)
    assert lat.p99 == pytest.approx(0.0199, abs=1e-4)
    assert lat.count == 100


def test_cpu_delta_counts_new_processes_from_zero() -> None:
    assert stats.cpu_delta({1: 10.0, 2: 5.0}, {1: 12.5, 2: 5.5, 3: 1.0}) == pytest.approx(4.0)


def test_stalls() -> None:
    assert stats.stalls([0.0, 1.0, 2.0], [0.5, 7.0, 2.1], threshold=5.0) == 1

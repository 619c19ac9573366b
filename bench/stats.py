"""Pure arithmetic of the benchmark: percentiles, rates, ratios, resource deltas.

No I/O here, so the unit tests can pin every number the report prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between closest ranks
    (numpy's default, "linear"); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rate(count: int, seconds: float) -> float:
    """Events per second; NaN when no time passed."""
    return count / seconds if seconds > 0 else math.nan


def ratio(value: float, baseline: float) -> float:
    """value / baseline; NaN when either is missing (NaN) or the baseline is zero."""
    if math.isnan(value) or math.isnan(baseline) or baseline == 0:
        return math.nan
    return value / baseline


def per_thousand(cpu_seconds: float, messages: int) -> float:
    """CPU seconds per 1,000 messages."""
    return cpu_seconds * 1000 / messages if messages else math.nan


@dataclass(frozen=True, slots=True)
class Latency:
    p50: float
    p99: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency:
        return cls(percentile(values, 50), percentile(values, 99), len(values))


def stalls(starts: Sequence[float], ends: Sequence[float], threshold: float) -> int:
    """Sessions that waited longer than `threshold` seconds for one reply."""
    return sum(1 for s, e in zip(starts, ends, strict=True) if e - s > threshold)


def cpu_delta(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds used between two samples of {pid: cumulative CPU seconds}; a process that
    appeared in between counts from zero."""
    return sum(after[pid] - before.get(pid, 0.0) for pid in after)

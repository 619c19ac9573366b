"""backoff: when a deferred message comes back, and when it expires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.delivery.backoff import JITTER, expiry, is_expired, next_attempt, next_delay
from shared.envelope import Client, Envelope

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def envelope(**changes: object) -> Envelope:
    env = Envelope("Q1", T0, Client("192.0.2.1"), "s@example.org", ("r@example.test",), 10, "0" * 64)
    return env.replace(**changes)


@pytest.mark.parametrize(
    ("expires_at", "lifetime", "expected"),
    [
        (None, 86400.0, T0 + timedelta(days=1)),
        (None, 60.0, T0 + timedelta(seconds=60)),
        # The envelope's own expiry wins: the configuration may have changed since it arrived.
        (T0 + timedelta(hours=2), 86400.0, T0 + timedelta(hours=2)),
    ],
)
def test_expiry(expires_at: datetime | None, lifetime: float, expected: datetime) -> None:
    assert expiry(envelope(expires_at=expires_at), lifetime) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (T0 - timedelta(seconds=1), False),
        (T0, True),
        (T0 + timedelta(seconds=1), True),
    ],
)
def test_is_expired(now: datetime, expected: bool) -> None:
    assert is_expired(now, T0) is expected


@pytest.mark.parametrize(
    ("interval", "spread", "expected"),
    [
        (1800.0, 0.0, 1800.0 * (1 - JITTER / 2)),
        (1800.0, 0.5, 1800.0),
        (1800.0, 1.0, 1800.0 * (1 + JITTER / 2)),
        (60.0, 0.25, 60.0 * (1 - JITTER / 4)),
    ],
)
def test_next_delay(interval: float, spread: float, expected: float) -> None:
    assert next_delay(interval, spread) == pytest.approx(expected)


@pytest.mark.parametrize("spread", [-0.1, 1.1])
def test_next_delay_rejects_bad_spread(spread: float) -> None:
    with pytest.raises(ValueError, match="spread"):
        next_delay(60.0, spread)


@pytest.mark.parametrize(
    ("now", "expires_at", "spread", "expected"),
    [
        (T0, T0 + timedelta(days=1), 0.5, T0 + timedelta(minutes=30)),
        (T0, T0 + timedelta(days=1), 0.0, T0 + timedelta(minutes=27)),
        # Never past the expiry: the last attempt is made right at the deadline.
        (T0, T0 + timedelta(minutes=10), 0.5, T0 + timedelta(minutes=10)),
        (T0, T0 + timedelta(seconds=1), 1.0, T0 + timedelta(seconds=1)),
    ],
)
def test_next_attempt(now: datetime, expires_at: datetime, spread: float, expected: datetime) -> None:
    assert next_attempt(now, expires_at, 1800.0, spread) == expected


def test_jitter_spreads_a_burst() -> None:
    delays = {round(next_delay(1800.0, i / 10), 3) for i in range(10)}
    assert len(delays) == 10
    assert min(delays) >= 1800.0 * (1 - JITTER / 2)
    assert max(delays) <= 1800.0 * (1 + JITTER / 2)

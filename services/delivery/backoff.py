"""Retry timing: when a deferred message is tried again, and when it gives up.

Pure functions of the envelope's retry state (`attempts`, `expires_at`) and
the configured schedule. The deferred queue does the waiting; this module only
computes `not_before`. Long waits belong in the queue, never in a sleeping
worker (STYLE section 4).

The schedule is Mailman's and dramatiq's shape, as the issue asks: a fixed
`retry_interval` with jitter, until `max_queue_lifetime` after arrival. The
jitter spreads the retries of a burst deferred at the same moment (one
destination down) so they do not all come back in the same second.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from shared.envelope import Envelope

# Each delay is retry_interval * (1 ± JITTER/2): ±10 %.
JITTER = 0.2


def expiry(envelope: Envelope, max_queue_lifetime: float) -> datetime:
    """When the message stops being retried: its own `expires_at`, else arrival + lifetime."""
    if envelope.expires_at is not None:
        return envelope.expires_at
    return envelope.received_at + timedelta(seconds=max_queue_lifetime)


def is_expired(now: datetime, expires_at: datetime) -> bool:
    """A failure at or after `expires_at` is final (RFC 5321 section 4.5.4.1: give up, tell the sender)."""
    return now >= expires_at


def next_delay(retry_interval: float, spread: float) -> float:
    """Seconds until the next attempt. `spread` is a uniform random number in [0, 1)."""
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread must be within [0, 1], got {spread}")
    return retry_interval * (1.0 - JITTER / 2 + JITTER * spread)


def next_attempt(now: datetime, expires_at: datetime, retry_interval: float, spread: float) -> datetime:
    """`not_before` of the next attempt: one jittered interval from now, but never past the
    expiry, so the last attempt happens right at the deadline rather than a full interval late."""
    return min(now + timedelta(seconds=next_delay(retry_interval, spread)), expires_at)

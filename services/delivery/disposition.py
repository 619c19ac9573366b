"""Disposition: what becomes of a message after one delivery attempt.

Pure: the envelope, the per-recipient results and the clock in, the job's
outputs out (shared/transport.py: at most one output keeps the job's queue
id). Delivered recipients are done. Temporary failures go to the deferred
queue as the job's continuation, with the retry state in the envelope
(`attempts`, `not_before`, `last_error`), until the message's lifetime is
over; then they fail for good with status 4.4.7 ("delivery time expired",
RFC 3463). Permanent failures go to the bounce queue under a derived queue id
(`<id>.b<attempts>`, so a retried step overwrites rather than duplicates),
unless the message must not be bounced at all (`bounce.suppression_reason`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from services.delivery.backoff import is_expired, next_attempt
from services.delivery.bounce import suppression_reason
from services.delivery.classify import EXPIRED, Outcome, RcptResult, Reply
from shared.envelope import Envelope, RecipientFailure
from shared.transport import Output, Queue


@dataclass(frozen=True, slots=True)
class Plan:
    results: tuple[RcptResult, ...]  # final per-recipient results (expiry applied): what gets logged
    outputs: tuple[Output, ...]
    suppressed: str | None = None  # why permanent failures were dropped instead of bounced


def settle(results: Sequence[RcptResult], expired: bool) -> tuple[RcptResult, ...]:
    """Past the lifetime, a temporary failure is final: 4.4.7, keeping the last error's words."""
    if not expired:
        return tuple(results)
    settled = []
    for r in results:
        if r.outcome is Outcome.TEMPORARY:
            reply = Reply(0, EXPIRED, f"delivery time expired; last error: {r.reply}")
            r = RcptResult(r.rcpt, Outcome.PERMANENT, reply, r.relay, r.remote_mta)
        settled.append(r)
    return tuple(settled)


def failure_of(result: RcptResult) -> RecipientFailure:
    return RecipientFailure(
        rcpt=result.rcpt,
        code=result.reply.code,
        status=result.reply.status,
        message=result.reply.text,
        remote=result.remote_mta,
    )


def plan(
    envelope: Envelope,
    body: bytes,
    results: Sequence[RcptResult],
    *,
    now: datetime,
    expires_at: datetime,
    retry_interval: float,
    spread: float,
) -> Plan:
    """The outputs of a deliver job. `spread` is a uniform random number in [0, 1) for the jitter."""
    final = settle(results, is_expired(now, expires_at))
    temporary = [r for r in final if r.outcome is Outcome.TEMPORARY]
    permanent = [r for r in final if r.outcome is Outcome.PERMANENT]
    outputs: list[Output] = []
    if temporary:
        first = temporary[0]
        continuation = envelope.replace(
            rcpt_to=tuple(r.rcpt for r in temporary),
            attempts=envelope.attempts + 1,
            not_before=next_attempt(now, expires_at, retry_interval, spread),
            expires_at=expires_at,
            last_error=f"{first.reply} (relay={first.relay})",
        )
        outputs.append(Output(Queue.DEFERRED, continuation, body))
    suppressed = None
    if permanent:
        suppressed = suppression_reason(envelope)
        if suppressed is None:
            bounce = envelope.replace(
                queue_id=f"{envelope.queue_id}.b{envelope.attempts}",
                parent_id=envelope.queue_id,
                rcpt_to=tuple(r.rcpt for r in permanent),
                failures=tuple(failure_of(r) for r in permanent),
                not_before=None,
            )
            outputs.append(Output(Queue.BOUNCE, bounce, body))
    return Plan(final, tuple(outputs), suppressed)

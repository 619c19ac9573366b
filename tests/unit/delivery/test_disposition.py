"""disposition: per-recipient results -> the deliver job's outputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.delivery.classify import Outcome, RcptResult, Reply
from services.delivery.disposition import Plan, plan, settle
from shared.envelope import Action, Client, Envelope, RecipientFailure, Verdict
from shared.transport import Queue

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
EXPIRES = T0 + timedelta(days=1)
BODY = b"Subject: x\r\n\r\nbody\r\n"
RCPTS = ("a@example.test", "b@example.test", "c@example.test")


def envelope(**changes: object) -> Envelope:
    env = Envelope("Q1", T0, Client("192.0.2.1"), "s@example.org", RCPTS, len(BODY), "0" * 64, attempts=2)
    return env.replace(**changes)


def sent(rcpt: str) -> RcptResult:
    return RcptResult(rcpt, Outcome.DELIVERED, Reply(250, "2.0.0", "ok"), "mx[192.0.2.9]:25", "mx")


def deferred(rcpt: str) -> RcptResult:
    return RcptResult(rcpt, Outcome.TEMPORARY, Reply(451, "4.3.0", "try later"), "mx[192.0.2.9]:25", "mx")


def bounced(rcpt: str) -> RcptResult:
    return RcptResult(rcpt, Outcome.PERMANENT, Reply(550, "5.1.1", "unknown"), "mx[192.0.2.9]:25", "mx")


def run(env: Envelope, results: list[RcptResult], now: datetime = T0 + timedelta(hours=1)) -> Plan:
    return plan(env, BODY, results, now=now, expires_at=EXPIRES, retry_interval=1800.0, spread=0.5)


def test_all_delivered() -> None:
    out = run(envelope(), [sent(r) for r in RCPTS])
    assert out.outputs == ()
    assert out.suppressed is None
    assert [r.outcome for r in out.results] == [Outcome.DELIVERED] * 3


def test_temporary_failures_continue_on_the_deferred_queue() -> None:
    now = T0 + timedelta(hours=1)
    out = run(envelope(), [sent(RCPTS[0]), deferred(RCPTS[1]), deferred(RCPTS[2])], now)
    (continuation,) = out.outputs
    assert continuation.queue is Queue.DEFERRED
    assert continuation.body is BODY
    env = continuation.envelope
    assert env.queue_id == "Q1"  # the job's continuation
    assert env.rcpt_to == RCPTS[1:]
    assert env.attempts == 3
    assert env.not_before == now + timedelta(minutes=30)
    assert env.expires_at == EXPIRES
    assert env.last_error == "451 4.3.0 try later (relay=mx[192.0.2.9]:25)"


def test_permanent_failures_go_to_the_bounce_queue() -> None:
    out = run(envelope(not_before=T0), [sent(RCPTS[0]), bounced(RCPTS[1]), deferred(RCPTS[2])])
    deferral, bounce = out.outputs
    assert deferral.queue is Queue.DEFERRED
    assert deferral.envelope.rcpt_to == (RCPTS[2],)
    assert bounce.queue is Queue.BOUNCE
    assert bounce.body is BODY
    env = bounce.envelope
    assert env.queue_id == "Q1.b2"  # derived from the attempt: a retried step overwrites it
    assert env.parent_id == "Q1"
    assert env.mail_from == "s@example.org"
    assert env.rcpt_to == (RCPTS[1],)
    assert env.failures == (RecipientFailure(RCPTS[1], 550, "5.1.1", "unknown", "mx"),)
    assert env.not_before is None
    # At most one output keeps the job's queue id (shared/transport.py).
    assert sum(o.envelope.queue_id == "Q1" for o in out.outputs) == 1


def test_expired_temporary_failures_bounce_with_4_4_7() -> None:
    out = run(envelope(), [sent(RCPTS[0]), deferred(RCPTS[1]), bounced(RCPTS[2])], now=EXPIRES)
    (bounce,) = out.outputs
    assert bounce.queue is Queue.BOUNCE
    late, gone = bounce.envelope.failures
    assert late == RecipientFailure(
        RCPTS[1], 0, "4.4.7", "delivery time expired; last error: 451 4.3.0 try later", "mx"
    )
    assert gone.status == "5.1.1"
    assert [r.outcome for r in out.results] == [Outcome.DELIVERED, Outcome.PERMANENT, Outcome.PERMANENT]


def test_retry_never_scheduled_past_expiry() -> None:
    now = EXPIRES - timedelta(minutes=5)
    (continuation,) = run(envelope(), [deferred(r) for r in RCPTS], now=now).outputs
    assert continuation.envelope.not_before == EXPIRES


@pytest.mark.parametrize(
    "changes",
    [
        {"mail_from": ""},
        {"verdicts": (Verdict("virus", "virus", Action.STRIP, "Eicar-Test-Signature", "x.com"),)},
    ],
)
def test_no_bounce_for_null_sender_or_virus(changes: dict[str, object]) -> None:
    out = run(envelope(**changes), [bounced(RCPTS[0]), deferred(RCPTS[1]), sent(RCPTS[2])])
    assert [o.queue for o in out.outputs] == [Queue.DEFERRED]
    assert out.suppressed


def test_settle_leaves_unexpired_results_alone() -> None:
    results = [sent(RCPTS[0]), deferred(RCPTS[1])]
    assert settle(results, expired=False) == tuple(results)

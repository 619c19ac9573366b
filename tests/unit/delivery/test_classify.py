"""classify: SMTP reply -> outcome, enhanced status parsing, adapter errors -> results."""

from __future__ import annotations

import pytest

from services.delivery.classify import (
    Outcome,
    Reply,
    Stage,
    classify,
    failure_reply,
    parse_reply,
    retry_in_next_transaction,
)
from shared.errors import PermanentFailure, TemporaryFailure

D, T, P = Outcome.DELIVERED, Outcome.TEMPORARY, Outcome.PERMANENT


@pytest.mark.parametrize(
    ("code", "stage", "expected"),
    [
        (250, Stage.DATA, D),
        (251, Stage.RCPT, D),
        (220, Stage.CONNECT, D),
        (421, Stage.CONNECT, T),
        (450, Stage.RCPT, T),
        (451, Stage.DATA, T),
        (452, Stage.RCPT, T),
        (452, Stage.MAIL, T),
        (550, Stage.RCPT, P),
        (551, Stage.RCPT, P),
        (553, Stage.MAIL, P),
        (554, Stage.DATA, P),
        (554, Stage.CONNECT, P),
        # RFC 5321 section 4.5.3.1.10: 552 to RCPT means "too many recipients", temporary.
        (552, Stage.RCPT, T),
        # ... but 552 to DATA is "exceeded storage allocation": permanent.
        (552, Stage.DATA, P),
        (552, Stage.MAIL, P),
        # Protocol violations are not grounds to bounce: try again later.
        (354, Stage.RCPT, T),
        (100, Stage.DATA, T),
        (0, Stage.CONNECT, T),
        (600, Stage.DATA, T),
    ],
)
def test_classify(code: int, stage: Stage, expected: Outcome) -> None:
    assert classify(code, stage) is expected


@pytest.mark.parametrize(
    ("code", "message", "status", "text"),
    [
        (550, "5.1.1 <x@example.test>: user unknown", "5.1.1", "<x@example.test>: user unknown"),
        (250, "2.0.0 Ok: queued as ABC", "2.0.0", "Ok: queued as ABC"),
        (451, "Try again later", "4.0.0", "Try again later"),
        (550, "", "5.0.0", ""),
        # Multi-line replies become one line; the status repeated on every line is dropped.
        (
            550,
            "5.7.1 Message rejected\n5.7.1 See https://example.test/why",
            "5.7.1",
            "Message rejected See https://example.test/why",
        ),
        # The reply code wins over a contradicting status class (RFC 3463 section 2).
        (550, "4.2.2 mailbox full", "5.2.2", "mailbox full"),
        (452, "5.5.3 too many recipients", "4.5.3", "too many recipients"),
        # Something that only looks like a status is text.
        (550, "5.1.1a no", "5.0.0", "5.1.1a no"),
        (554, "6.1.1 not a class", "5.0.0", "6.1.1 not a class"),
        (550, "5.1.10 null MX", "5.1.10", "null MX"),
        (550, "  5.1.1   spaced  ", "5.1.1", "spaced"),
        (999, "garbage", "4.0.0", "garbage"),
    ],
)
def test_parse_reply(code: int, message: str, status: str, text: str) -> None:
    assert parse_reply(code, message) == Reply(code, status, text)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(550, "5.1.1", "user unknown"), "550 5.1.1 user unknown"),
        (Reply(0, "4.4.1", "connect to x: Connection refused"), "4.4.1 connect to x: Connection refused"),
    ],
)
def test_reply_str(reply: Reply, expected: str) -> None:
    assert str(reply) == expected


@pytest.mark.parametrize(
    ("code", "stage", "expected"),
    [
        (452, Stage.RCPT, True),
        (552, Stage.RCPT, True),
        (451, Stage.RCPT, False),
        (550, Stage.RCPT, False),
        (452, Stage.MAIL, False),
        (552, Stage.DATA, False),
    ],
)
def test_retry_in_next_transaction(code: int, stage: Stage, expected: bool) -> None:
    assert retry_in_next_transaction(code, stage) is expected


@pytest.mark.parametrize(
    ("error", "outcome", "reply"),
    [
        (TemporaryFailure("4.4.1 connect to h: refused"), T, Reply(0, "4.4.1", "connect to h: refused")),
        (PermanentFailure("5.1.10 null MX"), P, Reply(0, "5.1.10", "null MX")),
        (PermanentFailure("no status here"), P, Reply(0, "5.0.0", "no status here")),
        (TemporaryFailure("no status here"), T, Reply(0, "4.0.0", "no status here")),
        (TemporaryFailure("4.3.2 busy", code=421), T, Reply(421, "4.3.2", "busy")),
        (PermanentFailure("5.7.1 go away", code=554), P, Reply(554, "5.7.1", "go away")),
    ],
)
def test_failure_reply(error: TemporaryFailure | PermanentFailure, outcome: Outcome, reply: Reply) -> None:
    assert failure_reply(error) == (outcome, reply)

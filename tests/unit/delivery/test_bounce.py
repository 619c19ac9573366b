"""bounce: the RFC 3464 DSN, parsed back with `email` and checked field by field."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.delivery.bounce import (
    MAX_HEADER_BYTES,
    build_dsn,
    dsn_envelope,
    original_headers,
    suppression_reason,
)
from shared.envelope import Action, Client, Direction, Envelope, RecipientFailure, Verdict

ARRIVED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = ARRIVED + timedelta(hours=1)
ORIGINAL = (
    b"Received: from client.example.org by mx.example.test\r\n"
    b"From: Sender <sender@example.org>\r\n"
    b"To: user@example.test, gone@example.test\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"SECRET BODY that must not come back\r\n"
)
FAILURES = (
    RecipientFailure("gone@example.test", 550, "5.1.1", "<gone@example.test>: user unknown", "mx1.example.test"),
    RecipientFailure("late@example.test", 0, "4.4.7", "delivery time expired; last error: 4.4.1 refused", ""),
)


def bounce_job(**changes: object) -> Envelope:
    env = Envelope(
        queue_id="01ABC.b2",
        received_at=ARRIVED,
        client=Client("192.0.2.1"),
        mail_from="sender@example.org",
        rcpt_to=tuple(f.rcpt for f in FAILURES),
        size=len(ORIGINAL),
        failures=FAILURES,
        parent_id="01ABC",
    )
    return env.replace(**changes)


def parse(data: bytes) -> Any:
    """The DSN as the `email` package reads it (Any: its payload types depend on the content)."""
    return email.message_from_bytes(data, policy=email.policy.compat32)


def test_dsn_structure() -> None:
    dsn = build_dsn(bounce_job(), ORIGINAL, reporting_mta="gw.example.test", now=NOW)
    assert not dsn.smtputf8
    assert not dsn.eight_bit
    assert dsn.data.isascii()
    assert b"SECRET BODY" not in dsn.data  # only the headers go back
    assert all(len(line) <= 998 for line in dsn.data.split(b"\r\n"))
    assert b"\n" not in dsn.data.replace(b"\r\n", b"")  # CRLF only

    msg = parse(dsn.data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@gw.example.test>"
    assert msg["To"] == "<sender@example.org>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Message-ID"] == "<01ABC.b2@gw.example.test>"
    assert msg["In-Reply-To"] == "<orig-1@example.org>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"] == "Wed, 01 May 2024 13:00:00 +0000"

    human, report, headers = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_payload(decode=True).decode("ascii")
    assert "<gone@example.test>: host mx1.example.test said: 550 5.1.1 <gone@example.test>: user unknown" in text
    assert "<late@example.test>: 4.4.7 delivery time expired" in text
    assert "01ABC" in text

    assert report.get_content_type() == "message/delivery-status"
    per_message, *per_rcpt = report.get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw.example.test"
    assert per_message["Arrival-Date"] == "Wed, 01 May 2024 12:00:00 +0000"
    assert per_message["X-Smtpgw-Queue-ID"] == "01ABC"
    assert len(per_rcpt) == 2
    gone, late = per_rcpt
    assert gone["Final-Recipient"] == "rfc822; gone@example.test"
    assert gone["Action"] == "failed"
    assert gone["Status"] == "5.1.1"
    assert gone["Remote-MTA"] == "dns; mx1.example.test"
    assert gone["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@example.test>: user unknown"
    assert gone["Last-Attempt-Date"] == "Wed, 01 May 2024 13:00:00 +0000"
    assert late["Final-Recipient"] == "rfc822; late@example.test"
    assert late["Status"] == "4.4.7"
    assert late["Remote-MTA"] is None
    assert late["Diagnostic-Code"] == "X-smtpgw; delivery time expired; last error: 4.4.1 refused"

    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload(decode=True)
    assert returned == original_headers(ORIGINAL)
    assert b"Subject: quarterly report\r\n" in returned


def test_dsn_is_deterministic_for_a_retried_step() -> None:
    first = build_dsn(bounce_job(), ORIGINAL, reporting_mta="gw.example.test", now=NOW)
    again = build_dsn(bounce_job(), ORIGINAL, reporting_mta="gw.example.test", now=NOW)
    assert first == again


def test_long_diagnostics_are_folded_and_sanitised() -> None:
    text = "word " * 300 + "\r\nInjected: header\x00"
    failure = RecipientFailure("x@example.test", 550, "5.7.1", text, "mx.example.test")
    dsn = build_dsn(bounce_job(failures=(failure,)), ORIGINAL, reporting_mta="gw.example.test", now=NOW)
    assert all(len(line) <= 998 for line in dsn.data.split(b"\r\n"))
    report = parse(dsn.data).get_payload()[1]
    rcpt = report.get_payload()[1]
    diagnostic = " ".join(rcpt["Diagnostic-Code"].split())
    assert diagnostic.startswith("smtp; 550 5.7.1 word word")
    assert "Injected" not in rcpt
    assert b"\x00" not in dsn.data


def test_non_ascii_addresses_use_the_global_types() -> None:
    failure = RecipientFailure("jürgen@example.test", 550, "5.1.1", "unknown", "mx.example.test")
    env = bounce_job(mail_from="absender@bücher.test", failures=(failure,), rcpt_to=(failure.rcpt,))
    original = "From: Jürgen <absender@bücher.test>\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()
    dsn = build_dsn(env, original, reporting_mta="gw.example.test", now=NOW)
    assert dsn.smtputf8
    assert dsn.eight_bit
    msg: Any = email.message_from_bytes(dsn.data, policy=email.policy.SMTPUTF8)
    assert msg.get_param("report-type") == "global-delivery-status"
    _, report, headers = msg.get_payload()
    assert report.get_content_type() == "message/global-delivery-status"
    assert headers.get_content_type() == "message/global-headers"
    assert "Final-Recipient: utf-8; jürgen@example.test".encode() in dsn.data
    assert "Subject: Grüße".encode() in dsn.data


def test_eight_bit_headers_alone_need_no_smtputf8() -> None:
    original = "From: s@example.org\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()
    dsn = build_dsn(bounce_job(), original, reporting_mta="gw.example.test", now=NOW)
    assert not dsn.smtputf8
    assert dsn.eight_bit
    assert parse(dsn.data).get_param("report-type") == "delivery-status"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\nB: 2\n\nbody\n", b"A: 1\r\nB: 2\r\n"),  # bare LF becomes CRLF
        (b"A: 1\r\n folded\r\n\r\nbody", b"A: 1\r\n folded\r\n"),
        (b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n"),  # no body at all
        (b"\r\nonly a body\r\n", b""),
        (b"", b""),
    ],
)
def test_original_headers(body: bytes, expected: bytes) -> None:
    assert original_headers(body) == expected


def test_original_headers_are_capped_at_a_whole_header() -> None:
    body = b"".join(b"X-Filler-%04d: %s\r\n" % (i, b"x" * 60) for i in range(2000))
    body += b"X-Folded: start\r\n" + b" continuation\r\n" * 50 + b"\r\nbody"
    head = original_headers(body)
    assert len(head) <= MAX_HEADER_BYTES
    assert head.endswith(b"\r\n")
    assert not head.startswith(b" ")
    small = original_headers(b"A: 1\r\nB: 2\r\n continued\r\n more\r\n\r\n", limit=20)
    assert small == b"A: 1\r\n"  # B would be cut inside its continuation lines: dropped whole


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"mail_from": ""}, "null sender"),
        ({"verdicts": (Verdict("virus", "virus", Action.STRIP, "Eicar-Test-Signature", "a.com"),)}, "infected"),
        ({"verdicts": (Verdict("attachments", "attachment", Action.STRIP, "blocked .exe", "a.exe"),)}, None),
        ({"verdicts": (Verdict("virus", "clean", Action.DELIVER, ""),)}, None),
    ],
)
def test_suppression_reason(changes: dict[str, object], reason: str | None) -> None:
    found = suppression_reason(bounce_job(**changes))
    if reason is None:
        assert found is None
    else:
        assert found is not None
        assert reason in found


@pytest.mark.parametrize(
    ("direction", "expected"),
    [(Direction.INCOMING, Direction.OUTGOING), (Direction.OUTGOING, Direction.INCOMING)],
)
def test_dsn_envelope(direction: Direction, expected: Direction) -> None:
    env = bounce_job(direction=direction, attempts=3)
    dsn = build_dsn(env, ORIGINAL, reporting_mta="gw.example.test", now=NOW)
    out = dsn_envelope(env, dsn, reporting_mta="gw.example.test", now=NOW, lifetime=3600.0)
    assert out.queue_id == "01ABC.b2"  # the bounce job's continuation
    assert out.parent_id == "01ABC"
    assert out.mail_from == ""
    assert out.rcpt_to == ("sender@example.org",)
    assert out.direction is expected
    assert out.size == len(dsn.data)
    assert out.received_at == NOW
    assert out.expires_at == NOW + timedelta(hours=1)
    assert out.attempts == 0
    assert out.failures == ()
    assert out.verdicts == ()

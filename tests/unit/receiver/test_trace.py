"""services.receiver.trace: the Received header (RFC 5321 §4.4)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.receiver.trace import address_literal, protocol, received_header

WHEN = datetime(2024, 3, 1, 12, 30, 5, tzinfo=UTC)


def header(**changes: object) -> bytes:
    args: dict[str, object] = {
        "helo": "mail.sender.example",
        "ip": "192.0.2.7",
        "hostname": "mx.example.test",
        "queue_id": "01HQ5K3V8M0000000000000000",
        "with_protocol": "ESMTP",
        "recipients": ["user@example.test"],
        "received_at": WHEN,
    }
    args.update(changes)
    return received_header(**args)  # type: ignore[arg-type]


def test_layout() -> None:
    assert header() == (
        b"Received: from mail.sender.example ([192.0.2.7])\r\n"
        b"\tby mx.example.test with ESMTP id 01HQ5K3V8M0000000000000000\r\n"
        b"\tfor <user@example.test>; Fri, 01 Mar 2024 12:30:05 +0000\r\n"
    )


def test_several_recipients_are_not_named() -> None:
    text = header(recipients=["a@example.test", "b@example.test"])
    assert b"a@example.test" not in text
    assert b"b@example.test" not in text
    assert text.endswith(b" id 01HQ5K3V8M0000000000000000;\r\n\tFri, 01 Mar 2024 12:30:05 +0000\r\n")


@pytest.mark.parametrize(
    ("helo", "shown"),
    [
        ("", b"unknown"),
        ("evil\r\nX-Injected: yes", b"evil??X-Injected:?yes"),
        ("a (comment) b", b"a??comment??b"),
        ("h\u00e9lo", b"h?lo"),
        ("x" * 300, b"x" * 255),
        ("[192.0.2.7]", b"[192.0.2.7]"),
    ],
)
def test_helo_cannot_inject(helo: str, shown: bytes) -> None:
    text = header(helo=helo)
    assert text.startswith(b"Received: from " + shown + b" ([192.0.2.7])\r\n")
    assert (text.count(b"\r\n"), text.count(b"\r"), text.count(b"\n")) == (3, 3, 3)


def test_odd_recipient_is_left_out() -> None:
    assert b"for <" not in header(recipients=["jörg@example.test"])
    assert b"for <" not in header(recipients=["a>b@example.test"])


def test_never_names_the_software() -> None:
    text = header().lower()
    for word in (b"python", b"aiosmtpd", b"smtpgw", b"version"):
        assert word not in text


@pytest.mark.parametrize(
    ("ip", "literal"),
    [("192.0.2.1", "[192.0.2.1]"), ("2001:db8::1", "[IPv6:2001:db8::1]"), ("weird ip", "[weird?ip]")],
)
def test_address_literal(ip: str, literal: str) -> None:
    assert address_literal(ip) == literal


@pytest.mark.parametrize(
    ("esmtp", "tls", "auth", "utf8", "name"),
    [
        (False, False, False, False, "SMTP"),
        (True, False, False, False, "ESMTP"),
        (True, True, False, False, "ESMTPS"),
        (True, False, True, False, "ESMTPA"),
        (True, True, True, False, "ESMTPSA"),
        (True, False, False, True, "UTF8SMTP"),
        (True, True, True, True, "UTF8SMTPSA"),
    ],
)
def test_protocol(esmtp: bool, tls: bool, auth: bool, utf8: bool, name: str) -> None:
    assert protocol(esmtp=esmtp, tls=tls, authenticated=auth, smtputf8=utf8) == name


def test_parts_remembered_between_messages_stay_per_client_and_per_second() -> None:
    """The from line, hostname and date are formatted once and reused: never another client's or second's."""
    first = header(helo="a.example", ip="192.0.2.1", hostname="mx (one)", received_at=WHEN.replace(microsecond=1))
    again = header(helo="a.example", ip="192.0.2.1", hostname="mx (one)", received_at=WHEN.replace(microsecond=999999))
    assert first == again  # the date has no fraction of a second
    assert first.startswith(b"Received: from a.example ([192.0.2.1])\r\n\tby mx??one? with ")
    other = header(helo="a.example", ip="2001:db8::1", received_at=WHEN.replace(second=6))
    assert other.startswith(b"Received: from a.example ([IPv6:2001:db8::1])\r\n\tby mx.example.test with ")
    assert other.endswith(b"Fri, 01 Mar 2024 12:30:06 +0000\r\n")
    assert header(helo="b.example", ip="192.0.2.1").startswith(b"Received: from b.example ([192.0.2.1])\r\n")

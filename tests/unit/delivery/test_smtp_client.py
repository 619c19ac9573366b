"""smtp_client: its pure helpers (the network side is in tests/integration/test_delivery*.py)."""

from __future__ import annotations

import ssl

import pytest

from services.delivery.smtp_client import Transaction, needs_smtputf8, opportunistic_tls_context, wire_data


@pytest.mark.parametrize(
    ("tx", "expected"),
    [
        (Transaction("s@example.org", ("r@example.test",), b"Subject: hi\r\n\r\nbody"), False),
        # A UTF-8 body alone does not need SMTPUTF8 (8BITMIME covers it).
        (Transaction("s@example.org", ("r@example.test",), "Subject: hi\r\n\r\nGrüße".encode()), False),
        (Transaction("s@example.org", ("r@example.test",), "Subject: Grüße\r\n\r\nbody".encode()), True),
        (Transaction("s@example.org", ("r@example.test",), "Subject: x\nTo: Jürgen <j@x>\n\nbody".encode()), True),
        (Transaction("s@bücher.test", ("r@example.test",), b"Subject: hi\r\n\r\n"), True),
        (Transaction("s@example.org", ("a@example.test", "jürgen@example.test"), b"\r\n"), True),
        # Flagged SMTPUTF8 by the client, but nothing in it needs it.
        (Transaction("s@example.org", ("r@example.test",), b"Subject: hi\r\n\r\n", smtputf8=True), False),
    ],
)
def test_needs_smtputf8(tx: Transaction, expected: bool) -> None:
    assert needs_smtputf8(tx) is expected


def test_opportunistic_tls_does_not_verify() -> None:
    # RFC 7435: for MX delivery an unverifiable certificate is better than plaintext.
    context = opportunistic_tls_context()
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname


# The DATA fast path: what `wire_data` makes of a body must be exactly what aiosmtplib's own
# DATA path (`SMTPProtocol.execute_data_command`) would send, which is pinned here against the
# installed aiosmtplib's own functions. If aiosmtplib changes them, this test says so.
def aiosmtplib_wire(body: bytes) -> bytes:
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


CRLF_BODIES = [
    pytest.param(b"Subject: hi\r\n\r\nbody\r\n", id="plain"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\r\n", id="one empty line"),
    pytest.param(b"Subject: hi\r\n\r\nno final line end", id="no final CRLF"),
    pytest.param(b".first line starts with a dot\r\nnext\r\n", id="first line dot"),
    pytest.param(b".", id="just a dot"),
    pytest.param(b".\r\n", id="a lone dot line first"),
    pytest.param(b"a\r\n.\r\nb\r\n", id="a lone dot line inside"),
    pytest.param(b"a\r\n..\r\n...x\r\n.\r\n", id="dots and more dots"),
    pytest.param(b"a\r\n.", id="ends in a dot without CRLF"),
    pytest.param(b"x. y .\r\n .not at the start\r\n", id="dots not at line start"),
    pytest.param(bytes(b for b in range(256) if b not in (10, 13)) + b"\r\n.\x00\xff\r\n", id="8-bit binary"),
    pytest.param("Grüße\r\n.ünïcödé\r\n".encode(), id="utf-8"),
]


@pytest.mark.parametrize("body", CRLF_BODIES)
def test_wire_data_is_what_aiosmtplib_would_send(body: bytes) -> None:
    pieces = wire_data(body)
    assert pieces is not None
    assert b"".join(pieces) == aiosmtplib_wire(body)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"bare LF\nline\r\n", id="bare LF"),
        pytest.param(b"bare CR\rline\r\n", id="bare CR"),
        pytest.param(b"ends in CR\r", id="final CR"),
        pytest.param(b"ends in LF\n", id="final LF"),
        pytest.param(b"\n.dot after LF\r\n", id="LF then dot"),
        pytest.param(b"LF CR\n\r", id="LF CR"),
        pytest.param(b"CR CR LF\r\r\n", id="CR CR LF"),
    ],
)
def test_wire_data_leaves_bare_line_ends_to_aiosmtplib(body: bytes) -> None:
    assert wire_data(body) is None


def test_wire_data_does_not_search_a_body_checked_where_it_was_made() -> None:
    """`crlf_clean` is the producer's word (Envelope.crlf_clean): the body is not searched again,
    only dot-stuffed."""
    body = b"Subject: hi\r\n\r\n.body\r\n"
    assert wire_data(body, crlf_clean=True) == wire_data(body) == [body.replace(b"\r\n.", b"\r\n.."), b".\r\n"]
    assert wire_data(b"bare LF\nline\r\n", crlf_clean=True) is not None  # trusted, as documented
    assert wire_data(b"bare LF\nline\r\n") is None


def test_wire_data_copies_nothing_when_no_line_needs_stuffing() -> None:
    body = b"Subject: hi\r\n\r\nbody\r\n" * 1000
    pieces = wire_data(body)
    assert pieces is not None
    assert pieces[0] is body  # written as it is: no copy of a large message

"""smtp_client: its pure helpers (the network side is in tests/integration/test_delivery*.py)."""

from __future__ import annotations

import ssl

import pytest

from services.delivery.smtp_client import Transaction, needs_smtputf8, opportunistic_tls_context


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

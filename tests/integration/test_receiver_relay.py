"""Relay control over the wire: from the Internet, only internal mailboxes; every trick refused."""

from __future__ import annotations

import dataclasses
import ipaddress
import smtplib
from pathlib import Path

import pytest

from shared.config import HostPort
from shared.spool import SpoolTransport
from tests.integration.test_receiver_support import RawClient, make_config, running, stored

pytestmark = pytest.mark.integration

# RCPT TO arguments exactly as a client writes them, and the reply that must come back.
TRICKS = [
    (b"<user@elsewhere.example>", b"550 5.7.1 "),
    (b"<user%elsewhere.example@example.test>", b"550 5.7.1 "),
    (b"<elsewhere.example!user@example.test>", b"550 5.7.1 "),
    (b'<"user@elsewhere.example"@example.test>', b"550 5.7.1 "),
    (b'<"user%elsewhere.example"@example.test>', b"550 5.7.1 "),
    (b'<"elsewhere!user"@example.test>', b"550 5.7.1 "),
    (b"<@example.test:user@elsewhere.example>", b"550 5.7.1 "),
    (b"<@example.test,@mx.example.test:user@elsewhere.example>", b"550 5.7.1 "),
    (b"<user@[127.0.0.1]>", b"550 5.7.1 "),
    (b"<user@[IPv6:::1]>", b"550 5.7.1 "),
    (b"<user@example.test.elsewhere.example>", b"550 5.7.1 "),
    (b"<user@sub.example.test>", b"550 5.7.1 "),
    (b"<user@elsewhere.example@example.test>", b"553 5.1.3 "),  # aiosmtpd: not one address
    (b"<user>", b"553 5.1.3 "),
    (b"<>", b"553 5.1.3 "),
]


@pytest.fixture
def spool(spool_dir: Path) -> SpoolTransport:
    return SpoolTransport(str(spool_dir))


def test_relay_tricks_from_the_internet_are_refused(spool: SpoolTransport) -> None:
    with running(make_config(), spool) as receiver, RawClient(receiver.port) as raw:
        raw.reply()
        raw.command(b"EHLO client.example")
        assert raw.command(b"MAIL FROM:<sender@sender.example>")[0].startswith(b"250 ")
        for rcpt, expected in TRICKS:
            [reply] = raw.command(b"RCPT TO:" + rcpt)
            assert reply.startswith(expected), (rcpt, reply)
        assert raw.command(b"DATA")[0].startswith(b"503 5.5.1 ")  # nothing was accepted
    assert stored(spool) == []


@pytest.mark.parametrize(
    ("rcpt", "stored_as"),
    [
        (b"<user@EXAMPLE.TEST>", "user@EXAMPLE.TEST"),
        (b"<user@example.test.>", "user@example.test"),
        (b"<user@a.b.corp.example>", "user@a.b.corp.example"),
        (b"<@relay.example:user@example.test>", "user@example.test"),
    ],
)
def test_internal_mailboxes_are_accepted(spool: SpoolTransport, rcpt: bytes, stored_as: str) -> None:
    config = make_config(internal_domains=("example.test", ".corp.example"))
    with running(config, spool) as receiver, RawClient(receiver.port) as raw:
        raw.start(rcpt=rcpt)
        raw.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
        assert raw.reply()[0].startswith(b"250 2.0.0 ")
    [(env, _)] = stored(spool)
    assert env.rcpt_to == (stored_as,)


def test_ipv4_mapped_relay_client_on_an_ipv6_socket(spool: SpoolTransport) -> None:
    """A dual-stack listener sees 127.0.0.2 as ::ffff:127.0.0.2; it is still the relay network."""
    config = make_config()
    config = dataclasses.replace(
        config,
        receiver=dataclasses.replace(
            config.receiver,
            listen=HostPort("::", 0),
            relay_networks=(ipaddress.ip_network("127.0.0.2/32"),),
        ),
    )
    with running(config, spool) as receiver:
        with smtplib.SMTP("127.0.0.1", receiver.port, source_address=("127.0.0.2", 0)) as client:
            assert client.sendmail("user@example.test", ["friend@elsewhere.example"], b"Subject: x\r\n\r\nx\r\n") == {}
        with smtplib.SMTP("127.0.0.1", receiver.port) as client, pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("user@example.test", ["friend@elsewhere.example"], b"Subject: x\r\n\r\nx\r\n")
    [(env, _)] = stored(spool)
    assert env.client.ip == "127.0.0.2"
    assert env.client.relay

"""The receiver end to end over real sockets: accept, store durably, answer right.

A real Receiver on 127.0.0.1 in front of a real SpoolTransport (fsync on);
clients are stdlib smtplib and raw sockets. What the spool stored is read
back from its files.
"""

from __future__ import annotations

import hashlib
import smtplib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.delivery.classify import Outcome, RcptResult
from services.delivery.routing import Hop
from services.delivery.smtp_client import SmtpClient, Transaction
from services.receiver.app import Receiver
from shared import eventloop
from shared.envelope import Direction
from shared.errors import SpoolError
from shared.spool import SpoolTransport
from shared.transport import Queue
from tests.integration.test_receiver_support import (
    ENHANCED,
    FailingTransport,
    RawClient,
    make_config,
    running,
    stored,
)
from tests.integration.test_transport_contract import make_envelope

pytestmark = pytest.mark.integration

MESSAGE = b"From: <sender@sender.example>\r\nTo: <user@example.test>\r\nSubject: hello\r\n\r\nHello.\r\n"


@pytest.fixture
def spool(spool_dir: Path) -> SpoolTransport:
    return SpoolTransport(str(spool_dir))


@pytest.fixture
def receiver(spool: SpoolTransport) -> Iterator[Receiver]:
    with running(make_config(), spool) as r:
        yield r


def split_trace(body: bytes) -> tuple[bytes, bytes]:
    """(our Received header, the message as the client sent it)."""
    lines = body.split(b"\r\n")
    n = 1
    while lines[n].startswith(b"\t"):
        n += 1
    return b"\r\n".join(lines[:n]) + b"\r\n", b"\r\n".join(lines[n:])


def test_accepts_and_stores_durably(receiver: Receiver, spool: SpoolTransport) -> None:
    with smtplib.SMTP("127.0.0.1", receiver.port) as client:
        code, banner = client.ehlo("client.example")
        assert code == 250
        assert b"ENHANCEDSTATUSCODES" in banner
        assert b"PIPELINING" in banner
        assert b"8BITMIME" in banner
        assert b"SMTPUTF8" in banner
        assert b"SIZE 10485760" in banner
        client.mail("sender@sender.example")
        client.rcpt("user@example.test")
        code, reply = client.data(MESSAGE)
    assert code == 250
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(b" ", 1)[1].decode()

    [(env, body)] = stored(spool)
    assert env.queue_id == queue_id
    assert env.mail_from == "sender@sender.example"
    assert env.rcpt_to == ("user@example.test",)
    assert env.client.ip == "127.0.0.1"
    assert env.client.helo == "client.example"
    assert (env.client.tls, env.client.authenticated, env.client.relay) == (False, "", False)
    assert env.direction == Direction.INCOMING
    assert (env.smtputf8, env.eight_bit) == (False, False)
    assert env.size == len(body)
    assert env.crlf_clean  # read_data checked the content, the handler its Received header
    assert env.received_at.utcoffset() == timedelta(0)
    assert env.expires_at == env.received_at + timedelta(hours=24)
    trace, message = split_trace(body)
    assert message == MESSAGE
    assert trace.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby mx.example.test with ESMTP id ")
    assert queue_id.encode() in trace
    assert b"for <user@example.test>" in trace


def test_banner_and_trace_never_name_the_software(spool: SpoolTransport) -> None:
    with running(make_config(banner="ready when you are"), spool) as receiver, RawClient(receiver.port) as raw:
        greeting = raw.reply()
        assert greeting == [b"220 mx.example.test ready when you are"]
        with smtplib.SMTP("127.0.0.1", receiver.port) as client:
            client.sendmail("sender@sender.example", ["user@example.test"], MESSAGE)
    [(_, body)] = stored(spool)
    trace, _ = split_trace(body)
    for text in (greeting[0], trace):
        for word in (b"python", b"aiosmtpd", b"smtpgw", b"1.4"):
            assert word not in text.lower()


def test_default_banner(receiver: Receiver) -> None:
    with RawClient(receiver.port) as raw:
        assert raw.reply() == [b"220 mx.example.test SMTPGWY ready"]


def test_every_reply_has_an_enhanced_status_code(receiver: Receiver) -> None:
    """RFC 2034 §3: all replies but the greeting and the EHLO/HELO answers (and 354, which has no class)."""
    commands = [
        b"MAIL FROM:<a@sender.example>",  # before EHLO: 503
        b"EHLO client.example",
        b"NOOP",
        b"HELP",
        b"HELP MAIL",
        b"VRFY user@example.test",
        b"EXPN list",
        b"FROB",
        b"",
        b"RCPT TO:<user@example.test>",  # no MAIL yet
        b"DATA",
        b"MAIL FROM:<bad",
        b"MAIL FROM:<a@sender.example> FOO=bar",
        b"MAIL FROM:<a@sender.example> SIZE=999999999",
        b"MAIL FROM:<a@sender.example>",
        b"MAIL FROM:<a@sender.example>",  # nested
        b"RCPT TO:<user@evil.example>",
        b"RCPT TO:<user@example.test> NOTIFY=NEVER",
        b"DATA",  # no recipient accepted yet
        b"RCPT TO:<user@example.test>",
        b"DATA extra",
        b"AUTH PLAIN AHVzZXIAcGFzcw==",
        b"STARTTLS",
        b"NOOP " + b"x" * 600,
        b"RSET",
        b"HELO again.example",
        b"NOOP",
        b"QUIT",
    ]
    with RawClient(receiver.port) as raw:
        raw.reply()
        for command in commands:
            lines = raw.command(command)
            plain = command.startswith((b"EHLO", b"HELO"))
            for line in lines:
                assert line[:1] in b"245", (command, line)
                assert bool(ENHANCED.match(line)) is not plain, (command, line)
        assert raw.closed()


def test_null_sender_and_postmaster(receiver: Receiver, spool: SpoolTransport) -> None:
    with RawClient(receiver.port) as raw:
        raw.start(sender=b"<>", rcpt=b"<Postmaster>")
        raw.send(b"Subject: bounce\r\n\r\nx\r\n.\r\n")
        assert raw.reply()[0].startswith(b"250 2.0.0 Ok: queued as ")
    [(env, _)] = stored(spool)
    assert env.mail_from == ""
    assert env.rcpt_to == ("postmaster@example.test",)


def test_relay_client_sends_anywhere(receiver: Receiver, spool: SpoolTransport) -> None:
    """127.0.0.2 is in the default relay_networks: an internal mail system."""
    with smtplib.SMTP("127.0.0.1", receiver.port, source_address=("127.0.0.2", 0)) as client:
        refused = client.sendmail("user@example.test", ["friend@elsewhere.example", "user%x@example.net"], MESSAGE)
    assert refused == {}
    [(env, _)] = stored(spool)
    assert env.rcpt_to == ("friend@elsewhere.example", "user%x@example.net")
    assert env.client.relay
    assert env.direction == Direction.OUTGOING


def test_duplicate_recipient_gets_one_copy(receiver: Receiver, spool: SpoolTransport) -> None:
    with smtplib.SMTP("127.0.0.1", receiver.port) as client:
        client.sendmail("sender@sender.example", ["user@example.test", "user@example.test"], MESSAGE)
    [(env, _)] = stored(spool)
    assert env.rcpt_to == ("user@example.test",)


def test_8bitmime_and_smtputf8_arrive_byte_exact(receiver: Receiver, spool: SpoolTransport) -> None:
    message = (
        "From: Søren <søren@sender.example>\r\nTo: Jörg <jörg@example.test>\r\nSubject: Grüße 🎉\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + b"latin-1 \xe9\xe8, raw \xff\xfe\x80, NUL \x00 kept\r\n.leading dot\r\n..two dots\r\n.\tdot tab\r\n"
    with smtplib.SMTP("127.0.0.1", receiver.port) as client:
        refused = client.sendmail(
            "søren@sender.example", ["jörg@example.test"], message, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
    assert refused == {}
    [(env, body)] = stored(spool)
    assert (env.smtputf8, env.eight_bit) == (True, True)
    assert env.mail_from == "søren@sender.example"
    assert env.rcpt_to == ("jörg@example.test",)
    trace, received = split_trace(body)
    assert received == message
    assert b" with UTF8SMTP id " in trace


def test_nine_mebibytes_arrive_intact(receiver: Receiver, spool: SpoolTransport) -> None:
    line = b"".join(bytes([65 + i % 26]) for i in range(76)) + b"\r\n"
    message = b"Subject: big\r\n\r\n" + line * (9 * 1024 * 1024 // len(line)) + b".starts with a dot\r\n"
    assert len(message) > 9 * 1024 * 1024 - 100
    with smtplib.SMTP("127.0.0.1", receiver.port, timeout=60) as client:
        assert client.sendmail("sender@sender.example", ["user@example.test"], message) == {}
    [(env, body)] = stored(spool)
    _, received = split_trace(body)
    assert hashlib.sha256(received).digest() == hashlib.sha256(message).digest()
    assert env.size == len(body)
    assert receiver.data_inflight == 0


def test_pipelined_transactions(receiver: Receiver, spool: SpoolTransport) -> None:
    """RFC 2920: a whole session in one write; replies in order, two messages."""
    with RawClient(receiver.port) as raw:
        raw.reply()
        raw.command(b"EHLO client.example")
        raw.send(
            b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<one@example.test>\r\nRCPT TO:<x@evil.example>\r\nDATA\r\n"
            b"Subject: one\r\n\r\n1\r\n.\r\n"
            b"MAIL FROM:<b@sender.example>\r\nRCPT TO:<two@example.test>\r\nDATA\r\n"
            b"Subject: two\r\n\r\n2\r\n.\r\nQUIT\r\n"
        )
        codes = [raw.code() for _ in range(9)]
        assert codes == [250, 250, 550, 354, 250, 250, 250, 354, 250]
        assert raw.reply() == [b"221 2.0.0 Bye"]
    messages = sorted((env.rcpt_to, split_trace(body)[1]) for env, body in stored(spool))
    assert messages == [
        (("one@example.test",), b"Subject: one\r\n\r\n1\r\n"),
        (("two@example.test",), b"Subject: two\r\n\r\n2\r\n"),
    ]


def accepted_connections() -> float:
    return REGISTRY.get_sample_value("smtpgw_receiver_connections_total", {"result": "accepted"}) or 0.0


def test_delivery_pipelines_into_a_receiver(receiver: Receiver, spool: SpoolTransport) -> None:
    """smtpgw's delivery client in front of smtpgw's receiver (one gateway relaying to another):
    MAIL, the RCPTs and DATA in one write (an RSET ahead of them on the pooled connection), each
    recipient answered on its own."""

    async def run() -> list[list[RcptResult]]:
        client = SmtpClient("gw.example.test", 5.0)

        async def hops() -> list[Hop]:
            return [Hop("127.0.0.1", "127.0.0.1", receiver.port)]

        async def delivered(_rcpts: Sequence[str]) -> None:
            return None

        try:
            return [
                await client.send("dest", hops, Transaction("a@sender.example", rcpts, MESSAGE), delivered)
                for rcpts in (("one@example.test", "x@evil.example"), ("two@example.test",))
            ]
        finally:
            await client.aclose()

    before = accepted_connections()
    first, second = eventloop.run(run())
    assert [(r.outcome, r.reply.code) for r in first + second] == [
        (Outcome.DELIVERED, 250),
        (Outcome.PERMANENT, 550),
        (Outcome.DELIVERED, 250),
    ]
    stored_rcpts = sorted(env.rcpt_to for env, body in stored(spool) if split_trace(body)[1] == MESSAGE)
    assert stored_rcpts == [("one@example.test",), ("two@example.test",)]
    assert accepted_connections() - before == 1  # the second transaction went on the pooled connection


def test_a_long_pipelined_group_is_answered_in_order(receiver: Receiver) -> None:
    """More commands in one write than replies are held back: every reply comes, in order."""
    with RawClient(receiver.port) as raw:
        raw.reply()
        raw.command(b"EHLO client.example")
        raw.send(b"".join(b"NOOP %d\r\nRSET\r\n" % i for i in range(100)) + b"VRFY <a@example.test>\r\nQUIT\r\n")
        for _ in range(100):
            assert raw.reply() == [b"250 2.0.0 OK"]
            assert raw.reply() == [b"250 2.0.0 OK"]
        assert raw.code() == 252
        assert raw.reply() == [b"221 2.0.0 Bye"]
        assert raw.closed()


@pytest.mark.parametrize(
    "error", [SpoolError("cannot store x in scan: No space left on device"), RuntimeError("unexpected")]
)
def test_failed_publish_answers_451_and_acknowledges_nothing(error: Exception) -> None:
    transport = FailingTransport(error)
    with running(make_config(), transport) as receiver, smtplib.SMTP("127.0.0.1", receiver.port) as client:
        client.ehlo("client.example")
        client.mail("sender@sender.example")
        client.rcpt("user@example.test")
        code, reply = client.data(MESSAGE)
        assert (code, reply) == (451, b"4.3.0 Local error in processing, try again later")
        assert len(transport.attempts) == 1
        assert client.noop()[0] == 250  # the session goes on; the sender keeps the message
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("sender@sender.example", ["user@example.test"], MESSAGE)
        assert info.value.smtp_code == 451
        assert len(transport.attempts) == 2


def test_back_pressure_answers_451_at_mail_from() -> None:
    transport = FailingTransport(busy="scan queue holds 10000 messages")
    with running(make_config(), transport) as receiver, smtplib.SMTP("127.0.0.1", receiver.port) as client:
        client.ehlo("client.example")
        assert client.mail("sender@sender.example") == (
            451,
            b"4.3.2 System not accepting mail now: scan queue holds 10000 messages",
        )
        assert transport.attempts == []


def test_stop_closes_sessions_and_the_port(spool: SpoolTransport) -> None:
    with running(make_config(), spool) as receiver:
        port = receiver.port
        raw = RawClient(port)
        raw.reply()
    with raw:
        assert raw.closed()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# ---------------------------------------------------------------- flow control (in_flow_delay)


def _backlog(spool: SpoolTransport, n: int) -> None:
    """`n` messages waiting: on the scan and the deliver queue (both count), one more deferred."""
    for i in range(n + 1):
        queue = Queue.DEFERRED if i == n else Queue.SCAN if i % 2 else Queue.DELIVER
        spool.publish(queue, make_envelope(), b"Subject: waiting\r\n\r\nx\r\n")


def _timed_mail(port: int, sender: str = "sender@sender.example") -> tuple[float, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.example")
        started = time.monotonic()
        reply = client.mail(sender)
        return time.monotonic() - started, reply


def _waits() -> float:
    return REGISTRY.get_sample_value("smtpgw_receiver_in_flow_delay_seconds_count") or 0.0


def test_mail_from_waits_up_to_in_flow_delay_while_the_backlog_is_over_the_limit(spool: SpoolTransport) -> None:
    _backlog(spool, 3)
    before = _waits()
    with running(make_config(in_flow_backlog=2, in_flow_delay=0.6), spool) as receiver:
        waited, reply = _timed_mail(receiver.port)
    assert reply[0] == 250  # held, then let through: flow control never refuses
    assert 0.55 <= waited < 3.0
    assert _waits() == before + 1


def test_mail_from_goes_on_as_soon_as_the_backlog_falls(spool: SpoolTransport) -> None:
    _backlog(spool, 3)
    first = next(p for p in sorted((Path(spool.root) / str(Queue.DELIVER)).iterdir()) if "," in p.name)
    # A delivery finishing one message, 0.3 s after the sender started waiting.
    taker = threading.Timer(0.3, first.unlink)
    with running(make_config(in_flow_backlog=2, in_flow_delay=30), spool) as receiver:
        taker.start()
        waited, reply = _timed_mail(receiver.port)
    assert reply[0] == 250
    assert 0.25 <= waited < 5.0


@pytest.mark.parametrize("settings", [{"in_flow_backlog": 2, "in_flow_delay": 0}, {"in_flow_backlog": 3}])
def test_no_wait_when_off_or_within_the_limit(spool: SpoolTransport, settings: dict[str, float]) -> None:
    _backlog(spool, 3)
    before = _waits()
    with running(make_config(**settings), spool) as receiver:
        waited, reply = _timed_mail(receiver.port)
    assert reply[0] == 250
    assert waited < 0.5
    assert _waits() == before


def test_a_refused_sender_is_not_held(spool: SpoolTransport) -> None:
    _backlog(spool, 3)
    with running(make_config(in_flow_backlog=2, in_flow_delay=30), spool) as receiver:
        waited, reply = _timed_mail(receiver.port, sender="no-domain")
    assert reply == (553, b"5.1.7 Sender address must be fully qualified: local@domain")
    assert waited < 0.5


def test_stop_does_not_wait_for_a_held_mail_from(spool: SpoolTransport) -> None:
    _backlog(spool, 3)
    with running(make_config(in_flow_backlog=2, in_flow_delay=60), spool) as receiver:
        raw = RawClient(receiver.port)
        raw.reply()
        raw.command(b"EHLO client.example")
        raw.send(b"MAIL FROM:<sender@sender.example>\r\n")
        time.sleep(0.5)  # the session is held at MAIL FROM now (the backlog is looked at at once)
        stopping = time.monotonic()
    with raw:
        assert time.monotonic() - stopping < 5
        assert raw.closed()  # no reply: the session ended while held, nothing was accepted
    assert spool.backlog() == 3

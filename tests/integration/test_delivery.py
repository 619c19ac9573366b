"""Delivery against real SMTP servers over sockets: aiosmtpd capture servers that answer
2xx/4xx/5xx per recipient or at DATA, a port nobody listens on, a STARTTLS server with
an untrusted certificate, and the embedded spool transport for the bounce round trip."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email
import email.policy
import logging
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from services.delivery.app import Delivery
from services.delivery.classify import Outcome, RcptResult
from services.delivery.ledger import FileLedger
from services.delivery.routing import Hop
from services.delivery.smtp_client import SmtpClient, Transaction
from shared import eventloop
from shared.config import Config, load_config
from shared.envelope import Action, Client, Direction, Envelope, Verdict, new_queue_id
from shared.spool import SpoolTransport
from shared.transport import Job, Output, Queue
from tests.support import CaptureHandler, capture_server, free_port

pytestmark = pytest.mark.integration

BODY = (
    "Received: from client.example.org ([192.0.2.1]) by gw.example.test\r\n"
    "From: Sender <sender@example.org>\r\n"
    "To: user@example.test\r\n"
    "Subject: delivery test\r\n"
    "Message-ID: <delivery-test@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Grüße, a body with 8-bit text.\r\n"
    ".a line that starts with a dot (RFC 5321 section 4.5.2 transparency)\r\n"
    "..and one with two\r\n"
    "\r\n"
    "last line\r\n"
).encode()


def make_config(spool: Path, routes: dict[str, str], **delivery: str) -> Config:
    table = ", ".join(f'"{k}" = "{v}"' for k, v in routes.items())
    env = {
        "SMTPGW_SPOOL__DIR": str(spool),
        "SMTPGW_SPOOL__FSYNC": "false",
        "SMTPGW_RECEIVER__HOSTNAME": "gw.example.test",
        "SMTPGW_DELIVERY__ROUTES": f"{{ {table} }}",
        "SMTPGW_DELIVERY__TIMEOUT": "5s",
        "SMTPGW_DELIVERY__DNS_TIMEOUT": "2s",
    }
    env.update({f"SMTPGW_DELIVERY__{k.upper()}": v for k, v in delivery.items()})
    return load_config(env=env)


def envelope(
    rcpts: tuple[str, ...], mail_from: str = "sender@example.org", body: bytes = BODY, **changes: Any
) -> Envelope:
    env = Envelope(
        queue_id=new_queue_id(),
        received_at=datetime.now(UTC),
        client=Client("192.0.2.1", helo="client.example.org"),
        mail_from=mail_from,
        rcpt_to=rcpts,
        size=len(body),
        eight_bit=True,
    )
    return env.replace(**changes)


MakeDelivery = Callable[..., Delivery]


@pytest.fixture
def make_delivery(spool_dir: Path) -> Iterator[MakeDelivery]:
    made: list[Delivery] = []

    def make(routes: dict[str, str], **delivery: str) -> Delivery:
        made.append(Delivery(make_config(spool_dir, routes, **delivery)))
        return made[-1]

    yield make
    for d in made:
        d.close()


def deliver(d: Delivery, env: Envelope, body: bytes = BODY) -> list[Output]:
    return d.handle_deliver(Job(Queue.DELIVER, env, body))


def by_queue(outputs: list[Output]) -> dict[Queue, Output]:
    assert len({o.queue for o in outputs}) == len(outputs)
    return {o.queue: o for o in outputs}


# ---------------------------------------------------------------- delivered


def test_delivered_byte_exact_in_one_transaction(make_delivery: MakeDelivery, spool_dir: Path) -> None:
    with capture_server() as (handler, port):
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
        env = envelope(("user@example.test", "other@example.test"))
        assert deliver(d, env) == []
        (got,) = handler.wait_for(1)
    assert got.data == BODY
    assert got.mail_from == "sender@example.org"
    assert got.rcpt_tos == ["user@example.test", "other@example.test"]
    ledger = FileLedger(str(spool_dir / "delivered"))
    assert ledger.was_delivered(env.queue_id, "user@example.test")
    assert ledger.was_delivered(env.queue_id, "other@example.test")


def test_one_transaction_per_destination(make_delivery: MakeDelivery) -> None:
    with capture_server() as (first, port1), capture_server() as (second, port2):
        d = make_delivery({"one.test": f"smtp://127.0.0.1:{port1}", ".two.test": f"smtp://127.0.0.1:{port2}"})
        assert deliver(d, envelope(("a@one.test", "b@x.two.test", "c@one.test", "d@y.two.test"))) == []
        (one,) = first.wait_for(1)
        (two,) = second.wait_for(1)
    assert one.rcpt_tos == ["a@one.test", "c@one.test"]
    assert two.rcpt_tos == ["b@x.two.test", "d@y.two.test"]
    assert one.data == two.data == BODY


def test_connection_is_reused_across_messages(make_delivery: MakeDelivery) -> None:
    with capture_server() as (handler, port):
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
        for _ in range(3):
            assert deliver(d, envelope(("user@example.test",))) == []
        got = handler.wait_for(3)
    assert len(got) == 3
    assert len({m.peer for m in got}) == 1  # one TCP connection (same client port) for all three


@dataclass
class Gathering(CaptureHandler):
    """Answers DATA only once `gather` transactions wait for their reply: that many connections
    in use at the same time."""

    gather: int = 1
    _waiting: int = 0
    _all_in: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        self._waiting += 1
        if self._waiting == self.gather:
            self._all_in.set()
        await asyncio.wait_for(self._all_in.wait(), 20)
        return await super().handle_DATA(server, session, envelope)

    def next_round(self) -> None:
        self._waiting = 0
        self._all_in = asyncio.Event()


def test_every_delivery_thread_keeps_its_connection(make_delivery: MakeDelivery) -> None:
    """With all `threads` delivering at once to one destination, each connection goes back to the
    pool afterwards and serves the next round: none is closed and opened again."""
    threads = 6
    handler = Gathering(gather=threads)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"}, threads=str(threads))
        for round_ in range(1, 3):
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                outputs = list(pool.map(lambda _: deliver(d, envelope(("user@example.test",))), range(threads)))
            assert outputs == [[]] * threads
            got = handler.wait_for(threads * round_)
            handler.next_round()
    finally:
        controller.stop()
    assert len({m.peer for m in got[:threads]}) == threads  # the first round used `threads` connections
    assert {m.peer for m in got[threads:]} == {m.peer for m in got[:threads]}  # the second, the same ones


def test_pooled_connection_closed_by_the_server_is_replaced(make_delivery: MakeDelivery) -> None:
    port = free_port()
    d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
    with capture_server(port=port) as (first, _):
        assert deliver(d, envelope(("user@example.test",))) == []
        assert len(first.wait_for(1)) == 1
    # The server restarted: the pooled connection is dead, and a new one takes over.
    with capture_server(port=port) as (second, _):
        assert deliver(d, envelope(("user@example.test",))) == []
        (got,) = second.wait_for(1)
    assert got.data == BODY


# Both ways of sending a transaction: to a server that offers PIPELINING (RFC 2920) and to one that
# does not; each recipient's reply must count the same.
BOTH_WAYS = pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "stepwise"])


@BOTH_WAYS
def test_too_many_recipients_go_in_the_next_transaction(make_delivery: MakeDelivery, pipelining: bool) -> None:
    """RFC 5321 section 4.5.3.1.10: 452 to RCPT after some were accepted means "send the rest
    in another transaction", at once, not after a retry interval."""

    @dataclass
    class TwoPerTransaction(CaptureHandler):
        async def handle_RCPT(self, server, session, envelope, address, options):
            if len(envelope.rcpt_tos) >= 2:
                return "452 4.5.3 Too many recipients"
            return await super().handle_RCPT(server, session, envelope, address, options)

    handler = TwoPerTransaction(pipelining=pipelining)
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
        rcpts = tuple(f"u{i}@example.test" for i in range(5))
        assert deliver(d, envelope(rcpts)) == []
        got = handler.wait_for(3)
    finally:
        controller.stop()
    assert [m.rcpt_tos for m in got] == [[rcpts[0], rcpts[1]], [rcpts[2], rcpts[3]], [rcpts[4]]]


# ---------------------------------------------------------------- failures


@BOTH_WAYS
def test_partial_failures_per_recipient(make_delivery: MakeDelivery, pipelining: bool) -> None:
    replies = {"busy@example.test": "450 4.2.1 mailbox busy", "gone@example.test": "550 5.1.1 user unknown"}
    with capture_server(rcpt_reply=replies.get, pipelining=pipelining) as (handler, port):
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"}, retry_interval="10m")
        env = envelope(("ok@example.test", "busy@example.test", "gone@example.test"), attempts=1)
        before = datetime.now(UTC)
        outputs = by_queue(deliver(d, env))
        (got,) = handler.wait_for(1)
    assert got.rcpt_tos == ["ok@example.test"]
    assert set(outputs) == {Queue.DEFERRED, Queue.BOUNCE}

    deferred = outputs[Queue.DEFERRED].envelope
    assert deferred.queue_id == env.queue_id
    assert deferred.rcpt_to == ("busy@example.test",)
    assert deferred.attempts == 2
    assert deferred.not_before is not None
    assert before + timedelta(minutes=9) <= deferred.not_before <= datetime.now(UTC) + timedelta(minutes=11)
    assert deferred.last_error.startswith("450 4.2.1 mailbox busy (relay=127.0.0.1[127.0.0.1]:")
    assert outputs[Queue.DEFERRED].body == BODY

    bounce = outputs[Queue.BOUNCE].envelope
    assert bounce.queue_id == f"{env.queue_id}.b1"
    assert bounce.parent_id == env.queue_id
    assert bounce.rcpt_to == ("gone@example.test",)
    (failure,) = bounce.failures
    assert (failure.rcpt, failure.code, failure.status, failure.message) == (
        "gone@example.test",
        550,
        "5.1.1",
        "user unknown",
    )


@BOTH_WAYS
@pytest.mark.parametrize(
    ("reply", "queue", "status"),
    [("451 4.3.0 try again later", Queue.DEFERRED, "4.3.0"), ("554 5.6.0 content rejected", Queue.BOUNCE, "5.6.0")],
)
def test_data_reply_applies_to_every_recipient(
    make_delivery: MakeDelivery, reply: str, queue: Queue, status: str, pipelining: bool
) -> None:
    with capture_server(data_reply=lambda _env: reply, pipelining=pipelining) as (handler, port):
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
        env = envelope(("a@example.test", "b@example.test"))
        (out,) = deliver(d, env)
    assert handler.messages == []
    assert out.queue is queue
    assert out.envelope.rcpt_to == ("a@example.test", "b@example.test")
    if queue is Queue.BOUNCE:
        assert [f.status for f in out.envelope.failures] == [status, status]
    else:
        assert out.envelope.last_error.startswith(f"{reply.split()[0]} {status}")


def test_connection_refused_is_deferred(make_delivery: MakeDelivery) -> None:
    port = free_port()  # nothing listens there
    d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
    env = envelope(("user@example.test",))
    (out,) = deliver(d, env)
    assert out.queue is Queue.DEFERRED
    assert out.envelope.attempts == 1
    assert out.envelope.last_error.startswith("4.4.1 connect to 127.0.0.1[127.0.0.1]:")
    assert "refused" in out.envelope.last_error.lower()


def test_expired_message_bounces_with_4_4_7(make_delivery: MakeDelivery) -> None:
    port = free_port()
    d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
    env = envelope(("user@example.test",), attempts=48, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    (out,) = deliver(d, env)
    assert out.queue is Queue.BOUNCE
    assert out.envelope.queue_id == f"{env.queue_id}.b48"
    (failure,) = out.envelope.failures
    assert failure.status == "4.4.7"
    assert failure.message.startswith("delivery time expired; last error: 4.4.1 connect to")


def test_unroutable_recipient_bounces_without_a_connection(make_delivery: MakeDelivery) -> None:
    d = make_delivery({"*": "mx"})
    (out,) = deliver(d, envelope(("postmaster", "user@[bogus]")))
    assert out.queue is Queue.BOUNCE
    assert [f.status for f in out.envelope.failures] == ["5.1.2", "5.1.2"]


def test_size_over_the_servers_limit_bounces(spool_dir: Path) -> None:
    handler = CaptureHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, data_size_limit=100)
    controller.start()
    try:
        d = Delivery(make_config(spool_dir, {"example.test": f"smtp://127.0.0.1:{port}"}))
        try:
            (out,) = deliver(d, envelope(("user@example.test",)))
        finally:
            d.close()
    finally:
        controller.stop()
    assert out.queue is Queue.BOUNCE
    assert out.envelope.failures[0].status == "5.3.4"
    assert handler.messages == []


# ---------------------------------------------------------------- MAIL parameters


@dataclass
class OptionsCapture(CaptureHandler):
    """Also keeps the MAIL FROM parameters of each message."""

    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):
        self.mail_options.append(list(envelope.mail_options))
        return await super().handle_DATA(server, session, envelope)


@contextlib.contextmanager
def options_server(smtputf8: bool) -> Iterator[tuple[OptionsCapture, int]]:
    handler = OptionsCapture()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=smtputf8)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def test_mail_parameters_follow_the_envelope(spool_dir: Path) -> None:
    rcpt = "jürgen@example.test"
    ascii_body = BODY.replace("Grüße".encode(), b"Regards")
    with options_server(smtputf8=True) as (handler, port):
        d = Delivery(make_config(spool_dir, {"example.test": f"smtp://127.0.0.1:{port}"}))
        try:
            assert deliver(d, envelope(("plain@example.test",), eight_bit=False), ascii_body) == []
            assert deliver(d, envelope(("plain@example.test",), eight_bit=True)) == []
            assert deliver(d, envelope((rcpt,), eight_bit=True, smtputf8=True)) == []
            got = handler.wait_for(3)
        finally:
            d.close()
    size = len(BODY)
    assert handler.mail_options == [
        [f"SIZE={len(ascii_body)}"],
        [f"SIZE={size}", "BODY=8BITMIME"],
        [f"SIZE={size}", "BODY=8BITMIME", "SMTPUTF8"],
    ]
    assert got[2].rcpt_tos == [rcpt]


def test_utf8_address_to_a_server_without_smtputf8_bounces(spool_dir: Path) -> None:
    with options_server(smtputf8=False) as (handler, port):
        d = Delivery(make_config(spool_dir, {"example.test": f"smtp://127.0.0.1:{port}"}))
        try:
            (out,) = deliver(d, envelope(("jürgen@example.test",), smtputf8=True))
        finally:
            d.close()
    assert out.queue is Queue.BOUNCE
    assert out.envelope.failures[0].status == "5.6.7"  # RFC 6531 section 3.2
    assert handler.messages == []


# ---------------------------------------------------------------- bounces


def test_null_sender_is_never_bounced(make_delivery: MakeDelivery) -> None:
    with capture_server(rcpt_reply=lambda _a: "550 5.1.1 user unknown") as (_handler, port):
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
        env = envelope(("gone@example.test",), mail_from="")
        assert deliver(d, env) == []
        # Even a bounce job that somehow exists for it produces nothing.
        job = env.replace(queue_id=f"{env.queue_id}.b0", parent_id=env.queue_id)
        assert d.handle_bounce(Job(Queue.BOUNCE, job, BODY)) == []


def test_infected_message_is_never_bounced_to_its_sender(make_delivery: MakeDelivery) -> None:
    virus = Verdict("virus", "virus", Action.STRIP, "Eicar-Test-Signature", "eicar.com")
    with capture_server(rcpt_reply=lambda _a: "550 5.1.1 user unknown") as (_handler, port):
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
        env = envelope(("gone@example.test",), verdicts=(virus,))
        assert deliver(d, env) == []


def test_dsn_reaches_the_sender_through_a_route(spool_dir: Path) -> None:
    """The whole round trip over the embedded transport: 550 -> bounce queue -> DSN on the
    deliver queue -> delivered from <> to the sender's own route."""
    replies = {"gone@example.test": "550 5.1.1 <gone@example.test>: user unknown"}
    with capture_server(rcpt_reply=replies.get) as (inside, port_in), capture_server() as (outside, port_out):
        config = make_config(
            spool_dir, {"example.test": f"smtp://127.0.0.1:{port_in}", "example.org": f"smtp://127.0.0.1:{port_out}"}
        )
        delivery = Delivery(config)
        transport = SpoolTransport(str(spool_dir), fsync=False, rescan=0.2)
        transport.consume(Queue.DELIVER, delivery.handle_deliver, 2)
        transport.consume(Queue.BOUNCE, delivery.handle_bounce, 1)
        transport.start()
        try:
            env = envelope(("user@example.test", "gone@example.test"))
            transport.publish(Queue.DELIVER, env, BODY)
            (dsn,) = outside.wait_for(1)
            (original,) = inside.wait_for(1)
            assert transport.wait_idle(10.0)
        finally:
            transport.stop()
            delivery.close()
    assert original.rcpt_tos == ["user@example.test"]
    assert original.data == BODY
    assert dsn.mail_from == "<>"  # RFC 5321 section 4.5.5: DSNs have the null reverse-path
    assert dsn.rcpt_tos == ["sender@example.org"]

    msg: Any = email.message_from_bytes(dsn.data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<sender@example.org>"
    assert msg["Message-ID"] == f"<{env.queue_id}.b0@gw.example.test>"
    human, report, headers = msg.get_payload()
    assert "<gone@example.test>" in human.get_payload()
    per_message, per_rcpt = report.get_payload()
    assert per_message["Reporting-MTA"] == "dns; gw.example.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; gone@example.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; 127.0.0.1"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@example.test>: user unknown"
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload()
    assert "Subject: delivery test" in returned
    assert "a body with 8-bit text" not in dsn.data.decode()


def test_bounce_job_becomes_a_dsn_on_the_deliver_queue(make_delivery: MakeDelivery) -> None:
    with capture_server(rcpt_reply=lambda _a: "550 5.1.1 user unknown") as (_handler, port):
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
        env = envelope(("gone@example.test",), direction=Direction.INCOMING)
        (bounce,) = deliver(d, env)
    (out,) = d.handle_bounce(Job(Queue.BOUNCE, bounce.envelope, bounce.body))
    assert out.queue is Queue.DELIVER
    dsn_env = out.envelope
    assert dsn_env.queue_id == bounce.envelope.queue_id  # the bounce job's continuation
    assert dsn_env.parent_id == env.queue_id
    assert dsn_env.mail_from == ""
    assert dsn_env.rcpt_to == ("sender@example.org",)
    assert dsn_env.direction is Direction.OUTGOING  # back out to the Internet sender
    assert dsn_env.size == len(out.body)


# ---------------------------------------------------------------- dedupe


def test_already_delivered_recipient_is_skipped(make_delivery: MakeDelivery, spool_dir: Path) -> None:
    with capture_server() as (handler, port):
        d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
        env = envelope(("done@example.test", "new@example.test"))
        # As if a crash came after the 250 for done@ but before the queue step was committed.
        FileLedger(str(spool_dir / "delivered")).record(env.queue_id, ["done@example.test"])
        assert deliver(d, env) == []
        (got,) = handler.wait_for(1)
        # The broker hands the same message out again: nothing goes out twice.
        assert deliver(d, env) == []
    assert got.rcpt_tos == ["new@example.test"]
    assert len(handler.messages) == 1


# ---------------------------------------------------------------- TLS


@dataclass
class TlsCapture(CaptureHandler):
    tls: list[bool] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):
        self.tls.append(session.ssl is not None)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(scope="module")
def server_tls() -> ssl.SSLContext:
    # A certificate from a CA nobody trusts: opportunistic TLS must still use it.
    cert = trustme.CA().issue_cert("mx.example.test", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


@pytest.fixture
def tls_server(server_tls: ssl.SSLContext) -> Iterator[tuple[TlsCapture, int]]:
    handler = TlsCapture()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=server_tls)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def test_starttls_when_offered_without_verification(
    tls_server: tuple[TlsCapture, int], make_delivery: MakeDelivery
) -> None:
    # tls_server first, so it stops last: aiosmtpd leaks the TLS transport of a connection
    # still open when it stops, and our pooled connection is open until the delivery closes.
    handler, port = tls_server
    d = make_delivery({"example.test": f"smtp://127.0.0.1:{port}"})
    assert deliver(d, envelope(("user@example.test",))) == []
    (got,) = handler.wait_for(1)
    assert handler.tls == [True]
    assert got.data == BODY


def test_failed_tls_handshake_falls_back_to_plaintext(
    tls_server: tuple[TlsCapture, int], caplog: pytest.LogCaptureFixture
) -> None:
    handler, port = tls_server
    caplog.set_level(logging.INFO, logger="services.delivery.smtp_client")

    async def run() -> list[RcptResult]:
        client = SmtpClient("gw.example.test", 5.0, tls_context=_incompatible_client_context())
        try:

            async def hops() -> list[Hop]:
                return [Hop("mx.example.test", "127.0.0.1", port)]

            async def delivered(_rcpts: Sequence[str]) -> None:
                return None

            tx = Transaction("sender@example.org", ("user@example.test",), BODY)
            return await client.send("relay:test", hops, tx, delivered)
        finally:
            await client.aclose()

    (result,) = eventloop.run(run())
    assert result.outcome is Outcome.DELIVERED
    assert handler.wait_for(1)[0].data == BODY
    assert handler.tls == [False]
    assert "TLS handshake with mx.example.test[127.0.0.1]" in caplog.text


def _incompatible_client_context() -> ssl.SSLContext:
    # The server offers certificate-authenticated suites only; a client that accepts nothing
    # but anonymous ones (and no TLS 1.3, whose suites cannot be restricted) cannot agree.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aNULL")
    return context

"""The DATA fast path over real sockets: what reaches a real SMTP server is byte for byte the
message, whichever path it took, and the fast path puts on the wire exactly what aiosmtplib's
own `SMTP.data()` would.

Two servers: aiosmtpd (`tests.support.capture_server`), which undoes the dot-stuffing as any
MTA does, for the message as the next hop stores it; and `WireServer`, a bare SMTP responder
on a socket that keeps the raw bytes of each DATA phase (stuffing and terminator included)
and can answer DATA with any reply, or not at all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
import pytest

from services.delivery.classify import Outcome, RcptResult
from services.delivery.routing import Hop
from services.delivery.smtp_client import SmtpClient, Transaction, send_wire_data, wire_data
from shared import eventloop
from tests.support import capture_server

pytestmark = pytest.mark.integration

RCPT = "user@example.test"


def binary_lines(size: int) -> bytes:
    """8-bit content in CRLF lines of at most 900 bytes (under aiosmtpd's 1001 limit):
    every byte value but CR and LF, NUL and 0xFF included, some lines starting with a dot."""
    octets = bytes(b for b in range(256) if b not in (10, 13))
    line = (octets * 4)[:898]
    lines = [(b"." if i % 7 == 0 else b"") + line[i % 200 :] for i in range(size // 900 + 1)]
    return b"\r\n".join(lines)[:size] + b"\r\n"


@dataclass
class DataSpy:
    """Counts the messages that went through aiosmtplib's `SMTP.data()` (the fallback)."""

    calls: int = 0


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> DataSpy:
    seen = DataSpy()
    original = aiosmtplib.SMTP.data

    async def data(self: aiosmtplib.SMTP, message: str | bytes, /, **kwargs: Any) -> aiosmtplib.SMTPResponse:
        seen.calls += 1
        return await original(self, message, **kwargs)

    monkeypatch.setattr(aiosmtplib.SMTP, "data", data)
    return seen


def send(port: int, body: bytes, *, timeout: float = 5.0, rcpts: Sequence[str] = (RCPT,)) -> list[RcptResult]:
    """One transaction through a fresh SmtpClient, on an event loop of its own."""
    (results,) = send_all(port, [(body, rcpts)], timeout=timeout)
    return results


def send_all(
    port: int, transactions: Sequence[tuple[bytes, Sequence[str]]], *, timeout: float = 5.0, pipelining: bool = True
) -> list[list[RcptResult]]:
    """(body, recipients) transactions one after the other through one SmtpClient, which reuses
    its connection while it can."""

    async def run() -> list[list[RcptResult]]:
        client = SmtpClient("gw.example.test", timeout, pipelining=pipelining)

        async def hops() -> list[Hop]:
            return [Hop("127.0.0.1", "127.0.0.1", port)]

        async def delivered(_rcpts: Sequence[str]) -> None:
            return None

        try:
            return [
                await client.send("dest", hops, Transaction("s@example.org", tuple(rcpts), body), delivered)
                for body, rcpts in transactions
            ]
        finally:
            await client.aclose()

    return eventloop.run(run())


# ---------------------------------------------------------------- what the next hop stores


CRLF_MESSAGES = [
    pytest.param(b"Subject: dots\r\n\r\n.one dot\r\n..two dots\r\n.\r\n...\r\nend\r\n", id="lines starting with dots"),
    pytest.param(b".first line starts with a dot\r\n\r\nbody\r\n", id="first line starts with a dot"),
    pytest.param(b".\r\n\r\nbody\r\n", id="first line is a lone dot"),
    pytest.param(b"Subject: open end\r\n\r\nno CRLF at the end", id="not ending in CRLF"),
    pytest.param(b"Subject: open end\r\n\r\n.", id="ending in a dot without CRLF"),
    pytest.param(b"Subject: 8bit\r\n\r\n" + binary_lines(64 * 1024), id="binary 8-bit content"),
]


@pytest.mark.parametrize("body", CRLF_MESSAGES)
def test_crlf_messages_take_the_fast_path_and_arrive_byte_exact(body: bytes, spy: DataSpy) -> None:
    with capture_server() as (handler, port):
        (result,) = send(port, body)
        (got,) = handler.wait_for(1)
    assert result.outcome is Outcome.DELIVERED
    assert spy.calls == 0
    # RFC 5321 section 4.5.2: the data ends with a CRLF before the final dot; a body without
    # one arrives with it, as with aiosmtplib's own path.
    assert got.data == (body if body.endswith(b"\r\n") else body + b"\r\n")


def test_20_mib_message_arrives_byte_exact(spy: DataSpy) -> None:
    body = b"Subject: big\r\n\r\n" + binary_lines(20 * 1024 * 1024)
    with capture_server() as (handler, port):
        (result,) = send(port, body, timeout=60.0)
        (got,) = handler.wait_for(1, timeout=60.0)
    assert result.outcome is Outcome.DELIVERED
    assert spy.calls == 0
    assert len(got.data) == len(body)
    assert got.data == body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b"Subject: bare LF\n\nline one\n.dot line\nlast\n",
            b"Subject: bare LF\r\n\r\nline one\r\n.dot line\r\nlast\r\n",
        ),
        (b"Subject: mixed\r\n\r\nbare CR\rhere\r\n", b"Subject: mixed\r\n\r\nbare CR\r\nhere\r\n"),
    ],
    ids=["bare LF", "bare CR"],
)
def test_bare_line_ends_take_aiosmtplibs_path(body: bytes, expected: bytes, spy: DataSpy) -> None:
    with capture_server() as (handler, port):
        (result,) = send(port, body)
        (got,) = handler.wait_for(1)
    assert result.outcome is Outcome.DELIVERED
    assert spy.calls == 1
    assert got.data == expected


# ---------------------------------------------------------------- the wire, against aiosmtplib's own


@dataclass
class WireServer:
    """A bare SMTP server on 127.0.0.1: 250 to everything, `mail_reply` to MAIL, the reply
    `rcpt_replies` has for an address (250 when none), `data_reply` to DATA and, after the data,
    `final_reply` (None: never answer). Keeps each DATA phase's raw bytes.

    With `pipelining` it offers PIPELINING and holds its replies to MAIL and RCPT until DATA
    comes, then sends them all in one write with the reply to DATA (RFC 2920 section 3.2 lets a
    server buffer them; it must flush once its input is empty, which here is when the group
    ends). A client that waits for each reply before its next command hangs against it. With
    `hold` False it offers PIPELINING but answers each command at once. `ahead` lists the MAIL
    and RCPT commands after which the client had already sent more (it did not wait for the
    reply). `drop_at` is a command it answers by closing the connection."""

    data_reply: bytes = b"354 go ahead"
    final_reply: bytes | None = b"250 2.0.0 taken"
    mail_reply: bytes = b"250 ok"
    rcpt_replies: dict[bytes, bytes] = field(default_factory=dict)
    pipelining: bool = False
    hold: bool = True
    drop_at: bytes = b""
    ahead: list[bytes] = field(default_factory=list)
    phases: list[bytes] = field(default_factory=list)
    sessions: int = 0
    port: int = 0
    _sock: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._spawn(self._accept)

    def stop(self) -> None:
        self._stop.set()
        assert self._sock is not None
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not, on Linux)
        self._sock.close()
        for thread in self._threads:
            thread.join(10)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.sessions += 1
            self._spawn(self._session, conn)

    def _session(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            reader = _Lines(conn)
            conn.sendall(b"220 wire.test ESMTP\r\n")
            held: list[bytes] = []
            while line := reader.readline():
                verb = line[:4].upper()
                if verb == self.drop_at:
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                if verb == b"EHLO":
                    conn.sendall(
                        b"250-wire.test\r\n" + (b"250-PIPELINING\r\n" if self.pipelining else b"") + b"250 8BITMIME\r\n"
                    )
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                elif verb == b"DATA":
                    conn.sendall(b"".join(held) + self.data_reply + b"\r\n")
                    held.clear()
                    if self.data_reply.startswith(b"354"):
                        self._read_data(conn, reader)
                elif verb in (b"MAIL", b"RCPT"):
                    address = line[line.find(b"<") + 1 : line.find(b">")]
                    reply = self.mail_reply if verb == b"MAIL" else self.rcpt_replies.get(address, b"250 ok")
                    if reader.pending:
                        self.ahead.append(verb)
                    if self.pipelining and self.hold:
                        held.append(reply + b"\r\n")
                    else:
                        conn.sendall(reply + b"\r\n")
                else:
                    conn.sendall(b"250 ok\r\n")

    def _read_data(self, conn: socket.socket, reader: _Lines) -> None:
        data = b""
        while not (data.endswith(b"\r\n.\r\n") or data == b".\r\n"):
            line = reader.readline()
            if not line:
                return
            data += line
        self.phases.append(data)
        if self.final_reply is None:
            self._stop.wait(30)  # never answer: the client must time out
            return
        conn.sendall(self.final_reply + b"\r\n")


class _Lines:
    """Lines from a socket, through a buffer of our own, so the server can tell whether the
    client sent more than the line it is answering (`pending`)."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._buffer = b""

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def readline(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            chunk = self._conn.recv(65536)
            if not chunk:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += chunk
        line, self._buffer = self._buffer[: end + 1], self._buffer[end + 1 :]
        return line


@contextlib.contextmanager
def wire_server(**kwargs: Any) -> Iterator[WireServer]:
    server = WireServer(**kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


WIRE_BODIES = [
    b"",
    b"\r\n",
    b".",
    b".\r\n",
    b"..\r\n.\r\n",
    b"no final CRLF",
    b"x\r\n.",
    b"Subject: dots\r\n\r\n.a\r\n..b\r\n.\r\nend\r\n",
    b"Subject: 8bit\r\n\r\n" + binary_lines(300 * 1024),
]


@pytest.mark.parametrize("body", WIRE_BODIES)
def test_fast_path_sends_what_aiosmtplib_sends(body: bytes) -> None:
    """Both paths over one session each to a server that keeps the raw DATA bytes."""
    pieces = wire_data(body)
    assert pieces is not None

    async def both(port: int) -> None:
        for fast in (False, True):
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, start_tls=False)
            await smtp.connect()
            await smtp.ehlo()
            await smtp.mail("s@example.org")
            await smtp.rcpt(RCPT)
            response = await (send_wire_data(smtp, pieces) if fast else smtp.data(body))
            assert response.code == 250
            # The session is in step: the next command gets its own reply.
            assert (await smtp.execute_command(b"RSET")).code == 250
            await smtp.quit()

    with wire_server() as server:
        eventloop.run(both(server.port))
    aiosmtplib_phase, fast_phase = server.phases
    assert fast_phase == aiosmtplib_phase


@pytest.mark.parametrize(
    ("server", "outcome", "status"),
    [
        (dict(data_reply=b"554 5.6.0 no thanks"), Outcome.PERMANENT, "5.6.0"),
        (dict(data_reply=b"451 4.3.0 not now"), Outcome.TEMPORARY, "4.3.0"),
        (dict(final_reply=b"552 5.3.4 too big after all"), Outcome.PERMANENT, "5.3.4"),
        (dict(final_reply=b"450 4.7.1 try later"), Outcome.TEMPORARY, "4.7.1"),
    ],
    ids=["DATA refused", "DATA deferred", "data refused", "data deferred"],
)
def test_replies_to_data_become_results(server: dict[str, bytes], outcome: Outcome, status: str) -> None:
    with wire_server(**server) as wire:
        results = send(wire.port, b"Subject: x\r\n\r\nbody\r\n", rcpts=(RCPT, "other@example.test"))
    assert [r.outcome for r in results] == [outcome, outcome]
    assert {r.reply.status for r in results} == {status}


def test_no_answer_after_the_data_is_a_timeout_and_a_temporary_failure() -> None:
    with wire_server(final_reply=None) as wire:
        (result,) = send(wire.port, b"Subject: x\r\n\r\nbody\r\n", timeout=0.3)
        assert len(wire.phases) == 1  # the data went out in full
    assert result.outcome is Outcome.TEMPORARY
    assert result.reply.text.startswith("lost connection with 127.0.0.1")
    assert result.reply.text.endswith("during data: Timed out waiting for server response")


def test_timed_out_session_is_closed_not_pooled() -> None:
    """After a timeout the session is out of step: the next message gets a new connection."""

    async def run(port: int) -> tuple[list[RcptResult], list[RcptResult]]:
        client = SmtpClient("gw.example.test", 0.3)

        async def hops() -> list[Hop]:
            return [Hop("127.0.0.1", "127.0.0.1", port)]

        async def delivered(_rcpts: Sequence[str]) -> None:
            return None

        tx = Transaction("s@example.org", (RCPT,), b"Subject: x\r\n\r\nbody\r\n")
        first = await client.send("dest", hops, tx, delivered)
        wire.final_reply = b"250 2.0.0 taken"
        second = await client.send("dest", hops, tx, delivered)
        await client.aclose()
        return first, second

    with wire_server(final_reply=None) as wire:
        first, second = eventloop.run(run(wire.port))
    assert [r.outcome for r in first] == [Outcome.TEMPORARY]
    assert [r.outcome for r in second] == [Outcome.DELIVERED]
    assert len(wire.phases) == 2


# ---------------------------------------------------------------- PIPELINING (RFC 2920)


def test_pipelined_transaction_is_one_group_then_the_data() -> None:
    """The server answers MAIL and RCPT only when DATA has come: only a client that sends them
    as one group gets through (a stepwise one would wait for the MAIL reply until it times out)."""
    rcpts = (RCPT, "b@example.test", "c@example.test")
    body = b"Subject: x\r\n\r\n.dot\r\nbody\r\n"
    with wire_server(pipelining=True) as wire:
        first, second = send_all(wire.port, [(body, rcpts), (body, rcpts[:1])], timeout=2.0)
    assert [r.outcome for r in first + second] == [Outcome.DELIVERED] * 4
    assert wire.phases == [b"Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\n"] * 2
    assert wire.sessions == 1  # the second went on the pooled connection, after its RSET


def test_pipelined_replies_count_per_recipient() -> None:
    replies = {
        b"gone@example.test": b"550-5.1.1 no such user\r\n550 5.1.1 here",  # a reply of two lines
        b"busy@example.test": b"450 4.2.1 mailbox busy",
        b"ok@example.test": b"250-fine\r\n250 really",
    }
    with wire_server(pipelining=True, rcpt_replies=replies) as wire:
        results = send(
            wire.port,
            b"Subject: x\r\n\r\nbody\r\n",
            rcpts=("gone@example.test", "busy@example.test", "ok@example.test"),
        )
    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.TEMPORARY, Outcome.DELIVERED]
    assert results[0].reply.code == 550
    assert results[0].reply.status == "5.1.1"
    assert results[0].reply.text == "no such user here"  # both lines, as parse_reply joins them
    assert results[1].reply.status == "4.2.1"
    assert results[2].reply.code == 250
    assert len(wire.phases) == 1


def test_pipelined_mail_refused_refuses_every_recipient_with_its_reply() -> None:
    server = dict(pipelining=True, mail_reply=b"553 5.1.8 sender refused", data_reply=b"503 5.5.1 no valid recipients")
    with wire_server(**server) as wire:
        results = send(wire.port, b"Subject: x\r\n\r\nbody\r\n", rcpts=(RCPT, "b@example.test"))
    assert [(r.outcome, r.reply.status) for r in results] == [(Outcome.PERMANENT, "5.1.8")] * 2
    assert wire.phases == []


def test_data_accepted_without_a_recipient_gets_an_empty_message() -> None:
    """RFC 2920 section 3.1: a server that answers 354 to DATA although it refused every RCPT
    gets a lone dot, nothing of the message, and the session stays in step."""
    refused = {RCPT.encode(): b"550 5.1.1 no such user"}
    body = b"Subject: x\r\n\r\nbody\r\n"
    with wire_server(pipelining=True, rcpt_replies=refused) as wire:
        first, second = send_all(wire.port, [(body, (RCPT,)), (body, ("other@example.test",))])
    assert [(r.outcome, r.reply.status) for r in first] == [(Outcome.PERMANENT, "5.1.1")]
    assert [r.outcome for r in second] == [Outcome.DELIVERED]
    assert wire.phases == [b".\r\n", body + b".\r\n"]
    assert wire.sessions == 1


@pytest.mark.parametrize(
    ("server", "during"),
    [
        (dict(drop_at=b"DATA"), "mail: Unexpected EOF received"),
        (dict(rcpt_replies={RCPT.encode(): b"what?"}), "rcpt: Malformed SMTP response line: what?"),
        (dict(final_reply=None), "data: Timed out waiting for server response"),
    ],
    ids=["connection dropped", "malformed reply", "no reply to the data"],
)
def test_broken_pipelined_session_is_a_temporary_failure_and_not_reused(server: dict[str, Any], during: str) -> None:
    body = b"Subject: x\r\n\r\nbody\r\n"
    with wire_server(pipelining=True, **server) as wire:
        (first,), _second = send_all(wire.port, [(body, (RCPT,)), (body, ("other@example.test",))], timeout=0.5)
        sessions = wire.sessions
    assert first.outcome is Outcome.TEMPORARY
    assert first.reply.text == f"lost connection with 127.0.0.1[127.0.0.1]:{wire.port} during {during}"
    assert sessions == 2  # the next message did not get the broken session


@pytest.mark.parametrize("pipelining", [True, False], ids=["RSET in the group", "RSET alone"])
def test_pooled_session_that_fails_its_rset_is_replaced(pipelining: bool) -> None:
    """A pooled session owes an RSET; one that does not answer it (here: the server hangs up on
    it) is dropped and the message goes on a new session, not deferred."""
    body = b"Subject: x\r\n\r\nbody\r\n"
    with wire_server(pipelining=pipelining, drop_at=b"RSET") as wire:
        first, second = send_all(wire.port, [(body, (RCPT,)), (body, ("other@example.test",))])
    assert [r.outcome for r in first + second] == [Outcome.DELIVERED] * 2
    assert wire.phases == [body + b".\r\n"] * 2
    assert wire.sessions == 2


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining on", "pipelining off"])
def test_pipelining_setting(pipelining: bool) -> None:
    """`[delivery] pipelining = false` sends one command at a time even to a server that offers
    PIPELINING (for a next hop that gets it wrong)."""
    body = b"Subject: x\r\n\r\nbody\r\n"
    with wire_server(pipelining=True, hold=False) as wire:
        (results,) = send_all(wire.port, [(body, (RCPT, "b@example.test"))], pipelining=pipelining)
    assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2
    assert wire.phases == [body + b".\r\n"]
    # Pipelined, MAIL and each RCPT had the rest of the group behind them; otherwise nothing did.
    assert wire.ahead == ([b"MAIL", b"RCPT", b"RCPT"] if pipelining else [])

"""SMTP client adapter: aiosmtplib in, one result per recipient out.

Given the hops of a destination and one transaction (sender, recipients,
bytes), it connects to the first hop that answers, speaks EHLO, STARTTLS
when offered (opportunistic: certificates are not verified and a failed
handshake falls back to plaintext, RFC 3207 section 4.1 and RFC 7435), MAIL
with the SIZE/BODY/SMTPUTF8 parameters the envelope needs and the server
offers, one RCPT per recipient, DATA. aiosmtplib's and the socket's
exceptions never leave this module: inside they become
`TemporaryFailure`/`PermanentFailure`, and `send` returns values.

To a server that offers PIPELINING (RFC 2920), RSET (on a pooled connection),
MAIL, every RCPT and DATA go in one write and their replies are read
afterwards (`_Pipeline`): one round trip where there were up to three plus
one per recipient, then one for the data (Postfix's client pipelines its
envelope the same way). The replies still count one by one, per recipient; a
server without the extension gets one command at a time.

DATA takes a fast path for a message whose every line already ends in CRLF,
as every message the receiver accepted does: the body goes out dot-stuffed by
`wire_data` (a few passes of C-level byte searches) instead of through
aiosmtplib's line-ending normalisation and stuffing regexes, which cost about
six times as much. A message with a bare CR or LF (a DSN, a rebuilt or a
released message could hold one) takes aiosmtplib's own `SMTP.data()`, which
normalises it. The search for one is skipped for a body whose envelope says
it was checked where it was made (`Envelope.crlf_clean`: the receiver's, and
the scanner's rebuilt ones): 70-90 µs of CPU per 82 KB message here.

Connections are kept for reuse per destination (Postfix's connection cache,
`CONNECTION_CACHE_README`): a pooled connection is checked out by exactly one
transaction at a time, and its transaction starts with an RSET, whose reply
both proves the peer still listens and clears any state left over; a session
that fails it is dropped and the transaction goes on another one. Everything
here runs on the delivery service's single event loop, so the pool needs no
lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import aiosmtplib
from aiosmtplib import SMTPResponse, SMTPStatus

from services.delivery.classify import (
    BAD_CONNECTION,
    NEEDS_SMTPUTF8,
    NO_ANSWER,
    TOO_BIG,
    Outcome,
    RcptResult,
    Reply,
    Stage,
    classify,
    failure_reply,
    parse_reply,
    retry_in_next_transaction,
)
from services.delivery.routing import Hop
from shared.crlf import bare_newline
from shared.errors import DeliveryError, PermanentFailure, TemporaryFailure

log = logging.getLogger(__name__)

HopSource = Callable[[], Awaitable[Sequence[Hop]]]
OnDelivered = Callable[[Sequence[str]], Awaitable[None]]

# Characters that must never reach a MAIL/RCPT command line (command injection, RFC 5321 section 4.1.2).
_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
# RFC 5321 section 4.5.2: the mail data ends with a line holding only ".".
_END_OF_DATA = b".\r\n"
_CRLF_END_OF_DATA = b"\r\n.\r\n"
_DOT_LINE = re.compile(rb"\r\n\.")  # a line, not the first, that starts with a dot


@dataclass(frozen=True, slots=True)
class Transaction:
    """What one SMTP transaction carries."""

    mail_from: str
    rcpts: tuple[str, ...]
    body: bytes
    smtputf8: bool = False  # the client that gave us the message asked for SMTPUTF8
    eight_bit: bool = False  # BODY=8BITMIME was given (RFC 6152)
    crlf_clean: bool = False  # the body's line endings were checked where it was made (Envelope.crlf_clean)


def needs_smtputf8(tx: Transaction) -> bool:
    """Does the transaction really need SMTPUTF8 (RFC 6531 section 3.2)? Only when an address
    or the header section is not ASCII; a message merely flagged SMTPUTF8 can go without it."""
    if not tx.mail_from.isascii() or not all(r.isascii() for r in tx.rcpts):
        return True
    end = _HEADER_END.search(tx.body)
    return not tx.body[: end.start() if end else len(tx.body)].isascii()


def wire_data(body: bytes, *, crlf_clean: bool = False) -> list[bytes] | None:
    """The bytes that follow the 354 reply to DATA, as pieces to write in order, when every line
    of `body` ends in CRLF; None when it holds a bare CR or LF (then `SMTP.data()` normalises it).
    `crlf_clean`: the producer of the body checked that already, so it is not searched again.

    RFC 5321 section 4.5.2: a line that starts with "." gets one more, and the data ends with
    ".\r\n" on a line of its own, so a body not ending in CRLF gets one first. The result is
    byte for byte what aiosmtplib sends for the same body; no piece copies the body unless a
    line needs stuffing."""
    if not crlf_clean and bare_newline(body):
        return None
    # Every line but the first starts right after a CRLF, the only line end left. Searching
    # first: the regex engine finds that no line starts with a dot faster than `replace` (46 µs
    # against 70 for a mean corpus message), and almost no message has one.
    stuffed = body.replace(b"\r\n.", b"\r\n..") if _DOT_LINE.search(body) else body
    pieces = [b".", stuffed] if stuffed.startswith(b".") else [stuffed]
    pieces.append(_END_OF_DATA if stuffed.endswith(b"\r\n") else _CRLF_END_OF_DATA)
    return pieces


async def send_wire_data(smtp: aiosmtplib.SMTP, pieces: Sequence[bytes]) -> SMTPResponse:
    """DATA with the message already in its wire form (`wire_data`): `SMTP.data()` without the
    normalisation and stuffing. Raises what `SMTP.data()` raises: SMTPDataError for a reply
    other than 354/250, SMTPServerDisconnected or SMTPTimeoutError (after closing the client,
    whose session is then out of step).

    aiosmtplib has no public call for sending prepared message bytes, so this adapter does what
    `SMTPProtocol.execute_data_command` does with the protocol's public methods: DATA through
    `execute_command` (its 354 read under the command lock), then `write` and `read_response`.
    It relies on two things that tests/integration/test_delivery_data.py pins down against the
    aiosmtplib in use:
    - `read_response` marks a reply as expected before it first yields to the event loop, so
      the reply to the bytes just written is never dropped as unsolicited (there is no await
      between the writes and it);
    - nothing else uses the connection meanwhile: the pool checks a connection out to exactly
      one transaction, so the lock that `execute_data_command` holds between the 354 and the
      final reply guards nothing here.
    """
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    timeout = smtp.timeout
    try:
        start = await protocol.execute_command(b"DATA", timeout=timeout)
        if start.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        for piece in pieces:
            protocol.write(piece)
        response = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise
    if response.code != SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


# A reply line longer than this, or this much without a line end, is not SMTP (aiosmtplib's bounds).
_MAX_REPLY_LINE = 8192
_MAX_REPLY_BUFFER = 4 * _MAX_REPLY_LINE


class _Pipeline(asyncio.Protocol):
    """The replies to commands written as a group (RFC 2920), read in order.

    aiosmtplib reads exactly one reply per command it wrote and drops bytes nobody asked for yet,
    so it cannot take the replies to a group. For the group's duration this protocol takes the
    transport's input instead (asyncio's public `set_protocol`) and gives it back to aiosmtplib's
    protocol on leaving; connection loss and write flow control are passed on to that protocol,
    so aiosmtplib's view of the session stays right. The pool checks a connection out to one
    transaction at a time, so nothing else uses it meanwhile (as with `send_wire_data`).

    Leaving with a reply unread or a partial one buffered means the session is out of step:
    the connection is closed, never pooled again.
    """

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        protocol = smtp.protocol
        if protocol is None or protocol.transport is None or not smtp.is_connected:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._smtp = smtp
        self._protocol = protocol
        self._transport: asyncio.WriteTransport = protocol.transport  # type: ignore[assignment]
        self._timeout = smtp.timeout
        self._buffer = bytearray()
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._error: aiosmtplib.SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def __enter__(self) -> _Pipeline:
        self._transport.set_protocol(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._transport.set_protocol(self._protocol)
        if kind is not None or self._buffer or self._replies or self._error is not None:
            self._smtp.close()

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._protocol.write(data)

    async def reply(self) -> SMTPResponse:
        """The next reply; raises SMTPServerDisconnected, SMTPReadTimeoutError or
        SMTPResponseException (a malformed reply) as aiosmtplib's own reads do."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, self._timeout)
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from None
            finally:
                self._waiter = None
        return self._replies.popleft()

    # ------------------------------------------------ asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("Connection lost"))
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done() and (self._replies or self._error):
            self._waiter.set_result(None)

    def _parse(self) -> None:
        """Move every complete reply out of the buffer (RFC 5321 section 4.2: "250-" lines go
        on, the "250 " line ends the reply; the text is joined with newlines, as aiosmtplib does)."""
        start = 0
        lines: list[bytes] = []
        while (end := self._buffer.find(b"\n", start)) >= 0:
            line = bytes(self._buffer[start : end + 1])
            start = end + 1
            if len(line) > _MAX_REPLY_LINE or not line[:3].isdigit():
                shown = line[:80].decode("utf-8", "replace").strip()
                raise aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response.value, f"Malformed SMTP response line: {shown}"
                )
            lines.append(line)
            if line[3:4] != b"-":
                text = b"\n".join(x[4:].strip(b" \t\r\n") for x in lines)
                self._replies.append(SMTPResponse(int(line[:3]), text.decode("utf-8", "surrogateescape")))
                del self._buffer[:start]
                start = 0
                lines = []
        if len(self._buffer) > _MAX_REPLY_BUFFER:
            raise aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response.value, "Response too long")


def opportunistic_tls_context() -> ssl.SSLContext:
    """TLS for MX delivery: encrypt when offered, never fail on the certificate (RFC 7435)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    hop: Hop
    tls: bool
    opened: float
    idle_since: float = 0.0
    broken: bool = False  # the session state is unknown (timeout, drop): never reuse
    stage: Stage = Stage.MAIL  # the step of the transaction under way, for the error message
    # Taken from the pool: RSET first, which both clears any state left over and proves the
    # peer still listens (a session that fails it is dropped, as Postfix does with its cache).
    rset_due: bool = False


class SmtpClient:
    """Delivers transactions; pools connections per destination. Use from one event loop only."""

    def __init__(
        self,
        helo_name: str,
        timeout: float,
        *,
        tls_context: ssl.SSLContext | None = None,
        max_idle: int = 4,
        idle_time: float = 10.0,
        pipelining: bool = True,
        reuse_time: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # RFC 5321 section 4.1.1.1: EHLO takes an ASCII domain; a U-label name goes as its A-label.
        self._helo = helo_name if helo_name.isascii() else helo_name.encode("idna").decode("ascii")
        self._timeout = timeout
        self._tls = tls_context if tls_context is not None else opportunistic_tls_context()
        # Postfix caches connections for 2 s idle and reuses them for 300 s at most
        # (smtp_connection_cache_time_limit, smtp_connection_reuse_time_limit).
        self._max_idle = max_idle
        self._idle_time = idle_time
        self._reuse_time = reuse_time
        self._clock = clock
        self._pipelining = pipelining  # [delivery] pipelining: use PIPELINING where offered
        self._idle: dict[str, list[_Connection]] = {}
        self._reaper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ public

    async def send(self, key: str, hops: HopSource, tx: Transaction, on_delivered: OnDelivered) -> list[RcptResult]:
        """Deliver `tx` to the destination `key`; one result per recipient, in order.

        `hops` is called only when no pooled connection exists (it may look up DNS
        and raise TemporaryFailure/PermanentFailure). `on_delivered` is awaited
        with the recipients a 250 after DATA covered, before anything else happens.
        """
        while True:
            try:
                conn = await self._checkout(key, hops)
            except _HopsFailed as exc:
                return self._fail_all(tx.rcpts, exc.error, exc.hop)
            except DeliveryError as exc:
                return self._fail_all(tx.rcpts, exc, None)
            try:
                results = await self._transact(conn, tx, on_delivered)
            except _Stale:
                # The pooled session did not take its RSET; nothing of this transaction was
                # done: try the next pooled connection, or a new one when none is left.
                conn.broken = True
                continue
            except BaseException:
                conn.broken = True
                raise
            finally:
                await self._release(key, conn)
            return [results[r] for r in tx.rcpts]

    async def aclose(self) -> None:
        """Close every pooled connection (QUIT, then close) and wait, a few seconds at most, until
        the sockets are closed."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        idle = [c for conns in self._idle.values() for c in conns]
        self._idle.clear()
        protocols = [c.smtp.protocol for c in idle if c.smtp.protocol is not None]
        await asyncio.gather(*(self._quit(c) for c in idle))
        # A TLS session's socket closes only once the peer has answered our close_notify (asyncio's
        # SSL shutdown); an event loop stopped before that (the delivery service stopping) would
        # leave it open. aiosmtplib clears a protocol's transport when the connection is gone but
        # has no callback for it, hence the poll (at shutdown only, bounded).
        deadline = time.monotonic() + min(self._timeout, 5.0)
        while any(p.transport is not None for p in protocols) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------ results

    def _fail_all(self, rcpts: Sequence[str], error: DeliveryError, hop: Hop | None) -> list[RcptResult]:
        outcome, reply = failure_reply(error)
        relay, remote = (hop.relay, hop.host) if hop else ("none", "")
        return [RcptResult(r, outcome, reply, relay, remote) for r in rcpts]

    @staticmethod
    def _result(rcpt: str, conn: _Connection, outcome: Outcome, reply: Reply) -> RcptResult:
        return RcptResult(rcpt, outcome, reply, conn.hop.relay, conn.hop.host)

    # ------------------------------------------------------------ pool

    async def _checkout(self, key: str, hops: HopSource) -> _Connection:
        """A pooled connection, which owes an RSET (the transaction sends it, in its group when
        pipelining), or a new one. Raises _HopsFailed or DeliveryError when none can be had."""
        # Look the pool up again after every await: the reaper may have replaced the list.
        while pool := self._idle.get(key):
            conn = pool.pop()
            if self._usable(conn):
                conn.rset_due = True
                return conn
            await self._quit(conn)
        return await self._connect(await hops())

    def _usable(self, conn: _Connection) -> bool:
        now = self._clock()
        return (
            not conn.broken
            and conn.smtp.is_connected
            and now - conn.opened < self._reuse_time
            and now - conn.idle_since < self._idle_time
        )

    async def _release(self, key: str, conn: _Connection) -> None:
        conn.idle_since = self._clock()
        pool = self._idle.setdefault(key, [])
        if not self._usable(conn) or len(pool) >= self._max_idle:
            await self._quit(conn)
            return
        pool.append(conn)
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    async def _reap(self) -> None:
        """Close connections idle too long, so peers are not left holding them."""
        while any(self._idle.values()):
            await asyncio.sleep(self._idle_time / 2)
            # Sort the pool without awaiting, so no checkout can interleave; then say goodbye.
            expired: list[_Connection] = []
            for key, conns in list(self._idle.items()):
                keep = [c for c in conns if self._usable(c)]
                expired += [c for c in conns if c not in keep]
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
            for conn in expired:
                await self._quit(conn)

    async def _quit(self, conn: _Connection) -> None:
        try:
            if conn.smtp.is_connected and not conn.broken:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    await conn.smtp.quit(timeout=min(self._timeout, 5.0))
        finally:  # also when cancelled mid-QUIT
            conn.smtp.close()

    # ------------------------------------------------------------ session

    async def _connect(self, hops: Sequence[Hop]) -> _Connection:
        """The first hop that greets us and takes EHLO/HELO. RFC 5321 section 5.1: on a
        connection failure or a 4xx (or 5xx, like Postfix's smtp_skip_5xx_greeting) greeting,
        try the next one. Raises _HopsFailed with the best error: temporary if any was."""
        failures: list[tuple[Hop, DeliveryError]] = []
        for hop in hops:
            try:
                return await self._open(hop, tls=True)
            except DeliveryError as exc:
                log.debug("hop %s failed: %s", hop.relay, exc)
                failures.append((hop, exc))
        if not failures:
            raise TemporaryFailure(f"{NO_ANSWER} no host to connect to")
        temporary = [f for f in failures if isinstance(f[1], TemporaryFailure)]
        hop, error = (temporary or failures)[-1]
        raise _HopsFailed(hop, error)

    async def _open(self, hop: Hop, *, tls: bool) -> _Connection:
        smtp = aiosmtplib.SMTP(
            hostname=hop.address,
            port=hop.port,
            local_hostname=self._helo,
            timeout=self._timeout,
            start_tls=False,
            validate_certs=False,
        )
        where = hop.relay
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            raise _reply_error(exc.code, exc.message, Stage.CONNECT) from None
        except aiosmtplib.SMTPConnectTimeoutError:
            smtp.close()
            raise TemporaryFailure(f"{NO_ANSWER} connect to {where}: timed out") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise TemporaryFailure(f"{NO_ANSWER} connect to {where}: {_reason(exc)}") from None
        except BaseException:  # cancelled (job timeout, shutdown) while connecting: no transport left open
            smtp.close()
            raise
        peer = smtp.get_transport_info("peername")
        if peer:
            hop = Hop(hop.host, str(peer[0]), hop.port)
        conn = _Connection(smtp, hop, tls=False, opened=self._clock())
        try:
            await self._hello(conn)
            if tls and smtp.supports_extension("starttls") and not await self._starttls(conn):
                # RFC 7435: a failed opportunistic handshake must not stop delivery;
                # the session is unusable now, so start over in plaintext.
                smtp.close()
                return await self._open(hop, tls=False)
        except BaseException:
            smtp.close()
            raise
        return conn

    async def _hello(self, conn: _Connection) -> None:
        """EHLO, falling back to HELO on a 5xx (RFC 5321 section 3.2)."""
        where = conn.hop.relay
        try:
            response = await conn.smtp.execute_command(b"EHLO", self._helo.encode("ascii"))
            if response.code == 250:
                conn.smtp.last_ehlo_response = response  # parses the extensions
                return
            if response.code // 100 == 5 and conn.smtp.is_connected:
                response = await conn.smtp.execute_command(b"HELO", self._helo.encode("ascii"))
                if response.code == 250:
                    conn.smtp.last_helo_response = response
                    return
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TemporaryFailure(
                f"{BAD_CONNECTION} lost connection with {where} during EHLO: {_reason(exc)}"
            ) from None
        raise _reply_error(response.code, response.message, Stage.HELO)

    async def _starttls(self, conn: _Connection) -> bool:
        """Upgrade the session; True when TLS is on or the server declined (session still usable),
        False when the handshake failed (the session must be dropped)."""
        try:
            await conn.smtp.starttls(tls_context=self._tls, server_hostname=conn.hop.host)
        except aiosmtplib.SMTPResponseException as exc:
            # The server refused STARTTLS with a reply: carry on in plaintext on this session.
            log.info("%s refused STARTTLS (%s %s); continuing without TLS", conn.hop.relay, exc.code, exc.message)
            return conn.smtp.is_connected
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.info("TLS handshake with %s failed (%s); retrying in plaintext", conn.hop.relay, _reason(exc))
            return False
        conn.tls = True
        # RFC 3207 section 4.2: forget what was learnt before TLS and say EHLO again.
        await self._hello(conn)
        return True

    # ------------------------------------------------------------ transaction

    async def _transact(self, conn: _Connection, tx: Transaction, on_delivered: OnDelivered) -> dict[str, RcptResult]:
        """MAIL, RCPTs, DATA. Returns a result for every recipient. Recipients refused with
        "too many recipients" after others were accepted go in the next transaction at once
        (RFC 5321 section 4.5.3.1.10)."""
        results: dict[str, RcptResult] = {}
        required = needs_smtputf8(tx)
        utf8 = (tx.smtputf8 or required) and conn.smtp.supports_extension("smtputf8")
        problem = self._check_capabilities(conn, tx, required, utf8)
        if problem is not None:
            return {r: self._result(r, conn, Outcome.PERMANENT, problem) for r in tx.rcpts}
        attempt = _Attempt(conn, tx, utf8, wire_data(tx.body, crlf_clean=tx.crlf_clean), results)
        # A body with bare line ends goes through SMTP.data(), which normalises it, step by step.
        pipelined = self._pipelining and attempt.pieces is not None and conn.smtp.supports_extension("pipelining")
        send = self._pipelined if pipelined else self._stepwise
        pending = list(tx.rcpts)
        conn.stage = Stage.MAIL
        try:
            if conn.rset_due and not pipelined:
                self._rset(conn, await conn.smtp.execute_command(b"RSET"))
            while pending:
                accepted, again, final = await send(attempt, pending)
                if final is None:  # MAIL or every RCPT refused: nothing was sent
                    break
                self._conclude(results, conn, accepted, final.code, final.message, Stage.DATA)
                if classify(final.code, Stage.DATA) is not Outcome.DELIVERED:
                    break
                await on_delivered(accepted)
                if not again:
                    break
                pending = again
                for rcpt in again:
                    del results[rcpt]
        except (aiosmtplib.SMTPException, OSError) as exc:
            if conn.rset_due:  # the pooled session failed before its RSET was answered: nothing counted
                raise _Stale from None
            conn.broken = True
            why = f"lost connection with {conn.hop.relay} during {conn.stage}: {_reason(exc)}"
            reply = Reply(0, BAD_CONNECTION, why)
            for rcpt in tx.rcpts:
                results.setdefault(rcpt, self._result(rcpt, conn, Outcome.TEMPORARY, reply))
        return results

    async def _stepwise(self, attempt: _Attempt, pending: Sequence[str]) -> _Round:
        """One transaction, a command and its reply at a time. Returns the recipients accepted,
        those to send again in a new transaction, and the reply to the data (None when no data
        was sent); every refused recipient has its result in `attempt.results`."""
        conn, tx, utf8, results, pieces = attempt.conn, attempt.tx, attempt.utf8, attempt.results, attempt.pieces
        conn.stage = Stage.MAIL
        response = await conn.smtp.execute_command(b"MAIL", *self._mail_args(conn, tx, utf8))
        if response.code != 250:
            self._conclude(results, conn, pending, response.code, response.message, Stage.MAIL)
            return [], [], None
        conn.stage = Stage.RCPT
        accepted: list[str] = []
        again: list[str] = []
        for rcpt in pending:
            address = self._rcpt_address(attempt, rcpt)
            if address is not None:
                response = await conn.smtp.execute_command(b"RCPT", b"TO:<" + address + b">")
                self._rcpt_reply(attempt, rcpt, response, accepted, again)
        if not accepted:
            return [], [], None
        conn.stage = Stage.DATA
        try:
            if pieces is None:
                return accepted, again, await conn.smtp.data(tx.body)
            return accepted, again, await send_wire_data(conn.smtp, pieces)
        except aiosmtplib.SMTPDataError as exc:
            return accepted, again, SMTPResponse(exc.code, exc.message)

    async def _pipelined(self, attempt: _Attempt, pending: Sequence[str]) -> _Round:
        """`_stepwise` in two round trips (RFC 2920): MAIL, every RCPT and DATA in one write,
        their replies, then the data and its reply."""
        conn, tx, utf8, results, pieces = attempt.conn, attempt.tx, attempt.utf8, attempt.results, attempt.pieces
        assert pieces is not None
        addresses = {r: a for r in pending if (a := self._rcpt_address(attempt, r)) is not None}
        if not addresses:
            return [], [], None
        group = [b"MAIL " + b" ".join(self._mail_args(conn, tx, utf8))]
        group += [b"RCPT TO:<" + address + b">" for address in addresses.values()]
        group.append(b"DATA")
        if conn.rset_due:
            group.insert(0, b"RSET")
        accepted: list[str] = []
        again: list[str] = []
        with _Pipeline(conn.smtp) as pipe:
            pipe.write(b"".join(command + b"\r\n" for command in group))
            if conn.rset_due:
                self._rset(conn, await pipe.reply())
            conn.stage = Stage.MAIL
            mail = await pipe.reply()
            conn.stage = Stage.RCPT
            for rcpt in addresses:
                response = await pipe.reply()
                if mail.code == 250:
                    self._rcpt_reply(attempt, rcpt, response, accepted, again)
            if mail.code != 250:  # every RCPT was refused for want of a MAIL: MAIL's reply says why
                self._conclude(results, conn, list(addresses), mail.code, mail.message, Stage.MAIL)
            conn.stage = Stage.DATA
            data = await pipe.reply()
            if data.code != SMTPStatus.start_input:
                return (accepted, again, data) if accepted else ([], [], None)
            if not accepted:
                # RFC 2920 section 3.1: DATA accepted without a valid recipient; an empty
                # message ends it, which the server must not deliver to anybody.
                pipe.write(_END_OF_DATA)
                await pipe.reply()
                return [], [], None
            for piece in pieces:
                pipe.write(piece)
            return accepted, again, await pipe.reply()

    @staticmethod
    def _rset(conn: _Connection, response: SMTPResponse) -> None:
        """Conclude the RSET a pooled session owes; raises _Stale unless it got a 250. (A session
        that fails before the reply is _Stale too: `_transact` checks `rset_due`.)"""
        if response.code != 250:
            raise _Stale
        conn.rset_due = False

    def _rcpt_address(self, attempt: _Attempt, rcpt: str) -> bytes | None:
        """The address for RCPT TO; None, with the recipient's result, when it cannot go."""
        address = _address(rcpt, attempt.utf8)
        if address is None:
            reply = Reply(0, "5.1.3", f"recipient address {rcpt!r} cannot be sent over SMTP here")
            attempt.results[rcpt] = self._result(rcpt, attempt.conn, Outcome.PERMANENT, reply)
        return address

    def _rcpt_reply(
        self, attempt: _Attempt, rcpt: str, response: SMTPResponse, accepted: list[str], again: list[str]
    ) -> None:
        """Sort one recipient by the reply to its RCPT: accepted, refused, or refused for now but
        to be sent again in the next transaction."""
        if response.code in (250, 251):
            accepted.append(rcpt)
            return
        self._conclude(attempt.results, attempt.conn, [rcpt], response.code, response.message, Stage.RCPT)
        if accepted and retry_in_next_transaction(response.code, Stage.RCPT):
            again.append(rcpt)

    def _conclude(
        self,
        results: dict[str, RcptResult],
        conn: _Connection,
        rcpts: Sequence[str],
        code: int,
        message: str,
        stage: Stage,
    ) -> None:
        reply = parse_reply(code, message)
        outcome = classify(code, stage)
        for rcpt in rcpts:
            results[rcpt] = self._result(rcpt, conn, outcome, reply)

    @staticmethod
    def _check_capabilities(conn: _Connection, tx: Transaction, required: bool, utf8: bool) -> Reply | None:
        """Refuse up front what the server said it cannot take."""
        limit = conn.smtp.esmtp_extensions.get("size", "")
        if limit.isdigit() and int(limit) > 0 and len(tx.body) > int(limit):
            # RFC 1870 section 6.1: do not send what exceeds the announced SIZE.
            return Reply(0, TOO_BIG, f"message size {len(tx.body)} exceeds size limit {limit} of {conn.hop.relay}")
        if required and not utf8:
            return Reply(0, NEEDS_SMTPUTF8, f"{conn.hop.relay} does not support SMTPUTF8, which this message needs")
        if _address(tx.mail_from, utf8) is None:
            return Reply(0, "5.1.7", f"sender address {tx.mail_from!r} cannot be sent over SMTP")
        return None

    @staticmethod
    def _mail_args(conn: _Connection, tx: Transaction, utf8: bool) -> list[bytes]:
        args = [b"FROM:<" + (_address(tx.mail_from, utf8) or b"") + b">"]
        if conn.smtp.supports_extension("size"):
            args.append(f"SIZE={len(tx.body)}".encode())
        # RFC 6152: declare 8-bit content to servers that take it. A server without
        # 8BITMIME gets the bytes as they are, as most MTAs do rather than bounce.
        if tx.eight_bit and conn.smtp.supports_extension("8bitmime"):
            args.append(b"BODY=8BITMIME")
        if utf8:
            args.append(b"SMTPUTF8")
        return args


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One transaction on one connection: what each of its rounds needs."""

    conn: _Connection
    tx: Transaction
    utf8: bool  # SMTPUTF8 goes with MAIL
    pieces: list[bytes] | None  # the body in its wire form (`wire_data`); None: SMTP.data() normalises it
    results: dict[str, RcptResult]  # filled in as replies come


# A round of a transaction: the recipients accepted, those for the next transaction, the reply
# to the data (None: no data was sent).
_Round = tuple[list[str], list[str], SMTPResponse | None]


class _Stale(Exception):
    """Internal: a pooled session failed its RSET, before any part of the transaction counted."""


class _HopsFailed(Exception):
    """Internal: every hop failed; carries the error to report and the hop that gave it."""

    def __init__(self, hop: Hop, error: DeliveryError) -> None:
        self.hop = hop
        self.error = error
        super().__init__(str(error))


def _address(address: str, utf8: bool) -> bytes | None:
    """The address as it goes between <>, or None when it cannot go (control characters,
    brackets; non-ASCII without SMTPUTF8)."""
    if _BAD_ADDRESS.search(address):
        return None
    if not address.isascii() and not utf8:
        return None
    return address.encode("utf-8")


def _reply_error(code: int, message: str, stage: Stage) -> DeliveryError:
    """A session-level reply (greeting, EHLO) as our error; the hop is reported beside it."""
    reply = parse_reply(code, message)
    error = PermanentFailure if classify(code, stage) is Outcome.PERMANENT else TemporaryFailure
    return error(f"{reply.status} {reply.text}", code=code)


def _reason(exc: BaseException) -> str:
    """A short reason: the socket error's own words ("Connection refused") when there is one."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, OSError) and cause.errno:
        # asyncio words its connect errors "Connect call failed (addr)": the errno says more.
        return os.strerror(cause.errno)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    # aiosmtplib's exceptions carry their words in `message` (str() of a reply error is a tuple).
    text = (exc.message if isinstance(exc, aiosmtplib.SMTPException) else str(exc)).strip()
    return text or type(exc).__name__

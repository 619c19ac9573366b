"""The SMTP session: aiosmtpd's protocol with the receiver's limits built in.

aiosmtpd runs the command loop; this subclass changes what a gateway at the
perimeter cannot leave to it:

- DATA is read by `dataread.read_data` in chunks (fast, smuggling-safe,
  size/line/memory limits) instead of line by line.
- Every reply carries an RFC 3463 enhanced status code: aiosmtpd's own
  strings lack them, so `push` adds one by reply code, in this one place.
- Connections over `max_connections`, or `max_connections_per_client` from
  one address, get `421 4.7.0` instead of the banner and are closed.
- A client gets `max_messages_per_connection` DATA phases, then `421 4.7.0`.
- Any 421 closes the session at once (RFC 5321 §3.8): nothing the client
  pipelined after it is read as a command.
- The idle timer counts from the last bytes received while DATA streams in,
  not only from the last command; on expiry the client is told `421 4.4.2`
  before the close.

The sender/recipient/message decisions are the handler's (`handler.py`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from typing import Any, AnyStr

from aiosmtpd.smtp import MISSING, SMTP, syntax
from aiosmtpd.smtp import Envelope as SessionEnvelope

from services.receiver.dataread import DataResult, read_data
from services.receiver.limits import ConnectionGate, MemoryBudget
from services.receiver.policy import TOO_MANY_MESSAGES, is_relay_client, normalise_ip
from shared import metrics
from shared.config import ReceiverConfig
from shared.logging import bind, event

log = logging.getLogger(__name__)

# The StreamReader's limit: how much DATA one `readuntil` may return before it gives up and
# hands over a slice. Also the reader's flow-control mark (it pauses the socket at twice
# this), so it bounds what an idle or slow session buffers. Command lines stay limited to
# 512 octets (RFC 5321 §4.5.3.1.4) by aiosmtpd's `command_size_limit`.
READ_LIMIT = 32 * 1024

# A reply that already carries an enhanced status code: "250 2.1.0 ..." or "250-2.1.0 ...".
_ENHANCED = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")

# An angle-bracketed address whose domain ends in one dot, and what follows it.
_TRAILING_DOT = re.compile(r"\s*<([^<>]*[^<>.])\.>(.*)", re.DOTALL)

# `<dot-atom@domain> params`, the form nearly every client uses (RFC 5321 §4.1.2), ASCII only.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"\s*<((?:{_ATEXT}\.)*{_ATEXT}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>\s*([^()]*)")


def plain_address(arg: str) -> tuple[str, str] | None:
    """(address, parameters) of a MAIL/RCPT argument in the plain form, else None.

    aiosmtpd parses every address with the email package's RFC 5322 header
    parser, which costs about as much as reading a whole 80 KiB message; for
    the plain form the result is the same (tests compare them), so the
    parser only sees what is unusual.
    """
    m = _PLAIN_ADDRESS.fullmatch(arg)
    return (m.group(1), m.group(2).rstrip()) if m else None


# RFC 3463 (and the RFC 5248 registry) codes for the replies aiosmtpd writes without one.
ENHANCED_BY_CODE = {
    211: "2.0.0",
    214: "2.0.0",
    221: "2.0.0",
    250: "2.0.0",
    251: "2.1.5",
    252: "2.0.0",
    421: "4.3.0",
    450: "4.2.0",
    451: "4.3.0",
    452: "4.3.1",
    454: "4.7.0",
    500: "5.5.2",  # syntax error, command unrecognised, line too long
    501: "5.5.4",  # syntax error in parameters or arguments
    502: "5.5.1",  # command not implemented
    503: "5.5.1",  # bad sequence of commands
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    552: "5.3.4",  # message too big (RFC 1870)
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",  # MAIL/RCPT parameters not recognised (RFC 5321 §4.1.1.11)
}


def with_enhanced_status(reply: str) -> str:
    """`503 Error: need MAIL command` -> `503 5.5.1 Error: need MAIL command`.

    Replies that have a code already are left alone, and so are 1xx and 3xx
    replies (354): RFC 3463 defines classes 2, 4 and 5 only.
    """
    if _ENHANCED.match(reply) or len(reply) < 3 or not reply[:3].isdigit():
        return reply
    code = int(reply[:3])
    if code // 100 not in (2, 4, 5):
        return reply
    status = ENHANCED_BY_CODE.get(code, f"{code // 100}.0.0")
    sep, text = reply[3:4] or " ", reply[4:]
    return f"{code}{sep}{status} {text}".rstrip()


class Transaction(SessionEnvelope):
    """aiosmtpd's per-transaction envelope, plus what our DATA reader produced."""

    def __init__(self) -> None:
        super().__init__()
        self.data: DataResult | None = None


class ReceiverSMTP(SMTP):
    """One SMTP session. `gate` and `budget` are shared by all sessions of a Receiver."""

    line_length_limit = READ_LIMIT

    # aiosmtpd's __init__ finds each session's command and AUTH methods by reflection:
    # `inspect.getmembers(self)` reads every attribute (properties included) and `dir(self)`
    # sorts them all, about a quarter of a millisecond per connection. The names it looks for
    # are the class's own and never change, so `dir()` of a session answers just those.
    _reflected: tuple[str, ...] = ()

    def __dir__(self) -> list[str]:
        cls = type(self)
        if not cls.__dict__.get("_reflected"):
            cls._reflected = tuple(n for n in super().__dir__() if n.startswith(("smtp_", "auth_")))
        return list(cls._reflected)

    def __init__(
        self,
        handler: Any,
        *,
        settings: ReceiverConfig,
        gate: ConnectionGate,
        budget: MemoryBudget,
        sessions: set[ReceiverSMTP] | None = None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        # aiosmtpd keeps these limits in a class-wide dict that every new session clears and
        # every EHLO grows; a dict per session keeps them at RFC 5321 §4.5.3.1.4 plus extensions.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(
            handler,
            data_size_limit=settings.max_message_size,  # advertised as SIZE, checked at MAIL FROM
            enable_SMTPUTF8=True,
            decode_data=False,  # bytes in, bytes stored: 8BITMIME
            hostname=settings.hostname,
            ident=settings.banner,  # the greeting never names the software
            timeout=settings.idle_timeout,
            loop=loop,
        )
        self.settings = settings
        self.client_ip = ""
        self.relay_client = False  # the peer is in [receiver].relay_networks
        self.messages = 0  # DATA phases completed in this session
        self._gate = gate
        self._budget = budget
        self._sessions = sessions
        self._refusal: str | None = None
        self._admitted = False
        self._plain_replies = False  # greeting and EHLO/HELO replies carry no enhanced code (RFC 2034 §3)
        self._streaming = False  # reading DATA: any byte that arrives proves the client is not idle
        self._busy = False  # storing a message: the client waits for us, it is not idle either
        self._last_input = 0.0  # loop time of the last bytes received

    def _create_envelope(self) -> Transaction:
        return Transaction()

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the second call that follows a STARTTLS
            peer = transport.get_extra_info("peername")
            self.client_ip = normalise_ip(str(peer[0])) if peer else ""
            self.relay_client = is_relay_client(self.client_ip, self.settings.relay_networks)
            self._refusal = self._gate.admit(self.client_ip)
            self._admitted = self._refusal is None
            metrics.CONNECTIONS.labels(result="accepted" if self._admitted else "refused").inc()
            if self._admitted:
                metrics.ACTIVE_CONNECTIONS.inc()
            if self._sessions is not None:
                self._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self._gate.leave(self.client_ip)
            metrics.ACTIVE_CONNECTIONS.dec()
        if self._sessions is not None:
            self._sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        bind(peer=self.client_ip)  # this task's context: every line of the session carries it
        if self._refusal is not None:
            event(log, "connection refused", reason=self._refusal, open=self._gate.open)
            await self.push(f"421 4.7.0 {self.hostname} {self._refusal}")
            return
        await super()._handle_client()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task running this session's command loop (None before the connection is made)."""
        task: asyncio.Task[None] | None = self._handler_coroutine
        return task

    def close(self) -> None:
        """End the session now: close the socket and stop the command loop."""
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None and not self._handler_coroutine.done():
            self._handler_coroutine.cancel()

    def data_received(self, data: bytes) -> None:
        self._last_input = self.loop.time()  # cheaper than re-arming the idle timer per read
        super().data_received(data)

    def _timeout_cb(self) -> None:
        # aiosmtpd re-arms the timer per command only. While DATA streams in, count from the
        # last bytes received instead; while we store the message, the wait is ours.
        if self._busy:
            self._reset_timeout()
            return
        quiet = self.loop.time() - self._last_input
        if self._streaming and quiet < self._timeout_duration:
            self._reset_timeout(self._timeout_duration - quiet)
            return
        transport = self.transport
        if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
            return
        event(log, "idle timeout", seconds=self._timeout_duration)
        if transport.get_write_buffer_size():
            transport.abort()  # the client does not even read its replies: no goodbye
            return
        transport.write(f"421 4.4.2 {self.hostname} Idle timeout, closing connection\r\n".encode())
        transport.close()  # connection_lost() then ends the command loop

    # ------------------------------------------------------------ replies

    async def push(self, status: AnyStr) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", "surrogateescape")
        if not self._plain_replies and not text.startswith("220"):
            text = with_enhanced_status(text)
        await super().push(text)
        if text.startswith("421"):
            # RFC 5321 §3.8: 421 closes the channel. Stop here, so no byte the client sent
            # after it is taken for a command.
            self.close()

    # ------------------------------------------------------------ commands

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self.command_size_limits.clear()  # aiosmtpd grows the MAIL limit again on every EHLO
        self._plain_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # `<user@example.test.>`: RFC 5321 domains have no trailing dot, but DNS names may, and
        # we tolerate it; aiosmtpd's strict parser would call the address malformed.
        m = _TRAILING_DOT.match(arg)
        if m:
            arg = f"<{m.group(1)}>{m.group(2)}"
        plain = plain_address(arg)
        if plain is not None:
            return plain
        address: str | None
        params: str | None
        address, params = super()._getaddr(arg)
        return address, params

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.messages >= self.settings.max_messages_per_connection:
            event(log, "session closed", reason=TOO_MANY_MESSAGES.reason, messages=self.messages)
            await self.push(TOO_MANY_MESSAGES.reply())
            return
        await super().smtp_MAIL(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, Transaction)
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._streaming = True
        try:
            result = await read_data(
                self._reader,
                max_size=self.settings.max_message_size,
                max_line_length=self.settings.max_line_length,
                budget=self._budget,
            )
        except asyncio.IncompleteReadError:
            self.close()  # the client left mid-message: nothing to answer
            return
        except Exception:
            # We no longer know where the message ends: reading on could take message bytes
            # for commands. Close rather than guess.
            log.exception("DATA reader failed")
            await self.push(f"421 4.3.0 {self.hostname} Local error, closing connection")
            return
        finally:
            self._streaming = False
        self.messages += 1
        envelope.data = result
        self._busy = True
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            self._busy = False
            self._budget.give(result.reserved)
            self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state
        await self.push("451 4.3.0 Local error in processing" if status is MISSING else status)

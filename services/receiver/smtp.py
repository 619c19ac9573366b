"""The SMTP session: aiosmtpd's protocol with the receiver's limits built in.

aiosmtpd provides the commands (`smtp_*`); this subclass changes what a
gateway at the perimeter cannot leave to it:

- DATA is read by `dataread.read_data` in chunks (fast, smuggling-safe,
  size/line/memory limits) instead of line by line.
- Every reply carries an RFC 3463 enhanced status code: aiosmtpd's own
  strings lack them, so `push` adds one by reply code, in this one place.
- Connections over `max_connections`, or `max_connections_per_client` from
  one address, get `421 4.7.0` instead of the banner and are closed.
- A client gets `max_messages_per_connection` DATA phases, then `421 4.7.0`.
- Any 421 closes the session at once (RFC 5321 §3.8): nothing the client
  pipelined after it is read as a command.
- The idle timer counts from the last command, and while DATA streams in
  from the last bytes received; on expiry the client is told `421 4.4.2`
  before the close.

It also replaces the parts of aiosmtpd that cost the most CPU per message
(`__init__`, `_handle_client`, `push`, `_reset_timeout`, `smtp_QUIT`): the
same behaviour without per-session reflection, per-command logging calls, a
timer re-armed per command, or a socket write per reply line.

The sender/recipient/message decisions are the handler's (`handler.py`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, AnyStr, ClassVar, cast

from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    MISSING,
    SMTP,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    syntax,
)
from aiosmtpd.smtp import Envelope as SessionEnvelope

from services.receiver.dataread import DataResult, read_data
from services.receiver.limits import ConnectionGate, MemoryBudget
from services.receiver.policy import TOO_MANY_MESSAGES, classify_client
from shared import metrics
from shared.config import ReceiverConfig
from shared.logging import bind, event

log = logging.getLogger(__name__)

# Metric children bound once: `.labels()` looks them up under a lock on every call.
_CONNECTIONS_ACCEPTED = metrics.CONNECTIONS.labels(result="accepted")
_CONNECTIONS_REFUSED = metrics.CONNECTIONS.labels(result="refused")

# The StreamReader's limit: how much DATA one `readuntil` may return before it gives up and
# hands over a slice. Also the reader's flow-control mark (it pauses the socket at twice
# this), so it bounds what an idle or slow session buffers. Command lines stay limited to
# 512 octets (RFC 5321 §4.5.3.1.4) by aiosmtpd's `command_size_limit`.
READ_LIMIT = 32 * 1024

# Replies held for a pipelining client before they are written anyway (see push): a client that
# sends commands without reading the answers meets the transport's flow control just as soon.
HELD_REPLIES = 32

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


@dataclass(frozen=True, slots=True)
class _Hooks:
    """What aiosmtpd finds by reflection on a handler, found once per handler class."""

    names: tuple[str, ...]  # the handler's "handle_*" attributes
    ehlo: str | None  # how handle_EHLO is called: "new" (5 arguments), "old" (4), None (absent)


def _reflect(handler: Any) -> _Hooks:
    """aiosmtpd's `SMTP.__init__` reflection over `handler`, with its checks."""
    names = tuple(m for m in dir(handler) if m.startswith("handle_"))
    hook = getattr(handler, "handle_EHLO", None)
    if hook is None:
        return _Hooks(names, None)
    arity = len(inspect.signature(hook).parameters)
    if arity not in (4, 5):
        raise RuntimeError("Unsupported EHLO Hook")
    return _Hooks(names, "new" if arity == 5 else "old")


class ReceiverSMTP(SMTP):
    """One SMTP session. `gate` and `budget` are shared by all sessions of a Receiver."""

    line_length_limit = READ_LIMIT

    # aiosmtpd's __init__ looks up every session's command methods and the handler's hooks by
    # reflection (`inspect.getmembers`, `dir`, `inspect.signature`): about a tenth of a
    # millisecond per connection. They are the same for every session, so they are found once:
    # the commands per class (plain functions, called as `method(self, arg)`; HELP reads their
    # `@syntax` text through the same dict; set below the class), the hooks' names per handler
    # class (bound to the handler per session: a cache of bound methods would keep it alive).
    _reflected: ClassVar[weakref.WeakKeyDictionary[type, _Hooks]] = weakref.WeakKeyDictionary()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._smtp_methods = cls._commands()

    @classmethod
    def _commands(cls) -> dict[str, Callable[..., Awaitable[None]]]:
        return {m.replace("smtp_", ""): getattr(cls, m) for m in dir(cls) if m.startswith("smtp_")}

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
        # What SMTP.__init__(handler, data_size_limit=settings.max_message_size,
        # enable_SMTPUTF8=True, decode_data=False, hostname=settings.hostname,
        # ident=settings.banner, timeout=settings.idle_timeout, loop=loop) sets, attribute for
        # attribute (aiosmtpd 1.4), with the reflection cached. test_smtp.py checks that no
        # attribute SMTP.__init__ sets is missing here.
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(limit=self.line_length_limit, loop=loop),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        hooks = self._reflected.get(type(handler))
        if hooks is None:
            hooks = self._reflected[type(handler)] = _reflect(handler)
        self.__ident__ = settings.banner  # the greeting never names the software
        self.loop = loop
        self.event_handler = handler
        self.data_size_limit = settings.max_message_size  # advertised as SIZE, checked at MAIL FROM
        self.enable_SMTPUTF8 = True
        self._decode_data = False  # bytes in, bytes stored: 8BITMIME
        # aiosmtpd keeps these limits in a class-wide dict that every new session clears and
        # every EHLO grows; a dict per session keeps them at RFC 5321 §4.5.3.1.4 plus extensions.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.hostname = settings.hostname
        self.tls_context = None
        self.require_starttls = None
        self._timeout_duration = settings.idle_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session: Session | None = None
        self.envelope: SessionEnvelope | None = None
        self.transport: asyncio.BaseTransport | None = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._handle_hooks = {name.replace("handle_", ""): getattr(handler, name) for name in hooks.names}
        self._ehlo_hook_ver = hooks.ehlo
        self._enforce_call_limit = False

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
        self._replies: list[bytes] = []  # replies not yet written (see push)
        self._quit = False  # QUIT answered: the command loop ends
        self._streaming = False  # reading DATA: any byte that arrives proves the client is not idle
        self._busy = False  # storing a message: the client waits for us, it is not idle either
        self._last_command = 0.0  # loop time of the last command (the idle timer counts from it)
        self._last_input = 0.0  # loop time of the last bytes received

    @functools.cached_property
    def _auth_methods(self) -> dict[str, _AuthMechAttr]:  # type: ignore[override]
        # aiosmtpd's AUTH mechanisms, by reflection over the session and the handler. Only AUTH
        # and EHLO over TLS read them (no TLS here yet), so they are found on first use.
        # (`inspect.getmembers` as aiosmtpd uses it would read this very property: `dir` names only.)
        methods = {}
        for obj in (self, self.event_handler):
            for mname in dir(obj):
                if mname.startswith("auth_"):
                    mfunc = getattr(obj, mname)
                    name = getattr(mfunc, "__auth_mechanism_name__", mname.replace("auth_", "").replace("__", "-"))
                    methods[name] = _AuthMechAttr(mfunc, obj is self)
        return methods

    def _create_envelope(self) -> Transaction:
        return Transaction()

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # the second call, after a STARTTLS: aiosmtpd's own
            super().connection_made(transport)
            return
        peer = transport.get_extra_info("peername")
        self.client_ip, self.relay_client = classify_client(str(peer[0]) if peer else "", self.settings.relay_networks)
        self._refusal = self._gate.admit(self.client_ip)
        self._admitted = self._refusal is None
        if self._admitted:
            _CONNECTIONS_ACCEPTED.inc()
            metrics.ACTIVE_CONNECTIONS.inc()
        else:
            _CONNECTIONS_REFUSED.inc()
        if self._sessions is not None:
            self._sessions.add(self)
        # aiosmtpd's connection_made for a new connection, less its per-connection log line.
        self.envelope = self._create_envelope()  # _set_rset_state()
        self.session = self._create_session()
        self.session.peer = peer
        self._reset_timeout()
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport
        self._handler_coroutine = self.loop.create_task(self._handle_client())

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self._gate.leave(self.client_ip)
            metrics.ACTIVE_CONNECTIONS.dec()
        if self._sessions is not None:
            self._sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        """The command loop: aiosmtpd's `_handle_client`, leaner.

        The same reading, parsing, limits and error handling, less what costs
        without serving us: its two logging calls per command line (aiosmtpd's
        logger is silenced, and command lines hold addresses), PROXY protocol
        and per-command call limits (never enabled here), and a timer re-armed
        per command (see `_reset_timeout`). Replies are written when the
        client has to wait for them (see `push`), and QUIT ends the loop
        instead of cancelling its own task.
        """
        bind(peer=self.client_ip)  # this task's context: every line of the session carries it
        if self._refusal is not None:
            event(log, "connection refused", reason=self._refusal, open=self._gate.open)
            await self.push(f"421 4.7.0 {self.hostname} {self._refusal}")
            return
        await self.push(f"220 {self.hostname} {self.__ident__}")
        reader = self._reader
        bogus_budget = BOGUS_LIMIT
        while self.transport is not None and not self._quit:
            try:
                if self._replies and (len(self._replies) >= HELD_REPLIES or not self._line_waiting()):
                    await self._flush()  # the next read waits for the client: it needs the replies first
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as error:
                    # Line too long: read to its end, then answer (as aiosmtpd does).
                    await reader.read(error.consumed)
                    while True:
                        try:
                            await reader.readuntil()
                            break
                        except asyncio.LimitOverrunError as e:
                            await reader.read(e.consumed)
                    await self.push("500 Command line too long")
                    continue
                line = line.rstrip(b"\r\n")
                if not line:
                    await self.push("500 Error: bad syntax")
                    continue
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                except UnicodeDecodeError:
                    await self.push("500 Error: bad syntax")
                    continue
                # SMTPUTF8 is on: arguments are UTF-8, other bytes kept by surrogateescape.
                arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
                session = self.session
                assert session is not None
                max_sz = self.command_size_limits[command] if session.extended_smtp else self.command_size_limit
                if len(line) > max_sz:
                    await self.push("500 Command line too long")
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 Command refused due to lack of security")
                    continue
                if self.require_starttls and not self._tls_protocol and command not in ALLOWED_BEFORE_STARTTLS:
                    await self.push("530 Must issue a STARTTLS command first")  # RFC 3207 §4
                    continue
                method = self._smtp_methods.get(command)
                if method is None:
                    event(log, "unrecognised command", level=logging.WARNING, command=command[:40])
                    bogus_budget -= 1
                    if bogus_budget < 1:
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self._write_replies()
                        assert self.transport is not None
                        self.transport.close()
                        return
                    await self.push(f'500 Error: command "{command}" not recognized')
                    continue
                self._reset_timeout()  # a valid command: the client is not idle
                await method(self, arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()  # the connection is gone (or the receiver stops)
                raise
            except Exception as error:
                status = None
                try:
                    status = await self.handle_exception(error)
                except Exception as inner_error:
                    try:
                        log.exception("%s exception in handle_exception()", self.client_ip)
                        status = f"500 Error: ({inner_error.__class__.__name__}) {inner_error}"
                    except Exception:
                        status = "500 Error: Cannot describe error"
                finally:
                    if isinstance(error, TLSSetupException):
                        assert self.transport is not None
                        self.transport.close()
                        self.connection_lost(error)
                    else:
                        await self.push(status if status is not None else "500 Error: Cannot describe error")
        if self._replies and self.transport is not None:
            await self._flush()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task running this session's command loop (None before the connection is made)."""
        return self._handler_coroutine

    def close(self) -> None:
        """End the session now: close the socket and stop the command loop."""
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None and not self._handler_coroutine.done():
            self._handler_coroutine.cancel()

    def data_received(self, data: bytes) -> None:
        self._last_input = self.loop.time()  # cheaper than re-arming the idle timer per read
        super().data_received(data)

    @property
    def _stream_transport(self) -> asyncio.WriteTransport | None:
        # The connection's transport is a stream's: asyncio's, or uvloop's, whose classes do not
        # subclass asyncio's (shared/eventloop.py), so isinstance cannot be asked.
        return cast("asyncio.WriteTransport | None", self.transport)

    # ------------------------------------------------------------ idle timer

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-creates the timer before every command. Recording the time is
        # enough: the one timer, on expiry, looks at how long the client has really been quiet
        # and sleeps again for the rest (`_timeout_cb`).
        self._last_command = self.loop.time()
        if self._timeout_handle is None:
            self._arm(duration or self._timeout_duration)

    def _arm(self, delay: float) -> None:
        self._timeout_handle = self.loop.call_later(delay, self._timeout_cb)

    def _timeout_cb(self) -> None:
        # While DATA streams in, count from the last bytes received; while we store the message,
        # the wait is ours.
        if self._busy:
            self._arm(self._timeout_duration)
            return
        last = max(self._last_command, self._last_input) if self._streaming else self._last_command
        quiet = self.loop.time() - last
        if quiet < self._timeout_duration:
            self._arm(self._timeout_duration - quiet)
            return
        transport = self._stream_transport
        if transport is None or transport.is_closing():
            return
        event(log, "idle timeout", seconds=self._timeout_duration)
        if transport.get_write_buffer_size():
            transport.abort()  # the client does not even read its replies: no goodbye
            return
        self._write_replies()
        transport.write(f"421 4.4.2 {self.hostname} Idle timeout, closing connection\r\n".encode())
        transport.close()  # connection_lost() then ends the command loop

    # ------------------------------------------------------------ replies

    async def push(self, status: AnyStr) -> None:
        """Queue one reply line (aiosmtpd writes and drains each one at once).

        Replies are written together when the client has to wait for them:
        before the command loop waits for more input (or has held
        `HELD_REPLIES`), and at once for a reply the client must see before it
        sends more (3xx: DATA's 354, AUTH's 334; 220: the greeting and
        STARTTLS) and for a 421. A pipelining client (RFC 2920) gets the
        replies to its group in one segment, as §3.2 asks, and nothing is held
        while we wait for the client.
        """
        text = status if isinstance(status, str) else status.decode("utf-8", "surrogateescape")
        if not self._plain_replies and not text.startswith("220"):
            text = with_enhanced_status(text)
        self._replies.append(text.encode("utf-8") + b"\r\n")
        if text.startswith("421"):
            # RFC 5321 §3.8: 421 closes the channel. Stop here, so no byte the client sent
            # after it is taken for a command.
            self._write_replies()
            self.close()
        elif text.startswith(("3", "220")):
            await self._flush()

    def _write_replies(self) -> None:
        if self._replies:
            data = b"".join(self._replies)
            self._replies.clear()
            self._writer.write(data)

    def _line_waiting(self) -> bool:
        """A whole command line is already buffered: reading it will not wait for the client."""
        return b"\n" in self._reader._buffer  # type: ignore[attr-defined]  # aiosmtpd reads it too

    async def _flush(self) -> None:
        """Write the queued replies; wait while the client lets them pile up unread (flow control)."""
        self._write_replies()
        transport = self._stream_transport
        if transport is not None and transport.get_write_buffer_size():
            await self._writer.drain()

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

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str | None) -> None:
        # aiosmtpd's QUIT cancels its own task to leave the loop; returning from it is cheaper.
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        status = await self._call_handler_hook("QUIT")
        await self.push("221 Bye" if status is MISSING else status)
        self._write_replies()
        self._quit = True
        assert self.transport is not None
        self.transport.close()  # after the 221 has gone out

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
        await self.push("354 End data with <CR><LF>.<CR><LF>")  # written at once (see push)
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
            self._last_command = self.loop.time()  # the end of data came: the client was not idle
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


ReceiverSMTP._smtp_methods = ReceiverSMTP._commands()

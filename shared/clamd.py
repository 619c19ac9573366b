"""The clamd adapter: INSTREAM, PING, VERSION and RELOAD over TCP or a Unix socket,
and clamd's replies as typed values.

Shared by the scanner (which scans mail with it) and the updater (which tells
clamd to RELOAD after a signature update and confirms that it did). It speaks
clamd's null-terminated command protocol (clamd(8), "zCOMMAND\\0"), streams
data as INSTREAM chunks of 64 KiB each prefixed by its length in 4 bytes,
network order, and ends with a zero-length chunk. Every call has a deadline
(`timeout`, covering connect, send and reply), connecting is retried a few
times (tenacity, short and in-process: STYLE §4), and every failure leaves as
one of ours:

    ScannerUnavailable   cannot connect, timed out, connection closed, no reply
    ScanLimitExceeded    "INSTREAM size limit exceeded. ERROR" (StreamMaxLength)
    ScanError            any other ERROR reply, or a reply we cannot parse

Infected is not scan-failed (compare rspamd's lua_scanners/clamav.lua): a
reply is OK, FOUND with a signature, or ERROR (`parse_reply`, pure).

Scans reuse connections: each is a clamd session (IDSESSION, clamd(8)), in
which clamd answers every command with "<id>: <reply>", ids counting from 1.
A connection and a session start cost both sides a connect, an accept and a
thread hand-off per scan otherwise. Idle sessions wait in a pool that worker
threads share, one command at a time each, so a reply always belongs to the
one command in flight; its id is checked all the same. clamd ends a session
when no command comes for ReadTimeout, on a refused stream and when it restarts: a session idle for
longer than SESSION_IDLE is not reused, one that answers anything but OK or
FOUND is closed, and a scan whose reused session turns out dead is sent once
more on a new one (scanning has no side effects, so repeating it is safe).
Each command runs on the engine clamd has loaded at that moment, so a RELOAD
applies to open sessions too (tests/integration/test_scanner_clamd.py).
PING, VERSION and RELOAD open a connection of their own.
"""

from __future__ import annotations

import enum
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from shared.errors import ScanError, ScanLimitExceeded, ScannerUnavailable
from shared.metrics import CLAMD_ERRORS, CLAMD_SECONDS

CHUNK_SIZE = 64 * 1024
# Buffers per sendmsg call: well under IOV_MAX (1024 on Linux).
MAX_PIECES = 512
# A reply is one short line; anything longer is not clamd talking.
MAX_REPLY = 64 * 1024
CONNECT_ATTEMPTS = 3
# A pooled session idle for longer is closed instead of reused: clamd ends idle sessions after
# ReadTimeout, the wait for a next command in a session (120 s by default; 60 s in etc/clamav/clamd.conf.in).
SESSION_IDLE = 20.0


class ScanStatus(enum.StrEnum):
    OK = "OK"
    FOUND = "FOUND"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class ScanResult:
    status: ScanStatus
    signature: str = ""  # FOUND: the signature name, e.g. "Eicar-Test-Signature"
    text: str = ""  # the reply as clamd sent it, without the terminator

    @property
    def clean(self) -> bool:
        return self.status is ScanStatus.OK

    @property
    def found(self) -> bool:
        return self.status is ScanStatus.FOUND


# INSTREAM replies "stream: OK" or "stream: Eicar-Test-Signature FOUND"; with
# ExtendedDetectionInfo some versions append "(md5:size)" to the name, and inside an
# IDSESSION every reply is prefixed "<n>: ". Signature names never contain spaces.
_OK = re.compile(r"^(?:\d+: )?stream: OK$")
_FOUND = re.compile(r"^(?:\d+: )?stream: (\S+?)(?:\([0-9a-f]{32,64}:\d+\))? FOUND$")


def parse_reply(reply: bytes) -> ScanResult:
    """One clamd scan reply (terminator included or not) -> ScanResult.

    Anything that is neither "...: OK" nor "...: <name> FOUND" is an ERROR
    result carrying the text, whether clamd said "... ERROR" or something
    unexpected: an unknown reply must never read as clean.
    """
    text = reply.rstrip(b"\0\r\n").decode("utf-8", "replace").strip()
    if _OK.match(text):
        return ScanResult(ScanStatus.OK, text=text)
    found = _FOUND.match(text)
    if found:
        return ScanResult(ScanStatus.FOUND, signature=found.group(1), text=text)
    return ScanResult(ScanStatus.ERROR, text=text or "(empty reply)")


def session_reply(reply: bytes, expected_id: int) -> bytes:
    """A reply inside an IDSESSION ("<id>: <reply>\\0") -> the reply without its id.
    Raises ScanError when the id is not `expected_id`: the session is out of step."""
    ident, sep, rest = reply.partition(b": ")
    if not sep or not ident.isdigit() or int(ident) != expected_id:
        raise ScanError(f"clamd session out of step: expected reply {expected_id}, got {reply[:200]!r}")
    return rest


def is_size_limit(result: ScanResult) -> bool:
    """clamd refused the stream: "INSTREAM size limit exceeded. ERROR" (StreamMaxLength)."""
    return result.status is ScanStatus.ERROR and "size limit exceeded" in result.text.lower()


class ClamdClient:
    """One clamd, addressed as "tcp://host:port" or "unix:///path/to/clamd.sock"."""

    def __init__(
        self, address: str, timeout: float, *, connect_attempts: int = CONNECT_ATTEMPTS, connect_wait: float = 0.1
    ) -> None:
        url = urlsplit(address)
        self.address = address
        self._timeout = timeout
        self._connect_attempts = connect_attempts
        self._connect_wait = connect_wait
        self._family: socket.AddressFamily
        self._target: str | tuple[str, int]
        if url.scheme == "tcp" and url.hostname and url.port:
            self._family = socket.AF_INET6 if ":" in url.hostname else socket.AF_INET
            self._target = (url.hostname, url.port)
        elif url.scheme == "unix" and url.path:
            self._family = socket.AF_UNIX
            self._target = url.path
        else:
            raise ValueError(f"{address!r} is not 'tcp://host:port' or 'unix:///path/to/clamd.sock'")
        self._sessions: list[_Session] = []  # idle, the most recently used last
        self._sessions_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ClamdClient({self.address!r}, timeout={self._timeout})"

    # ---------------------------------------------------------------- commands

    def scan(self, data: bytes) -> ScanResult:
        """Scan `data` with INSTREAM. Returns an OK or FOUND result; raises ScanError otherwise."""
        started = time.monotonic()
        try:
            result = self._in_session(b"INSTREAM", data)
        except ScannerUnavailable:
            CLAMD_ERRORS.labels("unavailable").inc()
            raise
        except ScanError:
            CLAMD_ERRORS.labels("protocol").inc()
            raise
        finally:
            CLAMD_SECONDS.observe(time.monotonic() - started)
        if result.status is ScanStatus.ERROR:
            if is_size_limit(result):
                CLAMD_ERRORS.labels("limit").inc()
                raise ScanLimitExceeded(f"clamd at {self.address} refused the stream: {result.text}")
            CLAMD_ERRORS.labels("error").inc()
            raise ScanError(f"clamd at {self.address} answered {result.text!r}")
        return result

    def ping(self) -> bool:
        """True when clamd answers PING with PONG; never raises."""
        try:
            return self._exchange(b"PING").rstrip(b"\0\n") == b"PONG"
        except ScanError:
            return False

    def version(self) -> str:
        """clamd's "ClamAV <engine>/<database version>/<database date>" line."""
        reply = self._exchange(b"VERSION").rstrip(b"\0\n").decode("utf-8", "replace")
        if not reply.startswith("ClamAV "):
            raise ScanError(f"clamd at {self.address} answered VERSION with {reply!r}")
        return reply

    def reload(self) -> None:
        """Ask clamd to reload its signature databases (it answers before it is done)."""
        reply = self._exchange(b"RELOAD").rstrip(b"\0\n")
        if reply != b"RELOADING":
            raise ScanError(f"clamd at {self.address} answered RELOAD with {reply!r}")

    def close(self) -> None:
        """End the pooled sessions (scans afterwards open new ones)."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.end()

    def __del__(self) -> None:
        # A client dropped without close(): let go of its connections (clamd sees them close).
        for session in getattr(self, "_sessions", ()):
            session.sock.close()

    # ---------------------------------------------------------------- protocol

    def _exchange(self, command: bytes, stream: bytes | None = None) -> bytes:
        """Send one z-command (and INSTREAM data) on a connection of its own; return the reply
        including its terminator."""
        deadline = time.monotonic() + self._timeout
        with self._connect(deadline) as sock:
            return self._talk(sock, command, stream, deadline)

    def _in_session(self, command: bytes, stream: bytes) -> ScanResult:
        """`_exchange` in a pooled session; the reply, parsed."""
        deadline = time.monotonic() + self._timeout
        session = self._take_session()
        if session is not None:
            try:
                return self._session_command(session, command, stream, deadline)
            except ScanError:
                # Ended by clamd while it waited in the pool (closed, or "COMMAND READ TIMED OUT"
                # where the reply should be): once more, on a new session. A clamd that is
                # really broken answers the new one the same way.
                pass
        sock = self._connect(deadline)
        try:
            self._set_timeout(sock, deadline)
            sock.sendall(b"zIDSESSION\0")
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise ScannerUnavailable(f"clamd at {self.address}: {exc}") from None
            raise
        return self._session_command(_Session(sock), command, stream, deadline)

    def _session_command(self, session: _Session, command: bytes, stream: bytes, deadline: float) -> ScanResult:
        """One command in `session`; the session goes back to the pool only after a clean reply."""
        try:
            reply = parse_reply(session_reply(self._talk(session.sock, command, stream, deadline), session.next_id))
        except BaseException:
            session.sock.close()
            raise
        if reply.status is ScanStatus.ERROR:
            session.sock.close()  # clamd may end the session after an error: do not find out later
        else:
            session.next_id += 1
            session.idle_since = time.monotonic()
            with self._sessions_lock:
                self._sessions.append(session)
        return reply

    def _take_session(self) -> _Session | None:
        """The most recently used idle session that clamd has not ended, if any."""
        with self._sessions_lock:
            now = time.monotonic()
            stale = [s for s in self._sessions if now - s.idle_since >= SESSION_IDLE]
            self._sessions = [s for s in self._sessions if now - s.idle_since < SESSION_IDLE]
        for session in stale:
            session.end()
        while True:
            with self._sessions_lock:
                found = self._sessions.pop() if self._sessions else None
            if found is None or found.quiet():
                return found
            found.sock.close()

    def _talk(self, sock: socket.socket, command: bytes, stream: bytes | None, deadline: float) -> bytes:
        """Send one z-command (and INSTREAM data) on `sock`; the reply including its terminator."""
        try:
            self._send(sock, command, stream, deadline)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # clamd closes the connection early when it refuses the stream (StreamMaxLength);
            # the reason is in the reply it sent before closing, if it still reached us.
            try:
                return self._receive(sock, deadline)
            except ScannerUnavailable:
                raise ScannerUnavailable(f"clamd at {self.address} closed the connection: {exc}") from None
        except TimeoutError:
            raise ScannerUnavailable(f"clamd at {self.address}: no progress within {self._timeout:g}s") from None
        except OSError as exc:
            raise ScannerUnavailable(f"clamd at {self.address}: {exc}") from None
        return self._receive(sock, deadline)

    def _send(self, sock: socket.socket, command: bytes, stream: bytes | None, deadline: float) -> None:
        """The command, then the stream as length-prefixed chunks and the zero-length end, in as
        few writes as the kernel allows and without copying the data. Few writes also matter
        for speed: small writes on a connection that lives on would wait for delayed ACKs."""
        pieces: list[bytes | memoryview] = [b"z" + command + b"\0"]
        if stream is not None:
            view = memoryview(stream)
            for offset in range(0, len(view), CHUNK_SIZE):
                chunk = view[offset : offset + CHUNK_SIZE]
                pieces += [struct.pack("!L", len(chunk)), chunk]
            pieces.append(struct.pack("!L", 0))
        for start in range(0, len(pieces), MAX_PIECES):
            self._set_timeout(sock, deadline)
            _send_all(sock, pieces[start : start + MAX_PIECES])

    def _receive(self, sock: socket.socket, deadline: float) -> bytes:
        reply = bytearray()
        while b"\0" not in reply:
            try:
                self._set_timeout(sock, deadline)
                data = sock.recv(4096)
            except TimeoutError:
                raise ScannerUnavailable(f"clamd at {self.address} did not answer within {self._timeout:g}s") from None
            except OSError as exc:
                raise ScannerUnavailable(f"clamd at {self.address}: {exc}") from None
            if not data:
                if reply:
                    # Without its terminator a reply may be cut short: "stream: OK" could be half of anything.
                    raise ScanError(f"clamd at {self.address} sent an unterminated reply {bytes(reply[:200])!r}")
                raise ScannerUnavailable(f"clamd at {self.address} closed the connection without a reply")
            reply += data
            if len(reply) > MAX_REPLY:
                raise ScanError(f"clamd at {self.address} sent more than {MAX_REPLY} bytes of reply")
        return bytes(reply[: reply.index(b"\0") + 1])

    def _set_timeout(self, sock: socket.socket, deadline: float) -> None:
        """Per-operation timeout = what is left of the call's deadline, so a server that
        trickles bytes cannot stretch one call past `timeout`."""
        left = deadline - time.monotonic()
        if left <= 0:
            # Not an OSError on purpose: tenacity must not retry a call whose time is up.
            raise ScannerUnavailable(f"clamd at {self.address} did not answer within {self._timeout:g}s")
        sock.settimeout(left)

    def _connect(self, deadline: float) -> socket.socket:
        def attempt() -> socket.socket:
            sock = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                self._set_timeout(sock, deadline)
                if self._family != socket.AF_UNIX:
                    # Replies and commands are small writes: send them at once, not after an ACK.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(self._target)
            except BaseException:
                sock.close()
                raise
            return sock

        try:
            for retry in Retrying(
                stop=stop_after_attempt(self._connect_attempts),
                wait=wait_exponential(multiplier=self._connect_wait, max=1.0),
                retry=retry_if_exception_type(OSError),
                reraise=True,
            ):
                with retry:
                    return attempt()
        except ScannerUnavailable:
            raise
        except OSError as exc:
            raise ScannerUnavailable(f"cannot connect to clamd at {self.address}: {exc}") from None
        raise AssertionError("unreachable: tenacity either returns or reraises")  # pragma: no cover


class _Session:
    """One connection in an IDSESSION, and the id of its next reply."""

    __slots__ = ("idle_since", "next_id", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.next_id = 1
        self.idle_since = time.monotonic()

    def quiet(self) -> bool:
        """True while clamd has sent nothing since the last reply. Nothing is due from it
        between commands: whatever is there ("COMMAND READ TIMED OUT" before it hangs up
        after ReadTimeout, or the end of the connection) means the session is over."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def end(self) -> None:
        """END the session and close the connection, whatever state either is in."""
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(b"zEND\0")
        except OSError:
            pass
        finally:
            self.sock.close()


def _send_all(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    """sendall() for several buffers (sendmsg may send only part of them)."""
    views = [memoryview(p).cast("B") for p in pieces]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]

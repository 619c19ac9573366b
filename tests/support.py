"""Real peers for tests: a capture SMTP server (the downstream MX), scriptable
to answer 4xx/5xx, plus small helpers. Modelled on Mailman's testing/mta.py."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from bench.peers import free_port

IN_CI = os.environ.get("CI", "") not in ("", "0", "false")


def missing(what: str) -> NoReturn:
    """A real peer is not there: skip on a developer's machine, fail in CI (CI=1).

    CI must never be green because something was quietly not tested (dramatiq's check_rabbitmq)."""
    if IN_CI:
        pytest.fail(f"{what} is not available, and CI must test it")
    pytest.skip(f"{what} is not available here")


EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
TESTFILES = "/usr/share/clamav-testfiles"


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is truthy; for waiting on other processes, not a sleep in disguise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: str


@dataclass
class CaptureHandler:
    """Stores every message; `rcpt_reply`/`data_reply` make it answer 4xx/5xx. It offers
    PIPELINING (RFC 2920) as Postfix and smtpgw's receiver do, unless `pipelining` is False."""

    messages: list[Captured] = field(default_factory=list)
    rcpt_reply: Callable[[str], str | None] = lambda _addr: None
    data_reply: Callable[[Envelope], str | None] = lambda _env: None
    pipelining: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd answers pipelined commands in order but does not say it can.
        return [*responses[:-1], "250-PIPELINING", responses[-1]] if self.pipelining else responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_reply(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.data_reply(envelope)
        if reply:
            return reply
        with self.arrived:
            self.messages.append(
                Captured(
                    envelope.mail_from or "",
                    list(envelope.rcpt_tos),
                    bytes(envelope.original_content or b""),
                    str(session.peer),
                )
            )
            self.arrived.notify_all()
        return "250 2.0.0 OK captured"

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Captured]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.arrived.wait(left)
            return list(self.messages)


@contextlib.contextmanager
def capture_server(
    host: str = "127.0.0.1", port: int = 0, **handler_kwargs: object
) -> Iterator[tuple[CaptureHandler, int]]:
    """A real aiosmtpd server on loopback; yields (handler, port)."""
    handler = CaptureHandler(**handler_kwargs)  # type: ignore[arg-type]
    port = port or free_port(host)
    controller = Controller(handler, hostname=host, port=port, enable_SMTPUTF8=True, data_size_limit=64 * 1024 * 1024)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


class TcpProxy:
    """A TCP forwarder on 127.0.0.1:`listen_port` standing in for a peer (clamd), which a test can
    take down like a stopped daemon (`stop`: the port refuses connections and the open ones are
    cut mid-conversation) and bring back (`start`), or freeze (`pause`: bytes stop flowing, so
    every caller is held mid-call, as by a clamd that hangs) and thaw (`resume`)."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._server: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self.accepted = 0  # connections made since creation
        self.calls = 0  # clamd scans: INSTREAM commands the callers sent
        self._held = 0  # directions of conversations whose bytes a pause holds back right now

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def connections(self) -> int:
        """Conversations open right now."""
        with self._lock:
            return len(self._open) // 2

    def held(self) -> int:
        """Conversations a pause holds mid-call: bytes sent by one side, not passed to the other."""
        with self._lock:
            return self._held

    def start(self) -> TcpProxy:
        server = socket.create_server(("127.0.0.1", self.listen_port))
        self._server = server
        threading.Thread(target=self._serve, args=(server,), daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # Shutdown wakes the thread blocked in accept(); close alone would leave the port listening.
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        with self._lock:
            cut, self._open = self._open, set()
        for sock in cut:
            with contextlib.suppress(OSError):
                # Linger 0: close with a reset, so no socket is left holding the port for a restart.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._flowing.set()  # pipes held by a pause notice their sockets are gone

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
                self.accepted += 1
            for a, b, upward in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, upward), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upward: bool) -> None:
        marker = b"zINSTREAM\0"
        tail = b""  # the end of the last read, for a marker split between two reads
        try:
            while data := src.recv(65536):
                if upward:
                    joined = tail + data
                    tail = joined[-(len(marker) - 1) :]
                    with self._lock:
                        self.calls += joined.count(marker)
                if not self._flowing.is_set():
                    with self._lock:
                        self._held += 1
                    self._flowing.wait()
                    with self._lock:
                        self._held -= 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Either direction ending ends the conversation: the other pipe's recv then fails.
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._open -= {src, dst}

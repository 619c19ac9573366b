"""Real peers for tests: a capture SMTP server (the downstream MX), scriptable
to answer 4xx/5xx, plus small helpers. Modelled on Mailman's testing/mta.py."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

IN_CI = os.environ.get("CI", "") not in ("", "0", "false")


def missing(what: str) -> NoReturn:
    """A real peer is not there: skip on a developer's machine, fail in CI (CI=1).

    CI must never be green because something was quietly not tested (dramatiq's check_rabbitmq)."""
    if IN_CI:
        pytest.fail(f"{what} is not available, and CI must test it")
    pytest.skip(f"{what} is not available here")


EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
TESTFILES = "/usr/share/clamav-testfiles"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


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
    """Stores every message; `rcpt_reply`/`data_reply` make it answer 4xx/5xx."""

    messages: list[Captured] = field(default_factory=list)
    rcpt_reply: Callable[[str], str | None] = lambda _addr: None
    data_reply: Callable[[Envelope], str | None] = lambda _env: None
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(default_factory=threading.Condition)

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

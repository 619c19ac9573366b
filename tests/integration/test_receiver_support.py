"""Helpers for the receiver's integration tests (this module holds no tests).

A real `Receiver` runs on its own event loop thread on 127.0.0.1, port 0, in
front of a real `SpoolTransport` in a tmp dir; the tests talk to it with
stdlib `smtplib` or a raw socket (`RawClient`) and read back what the spool stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

from services.receiver.app import Receiver
from shared import eventloop
from shared.config import Config, HostPort
from shared.envelope import Envelope
from shared.errors import SpoolError
from shared.spool import SpoolTransport, read_file
from shared.transport import Handler, Queue, Transport

ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def make_config(**receiver: Any) -> Config:
    """Defaults, listening on an ephemeral loopback port, with `receiver` keys changed."""
    config = Config()
    settings = dataclasses.replace(config.receiver, listen=HostPort("127.0.0.1", 0), **receiver)
    return dataclasses.replace(config, receiver=settings)


@contextlib.contextmanager
def running(config: Config, transport: Transport) -> Iterator[Receiver]:
    """A started Receiver on an event loop thread; stopped (sessions closed) on exit."""
    loop = eventloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="receiver-loop", daemon=True)
    thread.start()
    receiver = Receiver(config, transport)
    try:
        asyncio.run_coroutine_threadsafe(receiver.start(), loop).result(10)
        yield receiver
    finally:
        asyncio.run_coroutine_threadsafe(receiver.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def stored(spool: SpoolTransport) -> list[tuple[Envelope, bytes]]:
    """Every message on the scan queue: envelope and the stored bytes, read from the spool files."""
    out = []
    for name, _ in spool.list(Queue.SCAN):
        out.append(read_file(os.path.join(spool.root, str(Queue.SCAN), name)))
    return out


class RawClient:
    """SMTP over a plain socket: send exact bytes, read replies line by line."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each send() its own segment
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """One reply line without CRLF; b"" once the server closed the connection."""
        while b"\r\n" not in self._buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                rest, self._buffer = self._buffer, b""
                return rest
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\r\n")
        return line

    def reply(self) -> list[bytes]:
        """All lines of one (possibly multi-line) reply."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return lines

    def code(self) -> int:
        return int(self.reply()[-1][:3])

    def command(self, line: bytes) -> list[bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the server has closed the connection (reads EOF)."""
        return self.line() == b""

    def start(self, sender: bytes = b"<sender@sender.example>", rcpt: bytes = b"<user@example.test>") -> None:
        """Greeting, EHLO, MAIL, RCPT, DATA: up to the 354."""
        assert self.reply()[0].startswith(b"220 ")
        assert self.command(b"EHLO client.example")[-1].startswith(b"250 ")
        assert self.command(b"MAIL FROM:" + sender)[0].startswith(b"250 ")
        assert self.command(b"RCPT TO:" + rcpt)[0].startswith(b"250 ")
        assert self.command(b"DATA")[0].startswith(b"354 ")


class FailingTransport(Transport):
    """A transport whose disk is gone: publish raises like the spool does."""

    def __init__(self, error: Exception | None = None, busy: str | None = None) -> None:
        self.error = error or SpoolError("cannot store message in scan: No space left on device")
        self.busy = busy
        self.attempts: list[Envelope] = []

    def publish(self, queue: Queue, envelope: Envelope, body: bytes) -> None:
        self.attempts.append(envelope)
        raise self.error

    def accepting(self) -> str | None:
        return self.busy

    def consume(self, queue: Queue, handler: Handler, workers: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 30.0) -> None:
        pass

    def depth(self, queue: Queue) -> int:
        return 0

    def wait_idle(self, timeout: float) -> bool:
        return True

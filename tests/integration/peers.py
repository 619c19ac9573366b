"""Real peers for integration tests: a throw-away clamd of our own, and a loopback HTTP
server whose answers a test scripts (good files, errors, truncated transfers).

The throw-away clamd uses the project's clamd.conf.in with its own port, socket and database
directory, in the foreground, so the shared clamd on 127.0.0.1:3310 that other tests use is
never reloaded or disturbed. With the project's tiny signature set it starts in well under a
second.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.clamd import ClamdClient
from tests.support import free_port, missing, wait_until

ROOT = Path(__file__).resolve().parents[2]


def ndb(name: str, pattern: bytes) -> bytes:
    """A ClamAV body signature (.ndb) that finds `pattern` anywhere."""
    return f"{name}:0:*:{pattern.hex()}\n".encode()


@dataclass
class OwnClamd:
    address: str  # tcp://127.0.0.1:<port>
    unix: str  # unix://<base>/clamd.sock
    database_dir: Path
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, timeout: float = 10) -> ClamdClient:
        return ClamdClient(self.address, timeout, connect_attempts=1)


@contextlib.contextmanager
def own_clamd(base: Path, settings: Mapping[str, str] | None = None) -> Iterator[OwnClamd]:
    """clamd with the project's config and signatures, in `base`, on a port of its own, never the
    shared one other tests use. `settings` replaces clamd.conf lines ("AlertExceedsMax": "no")."""
    binary = shutil.which("clamd")
    if binary is None:
        missing("clamd")
    database = base / "clamav"
    database.mkdir(parents=True)
    (base / "tmp").mkdir()
    for sig in (ROOT / "etc" / "clamav").iterdir():
        if sig.suffix in (".hsb", ".ndb", ".ldb", ".hdb"):
            shutil.copy(sig, database)
    port = free_port()
    conf = (ROOT / "etc" / "clamav" / "clamd.conf.in").read_text()
    conf = conf.replace("@VAR@/clamd/clamd.sock", str(base / "clamd.sock")).replace("@PORT@", str(port))
    conf = conf.replace("@VAR@/clamav", str(database)).replace("@TMP@", str(base / "tmp"))
    conf = conf.replace("@VAR@/clamd", str(base)).replace("Foreground no", "Foreground yes")
    for key, value in (settings or {}).items():
        conf, found = re.subn(rf"(?m)^{key} .*$", f"{key} {value}", conf)
        assert found, f"clamd.conf.in has no {key} line"
    (base / "clamd.conf").write_text(conf)
    out = base / "clamd.out"
    with out.open("wb") as output:
        process = subprocess.Popen(
            [binary, f"--config-file={base / 'clamd.conf'}"], stdout=output, stderr=subprocess.STDOUT
        )
    clamd = OwnClamd(f"tcp://127.0.0.1:{port}", f"unix://{base / 'clamd.sock'}", database, process, base / "clamd.log")
    try:
        probe = clamd.client(2)
        if not wait_until(lambda: process.poll() is not None or probe.ping(), timeout=60) or process.poll() is not None:
            pytest.fail(f"clamd did not start: {out.read_text()}")
        yield clamd
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class Response:
    body: bytes = b""
    status: int = 200
    send: int | None = None  # send only this many bytes of the body, then cut the connection
    stall: float = 0.0  # a slow peer: wait this long before answering


@dataclass
class Site:
    """A loopback HTTP server; set `routes[path]` to change what it answers."""

    port: int
    routes: dict[str, Response | list[Response]] = field(
        default_factory=dict
    )  # a list: one per request, the last sticks
    hits: dict[str, int] = field(default_factory=dict)
    stalling: threading.Event = field(default_factory=threading.Event)  # set: slow peers answer at once

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, body: bytes) -> None:
        self.routes[path] = Response(body)


@contextlib.contextmanager
def site() -> Iterator[Site]:
    state = Site(0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that gave up
                self._answer()

        def _answer(self) -> None:
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            route = state.routes.get(self.path, Response(b"not here", 404))
            response = (route.pop(0) if len(route) > 1 else route[0]) if isinstance(route, list) else route
            if response.stall:
                state.stalling.wait(response.stall)
            self.send_response(response.status)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if response.send is None:
                self.wfile.write(response.body)
                return
            self.wfile.write(response.body[: response.send])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stalling.set()
        server.shutdown()
        server.server_close()


class EicarWatch:
    """Scans EICAR with a clamd over and over from a thread: it must be found every time."""

    def __init__(self, clamd: OwnClamd) -> None:
        from services.updater.canary import EICAR

        self._client = clamd.client(10)
        self._eicar = EICAR
        self._stop = threading.Event()
        self.scans = 0
        self.misses: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                result = self._client.scan(self._eicar)
                if not result.found:
                    self.misses.append(result.text)
            except Exception as exc:
                self.misses.append(repr(exc))
            self.scans += 1
            self._stop.wait(0.01)

    def __enter__(self) -> EicarWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

"""The clamd adapter against real clamd processes and against a dummy clamd that
misbehaves on purpose (garbage, silence, refusals; compare rspamd's
test/functional/util/dummy_clam.py). Whatever goes wrong must end as a scan
error and a RetryLater, never as a clean verdict.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

import shared.clamd
from services.scanner.app import build_handler
from shared.clamd import ClamdClient
from shared.config import Config
from shared.envelope import Client, Envelope
from shared.errors import RetryLater, ScanError, ScanLimitExceeded, ScannerUnavailable
from shared.transport import Job, Queue
from tests.integration.peers import OwnClamd, ndb, own_clamd
from tests.support import EICAR, TESTFILES, TcpProxy, free_port, wait_until
from tests.unit.scanner.builders import mail, settings, zip_of

pytestmark = pytest.mark.integration

EMAX = Path(TESTFILES, "clam_cache_emax.tgz")


def job(body: bytes) -> Job:
    env = Envelope(
        "01JCLAMDTEST", datetime.now(UTC), Client("192.0.2.1"), "a@example.org", ("b@example.test",), len(body), ""
    )
    return Job(Queue.SCAN, env, body)


# ---------------------------------------------------------------- the real clamd


def test_real_clamd_commands(clamd_address: str) -> None:
    clamd = ClamdClient(clamd_address, 30)
    assert clamd.ping()
    assert clamd.version().startswith("ClamAV ")
    assert clamd.scan(b"hello").clean
    found = clamd.scan(EICAR)
    assert found.found
    assert found.signature.startswith("Eicar-Test-Signature")


def test_real_clamd_chunks_a_large_stream(clamd_address: str) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17) + EICAR  # many 64 KiB chunks, an odd last one
    # The body signature (smtpgw.ndb) finds EICAR anywhere: only if every chunk arrived, in order.
    assert ClamdClient(clamd_address, 30).scan(data).signature.startswith("Eicar-Test-Signature")
    assert ClamdClient(clamd_address, 30).scan(os.urandom(3 * 65536)).clean


def test_real_clamd_refuses_a_stream_over_its_limit(clamd_address: str) -> None:
    """StreamMaxLength is 40M in the bundled clamd.conf: clamd answers, then closes early."""
    with pytest.raises(ScanLimitExceeded, match="size limit exceeded"):
        ClamdClient(clamd_address, 30).scan(bytes(41 * 1024 * 1024))


def test_emax_archive_is_found_on_its_own(clamd_address: str) -> None:
    result = ClamdClient(clamd_address, 30).scan(EMAX.read_bytes())
    assert result.signature.startswith("Heuristics.Limits.Exceeded")


# ---------------------------------------------------------------- an operator's clamd


@pytest.fixture(scope="module")
def permissive_clamd(clamd_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnClamd]:
    """A second clamd, configured the way an operator might: without AlertExceedsMax, so a
    limit it hits reads as OK. Also the test's Unix socket peer."""
    with own_clamd(tmp_path_factory.mktemp("clamd"), {"AlertExceedsMax": "no"}) as clamd:
        yield clamd


def test_unix_socket(permissive_clamd: OwnClamd) -> None:
    clamd = ClamdClient(permissive_clamd.unix, 30)
    assert clamd.ping()
    assert clamd.version().startswith("ClamAV ")
    assert clamd.scan(EICAR).found
    assert clamd.scan(b"clean").clean


def test_reload(permissive_clamd: OwnClamd) -> None:
    clamd = ClamdClient(permissive_clamd.address, 30)
    clamd.reload()
    assert wait_until(clamd.ping, timeout=30)
    assert clamd.scan(EICAR).found


def test_a_clamd_without_alert_exceeds_max_cannot_pass_the_emax_archive(permissive_clamd: OwnClamd) -> None:
    clamd = ClamdClient(permissive_clamd.address, 30)
    body = mail("see attached\n", [("clam_cache_emax.tgz", EMAX.read_bytes())])
    # This clamd turns its recursion limit into "OK", on its own and inside a message...
    assert clamd.scan(EMAX.read_bytes()).clean
    assert clamd.scan(body).clean
    # ... but the archive filter counts the nesting itself: the message is held.
    [out] = build_handler(Config(), clamd)(job(body))
    assert out.queue is Queue.QUARANTINE
    assert out.envelope.verdicts[0].category == "archive"
    assert "nested more than 10 levels" in out.envelope.verdicts[0].reason


# ---------------------------------------------------------------- clamd gone


def test_clamd_not_listening_means_retry_later() -> None:
    address = f"tcp://127.0.0.1:{free_port()}"
    clamd = ClamdClient(address, 5, connect_wait=0.01)
    assert not clamd.ping()
    with pytest.raises(ScannerUnavailable, match="cannot connect"):
        clamd.scan(b"x")
    handler = build_handler(Config(scanner=settings(clamd=address, retry_delay="7s")), clamd)
    with pytest.raises(RetryLater) as raised:
        handler(job(mail()))
    assert raised.value.delay == 7.0


def test_missing_unix_socket_means_retry_later(tmp_path: Path) -> None:
    clamd = ClamdClient(f"unix://{tmp_path / 'nothing.sock'}", 5, connect_wait=0.01)
    with pytest.raises(ScannerUnavailable):
        clamd.scan(b"x")
    with pytest.raises(RetryLater):
        build_handler(Config(), clamd)(job(mail()))


def test_connect_is_retried_until_clamd_is_back(clamd_address: str) -> None:
    """A clamd restarting: the first connection attempts fail, a later one succeeds."""
    port = free_port()
    target = int(clamd_address.rsplit(":", 1)[1])
    proxy: TcpProxy | None = None

    def open_later() -> None:
        nonlocal proxy
        proxy = TcpProxy(port, target).start()

    clamd = ClamdClient(f"tcp://127.0.0.1:{port}", 10, connect_attempts=20, connect_wait=0.05)
    timer = threading.Timer(0.2, open_later)
    timer.start()
    try:
        assert clamd.scan(EICAR).found
    finally:
        timer.join()
        if proxy is not None:
            proxy.stop()


# ---------------------------------------------------------------- a misbehaving clamd


@dataclass
class DummyClamd:
    """A TCP server that reads the client's command and then does `behave(conn)`."""

    behave: Callable[[socket.socket], None]
    server: socket.socket = field(init=False)
    stop: threading.Event = field(default_factory=threading.Event)
    connections: int = 0

    def __post_init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            conn.recv(10)  # zINSTREAM\0 or the start of it
            self.behave(conn)

    def close(self) -> None:
        self.stop.set()
        self.server.close()


def read_stream(conn: socket.socket) -> None:
    """Consume INSTREAM chunks up to the zero-length terminator."""
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf = (buf + data)[-8:]
        if buf.endswith(b"\0\0\0\0"):
            return


def reply(text: bytes) -> Callable[[socket.socket], None]:
    def behave(conn: socket.socket) -> None:
        read_stream(conn)
        conn.sendall(text)

    return behave


def refuse_early(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"1: INSTREAM size limit exceeded. ERROR\0")


@pytest.fixture
def dummy() -> Iterator[Callable[[Callable[[socket.socket], None]], DummyClamd]]:
    made: list[DummyClamd] = []

    def make(behave: Callable[[socket.socket], None]) -> DummyClamd:
        made.append(DummyClamd(behave))
        return made[-1]

    yield make
    for server in made:
        server.close()


def silent(stop: threading.Event) -> Callable[[socket.socket], None]:
    def behave(conn: socket.socket) -> None:
        read_stream(conn)
        stop.wait(30)  # never answers (until the test is over)

    return behave


def trickle(stop: threading.Event) -> Callable[[socket.socket], None]:
    def behave(conn: socket.socket) -> None:
        read_stream(conn)
        for byte in b"stream: OK" * 100:
            if stop.wait(0.05):
                return
            conn.sendall(bytes([byte]))

    return behave


CASES: list[tuple[str, Callable[[threading.Event], Callable[[socket.socket], None]], type[ScanError], str]] = [
    ("garbage", lambda _: reply(b"HELLO, I AM NOT CLAMD\0"), ScanError, "NOT CLAMD"),
    ("no session id", lambda _: reply(b"stream: OK\0"), ScanError, "out of step"),
    ("wrong session id", lambda _: reply(b"2: stream: OK\0"), ScanError, "out of step"),
    ("bare OK", lambda _: reply(b"1: OK\0"), ScanError, "'OK'"),
    ("unterminated", lambda _: reply(b"1: stream: OK"), ScanError, "unterminated"),
    ("flood", lambda _: reply(b"x" * 200_000), ScanError, "more than"),
    ("error", lambda _: reply(b"1: stream: Can't allocate memory ERROR\0"), ScanError, "allocate memory"),
    ("size limit", lambda _: reply(b"1: INSTREAM size limit exceeded. ERROR\0"), ScanLimitExceeded, "size limit"),
    ("size limit early", lambda _: refuse_early, ScanLimitExceeded, "size limit"),
    ("closes", lambda _: reply(b""), ScannerUnavailable, "without a reply"),
    ("silent", silent, ScannerUnavailable, "did not answer within"),
    ("trickle", trickle, ScannerUnavailable, "did not answer within"),
]


@pytest.mark.parametrize(("name", "make_behaviour", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_misbehaving_clamd_is_a_scan_error_never_a_pass(
    dummy: Callable[[Callable[[socket.socket], None]], DummyClamd],
    name: str,
    make_behaviour: Callable[[threading.Event], Callable[[socket.socket], None]],
    error: type[ScanError],
    match: str,
) -> None:
    stop = threading.Event()
    try:
        server = dummy(make_behaviour(stop))
        clamd = ClamdClient(server.address, 0.5)
        data = os.urandom(300_000) if name == "size limit early" else b"data"
        started = time.monotonic()
        with pytest.raises(error, match=match):
            clamd.scan(data)
        assert time.monotonic() - started < 3
        handler = build_handler(Config(scanner=settings(clamd=server.address)), clamd)
        with pytest.raises(RetryLater):
            handler(job(mail()))
    finally:
        stop.set()


# ---------------------------------------------------------------- counting clamd calls


@pytest.fixture
def proxy(clamd_address: str) -> Iterator[TcpProxy]:
    """Forwards to the real clamd and counts conversations: one connection is one clamd call."""
    p = TcpProxy(free_port(), int(clamd_address.rsplit(":", 1)[1])).start()
    yield p
    p.stop()


def test_a_clean_message_costs_exactly_one_clamd_call(proxy: TcpProxy) -> None:
    handler = build_handler(Config(), ClamdClient(proxy.address, 30))
    body = mail(
        "Hello,\nthe report is attached.\n",
        [("report.pdf", b"%PDF-1.7\n" + os.urandom(50_000)), ("notes.txt", b"notes")],
    )
    [out] = handler(job(body))
    assert out.queue is Queue.DELIVER
    assert out.body is body
    assert proxy.calls == 1


def test_an_archive_attachment_is_also_scanned_alone(proxy: TcpProxy) -> None:
    handler = build_handler(Config(), ClamdClient(proxy.address, 30))
    [out] = handler(job(mail(attachments=[("docs.zip", zip_of([("a.txt", b"a")]))])))
    assert out.queue is Queue.DELIVER
    assert proxy.calls == 2


# ---------------------------------------------------------------- sessions


def test_scans_reuse_one_session(proxy: TcpProxy) -> None:
    clamd = ClamdClient(proxy.address, 30)
    found = [clamd.scan(EICAR if i % 2 else b"clean %d" % i).found for i in range(10)]
    assert found == [i % 2 == 1 for i in range(10)]
    assert (proxy.accepted, proxy.calls) == (1, 10)


def test_threads_share_the_sessions(proxy: TcpProxy) -> None:
    clamd = ClamdClient(proxy.address, 30)
    misses: list[int] = []

    def work(n: int) -> None:
        for i in range(20):
            if clamd.scan(EICAR if (n + i) % 3 == 0 else b"clean").found != ((n + i) % 3 == 0):
                misses.append(n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert misses == []
    assert proxy.calls == 160
    assert proxy.accepted <= 8  # one session per thread at most, reused


def test_a_session_that_clamd_ended_is_replaced_without_an_error(proxy: TcpProxy) -> None:
    """clamd ends sessions after ReadTimeout and when it restarts: the scan goes to a new one."""
    clamd = ClamdClient(proxy.address, 30)
    assert clamd.scan(b"first").clean
    proxy.stop()  # cuts the pooled connection
    proxy.start()
    assert clamd.scan(EICAR).found
    assert proxy.accepted == 2


def test_a_session_idle_too_long_is_ended_not_reused(proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared.clamd, "SESSION_IDLE", 0.0)
    clamd = ClamdClient(proxy.address, 30)
    for _ in range(3):
        assert clamd.scan(b"x").clean
    assert proxy.accepted == 3
    # The two it did not reuse were ENDed (clamd closed them); the last one waits in the pool.
    assert wait_until(lambda: proxy.connections() == 1, timeout=5)
    clamd.close()
    assert wait_until(lambda: proxy.connections() == 0, timeout=5)


def test_a_reload_reaches_sessions_opened_before_it(tmp_path: Path) -> None:
    """A signature update (the updater RELOADs clamd) applies to scans in open sessions."""
    sample = b"smtpgw session reload sample " + os.urandom(16).hex().encode()
    with own_clamd(tmp_path) as own:
        proxy = TcpProxy(free_port(), int(own.address.rsplit(":", 1)[1])).start()
        try:
            clamd = ClamdClient(proxy.address, 30)
            assert clamd.scan(sample).clean
            (own.database_dir / "reload-test.ndb").write_bytes(ndb("Smtpgw.Test.Reload", sample))
            own.client().reload()
            assert wait_until(lambda: clamd.scan(sample).found, timeout=30)
            assert clamd.scan(sample).signature == "Smtpgw.Test.Reload.UNOFFICIAL"
            assert proxy.accepted == 1
        finally:
            proxy.stop()


def test_a_session_clamd_timed_out_is_replaced(tmp_path: Path) -> None:
    """A real clamd ending an idle session (ReadTimeout) before SESSION_IDLE: the next scan
    finds the pooled session dead and goes to a new one, without an error."""
    with own_clamd(tmp_path, {"ReadTimeout": "1"}) as own:
        proxy = TcpProxy(free_port(), int(own.address.rsplit(":", 1)[1])).start()
        try:
            clamd = ClamdClient(proxy.address, 30)
            assert clamd.scan(b"first").clean
            assert wait_until(lambda: proxy.connections() == 0, timeout=10)  # clamd hung up
            assert clamd.scan(EICAR).found
            assert proxy.accepted == 2
        finally:
            proxy.stop()


def test_a_session_that_dies_mid_command_is_retried_on_a_new_one(
    dummy: Callable[[Callable[[socket.socket], None]], DummyClamd],
) -> None:
    """The session looked alive, but clamd had given up on it (what it sends after ReadTimeout
    is "COMMAND READ TIMED OUT" and a newline, no reply): the scan goes to a new session."""

    def first_answers_once(conn: socket.socket) -> None:
        read_stream(conn)
        conn.sendall(b"1: stream: OK\0")
        read_stream(conn)
        conn.sendall(b"COMMAND READ TIMED OUT\n")

    def then_sessions_work(conn: socket.socket) -> None:
        read_stream(conn)
        conn.sendall(b"1: stream: Eicar-Test-Signature FOUND\0")

    behaviours = iter([first_answers_once, then_sessions_work])
    server = dummy(lambda conn: next(behaviours)(conn))
    clamd = ClamdClient(server.address, 5)
    assert clamd.scan(b"first").clean
    assert clamd.scan(EICAR).signature == "Eicar-Test-Signature"
    assert server.connections == 2

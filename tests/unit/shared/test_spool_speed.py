"""What makes the spool fast: group-committed directory fsyncs, in-memory hand-off to this
process's consumers, and datagram notices to consumers in other processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest

from shared import spool
from shared.spool import SpoolTransport
from shared.transport import Job, Queue
from tests.support import wait_until
from tests.unit.shared.test_spool import env


def test_waiting_callers_share_one_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    started: list[int] = []

    def fake_fsync(fd: int) -> None:
        started.append(fd)
        if len(started) == 1:
            assert release.wait(10)

    monkeypatch.setattr(spool.os, "fsync", fake_fsync)
    group = spool._GroupSync(7)
    first = threading.Thread(target=group.sync)
    first.start()
    assert wait_until(lambda: len(started) == 1)
    others = [threading.Thread(target=group.sync) for _ in range(4)]
    for t in others:
        t.start()
    assert wait_until(lambda: group._asked == 5)  # all four took a ticket while the first fsync runs
    release.set()
    for t in [first, *others]:
        t.join(10)
        assert not t.is_alive()
    assert started == [7, 7]  # the first caller's fsync, then one for the four that waited


def test_an_error_reaches_the_caller_and_the_next_caller_tries_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(5, "I/O error")

    monkeypatch.setattr(spool.os, "fsync", failing_once)
    group = spool._GroupSync(3)
    with pytest.raises(OSError, match="I/O error"):
        group.sync()
    group.sync()
    assert calls == [3, 3]


@pytest.fixture
def short_dir() -> Iterator[str]:
    # A Unix socket path holds at most 107 bytes: pytest's tmp_path may be longer.
    path = tempfile.mkdtemp(prefix="spool-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_consumer_in_another_process_hears_of_a_new_file_at_once(short_dir: str) -> None:
    consumer = SpoolTransport(short_dir, rescan=3600)  # no rescan during the test: only the notice
    got = threading.Event()
    consumer.consume(Queue.SCAN, lambda job: (got.set(), [])[1], 1)
    consumer.start()
    try:
        publisher = SpoolTransport(short_dir)
        publisher.publish(Queue.SCAN, env(), b"from another process")
        assert got.wait(5)
        publisher.stop()
    finally:
        consumer.stop()
    assert not os.path.exists(os.path.join(short_dir, "scan.notify"))  # stop() removed its socket


def test_this_process_hands_the_body_over_in_memory(short_dir: str) -> None:
    t = SpoolTransport(short_dir)
    seen: list[Job] = []
    t.consume(Queue.SCAN, lambda job: (seen.append(job), [])[1], 1)
    t.start()
    body = b"x" * 1000
    message = env()
    t.publish(Queue.SCAN, message, body)
    assert t.wait_idle(5)
    t.stop()
    assert seen[0].body is body
    assert seen[0].envelope == message

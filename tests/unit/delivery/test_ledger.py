"""ledger: the file ledger's journal, index, group commit and purge, in a temporary directory.

Crashes of a real process (killed mid-append) and two processes sharing one ledger are in
tests/integration/test_delivery_ledger.py.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.delivery import ledger as ledger_module
from services.delivery.ledger import DeliveryLedger, FileLedger, LedgerError
from tests.support import wait_until


@pytest.fixture
def directory(tmp_path: Path) -> str:
    return str(tmp_path / "delivered")


@pytest.fixture
def ledger(directory: str) -> FileLedger:
    return FileLedger(directory)


def segments(directory: str) -> list[str]:
    journal = os.path.join(directory, "journal")
    return sorted(os.path.join(journal, n) for n in os.listdir(journal) if n.endswith(".journal"))


def age(path: str, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


RECORDS = [("Q1", ["a@example.test"]), ("Q1", ["b@example.test", "Ü@example.test"]), ("Q2.b1", ["a b@example.test"])]


@pytest.mark.parametrize(
    ("queue_id", "rcpt", "expected"),
    [
        ("Q1", "a@example.test", True),
        ("Q1", "b@example.test", True),
        ("Q1", "Ü@example.test", True),
        ("Q1", "c@example.test", False),
        ("Q1", "B@example.test", False),  # local parts are case-sensitive
        ("Q1", "a@example.tes", False),  # whole lines only
        ("Q1", "", False),
        ("Q2", "a@example.test", False),  # per queue id
        ("Q2.b1", "a b@example.test", True),  # a space in a quoted local part
        ("Q2.b1", "b@example.test", False),
        ("Q3", "a@example.test", False),
    ],
)
@pytest.mark.parametrize("reopen", [False, True], ids=["same instance", "rebuilt from the journal"])
def test_record_and_lookup(directory: str, queue_id: str, rcpt: str, expected: bool, reopen: bool) -> None:
    writer = FileLedger(directory)
    for qid, rcpts in RECORDS:
        writer.record(qid, rcpts)
    reader = FileLedger(directory) if reopen else writer
    assert reader.was_delivered(queue_id, rcpt) is expected


@pytest.mark.parametrize("queue_id", ["../escape", "", ".hidden", "a/b", "a b", "x" * 200])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda ledger, qid: ledger.record(qid, ["a@example.test"]), id="record"),
        pytest.param(lambda ledger, qid: ledger.was_delivered(qid, "a@example.test"), id="was_delivered"),
    ],
)
def test_unsafe_queue_ids_are_refused(
    ledger: FileLedger, queue_id: str, call: Callable[[FileLedger, str], object]
) -> None:
    with pytest.raises(ValueError, match="unsafe queue id"):
        call(ledger, queue_id)


def test_nothing_to_record_writes_nothing(ledger: FileLedger, directory: str) -> None:
    backend: DeliveryLedger = ledger  # the interface RedisLedger implements too
    backend.record("Q1", [])
    backend.record("Q1", ["line\nfeed@example.test"])  # cannot be a line; cannot go over SMTP either
    assert segments(directory) == []
    assert not backend.was_delivered("Q1", "line\nfeed@example.test")


def test_torn_last_line_is_not_a_record(directory: str) -> None:
    first = FileLedger(directory)
    first.record("Q1", ["a@example.test"])
    first.close()
    (segment,) = segments(directory)
    with open(segment, "ab") as fh:
        fh.write(b"Q1 b@example.te")  # a crash mid-append
    second = FileLedger(directory)
    assert second.was_delivered("Q1", "a@example.test")
    assert not second.was_delivered("Q1", "b@example.te")
    # Nothing is appended after a torn line: records go to a new segment.
    second.record("Q2", ["c@example.test"])
    assert len(segments(directory)) == 2
    third = FileLedger(directory)
    assert third.was_delivered("Q2", "c@example.test")
    assert not third.was_delivered("Q1", "b@example.te")
    assert not third.was_delivered("Q1", "b@example.teQ2 c@example.test")


def test_a_matching_hash_is_confirmed_against_the_journal(ledger: FileLedger) -> None:
    """The index holds hashes; "delivered" is only ever answered for a line really written."""
    ledger.record("Q1", ["a@example.test"])
    forged = b"Q1 never@example.test"
    (segment,) = ledger._segments.values()
    segment.add(hash(forged))  # as if another line's hash collided with it
    assert segment.may_hold(hash(forged))
    assert not ledger.was_delivered("Q1", "never@example.test")
    assert ledger.was_delivered("Q1", "a@example.test")


@pytest.mark.parametrize(("run_size", "records"), [(4, 3), (4, 4), (4, 37), (65536, 37)])
def test_index_runs_answer_like_the_live_set(
    monkeypatch: pytest.MonkeyPatch, directory: str, run_size: int, records: int
) -> None:
    monkeypatch.setattr(ledger_module, "RUN_SIZE", run_size)
    writer = FileLedger(directory)
    for i in range(records):
        writer.record(f"Q{i}", [f"r{i}@example.test"])
    for ledger in (writer, FileLedger(directory)):
        assert all(ledger.was_delivered(f"Q{i}", f"r{i}@example.test") for i in range(records))
        assert not any(ledger.was_delivered(f"Q{i}", f"r{i + 1}@example.test") for i in range(records))
    (segment,) = writer._segments.values()
    assert len(segment.runs) == records // run_size


def test_segments_rotate_when_full(monkeypatch: pytest.MonkeyPatch, directory: str) -> None:
    monkeypatch.setattr(ledger_module, "SEGMENT_BYTES", 100)
    ledger = FileLedger(directory)
    for i in range(20):
        ledger.record(f"Q{i}", ["someone@example.test"])
    assert len(segments(directory)) > 3
    reopened = FileLedger(directory)
    assert all(reopened.was_delivered(f"Q{i}", "someone@example.test") for i in range(20))


def test_segments_rotate_on_a_new_day(monkeypatch: pytest.MonkeyPatch, directory: str) -> None:
    ledger = FileLedger(directory)
    ledger.record("Q1", ["a@example.test"])
    tomorrow = time.time() + 86400
    monkeypatch.setattr(ledger_module.time, "time", lambda: tomorrow)
    ledger.record("Q2", ["a@example.test"])
    assert len(segments(directory)) == 2
    assert ledger.was_delivered("Q1", "a@example.test")
    assert ledger.was_delivered("Q2", "a@example.test")


def test_another_instance_sees_records_made_after_it_started(directory: str) -> None:
    """Another delivery process on the same spool: what one delivered, the other does not resend."""
    one, two = FileLedger(directory), FileLedger(directory)
    one.record("Q1", ["a@example.test"])
    assert two.was_delivered("Q1", "a@example.test")
    one.record("Q1", ["b@example.test"])  # appended to a segment `two` has read before
    assert two.was_delivered("Q1", "b@example.test")
    two.record("Q2", ["c@example.test"])
    assert one.was_delivered("Q2", "c@example.test")
    one.close()  # its segment is complete now
    assert two.was_delivered("Q1", "a@example.test")
    assert not two.was_delivered("Q1", "c@example.test")


def test_concurrent_records_share_one_flush(monkeypatch: pytest.MonkeyPatch, directory: str) -> None:
    """Group commit: while one sync runs, every record that arrives is written at once (another
    process sees it) and waits for the next sync, which covers them all."""
    ledger = FileLedger(directory)
    flushes: list[int] = []
    release = threading.Event()
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if journal(fd, directory):
            flushes.append(fd)
            if len(flushes) == 1:
                release.wait(10)  # the first flush is slow
        real_fdatasync(fd)

    monkeypatch.setattr(ledger_module.os, "fdatasync", fdatasync)
    threads = [threading.Thread(target=ledger.record, args=(f"Q{i}", ["a@example.test"])) for i in range(8)]
    threads[0].start()
    assert wait_until(lambda: len(flushes) == 1)
    for thread in threads[1:]:
        thread.start()
    reader = FileLedger(directory, fsync=False)
    assert wait_until(lambda: all(reader.was_delivered(f"Q{i}", "a@example.test") for i in range(8)))
    assert len(flushes) == 1
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(flushes) == 2
    reopened = FileLedger(directory)
    assert all(reopened.was_delivered(f"Q{i}", "a@example.test") for i in range(8))


def test_record_returns_only_once_flushed(monkeypatch: pytest.MonkeyPatch, directory: str) -> None:
    order: list[str] = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd: int) -> None:
        if journal(fd, directory):
            order.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(ledger_module.os, "fdatasync", fdatasync)
    ledger = FileLedger(directory)
    ledger.record("Q1", ["a@example.test"])
    order.append("returned")
    assert order == ["fdatasync", "returned"]
    assert FileLedger(directory, fsync=False).was_delivered("Q1", "a@example.test")


def journal(fd: int, directory: str) -> bool:
    """Is `fd` a journal file of the ledger in `directory`? (Fakes of os functions act on those only.)"""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(os.path.join(directory, "journal") + os.sep)
    except OSError:
        return False


def failing_write(directory: str, after: int, err: int = errno.ENOSPC) -> Callable[[int, bytes | memoryview], int]:
    """os.write that writes `after` bytes of its first call on a journal file, then fails."""
    real_write = os.write
    calls: list[int] = []

    def write(fd: int, data: bytes | memoryview) -> int:
        if calls or not journal(fd, directory):
            return real_write(fd, data)
        calls.append(fd)
        if after:
            real_write(fd, bytes(data[:after]))
        raise OSError(err, os.strerror(err))

    return write


def test_a_failed_write_is_an_error_and_the_segment_is_abandoned(
    monkeypatch: pytest.MonkeyPatch, directory: str
) -> None:
    ledger = FileLedger(directory)
    ledger.record("Q1", ["a@example.test"])
    monkeypatch.setattr(ledger_module.os, "write", failing_write(directory, after=5))
    with pytest.raises(LedgerError, match="cannot record delivery of Q2: No space left on device"):
        ledger.record("Q2", ["b@example.test"])
    assert not ledger.was_delivered("Q2", "b@example.test")
    ledger.record("Q3", ["c@example.test"])  # the disk is back: a new segment
    assert len(segments(directory)) == 2
    reopened = FileLedger(directory)
    assert reopened.was_delivered("Q1", "a@example.test")
    assert reopened.was_delivered("Q3", "c@example.test")
    assert not reopened.was_delivered("Q2", "b@example.test")


def test_unreadable_directory_is_a_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(LedgerError, match="cannot open the delivery ledger"):
        FileLedger(str(blocker / "delivered"))


def test_purge_drops_old_segments(directory: str) -> None:
    old = FileLedger(directory)
    old.record("OLD", ["a@example.test", "b@example.test"])
    old.close()
    (old_segment,) = segments(directory)
    age(old_segment, 3)
    ledger = FileLedger(directory)
    ledger.record("NEW", ["a@example.test"])
    assert ledger.purge(datetime.now(UTC) - timedelta(days=1)) == 2
    assert old_segment not in segments(directory)
    assert not ledger.was_delivered("OLD", "a@example.test")
    assert ledger.was_delivered("NEW", "a@example.test")
    assert ledger.purge(datetime.now(UTC) - timedelta(days=1)) == 0


def test_purge_keeps_the_segment_being_written(directory: str) -> None:
    ledger = FileLedger(directory)
    ledger.record("Q1", ["a@example.test"])
    (segment,) = segments(directory)
    age(segment, 3)
    assert ledger.purge(datetime.now(UTC) - timedelta(days=1)) == 0
    assert ledger.was_delivered("Q1", "a@example.test")


def test_another_instance_forgets_what_a_purge_dropped(directory: str) -> None:
    one = FileLedger(directory)
    one.record("OLD", ["a@example.test"])
    one.close()
    two = FileLedger(directory)
    assert two.was_delivered("OLD", "a@example.test")
    age(segments(directory)[0], 3)
    assert FileLedger(directory).purge(datetime.now(UTC) - timedelta(days=1)) == 1
    assert not two.was_delivered("OLD", "a@example.test")


def test_files_of_the_older_layout_are_read_and_purged(directory: str) -> None:
    """Before the journal: one file per queue id, one recipient per line."""
    os.makedirs(directory)
    with open(os.path.join(directory, "LEGACY1"), "wb") as fh:
        fh.write(b"a@example.test\nb@example.te")  # torn last line
    with open(os.path.join(directory, "LEGACY2"), "wb") as fh:
        fh.write(b"c@example.test\n")
    age(os.path.join(directory, "LEGACY1"), 3)
    ledger = FileLedger(directory)
    assert ledger.was_delivered("LEGACY1", "a@example.test")
    assert not ledger.was_delivered("LEGACY1", "b@example.te")
    assert ledger.was_delivered("LEGACY2", "c@example.test")
    assert not ledger.was_delivered("LEGACY3", "c@example.test")
    assert ledger.purge(datetime.now(UTC) - timedelta(days=1)) == 1
    assert not ledger.was_delivered("LEGACY1", "a@example.test")
    assert ledger.was_delivered("LEGACY2", "c@example.test")

"""Spool-specific behaviour the generic transport contract cannot see: the files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.envelope import Client, Envelope, new_queue_id
from shared.errors import EnvelopeDecodeError, RetryLater, SpoolError
from shared.spool import SpoolTransport, pack, read_envelope, read_file, unpack
from shared.transport import MAX_CRASHES, Job, Output, Queue
from tests.support import wait_until


def env(**changes: object) -> Envelope:
    base = Envelope(
        queue_id=new_queue_id(),
        received_at=datetime.now(UTC),
        client=Client("192.0.2.1"),
        mail_from="s@example.org",
        rcpt_to=("r@example.test",),
        size=5,
    )
    return base.replace(**changes)


def files(root: Path, queue: Queue | str) -> list[str]:
    return sorted(os.listdir(root / str(queue)))


@pytest.mark.parametrize("recipients", [1, 500], ids=["small envelope", "envelope past the first read"])
@pytest.mark.parametrize("body", [b"", bytes(range(256)) * 10 + b"\r\n.\r\n"], ids=["empty", "binary"])
def test_pack_read_roundtrip(tmp_path: Path, recipients: int, body: bytes) -> None:
    e = env().replace(rcpt_to=tuple(f"user{n}@example.test" for n in range(recipients)))
    path = tmp_path / "f"
    path.write_bytes(b"".join(pack(e, body)))
    if recipients > 1:  # the envelope does not fit in the first read of the file
        assert len(pack(e, body)[1]) > 4096
    assert read_file(str(path)) == (e, body)
    assert unpack(path.read_bytes()) == (e, body)  # the broker's messages: the same format in memory
    assert read_file(str(path), with_body=False) == (e, b"")
    assert read_envelope(str(path)) == e


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:40], id="cut inside the envelope"),
        pytest.param(lambda data: b"", id="empty"),
        pytest.param(lambda data: b"SMTPGW1 x\n" + data, id="bad length"),
        pytest.param(lambda data: b"From: not a spool file\r\n\r\nhi\r\n", id="not a spool file"),
        pytest.param(lambda data: b"SMTPGW1 " + b"9" * 80 + b"\n{}", id="no line end in the magic line"),
        pytest.param(lambda data: b"SMTPGW1 999999999999999\n{}", id="length far past the end"),
    ],
)
def test_a_damaged_file_is_an_error_not_a_message(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    path = tmp_path / "f"
    path.write_bytes(damage(b"".join(pack(env(), b"body\r\n"))))
    with pytest.raises((EnvelopeDecodeError, ValueError)):
        read_file(str(path))
    with pytest.raises((EnvelopeDecodeError, ValueError)):
        unpack(path.read_bytes())


def test_publish_is_a_complete_file_and_tmp_is_empty(spool_dir: Path) -> None:
    t = SpoolTransport(str(spool_dir))
    e = env()
    t.publish(Queue.SCAN, e, b"hello")
    assert files(spool_dir, Queue.SCAN) == [f"{e.queue_id},0"]
    assert files(spool_dir, "tmp") == []
    assert read_envelope(str(spool_dir / "scan" / f"{e.queue_id},0")) == e
    t.stop()


def test_recovery_keeps_the_newest_generation_and_drops_tmp(spool_dir: Path) -> None:
    """A crash between writing generation 1 and removing generation 0 leaves both: keep 1."""
    t = SpoolTransport(str(spool_dir))
    e = env()
    t.publish(Queue.SCAN, e, b"old")
    (spool_dir / "deliver" / f"{e.queue_id},1").write_bytes(b"".join(pack(e, b"new")))
    (spool_dir / "tmp" / "half-written").write_bytes(b"garbage")
    t.stop()

    seen: list[bytes] = []
    done = threading.Event()

    def handler(job: Job) -> list[Output]:
        seen.append(job.body)
        done.set()
        return []

    t2 = SpoolTransport(str(spool_dir))
    t2.consume(Queue.SCAN, lambda job: pytest.fail("stale generation was processed"), 1)
    t2.consume(Queue.DELIVER, handler, 1)
    t2.start()
    assert done.wait(5)
    assert t2.wait_idle(5)
    t2.stop()
    assert seen == [b"new"]
    assert files(spool_dir, Queue.SCAN) == []
    assert files(spool_dir, "tmp") == []


def test_unchanged_move_is_a_rename_and_changed_step_writes_next_generation(spool_dir: Path) -> None:
    t = SpoolTransport(str(spool_dir))
    e = env()
    t.publish(Queue.SCAN, e, b"body")
    inode = os.stat(spool_dir / "scan" / f"{e.queue_id},0").st_ino
    t.consume(Queue.SCAN, lambda job: [Output(Queue.DELIVER, job.envelope, job.body)], 1)
    t.start()
    assert t.wait_idle(5)
    t.stop()
    moved = spool_dir / "deliver" / f"{e.queue_id},0"
    assert os.stat(moved).st_ino == inode  # renamed, not rewritten

    t = SpoolTransport(str(spool_dir))
    t.consume(Queue.DELIVER, lambda job: [Output(Queue.BOUNCE, job.envelope.replace(attempts=1), job.body)], 1)
    t.start()
    assert t.wait_idle(5)
    t.stop()
    assert files(spool_dir, Queue.DELIVER) == []
    assert files(spool_dir, Queue.BOUNCE) == [f"{e.queue_id},1"]


def test_second_process_cannot_consume_the_same_queue(spool_dir: Path) -> None:
    a = SpoolTransport(str(spool_dir))
    a.consume(Queue.SCAN, lambda job: [], 1)
    a.start()
    b = SpoolTransport(str(spool_dir))
    b.consume(Queue.SCAN, lambda job: [], 1)
    with pytest.raises(SpoolError, match="consumed by another process"):
        b.start()
    a.stop()


def test_files_added_by_another_process_are_picked_up(spool_dir: Path) -> None:
    consumer = SpoolTransport(str(spool_dir), rescan=0.05)
    got = threading.Event()
    consumer.consume(Queue.DELIVER, lambda job: (got.set(), [])[1], 1)
    consumer.start()
    SpoolTransport(str(spool_dir)).publish(Queue.DELIVER, env(), b"from the CLI")
    assert got.wait(5)
    consumer.stop()


def test_unreadable_file_goes_to_dead_not_lost(spool_dir: Path) -> None:
    (spool_dir / "scan").mkdir(exist_ok=True)
    (spool_dir / "scan" / "BROKEN,0").write_bytes(b"this is not a spool file")
    t = SpoolTransport(str(spool_dir))
    t.consume(Queue.SCAN, lambda job: pytest.fail("garbage reached the handler"), 1)
    t.start()
    assert t.wait_idle(5)
    t.stop()
    assert files(spool_dir, Queue.DEAD) == ["BROKEN,0"]


def test_deferred_comes_back_when_due(spool_dir: Path) -> None:
    t = SpoolTransport(str(spool_dir))
    got = threading.Event()
    t.consume(Queue.DELIVER, lambda job: (got.set(), [])[1], 1)
    t.start()
    t.publish(Queue.DEFERRED, env(not_before=datetime.now(UTC) + timedelta(seconds=0.2)), b"x")
    assert files(spool_dir, Queue.DEFERRED)
    assert got.wait(5)
    assert t.wait_idle(5)
    t.stop()
    assert files(spool_dir, Queue.DEFERRED) == []


def test_publish_failure_raises_spool_error(spool_dir: Path) -> None:
    t = SpoolTransport(str(spool_dir))
    shutil.rmtree(spool_dir / "tmp")  # root ignores file modes, so break the spool by removing a directory
    with pytest.raises(SpoolError, match="cannot store"):
        t.publish(Queue.SCAN, env(), b"x")
    assert files(spool_dir, Queue.SCAN) == []
    t.stop()


def test_unreadable_file_reaches_the_dead_consumer_under_a_stand_in(spool_dir: Path) -> None:
    (spool_dir / "scan").mkdir(exist_ok=True)
    (spool_dir / "scan" / "BROKEN,0").write_bytes(b"this is not a spool file")
    t = SpoolTransport(str(spool_dir))
    got: list[Job] = []
    done = threading.Event()
    t.consume(Queue.SCAN, lambda job: pytest.fail("garbage reached the handler"), 1)
    t.consume(Queue.DEAD, lambda job: (got.append(job), done.set(), [])[2], 1)
    t.start()
    assert done.wait(5)
    assert t.wait_idle(5)
    t.stop()
    [job] = got
    assert job.body == b"this is not a spool file"
    assert job.envelope.queue_id.startswith("undecodable-")
    assert job.envelope.rcpt_to == ()
    assert "unreadable spool file" in job.envelope.last_error
    assert files(spool_dir, Queue.DEAD) == []


def test_a_failing_dead_consumer_keeps_the_message_on_dead(spool_dir: Path) -> None:
    t = SpoolTransport(str(spool_dir))
    calls = threading.Event()

    def broken(job: Job) -> list[Output]:
        calls.set()
        raise OSError("quarantine disk full")

    t.consume(Queue.DEAD, broken, 1)
    t.start()
    e = env()
    t.publish(Queue.DEAD, e, b"poison")
    assert calls.wait(5)
    t.stop()
    assert files(spool_dir, Queue.DEAD) == [f"{e.queue_id},0"]


def test_back_pressure_on_scan_backlog(spool_dir: Path) -> None:
    t = SpoolTransport(str(spool_dir), max_scan_queue=2)
    for _ in range(2):
        t.publish(Queue.SCAN, env(), b"x")
    assert t.accepting() is None
    t.publish(Queue.SCAN, env(), b"x")
    assert t.accepting() == "more than 2 messages wait to be scanned"
    t.stop()


def test_back_pressure_when_the_disk_is_nearly_full(spool_dir: Path) -> None:
    st = os.statvfs(spool_dir)
    free = st.f_bavail * st.f_frsize
    roomy, cramped = (
        SpoolTransport(str(spool_dir), min_free=free // 2),
        SpoolTransport(str(spool_dir), min_free=free * 2),
    )
    assert roomy.accepting() is None
    assert cramped.accepting() == "spool disk nearly full"
    roomy.stop()
    cramped.stop()


def test_recovery_keeps_tmp_files_of_living_writers(spool_dir: Path) -> None:
    """Processes share a spool: a consumer starting up must not delete what another one is writing."""
    SpoolTransport(str(spool_dir)).stop()
    sleeper = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        (spool_dir / "tmp" / f"A,0.{sleeper.pid}.1").write_bytes(b"being written")
        (spool_dir / "tmp" / f"B,0.{dead.pid}.1").write_bytes(b"left by a crash")
        (spool_dir / "tmp" / "garbage").write_bytes(b"?")
        t = SpoolTransport(str(spool_dir))
        t.consume(Queue.SCAN, lambda job: [], 1)
        t.start()
        t.stop()
        assert files(spool_dir, "tmp") == [f"A,0.{sleeper.pid}.1"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_publish_only_process_does_not_recover(spool_dir: Path) -> None:
    SpoolTransport(str(spool_dir)).stop()
    (spool_dir / "tmp" / "left,0.999999999.1").write_bytes(b"x")
    t = SpoolTransport(str(spool_dir))
    t.start()  # no consumers: a receiver
    t.stop()
    assert files(spool_dir, "tmp") == ["left,0.999999999.1"]


# ---------------------------------------------------------------- a process that dies mid-job

DYING_CONSUMER = """
import os, sys, threading, time
from shared.errors import RetryLater
from shared.spool import SLOT, SpoolTransport
from shared.transport import Queue

waiting = threading.Event()

def jobs_in_handlers():
    with open(os.path.join(sys.argv[1], "scan.inflight"), "rb") as fh:
        data = fh.read()
    return sum(1 for i in range(0, len(data), SLOT) if data[i : i + SLOT].strip(b"\\0"))

def handler(job):
    os.write(1, f"working {job.envelope.queue_id} {job.redeliveries}\\n".encode())  # one write per line
    if job.body == b"waits":
        waiting.set()
        raise RetryLater("not yet", 60)  # queued, but not in a handler when the process dies
    waiting.wait(10)
    # Until the waiter's worker has finished with it (its record cleared), the waiter is still
    # being handled, and dying now would rightly count against it too.
    deadline = time.monotonic() + 10
    while jobs_in_handlers() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    os._exit(17)  # dies mid-job: no outputs, the file stays in scan

transport = SpoolTransport(sys.argv[1])
transport.consume(Queue.SCAN, handler, 2)
transport.start()
threading.Event().wait(20)
"""


def _run_dying_consumer(root: Path) -> set[str]:
    """Run a consumer of scan in a process that dies in its handler; what its handler printed."""
    child = subprocess.run(
        [sys.executable, "-c", DYING_CONSUMER, str(root)],
        cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    assert child.returncode == 17, child.stderr
    return set(child.stdout.splitlines())


def test_a_job_that_keeps_killing_its_process_ends_in_dead(spool_dir: Path) -> None:
    """As the broker's x-delivery-count does: a job whose process died under it counts a crash;
    a job waiting for a retry when it died does not."""
    killer, waiter = env(), env()
    publisher = SpoolTransport(str(spool_dir))
    publisher.publish(Queue.SCAN, killer, b"kills")
    publisher.publish(Queue.SCAN, waiter, b"waits")
    for crash in range(MAX_CRASHES):
        assert _run_dying_consumer(spool_dir) == {
            f"working {killer.queue_id} {crash}",
            f"working {waiter.queue_id} 0",
        }
    seen: list[Job] = []
    t = SpoolTransport(str(spool_dir))
    t.consume(Queue.SCAN, lambda job: (seen.append(job), [])[1], 1)
    t.start()
    assert t.wait_idle(10)
    t.stop()
    # The killer was not handed to a handler a fourth time; the waiter went on as usual.
    assert [(j.envelope.queue_id, j.redeliveries) for j in seen] == [(waiter.queue_id, 0)]
    assert files(spool_dir, Queue.DEAD) == [f"{killer.queue_id},1"]
    dead, body = read_file(str(spool_dir / "dead" / f"{killer.queue_id},1"))
    assert body == b"kills"
    assert dead == killer.replace(last_error=f"scan: interrupted {MAX_CRASHES} times (the process handling it ended)")
    assert files(spool_dir, Queue.SCAN) == []
    assert (spool_dir / "scan.crashes").read_text() == f"{killer.queue_id},0 {MAX_CRASHES}\n"  # until a start


def test_a_job_interrupted_once_is_a_redelivery_and_a_clean_stop_counts_nothing(spool_dir: Path) -> None:
    killer, waiter = env(), env()
    publisher = SpoolTransport(str(spool_dir))
    publisher.publish(Queue.SCAN, killer, b"kills")
    publisher.publish(Queue.SCAN, waiter, b"waits")
    _run_dying_consumer(spool_dir)
    for _ in range(2):  # the second start, after a clean stop: still the one interruption
        seen: dict[str, int] = {}

        def handler(job: Job, seen: dict[str, int] = seen) -> list[Output]:
            seen[job.envelope.queue_id] = job.redeliveries
            raise RetryLater("later", 60)

        t = SpoolTransport(str(spool_dir))
        t.consume(Queue.SCAN, handler, 2)
        t.start()
        assert wait_until(lambda seen=seen: len(seen) == 2, timeout=5)
        t.stop()  # lets the workers finish: their records are cleared
        assert seen == {killer.queue_id: 1, waiter.queue_id: 0}
    assert files(spool_dir, Queue.SCAN) == sorted([f"{killer.queue_id},0", f"{waiter.queue_id},0"])
    # Names no longer queued leave the counts at the next start.
    (spool_dir / "scan" / f"{killer.queue_id},0").unlink()
    t = SpoolTransport(str(spool_dir))
    t.consume(Queue.SCAN, lambda job: [], 1)
    t.start()
    t.stop()
    assert (spool_dir / "scan.crashes").read_text() == ""

"""quarantine.app: filing held and poison messages, and where a release sends them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.quarantine.app import Quarantine, origin_of, release
from services.quarantine.store import QuarantineError
from shared.config import load_config
from shared.envelope import Action, Client, Envelope, Verdict, new_queue_id
from shared.errors import RetryLater
from shared.spool import SpoolTransport
from shared.transport import Job, Queue

VIRUS = Verdict("virus", "virus", Action.QUARANTINE, "Eicar-Test-Signature FOUND")


def env(**changes: object) -> Envelope:
    return Envelope(
        queue_id=new_queue_id(),
        received_at=datetime.now(UTC),
        client=Client("192.0.2.7", "bad.example"),
        mail_from="s@example.org",
        rcpt_to=("r@example.test",),
        size=4,
    ).replace(**changes)


@pytest.fixture
def quarantine(tmp_path: Path) -> Quarantine:
    return Quarantine(load_config(env={"SMTPGW_QUARANTINE__DIR": str(tmp_path / "q")}))


@pytest.mark.parametrize(
    ("last_error", "queue"),
    [
        ("scan: RuntimeError: parser exploded", Queue.SCAN),
        ("deliver: interrupted 3 times (consumer died or lost its broker connection)", Queue.DELIVER),
        ("bounce: KeyError: 'x'", Queue.BOUNCE),
        ("quarantine: OSError", Queue.QUARANTINE),
        ("gw.deliver: dead-lettered by the broker (delivery_limit, 1 time(s))", Queue.SCAN),
        ("dead: undecodable frame", Queue.SCAN),
        ("", Queue.SCAN),
    ],
)
def test_origin_of_never_skips_the_scanner_when_in_doubt(last_error: str, queue: Queue) -> None:
    assert origin_of(env(last_error=last_error)) == queue


def test_dead_message_is_filed_under_dead_with_its_reason(quarantine: Quarantine) -> None:
    # Even one the scanner had held back (a virus verdict) is filed as dead: that is where it ended.
    poison = env(verdicts=(VIRUS,), last_error="quarantine: OSError: [Errno 28] No space left on device")
    assert quarantine.handle_dead(Job(Queue.DEAD, poison, b"raw")) == []
    (entry,) = quarantine.store.entries()
    assert (entry.category, entry.reason) == ("dead", poison.last_error)
    assert quarantine.store.read(poison.queue_id)[1] == b"raw"
    # A redelivered dead job stores it again in place: still one entry.
    quarantine.handle_dead(Job(Queue.DEAD, poison, b"raw", redeliveries=1))
    assert len(list(quarantine.store.entries())) == 1


def test_a_store_that_cannot_take_it_makes_the_job_wait(quarantine: Quarantine, tmp_path: Path) -> None:
    (tmp_path / "q").write_text("a file where the store's directory should be")
    with pytest.raises(RetryLater, match="cannot store"):
        quarantine.handle(Job(Queue.QUARANTINE, env(verdicts=(VIRUS,)), b"raw"))
    with pytest.raises(RetryLater, match="cannot store"):
        quarantine.handle_dead(Job(Queue.DEAD, env(last_error="scan: x"), b"raw"))


@pytest.mark.parametrize(
    ("last_error", "queue"), [("scan: RuntimeError: boom", Queue.SCAN), ("deliver: KeyError", Queue.DELIVER)]
)
def test_release_of_a_dead_message_goes_back_where_it_died(
    quarantine: Quarantine, tmp_path: Path, last_error: str, queue: Queue
) -> None:
    poison = env(last_error=last_error)
    quarantine.handle_dead(Job(Queue.DEAD, poison, b"raw"))
    spool = SpoolTransport(str(tmp_path / "spool"), fsync=False)
    try:
        release(quarantine.store, spool, poison.queue_id)
        [(_, released)] = spool.list(queue)
    finally:
        spool.stop()
    assert released == poison.replace(last_error="")  # no "released" verdict: it is simply tried again
    assert list(quarantine.store.entries()) == []


def test_an_undecodable_dead_message_cannot_be_released(quarantine: Quarantine, tmp_path: Path) -> None:
    garbage = env(queue_id="undecodable-0123456789abcdef01234567", rcpt_to=(), last_error="scan: not a spool file")
    quarantine.handle_dead(Job(Queue.DEAD, garbage, b"\x00junk"))
    spool = SpoolTransport(str(tmp_path / "spool"), fsync=False)
    try:
        with pytest.raises(QuarantineError, match="can only be deleted"):
            release(quarantine.store, spool, garbage.queue_id)
    finally:
        spool.stop()
    assert [e.queue_id for e in quarantine.store.entries()] == [garbage.queue_id]

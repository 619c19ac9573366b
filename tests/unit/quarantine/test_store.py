from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.quarantine.app import Quarantine, release
from services.quarantine.store import QuarantineError, QuarantineStore, category_of
from shared.config import load_config
from shared.envelope import Action, Client, Envelope, Verdict, new_queue_id
from shared.spool import SpoolTransport
from shared.transport import Job, Queue


def env(*verdicts: Verdict, **changes: object) -> Envelope:
    return Envelope(
        queue_id=new_queue_id(),
        received_at=datetime.now(UTC),
        client=Client("192.0.2.7", "bad.example"),
        mail_from="s@example.org",
        rcpt_to=("r@example.test",),
        size=4,
        verdicts=verdicts,
    ).replace(**changes)


VIRUS = Verdict("virus", "virus", Action.QUARANTINE, "Eicar-Test-Signature FOUND")
CLEAN = Verdict("attachments", "clean", Action.DELIVER, "")


@pytest.mark.parametrize(
    ("verdicts", "changes", "expected"),
    [
        ((CLEAN, VIRUS), {}, "virus"),
        ((Verdict("archives", "encrypted", Action.QUARANTINE, "password"),), {}, "encrypted"),
        ((Verdict("attachments", "attachment", Action.STRIP, "x.exe"),), {}, "attachment"),
        ((), {"last_error": "scan: crashed"}, "dead"),
        ((CLEAN,), {}, "other"),
    ],
)
def test_category_of(verdicts: tuple[Verdict, ...], changes: dict[str, object], expected: str) -> None:
    assert category_of(env(*verdicts, **changes)) == expected


def test_put_list_show_delete(tmp_path: Path) -> None:
    store = QuarantineStore(str(tmp_path))
    e = env(VIRUS)
    store.put(e, b"Subject: x\r\n\r\nbody")
    [entry] = list(store.entries())
    assert (entry.queue_id, entry.category, entry.envelope) == (e.queue_id, "virus", e)
    assert "Eicar" in entry.reason
    assert store.read(e.queue_id)[1] == b"Subject: x\r\n\r\nbody"
    assert list(store.entries("attachment")) == []
    store.delete(e.queue_id)
    assert list(store.entries()) == []
    with pytest.raises(QuarantineError):
        store.get(e.queue_id)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "a/b", "", ".hidden"])
def test_unsafe_ids_are_refused(tmp_path: Path, bad: str) -> None:
    store = QuarantineStore(str(tmp_path))
    with pytest.raises(QuarantineError):
        store.put(env(VIRUS, queue_id=bad), b"x")
    with pytest.raises(QuarantineError):
        store.get(bad)


def test_purge_by_age(tmp_path: Path) -> None:
    store = QuarantineStore(str(tmp_path))
    old, new = env(VIRUS), env(VIRUS)
    store.put(old, b"o")
    store.put(new, b"n")
    past = time.time() - 61 * 86400
    os.utime(store.get(old.queue_id).path, (past, past))
    assert store.purge(60 * 86400) == 1
    assert [e.queue_id for e in store.entries()] == [new.queue_id]


def test_consumer_stores_and_release_requeues_for_delivery(tmp_path: Path) -> None:
    config = load_config(
        None, {"SMTPGW_QUARANTINE__DIR": str(tmp_path / "q"), "SMTPGW_SPOOL__DIR": str(tmp_path / "s")}
    )
    quarantine = Quarantine(config)
    e = env(VIRUS)
    assert quarantine.handle(Job(Queue.QUARANTINE, e, b"raw bytes")) == []
    spool = SpoolTransport(config.spool.dir)
    release(quarantine.store, spool, e.queue_id)
    [(_, released)] = spool.list(Queue.DELIVER)
    assert released.queue_id == e.queue_id
    assert released.verdicts[-1].category == "released"
    assert list(quarantine.store.entries()) == []
    spool.stop()

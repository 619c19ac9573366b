"""The delivery ledger over the network: `RedisLedger` against the real Redis, and the delivery
service choosing its ledger from `[delivery].ledger` and acting on its answers.

Two delivery services sharing one Redis stand for delivery processes on two
hosts: what one delivered, the other does not send again.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.delivery.app import BUSY_RETRY, LEDGER_RETRY, Delivery
from services.delivery.ledger import LEDGER_GRACE_SECONDS, FileLedger, LedgerError, RedisLedger, open_ledger
from shared.config import Config, load_config
from shared.envelope import Client, Envelope, new_queue_id
from shared.errors import ConfigError, RetryLater
from shared.transport import Job, Queue
from tests.support import capture_server, free_port, missing, wait_until

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
BODY = b"From: sender@example.org\r\nTo: user@example.test\r\nSubject: ledger\r\n\r\nHello.\r\n"


@pytest.fixture
def redis_url() -> str:
    """The real Redis on 127.0.0.1:6379; skipped here when missing, a failure in CI."""
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=2):
            pass
    except OSError:
        missing("Redis on 127.0.0.1:6379")
    return REDIS_URL


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A key namespace of its own; its keys are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def config(tmp_path: Path, **env: str) -> Config:
    return load_config(
        env={
            "SMTPGW_SPOOL__DIR": str(tmp_path / "spool"),
            "SMTPGW_SPOOL__FSYNC": "false",
            "SMTPGW_DELIVERY__TIMEOUT": "5s",
            **{f"SMTPGW_{k.upper()}": v for k, v in env.items()},
        }
    )


def envelope(*rcpts: str) -> Envelope:
    return Envelope(
        queue_id=new_queue_id(),
        received_at=datetime.now(UTC),
        client=Client("192.0.2.1", helo="client.example.org"),
        mail_from="sender@example.org",
        rcpt_to=rcpts,
        size=len(BODY),
    )


# ---------------------------------------------------------------- RedisLedger


def test_record_and_lookup(redis_url: str, namespace: str) -> None:
    ledger = RedisLedger(redis_url, namespace=namespace, ttl=3600)
    assert not ledger.was_delivered("Q1", "a@example.test")
    ledger.record("Q1", ["a@example.test"])
    ledger.record("Q1", ["b@example.test", "Ü@example.test"])
    ledger.record("Q1", [])
    assert ledger.delivered("Q1") == {"a@example.test", "b@example.test", "Ü@example.test"}
    assert not ledger.was_delivered("Q1", "B@example.test")  # local parts are case-sensitive
    assert not ledger.was_delivered("Q2", "a@example.test")  # per queue id
    # Another process (host) sees the same records.
    assert RedisLedger(redis_url, namespace=namespace, ttl=3600).was_delivered("Q1", "Ü@example.test")
    # Another namespace (another gateway on the same Redis) does not.
    assert not RedisLedger(redis_url, namespace=f"{namespace}-other", ttl=3600).was_delivered("Q1", "a@example.test")
    ledger.close()


def test_records_expire_after_the_queue_lifetime_and_a_day(redis_url: str, namespace: str, tmp_path: Path) -> None:
    import redis

    cfg = config(tmp_path, delivery__ledger=redis_url, broker__namespace=namespace, delivery__max_queue_lifetime="2h")
    ledger = open_ledger(cfg)
    assert isinstance(ledger, RedisLedger)
    ledger.record("Q1", ["a@example.test"])
    ttl = redis.Redis.from_url(redis_url).ttl(f"{namespace}:delivered:Q1")
    assert 2 * 3600 + LEDGER_GRACE_SECONDS - 60 <= ttl <= 2 * 3600 + LEDGER_GRACE_SECONDS
    assert ledger.purge(datetime.now(UTC)) == 0  # Redis expires keys itself
    ledger.close()


@pytest.mark.parametrize("queue_id", ["../escape", "", ".hidden", "a b", "x" * 200])
def test_unsafe_queue_ids_are_refused(redis_url: str, namespace: str, queue_id: str) -> None:
    ledger = RedisLedger(redis_url, namespace=namespace, ttl=60)
    with pytest.raises(ValueError, match="unsafe queue id"):
        ledger.record(queue_id, ["a@example.test"])


def test_unreachable_redis_is_a_ledger_error_naming_it() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    ledger = RedisLedger(url, namespace="x", ttl=60)
    with pytest.raises(LedgerError, match="cannot read Q1") as info:
        ledger.was_delivered("Q1", "a@example.test")
    assert "secret" not in str(info.value)  # the password never reaches a log line
    with pytest.raises(LedgerError, match="cannot record delivery of Q1"):
        ledger.record("Q1", ["a@example.test"])


def test_open_ledger_builds_what_the_config_names(tmp_path: Path, redis_url: str) -> None:
    assert isinstance(open_ledger(config(tmp_path)), FileLedger)
    assert isinstance(open_ledger(config(tmp_path, delivery__ledger=redis_url)), RedisLedger)


@pytest.mark.parametrize("value", ["redis", "http://127.0.0.1:6379", "redis://", "unix://", "files"])
def test_a_bad_ledger_setting_names_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="SMTPGW_DELIVERY__LEDGER"):
        config(tmp_path, delivery__ledger=value)


# ---------------------------------------------------------------- the delivery service


def test_two_delivery_services_sharing_redis_send_each_recipient_once(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """Host A delivers and dies before its ack; the broker hands the job to host B."""
    with capture_server() as (handler, port):
        settings = {
            "delivery__ledger": redis_url,
            "broker__namespace": namespace,
            "delivery__routes": f'{{ "example.test" = "smtp://127.0.0.1:{port}" }}',
        }
        host_a = Delivery(config(tmp_path / "a", **settings))
        host_b = Delivery(config(tmp_path / "b", **settings))
        try:
            env = envelope("user@example.test", "other@example.test")
            assert host_a.handle_deliver(Job(Queue.DELIVER, env, BODY)) == []
            assert host_b.handle_deliver(Job(Queue.DELIVER, env, BODY, redeliveries=1)) == []
        finally:
            host_a.close()
            host_b.close()
    assert len(handler.messages) == 1
    assert handler.messages[0].rcpt_tos == ["user@example.test", "other@example.test"]


def test_ledger_unreachable_defers_instead_of_guessing(tmp_path: Path) -> None:
    with capture_server() as (handler, port):
        cfg = config(
            tmp_path,
            delivery__ledger=f"redis://127.0.0.1:{free_port()}/0",
            delivery__routes=f'{{ "example.test" = "smtp://127.0.0.1:{port}" }}',
        )
        delivery = Delivery(cfg)
        try:
            with pytest.raises(RetryLater, match="cannot ask the delivery ledger") as info:
                delivery.handle_deliver(Job(Queue.DELIVER, envelope("user@example.test"), BODY))
        finally:
            delivery.close()
    assert info.value.delay == LEDGER_RETRY
    assert handler.messages == []


def test_a_copy_being_delivered_in_this_process_waits(tmp_path: Path) -> None:
    """Two copies of one queue id (a scanner died between its confirm and its ack) reach two
    workers at once: the second waits for the first instead of sending a duplicate."""
    release = threading.Event()
    entered = threading.Event()

    def slow_data(_envelope: object) -> None:
        entered.set()
        release.wait(10)
        return None

    with capture_server(data_reply=slow_data) as (handler, port):
        cfg = config(tmp_path, delivery__routes=f'{{ "example.test" = "smtp://127.0.0.1:{port}" }}')
        delivery = Delivery(cfg)
        env = envelope("user@example.test")
        first: list[object] = []
        worker = threading.Thread(target=lambda: first.append(delivery.handle_deliver(Job(Queue.DELIVER, env, BODY))))
        try:
            worker.start()
            assert entered.wait(10)
            with pytest.raises(RetryLater, match="being delivered right now") as info:
                delivery.handle_deliver(Job(Queue.DELIVER, env, BODY))
            assert info.value.delay == BUSY_RETRY
            release.set()
            worker.join(10)
            assert first == [[]]
            # Back from its short wait, the copy finds the recipient in the ledger.
            assert delivery.handle_deliver(Job(Queue.DELIVER, env, BODY)) == []
        finally:
            release.set()
            delivery.close()
    assert len(handler.messages) == 1


# ---------------------------------------------------------------- FileLedger: real processes, real crashes

# A delivery process's part in the ledger, run as a child: records as told, says "acked <qid>"
# on stdout only once `record` returned (the moment delivery relies on it).
CHILD = r"""
import os, signal, sys, threading
from services.delivery import ledger as ledger_module
from services.delivery.ledger import FileLedger

directory, mode = sys.argv[1], sys.argv[2]
ledger = FileLedger(directory)
say_lock = threading.Lock()

def say(text):
    with say_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

if mode == "torn":
    for i in range(50):
        ledger.record(f"Q{i}", [f"r{i}@example.test"])
        say(f"acked Q{i}")
    real_write = os.write

    def write_half_then_die(fd, data):
        if fd != ledger._own_fd:
            return real_write(fd, data)
        real_write(fd, bytes(data[: len(data) // 2]))
        os.kill(os.getpid(), signal.SIGKILL)

    ledger_module.os.write = write_half_then_die
    ledger.record("TORN", ["torn-recipient@example.test"])
    say("acked TORN")  # never reached
elif mode == "load":
    def work(t):
        for i in range(20000):  # bounded: the parent kills it long before
            ledger.record(f"T{t}.{i}", ["a@example.test", f"b{i}@example.test"])
            say(f"acked T{t}.{i}")
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
elif mode == "slow-sync":
    # The disk's sync never ends: records wait in `record`, written but not acknowledged.
    stuck = threading.Event()
    ledger_module.os.fdatasync = lambda fd: stuck.wait()
    for i in range(3):
        threading.Thread(target=ledger.record, args=(f"S{i}", ["a@example.test"])).start()
    say("recording")
    stuck.wait()
elif mode == "serve":
    for line in sys.stdin:  # record each queue id the parent sends, until stdin closes
        ledger.record(line.strip(), ["a@example.test"])
        say(f"acked {line.strip()}")
"""


def child(directory: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )


def test_process_killed_mid_append_loses_nothing_acknowledged(tmp_path: Path) -> None:
    directory = tmp_path / "delivered"
    proc = child(directory, "torn")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    acked = [line.split()[1] for line in out.splitlines()]
    assert acked == [f"Q{i}" for i in range(50)]
    # The crash left half a line at the end of the journal.
    (segment,) = (directory / "journal").glob("*.journal")
    assert not segment.read_bytes().endswith(b"\n")
    reopened = FileLedger(str(directory))
    assert all(reopened.was_delivered(f"Q{i}", f"r{i}@example.test") for i in range(50))
    assert not reopened.was_delivered("TORN", "torn-recipient@example.test")
    reopened.record("AFTER", ["a@example.test"])
    again = FileLedger(str(directory))
    assert again.was_delivered("AFTER", "a@example.test")
    assert all(again.was_delivered(f"Q{i}", f"r{i}@example.test") for i in range(50))
    assert not again.was_delivered("TORN", "torn-recipient@example.test")


def test_process_killed_under_load_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    """Four threads record as fast as group commit lets them; SIGKILL lands wherever it lands."""
    directory = tmp_path / "delivered"
    proc = child(directory, "load")
    acked: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked.append(line.split()[1])
        if len(acked) >= 300:
            proc.kill()
            break
    rest, _ = proc.communicate(timeout=30)
    acked += [line.split()[1] for line in rest.splitlines() if line.startswith("acked ")]
    assert proc.returncode == -signal.SIGKILL
    reopened = FileLedger(str(directory))
    missing = [q for q in acked if not reopened.was_delivered(q, "a@example.test")]
    assert missing == []
    assert all(reopened.was_delivered(q, f"b{q.split('.')[1]}@example.test") for q in acked)
    assert not reopened.was_delivered("T9.0", "a@example.test")


def test_process_killed_while_the_disk_syncs_keeps_what_it_wrote(tmp_path: Path) -> None:
    """A record is written before it waits for the shared sync: killed during a slow fsync, the
    process leaves every record in the page cache (the second and third were written while the
    first one's sync ran), so a restarted delivery does not send those messages again."""
    directory = tmp_path / "delivered"
    reader = FileLedger(str(directory), fsync=False)
    written = [f"S{i}" for i in range(3)]
    with child(directory, "slow-sync") as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "recording\n"
            assert wait_until(lambda: all(reader.was_delivered(q, "a@example.test") for q in written), timeout=15)
        finally:
            proc.kill()  # it never ends by itself
        assert proc.wait(30) == -signal.SIGKILL
    reopened = FileLedger(str(directory))
    assert all(reopened.was_delivered(q, "a@example.test") for q in written)


def test_a_record_by_another_process_is_seen_at_once(tmp_path: Path) -> None:
    """Two delivery processes on one spool: the index of one follows the journal of the other,
    while the other still writes it and after it exited."""
    directory = tmp_path / "delivered"
    here = FileLedger(str(directory))  # opened before the other process wrote anything
    with child(directory, "serve") as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        for qid in ("P1", "P2"):
            assert not here.was_delivered(qid, "a@example.test")
            proc.stdin.write(qid + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == f"acked {qid}\n"
            assert here.was_delivered(qid, "a@example.test")
        proc.stdin.close()
        assert proc.wait(30) == 0
    assert here.was_delivered("P1", "a@example.test")
    assert not here.was_delivered("P3", "a@example.test")

"""The transport contract (`shared.transport`), run against both transports.

`embedded` is a SpoolTransport on a fresh spool directory; `amqp` is a
BrokerTransport on the real RabbitMQ with a namespace of its own, whose
queues are deleted afterwards. "A new transport object on the same spool
directory / namespace" stands for a restarted process.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.broker import BrokerTransport
from shared.config import BrokerConfig, load_config
from shared.envelope import Action, Client, Envelope, Verdict, new_queue_id
from shared.errors import RetryLater
from shared.spool import SpoolTransport
from shared.transport import MAX_CRASHES, Job, Output, Queue, Transport, open_transport
from tests.support import wait_until

pytestmark = pytest.mark.integration

RETRY_INTERVAL = 0.5  # [delivery].retry_interval of the amqp transport: the deferred queue's TTL
CRASH_DELAY = 0.05


def make_envelope(body: bytes = b"", **changes: object) -> Envelope:
    env = Envelope(
        queue_id=new_queue_id(),
        received_at=datetime.now(UTC).replace(microsecond=0),
        client=Client(ip="192.0.2.7", helo="mx.sender.test"),
        mail_from="alice@sender.test",
        rcpt_to=("bob@example.test", "carol@example.test"),
        size=len(body),
    )
    return env.replace(**changes)


@dataclass
class Sink:
    """A handler that records its jobs and produces nothing (the end of a flow)."""

    jobs: list[Job] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, job: Job) -> list[Output]:
        with self.cond:
            self.jobs.append(job)
            self.cond.notify_all()
        return []

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Job]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.jobs) >= count, timeout)
            return list(self.jobs)


@dataclass
class Harness:
    kind: str
    make: Callable[[], Transport]  # a new transport object on the same store: a restarted process


@pytest.fixture(params=["embedded", "amqp"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    made: list[Transport] = []
    if request.param == "embedded":
        root = tmp_path / "spool"

        def make() -> Transport:
            made.append(SpoolTransport(str(root), rescan=0.1, crash_delay=CRASH_DELAY))
            return made[-1]

    else:
        config = BrokerConfig(
            url=request.getfixturevalue("rabbitmq_url"), namespace=f"test-{uuid.uuid4().hex[:12]}", confirm_timeout=5.0
        )

        def make() -> Transport:
            made.append(BrokerTransport(config, retry_interval=RETRY_INTERVAL, crash_delay=CRASH_DELAY))
            return made[-1]

    yield Harness(request.param, make)
    for transport in made:
        transport.stop(5)
    if request.param == "amqp":
        delete_namespace(config, made)


def delete_namespace(config: BrokerConfig, made: list[Transport]) -> None:
    """Delete the namespace's queues, including delay queues any of `made` declared."""
    delay_queues = {q for t in made if isinstance(t, BrokerTransport) for q in t.declared_delay_queues}
    cleaner = BrokerTransport(config, retry_interval=RETRY_INTERVAL)
    try:
        cleaner.delete_topology(delay_queues)
    finally:
        cleaner.stop(5)


def list_dead(transport: Transport) -> list[Envelope]:
    assert isinstance(transport, SpoolTransport | BrokerTransport)
    return [env for _, env in transport.list(Queue.DEAD)]


# ---------------------------------------------------------------- round trip

BODIES = {
    "empty": b"",
    "text": b"Subject: hello\r\n\r\nHi Bob.\r\n.\r\n",
    "binary": bytes(range(256)) * 64 + b"\x00\r\n\xff SMTPGW1 10\n",
    "20MiB": os.urandom(20 * 1024 * 1024),
}


@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_round_trip_is_byte_exact(harness: Harness, body: bytes) -> None:
    transport = harness.make()
    sink = Sink()
    verdict = Verdict("virus", "clean", Action.DELIVER, "no virus found")

    def scan(job: Job) -> list[Output]:
        return [Output(Queue.DELIVER, job.envelope.replace(verdicts=(verdict,)), job.body)]

    transport.consume(Queue.SCAN, scan, 1)
    transport.consume(Queue.DELIVER, sink, 1)
    transport.start()
    envelope = make_envelope(body)
    transport.publish(Queue.SCAN, envelope, body)

    (job,) = sink.wait_for(1)
    assert job.queue == Queue.DELIVER
    assert job.envelope == envelope.replace(verdicts=(verdict,))
    assert len(job.body) == len(body)
    assert job.body == body
    assert transport.wait_idle(10)


def test_outputs_are_durable_before_the_job_disappears(harness: Harness) -> None:
    first = harness.make()
    envelope = make_envelope(b"original")
    notice = envelope.replace(queue_id=f"{envelope.queue_id}.q", rcpt_to=("postmaster@example.test",))

    def scan(job: Job) -> list[Output]:
        return [
            Output(Queue.DELIVER, job.envelope.replace(attempts=1), b"cleaned"),
            Output(Queue.QUARANTINE, notice, job.body),
        ]

    first.consume(Queue.SCAN, scan, 1)
    first.start()
    first.publish(Queue.SCAN, envelope, b"original")
    assert first.wait_idle(20)
    first.stop(10)

    # A restarted process finds the outputs, and not the job.
    second = harness.make()
    assert (second.depth(Queue.SCAN), second.depth(Queue.DELIVER), second.depth(Queue.QUARANTINE)) == (0, 1, 1)
    delivered, quarantined = Sink(), Sink()
    second.consume(Queue.DELIVER, delivered, 1)
    second.consume(Queue.QUARANTINE, quarantined, 1)
    second.start()
    (out,) = delivered.wait_for(1)
    assert (out.envelope, out.body) == (envelope.replace(attempts=1), b"cleaned")
    (held,) = quarantined.wait_for(1)
    assert (held.envelope, held.body) == (notice, b"original")
    assert second.wait_idle(10)
    assert (len(delivered.jobs), len(quarantined.jobs)) == (1, 1)


# ---------------------------------------------------------------- retries and crashes


def test_retry_later_comes_back_after_the_delay_without_blocking_the_worker(harness: Harness) -> None:
    transport = harness.make()
    waiting, other = make_envelope(), make_envelope()
    seen: list[tuple[str, float]] = []
    lock = threading.Lock()

    def scan(job: Job) -> list[Output]:
        with lock:
            first_time = all(qid != job.envelope.queue_id for qid, _ in seen)
            seen.append((job.envelope.queue_id, time.monotonic()))
        if job.envelope.queue_id == waiting.queue_id and first_time:
            raise RetryLater("clamd is reloading", delay=0.6)
        return []

    transport.consume(Queue.SCAN, scan, 1)  # one worker: the retry must not hold it
    transport.publish(Queue.SCAN, waiting, b"a")
    transport.publish(Queue.SCAN, other, b"b")
    transport.start()

    assert wait_until(lambda: len(seen) >= 3, timeout=20)
    assert transport.wait_idle(20)
    assert [qid for qid, _ in seen] == [waiting.queue_id, other.queue_id, waiting.queue_id]
    assert seen[2][1] - seen[0][1] >= 0.55


def test_crashing_handler_ends_in_dead_after_max_crashes(harness: Harness) -> None:
    transport = harness.make()
    redeliveries: list[int] = []

    def scan(job: Job) -> list[Output]:
        redeliveries.append(job.redeliveries)
        raise RuntimeError("parser exploded")

    transport.consume(Queue.SCAN, scan, 1)
    transport.start()
    envelope = make_envelope(b"poison")
    transport.publish(Queue.SCAN, envelope, b"poison")

    assert wait_until(lambda: transport.depth(Queue.DEAD) == 1, timeout=20)
    assert transport.wait_idle(10)
    assert redeliveries == list(range(MAX_CRASHES))
    (dead,) = list_dead(transport)
    assert dead.queue_id == envelope.queue_id
    assert dead.last_error.startswith("scan: ")
    assert "RuntimeError: parser exploded" in dead.last_error
    assert dead == envelope.replace(last_error=dead.last_error)
    assert transport.depth(Queue.SCAN) == 0


def test_deferred_message_comes_back_to_deliver_after_its_delay(harness: Harness) -> None:
    transport = harness.make()
    sink = Sink()
    transport.consume(Queue.DELIVER, sink, 1)
    transport.start()
    envelope = make_envelope(b"later", attempts=1, last_error="451 4.7.1 try later")
    due = datetime.now(UTC) + timedelta(seconds=RETRY_INTERVAL)
    envelope = envelope.replace(not_before=due)
    transport.publish(Queue.DEFERRED, envelope, b"later")

    (job,) = sink.wait_for(1)
    assert datetime.now(UTC) >= due - timedelta(milliseconds=50)
    assert (job.queue, job.envelope, job.body) == (Queue.DELIVER, envelope, b"later")
    assert transport.depth(Queue.DEFERRED) == 0


# ---------------------------------------------------------------- workers, stop, restart


def test_workers_process_in_parallel(harness: Harness) -> None:
    transport = harness.make()
    together = threading.Barrier(3, timeout=15)
    failures: list[BaseException] = []

    def scan(job: Job) -> list[Output]:
        try:
            together.wait()  # passes only when three jobs run at the same time
        except threading.BrokenBarrierError as exc:
            failures.append(exc)
        return []

    transport.consume(Queue.SCAN, scan, 3)
    for _ in range(3):
        transport.publish(Queue.SCAN, make_envelope(), b"x")
    transport.start()
    assert transport.wait_idle(20)
    assert failures == []


def test_stop_finishes_in_flight_work(harness: Harness) -> None:
    transport = harness.make()
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def scan(job: Job) -> list[Output]:
        calls.append(job.envelope.queue_id)
        entered.set()
        release.wait(20)
        return [Output(Queue.DELIVER, job.envelope, job.body)]

    transport.consume(Queue.SCAN, scan, 1)
    transport.start()
    envelope = make_envelope(b"in flight")
    transport.publish(Queue.SCAN, envelope, b"in flight")
    assert entered.wait(20)

    stopper = threading.Thread(target=transport.stop, args=(20,))
    stopper.start()
    stopper.join(0.3)
    assert stopper.is_alive(), "stop() returned while a job was still running"
    release.set()
    stopper.join(20)
    assert not stopper.is_alive()

    after = harness.make()
    assert (after.depth(Queue.SCAN), after.depth(Queue.DELIVER)) == (0, 1)
    assert calls == [envelope.queue_id]


def test_message_published_while_no_consumer_runs_is_processed_after_restart(harness: Harness) -> None:
    receiver = harness.make()
    envelope = make_envelope(b"accepted")
    receiver.publish(Queue.SCAN, envelope, b"accepted")
    receiver.stop(5)

    scanner = harness.make()
    sink = Sink()
    scanner.consume(Queue.SCAN, sink, 2)
    scanner.start()
    (job,) = sink.wait_for(1)
    assert (job.envelope, job.body, job.redeliveries) == (envelope, b"accepted", 0)
    assert scanner.wait_idle(10)


def test_depth_counts_waiting_messages_per_queue(harness: Harness) -> None:
    transport = harness.make()
    for _ in range(3):
        transport.publish(Queue.SCAN, make_envelope(), b"s")
    transport.publish(Queue.BOUNCE, make_envelope(), b"b")
    depths = {q: transport.depth(q) for q in Queue}
    assert depths == {
        Queue.SCAN: 3,
        Queue.DELIVER: 0,
        Queue.DEFERRED: 0,
        Queue.BOUNCE: 1,
        Queue.QUARANTINE: 0,
        Queue.DEAD: 0,
    }


def test_consuming_a_waiting_room_is_refused(harness: Harness) -> None:
    transport = harness.make()
    with pytest.raises(ValueError, match="not consumed"):
        transport.consume(Queue.DEFERRED, Sink(), 1)


def test_poison_reaches_the_dead_consumer_and_never_goes_back_to_dead(harness: Harness) -> None:
    """The quarantine consumes dead: a poison message reaches it with its reason; a dead
    consumer that fails keeps the message on dead (retried much later), never re-deads it."""
    transport = harness.make()

    def scan(job: Job) -> list[Output]:
        raise RuntimeError("parser exploded")

    dead_sink = Sink()
    transport.consume(Queue.SCAN, scan, 1)
    transport.consume(Queue.DEAD, dead_sink, 1)
    transport.start()
    envelope = make_envelope(b"poison")
    transport.publish(Queue.SCAN, envelope, b"poison")
    (job,) = dead_sink.wait_for(1)
    assert job.envelope.queue_id == envelope.queue_id
    assert "RuntimeError: parser exploded" in job.envelope.last_error
    assert job.body == b"poison"
    assert wait_until(lambda: transport.depth(Queue.DEAD) == 0, timeout=10)


@pytest.mark.parametrize(
    ("url", "kind"), [("embedded", SpoolTransport), ("amqp://guest:guest@127.0.0.1:5672/%2F", BrokerTransport)]
)
def test_open_transport_builds_the_transport_the_config_names(tmp_path: Path, url: str, kind: type) -> None:
    config = load_config(
        env={
            "SMTPGW_BROKER__URL": url,
            "SMTPGW_SPOOL__DIR": str(tmp_path / "spool"),
            "SMTPGW_BROKER__NAMESPACE": "test-open",
        }
    )
    transport = open_transport(config)
    try:
        assert isinstance(transport, kind)
    finally:
        transport.stop(1)

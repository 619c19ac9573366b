"""What only the RabbitMQ transport has: a broker that can be unreachable or
drop connections, consumers in other processes that die mid-job, work spread
over processes, back-pressure from the scan queue, and event broadcasts.
The contract both transports share is in test_transport_contract.py."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

from shared.broker import BrokerTransport, Names, delay_bucket, queue_arguments
from shared.config import BrokerConfig
from shared.errors import BrokerError, RetryLater
from shared.transport import MAX_CRASHES, Job, Output, Queue
from tests.integration.test_transport_contract import Sink, delete_namespace, make_envelope
from tests.support import free_port, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

Factory = Callable[..., BrokerTransport]


@pytest.fixture
def broker(rabbitmq_url: str) -> Iterator[Factory]:
    """Makes BrokerTransports on one fresh namespace (processes of one gateway); cleans up after."""
    config = BrokerConfig(url=rabbitmq_url, namespace=f"test-{uuid.uuid4().hex[:12]}", confirm_timeout=5.0)
    made: list[BrokerTransport] = []

    def make(name: str = "", **changes: Any) -> BrokerTransport:
        made.append(
            BrokerTransport(dataclasses.replace(config, **changes), retry_interval=0.5, crash_delay=0.05, name=name)
        )
        return made[-1]

    make.config = config  # type: ignore[attr-defined]
    yield make
    for transport in made:
        transport.stop(5)
    delete_namespace(config, made)  # type: ignore[arg-type]


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("seconds", "ms"),
    [(0, 1), (0.0004, 1), (0.05, 50), (0.099, 99), (0.1, 100), (0.6, 600), (1.234, 1300), (30, 30000),
     (45.5, 46000), (1800, 1800000), (86400, 87000000)],
)  # fmt: skip
def test_delay_bucket_rounds_up_to_two_significant_digits(seconds: float, ms: int) -> None:
    assert delay_bucket(seconds) == ms


def test_deferred_queue_dead_letters_into_deliver_after_the_retry_interval() -> None:
    names = Names("gw")
    args = queue_arguments(names, Queue.DEFERRED, retry_interval=1800, delivery_limit=5)
    assert args["x-queue-type"] == "quorum"
    assert (args["x-message-ttl"], args["x-dead-letter-exchange"]) == (1800_000, "")
    assert args["x-dead-letter-routing-key"] == "gw.deliver"
    assert args["x-dead-letter-strategy"] == "at-least-once"
    work = queue_arguments(names, Queue.SCAN, retry_interval=1800, delivery_limit=5)
    assert (work["x-delivery-limit"], work["x-dead-letter-routing-key"]) == (5, "gw.dead")
    assert queue_arguments(names, Queue.DEAD, retry_interval=1800, delivery_limit=5) == {"x-queue-type": "quorum"}


# ---------------------------------------------------------------- an unreachable or flaky broker


def test_publish_to_an_unreachable_broker_raises_quickly() -> None:
    config = BrokerConfig(
        url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", namespace="unreachable", confirm_timeout=1.0
    )
    transport = BrokerTransport(config, retry_interval=1)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerError, match="unavailable"):
            transport.publish(Queue.SCAN, make_envelope(), b"x")
        assert time.monotonic() - started < 3
        reason = transport.accepting()
        assert reason is not None
        assert reason.startswith("broker unreachable")
        with pytest.raises(BrokerError):
            transport.depth(Queue.SCAN)
    finally:
        transport.stop(1)


def _close_connections(label: str) -> int:
    """Have the broker close every connection of one transport (as a broker restart would)."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    pids = [line.split("\t")[0] for line in listing.splitlines() if f'"smtpgw {label} ' in line]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "test"], capture_output=True, check=True, timeout=30
        )
    return len(pids)


@pytest.mark.slow
def test_publisher_and_consumer_reconnect_after_the_broker_closed_them(broker: Factory) -> None:
    label = f"flaky-{uuid.uuid4().hex[:6]}"
    transport = broker(label)
    sink = Sink()
    transport.consume(Queue.SCAN, sink, 1)
    transport.start()
    transport.publish(Queue.SCAN, make_envelope(), b"before")
    sink.wait_for(1)
    assert transport.wait_idle(10)

    assert _close_connections(label) >= 2  # the consumer and at least one publisher
    # The next publish finds its connection closed and reconnects within the same call.
    transport.publish(Queue.SCAN, make_envelope(), b"after")
    (_, job) = sink.wait_for(2)
    assert job.body == b"after"
    assert transport.accepting() is None


def test_messages_larger_than_a_frame_and_a_socket_read_arrive_intact(broker: Factory) -> None:
    from pika.adapters.utils.io_services_utils import _AsyncTransportBase

    from shared.broker.publisher import RECV_BYTES

    # The larger reads are in force (pika still has the attribute they are set through).
    assert _AsyncTransportBase._MAX_RECV_BYTES == RECV_BYTES
    transport = broker()
    sink = Sink()
    transport.consume(Queue.SCAN, sink, 2)
    transport.start()
    # Around frame_max (128 KiB) and RECV_BYTES, and far above both: several frames, several reads.
    bodies = [random.randbytes(n) for n in (1, 131_000, 131_072 * 2 + 17, RECV_BYTES + 1, 3 * 2**20 + 5)]
    for body in bodies:
        transport.publish(Queue.SCAN, make_envelope(body), body)
    jobs = sink.wait_for(len(bodies))
    assert sorted(job.body for job in jobs) == sorted(bodies)


class FreezableProxy:
    """A TCP proxy in front of the broker that can stop passing bytes: a broker (or network)
    that hangs without closing anything, which only a timeout can detect."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            if self.frozen.is_set() or not select.select([src], [], [], 0.05)[0]:
                self.closed.wait(0.01)
                continue
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed.set()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_publish_without_a_confirm_in_time_raises_and_later_publishes_work(broker: Factory) -> None:
    proxy = FreezableProxy(("127.0.0.1", 5672))
    try:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        transport = broker("frozen", url=url, confirm_timeout=1.0)
        transport.publish(Queue.SCAN, make_envelope(), b"confirmed")

        proxy.frozen.set()
        # A pipe already inside its 0.05 s select when frozen was set still forwards what arrives
        # during it: a publish and its confirm could slip through. Wait until every pipe saw it.
        time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(BrokerError, match="no answer from the broker within 1s"):
            transport.publish(Queue.SCAN, make_envelope(), b"never confirmed")
        assert time.monotonic() - started < 1.5  # the caller is never held longer than confirm_timeout
        assert wait_until(lambda: transport.accepting() is not None, timeout=5)

        proxy.frozen.clear()
        transport.publish(Queue.SCAN, make_envelope(), b"confirmed again")
        # The timed-out publish may still have been stored once the bytes flowed again: the sender
        # got a 451 and retries, so at worst it is a duplicate, never a loss.
        assert transport.depth(Queue.SCAN) in (2, 3)
        assert wait_until(lambda: transport.accepting() is None, timeout=5)
    finally:
        proxy.close()


# ---------------------------------------------------------------- consumers in other processes

CHILD = """
import os, sys, threading
from shared.broker import BrokerTransport
from shared.config import BrokerConfig
from shared.transport import Queue

def handler(job):
    print("working", job.envelope.queue_id, job.redeliveries, flush=True)
    os._exit(17)  # dies mid-job: no ack, no outputs

config = BrokerConfig(url=sys.argv[1], namespace=sys.argv[2], confirm_timeout=5.0)
transport = BrokerTransport(config, retry_interval=0.5, name="child")
transport.consume(Queue.SCAN, handler, 1)
transport.start()
threading.Event().wait(20)
"""


def _run_dying_consumer(config: BrokerConfig) -> str:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, config.url, config.namespace],
        cwd=ROOT, capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    assert child.returncode == 17, child.stderr
    return child.stdout.strip()


def test_message_of_a_consumer_killed_mid_job_goes_to_another_consumer(broker: Factory) -> None:
    transport = broker("survivor")
    envelope = make_envelope(b"survives")
    transport.publish(Queue.SCAN, envelope, b"survives")
    assert _run_dying_consumer(broker.config) == f"working {envelope.queue_id} 0"  # type: ignore[attr-defined]

    sink = Sink()
    transport.consume(Queue.SCAN, sink, 1)
    transport.start()
    (job,) = sink.wait_for(1)
    assert (job.envelope, job.body, job.redeliveries) == (envelope, b"survives", 1)
    assert transport.wait_idle(10)


def test_message_that_keeps_killing_its_consumer_ends_in_dead(broker: Factory) -> None:
    transport = broker("survivor")
    envelope = make_envelope(b"killer")
    transport.publish(Queue.SCAN, envelope, b"killer")
    for crash in range(MAX_CRASHES):
        assert _run_dying_consumer(broker.config) == f"working {envelope.queue_id} {crash}"  # type: ignore[attr-defined]

    sink = Sink()
    transport.consume(Queue.SCAN, sink, 1)
    transport.start()
    assert wait_until(lambda: transport.depth(Queue.DEAD) == 1, timeout=20)
    assert transport.wait_idle(10)
    assert sink.jobs == []  # moved to dead without running the handler a fourth time
    (dead,) = [env for _, env in transport.list(Queue.DEAD)]
    assert dead == envelope.replace(last_error=dead.last_error)
    assert dead.last_error == f"scan: interrupted {MAX_CRASHES} times (consumer died or lost its broker connection)"


def test_work_spreads_over_processes(broker: Factory) -> None:
    both = threading.Barrier(2, timeout=15)
    workers: dict[str, str] = {}

    def handler_of(name: str) -> Callable[[Job], list[Output]]:
        def handle(job: Job) -> list[Output]:
            workers[job.envelope.queue_id] = name
            both.wait()  # passes only if both processes hold a job at the same time
            return []

        return handle

    first, second = broker("first"), broker("second")
    first.consume(Queue.SCAN, handler_of("first"), 1)
    second.consume(Queue.SCAN, handler_of("second"), 1)
    first.start()
    second.start()
    for _ in range(2):
        first.publish(Queue.SCAN, make_envelope(), b"x")
    assert first.wait_idle(20)
    assert second.wait_idle(20)
    assert sorted(workers.values()) == ["first", "second"]


# ---------------------------------------------------------------- back-pressure, events


def test_an_idle_process_finds_an_unreachable_broker_when_asked_if_ready() -> None:
    """The readiness probe's question: nothing else has used the transport yet."""
    config = BrokerConfig(url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", namespace="idle", confirm_timeout=1.0)
    transport = BrokerTransport(config, retry_interval=1)
    try:
        assert wait_until(lambda: transport.ready() is not None, timeout=5)
        assert str(transport.ready()).startswith("broker unreachable")
    finally:
        transport.stop(5)


def test_accepting_reports_a_scan_queue_over_its_bound(broker: Factory) -> None:
    transport = broker(max_scan_queue=2)
    assert transport.accepting() is None
    assert transport.ready() is None
    for _ in range(3):
        transport.publish(Queue.SCAN, make_envelope(), b"x")
    assert wait_until(lambda: transport.accepting() is not None, timeout=10)
    assert transport.accepting() == "scan queue holds 3 messages (limit 2)"
    assert transport.ready() is None  # back-pressure is not unreadiness: the receiver answers 451

    scanner = broker()
    scanner.consume(Queue.SCAN, Sink(), 2)
    scanner.start()
    assert scanner.wait_idle(20)
    assert wait_until(lambda: transport.accepting() is None, timeout=10)


def test_backlog_counts_the_scan_and_deliver_queues(broker: Factory) -> None:
    transport = broker()
    assert transport.backlog() == 0
    for queue in (Queue.SCAN, Queue.SCAN, Queue.DELIVER):
        transport.publish(queue, make_envelope(), b"x")
    # Probed at most every PROBE_INTERVAL: the answer catches up within a few.
    assert wait_until(lambda: transport.backlog() == 3, timeout=10)

    scanner = broker()
    scanner.consume(Queue.SCAN, Sink(), 2)
    scanner.start()
    assert scanner.wait_idle(20)
    assert wait_until(lambda: transport.backlog() == 1, timeout=10)


def test_events_reach_every_subscribed_process(broker: Factory) -> None:
    received: dict[str, list[tuple[str, dict[str, object]]]] = {"scanner1": [], "scanner2": []}
    arrived = threading.Condition()
    processes = []
    for name in received:
        transport = broker(name)

        def record(event: str, data: object, name: str = name) -> None:
            with arrived:
                received[name].append((event, dict(data)))  # type: ignore[call-overload]
                arrived.notify_all()

        transport.subscribe_events(record)
        transport.start()
        assert transport.wait_idle(10)  # idle includes "subscribed"
        processes.append(transport)

    updater = broker("updater")
    updater.publish_event("rules-updated", {"version": "2024-06-01.1"})
    with arrived:
        assert arrived.wait_for(lambda: all(received.values()), timeout=10)
    assert received == {name: [("rules-updated", {"version": "2024-06-01.1"})] for name in received}


def test_delete_topology_removes_every_queue_and_exchange_of_the_namespace(broker: Factory) -> None:
    transport = broker("doomed")
    calls: list[int] = []

    def scan(job: Job) -> list[Output]:
        calls.append(job.redeliveries)
        if len(calls) == 1:
            raise RetryLater("later", delay=0.2)  # declares the 200 ms delay queue
        return []

    transport.consume(Queue.SCAN, scan, 1)
    transport.start()
    transport.publish(Queue.SCAN, make_envelope(), b"x")
    assert wait_until(lambda: len(calls) == 2, timeout=10)
    assert transport.declared_delay_queues == {f"{transport.names.namespace}.delay.200"}
    transport.stop(5)

    cleaner = broker("cleaner")
    cleaner.delete_topology(transport.declared_delay_queues)
    names = transport.names
    connection = pika.BlockingConnection(pika.URLParameters(broker.config.url))  # type: ignore[attr-defined]
    try:
        for queue in [names.queue(q) for q in Queue] + [names.delay_queue(200)]:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
                connection.channel().queue_declare(queue, passive=True)
        for exchange in (names.delay_exchange, names.events_exchange):
            with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
                connection.channel().exchange_declare(exchange, passive=True)
    finally:
        connection.close()


def test_undecodable_message_goes_to_dead_untouched(broker: Factory) -> None:
    transport = broker("garbage")
    sink = Sink()
    transport.consume(Queue.SCAN, sink, 1)
    transport.start()
    assert transport.wait_idle(10)  # topology declared, consumer running
    connection = pika.BlockingConnection(pika.URLParameters(broker.config.url))  # type: ignore[attr-defined]
    try:
        channel = connection.channel()
        channel.basic_publish(
            "", transport.names.queue(Queue.SCAN), b"\x00not a frame", pika.BasicProperties(delivery_mode=2)
        )
        assert wait_until(lambda: transport.depth(Queue.DEAD) == 1, timeout=10)
        _, properties, body = channel.basic_get(transport.names.queue(Queue.DEAD), auto_ack=True)
    finally:
        connection.close()
    assert body == b"\x00not a frame"
    assert properties.headers["smtpgw-last-error"].startswith("scan: ")
    assert sink.jobs == []


# ---------------------------------------------------------------- dead -> quarantine


def _quarantine(tmp_path: Path) -> Any:
    from services.quarantine.app import Quarantine
    from shared.config import load_config

    return Quarantine(load_config(env={"SMTPGW_QUARANTINE__DIR": str(tmp_path / "quarantine")}))


def test_poison_message_ends_in_quarantine_with_its_reason(broker: Factory, tmp_path: Path) -> None:
    from services.quarantine.app import release

    def explode(job: Job) -> list[Output]:
        raise RuntimeError("parser exploded")

    quarantine = _quarantine(tmp_path)
    scanner, keeper = broker("scanner"), broker("quarantine")
    scanner.consume(Queue.SCAN, explode, 1)
    keeper.consume(Queue.DEAD, quarantine.handle_dead, 1)
    scanner.start()
    keeper.start()
    envelope = make_envelope(b"poison")
    scanner.publish(Queue.SCAN, envelope, b"poison")
    assert wait_until(lambda: list(quarantine.store.entries("dead")), timeout=20)
    assert scanner.wait_idle(10)
    assert keeper.wait_idle(10)
    assert transport_depths(scanner) == {Queue.SCAN: 0, Queue.DEAD: 0}
    (entry,) = quarantine.store.entries()
    assert (entry.queue_id, entry.category) == (envelope.queue_id, "dead")
    assert entry.reason.startswith("scan: ")
    assert "RuntimeError: parser exploded" in entry.reason
    assert quarantine.store.read(envelope.queue_id)[1] == b"poison"
    # Released, it goes back to the queue it died on (scan: it was never scanned), not to delivery.
    release(quarantine.store, scanner, envelope.queue_id)
    assert list(quarantine.store.entries()) == []
    assert wait_until(lambda: list(quarantine.store.entries("dead")), timeout=20)  # and dies again


def transport_depths(transport: BrokerTransport) -> dict[Queue, int]:
    return {q: transport.depth(q) for q in (Queue.SCAN, Queue.DEAD)}


def test_undecodable_and_broker_dead_lettered_messages_are_quarantined_too(broker: Factory, tmp_path: Path) -> None:
    from services.quarantine.app import release
    from services.quarantine.store import QuarantineError

    quarantine = _quarantine(tmp_path)
    transport = broker("both")
    transport.consume(Queue.SCAN, Sink(), 1)
    transport.consume(Queue.DEAD, quarantine.handle_dead, 1)
    transport.start()
    assert transport.wait_idle(10)
    envelope = make_envelope(b"limit")
    connection = pika.BlockingConnection(pika.URLParameters(broker.config.url))  # type: ignore[attr-defined]
    try:
        channel = connection.channel()
        channel.basic_publish(
            "", transport.names.queue(Queue.SCAN), b"\x00not a frame", pika.BasicProperties(delivery_mode=2)
        )
        # What RabbitMQ itself dead-letters (x-delivery-limit exceeded) carries only its x-death record.
        from shared.spool import pack

        death = {"queue": transport.names.queue(Queue.DELIVER), "reason": "delivery_limit", "count": 1}
        channel.basic_publish(
            "",
            transport.names.queue(Queue.DEAD),
            b"".join(pack(envelope, b"limit")),
            pika.BasicProperties(delivery_mode=2, headers={"x-death": [death]}),
        )
    finally:
        connection.close()
    assert wait_until(lambda: len(list(quarantine.store.entries("dead"))) == 2, timeout=20)
    assert transport.wait_idle(10)
    entries = {e.queue_id: e for e in quarantine.store.entries()}
    garbage = next(e for qid, e in entries.items() if qid.startswith("undecodable-"))
    assert garbage.reason.startswith("scan: ")
    assert garbage.envelope.rcpt_to == ()
    assert quarantine.store.read(garbage.queue_id)[1] == b"\x00not a frame"
    with pytest.raises(QuarantineError, match="can only be deleted"):
        release(quarantine.store, transport, garbage.queue_id)
    limited = entries[envelope.queue_id]
    deliver = transport.names.queue(Queue.DELIVER)
    assert limited.reason == f"{deliver}: dead-lettered by the broker (delivery_limit, 1 time(s))"


def test_a_failing_dead_consumer_never_puts_the_message_on_dead_again(broker: Factory) -> None:
    calls: list[Job] = []

    def flaky(job: Job) -> list[Output]:
        calls.append(job)
        if len(calls) == 1:
            raise RetryLater("store is full", 0.05)
        if len(calls) <= 1 + MAX_CRASHES:
            raise OSError("disk on fire")
        return []

    transport = BrokerTransport(
        broker.config,  # type: ignore[attr-defined]
        retry_interval=0.5,
        crash_delay=0.05,
        dead_retry=0.05,
        name="flaky",
    )
    try:
        transport.consume(Queue.DEAD, flaky, 1)
        transport.start()
        envelope = make_envelope(b"x").replace(last_error="scan: boom")
        transport.publish(Queue.DEAD, envelope, b"x")
        assert wait_until(lambda: len(calls) == 2 + MAX_CRASHES, timeout=20)
        assert transport.wait_idle(10)
        assert transport.depth(Queue.DEAD) == 0
        assert [job.envelope for job in calls] == [envelope] * len(calls)  # its reason kept throughout
        assert [job.redeliveries for job in calls] == [0, 0, 1, 2, 3]
    finally:
        transport.stop(5)
        delete_namespace(broker.config, [transport])  # type: ignore[attr-defined]


def test_consumers_are_counted_across_processes(broker: Factory) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from shared.metrics import QueueDepthCollector

    first, second = broker("first"), broker("second")
    assert first.consumers(Queue.SCAN) == 0
    for transport in (first, second):
        transport.consume(Queue.SCAN, Sink(), 2)
        transport.start()
    # One consumer per process and queue, whatever its threads (they share its prefetch).
    assert wait_until(lambda: first.consumers(Queue.SCAN) == 2, timeout=10)
    registry = CollectorRegistry()
    registry.register(
        QueueDepthCollector(["scan", "deliver"], lambda q: first.depth(Queue(q)), lambda q: first.consumers(Queue(q)))
    )
    text = generate_latest(registry).decode()
    assert 'smtpgw_queue_consumers{queue="scan"} 2.0' in text
    assert 'smtpgw_queue_consumers{queue="deliver"} 0.0' in text
    second.stop(5)
    assert wait_until(lambda: first.consumers(Queue.SCAN) == 1, timeout=10)

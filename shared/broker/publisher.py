"""Publishing to RabbitMQ: confirmed, and never holding a caller longer than it asked.

A small pool of threads, each owning one connection with a confirm-mode
channel, serves one request queue. `BlockingChannel.basic_publish` waits for
the broker's confirm without any time limit of its own, so a caller does not
publish itself: it hands the publisher a request and waits on an Event for at
most its timeout, then gets `BrokerError` whatever the broker does. A broken
connection is replaced on the next request, with backoff (tenacity) inside
that request's time. Idle publisher threads keep answering heartbeats.

`Health` collects what `accepting()` reports: the broker unreachable, or a
resource alarm blocking publishers (`connection.blocked`).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import queue as queuelib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pika
import pika.exceptions
from pika.adapters.utils import io_services_utils
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_before_delay, wait_exponential

from shared.broker.topology import DELAY_QUEUE_SPARE, Topology
from shared.errors import BrokerError
from shared.metrics import BROKER_CONNECTS, BROKER_PUBLISH_FAILURES

log = logging.getLogger(__name__)

T = TypeVar("T")

PUBLISHERS = 2  # publisher connections per process: receivers and workers publish in parallel
KEEPALIVE = 1.0  # an idle publisher services its connection (heartbeats, blocked) this often
ATTEMPTS = 3  # tries of one request (reconnecting in between) within its deadline


def describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def retryable(exc: BaseException) -> bool:
    """Errors a fresh connection may cure (not a nack: the broker said no)."""
    return isinstance(exc, pika.exceptions.AMQPError | OSError) and not isinstance(exc, pika.exceptions.NackError)


# pika reads its socket 4 KiB at a time and appends each read to its frame buffer (a bytes
# object, copied whole every time) before looking for a complete frame: for one of our ~85 KB
# messages that is ~21 reads, decode attempts and ever longer copies. One read of up to a whole
# frame (frame_max, 128 KiB by default) cut a consume from 255 to 210 µs of CPU here. pika has
# no setting for it, so its class attribute is raised once, for every connection of the process;
# tests/integration/test_broker.py checks that pika still has it and that it is raised.
RECV_BYTES = 256 * 1024
for _attr, _value in (("_MAX_RECV_BYTES", RECV_BYTES), ("_MAX_CONSUME_BYTES", 4 * RECV_BYTES)):
    if getattr(io_services_utils._AsyncTransportBase, _attr, 0) < _value:
        setattr(io_services_utils._AsyncTransportBase, _attr, _value)


def open_connection(url: str, *, timeout: float, name: str, publisher: bool) -> Any:
    """A BlockingConnection whose every step (TCP, TLS, AMQP handshake) gives up after `timeout`."""
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    if publisher:
        # A publisher blocked by a resource alarm is torn down instead of waiting for ever.
        params.blocked_connection_timeout = timeout
    params.client_properties = {"connection_name": name}
    connection = pika.BlockingConnection(params)
    BROKER_CONNECTS.labels("publisher" if publisher else "consumer").inc()
    return connection


class Health:
    """Broker trouble seen by any connection of one transport; logged once per outage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unreachable: str | None = None
        self._blocked: dict[int, str] = {}

    def set_unreachable(self, reason: str | None) -> None:
        with self._lock:
            if reason is None and self._unreachable is not None:
                log.info("broker reachable again")
            elif reason is not None and self._unreachable is None:
                log.error("broker unreachable: %s", reason)
            self._unreachable = reason

    def set_blocked(self, link: object, reason: str | None) -> None:
        with self._lock:
            if reason is None:
                self._blocked.pop(id(link), None)
            else:
                log.warning("broker raised a resource alarm, publishing is blocked: %s", reason)
                self._blocked[id(link)] = reason

    def reason(self) -> str | None:
        with self._lock:
            if self._unreachable is not None:
                return f"broker unreachable: {self._unreachable}"
            if self._blocked:
                return f"broker resource alarm: {next(iter(self._blocked.values()))}"
            return None


@dataclass(frozen=True, slots=True)
class Message:
    exchange: str
    routing_key: str
    body: bytes
    properties: Any
    mandatory: bool = True  # an unroutable message must fail, not vanish with an ack
    delay_ms: int | None = None  # declare this delay queue before publishing


@dataclass(eq=False)
class Request:
    """One operation for a publisher thread; its caller waits on `done` for a bounded time."""

    op: Callable[[Link], Any]
    deadline: float
    on_done: Callable[[Request], None] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    state: str = "queued"  # queued -> running -> finished, or queued -> abandoned
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        with self.lock:
            if self.state != "queued":
                return False
            self.state = "running"
            return True

    def abandon(self) -> None:
        with self.lock:
            if self.state == "queued":
                self.state = "abandoned"


def publish_op(messages: Sequence[Message]) -> Callable[[Link], None]:
    """An op publishing `messages` in order. Run again after a failure (even concurrently with a
    run that timed out), it resumes after the last confirmed message and never skips one."""
    confirmed = [0]  # every message before this index is confirmed

    def op(link: Link) -> None:
        while confirmed[0] < len(messages):
            i = confirmed[0]
            link.publish(messages[i])
            confirmed[0] = max(confirmed[0], i + 1)

    return op


class Link:
    """One publisher connection and its confirm-mode channel; used only by the thread that owns it."""

    def __init__(self, owner: Publisher, name: str) -> None:
        self._owner = owner
        self.name = name
        self._conn: Any = None
        self._channel: Any = None
        self._delay_declared: dict[int, float] = {}

    def ensure(self) -> None:
        if self._conn is not None and self._conn.is_open and self._channel is not None and self._channel.is_open:
            return
        self.discard()
        owner = self._owner
        name = f"{owner.label} {self.name}"
        conn = open_connection(owner.url, timeout=owner.connect_timeout, name=name, publisher=True)
        try:
            conn.add_on_connection_blocked_callback(
                lambda _conn, frame: owner.health.set_blocked(self, str(frame.method.reason))
            )
            conn.add_on_connection_unblocked_callback(lambda _conn, _frame: owner.health.set_blocked(self, None))
            owner.topology.ensure(conn)
            channel = conn.channel()
            channel.confirm_delivery()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self._conn, self._channel = conn, channel

    def publish(self, message: Message) -> None:
        if message.delay_ms is not None:
            # Declaring at least every SPARE/2 keeps the queue alive past its last message.
            last = self._delay_declared.get(message.delay_ms, -math.inf)
            if time.monotonic() - last >= DELAY_QUEUE_SPARE / 2:
                self._owner.topology.declare_delay_queue(self._channel, message.delay_ms)
                self._delay_declared[message.delay_ms] = time.monotonic()
        self._channel.basic_publish(
            message.exchange, message.routing_key, message.body, message.properties, mandatory=message.mandatory
        )

    def depth(self, queue: str) -> int:
        """Ready messages on `queue` (a passive declare: no management plugin needed)."""
        return int(self._channel.queue_declare(queue, passive=True).method.message_count)

    def consumers(self, queue: str) -> int:
        """Consumers subscribed to `queue`, from the same passive declare."""
        return int(self._channel.queue_declare(queue, passive=True).method.consumer_count)

    def browse(self, queue: str, limit: int, decode: Callable[[bytes], T]) -> builtins.list[T]:
        """Up to `limit` messages, decoded, left on the queue (closing the channel returns them).
        `decode` raising ValueError skips a message."""
        channel = self._conn.channel()
        out: builtins.list[T] = []
        try:
            for _ in range(limit):
                method, _props, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                with contextlib.suppress(ValueError):
                    out.append(decode(body))
        finally:
            if channel.is_open:
                channel.close()
        return out

    def delete_topology(self, delay_queues: Sequence[str]) -> None:
        self._owner.topology.delete(self._channel, delay_queues)

    def keepalive(self) -> None:
        """Answer heartbeats and notice blocked/unblocked while there is nothing to publish."""
        if self._conn is None:
            return
        try:
            self._conn.process_data_events(0)
        except Exception:
            self.discard()

    def discard(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        self._delay_declared.clear()
        self._owner.health.set_blocked(self, None)
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()


class Publisher:
    """The publisher threads of one transport; they start with the first request."""

    def __init__(
        self, url: str, *, topology: Topology, health: Health, connect_timeout: float, label: str, threads: int
    ) -> None:
        self.url = url
        self.topology = topology
        self.health = health
        self.connect_timeout = connect_timeout
        self.label = label
        self._count = max(1, threads)
        self._lock = threading.Lock()
        self._closed = False
        self._requests: queuelib.SimpleQueue[Request | None] = queuelib.SimpleQueue()  # C: cheaper hand-offs
        self._threads: list[threading.Thread] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(
        self, op: Callable[[Link], Any], timeout: float, on_done: Callable[[Request], None] | None = None
    ) -> Request:
        """Queue `op` for a publisher thread without waiting for it."""
        with self._lock:
            if self._closed:
                raise BrokerError("the broker transport is stopped")
            if not self._threads:
                for i in range(self._count):
                    link = Link(self, f"publisher-{i}")
                    thread = threading.Thread(target=self._loop, args=(link,), name=f"broker-{link.name}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
        request = Request(op, time.monotonic() + timeout, on_done)
        self._requests.put(request)
        return request

    def call(self, op: Callable[[Link], T], timeout: float, what: str) -> T:
        """Run `op` on a publisher connection; BrokerError if it fails or takes longer than `timeout`."""
        request = self.submit(op, timeout)
        if not request.done.wait(timeout):
            request.abandon()
            BROKER_PUBLISH_FAILURES.labels("timeout").inc()
            raise BrokerError(f"{what}: no answer from the broker within {timeout:g}s")
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[no-any-return]

    def close(self, timeout: float) -> None:
        """Let the threads finish the requests they hold, then close their connections."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._requests.put(None)
        for thread in threads:
            thread.join(max(0.1, deadline - time.monotonic()))

    def _loop(self, link: Link) -> None:
        while True:
            try:
                request = self._requests.get(timeout=KEEPALIVE)
            except queuelib.Empty:
                link.keepalive()
                continue
            if request is None:
                break
            if not request.claim():
                continue  # its caller gave up before we got to it: publishing now would only duplicate
            try:
                request.result = self._run(link, request)
            except Exception as exc:  # BrokerError, or a bug: either way the caller gets it
                request.error = exc
            finally:
                request.state = "finished"
                request.done.set()
                if request.on_done is not None:
                    request.on_done(request)
        link.discard()

    def _run(self, link: Link, request: Request) -> Any:
        """One request, reconnecting with backoff within the request's deadline."""

        def attempt() -> Any:
            try:
                link.ensure()
            except Exception as exc:
                self.health.set_unreachable(describe(exc))
                raise
            self.health.set_unreachable(None)
            try:
                return request.op(link)
            except pika.exceptions.UnroutableError:
                self.topology.invalidate()  # a queue or binding vanished: declare everything again
                link.discard()
                raise
            except Exception:
                link.discard()
                raise

        try:
            try:
                # The first try without tenacity, whose bookkeeping cost 15% of a publish's CPU:
                # a healthy broker needs no second one. The second follows at once (a dropped
                # connection, the usual failure, is replaced by a fresh one), later ones back off.
                return attempt()
            except Exception as exc:
                if not retryable(exc):
                    raise
            retrying = Retrying(
                stop=stop_after_attempt(ATTEMPTS - 1)
                | stop_before_delay(max(0.0, request.deadline - time.monotonic())),
                wait=wait_exponential(multiplier=0.1, max=1.0),
                retry=retry_if_exception(retryable),
                reraise=True,
            )
            return retrying(attempt)
        except pika.exceptions.NackError:
            BROKER_PUBLISH_FAILURES.labels("refused").inc()
            raise BrokerError("the broker refused the message (nack)") from None
        except Exception as exc:
            if not retryable(exc):
                raise
            BROKER_PUBLISH_FAILURES.labels("unavailable").inc()
            raise BrokerError(f"broker unavailable: {describe(exc)}") from None

"""RabbitMQ transport: the distributed mode of the contract in `shared.transport`.

Receivers, scanners and delivery agents on different hosts hand messages to
each other through durable quorum queues of one broker. The message travels
inside the AMQP message, so no shared file system is needed.

Topology (every name starts with `[broker].namespace`, here "smtpgw"):

    smtpgw.scan .deliver .bounce .quarantine    work queues; manual acks. A message returned more than
                                                [broker].delivery_limit times is dead-lettered to
                                                smtpgw.dead by the broker itself (a backstop: the
                                                consumer moves it there first, with the reason)
    smtpgw.deliver.deferred                     x-message-ttl = [delivery].retry_interval, then
                                                dead-lettered into smtpgw.deliver
    smtpgw.delay (headers exchange)
      └─ smtpgw.delay.<ms>                      one TTL queue per retry delay (RetryLater, crashes),
                                                dead-lettered back to the queue the job came from;
                                                the broker deletes it when unused (x-expires)
    smtpgw.dead                                 poison messages with `last_error`, for humans
    smtpgw.events (fanout exchange)             broadcasts such as "rules updated"

Every queue is a quorum queue and every message persistent; dead-lettering
uses the at-least-once strategy, so a message moving between queues is never
dropped. Per-message TTL only expires at the head of a queue, which is why
retries use one queue per delay instead of one queue with per-message TTLs:
a 30 s retry must not wait behind a 30 min one.

Wire format: the AMQP body is the spool file's frame (`shared.spool.pack`:
magic, envelope length, envelope JSON, message bytes), so a dead message
dumped to a file is a valid spool file. The envelope is not put in a header:
AMQP content headers must fit in one frame (128 KiB), and an envelope with a
thousand recipients and their failure replies may not; bodies are split
across frames, so messages of any size up to the broker's limit work.

Threads and connections. A pika connection belongs to one thread, and
RabbitMQ advises separate connections for publishing and consuming (a
resource alarm blocks publishing connections; acks must still flow).
- Publishing: `[broker].publishers` threads, each owning one connection with
  a confirm-mode channel, serve one request queue. `BlockingChannel.basic_publish`
  waits for the confirm without a time limit of its own, so callers wait for
  their request on an Event instead: they get `BrokerError` after
  `confirm_timeout` whatever the broker does. Idle publisher threads keep
  their connection's heartbeats going.
- Consuming: one connection per transport, owned by one pump thread, with a
  channel per queue and `basic_qos(prefetch_count=workers)`. Deliveries go to
  that queue's worker threads; a worker runs the handler, publishes its
  outputs through the publishers, and then asks the pump to ack through
  `add_callback_threadsafe`, as dramatiq's `_RabbitmqConsumer` does. This is
  simpler to keep robust than a connection per worker: a worker busy in a
  60 s scan would not answer heartbeats on its own connection, and the broker
  would drop it and hand the message to someone else while the scan runs.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import json
import logging
import math
import queue as queuelib
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pika
import pika.exceptions
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_before_delay, wait_exponential

from shared.config import BrokerConfig
from shared.envelope import Envelope
from shared.errors import BrokerError, ConfigError, EnvelopeDecodeError, RetryLater
from shared.logging import bound
from shared.metrics import BROKER_CONNECTS, BROKER_PUBLISH_FAILURES, JOBS
from shared.spool import pack, unpack
from shared.transport import MAX_CRASHES, WORK_QUEUES, Handler, Job, Output, Queue, Transport

log = logging.getLogger(__name__)

T = TypeVar("T")
EventCallback = Callable[[str, Mapping[str, Any]], None]

CONTENT_TYPE = "application/x-smtpgw-frame"
PERSISTENT = 2  # AMQP 0-9-1 basic.properties delivery-mode: stored to disk
# Our headers. CRASHES and LAST_ERROR travel with a job that is retried after a handler crash,
# so the count survives the republish (the broker's x-delivery-count starts again at 0).
CRASHES = "smtpgw-crashes"
LAST_ERROR = "smtpgw-last-error"
# The delay exchange routes on it. Not "x-...": a headers exchange ignores those when matching.
DELAY = "smtpgw-delay"
RETRY_TOKEN = "smtpgw-retry"  # lets this process see its own retries come back (wait_idle)
DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues: how often the message was returned

PROBE_INTERVAL = 1.0  # accepting() checks the scan queue and the connection at most this often
DELAY_QUEUE_SPARE = 600.0  # an unused delay queue outlives its last possible message by this long
RETRY_GRACE = 2.0  # wait_idle: after its due time a retry counts as back even if another process took it
STORE_ATTEMPTS = 5  # a worker tries this often to store its outputs before returning the job
# Publisher connections per process: receivers and workers publish in parallel over them.
PUBLISHERS = 2


def delay_bucket(seconds: float) -> int:
    """Milliseconds, rounded up to two significant digits: bounds how many delay queues exist."""
    ms = max(1, math.ceil(seconds * 1000))
    if ms < 100:
        return ms
    step = int(10 ** (len(str(ms)) - 2))
    return -(-ms // step) * step


# Dead-lettering from quorum queues is at-most-once unless asked otherwise; at-least-once
# needs overflow=reject-publish (https://www.rabbitmq.com/quorum-queues.html#dead-lettering).
_AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@dataclass(frozen=True, slots=True)
class Names:
    """Every broker name of one namespace."""

    namespace: str

    def queue(self, queue: Queue) -> str:
        return f"{self.namespace}.{queue.value}"

    def delay_queue(self, ms: int) -> str:
        return f"{self.namespace}.delay.{ms}"

    @property
    def delay_exchange(self) -> str:
        return f"{self.namespace}.delay"

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}.events"


def queue_arguments(names: Names, queue: Queue, *, retry_interval: float, delivery_limit: int) -> dict[str, Any]:
    """The x-arguments a queue is declared with."""
    args: dict[str, Any] = {"x-queue-type": "quorum"}
    if queue in WORK_QUEUES:
        args |= _AT_LEAST_ONCE | {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.queue(Queue.DEAD),
            "x-delivery-limit": delivery_limit,
        }
    elif queue == Queue.DEFERRED:
        args |= _AT_LEAST_ONCE | {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.queue(Queue.DELIVER),
            "x-message-ttl": max(1, round(retry_interval * 1000)),
        }
    return args


def delay_queue_arguments(ms: int) -> dict[str, Any]:
    # No dead-letter routing key: the message keeps the one it was published with, its target queue.
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": ms,
        "x-expires": ms + int(DELAY_QUEUE_SPARE * 1000),
        "x-dead-letter-exchange": "",
        **_AT_LEAST_ONCE,
    }


def _describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def _retryable(exc: BaseException) -> bool:
    """Errors a fresh connection may cure (not a nack: the broker said no)."""
    return isinstance(exc, pika.exceptions.AMQPError | OSError) and not isinstance(exc, pika.exceptions.NackError)


@dataclass(frozen=True, slots=True)
class _Message:
    exchange: str
    routing_key: str
    body: bytes
    properties: Any
    mandatory: bool = True  # an unroutable message must fail, not vanish with an ack
    delay_ms: int | None = None  # declare this delay queue before publishing


@dataclass(eq=False)
class _Request:
    """One operation for a publisher thread; its caller waits on `done` for a bounded time."""

    op: Callable[[_Link], Any]
    deadline: float
    on_done: Callable[[_Request], None] | None = None
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


@dataclass(eq=False)
class _Consumer:
    queue: Queue
    handler: Handler
    workers: int
    ready: queuelib.Queue[_Delivery] = field(default_factory=queuelib.Queue)
    channel: Any = None
    tag: str | None = None
    threads: list[threading.Thread] = field(default_factory=list)


@dataclass(eq=False)
class _Delivery:
    consumer: _Consumer
    generation: int  # of the consumer connection it came on; acks go back on that one only
    conn: Any
    channel: Any
    tag: int
    properties: Any
    body: bytes
    ack_requested: bool = False


class _Link:
    """One publisher connection and its confirm-mode channel; used only by the thread that owns it."""

    def __init__(self, owner: BrokerTransport, name: str) -> None:
        self._owner = owner
        self.name = name
        self._conn: Any = None
        self._channel: Any = None
        self._delay_declared: dict[int, float] = {}

    def ensure(self) -> None:
        if self._conn is not None and self._conn.is_open and self._channel is not None and self._channel.is_open:
            return
        self.discard()
        conn = self._owner._connect(f"publisher-{self.name}", publisher=True)
        try:
            conn.add_on_connection_blocked_callback(
                lambda _conn, frame: self._owner._set_blocked(self, str(frame.method.reason))
            )
            conn.add_on_connection_unblocked_callback(lambda _conn, _frame: self._owner._set_blocked(self, None))
            self._owner._ensure_topology(conn)
            channel = conn.channel()
            channel.confirm_delivery()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self._conn, self._channel = conn, channel

    def publish(self, message: _Message) -> None:
        if message.delay_ms is not None:
            self._declare_delay_queue(message.delay_ms)
        self._channel.basic_publish(
            message.exchange, message.routing_key, message.body, message.properties, mandatory=message.mandatory
        )

    def _declare_delay_queue(self, ms: int) -> None:
        # Declaring resets the queue's x-expires clock. Doing it at least every SPARE/2 keeps the
        # queue alive until SPARE/2 after its last message expired.
        if time.monotonic() - self._delay_declared.get(ms, -math.inf) < DELAY_QUEUE_SPARE / 2:
            return
        names = self._owner.names
        name = names.delay_queue(ms)
        self._channel.queue_declare(name, durable=True, arguments=delay_queue_arguments(ms))
        self._channel.queue_bind(name, names.delay_exchange, arguments={"x-match": "all", DELAY: str(ms)})
        self._owner._delay_queues.add(name)
        self._delay_declared[ms] = time.monotonic()

    def depth(self, name: str) -> int:
        return int(self._channel.queue_declare(name, passive=True).method.message_count)

    def browse(self, name: str, limit: int) -> builtins.list[Envelope]:
        """Envelopes of up to `limit` messages, left on the queue (closing the channel returns them)."""
        channel = self._conn.channel()
        envelopes: builtins.list[Envelope] = []
        try:
            for _ in range(limit):
                method, _props, body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                with contextlib.suppress(EnvelopeDecodeError, ValueError):
                    envelopes.append(unpack(body)[0])
        finally:
            if channel.is_open:
                channel.close()
        return envelopes

    def delete(self, queues: Sequence[str], exchanges: Sequence[str]) -> None:
        for name in queues:
            self._channel.queue_delete(name)
        for name in exchanges:
            self._channel.exchange_delete(name)

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
        self._owner._set_blocked(self, None)
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()


class BrokerTransport(Transport):
    """The transport contract over RabbitMQ. Thread-safe; `publish` works without `start`."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        retry_interval: float,
        crash_delay: float = 1.0,
        publishers: int = PUBLISHERS,
        name: str = "",
    ) -> None:
        if config.delivery_limit < MAX_CRASHES:
            raise ConfigError(
                [f"broker.delivery_limit: {config.delivery_limit} is below {MAX_CRASHES}, the crashes after "
                 "which a message goes to the dead queue with its reason; the broker would drop it there first"]
            )  # fmt: skip
        try:
            pika.URLParameters(config.url)
        except Exception as exc:
            raise ConfigError([f"broker.url: cannot use {config.url!r}: {exc}"]) from None
        # Our own log lines report broker trouble once per outage; pika would log every attempt.
        logging.getLogger("pika").setLevel(logging.CRITICAL)
        self.names = Names(config.namespace)
        self._config = config
        self._retry_interval = retry_interval
        self._crash_delay = crash_delay
        self._publisher_count = max(1, publishers)
        self._label = name or config.namespace

        self._lock = threading.Lock()
        self._closed = False
        self._requests: queuelib.Queue[_Request | None] = queuelib.Queue()
        self._publishers: list[threading.Thread] = []
        self._topology_lock = threading.Lock()
        self._topology_ready = False
        self._delay_queues: set[str] = set()

        # accepting(): state observed by the publisher threads.
        self._unreachable: str | None = None
        self._blocked: dict[int, str] = {}
        self._probe: _Request | None = None
        self._probed_at = -math.inf
        self._probe_error: str | None = None
        self._scan_depth = 0
        self._outage_logged = False

        # Consuming.
        self._consumers: dict[Queue, _Consumer] = {}
        self._subscribers: list[EventCallback] = []
        self._events: queuelib.Queue[tuple[str, Mapping[str, Any]]] = queuelib.Queue()
        self._events_channel: Any = None
        self._cond = threading.Condition()
        self._outstanding: set[_Delivery] = set()  # delivered to this process and not yet settled
        self._pending_retries: dict[str, float] = {}  # retry token -> due (monotonic)
        self._conn: Any = None
        self._generation = 0
        self._started = False
        self._draining = threading.Event()
        self._halt = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ connections

    def _connect(self, role: str, *, publisher: bool) -> Any:
        params = pika.URLParameters(self._config.url)
        timeout = max(1.0, self._config.confirm_timeout)
        params.connection_attempts = 1
        params.socket_timeout = timeout
        params.stack_timeout = timeout
        if publisher:
            # A publisher blocked by a resource alarm is torn down instead of waiting for ever.
            params.blocked_connection_timeout = timeout
        params.client_properties = {"connection_name": f"smtpgw {self._label} {role}"}
        connection = pika.BlockingConnection(params)
        BROKER_CONNECTS.labels("publisher" if publisher else "consumer").inc()
        return connection

    def _ensure_topology(self, conn: Any) -> None:
        """Declare every queue and exchange once per transport (idempotent on the broker)."""
        with self._topology_lock:
            if self._topology_ready:
                return
            channel = conn.channel()
            try:
                for q in Queue:
                    args = queue_arguments(
                        self.names,
                        q,
                        retry_interval=self._retry_interval,
                        delivery_limit=self._config.delivery_limit,
                    )
                    channel = self._declare_queue(conn, channel, self.names.queue(q), args)
                channel.exchange_declare(self.names.delay_exchange, "headers", durable=True)
                channel.exchange_declare(self.names.events_exchange, "fanout", durable=True)
            finally:
                if channel.is_open:
                    channel.close()
            self._topology_ready = True

    def _declare_queue(self, conn: Any, channel: Any, name: str, args: dict[str, Any]) -> Any:
        try:
            channel.queue_declare(name, durable=True, arguments=args)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # 406 PRECONDITION_FAILED: it exists with other arguments (say, an older retry_interval).
            # Queue arguments cannot change; use it as it is rather than refuse to run. Deferred
            # messages carry their own expiration, so the retry interval still holds.
            if exc.reply_code != 406:
                raise
            log.warning("queue %s exists with other arguments, using it as it is: %s", name, exc.reply_text)
            channel = conn.channel()
            channel.queue_declare(name, passive=True)
        return channel

    def _set_blocked(self, link: _Link, reason: str | None) -> None:
        with self._lock:
            if reason is None:
                self._blocked.pop(id(link), None)
            else:
                log.warning("broker raised a resource alarm, publishing is blocked: %s", reason)
                self._blocked[id(link)] = reason

    def _set_unreachable(self, reason: str | None) -> None:
        with self._lock:
            self._unreachable = reason
            if reason is None and self._outage_logged:
                log.info("broker reachable again")
                self._outage_logged = False
            elif reason is not None and not self._outage_logged:
                log.error("broker unreachable: %s", reason)
                self._outage_logged = True

    # ------------------------------------------------------------ publisher threads

    def _submit(
        self, op: Callable[[_Link], Any], timeout: float, on_done: Callable[[_Request], None] | None = None
    ) -> _Request:
        with self._lock:
            if self._closed:
                raise BrokerError("the broker transport is stopped")
            if not self._publishers:
                for i in range(self._publisher_count):
                    thread = threading.Thread(
                        target=self._publisher_loop,
                        args=(_Link(self, str(i)),),
                        name=f"broker-publisher-{i}",
                        daemon=True,
                    )
                    thread.start()
                    self._publishers.append(thread)
        request = _Request(op, time.monotonic() + timeout, on_done)
        self._requests.put(request)
        return request

    def _call(self, op: Callable[[_Link], T], timeout: float, what: str) -> T:
        """Run `op` on a publisher connection; BrokerError if it fails or takes longer than `timeout`."""
        request = self._submit(op, timeout)
        if not request.done.wait(timeout):
            request.abandon()
            BROKER_PUBLISH_FAILURES.labels("timeout").inc()
            raise BrokerError(f"{what}: no answer from the broker within {timeout:g}s")
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[no-any-return]

    def _publisher_loop(self, link: _Link) -> None:
        while True:
            try:
                request = self._requests.get(timeout=PROBE_INTERVAL)
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

    def _run(self, link: _Link, request: _Request) -> Any:
        """One request, reconnecting with backoff (tenacity) within the request's deadline."""

        def attempt_once() -> Any:
            try:
                link.ensure()
            except Exception as exc:
                self._set_unreachable(_describe(exc))
                raise
            self._set_unreachable(None)
            try:
                return request.op(link)
            except pika.exceptions.UnroutableError:
                # A queue or binding vanished (deleted by hand?): declare everything again.
                with self._topology_lock:
                    self._topology_ready = False
                raise
            except Exception:
                link.discard()
                raise

        retrying = Retrying(
            stop=stop_after_attempt(3) | stop_before_delay(max(0.0, request.deadline - time.monotonic())),
            wait=wait_exponential(multiplier=0.1, max=1.0),
            retry=retry_if_exception(_retryable),
            before_sleep=lambda _state: link.discard(),
            reraise=True,
        )
        try:
            return retrying(attempt_once)
        except pika.exceptions.NackError:
            BROKER_PUBLISH_FAILURES.labels("refused").inc()
            raise BrokerError("the broker refused the message (nack)") from None
        except Exception as exc:
            if not _retryable(exc):
                raise
            link.discard()
            BROKER_PUBLISH_FAILURES.labels("unavailable").inc()
            raise BrokerError(f"broker unavailable: {_describe(exc)}") from None

    # ------------------------------------------------------------ publish

    def _message(self, queue: Queue, envelope: Envelope, body: bytes) -> _Message:
        expiration = None
        if queue == Queue.DEFERRED:
            # The queue's TTL is the retry interval; an earlier not_before expires the message sooner
            # (once it reaches the head of the queue), a later one is capped by the interval.
            wait = self._retry_interval
            if envelope.not_before is not None:
                wait = min(wait, max(0.0, envelope.not_before.timestamp() - time.time()))
            expiration = str(max(0, math.ceil(wait * 1000)))
        return _Message(
            "",
            self.names.queue(queue),
            b"".join(pack(envelope, body)),
            self._properties(envelope.queue_id, expiration=expiration),
        )

    @staticmethod
    def _properties(message_id: str, headers: dict[str, Any] | None = None, expiration: str | None = None) -> Any:
        return pika.BasicProperties(
            delivery_mode=PERSISTENT,
            content_type=CONTENT_TYPE,
            message_id=message_id,
            timestamp=int(time.time()),
            app_id="smtpgw",
            headers=headers or None,
            expiration=expiration,
        )

    def _publish_op(self, messages: Sequence[_Message]) -> Callable[[_Link], None]:
        """An op that publishes `messages` in order; a retry resumes after the last confirmed one."""
        confirmed = [0]  # every message before this index is confirmed

        def op(link: _Link) -> None:
            while confirmed[0] < len(messages):
                i = confirmed[0]
                link.publish(messages[i])
                confirmed[0] = max(confirmed[0], i + 1)

        return op

    def publish(self, queue: Queue, envelope: Envelope, body: bytes) -> None:
        op = self._publish_op([self._message(queue, envelope, body)])
        self._call(op, self._config.confirm_timeout, f"publish {envelope.queue_id} to {queue}")

    def publish_event(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Broadcast an event (e.g. "rules updated") to every subscribed process; confirmed."""
        body = json.dumps({"event": name, "data": dict(data or {})}).encode()
        props = pika.BasicProperties(content_type="application/json", app_id="smtpgw", timestamp=int(time.time()))
        message = _Message(self.names.events_exchange, "", body, props, mandatory=False)
        self._call(self._publish_op([message]), self._config.confirm_timeout, f"event {name}")

    def subscribe_events(self, callback: EventCallback) -> None:
        """Call `callback(name, data)` for each event, from one thread, while started. Events are
        broadcasts for processes that are running: one sent while this one is down is not kept."""
        with self._lock:
            self._subscribers.append(callback)
            running = self._started and not any(t.name == "broker-events" for t in self._threads)
        if running:
            self._spawn("broker-events", self._dispatch_events)
        self._wake()

    # ------------------------------------------------------------ state

    def depth(self, queue: Queue) -> int:
        name = self.names.queue(queue)
        return self._call(lambda link: link.depth(name), self._config.confirm_timeout, f"depth of {queue}")

    def accepting(self) -> str | None:
        now = time.monotonic()
        with self._lock:
            submit = self._probe is None and now - self._probed_at >= PROBE_INTERVAL
            first = self._probed_at == -math.inf
            if submit:
                self._probed_at = now  # concurrent callers do not send a probe of their own
        if submit:
            name = self.names.queue(Queue.SCAN)
            try:
                probe = self._submit(lambda link: link.depth(name), self._config.confirm_timeout, self._probed)
            except BrokerError as exc:
                return str(exc)
            with self._lock:
                if not probe.done.is_set():
                    self._probe = probe
            if first:
                probe.done.wait(min(1.0, self._config.confirm_timeout))
        with self._lock:
            if self._unreachable is not None:
                return f"broker unreachable: {self._unreachable}"
            if self._blocked:
                return f"broker resource alarm: {next(iter(self._blocked.values()))}"
            if self._probe is not None and now > self._probe.deadline:
                return "broker not answering"
            if self._probe_error is not None:
                return self._probe_error
            if self._scan_depth > self._config.max_scan_queue:
                return f"scan queue holds {self._scan_depth} messages (limit {self._config.max_scan_queue})"
        return None

    def _probed(self, request: _Request) -> None:
        with self._lock:
            self._probe = None
            self._probed_at = time.monotonic()
            if request.error is None:
                self._scan_depth = int(request.result)
                self._probe_error = None
            else:
                self._probe_error = str(request.error)

    # ------------------------------------------------------------ consume

    def consume(self, queue: Queue, handler: Handler, workers: int) -> None:
        if queue in (Queue.DEFERRED, Queue.DEAD):
            raise ValueError(f"{queue} is not consumed by handlers")
        consumer = _Consumer(queue, handler, workers)
        with self._lock:
            if queue in self._consumers:
                raise ValueError(f"{queue} already has a consumer")
            self._consumers[queue] = consumer
            started = self._started
        if started:
            self._start_workers(consumer)
            self._wake()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            consumers = list(self._consumers.values())
            subscribed = bool(self._subscribers)
        self._spawn("broker-consumer", self._pump)
        for consumer in consumers:
            self._start_workers(consumer)
        if subscribed:
            self._spawn("broker-events", self._dispatch_events)

    def _start_workers(self, consumer: _Consumer) -> None:
        for i in range(consumer.workers):
            consumer.threads.append(self._spawn(f"{consumer.queue}-{i}", self._work, consumer))

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        with self._lock:
            self._threads.append(thread)
        return thread

    def _wake(self) -> None:
        """Make the pump thread look at its consumers now rather than after its poll interval."""
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.add_callback_threadsafe(lambda: None)

    def _pump(self) -> None:
        """The consumer connection's thread: every call on that connection happens here."""
        backoff = 0.2
        while not self._halt.is_set():
            try:
                if self._conn is None:
                    conn = self._connect("consumer", publisher=False)
                    self._ensure_topology(conn)
                    self._conn = conn
                    self._set_unreachable(None)
                    backoff = 0.2
                self._reconcile()
                self._conn.process_data_events(time_limit=0.2)
            except Exception as exc:
                if isinstance(exc, pika.exceptions.AMQPConnectionError | OSError):
                    self._set_unreachable(_describe(exc))
                elif isinstance(exc, pika.exceptions.AMQPError):
                    log.warning("consumer channel failed, reconnecting: %s", _describe(exc))
                else:
                    log.exception("consumer connection failed unexpectedly")
                self._drop_connection()
                self._halt.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self._drop_connection()

    def _reconcile(self) -> None:
        """Open a consuming channel for every registered queue (cancel them all when draining)."""
        with self._lock:
            consumers = list(self._consumers.values())
            subscribed = bool(self._subscribers)
        draining = self._draining.is_set()
        for consumer in consumers:
            if draining:
                if consumer.tag is not None and consumer.channel.is_open:
                    consumer.channel.basic_cancel(consumer.tag)
                consumer.tag = None
            elif (
                consumer.channel is None
                or not consumer.channel.is_open
                # The broker cancels a consumer whose queue was deleted: declare it again and resume.
                or consumer.tag not in consumer.channel.consumer_tags
            ):
                if consumer.channel is not None and consumer.channel.is_open:
                    with self._topology_lock:
                        self._topology_ready = False
                    self._ensure_topology(self._conn)
                channel = self._conn.channel()
                channel.basic_qos(prefetch_count=consumer.workers)
                on_message = functools.partial(self._on_message, consumer, self._generation, self._conn)
                consumer.tag = channel.basic_consume(self.names.queue(consumer.queue), on_message, auto_ack=False)
                consumer.channel = channel
        if subscribed and not draining and self._events_channel is None:
            # A private queue per process: a fanout copies every event into each of them.
            channel = self._conn.channel()
            private = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(private, self.names.events_exchange)
            channel.basic_consume(private, self._on_event, auto_ack=True)
            self._events_channel = channel

    def _on_message(
        self, consumer: _Consumer, generation: int, conn: Any, channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        delivery = _Delivery(consumer, generation, conn, channel, method.delivery_tag, properties, body)
        with self._cond:
            self._outstanding.add(delivery)
        consumer.ready.put(delivery)

    def _on_event(self, _channel: Any, _method: Any, _properties: Any, body: bytes) -> None:
        try:
            event = json.loads(body)
            self._events.put((str(event["event"]), dict(event.get("data") or {})))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed event: %s", exc)

    def _dispatch_events(self) -> None:
        while not self._halt.is_set():
            try:
                name, data = self._events.get(timeout=0.2)
            except queuelib.Empty:
                continue
            with self._lock:
                subscribers = list(self._subscribers)
            for callback in subscribers:
                try:
                    callback(name, data)
                except Exception:
                    log.exception("event subscriber failed on %s", name)

    def _drop_connection(self) -> None:
        """Forget the consumer connection. Its unacked messages go back to the queue (broker side);
        deliveries from it are settled here or skipped by the workers."""
        conn, self._conn = self._conn, None
        self._events_channel = None
        with self._lock:
            for consumer in self._consumers.values():
                consumer.channel, consumer.tag = None, None
        with self._cond:
            self._generation += 1
            for delivery in [d for d in self._outstanding if d.ack_requested]:
                self._outstanding.discard(delivery)  # its ack callback will never run
            self._cond.notify_all()
        if conn is not None and conn.is_open:
            with contextlib.suppress(Exception):
                conn.close()

    def _work(self, consumer: _Consumer) -> None:
        while not self._halt.is_set():
            try:
                delivery = consumer.ready.get(timeout=0.2)
            except queuelib.Empty:
                continue
            if delivery.generation != self._generation:
                self._release(delivery)  # its connection is gone; the broker hands it out again
                continue
            try:
                ack = self._process(delivery)
            except Exception:  # a bug in this module: leave the job to be redelivered
                log.exception("consumer of %s failed", consumer.queue)
                ack = False
            self._settle(delivery, ack)

    def _process(self, delivery: _Delivery) -> bool:
        """Run the job and store what it produced. True: ack it; False: return it to the queue."""
        q = delivery.consumer.queue
        headers = delivery.properties.headers or {}
        token = headers.get(RETRY_TOKEN)
        if token is not None:
            with self._cond:
                self._pending_retries.pop(str(token), None)
        try:
            envelope, body = unpack(delivery.body)
        except (EnvelopeDecodeError, ValueError) as exc:
            log.error("undecodable message on %s moved to dead: %s", q, exc)
            props = self._properties(delivery.properties.message_id or "", {LAST_ERROR: f"{q}: {exc}"})
            return self._store([_Message("", self.names.queue(Queue.DEAD), delivery.body, props)], q)
        # Crashes this job had: in this process's handlers (our header, carried over republishes)
        # plus times the broker got it back from a consumer that died or lost its connection.
        crashes = int(headers.get(CRASHES, 0)) + int(headers.get(DELIVERY_COUNT, 0))
        with bound(queue_id=envelope.queue_id):
            if crashes >= MAX_CRASHES:
                JOBS.labels(q.value, "crash").inc()
                previous = headers.get(LAST_ERROR)
                reason = f"{q}: interrupted {crashes} times (consumer died or lost its broker connection)"
                reason += f"; last error: {previous}" if previous else ""
                log.error("%s; moved to dead", reason)
                outputs = [Output(Queue.DEAD, envelope.replace(last_error=reason), body)]
            else:
                try:
                    outputs = list(delivery.consumer.handler(Job(q, envelope, body, crashes)))
                    if sum(o.envelope.queue_id == envelope.queue_id for o in outputs) > 1:
                        raise ValueError("handler returned two continuations of the same queue id")
                except RetryLater as exc:
                    JOBS.labels(q.value, "retry").inc()
                    log.info("retry in %.1fs: %s", exc.delay, exc.reason)
                    return self._retry(delivery, q, exc.delay, {CRASHES: crashes} if crashes else {})
                except Exception as exc:
                    crashes += 1
                    JOBS.labels(q.value, "crash").inc()
                    log.exception("handler for %s crashed (%d/%d)", q, crashes, MAX_CRASHES)
                    reason = "".join(traceback.format_exception_only(exc)).strip()
                    if crashes < MAX_CRASHES:
                        return self._retry(
                            delivery, q, self._crash_delay * crashes, {CRASHES: crashes, LAST_ERROR: reason}
                        )
                    outputs = [Output(Queue.DEAD, envelope.replace(last_error=f"{q}: {reason}"), body)]
            if not self._store([self._message(o.queue, o.envelope, o.body) for o in outputs], q):
                return False
            JOBS.labels(q.value, "done").inc()
            return True

    def _retry(self, delivery: _Delivery, queue: Queue, delay: float, headers: dict[str, Any]) -> bool:
        """Park the job (its frame unchanged) in the delay queue of `delay`; it comes back to `queue`."""
        token = uuid.uuid4().hex
        headers = {**headers, RETRY_TOKEN: token}
        target = self.names.queue(queue)
        message_id = delivery.properties.message_id or ""
        if delay <= 0:
            message = _Message("", target, delivery.body, self._properties(message_id, headers))
        else:
            ms = delay_bucket(delay)
            headers[DELAY] = str(ms)
            props = self._properties(message_id, headers)
            message = _Message(self.names.delay_exchange, target, delivery.body, props, delay_ms=ms)
        if not self._store([message], queue):
            return False
        now = time.monotonic()
        with self._cond:
            # Retries another process took never come back here: forget them after their grace.
            for old in [t for t, due in self._pending_retries.items() if due + RETRY_GRACE < now]:
                del self._pending_retries[old]
            self._pending_retries[token] = now + max(0.0, delay)
        return True

    def _store(self, messages: Sequence[_Message], queue: Queue) -> bool:
        """Publish a job's outputs, trying for a while (the job stays unacked meanwhile)."""
        op = self._publish_op(messages)
        timeout = self._config.confirm_timeout * max(1, len(messages))
        for attempt in range(STORE_ATTEMPTS):
            try:
                self._call(op, timeout, f"store outputs of a {queue} job")
                return True
            except BrokerError as exc:
                log.warning(
                    "cannot store outputs of a %s job (attempt %d/%d): %s", queue, attempt + 1, STORE_ATTEMPTS, exc
                )
                if self._closed or self._halt.wait(min(2.0**attempt, 10.0)):
                    break
        return False

    def _settle(self, delivery: _Delivery, ack: bool) -> None:
        """The one place a job ends: ack (outputs are confirmed) or return it to its queue."""
        with self._cond:
            if delivery.generation != self._generation:
                self._release_locked(delivery)
                return
            delivery.ack_requested = True

        def settle() -> None:  # runs in the pump thread, the connection's owner
            try:
                if delivery.channel.is_open:
                    if ack:
                        delivery.channel.basic_ack(delivery.tag)
                    else:
                        delivery.channel.basic_nack(delivery.tag, requeue=True)
            except pika.exceptions.AMQPError as exc:
                log.warning(
                    "cannot settle a %s job, the broker will hand it out again: %s", delivery.consumer.queue, exc
                )
            finally:
                self._release(delivery)

        try:
            delivery.conn.add_callback_threadsafe(settle)
        except pika.exceptions.AMQPError:
            self._release(delivery)  # connection closed: the broker has it back already

    def _release(self, delivery: _Delivery) -> None:
        with self._cond:
            self._release_locked(delivery)

    def _release_locked(self, delivery: _Delivery) -> None:
        self._outstanding.discard(delivery)
        self._cond.notify_all()

    # ------------------------------------------------------------ idle, stop

    def _consuming(self) -> bool:
        """Every registered consumer and event subscription is set up on a live connection."""
        with self._lock:
            consumers = list(self._consumers.values())
            subscribed = bool(self._subscribers)
        if not self._started or self._conn is None:
            return not consumers and not subscribed
        return all(c.tag is not None for c in consumers) and (not subscribed or self._events_channel is not None)

    def _idle(self) -> bool:
        if not self._consuming():
            return False
        now = time.monotonic()
        with self._cond:
            if self._outstanding or any(due + RETRY_GRACE > now for due in self._pending_retries.values()):
                return False
        with self._lock:
            queues = list(self._consumers)
        try:
            if any(self.depth(q) for q in queues):
                return False
        except BrokerError:
            return False
        with self._cond:
            return not self._outstanding

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        seen_idle = False
        while True:
            # Twice in a row, 0.1 s apart: a message in transit from the broker to our pump is
            # neither on the queue nor delivered yet.
            if self._idle():
                if seen_idle:
                    return True
                seen_idle = True
            else:
                seen_idle = False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                self._cond.wait(min(left, 0.1))

    def stop(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                return
            started = self._started
        if started:
            # Stop taking jobs, let the workers finish and ack the ones delivered, then close.
            self._draining.set()
            self._wake()
            with self._cond:
                while self._outstanding and time.monotonic() < deadline:
                    self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                if self._outstanding:
                    log.warning(
                        "stopping with %d job(s) unfinished; the broker hands them out again", len(self._outstanding)
                    )
            self._halt.set()
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._halt.set()
        with self._lock:
            self._closed = True
            publishers = list(self._publishers)
        for _ in publishers:
            self._requests.put(None)
        for thread in publishers:
            thread.join(max(0.1, deadline - time.monotonic()))

    # ------------------------------------------------------------ administration

    @property
    def declared_delay_queues(self) -> frozenset[str]:
        """Delay queues this object declared (they expire on their own; tests delete them)."""
        return frozenset(self._delay_queues)

    def delete_topology(self, delay_queues: Iterable[str] = ()) -> None:
        """Delete this namespace's queues (with their messages!) and exchanges: for tests and
        decommissioning. Delay queues neither declared here nor named expire on their own."""
        queues = [self.names.queue(q) for q in Queue] + sorted(self._delay_queues | set(delay_queues))
        exchanges = [self.names.delay_exchange, self.names.events_exchange]
        self._call(lambda link: link.delete(queues, exchanges), self._config.confirm_timeout * 4, "delete topology")
        with self._topology_lock:
            self._topology_ready = False

    def list(self, queue: Queue, limit: int = 1000) -> builtins.list[tuple[str, Envelope]]:
        """(queue id, envelope) of up to `limit` messages on DEAD or DEFERRED, oldest first, left in
        place (for the CLI). Each look counts as a redelivery, so work queues are refused."""
        if queue not in (Queue.DEAD, Queue.DEFERRED):
            raise ValueError(f"listing {queue} would disturb its consumers")
        name = self.names.queue(queue)
        envelopes = self._call(lambda link: link.browse(name, limit), self._config.confirm_timeout * 4, f"list {queue}")
        return [(envelope.queue_id, envelope) for envelope in envelopes]

"""The transport contract (`shared.transport`) over RabbitMQ: consuming, retries, back-pressure.

Consuming: one connection per transport, owned by one pump thread, with a
channel per queue and `basic_qos(prefetch_count=workers)`. Deliveries go to
that queue's worker threads; a worker runs the handler, publishes its outputs
through the publisher (`shared.broker.publisher`), and only then asks the pump
to ack through `add_callback_threadsafe`, as dramatiq's `_RabbitmqConsumer`
does. That is simpler to keep robust than a connection per worker: a worker
busy in a 60 s scan would not answer heartbeats on its own connection, and the
broker would drop it and hand the message to someone else while the scan runs.

Crashes are counted in two ways and added up: a handler that raised is counted
in our header (the job is republished to a delay queue, so the count must
travel with it); a consumer that died or lost its connection is counted by the
quorum queue's `x-delivery-count`. At MAX_CRASHES the job goes to dead, with
`last_error` saying why.

The dead queue may have a consumer too: the quarantine service files each
poison message away with its reason (category "dead"), where `smtpgw
quarantine` shows it. Nothing leaves dead for dead again: a dead consumer
that fails is retried after DEAD_RETRY however often, an undecodable frame
is handed to it under a stand-in envelope (`stand_in`), and a message the
broker itself dead-lettered (its delivery limit) gets its reason from the
broker's `x-death` header.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import json
import logging
import math
import queue as queuelib
import random
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from shared.broker.publisher import (
    PUBLISHERS,
    Health,
    Link,
    Message,
    Publisher,
    Request,
    describe,
    open_connection,
    publish_op,
)
from shared.broker.topology import DELAY, Names, Topology, delay_bucket
from shared.config import BrokerConfig
from shared.envelope import Envelope
from shared.errors import BrokerError, ConfigError, EnvelopeDecodeError, RetryLater
from shared.logging import bound
from shared.metrics import JOBS
from shared.spool import pack, unpack
from shared.transport import DEAD_RETRY, MAX_CRASHES, EventCallback, Handler, Job, Output, Queue, Transport, stand_in

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-smtpgw-frame"
PERSISTENT = 2  # AMQP 0-9-1 basic.properties delivery-mode: stored to disk
CRASHES = "smtpgw-crashes"  # handler crashes so far, carried over the republish to a delay queue
LAST_ERROR = "smtpgw-last-error"
RETRY_TOKEN = "smtpgw-retry"  # lets this process see its own retries come back (wait_idle)
DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues: how often the message was returned

PROBE_INTERVAL = 1.0  # accepting() asks the broker at most this often
RETRY_GRACE = 2.0  # wait_idle: after its due time a retry counts as back even if another process took it
STORE_ATTEMPTS = 5  # a worker tries this often to store its outputs before returning the job
# The consumer connection retries at most this far apart: once the broker is back, work resumes
# within this long (a refused connection costs the broker next to nothing).
RECONNECT_MAX = 2.0


@dataclass(eq=False)
class _Consumer:
    queue: Queue
    handler: Handler
    workers: int
    # SimpleQueue (C) rather than Queue (Python locks): 17 instead of 28 µs of CPU per hand-off here.
    ready: queuelib.SimpleQueue[_Delivery] = field(default_factory=queuelib.SimpleQueue)
    channel: Any = None
    tag: str | None = None


@dataclass(eq=False)
class _Delivery:
    consumer: _Consumer
    generation: int  # of the consumer connection it came on; it is acked on that one or not at all
    conn: Any
    channel: Any
    tag: int
    properties: Any
    body: bytes
    ack_requested: bool = False


def death_reason(headers: Mapping[str, Any]) -> str:
    """Why the broker dead-lettered a message, from its `x-death` header (RabbitMQ's own record)."""
    deaths = headers.get("x-death") or []
    if not deaths or not isinstance(deaths[0], Mapping):
        return "dead: no reason recorded"
    death = deaths[0]
    queue = str(death.get("queue", "?"))
    reason = death.get("reason", "?")
    reason = reason.decode() if isinstance(reason, bytes) else str(reason)
    return f"{queue}: dead-lettered by the broker ({reason}, {death.get('count', 1)} time(s))"


def _decode_envelope(data: bytes) -> Envelope:
    try:
        return unpack(data)[0]
    except EnvelopeDecodeError as exc:
        raise ValueError(str(exc)) from None


class BrokerTransport(Transport):
    """The transport contract over RabbitMQ. Thread-safe; `publish` works without `start`."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        retry_interval: float,
        crash_delay: float = 1.0,
        dead_retry: float = DEAD_RETRY,
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
        self._dead_retry = dead_retry
        self._label = f"smtpgw {name or config.namespace}"
        self._timeout = max(1.0, config.confirm_timeout)
        self._topology = Topology(self.names, retry_interval=retry_interval, delivery_limit=config.delivery_limit)
        self._health = Health()
        self._publisher = Publisher(
            config.url,
            topology=self._topology,
            health=self._health,
            connect_timeout=self._timeout,
            label=self._label,
            threads=publishers,
        )
        self._lock = threading.Lock()
        # accepting(): the last look at the scan queue.
        self._probe: Request | None = None
        self._probed_at = -math.inf
        self._probe_error: str | None = None
        self._scan_depth = 0
        self._deliver_depth = 0
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

    # ------------------------------------------------------------ publish

    def _properties(self, message_id: str, headers: dict[str, Any] | None = None, expiration: str | None = None) -> Any:
        return pika.BasicProperties(
            delivery_mode=PERSISTENT,
            content_type=CONTENT_TYPE,
            message_id=message_id,
            timestamp=int(time.time()),
            app_id="smtpgw",
            headers=headers or None,
            expiration=expiration,
        )

    def _message(self, queue: Queue, envelope: Envelope, body: bytes) -> Message:
        expiration = None
        if queue == Queue.DEFERRED:
            # The queue's TTL is the retry interval; an earlier not_before expires the message sooner
            # (once it reaches the head of the queue), a later one is capped by the interval.
            wait = self._retry_interval
            if envelope.not_before is not None:
                wait = min(wait, max(0.0, envelope.not_before.timestamp() - time.time()))
            expiration = str(max(0, math.ceil(wait * 1000)))
        frame = b"".join(pack(envelope, body))
        return Message("", self.names.queue(queue), frame, self._properties(envelope.queue_id, expiration=expiration))

    def publish(self, queue: Queue, envelope: Envelope, body: bytes) -> None:
        op = publish_op([self._message(queue, envelope, body)])
        self._publisher.call(op, self._config.confirm_timeout, f"publish {envelope.queue_id} to {queue}")

    def publish_event(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Broadcast an event (e.g. "rules updated") to every subscribed process; confirmed."""
        body = json.dumps({"event": name, "data": dict(data or {})}).encode()
        props = pika.BasicProperties(content_type="application/json", app_id="smtpgw", timestamp=int(time.time()))
        message = Message(self.names.events_exchange, "", body, props, mandatory=False)
        self._publisher.call(publish_op([message]), self._config.confirm_timeout, f"event {name}")

    def subscribe_events(self, callback: EventCallback) -> None:
        """Call `callback(name, data)` for each event, from one thread, while started. Events are
        broadcasts to running processes: one sent while this one is down is not kept for it."""
        with self._lock:
            self._subscribers.append(callback)
            spawn = self._started and not any(t.name == "broker-events" for t in self._threads)
        if spawn:
            self._spawn("broker-events", self._dispatch_events)
        self._wake()

    # ------------------------------------------------------------ state

    def depth(self, queue: Queue) -> int:
        name = self.names.queue(queue)
        return self._publisher.call(lambda link: link.depth(name), self._config.confirm_timeout, f"depth of {queue}")

    def consumers(self, queue: Queue) -> int:
        """Consumers subscribed to `queue` across every process (scanner replicas, ...)."""
        name = self.names.queue(queue)
        return self._publisher.call(
            lambda link: link.consumers(name), self._config.confirm_timeout, f"consumers of {queue}"
        )

    def ready(self) -> str | None:
        return self._unreachable(time.monotonic())

    def accepting(self) -> str | None:
        trouble = self._unreachable(time.monotonic())
        if trouble is not None:
            return trouble
        with self._lock:
            if self._scan_depth > self._config.max_scan_queue:
                return f"scan queue holds {self._scan_depth} messages (limit {self._config.max_scan_queue})"
        return None

    def _unreachable(self, now: float) -> str | None:
        """Why the broker cannot take messages now, or None; asks it (queue depths) at most every
        PROBE_INTERVAL, so that an idle process still finds out."""
        if self._publisher.closed:
            return "the broker transport is stopped"
        error = self._probe_queues(now)
        if error is not None:
            return error
        trouble = self._health.reason()
        if trouble is not None:
            return trouble
        with self._lock:
            if self._probe is not None and now > self._probe.deadline:
                return "broker not answering"
            return self._probe_error

    def backlog(self) -> int:
        """The scan and deliver queues' depths as last probed (at most PROBE_INTERVAL old while
        asked for)."""
        if not self._publisher.closed:
            self._probe_queues(time.monotonic())
        with self._lock:
            return self._scan_depth + self._deliver_depth

    def _probe_queues(self, now: float) -> str | None:
        """Ask the broker for the scan and deliver queues' depths when the last answer is older
        than PROBE_INTERVAL, without waiting for it (`_probed` takes the answer), except the very
        first time. Returns why the question could not be sent."""
        with self._lock:
            submit = self._probe is None and now - self._probed_at >= PROBE_INTERVAL
            first = self._probed_at == -math.inf
            if submit:
                self._probed_at = now  # concurrent callers do not send a probe of their own
        if submit:
            scan, deliver = self.names.queue(Queue.SCAN), self.names.queue(Queue.DELIVER)
            try:
                probe = self._publisher.submit(
                    lambda link: (link.depth(scan), link.depth(deliver)), self._timeout, self._probed
                )
            except BrokerError as exc:
                return str(exc)
            with self._lock:
                if not probe.done.is_set():
                    self._probe = probe
            if first:
                probe.done.wait(min(1.0, self._timeout))
        return None

    def _probed(self, request: Request) -> None:
        with self._lock:
            self._probe = None
            self._probed_at = time.monotonic()
            if request.error is None:
                self._scan_depth, self._deliver_depth = request.result
                self._probe_error = None
            else:
                self._probe_error = str(request.error)

    # ------------------------------------------------------------ consume

    def consume(self, queue: Queue, handler: Handler, workers: int) -> None:
        if queue == Queue.DEFERRED:
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
            self._spawn(f"{consumer.queue}-{i}", self._work, consumer)

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        with self._lock:
            self._threads.append(thread)

    def _wake(self) -> None:
        """Make the pump look at its consumers now rather than after its poll interval."""
        conn = self._conn
        if conn is not None:
            # A closed connection raises: the pump is reconnecting then and will look anyway.
            with contextlib.suppress(pika.exceptions.AMQPError):
                conn.add_callback_threadsafe(lambda: None)

    def _pump(self) -> None:
        """The consumer connection's thread: every call on that connection happens here."""
        backoff = 0.2
        while not self._halt.is_set():
            try:
                if self._conn is None:
                    name = f"{self._label} consumer"
                    conn = open_connection(self._config.url, timeout=self._timeout, name=name, publisher=False)
                    self._topology.ensure(conn)
                    self._conn = conn
                    self._health.set_unreachable(None)
                    backoff = 0.2
                self._reconcile()
                self._conn.process_data_events(time_limit=0.2)
            except Exception as exc:
                if isinstance(exc, pika.exceptions.AMQPConnectionError | OSError):
                    self._health.set_unreachable(describe(exc))
                elif isinstance(exc, pika.exceptions.AMQPError):
                    log.warning("consumer channel failed, reconnecting: %s", describe(exc))
                else:
                    log.exception("consumer connection failed unexpectedly")
                self._drop_connection()
                # Jittered, so that the consumers of many processes do not reconnect in step.
                self._halt.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, RECONNECT_MAX)
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
                    self._topology.invalidate()
                    self._topology.ensure(self._conn)
                channel = self._conn.channel()
                channel.basic_qos(prefetch_count=consumer.workers)
                on_message = functools.partial(self._on_message, consumer, self._generation, self._conn)
                consumer.tag = channel.basic_consume(self.names.queue(consumer.queue), on_message, auto_ack=False)
                consumer.channel = channel
        if subscribed and not draining and self._events_channel is None:
            # A private queue per process: the fanout exchange copies every event into each of them.
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
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
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
        """Forget the consumer connection. The broker takes its unacked messages back; deliveries
        that came on it are released here (ack pending) or skipped by the workers (not started)."""
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
            try:
                conn.close()
            except pika.exceptions.AMQPError as exc:
                log.debug("closing the consumer connection: %s", exc)

    # ------------------------------------------------------------ jobs

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
        if q == Queue.DEAD:
            return self._process_dead(delivery, headers)
        try:
            envelope, body = unpack(delivery.body)
        except (EnvelopeDecodeError, ValueError) as exc:
            log.error("undecodable message on %s moved to dead: %s", q, exc)
            props = self._properties(delivery.properties.message_id or "", {LAST_ERROR: f"{q}: {exc}"})
            return self._store([Message("", self.names.queue(Queue.DEAD), delivery.body, props)], q)
        # Crashes this job had: in handlers (our header, carried over republishes) plus times the
        # broker got it back from a consumer that died or lost its connection (x-delivery-count).
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
                        headers = {CRASHES: crashes, LAST_ERROR: reason}
                        return self._retry(delivery, q, self._crash_delay * crashes, headers)
                    outputs = [Output(Queue.DEAD, envelope.replace(last_error=f"{q}: {reason}"), body)]
            if not self._store([self._message(o.queue, o.envelope, o.body) for o in outputs], q):
                return False
            JOBS.labels(q.value, "done").inc()
            return True

    def _process_dead(self, delivery: _Delivery, headers: Mapping[str, Any]) -> bool:
        """A dead message to its consumer (the quarantine). It never goes to dead again: whatever
        fails, it waits on a delay queue and comes back here."""
        q = Queue.DEAD
        noted = str(headers.get(LAST_ERROR) or "")  # set when an undecodable job was moved here
        try:
            envelope, body = unpack(delivery.body)
        except (EnvelopeDecodeError, ValueError) as exc:
            envelope, body = stand_in(delivery.body, noted or f"dead: undecodable frame: {exc}"), delivery.body
        if not envelope.last_error:
            envelope = envelope.replace(last_error=noted or death_reason(headers))
        crashes = int(headers.get(CRASHES, 0))
        # A retry republishes the frame as it came: the reason found here travels beside it.
        keep: dict[str, Any] = {LAST_ERROR: envelope.last_error}
        with bound(queue_id=envelope.queue_id):
            try:
                outputs = list(delivery.consumer.handler(Job(q, envelope, body, crashes)))
                if any(o.queue == Queue.DEAD for o in outputs):
                    raise ValueError("a dead consumer may not put messages on dead")
            except RetryLater as exc:
                JOBS.labels(q.value, "retry").inc()
                log.warning("dead message waits %.0fs: %s", exc.delay, exc.reason)
                return self._retry(delivery, q, exc.delay, {**keep, CRASHES: crashes} if crashes else keep)
            except Exception:
                crashes += 1
                JOBS.labels(q.value, "crash").inc()
                log.exception("handler for dead crashed (%d); trying again in %.0fs", crashes, self._dead_retry)
                return self._retry(delivery, q, self._dead_retry, {**keep, CRASHES: crashes})
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
            message = Message("", target, delivery.body, self._properties(message_id, headers))
        else:
            ms = delay_bucket(delay)
            props = self._properties(message_id, {**headers, DELAY: str(ms)})
            message = Message(self.names.delay_exchange, target, delivery.body, props, delay_ms=ms)
        if not self._store([message], queue):
            return False
        now = time.monotonic()
        with self._cond:
            # Retries another process took never come back here: forget them after their grace.
            for old in [t for t, due in self._pending_retries.items() if due + RETRY_GRACE < now]:
                del self._pending_retries[old]
            self._pending_retries[token] = now + max(0.0, delay)
        return True

    def _store(self, messages: Sequence[Message], queue: Queue) -> bool:
        """Publish a job's outputs, trying for a while (the job stays unacked meanwhile)."""
        if not messages:
            return True  # nothing to store: the job only needs its ack
        op = publish_op(messages)
        timeout = self._config.confirm_timeout * max(1, len(messages))
        for attempt in range(STORE_ATTEMPTS):
            try:
                self._publisher.call(op, timeout, f"store outputs of a {queue} job")
                return True
            except BrokerError as exc:
                log.warning("cannot store outputs of a %s job (try %d/%d): %s", queue, attempt + 1, STORE_ATTEMPTS, exc)
                if self._publisher.closed or self._halt.wait(min(2.0**attempt, 10.0)):
                    break
        return False

    def _settle(self, delivery: _Delivery, ack: bool) -> None:
        """The one place a job ends: ack (its outputs are confirmed) or return it to its queue."""
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
                log.warning("cannot settle a %s job, the broker hands it out again: %s", delivery.consumer.queue, exc)
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
            # Idle twice in a row, 0.1 s apart: a message on its way from the broker to our pump is
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
        if self._publisher.closed:
            return
        with self._lock:
            started = self._started
        if started:
            # Stop taking jobs, let the workers finish and ack the ones delivered, then close.
            self._draining.set()
            self._wake()
            with self._cond:
                while self._outstanding and time.monotonic() < deadline:
                    self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
                if self._outstanding:
                    unfinished = len(self._outstanding)
                    log.warning("stopping with %d job(s) unfinished; the broker hands them out again", unfinished)
        self._halt.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._publisher.close(max(0.1, deadline - time.monotonic()))

    # ------------------------------------------------------------ administration

    @property
    def declared_delay_queues(self) -> frozenset[str]:
        """Delay queues this object declared (they expire on their own; tests delete them)."""
        return self._topology.declared_delay_queues

    def delete_topology(self, delay_queues: Iterable[str] = ()) -> None:
        """Delete this namespace's queues (with their messages!) and exchanges: for tests and
        decommissioning. Delay queues neither declared here nor named expire on their own."""
        names = sorted(delay_queues)
        self._publisher.call(lambda link: link.delete_topology(names), self._timeout * 4, "delete topology")

    def list(self, queue: Queue, limit: int = 1000) -> builtins.list[tuple[str, Envelope]]:
        """(queue id, envelope) of up to `limit` messages on DEAD or DEFERRED, oldest first, left in
        place (for the CLI). Each look counts as a redelivery, so work queues are refused."""
        if queue not in (Queue.DEAD, Queue.DEFERRED):
            raise ValueError(f"listing {queue} would disturb its consumers")
        name = self.names.queue(queue)

        def browse(link: Link) -> builtins.list[Envelope]:
            return link.browse(name, limit, _decode_envelope)

        return [(env.queue_id, env) for env in self._publisher.call(browse, self._timeout * 4, f"list {queue}")]

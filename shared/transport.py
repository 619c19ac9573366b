"""The transport contract: how services hand messages to each other.

Two implementations honour it: the embedded spool directory (`shared.spool`)
and RabbitMQ (`shared.broker`). Services only see this module.

Contract:
- `publish(queue, envelope, body)` returns only once the message is durable
  (fsynced in the spool, or confirmed by the broker); otherwise it raises
  `TransportError` and nothing may be acknowledged to a sender.
- `consume(queue, handler, workers)` calls `handler(job)` from worker threads.
  The handler returns the outputs of that step. The transport stores every
  output durably *before* it removes the job (at-least-once): the ack happens
  in exactly one place, after the outputs are safe.
- A handler raising `RetryLater` leaves the job queued and retries it after
  the delay. Any other exception is a crash, and so is the death of the
  consumer's process while the handler runs (the job comes back to the next
  consumer with `redeliveries` counting it): the job is retried, and after
  `MAX_CRASHES` it moves to the `dead` queue with the reason, so a poison
  message is neither lost nor retried forever. `dead` may have a consumer
  (the quarantine files poison messages under "dead"); nothing goes from
  dead to dead again: a failing dead consumer is retried after DEAD_RETRY,
  and a dead message without a readable envelope reaches it under a
  stand-in envelope (`stand_in`).
- Messages put on `deliver.deferred` come back on `deliver` once
  `envelope.not_before` has passed (spool: a timer; broker: a TTL queue that
  dead-letters into `deliver`).
"""

from __future__ import annotations

import abc
import enum
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from shared.envelope import Client, Envelope

if TYPE_CHECKING:
    from shared.config import Config


class Queue(enum.StrEnum):
    SCAN = "scan"
    DELIVER = "deliver"
    DEFERRED = "deliver.deferred"
    BOUNCE = "bounce"
    QUARANTINE = "quarantine"
    DEAD = "dead"


# Queues whose poison messages go to DEAD. DEFERRED is a waiting room; DEAD is the end of the line
# (the quarantine consumes it, and nothing goes from DEAD to DEAD again).
WORK_QUEUES = (Queue.SCAN, Queue.DELIVER, Queue.BOUNCE, Queue.QUARANTINE)

# Moves to the dead queue after this many crashes of the same job (Mailman's MAX_BAK_COUNT).
MAX_CRASHES = 3
# A dead message its consumer (the quarantine) could not take waits this long before the next try.
DEAD_RETRY = 300.0


@dataclass(frozen=True, slots=True)
class Job:
    """One message handed to a consumer."""

    queue: Queue
    envelope: Envelope
    body: bytes
    redeliveries: int = 0  # how often this job was handed out before without finishing


@dataclass(frozen=True, slots=True)
class Output:
    """One message a step produces; stored durably before its job is removed."""

    queue: Queue
    envelope: Envelope
    body: bytes


def stand_in(frame: bytes, reason: str) -> Envelope:
    """An envelope for a frame that has none we can read, so that it can be quarantined with its
    reason like any poison message. No recipients: it can be inspected and deleted, not released."""
    digest = hashlib.sha256(frame).hexdigest()
    return Envelope(
        queue_id=f"undecodable-{digest[:24]}",  # the same frame always gets the same id
        received_at=datetime.now(UTC),
        client=Client(ip="0.0.0.0"),
        mail_from="",
        rcpt_to=(),
        size=len(frame),
        last_error=reason,
    )


Handler = Callable[[Job], Sequence[Output]]
EventCallback = Callable[[str, Mapping[str, Any]], None]


class Transport(abc.ABC):
    """Durable queues between the services. Thread-safe."""

    @abc.abstractmethod
    def publish(self, queue: Queue, envelope: Envelope, body: bytes) -> None:
        """Store one message durably on `queue`; raise TransportError if that is impossible."""

    @abc.abstractmethod
    def consume(self, queue: Queue, handler: Handler, workers: int) -> None:
        """Register `handler` for `queue` with `workers` threads; work starts at `start()`."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the registered consumers (and the deferred-queue timer)."""

    @abc.abstractmethod
    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking new jobs, let in-flight jobs finish (up to `timeout`), release resources."""

    @abc.abstractmethod
    def depth(self, queue: Queue) -> int:
        """Messages waiting on `queue` (not counting ones being worked on)."""

    @abc.abstractmethod
    def wait_idle(self, timeout: float) -> bool:
        """Block until no registered consumer has anything ready or in flight. For tests and
        `run --until-idle`; deferred messages that are not yet due do not count."""

    def accepting(self) -> str | None:
        """None when new mail may be accepted, else why not (back-pressure, broker down)."""
        return None

    def ready(self) -> str | None:
        """None while the transport can carry messages, else why not (the broker unreachable):
        the readiness probe's question (shared/health.py). Back-pressure is not unreadiness."""
        return None

    def backlog(self) -> int:
        """Messages accepted and waiting for a scanner or a delivery attempt (deferred ones do not
        count), for the receiver's flow control; may be a moment old."""
        return self.depth(Queue.SCAN) + self.depth(Queue.DELIVER)

    # Events ("rules updated") reach every subscriber of every process sharing the transport.
    # On one machine (the spool) that is this process; the broker overrides both with a fanout exchange.

    def publish_event(self, name: str, data: Mapping[str, object] | None = None) -> None:
        for callback in list(self._local_subscribers()):
            callback(name, dict(data or {}))

    def subscribe_events(self, callback: EventCallback) -> None:
        self._local_subscribers().append(callback)

    def _local_subscribers(self) -> list[EventCallback]:
        subscribers: list[EventCallback] | None = self.__dict__.get("_event_subscribers")
        if subscribers is None:
            subscribers = self.__dict__["_event_subscribers"] = []
        return subscribers


def open_transport(config: Config) -> Transport:
    """Build the transport `[broker].url` names: the spool of `[spool]`, or RabbitMQ."""
    if config.broker.url == "embedded":
        from shared.spool import SpoolTransport

        return SpoolTransport(
            config.spool.dir,
            fsync=config.spool.fsync,
            max_scan_queue=config.broker.max_scan_queue,
            min_free=config.spool.min_free,
        )
    from shared.broker import BrokerTransport

    return BrokerTransport(config.broker, retry_interval=config.delivery.retry_interval)

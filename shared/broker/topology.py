"""Broker topology: the names, arguments and declarations of one namespace's queues and exchanges.

The pure parts (`Names`, `delay_bucket`, `queue_arguments`) decide what exists;
`Topology` declares it on a connection, once per transport object, and keeps
track of the delay queues it created so that they can be deleted again.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pika.exceptions

from shared.transport import WORK_QUEUES, Queue

log = logging.getLogger(__name__)

# The header the delay exchange routes on. Not "x-...": a headers exchange ignores those when matching.
DELAY = "smtpgw-delay"
# An unused delay queue outlives its last possible message by this long, then the broker deletes it.
DELAY_QUEUE_SPARE = 600.0

# Dead-lettering from quorum queues is at-most-once unless asked otherwise; at-least-once needs
# overflow=reject-publish (https://www.rabbitmq.com/quorum-queues.html#dead-lettering). Without
# a length limit nothing is ever rejected.
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


def delay_bucket(seconds: float) -> int:
    """Milliseconds, rounded up to two significant digits: bounds how many delay queues exist
    (at most 90 per power of ten) and never shortens a delay."""
    ms = max(1, math.ceil(seconds * 1000))
    if ms < 100:
        return ms
    step = int(10 ** (len(str(ms)) - 2))
    return -(-ms // step) * step


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


class Topology:
    """Declares one namespace's queues and exchanges. Thread-safe; declaring is idempotent."""

    def __init__(self, names: Names, *, retry_interval: float, delivery_limit: int) -> None:
        self.names = names
        self._retry_interval = retry_interval
        self._delivery_limit = delivery_limit
        self._lock = threading.Lock()
        self._ready = False
        self._delay_queues: set[str] = set()

    @property
    def declared_delay_queues(self) -> frozenset[str]:
        return frozenset(self._delay_queues)

    def invalidate(self) -> None:
        """Something vanished (a queue deleted by hand?): the next `ensure` declares everything again."""
        with self._lock:
            self._ready = False

    def ensure(self, conn: Any) -> None:
        """Declare every queue and exchange, unless done already by this object."""
        with self._lock:
            if self._ready:
                return
            channel = conn.channel()
            try:
                for q in Queue:
                    args = queue_arguments(
                        self.names, q, retry_interval=self._retry_interval, delivery_limit=self._delivery_limit
                    )
                    channel = self._declare_queue(conn, channel, self.names.queue(q), args)
                channel.exchange_declare(self.names.delay_exchange, "headers", durable=True)
                channel.exchange_declare(self.names.events_exchange, "fanout", durable=True)
            finally:
                if channel.is_open:
                    channel.close()
            self._ready = True

    @staticmethod
    def _declare_queue(conn: Any, channel: Any, name: str, args: dict[str, Any]) -> Any:
        try:
            channel.queue_declare(name, durable=True, arguments=args)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # 406 PRECONDITION_FAILED: it exists with other arguments (an older retry_interval or
            # delivery_limit). Queue arguments cannot change; use it as it is rather than refuse to
            # run. Deferred messages carry their own expiration, so the retry interval still holds.
            if exc.reply_code != 406:
                raise
            log.warning("queue %s exists with other arguments, using it as it is: %s", name, exc.reply_text)
            channel = conn.channel()
            channel.queue_declare(name, passive=True)
        return channel

    def declare_delay_queue(self, channel: Any, ms: int) -> None:
        """The delay queue of `ms`, bound to the delay exchange. Declaring again resets its x-expires clock."""
        name = self.names.delay_queue(ms)
        channel.queue_declare(name, durable=True, arguments=delay_queue_arguments(ms))
        channel.queue_bind(name, self.names.delay_exchange, arguments={"x-match": "all", DELAY: str(ms)})
        with self._lock:
            self._delay_queues.add(name)

    def delete(self, channel: Any, delay_queues: Iterable[str] = ()) -> None:
        """Delete the namespace's queues (with their messages!) and exchanges."""
        with self._lock:
            queues = [self.names.queue(q) for q in Queue] + sorted(self._delay_queues | set(delay_queues))
            self._ready = False
        for name in queues:
            channel.queue_delete(name)
        channel.exchange_delete(self.names.delay_exchange)
        channel.exchange_delete(self.names.events_exchange)

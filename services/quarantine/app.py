"""Quarantine service: takes messages off the `quarantine` queue into the store.

The scanner never writes the store itself; it hands the message on through
the transport like every other step, so in distributed mode scanners on any
host quarantine into the one store this service owns. The same service purges
entries past `[quarantine].retention`, and `release` puts an entry back on
the `deliver` queue (an admin's decision skips the scanner).

Poison messages end here too: the service consumes the `dead` queue (where
the transport moves a job that crashed its consumer MAX_CRASHES times) and
files each under the category "dead" with its `last_error`, so that `smtpgw
quarantine list` shows them beside the rest. Releasing one sends it back to
the queue it died on, never further: one that died before it was scanned is
scanned again.
"""

from __future__ import annotations

import logging
import threading

from services.quarantine.store import DEAD, Entry, QuarantineError, QuarantineStore
from shared.config import Config
from shared.envelope import Action, Envelope, Verdict
from shared.errors import RetryLater
from shared.logging import event
from shared.metrics import QUARANTINED
from shared.transport import Job, Output, Queue, Transport

log = logging.getLogger(__name__)

PURGE_INTERVAL = 3600.0
STORE_RETRY = 60.0  # the store cannot take a message (disk full?): the job waits this long on its queue


class Quarantine:
    def __init__(self, config: Config) -> None:
        self.store = QuarantineStore(config.quarantine.dir)
        self._retention = config.quarantine.retention
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None

    def handle(self, job: Job) -> list[Output]:
        """A message the scanner holds back, filed under the category of its verdicts."""
        return self._put(job.envelope, job.body, None)

    def handle_dead(self, job: Job) -> list[Output]:
        """A poison message off the dead queue, filed under "dead" with the reason it died."""
        log.error("poison message quarantined: %s", job.envelope.last_error)
        return self._put(job.envelope, job.body, DEAD)

    def _put(self, envelope: Envelope, body: bytes, category: str | None) -> list[Output]:
        try:
            entry = self.store.put(envelope, body, category)
        except QuarantineError as exc:
            raise RetryLater(str(exc), STORE_RETRY) from None
        QUARANTINED.labels(entry.category).inc()
        event(log, "quarantined", queue_id=entry.queue_id, category=entry.category, reason=entry.reason)
        return []

    def start_purger(self) -> None:
        self._purger = threading.Thread(target=self._purge_loop, name="quarantine-purge", daemon=True)
        self._purger.start()

    def _purge_loop(self) -> None:
        while True:
            try:
                removed = self.store.purge(self._retention)
                if removed:
                    event(log, "quarantine purged", removed=removed)
            except OSError:
                log.exception("quarantine purge failed")
            if self._stop.wait(PURGE_INTERVAL):
                return

    def close(self) -> None:
        self._stop.set()


def origin_of(envelope: Envelope) -> Queue:
    """The queue a dead message died on, from its `last_error` ("scan: ...", "deliver: ...");
    the scan queue when that cannot be told, so that a release never skips the scanner."""
    head = envelope.last_error.partition(":")[0].strip()
    if head in (Queue.DELIVER, Queue.BOUNCE, Queue.QUARANTINE):
        return Queue(head)
    return Queue.SCAN


def release(store: QuarantineStore, transport: Transport, queue_id: str) -> Entry:
    """Deliver a quarantined message as it was received, or send a dead one back to the queue it
    died on; remove the entry only once the message is queued."""
    entry, body = store.read(queue_id)
    if entry.category == DEAD:
        if not entry.envelope.rcpt_to:
            raise QuarantineError(f"{queue_id} has no recipients (an undecodable message): it can only be deleted")
        target = origin_of(entry.envelope)
        envelope = entry.envelope.replace(last_error="", not_before=None)
    else:
        target = Queue.DELIVER
        released = Verdict("quarantine", "released", Action.DELIVER, "released from quarantine by an administrator")
        envelope = entry.envelope.replace(verdicts=(*entry.envelope.verdicts, released), not_before=None)
    transport.publish(target, envelope, body)
    store.delete(queue_id)
    event(log, "released", queue_id=queue_id, category=entry.category, queue=str(target))
    return entry

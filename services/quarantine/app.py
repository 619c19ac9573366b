"""Quarantine service: takes messages off the `quarantine` queue into the store.

The scanner never writes the store itself; it hands the message on through
the transport like every other step, so in distributed mode scanners on any
host quarantine into the one store this service owns. The same service purges
entries past `[quarantine].retention`, and `release` puts an entry back on
the `deliver` queue (an admin's decision skips the scanner).
"""

from __future__ import annotations

import logging
import threading

from services.quarantine.store import Entry, QuarantineStore
from shared.config import Config
from shared.envelope import Action, Verdict
from shared.logging import event
from shared.metrics import QUARANTINED
from shared.transport import Job, Output, Queue, Transport

log = logging.getLogger(__name__)

PURGE_INTERVAL = 3600.0


class Quarantine:
    def __init__(self, config: Config) -> None:
        self.store = QuarantineStore(config.quarantine.dir)
        self._retention = config.quarantine.retention
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None

    def handle(self, job: Job) -> list[Output]:
        entry = self.store.put(job.envelope, job.body)
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


def release(store: QuarantineStore, transport: Transport, queue_id: str) -> Entry:
    """Deliver a quarantined message as it was received; remove it only once it is queued."""
    entry, body = store.read(queue_id)
    released = Verdict("quarantine", "released", Action.DELIVER, "released from quarantine by an administrator")
    envelope = entry.envelope.replace(verdicts=(*entry.envelope.verdicts, released), not_before=None)
    transport.publish(Queue.DELIVER, envelope, body)
    store.delete(queue_id)
    event(log, "released", queue_id=queue_id, category=entry.category)
    return entry

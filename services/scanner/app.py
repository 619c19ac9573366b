"""The scanner service: wiring between the transport and the pure core.

`build_handler(config, clamd)` returns the handler the transport calls for
each job on the `scan` queue. It runs `core.scan_message`, turns the outcome
into the step's outputs, counts metrics and writes one canonical log line
per message:

    queue_id=... verdict=clean action=deliver parts=3 clamd=1 duration=0.012

Outputs (see shared/transport.py):
- deliver: the job's own envelope (continuation) on `deliver`, with the
  verdicts; the body is the very bytes object received when nothing changed.
- strip: a copy of the original message to `quarantine` as "<id>.q" (an
  administrator can release it), and the rebuilt message to `deliver`.
- quarantine: the message on `quarantine`; delete: nothing (logged).

A clamd failure (ScanError) raises RetryLater: the message stays queued and
is scanned again after `[scanner].retry_delay`. It is never delivered unscanned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from services.scanner.core import Outcome, scan_message
from services.scanner.reply import VirusScanner
from services.scanner.rules import LiveRules
from shared.clamd import ClamdClient
from shared.config import Config
from shared.crlf import bare_newline
from shared.envelope import Action
from shared.errors import RetryLater, ScanError, ScanLimitExceeded
from shared.logging import bound, event
from shared.metrics import DISPOSITIONS, SCAN_SECONDS, VERDICTS
from shared.transport import Handler, Job, Output, Queue

__all__ = ["ClamdClient", "build_handler", "open_clamd", "outputs_for"]

log = logging.getLogger(__name__)


def open_clamd(config: Config) -> ClamdClient:
    """The clamd client `[scanner].clamd` and `[scanner].clamd_timeout` describe."""
    return ClamdClient(config.scanner.clamd, config.scanner.clamd_timeout)


def build_handler(config: Config, clamd: VirusScanner, rules: LiveRules | None = None) -> Handler:
    """The `scan` queue's job handler. Thread-safe: the transport calls it from its workers.

    `rules` are the live rules (`[scanner]` with the active rule bundle applied, replaced when
    the updater installs a new one); each message is scanned with the rules in force when it
    starts. Without them, the `[scanner]` settings apply as they are.
    """
    static = config.scanner
    outage = _OutageLog()

    def handle(job: Job) -> Sequence[Output]:
        env = job.envelope
        settings = rules.settings() if rules is not None else static
        with bound(queue_id=env.queue_id):
            started = time.monotonic()
            try:
                outcome = scan_message(job.body, settings, clamd, crlf_clean=env.crlf_clean)
            except ScanError as exc:
                DISPOSITIONS.labels("retry").inc()
                outage.failed(exc)
                raise RetryLater(f"not scanned, will retry: {exc}", settings.retry_delay) from exc
            outage.recovered()
            duration = time.monotonic() - started
            SCAN_SECONDS.observe(duration)
            DISPOSITIONS.labels(str(outcome.action)).inc()
            for verdict in outcome.verdicts:
                VERDICTS.labels(verdict.category, str(verdict.action)).inc()
            _log_outcome(outcome, duration)
            return outputs_for(job, outcome)

    return handle


def outputs_for(job: Job, outcome: Outcome) -> list[Output]:
    """The outputs of one scanned job (pure)."""
    env = job.envelope
    verdicts = (*env.verdicts, *outcome.verdicts)
    if outcome.action is Action.DELETE:
        return []
    if outcome.action is Action.QUARANTINE:
        return [Output(Queue.QUARANTINE, env.replace(verdicts=verdicts), job.body)]
    if outcome.body is job.body:
        if outcome.action is Action.DELIVER and all(v.category == "clean" for v in outcome.verdicts):
            # Clean and unchanged: the job goes on exactly as it came, so the spool moves its
            # file to the deliver queue instead of writing and fsyncing a copy (the verdict is
            # in the "scanned" log line). Only the scanner moves files from scan to deliver.
            return [Output(Queue.DELIVER, env, job.body)]
        return [Output(Queue.DELIVER, env.replace(verdicts=verdicts), job.body)]
    delivered = env.replace(
        verdicts=verdicts,
        size=len(outcome.body),
        crlf_clean=not bare_newline(outcome.body),  # a new body is checked anew (rare: see core.py)
    )
    if outcome.action is Action.DELIVER:  # only header fields were added (findings) or removed (forged)
        return [Output(Queue.DELIVER, delivered, outcome.body)]
    original = env.replace(queue_id=f"{env.queue_id}.q", parent_id=env.queue_id, verdicts=verdicts)
    return [Output(Queue.QUARANTINE, original, job.body), Output(Queue.DELIVER, delivered, outcome.body)]


def _log_outcome(outcome: Outcome, duration: float) -> None:
    categories = ",".join(dict.fromkeys(v.category for v in outcome.verdicts))
    first = outcome.verdicts[0]
    fields = {
        "verdict": categories,
        "action": str(outcome.action),
        "parts": outcome.parts,
        "clamd": outcome.clamd_calls,
        "duration": f"{duration:.3f}",
    }
    if first.category != "clean":
        fields["reason"] = first.reason[:300]
        fields["part"] = first.part
    if outcome.defects:
        fields["defects"] = outcome.defects
    if outcome.forged:
        fields["forged_findings"] = outcome.forged  # removed: see core.py
    # A deleted message leaves no other trace: log it where an operator looks.
    level = logging.WARNING if outcome.action is Action.DELETE else logging.INFO
    event(log, "scanned", level, **fields)


class _OutageLog:
    """Logs a clamd outage once when it starts and once when it ends, not per message
    (Mailman's outgoing runner keeps a `_logged` flag for the same reason)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down = False

    def failed(self, exc: ScanError) -> None:
        with self._lock:
            first, self._down = not self._down, True
        if isinstance(exc, ScanLimitExceeded) or first:
            event(log, "clamd failed; messages wait and are retried", logging.WARNING, error=str(exc))
        else:
            log.debug("clamd still failing: %s", exc)

    def recovered(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            event(log, "clamd answers again", logging.INFO)

"""The delivery service's wiring: jobs from the deliver and bounce queues in, outputs out.

`Delivery` builds the adapters (the SMTP client and its connection pool, the
MX resolver, the ledger of delivered recipients) and connects them to the
pure core (routing, classification, disposition, DSN building). The
transport calls `handle_deliver` and `handle_bounce` from its worker threads;
all network I/O runs on one asyncio event loop in a dedicated thread, to which
each worker submits its job's coroutine and waits for the result. So the
pooled connections are only ever touched by that loop, one transaction at a
time each.

Every recipient attempt is logged as one canonical line, Postfix style:
`queue_id=… to=<…> relay=host[ip]:port delay=… dsn=2.0.0 status=sent (reply)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from services.delivery.backoff import expiry
from services.delivery.bounce import build_dsn, dsn_envelope, suppression_reason
from services.delivery.classify import Outcome, RcptResult, Reply
from services.delivery.disposition import plan
from services.delivery.ledger import LEDGER_GRACE_SECONDS, DeliveryLedger, open_ledger
from services.delivery.mx import MxResolver
from services.delivery.routing import Destination, Hop, group_recipients
from services.delivery.smtp_client import SmtpClient, Transaction
from shared import eventloop
from shared.config import Config
from shared.envelope import Envelope
from shared.errors import RetryLater, SpoolError
from shared.logging import bound, event
from shared.metrics import BOUNCES, DELIVERY_ATTEMPTS, DELIVERY_SECONDS
from shared.offload import Offload
from shared.transport import Job, Output, Queue

log = logging.getLogger(__name__)

T = TypeVar("T")

# Words of the canonical log line, Postfix's vocabulary (status=sent|deferred|bounced).
# The same words label smtpgw_delivery_attempts_total{result}.
_STATUS = {Outcome.DELIVERED: "sent", Outcome.TEMPORARY: "deferred", Outcome.PERMANENT: "bounced"}
# Metric children bound once: `.labels()` looks them up under a lock on every call.
_ATTEMPTS = {result: DELIVERY_ATTEMPTS.labels(result=result) for result in (*_STATUS.values(), "duplicate")}
_BOUNCES_SUPPRESSED = BOUNCES.labels(result="suppressed")
_BOUNCES_CREATED = BOUNCES.labels(result="created")

# Delivered-recipient records outlive the message's lifetime by this much, then are purged.
LEDGER_GRACE = timedelta(seconds=LEDGER_GRACE_SECONDS)
PURGE_EVERY = 3600.0
# The ledger cannot be asked (Redis down): try the message again after this long rather than
# risk sending it twice.
LEDGER_RETRY = 30.0
# Another worker of this process is delivering a copy of the same message (a scanner that died
# after its output was confirmed but before its ack leaves two): wait for it, then ask the ledger.
BUSY_RETRY = 2.0


class _LoopThread:
    """One asyncio event loop running in its own daemon thread, with threads for its blocking
    calls (`offload`)."""

    def __init__(self, name: str, offload_threads: int) -> None:
        self.loop = eventloop.new_event_loop()
        self.offload = Offload(offload_threads, f"{name}-offload")
        self.offload.start(self.loop)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run `coro` on the loop and wait for its result (from any other thread)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.offload.stop()  # calls already handed over still run to their end


class Delivery:
    """The deliver and bounce handlers of the delivery service."""

    def __init__(
        self,
        config: Config,
        *,
        ledger: DeliveryLedger | None = None,
        clock: Callable[[], datetime] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config.delivery
        self._helo = config.delivery.helo_name or config.receiver.hostname
        self._ledger: DeliveryLedger = ledger or open_ledger(config)
        self._busy: set[str] = set()  # queue ids a worker of this process is delivering right now
        self._busy_lock = threading.Lock()
        self._now = clock or (lambda: datetime.now(UTC))
        self._rng = rng or random.Random()
        # As many idle connections per destination as transactions can use at once: with fewer,
        # every burst that ended more transactions than that closed the rest, and the next one
        # connected and said EHLO again (the bench: a new connection per 5 messages at c=50).
        self._client = SmtpClient(
            self._helo, self._config.timeout, pipelining=self._config.pipelining, max_idle=self._config.threads
        )
        self._resolver = MxResolver(
            self._config.nameservers,
            self._config.dns_timeout,
            self_names={self._helo, config.receiver.hostname},
            rng=self._rng,
        )
        # A last-resort bound on one job: every network step has its own timeout, so this
        # only fires if something hangs that should not.
        self._job_timeout = self._config.dns_timeout * 2 + self._config.timeout * 20
        self._purge_lock = threading.Lock()
        self._next_purge = 0.0
        self._closed = False
        # Ledger records run on these while the loop goes on: one per job in flight (the
        # delivery threads and the bounce consumer's), since a record that waits for a free
        # thread is not written yet, and a crash then sends its message again. The ledger
        # group-commits the records that arrive together, so the threads share the disk's syncs.
        self._loop = _LoopThread("delivery-loop", offload_threads=config.delivery.threads + 1)
        self.loop = self._loop.loop  # for the liveness probe (shared/health.py)

    # ------------------------------------------------------------ deliver

    def handle_deliver(self, job: Job) -> list[Output]:
        """Try every recipient once. Returns [] when all are done, else a continuation on the
        deferred queue and/or a bounce job (see `disposition.plan`)."""
        env = job.envelope
        with bound(queue_id=env.queue_id):
            self._maybe_purge()
            with self._busy_lock:
                if env.queue_id in self._busy:
                    raise RetryLater("a copy of this message is being delivered right now", BUSY_RETRY)
                self._busy.add(env.queue_id)
            try:
                return self._deliver(job)
            finally:
                with self._busy_lock:
                    self._busy.discard(env.queue_id)

    def _deliver(self, job: Job) -> list[Output]:
        env = job.envelope
        todo: list[str] = []
        try:
            for rcpt in dict.fromkeys(env.rcpt_to):  # each recipient once, in order
                if self._ledger.was_delivered(env.queue_id, rcpt):
                    # Delivered before a crash or a redelivery: sending again would duplicate it.
                    _ATTEMPTS["duplicate"].inc()
                    self._log_line(env, rcpt, "none", "2.0.0", "duplicate", "already delivered; not sent again")
                else:
                    todo.append(rcpt)
        except SpoolError as exc:
            # Without the ledger's answer a redelivered message might go out twice: wait for it.
            raise RetryLater(f"cannot ask the delivery ledger: {exc}", LEDGER_RETRY) from None
        if not todo:
            return []
        results = self._attempt(env, job.body, todo)
        now = self._now()
        outcome = plan(
            env,
            job.body,
            results,
            now=now,
            expires_at=expiry(env, self._config.max_queue_lifetime),
            retry_interval=self._config.retry_interval,
            spread=self._rng.random(),
        )
        for result in outcome.results:
            _ATTEMPTS[_STATUS[result.outcome]].inc()
            self._log_line(
                env, result.rcpt, result.relay, result.reply.status, _STATUS[result.outcome], str(result.reply)
            )
        if outcome.suppressed:
            _BOUNCES_SUPPRESSED.inc()
            event(log, f"queue_id={env.queue_id} no bounce: {outcome.suppressed}", queue_id=env.queue_id)
        return list(outcome.outputs)

    def _attempt(self, env: Envelope, body: bytes, rcpts: Sequence[str]) -> list[RcptResult]:
        grouping = group_recipients(rcpts, self._config.routes, self._config.mx_port)
        results = {
            rcpt: RcptResult(rcpt, Outcome.PERMANENT, Reply(0, "5.1.2", f"cannot route: {why}"))
            for rcpt, why in grouping.unroutable
        }
        if grouping.groups:
            try:
                delivered = self._loop.submit(self._deliver_groups(env, body, grouping.groups), self._job_timeout)
            except concurrent.futures.TimeoutError:
                raise RetryLater(f"delivery attempt took longer than {self._job_timeout:.0f}s", 60.0) from None
            results.update(delivered)
        return [results[r] for r in rcpts]

    async def _deliver_groups(
        self, env: Envelope, body: bytes, groups: dict[Destination, tuple[str, ...]]
    ) -> dict[str, RcptResult]:
        # One transaction per destination, all destinations at once.
        done = await asyncio.gather(*(self._deliver_group(env, body, d, r) for d, r in groups.items()))
        return {result.rcpt: result for results in done for result in results}

    async def _deliver_group(
        self, env: Envelope, body: bytes, dest: Destination, rcpts: tuple[str, ...]
    ) -> list[RcptResult]:
        async def hops() -> list[Hop]:
            if dest.kind == "mx":
                return await self._resolver.hops(dest.name, dest.port)
            return [Hop(dest.name, dest.name, dest.port)]

        async def delivered(accepted: Sequence[str]) -> None:
            # Durable right after the 250, before anything else can go wrong.
            try:
                rcpts = list(accepted)
                await self._loop.offload.run(lambda: self._ledger.record(env.queue_id, rcpts))
            except (SpoolError, ValueError, OSError):
                log.exception("queue_id=%s cannot record delivered recipients; a retry may duplicate", env.queue_id)

        tx = Transaction(
            env.mail_from, rcpts, body, smtputf8=env.smtputf8, eight_bit=env.eight_bit, crlf_clean=env.crlf_clean
        )
        started = time.monotonic()
        try:
            return await self._client.send(dest.key, hops, tx, delivered)
        finally:
            DELIVERY_SECONDS.observe(time.monotonic() - started)

    def _log_line(self, env: Envelope, rcpt: str, relay: str, dsn: str, status: str, reply: str) -> None:
        delay = max(0.0, (self._now() - env.received_at).total_seconds())
        event(
            log,
            f"queue_id={env.queue_id} to=<{rcpt}> relay={relay} delay={delay:.2f} dsn={dsn} status={status} ({reply})",
            queue_id=env.queue_id,
            to=rcpt,
            relay=relay,
            delay=round(delay, 2),
            dsn=dsn,
            status=status,
        )

    def _maybe_purge(self) -> None:
        """Forget delivered-recipient records of messages long gone, at most once an hour."""
        if time.monotonic() < self._next_purge or not self._purge_lock.acquire(blocking=False):
            return
        try:
            self._next_purge = time.monotonic() + PURGE_EVERY
            cutoff = self._now() - timedelta(seconds=self._config.max_queue_lifetime) - LEDGER_GRACE
            removed = self._ledger.purge(cutoff)
            if removed:
                log.info("purged %d delivered-recipient records older than %s", removed, cutoff.isoformat())
        except SpoolError:
            log.exception("cannot purge the delivered-recipient ledger")
        finally:
            self._purge_lock.release()

    # ------------------------------------------------------------ bounce

    def handle_bounce(self, job: Job) -> list[Output]:
        """Turn a bounce job into a DSN on the deliver queue (the job's continuation), or drop it
        when it must not be sent (null sender, infected message)."""
        env = job.envelope
        with bound(queue_id=env.queue_id):
            reason = suppression_reason(env)
            if reason is None and not env.failures:
                reason = "bounce job without failed recipients"
            if reason is not None:
                _BOUNCES_SUPPRESSED.inc()
                event(log, f"queue_id={env.queue_id} no bounce to <{env.mail_from}>: {reason}", queue_id=env.queue_id)
                return []
            now = self._now()
            dsn = build_dsn(env, job.body, reporting_mta=self._helo, now=now)
            dsn_env = dsn_envelope(
                env, dsn, reporting_mta=self._helo, now=now, lifetime=self._config.max_queue_lifetime
            )
            _BOUNCES_CREATED.inc()
            event(
                log,
                f"queue_id={env.parent_id or env.queue_id} sender non-delivery notification: {dsn_env.queue_id} "
                f"to=<{env.mail_from}> failed={len(env.failures)}",
                queue_id=env.queue_id,
                parent_id=env.parent_id,
                to=env.mail_from,
            )
            return [Output(Queue.DELIVER, dsn_env, dsn.data)]

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close pooled connections and stop the event loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.submit(self._client.aclose(), timeout=10.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            log.warning("closing pooled SMTP connections timed out")
        finally:
            self._loop.stop()
            self._ledger.close()

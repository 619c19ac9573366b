"""Runs one service or all of them in this process: the wiring of `smtpgw run`.

Builds the transport named by `[broker].url`, registers the consumers of the
requested roles, serves metrics, and on SIGTERM/SIGINT stops in the order that
loses nothing: stop accepting SMTP, let consumers finish their in-flight jobs
(they ack only after their outputs are durable), then close adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry

from shared import eventloop, malloc
from shared.config import Config
from shared.health import Health
from shared.metrics import QueueDepthCollector, serve
from shared.transport import Queue, Transport, open_transport

log = logging.getLogger(__name__)

ROLES = ("receiver", "scanner", "delivery", "quarantine", "updater")

# A stop that takes longer than this writes every thread's stack to stderr (once), so that a
# shutdown that hangs says where, instead of only taking long.
STOP_TRACE_AFTER = 10.0


@dataclass
class Running:
    """What `start` built, so `stop` (and tests) can take it down again."""

    transport: Transport
    closers: list[Callable[[], None]] = field(default_factory=list)


def start_consumers(
    config: Config, roles: set[str], transport: Transport, threads: int | None = None, health: Health | None = None
) -> Running:
    """Register the consumers of `roles` on `transport` and start it; `health` learns what the
    probes should ask of them (clamd for a scanner, the event loop of delivery)."""
    running = Running(transport)
    health = health or Health()
    if "scanner" in roles:
        from services.scanner.app import ClamdClient, build_handler
        from services.scanner.rules import LiveRules

        clamd = ClamdClient(config.scanner.clamd, config.scanner.clamd_timeout)
        rules = LiveRules(config.scanner)
        if config.scanner.rules_dir:
            # The updater announces new rules as a transport event; the scanners reload them live.
            transport.subscribe_events(rules.subscriber(transport.publish_event))
        transport.consume(Queue.SCAN, build_handler(config, clamd, rules), threads or config.scanner.threads)
        health.add_check("clamd", lambda: None if clamd.ping() else f"{clamd.address} does not answer PING")
    if "delivery" in roles:
        from services.delivery.app import Delivery

        delivery = Delivery(config)
        health.watch_loop("delivery loop", delivery.loop)
        transport.consume(Queue.DELIVER, delivery.handle_deliver, config.delivery.threads)
        # Bounces have their own queue and worker, so a bounce storm never starves normal delivery.
        transport.consume(Queue.BOUNCE, delivery.handle_bounce, 1)
        running.closers.append(delivery.close)
    if "quarantine" in roles:
        from services.quarantine.app import Quarantine

        quarantine = Quarantine(config)
        transport.consume(Queue.QUARANTINE, quarantine.handle, 1)
        # Poison messages land on dead; the quarantine files them under "dead" with their reason.
        transport.consume(Queue.DEAD, quarantine.handle_dead, 1)
        quarantine.start_purger()
        running.closers.append(quarantine.close)
    updater = None
    if "updater" in roles:
        from services.updater.app import Updater

        updater = Updater(config, transport)
        running.closers.append(updater.close)
    transport.start()
    if updater is not None:
        updater.start()  # after the transport, which carries its announcements to the scanners
    return running


@contextlib.contextmanager
def stacks_if_slow(seconds: float) -> Iterator[None]:
    """Write every thread's stack to stderr (once) if the block takes longer than `seconds`."""
    faulthandler.dump_traceback_later(seconds)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def stop_consumers(running: Running, timeout: float = 30.0) -> None:
    running.transport.stop(timeout)
    for close in running.closers:
        try:
            close()
        except Exception:
            log.exception("error while closing")


def register_collectors(registry: CollectorRegistry, config: Config, transport: Transport, roles: set[str]) -> None:
    """The metrics read at scrape time: queue depths and consumers, the updater's state."""
    consumers = getattr(transport, "consumers", None)  # the broker counts the consumers of each queue
    registry.register(
        QueueDepthCollector(
            [q.value for q in Queue],
            lambda q: transport.depth(Queue(q)),
            (lambda q: int(consumers(Queue(q)))) if consumers is not None else None,
        )
    )
    if "updater" in roles:
        from services.updater.app import collector

        registry.register(collector(config))


def run(config: Config, roles: set[str], threads: int | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    malloc.tune()
    transport = open_transport(config)
    health = Health()
    health.add_check("broker", transport.ready)
    if config.metrics.enabled:
        register_collectors(REGISTRY, config, transport, roles)
        serve(config.metrics.listen.host, config.metrics.listen.port, health=health)
    running = start_consumers(config, roles - {"receiver"}, transport, threads, health)
    log.info("started %s", ", ".join(sorted(roles)))
    try:
        if "receiver" in roles:
            eventloop.run(_serve_smtp(config, transport, health))
        else:
            _wait_for_signal()
    finally:
        log.info("stopping: finishing in-flight work")
        with stacks_if_slow(STOP_TRACE_AFTER):
            stop_consumers(running)
        log.info("stopped")
    return 0


async def _serve_smtp(config: Config, transport: Transport, health: Health) -> None:
    from services.receiver.app import Receiver

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    health.watch_loop("receiver loop", loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    receiver = Receiver(config, transport)
    await receiver.start()
    log.info("receiver listening on %s", config.receiver.listen)
    await stopping.wait()
    await receiver.stop()


def _wait_for_signal() -> None:
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with contextlib.suppress(KeyboardInterrupt):
        while not stopping.wait(1.0):
            pass

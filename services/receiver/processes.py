"""The extra receiver processes of `[receiver].processes`: one SMTP port, several event loops.

One Python process runs SMTP on one CPU core. With `processes = N`, the
`Receiver` of the runner's process (the leader) starts N - 1 more. Each has
its own event loop, its own transport (a broker connection or a spool writer:
it only publishes, it never consumes, and never runs the spool's start-up
recovery, which belongs to the consuming process) and its own `Receiver`, all
listening on the same port with SO_REUSEPORT, so the kernel spreads new
connections over them. Their limits add up in `limits.SharedCounters`.

The leader starts them with the spawn method (never fork: the runner's
process has threads), waits until each one listens, restarts one that dies
(after clearing what it counted) and, on stop, sends each SIGTERM: it stops
listening, closes its sessions and lets its publishes finish, as the leader
does. SIGINT (Ctrl-C reaches the whole process group) is left to the leader.
A process whose leader is gone stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
import types
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from multiprocessing.synchronize import Event
from typing import Any

from services.receiver.limits import SharedCounters
from shared import eventloop, malloc, metrics
from shared.config import Config
from shared.errors import GatewayError
from shared.logging import bind, event, setup
from shared.transport import Transport, open_transport

log = logging.getLogger(__name__)

# How often the leader looks for a process that died, and a process for a leader that died.
WATCH_INTERVAL = 1.0
# How long a new process may take to listen (it imports and connects to the broker first).
START_TIMEOUT = 60.0
# How long stop() waits for a process to finish its sessions before it is killed (see app.STOP_GRACE).
STOP_TIMEOUT = 40.0
# A process that keeps dying is restarted after a pause that doubles up to MAX_BACKOFF; one that
# stayed up for STABLE seconds starts again from the first pause.
MAX_BACKOFF = 30.0
STABLE = 60.0


def _mappingproxy(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


def _reduce_mappingproxy(m: types.MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return _mappingproxy, (dict(m),)


# A Config holds read-only dicts (mappingproxy), which pickle refuses; a spawned process gets
# its Config through multiprocessing's own pickler, taught here to copy them.
ForkingPickler.register(types.MappingProxyType, _reduce_mappingproxy)


class ReceiverProcesses:
    """The leader's handle on processes 1 .. N-1 of its group."""

    def __init__(self, config: Config, port: int, counters: SharedCounters) -> None:
        self._config = config
        self._port = port
        self._counters = counters
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, tuple[BaseProcess, Event]] = {}
        self._started: dict[int, float] = {}  # slot -> loop time its process started
        self._backoff: dict[int, float] = {}  # slot -> pause before its next restart
        self._watch: asyncio.Task[None] | None = None

    @property
    def pids(self) -> list[int]:
        """The process ids of the group's other processes (running or starting)."""
        return [p.pid for p, _ in self._processes.values() if p.pid is not None]

    async def start(self) -> None:
        """Start every process and wait until each listens; raise GatewayError if one cannot."""
        for slot in range(1, self._counters.processes):
            self._processes[slot] = self._spawn(slot)
        try:
            for slot in list(self._processes):
                await self._ready(slot)
        except BaseException:
            await self.stop()
            raise
        self._watch = asyncio.get_running_loop().create_task(self._watch_loop())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        procs = [p for p, _ in self._processes.values()]
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: a graceful stop
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _join_all, procs, STOP_TIMEOUT)
        for slot, (p, _) in self._processes.items():
            if p.is_alive():
                log.error("receiver process %d did not stop in %.0fs; killing it", slot, STOP_TIMEOUT)
                p.kill()
                await loop.run_in_executor(None, p.join)
            p.close()
            self._counters.clear(slot)
        self._processes.clear()

    # ------------------------------------------------------------ internals

    def _spawn(self, slot: int) -> tuple[BaseProcess, Event]:
        ready = self._context.Event()
        process = self._context.Process(
            target=run_process,
            args=(self._config, self._port, self._counters.path, slot, ready, os.getpid()),
            name=f"smtpgw-receiver-{slot}",
            daemon=True,  # multiprocessing ends it if the leader exits without stop()
        )
        process.start()
        self._started[slot] = asyncio.get_running_loop().time()
        return process, ready

    async def _ready(self, slot: int) -> None:
        process, ready = self._processes[slot]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not await loop.run_in_executor(None, ready.wait, 0.5):
            if not process.is_alive():
                raise GatewayError(f"receiver process {slot} exited with code {process.exitcode} while starting")
            if loop.time() > deadline:
                raise GatewayError(f"receiver process {slot} did not listen within {START_TIMEOUT:.0f}s")

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due: dict[int, float] = {}  # slot -> when its dead process is started again
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = loop.time()
            for slot, (process, _) in list(self._processes.items()):
                if process.exitcode is None:
                    continue
                if slot not in due:
                    if now - self._started[slot] >= STABLE:
                        self._backoff[slot] = WATCH_INTERVAL
                    pause = self._backoff.get(slot, WATCH_INTERVAL)
                    self._backoff[slot] = min(pause * 2, MAX_BACKOFF)
                    due[slot] = now + pause - WATCH_INTERVAL
                    event(log, "receiver process died", level=logging.ERROR, process=slot,
                          exit_code=process.exitcode, restart_in=pause)  # fmt: skip
                    self._counters.clear(slot)  # its connections and DATA bytes went with it
                if now >= due[slot]:
                    del due[slot]
                    # Replace, then close: `pids` (read from other threads) never meets a closed process.
                    self._processes[slot] = self._spawn(slot)
                    process.close()


def _join_all(procs: list[BaseProcess], timeout: float) -> None:
    """Wait for every process to end, `timeout` seconds for all of them together."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


def run_process(config: Config, port: int, counters: str, slot: int, ready: Event, leader: int) -> None:
    """Process `slot` of the group: serve SMTP on `port` until SIGTERM or the leader is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the leader's to handle; it sends SIGTERM
    setup(config.logging.level, config.logging.format, service="receiver")
    bind(process=slot)
    malloc.tune()
    if config.metrics.enabled:
        try:
            metrics.serve(config.metrics.listen.host, config.metrics.listen.port + slot)
        except OSError as exc:
            log.error("receiver process %d serves no metrics: %s", slot, exc)
    transport = open_transport(config)  # publish only: never start()ed (see the module docstring)
    try:
        eventloop.run(_serve(config, transport, port, counters, slot, ready, leader))
    finally:
        transport.stop()


async def _serve(
    config: Config, transport: Transport, port: int, path: str, slot: int, ready: Event, leader: int
) -> None:
    from services.receiver.app import Receiver  # app imports this module

    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    counters = SharedCounters(path, config.receiver.processes, slot)
    try:
        receiver = Receiver(config, transport, member=(counters, port))
        await receiver.start()
        ready.set()
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), WATCH_INTERVAL)
            if os.getppid() != leader:
                log.warning("receiver process %d: the leading process is gone, stopping", slot)
                break
        await receiver.stop()
    finally:
        counters.close()

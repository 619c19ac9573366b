"""Receiver wiring: listen on `[receiver].listen`, one `ReceiverSMTP` per connection.

The runner builds the transport and calls `start()` / `stop()`; everything a
session needs (handler, connection gate, memory budget, publish threads) is
built here and passed in, never global. With `[receiver].processes` above 1
this Receiver leads a group: it starts the other processes (`processes.py`),
which listen on the same port, and the group's limits are counted together.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from services.receiver.handler import ReceiverHandler
from services.receiver.limits import ConnectionGate, MemoryBudget, SharedCounters
from services.receiver.processes import ReceiverProcesses
from services.receiver.smtp import ReceiverSMTP
from shared import metrics
from shared.config import Config, HostPort
from shared.logging import event
from shared.offload import Offload
from shared.transport import Transport

log = logging.getLogger(__name__)

# Pending connections the kernel queues for us (a burst of clients must not see resets).
BACKLOG = 511

# How long stop() waits for sessions to end once told to close.
STOP_GRACE = 30.0


class Receiver:
    """The SMTP front door: accepts mail and publishes it to the scan queue."""

    def __init__(
        self, config: Config, transport: Transport, *, member: tuple[SharedCounters, int] | None = None
    ) -> None:
        """`member` is for the other processes of a group (see processes.py): the group's
        counters and the port the leader listens on."""
        self._config = config
        self._transport = transport
        settings = config.receiver
        self._member = member
        counters: SharedCounters | None = None
        if member is not None:
            counters = member[0]
        elif settings.processes > 1:
            counters = SharedCounters.create(settings.processes)
        self._counters = counters
        self._gate = ConnectionGate(settings.max_connections, settings.max_connections_per_client, counters)
        self._budget = MemoryBudget(settings.data_memory_budget, metrics.DATA_INFLIGHT.set, counters)
        self._sessions: set[ReceiverSMTP] = set()
        self._server: asyncio.Server | None = None
        self._offload: Offload | None = None
        self._processes: ReceiverProcesses | None = None

    async def start(self) -> None:
        """Bind `[receiver].listen` and start accepting connections."""
        loop = asyncio.get_running_loop()
        settings = self._config.receiver
        # publish() blocks (fsync, broker confirm): it runs on these threads, never on the loop.
        self._offload = Offload(settings.workers, "receiver-publish")
        self._offload.start(loop)
        handler = ReceiverHandler(self._config, self._transport, self._offload)

        def session() -> ReceiverSMTP:
            return ReceiverSMTP(
                handler, settings=settings, gate=self._gate, budget=self._budget, sessions=self._sessions, loop=loop
            )

        host, port = settings.listen
        if self._member is not None:
            port = self._member[1]  # the leader's (it may have been given port 0)
        # A group's processes share the port; SO_REUSEPORT admits only sockets of the same user.
        group = self._counters is not None
        if host == "::" and socket.has_dualstack_ipv6():
            # "[::]:25" means every address, IPv4 too, as on most MTAs; asyncio alone would make it
            # IPv6-only. IPv4 peers then show up as ::ffff:a.b.c.d (the policy normalises them).
            sock = socket.create_server(
                (host, port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=BACKLOG, reuse_port=group
            )
            self._server = await loop.create_server(session, sock=sock, backlog=BACKLOG)
        else:
            self._server = await loop.create_server(
                session, host=host or None, port=port, reuse_address=True, reuse_port=group, backlog=BACKLOG
            )
        event(log, "receiver listening", address=str(HostPort(host, self.port)))
        if self._counters is not None and self._member is None:
            self._processes = ReceiverProcesses(self._config, self.port, self._counters)
            try:
                await self._processes.start()
            except BaseException:
                self._processes = None
                await self.stop()
                raise
            event(log, "receiver processes listening", processes=settings.processes)

    async def stop(self) -> None:
        """Stop listening, close every session, wait for publishes already under way (in the
        group's other processes too)."""
        if self._server is not None:
            self._server.close()
        if self._processes is not None:
            await self._processes.stop()
            self._processes = None
        sessions = list(self._sessions)
        for s in sessions:
            s.close()
        tasks = [t for s in sessions if (t := s.task) is not None and not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._offload is not None:
            # A publish that was running when its session closed still finishes: it may be durable.
            await asyncio.get_running_loop().run_in_executor(None, self._offload.stop)
            self._offload = None
        if self._counters is not None and self._member is None:
            self._counters.close(unlink=True)

    @property
    def port(self) -> int:
        """The port actually bound (`[receiver].listen` may say 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the receiver is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def pids(self) -> list[int]:
        """Process ids of the group's other processes (none unless `[receiver].processes` > 1)."""
        return self._processes.pids if self._processes is not None else []

    @property
    def connections(self) -> int:
        """Connections open now (refused ones are not counted)."""
        return self._gate.open

    @property
    def data_inflight(self) -> int:
        """DATA bytes all sessions hold in memory now (see `[receiver].data_memory_budget`)."""
        return self._budget.in_use

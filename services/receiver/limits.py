"""Shared counters that bound what all SMTP sessions together may take.

`ConnectionGate` caps simultaneous connections (in total and per client IP);
`MemoryBudget` caps the DATA bytes held in memory by all sessions at once.
One instance of each belongs to a `Receiver` and is handed to every session.
In one process they are plain counters used from the event loop thread only:
no locks, no I/O. With `[receiver].processes` above 1, the receiver processes
of one gateway count together in `SharedCounters` (memory shared between the
processes), so every limit holds for all of them as it does for one.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator

TOO_MANY = "Too many connections, try again later"
TOO_MANY_FROM_CLIENT = "Too many connections from your address, try again later"


class SharedCounters:
    """What the ConnectionGate and MemoryBudget of a group of receiver processes count, together.

    One file (on /dev/shm when there is one), mapped into every process of
    the group. Each process has a slot for what it counted itself: open
    connections, DATA bytes held, open connections per client bucket. Every
    decision adds up all slots while holding an flock on the file, so two
    processes never both take the last place. The kernel drops the lock of a
    process that dies, and the parent clears a dead process's slot before it
    starts another (`clear`): a crash leaks no place.

    Clients are counted by a stable hash of their address in BUCKETS buckets:
    two addresses in one bucket share its allowance, which is stricter, never
    looser, than counting each.
    """

    BUCKETS = 65536
    _FIELDS = 2  # open connections, DATA bytes; the buckets follow

    def __init__(self, path: str, processes: int, slot: int) -> None:
        self.path = path
        self.processes = processes
        self.slot = slot
        self._stride = self._FIELDS + self.BUCKETS
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, processes * self._stride * 8)
        self._values = memoryview(self._map).cast("q")
        self._own = slot * self._stride
        self._final: tuple[int, int] | None = None  # (connections, data) when closed

    @classmethod
    def create(cls, processes: int) -> SharedCounters:
        """A new, zeroed file for `processes` processes; this process takes slot 0."""
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="smtpgw-receiver-", suffix=".counters", dir=directory)
        try:
            os.ftruncate(fd, processes * (cls._FIELDS + cls.BUCKETS) * 8)
        finally:
            os.close(fd)
        return cls(path, processes, 0)

    def close(self, *, unlink: bool = False) -> None:
        """Unmap (and with `unlink`, remove) the file; the totals stay readable as they were."""
        if self._final is not None:
            return
        self._final = (self._sum(0), self._sum(1))
        self._values.release()
        self._map.close()
        os.close(self._fd)
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sum(self, offset: int) -> int:
        values, stride = self._values, self._stride
        return sum(values[slot * stride + offset] for slot in range(self.processes))

    def _bucket(self, ip: str) -> int:
        return self._FIELDS + zlib.crc32(ip.encode("utf-8", "surrogateescape")) % self.BUCKETS

    # ------------------------------------------------------------ connections

    @property
    def connections(self) -> int:
        return self._sum(0) if self._final is None else self._final[0]

    def admit(self, ip: str, max_total: int, max_per_client: int) -> str | None:
        bucket = self._bucket(ip)
        with self._locked():
            if self._sum(0) >= max_total:
                return TOO_MANY
            if self._sum(bucket) >= max_per_client:
                return TOO_MANY_FROM_CLIENT
            self._values[self._own] += 1
            self._values[self._own + bucket] += 1
        return None

    def leave(self, ip: str) -> None:
        bucket = self._bucket(ip)
        with self._locked():
            self._values[self._own] -= 1
            self._values[self._own + bucket] -= 1

    # ------------------------------------------------------------ DATA bytes

    @property
    def data(self) -> int:
        return self._sum(1) if self._final is None else self._final[1]

    def take(self, n: int, limit: int) -> int | None:
        """This process's bytes once `n` more are taken, or None (nothing taken) when the group's
        total would pass `limit`."""
        with self._locked():
            if self._sum(1) + n > limit:
                return None
            self._values[self._own + 1] += n
            return self._values[self._own + 1]

    def give(self, n: int) -> int:
        """This process's bytes once `n` are given back."""
        with self._locked():
            self._values[self._own + 1] -= n
            return self._values[self._own + 1]

    def clear(self, slot: int) -> None:
        """Forget what the process of `slot` counted (it is gone: its connections and bytes with it)."""
        start = slot * self._stride
        with self._locked():
            self._values[start : start + self._stride] = memoryview(bytes(self._stride * 8)).cast("q")


class ConnectionGate:
    """Admits a connection unless `max_total` are open, or `max_per_client` from that IP."""

    def __init__(self, max_total: int, max_per_client: int, shared: SharedCounters | None = None) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._shared = shared
        self._per_client: Counter[str] = Counter()
        self._total = 0

    @property
    def open(self) -> int:
        """Connections open now (in every process of the group, when shared)."""
        return self._shared.connections if self._shared is not None else self._total

    def admit(self, ip: str) -> str | None:
        """Count the connection in and return None, or return why it is refused (not counted)."""
        if self._shared is not None:
            return self._shared.admit(ip, self.max_total, self.max_per_client)
        if self._total >= self.max_total:
            return TOO_MANY
        if self._per_client[ip] >= self.max_per_client:
            return TOO_MANY_FROM_CLIENT
        self._total += 1
        self._per_client[ip] += 1
        return None

    def leave(self, ip: str) -> None:
        """An admitted connection closed."""
        if self._shared is not None:
            self._shared.leave(ip)
            return
        self._total -= 1
        self._per_client[ip] -= 1
        if self._per_client[ip] <= 0:
            del self._per_client[ip]


class MemoryBudget:
    """Bytes of message data that sessions may hold in memory together.

    A session takes bytes as DATA arrives and gives them back once the
    message is stored or refused. `take` never blocks: when the budget is
    spent the caller discards its data and answers 451 4.3.1.
    """

    def __init__(
        self, limit: int, observe: Callable[[int], None] | None = None, shared: SharedCounters | None = None
    ) -> None:
        self.limit = limit
        self._in_use = 0
        # e.g. a gauge's `set`, told this process's total after each change (a group's processes
        # each report their own, so that their gauges add up)
        self._observe = observe
        self._shared = shared

    @property
    def in_use(self) -> int:
        """Bytes held now (by every process of the group, when shared)."""
        return self._shared.data if self._shared is not None else self._in_use

    def take(self, n: int) -> bool:
        if self._shared is not None:
            mine = self._shared.take(n, self.limit)
            if mine is None:
                return False
            total = mine
        else:
            if self._in_use + n > self.limit:
                return False
            self._in_use += n
            total = self._in_use
        if self._observe:
            self._observe(total)
        return True

    def give(self, n: int) -> None:
        if n:
            if self._shared is not None:
                total = self._shared.give(n)
            else:
                self._in_use -= n
                total = self._in_use
            if self._observe:
                self._observe(total)

"""Shared counters that bound what all SMTP sessions together may take.

`ConnectionGate` caps simultaneous connections (in total and per client IP);
`MemoryBudget` caps the DATA bytes held in memory by all sessions at once.
One instance of each belongs to a `Receiver` and is handed to every session.
They are plain counters used from the event loop thread only: no locks, no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class ConnectionGate:
    """Admits a connection unless `max_total` are open, or `max_per_client` from that IP."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._per_client: Counter[str] = Counter()
        self._total = 0

    @property
    def open(self) -> int:
        return self._total

    def admit(self, ip: str) -> str | None:
        """Count the connection in and return None, or return why it is refused (not counted)."""
        if self._total >= self.max_total:
            return "Too many connections, try again later"
        if self._per_client[ip] >= self.max_per_client:
            return "Too many connections from your address, try again later"
        self._total += 1
        self._per_client[ip] += 1
        return None

    def leave(self, ip: str) -> None:
        """An admitted connection closed."""
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

    def __init__(self, limit: int, observe: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.in_use = 0
        self._observe = observe  # e.g. a gauge's `set`, told the new total after each change

    def take(self, n: int) -> bool:
        if self.in_use + n > self.limit:
            return False
        self.in_use += n
        if self._observe:
            self._observe(self.in_use)
        return True

    def give(self, n: int) -> None:
        if n:
            self.in_use -= n
            if self._observe:
                self._observe(self.in_use)

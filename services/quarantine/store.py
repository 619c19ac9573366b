"""Quarantine store: messages the scanner would not deliver, kept for an admin.

Layout: `<dir>/<category>/<queue_id>`, one file per message in the spool
file format (envelope with its verdicts, then the original bytes), written
tmp -> fsync -> rename so an entry is either whole or absent. The category
(virus, attachment, archive, encrypted, unscannable, limits, dead, ...) is the
directory; the reasons are the envelope's verdicts (for "dead", the poison
messages off the dead queue, its `last_error`); the quarantine time is the
file's mtime, which the retention purge reads.

The `smtpgw quarantine list|show|release|delete|purge` verbs and the
quarantine consumer both use this module; nothing else touches the directory.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from shared.envelope import QUEUE_ID, Action, Envelope
from shared.errors import GatewayError
from shared.spool import pack, read_envelope, read_file


class QuarantineError(GatewayError):
    """No such quarantine entry, or it cannot be stored."""


@dataclass(frozen=True, slots=True)
class Entry:
    queue_id: str
    category: str
    quarantined_at: float
    envelope: Envelope
    path: str

    @property
    def reason(self) -> str:
        if self.category == DEAD:
            return self.envelope.last_error or "moved to dead without a reason"
        return "; ".join(f"{v.category}: {v.reason}" for v in self.envelope.verdicts if v.action != Action.DELIVER)


# The category of poison messages: jobs that crashed their consumer MAX_CRASHES times.
DEAD = "dead"


def category_of(envelope: Envelope) -> str:
    """The directory a message goes to: its first non-deliver verdict's category."""
    for verdict in envelope.verdicts:
        if verdict.action in (Action.QUARANTINE, Action.STRIP, Action.DELETE):
            return verdict.category
    return DEAD if envelope.last_error else "other"


class QuarantineStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def put(self, envelope: Envelope, body: bytes, category: str | None = None) -> Entry:
        """Store a message under `category` (default: `category_of` its verdicts), replacing an
        entry of the same id and category (a job retried after a crash stores it again)."""
        category = category or category_of(envelope)
        if not QUEUE_ID.fullmatch(envelope.queue_id) or not QUEUE_ID.fullmatch(category):
            raise QuarantineError(f"refusing unsafe name {category}/{envelope.queue_id}")
        folder = os.path.join(self.root, category)
        path = os.path.join(folder, envelope.queue_id)
        tmp = os.path.join(self.root, f".tmp-{envelope.queue_id}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.writelines(pack(envelope, body))
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, path)
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise QuarantineError(f"cannot store {category}/{envelope.queue_id}: {exc.strerror}") from None
        return Entry(envelope.queue_id, category, os.stat(path).st_mtime, envelope, path)

    def entries(self, category: str | None = None) -> Iterator[Entry]:
        """Every entry (of one category), oldest first."""
        if not os.path.isdir(self.root):
            return
        found = []
        for cat in sorted(os.listdir(self.root)):
            folder = os.path.join(self.root, cat)
            if cat.startswith(".") or not os.path.isdir(folder) or (category and cat != category):
                continue
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError, GatewayError, ValueError):
                    found.append(Entry(name, cat, os.stat(path).st_mtime, read_envelope(path), path))
        yield from sorted(found, key=lambda e: e.quarantined_at)

    def get(self, queue_id: str) -> Entry:
        if not QUEUE_ID.fullmatch(queue_id):
            raise QuarantineError(f"no quarantined message {queue_id!r}")
        for entry in self.entries():
            if entry.queue_id == queue_id:
                return entry
        raise QuarantineError(f"no quarantined message {queue_id!r}")

    def read(self, queue_id: str) -> tuple[Entry, bytes]:
        entry = self.get(queue_id)
        return entry, read_file(entry.path)[1]

    def delete(self, queue_id: str) -> Entry:
        entry = self.get(queue_id)
        os.unlink(entry.path)
        return entry

    def purge(self, retention: float, now: float | None = None) -> int:
        """Delete entries older than `retention` seconds; returns how many."""
        cutoff = (time.time() if now is None else now) - retention
        removed = 0
        for entry in self.entries():
            if entry.quarantined_at < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

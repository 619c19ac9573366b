"""The ledger of delivered recipients: what keeps a redelivered message from going out twice.

Delivery records each recipient right after the downstream server's 250 to
DATA, durably, under the message's queue id. When the same message comes
back (a crash after the 250 but before the queue step committed, or a broker
redelivery after a lost ack), recipients already recorded are skipped. At
least once on the queue, at most once per recipient downstream, as far as
the window between the 250 and the fsync allows (RFC 1047 describes the rest).

`DeliveryLedger` is the interface; `FileLedger` keeps one append-only file per
queue id under `<spool.dir>/delivered/`, good for one host. A networked
implementation for several hosts can take its place without the service
changing.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Protocol

from shared.errors import SpoolError

# Queue ids are base32 plus derived suffixes (".b1"); anything else could escape the directory.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class DeliveryLedger(Protocol):
    def was_delivered(self, queue_id: str, rcpt: str) -> bool:
        """Was `rcpt` of message `queue_id` recorded as delivered?"""

    def record(self, queue_id: str, rcpts: Iterable[str]) -> None:
        """Record recipients as delivered; durable when it returns. Raises SpoolError."""

    def purge(self, older_than: datetime) -> int:
        """Forget messages last recorded before `older_than`; returns how many."""


class FileLedger:
    """One file per queue id, one recipient per line, appended and fsynced."""

    def __init__(self, directory: str, *, fsync: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self._fsync = fsync
        self._lock = threading.Lock()
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create {self.directory}: {exc.strerror}") from None

    def _path(self, queue_id: str) -> str:
        if not _SAFE_ID.fullmatch(queue_id):
            raise ValueError(f"unsafe queue id {queue_id!r}")
        return os.path.join(self.directory, queue_id)

    def delivered(self, queue_id: str) -> set[str]:
        """Every recipient recorded for `queue_id`."""
        try:
            with open(self._path(queue_id), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise SpoolError(f"cannot read the delivery ledger of {queue_id}: {exc.strerror}") from None
        # A crash mid-append leaves a last line without its newline: it was never acknowledged.
        lines = data.split(b"\n")[:-1]
        return {line.decode("utf-8", "replace") for line in lines if line}

    def was_delivered(self, queue_id: str, rcpt: str) -> bool:
        return rcpt in self.delivered(queue_id)

    def record(self, queue_id: str, rcpts: Iterable[str]) -> None:
        data = b"".join(r.encode("utf-8") + b"\n" for r in rcpts if "\n" not in r)
        if not data:
            return
        path = self._path(queue_id)
        with self._lock:
            try:
                created = False
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
                    created = True
                except FileExistsError:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(fd, data)
                    if self._fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                if created and self._fsync:
                    # A new file counts only once its directory entry is durable too.
                    dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
            except OSError as exc:
                raise SpoolError(f"cannot record delivery of {queue_id}: {exc.strerror}") from None

    def purge(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()
        removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise SpoolError(f"cannot list {self.directory}: {exc.strerror}") from None
        for name in names:
            path = os.path.join(self.directory, name)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
        return removed

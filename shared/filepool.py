"""Spool files kept for reuse: a finished job's file is renamed into `<spool>/free/` instead
of unlinked, and the next message written takes one from there instead of creating a file.

Why: every message costs the spool two files created and two removed (receiver -> scan,
scanner -> deliver). Creating a file allocates an inode, and ext4 without a journal
(`ext4_fsync_nojournal`, as on the benchmark machine) then skips every inode freed in the
last 5 s to 5 min (`recently_deleted`), reading the inode table for each: at a few hundred
messages a second that walk took 15-18% of the receiver's and the scanner's CPU (perf).
Reusing an inode skips the allocator and the free.

The danger is a machine crash undoing directory changes, which reuse must not turn into a
wrong message:
- A released file's old name (`deliver/<id>,<gen>`) may come back after a crash while its
  inode already holds another message. So a pooled file is reused only after the directory
  it was released from was fsynced: `before_reuse` gets those directories (their names are
  in the pooled file's name) after the pool was listed and before anything listed is handed
  out; an fsync that starts after the listing covers every release the listing saw.
- A pooled file's own name may come back after a crash while its inode was already reused
  (the free directory is never fsynced): pooled names carry the boot they were released in,
  and names from another boot are only ever unlinked, never reused.
Large files are unlinked rather than pooled (they would hold their disk space), and the
pool holds about `max_files` files at most (each process counts from its last listing).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_FILES = 256
MAX_BYTES = 1 << 20  # larger files are unlinked
LIST_EVERY = 0.05  # after finding the pool empty, a claimer looks again at most this often (s)
COUNT_EVERY = 1.0  # a releaser recounts the pool at most this often (s)


def _boot_id() -> str:
    """This boot's id (a crash ends a boot), or "" where the kernel does not tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip().replace("-", "")[:16]
    except OSError:
        return ""


class FilePool:
    """Files in `directory`, named `<boot>.<source dir>.<pid>.<n>`, to be reused by writers."""

    def __init__(
        self,
        directory: str,
        before_reuse: Callable[[set[str]], None],
        *,
        max_files: int = MAX_FILES,
        max_bytes: int = MAX_BYTES,
        boot: str | None = None,
    ) -> None:
        self.directory = directory
        self._before_reuse = before_reuse
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._boot = _boot_id() if boot is None else boot
        self._lock = threading.Lock()
        self._ready: deque[str] = deque()  # listed, and their source directories fsynced since
        self._count = 0  # pooled files, as of the last listing plus this process's changes since
        self._counted = float("-inf")  # monotonic time of the last listing
        self._empty = float("-inf")  # ... and of the last one for claims that found nothing
        self._seq = itertools.count()
        os.makedirs(directory, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return bool(self._boot) and self._max_files > 0

    def release(self, path: str, size: int) -> None:
        """Done with the file at `path` (about `size` bytes): pool it, or unlink it. A file
        already gone is fine."""
        source = os.path.basename(os.path.dirname(path))
        if self.enabled and size <= self._max_bytes and "." not in source:
            if time.monotonic() - self._counted > COUNT_EVERY:
                self._list()
            with self._lock:
                room = self._count < self._max_files
                if room:
                    self._count += 1
            if room:
                name = f"{self._boot}.{source}.{os.getpid()}.{next(self._seq)}"
                try:
                    os.rename(path, os.path.join(self.directory, name))
                    return
                except FileNotFoundError:
                    self._uncount()
                    return
                except OSError as exc:  # fall back to unlinking it
                    self._uncount()
                    log.debug("cannot pool %s: %s", path, exc.strerror)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def claim(self, path: str) -> bool:
        """Move a pooled file to `path` (a writer's tmp name); False when there is none."""
        if not self.enabled:
            return False
        while True:
            with self._lock:
                name = self._ready.popleft() if self._ready else None
            if name is None:
                if time.monotonic() - self._empty < LIST_EVERY or not self._refill():
                    return False
                continue
            try:
                os.rename(os.path.join(self.directory, name), path)
            except FileNotFoundError:
                continue  # another process took it
            except OSError as exc:
                log.debug("cannot reuse %s: %s", name, exc.strerror)
                return False
            self._uncount()
            return True

    def _uncount(self) -> None:
        with self._lock:
            self._count = max(0, self._count - 1)

    def _list(self) -> list[str]:
        """The pool's reusable names; names from an earlier boot are unlinked."""
        self._counted = time.monotonic()
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            log.warning("cannot list %s: %s", self.directory, exc.strerror)
            return []
        prefix = self._boot + "."
        usable = [n for n in names if n.startswith(prefix) and n.count(".") == 3]
        for stale in set(names) - set(usable):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, stale))
        with self._lock:
            self._count = len(usable)
        return usable

    def _refill(self) -> bool:
        names = self._list()
        if not names:
            self._empty = time.monotonic()
            return False
        try:
            self._before_reuse({n.split(".")[1] for n in names})
        except OSError as exc:
            log.warning("cannot fsync before reusing spool files: %s", exc.strerror)
            return False
        with self._lock:
            known = set(self._ready)
            self._ready.extend(n for n in names if n not in known)
        return True

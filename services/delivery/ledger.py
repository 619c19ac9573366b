"""The ledger of delivered recipients: what keeps a redelivered message from going out twice.

Delivery records each recipient right after the downstream server's 250 to
DATA, durably, under the message's queue id. When the same message comes
back (a crash after the 250 but before the queue step committed, or a broker
redelivery after a lost ack), recipients already recorded are skipped. At
least once on the queue, at most once per recipient downstream, as far as
the window between the 250 and the fsync allows (RFC 1047 describes the rest).

`DeliveryLedger` is the interface, chosen by `[delivery].ledger`
(`open_ledger`):

- `FileLedger` ("file", the default) appends to journal files under
  `<spool.dir>/delivered/journal/` and answers from an index in memory: one
  write and one fdatasync serve every thread recording at the same moment,
  and a lookup touches no disk. Good for delivery processes on one host.
- `RedisLedger` ("redis://host:port/db") keeps one Redis set per queue id,
  `<namespace>:delivered:<queue_id>`, which expires on its own after the
  queue lifetime plus a day: delivery processes on several hosts share it, so
  a message redelivered to another host is not sent twice either. A record
  is as durable as Redis makes it: run Redis with `appendonly yes` (and
  `appendfsync always` for no loss at all), or a crash of Redis forgets what
  was delivered and redelivered messages may go out twice.

What stays at-least-once whatever the ledger: a crash between the
downstream server's 250 and the record (a few milliseconds), a record that
failed (logged), and a ledger that was wiped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from shared.envelope import QUEUE_ID
from shared.errors import SpoolError

if TYPE_CHECKING:
    from shared.config import Config

log = logging.getLogger(__name__)


class LedgerError(SpoolError):
    """The ledger cannot be read or written (its directory, or the Redis server)."""


class DeliveryLedger(Protocol):
    def was_delivered(self, queue_id: str, rcpt: str) -> bool:
        """Was `rcpt` of message `queue_id` recorded as delivered? Raises SpoolError (LedgerError)
        when the ledger cannot be asked: the caller must not guess."""

    def record(self, queue_id: str, rcpts: Iterable[str]) -> None:
        """Record recipients as delivered; durable when it returns. Raises SpoolError."""

    def purge(self, older_than: datetime) -> int:
        """Forget what was recorded before `older_than`; returns how many recipient records."""

    def close(self) -> None:
        """Let go of connections; the ledger is not used afterwards."""


class FileLedger:
    """Append-only journals with group commit, and an index of them in memory.

    Layout: `<directory>/journal/<UTC time>-<pid>-<random>.journal`, one line
    `<queue_id> <recipient>\\n` per delivered recipient. Each process appends to a
    segment of its own, which it holds an exclusive flock on while it writes it, and
    starts a new one every UTC day and every `SEGMENT_BYTES`. So:

    - Each record is written at once (a crash of the process no longer loses it),
      and threads recording at once share one fdatasync (group commit, as a database
      shares a log flush): the first of them to find no sync running syncs everything
      written so far, and the others wait for a sync that began after their write.
      `record` returns only once its lines are on disk.
    - A crash mid-append leaves a last line without its newline: it was never
      acknowledged, and readers ignore it. Nothing is ever appended after it, since
      no process writes to another's segment, nor to its own after a failed write.
    - The index is rebuilt from every segment at start. Another process's segment
      still being written (flock held) is read on from where the index stopped,
      whenever a lookup does not find a recipient, so a message that another
      delivery process delivered is still not sent again from here.
    - `purge` unlinks whole segments last written before the cutoff.

    The index keeps a 64-bit hash per line (a set while a segment grows, then sorted
    arrays of `RUN_SIZE` hashes: 8 bytes a recipient); a hash that matches is
    confirmed against the segment's text, so an answer "delivered" is always exact.
    Files of the older layout (one file per queue id directly in `directory`) are
    still read and purged, so an upgrade does not forget what was delivered.
    """

    def __init__(self, directory: str, *, fsync: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self.journal_dir = os.path.join(self.directory, JOURNAL_DIR)
        self._fsync = fsync
        # The index: segments by file name, guarded by _lock.
        self._lock = threading.Lock()
        self._segments: dict[str, _Segment] = {}
        self._dir_mtime = -1
        # The writer: this process's segment, guarded by _commit (group commit).
        self._commit = threading.Condition(threading.Lock())
        self._pending = _Batch()  # written, waiting for a sync
        self._syncing = False  # a thread is syncing (outside the lock)
        self._own: _Segment | None = None
        self._own_fd = -1
        self._own_day = ""
        self._own_size = 0
        self._own_torn = False  # a write to it failed: start another
        try:
            os.makedirs(self.journal_dir, exist_ok=True)
            self._legacy = any(QUEUE_ID.fullmatch(name) and name != JOURNAL_DIR for name in os.listdir(self.directory))
            with self._lock:
                self._scan()
        except OSError as exc:
            raise LedgerError(f"cannot open the delivery ledger {self.directory}: {exc.strerror}") from None

    # ------------------------------------------------------------ interface

    def was_delivered(self, queue_id: str, rcpt: str) -> bool:
        line = _line(queue_id, rcpt)
        if line is None:
            return False  # never recorded (see `record`)
        key = hash(line)
        try:
            with self._lock:
                if self._holds(line, key):
                    return True
                # Another process may have recorded it since: read on, then look again.
                if self._refresh() and self._holds(line, key):
                    return True
            return self._legacy and rcpt in self._legacy_rcpts(queue_id)
        except OSError as exc:
            raise LedgerError(f"cannot read the delivery ledger of {queue_id}: {exc.strerror}") from None

    def record(self, queue_id: str, rcpts: Iterable[str]) -> None:
        # A recipient with a line feed cannot be written as a line; nor can it be sent over SMTP.
        lines = [line for line in (_line(queue_id, r) for r in rcpts) if line is not None]
        if not lines:
            return
        try:
            segment = self._append(b"".join(line + b"\n" for line in lines))
        except OSError as exc:
            raise LedgerError(f"cannot record delivery of {queue_id}: {exc.strerror}") from None
        with self._lock:
            for line in lines:
                segment.add(hash(line))

    def purge(self, older_than: datetime) -> int:
        """Unlink segments (and old-layout files) last written before `older_than`; returns how
        many recipient records went with them. A message's records span no more than its
        lifetime, which the cutoff (lifetime plus a day) leaves behind."""
        cutoff = older_than.timestamp()
        removed = 0
        try:
            with self._lock:
                self._scan()
                for name in sorted(self._segments):
                    segment = self._segments[name]
                    if segment is self._own:
                        continue  # rotated on its next write at the latest (a new day)
                    try:
                        if os.stat(segment.path).st_mtime >= cutoff:
                            continue
                        os.unlink(segment.path)
                    except FileNotFoundError:
                        pass
                    removed += segment.count
                    segment.close()
                    del self._segments[name]
                for name in os.listdir(self.journal_dir):
                    if name.endswith(_NEW):  # a segment whose creation a crash interrupted: empty
                        _unlink_if_older(os.path.join(self.journal_dir, name), cutoff)
            if self._legacy:
                removed += self._purge_legacy(cutoff)
        except OSError as exc:
            raise LedgerError(f"cannot purge the delivery ledger {self.directory}: {exc.strerror}") from None
        return removed

    def close(self) -> None:
        """Close this process's segment (which lets other processes see it is complete) and
        the segments of others being read."""
        with self._commit:
            while self._syncing:
                self._commit.wait()
            self._retire_own(None)
        with self._lock:
            for segment in self._segments.values():
                segment.close()

    # ------------------------------------------------------------ writing

    def _append(self, data: bytes) -> _Segment:
        """Write `data` at once, then wait until an fdatasync covered it.

        The write comes first, under the lock: from then on the record outlives a crash of
        this process (kill -9, the OOM killer), which is by far the likelier crash, and only
        a crash of the machine can still lose it before the sync. (A write that waited for the
        sync before it left every message delivered meanwhile to be sent again after a kill -9:
        on a slow disk, one per delivery thread.) The sync is shared: the first thread to find
        none running syncs everything written so far, the others wait for it (group commit)."""
        with self._commit:
            segment = self._write(data)
            batch = self._pending
            while self._fsync and not batch.done:
                if self._syncing:
                    self._commit.wait()
                    continue
                # No sync running: this thread syncs what every thread wrote so far.
                self._syncing = True
                self._pending = _Batch()
                fd = self._own_fd
                own = self._own
                self._commit.release()
                try:
                    os.fdatasync(fd)
                    batch.synced = True
                except OSError as exc:
                    batch.error = exc
                finally:
                    self._commit.acquire()
                    self._syncing = False
                    batch.done = True
                    self._commit.notify_all()
                if batch.error is not None and self._own is own:
                    # Whether anything written to this segment reached the disk is unknown now
                    # (a later fsync may not report the lost pages again): fail what waits, too.
                    self._retire_own(batch.error)
        if batch.error is not None:
            raise OSError(batch.error.errno, batch.error.strerror)
        if self._fsync and not batch.synced:  # the syncing thread died of something else
            raise OSError(errno.EIO, "the sync of the journal failed")
        return segment

    def _write(self, data: bytes) -> _Segment:
        """Append `data` to this process's segment (called with _commit held)."""
        while self._own is not None and (self._own_torn or self._rotation_due()):
            if self._syncing:  # its fd stays open until that sync is done
                self._commit.wait()
                continue
            self._retire_own(None)
        segment, fd = self._writable()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            # What reached the file is true (each line follows a 250), but its end is unknown:
            # nothing is appended to this segment again (what others wrote to it is still synced).
            self._own_torn = True
            raise
        self._own_size += len(data)
        self._pending.written = True
        return segment

    def _rotation_due(self) -> bool:
        return _utc_day(time.time()) != self._own_day or self._own_size >= SEGMENT_BYTES

    def _retire_own(self, error: OSError | None) -> None:
        """Close this process's segment, no sync running (called with _commit held). What was
        written to it and waits for a sync is synced now, or fails with `error`."""
        batch, self._pending = self._pending, _Batch()
        if batch.written and not batch.done:
            if error is None and self._fsync:
                try:
                    os.fdatasync(self._own_fd)
                    batch.synced = True
                except OSError as exc:
                    error = exc
            batch.error = error
            batch.done = True
            self._commit.notify_all()
        self._close_own()

    def _writable(self) -> tuple[_Segment, int]:
        """This process's segment; a new one when there is none."""
        if self._own is None:
            now = time.time()
            day = _utc_day(now)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
            name = f"{stamp}-{os.getpid()}-{secrets.token_hex(4)}{_JOURNAL}"
            path = os.path.join(self.journal_dir, name)
            # Lock it before its name appears, so no reader takes it for a finished segment.
            fd = os.open(path + _NEW, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            segment = _Segment(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Named and indexed at once, so a lookup never takes it for another process's.
                with self._lock:
                    os.rename(path + _NEW, path)
                    self._segments[name] = segment
                if self._fsync:
                    # The segment counts only once its directory entry is durable too.
                    _fsync_dir(self.journal_dir)
            except BaseException:
                os.close(fd)
                raise
            self._own, self._own_fd, self._own_day, self._own_size = segment, fd, day, 0
            self._own_torn = False
        return self._own, self._own_fd

    def _close_own(self) -> None:
        if self._own_fd >= 0:
            os.close(self._own_fd)  # releases the flock: the segment is complete
        self._own, self._own_fd = None, -1

    # ------------------------------------------------------------ reading

    def _holds(self, line: bytes, key: int) -> bool:
        for name, segment in list(self._segments.items()):
            if segment.may_hold(key):
                try:
                    if segment.holds(line):
                        return True
                except FileNotFoundError:  # purged by another process
                    segment.close()
                    del self._segments[name]
        return False

    def _refresh(self) -> bool:
        """Take in what other processes appended or started since; True when anything new came."""
        grown = False
        mtime = os.stat(self.journal_dir).st_mtime_ns
        # A directory's mtime ticks coarsely: a file made in the same tick as the last look
        # leaves it unchanged, so look again while it is recent.
        if mtime != self._dir_mtime or time.time_ns() - mtime < RESCAN_MARGIN_NS:
            grown = self._scan()
        for segment in self._segments.values():
            grown = segment.read_on() or grown
        return grown

    def _scan(self) -> bool:
        """Follow the directory: index new segments, forget vanished ones."""
        self._dir_mtime = os.stat(self.journal_dir).st_mtime_ns
        names = {name for name in os.listdir(self.journal_dir) if name.endswith(_JOURNAL)}
        for name in set(self._segments) - names:
            if self._segments[name] is not self._own:
                self._segments.pop(name).close()
        grown = False
        for name in sorted(names - set(self._segments)):
            segment = _Segment(os.path.join(self.journal_dir, name))
            try:
                segment.fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            self._segments[name] = segment
            grown = segment.read_on() or grown
        return grown

    # ------------------------------------------------------------ the older layout

    def _legacy_rcpts(self, queue_id: str) -> set[str]:
        try:
            with open(os.path.join(self.directory, queue_id), "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, IsADirectoryError):
            return set()
        lines = data.split(b"\n")[:-1]  # a torn last line was never acknowledged
        return {line.decode("utf-8", "surrogatepass") for line in lines if line}

    def _purge_legacy(self, cutoff: float) -> int:
        removed = 0
        left = False
        for name in os.listdir(self.directory):
            if name == JOURNAL_DIR or not QUEUE_ID.fullmatch(name):
                continue
            path = os.path.join(self.directory, name)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime >= cutoff:
                    left = True
                    continue
                count = len(self._legacy_rcpts(name))
                os.unlink(path)
                removed += count
        self._legacy = left
        return removed


# The journal: one segment per process, day and SEGMENT_BYTES, under <directory>/journal/.
JOURNAL_DIR = "journal"
SEGMENT_BYTES = 16 * 1024 * 1024
RUN_SIZE = 65536  # hashes per sorted run of a segment's index
RESCAN_MARGIN_NS = 2_000_000_000
_JOURNAL = ".journal"
_NEW = ".new"


def _line(queue_id: str, rcpt: str) -> bytes | None:
    """The journal line (without its newline) for one recipient; None when it cannot be one."""
    if not QUEUE_ID.fullmatch(queue_id):
        raise ValueError(f"unsafe queue id {queue_id!r}")
    if "\n" in rcpt:
        return None
    return queue_id.encode("ascii") + b" " + rcpt.encode("utf-8", "surrogatepass")


def _utc_day(t: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(t))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_if_older(path: str, cutoff: float) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_mtime < cutoff:
            os.unlink(path)


@dataclass(eq=False)
class _Batch:
    """Lines written since the last sync began, and how their sync went."""

    written: bool = False
    done: bool = False
    synced: bool = False
    error: OSError | None = None


@dataclass(eq=False)
class _Segment:
    """The index of one journal file."""

    path: str
    fd: int = -1  # open while another process may still append (it holds the flock)
    offset: int = 0  # bytes of complete lines indexed so far
    count: int = 0
    live: set[int] = field(default_factory=set)
    runs: list[array[int]] = field(default_factory=list)

    def add(self, key: int) -> None:
        self.count += 1
        self.live.add(key)
        if len(self.live) >= RUN_SIZE:
            self.runs.append(array("q", sorted(self.live)))
            self.live = set()

    def may_hold(self, key: int) -> bool:
        if key in self.live:
            return True
        for run in self.runs:
            i = bisect_left(run, key)
            if i < len(run) and run[i] == key:
                return True
        return False

    def holds(self, line: bytes) -> bool:
        """Is `line` a complete line of the file? Confirms a hash that matched."""
        with open(self.path, "rb") as fh:
            data = fh.read()
        return data.startswith(line + b"\n") or b"\n" + line + b"\n" in data

    def read_on(self) -> bool:
        """Index the lines another process appended since the last call; True if any.
        Once its writer let go of the flock, the segment is complete: read to the end, close."""
        if self.fd < 0:
            return False
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            complete = True
        except BlockingIOError:
            complete = False
        size = os.fstat(self.fd).st_size
        grown = False
        if size > self.offset:
            data = os.pread(self.fd, size - self.offset, self.offset)
            end = data.rfind(b"\n") + 1  # a last line without its newline is not a record (yet)
            for line in data[:end].split(b"\n")[:-1]:
                self.add(hash(line))
            self.offset += end
            grown = end > 0
        if complete:
            self.close()
        return grown

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Records outlive the message's lifetime by a day: a copy of it can still be on a queue until then.
LEDGER_GRACE_SECONDS = 86400.0
# Redis keys are `<namespace>:delivered:<queue_id>`, one set of recipients each.
REDIS_TIMEOUT = 5.0  # seconds for connecting and for each command: delivery waits on the answer


class RedisLedger:
    """One Redis set per queue id, expiring `ttl` seconds after its last record.

    Several delivery processes on several hosts share it. Redis expires the keys
    itself, so `purge` has nothing to do.
    """

    def __init__(self, url: str, *, namespace: str, ttl: float, client: Any = None) -> None:
        import redis

        self._redis = redis
        self.url = url
        self._prefix = f"{namespace}:delivered:"
        self._ttl = max(1, int(ttl))
        self._client = client or redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, health_check_interval=30
        )
        self._warned = False

    def key(self, queue_id: str) -> str:
        if not QUEUE_ID.fullmatch(queue_id):
            raise ValueError(f"unsafe queue id {queue_id!r}")
        return self._prefix + queue_id

    def _failed(self, what: str, exc: Exception) -> LedgerError:
        return LedgerError(f"delivery ledger {_redact(self.url)}: cannot {what}: {exc}")

    def delivered(self, queue_id: str) -> set[str]:
        """Every recipient recorded for `queue_id`."""
        try:
            members = self._client.smembers(self.key(queue_id))
        except self._redis.RedisError as exc:
            raise self._failed(f"read {queue_id}", exc) from None
        return {m.decode("utf-8", "replace") if isinstance(m, bytes) else str(m) for m in members}

    def was_delivered(self, queue_id: str, rcpt: str) -> bool:
        try:
            return bool(self._client.sismember(self.key(queue_id), rcpt))
        except self._redis.RedisError as exc:
            raise self._failed(f"read {queue_id}", exc) from None

    def record(self, queue_id: str, rcpts: Iterable[str]) -> None:
        members = list(rcpts)  # redis-py encodes str as UTF-8
        if not members:
            return
        key = self.key(queue_id)
        try:
            # MULTI/EXEC: the set never exists without its expiry.
            with self._client.pipeline(transaction=True) as pipe:
                pipe.sadd(key, *members)
                pipe.expire(key, self._ttl)
                pipe.execute()
        except self._redis.RedisError as exc:
            raise self._failed(f"record delivery of {queue_id}", exc) from None

    def purge(self, older_than: datetime) -> int:
        return 0  # Redis expires every key `ttl` seconds after its last record

    def check(self) -> None:
        """Connect once at start-up; warn when Redis would forget the ledger on a restart."""
        try:
            persistence = self._client.info("persistence")
        except self._redis.RedisError as exc:
            log.warning("delivery ledger %s not reachable yet: %s", _redact(self.url), exc)
            return
        if not int(persistence.get("aof_enabled", 0)) and not self._warned:
            self._warned = True
            log.warning(
                "delivery ledger %s: Redis runs without appendonly; if it restarts, messages redelivered "
                "afterwards may be sent twice",
                _redact(self.url),
            )

    def close(self) -> None:
        self._client.close()


def _redact(url: str) -> str:
    """The URL without its password, for log lines and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def open_ledger(config: Config) -> FileLedger | RedisLedger:
    """The ledger `[delivery].ledger` names: "file" (under the spool directory) or a redis:// URL.
    Records live for the queue lifetime plus `grace` seconds."""
    setting = config.delivery.ledger
    if setting == "file":
        return FileLedger(os.path.join(config.spool.dir, "delivered"), fsync=config.spool.fsync)
    ledger = RedisLedger(
        setting, namespace=config.broker.namespace, ttl=config.delivery.max_queue_lifetime + LEDGER_GRACE_SECONDS
    )
    ledger.check()
    return ledger

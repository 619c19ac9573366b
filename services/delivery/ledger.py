"""The ledger of delivered recipients: what keeps a redelivered message from going out twice.

Delivery records each recipient right after the downstream server's 250 to
DATA, durably, under the message's queue id. When the same message comes
back (a crash after the 250 but before the queue step committed, or a broker
redelivery after a lost ack), recipients already recorded are skipped. At
least once on the queue, at most once per recipient downstream, as far as
the window between the 250 and the fsync allows (RFC 1047 describes the rest).

`DeliveryLedger` is the interface, chosen by `[delivery].ledger`
(`open_ledger`):

- `FileLedger` ("file", the default) keeps one append-only file per queue id
  under `<spool.dir>/delivered/`: good for delivery processes on one host.
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
import logging
import os
import threading
from collections.abc import Iterable
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
        """Forget messages last recorded before `older_than`; returns how many."""

    def close(self) -> None:
        """Let go of connections; the ledger is not used afterwards."""


class FileLedger:
    """One file per queue id, one recipient per line, appended and fsynced."""

    def __init__(self, directory: str, *, fsync: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        self._fsync = fsync
        self._lock = threading.Lock()
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create {self.directory}: {exc.strerror}") from None

    def _path(self, queue_id: str) -> str:
        if not QUEUE_ID.fullmatch(queue_id):
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
            raise LedgerError(f"cannot read the delivery ledger of {queue_id}: {exc.strerror}") from None
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
                raise LedgerError(f"cannot record delivery of {queue_id}: {exc.strerror}") from None

    def purge(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()
        removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            raise LedgerError(f"cannot list {self.directory}: {exc.strerror}") from None
        for name in names:
            path = os.path.join(self.directory, name)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
        return removed

    def close(self) -> None:
        pass  # nothing held open between calls


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

"""Embedded transport: durable queues as directories of one machine's spool.

Layout, like Postfix's queue directories: `<root>/<queue>/<queue_id>,<gen>`,
one file per message holding its envelope and bytes, and `<root>/tmp/` for
files being written. A file counts only once it was written to tmp/, fsynced,
renamed into its queue directory and the directory fsynced; so a crash
leaves either the old state or the new one, never half a message.

Each message (queue id) lives in exactly one queue. A step that changes it
writes generation gen+1 into the target queue before it removes gen; a crash
in between leaves both, and recovery keeps the highest generation. A step
that only moves it (deferred -> deliver) is a single atomic rename.

Speed without giving up any of that (a message costs a few fsyncs, not a dozen):
- Directory fsyncs are group-committed: threads that renamed into the same
  directory at about the same time share one fsync (`_GroupSync`), the way a
  database shares a log flush between transactions.
- Removing a finished job's file is not fsynced. If a crash undoes the
  removal, the job comes back: a superseded generation is dropped by recovery,
  a delivered message is skipped by the delivery ledger. Nothing is lost.
- A consumer in another process hears of a new file at once: each consumer
  binds a datagram socket `<root>/<queue>.notify` and publishers send it the
  file name (best effort; the rescan still finds whatever a lost datagram
  announced). So `run receiver`, `run scanner` and `run delivery` on one spool
  use both cores of a small machine without waiting for the rescan.
- A message handed on to a consumer in this process travels in memory too
  (within `HANDOFF_BYTES`), so the next step does not read back and decode the
  file it was just written from; the file stays the durable copy.
- Files are reused: a finished job's file goes to `<root>/free/`, and the next
  message is written into one from there (`shared/filepool.py` says why, and
  why a crash cannot turn that into a wrong message).

A job whose handler raised is retried, and moved to dead after MAX_CRASHES
(the transport contract). A job during which the whole process died (killed,
out of memory, a crash in C code) counts too, as the broker's
x-delivery-count counts it: each consumer records what its workers are
handling in `<root>/<queue>.inflight`, and the next consumer of the queue
counts a job found there against it (`_Inflight`). Without that, a message
that kills its process would be retried on every restart, for ever.

Several processes may share one spool (the CLI releases from quarantine,
`run receiver` and `run scanner` may run apart): each queue is consumed by
one process at a time (an flock per queue), which picks up files other
processes added by rescanning its directories every `rescan` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import logging
import os
import queue as queuelib
import socket
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shared.envelope import Envelope, decode, encode
from shared.errors import EnvelopeDecodeError, RetryLater, SpoolError
from shared.filepool import FilePool
from shared.metrics import JOBS
from shared.transport import DEAD_RETRY, MAX_CRASHES, Handler, Job, Output, Queue, Transport, stand_in

log = logging.getLogger(__name__)

MAGIC = b"SMTPGW1 "

# Messages held in memory for this process's consumers, at most (bytes of bodies).
HANDOFF_BYTES = 64 * 1024 * 1024
# Bytes per worker in a queue's `.inflight` file (see _Inflight): a file name and zero padding.
SLOT = 256
_IDLE = bytes(SLOT)
# Bytes of a spool file read first: the magic line and the envelope of all but unusual messages.
_HEAD = 4096


def _name(queue_id: str, gen: int) -> str:
    return f"{queue_id},{gen}"


def _split(name: str) -> tuple[str, int]:
    queue_id, _, gen = name.rpartition(",")
    return queue_id, int(gen)


def _writer_alive(tmp_name: str) -> bool:
    """Is the process that named this tmp file `<name>.<pid>.<thread>` still running?"""
    try:
        pid = int(tmp_name.rsplit(".", 2)[-2])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def pack(envelope: Envelope, body: bytes) -> list[bytes]:
    """The spool file's bytes, as pieces for one writev: magic, envelope length, envelope, body."""
    env = encode(envelope)
    return [MAGIC + str(len(env)).encode() + b"\n", env, b"\n", body]


def _envelope_span(head: bytes) -> tuple[int, int]:
    """Where the envelope lies in a packed message that starts with `head`: (start, end)."""
    nl = head.find(b"\n", 0, 64)
    if not head.startswith(MAGIC) or nl < 0:
        raise EnvelopeDecodeError("not a spool file")
    return nl + 1, nl + 1 + int(head[len(MAGIC) : nl])


def unpack(data: bytes) -> tuple[Envelope, bytes]:
    """A packed message in memory (the broker's messages) -> envelope and body."""
    start, end = _envelope_span(data)
    return decode(data[start:end]), data[end + 1 :]


def read_file(path: str, *, with_body: bool = True) -> tuple[Envelope, bytes]:
    """A spool file's envelope and body (b"" without `with_body`: listings and recovery need
    only envelopes). Raises OSError, EnvelopeDecodeError or ValueError.

    The body is read at its offset into a bytes object of its own. Reading the whole file
    and slicing the body out of it (`unpack`) copied every body once more: 25 µs for a mean
    corpus message here, in the scanner and again in delivery."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEAD, 0)  # the magic line and, nearly always, the whole envelope
        start, end = _envelope_span(head)
        if end > size:  # a damaged length must not make us allocate what it claims
            raise EnvelopeDecodeError(f"spool file of {size} bytes, shorter than its envelope")
        envelope = decode(head[start:end] if end <= len(head) else os.pread(fd, end - start, start))
        if not with_body:
            return envelope, b""
        return envelope, os.pread(fd, max(0, size - end - 1), end + 1)
    finally:
        os.close(fd)


def read_envelope(path: str) -> Envelope:
    """Only the envelope of a spool file (for listings and recovery)."""
    return read_file(path, with_body=False)[0]


class _GroupSync:
    """fsync of one directory, shared by every thread that asks while one is running.

    A caller's rename happened before it asked; an fsync that *starts* after the
    ask covers it. So each caller takes a ticket, and the first caller with no fsync
    running does one fsync for every ticket taken so far; the others wait for it.
    An error reaches the leader; the waiters then try again themselves.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._cond = threading.Condition()
        self._asked = 0  # tickets handed out
        self._synced = 0  # every ticket up to this one is durable
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._asked += 1
            ticket = self._asked
            while self._synced < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covered = self._asked
                self._cond.release()
                try:
                    os.fsync(self.fd)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
                self._synced = max(self._synced, covered)


class _Inflight:
    """What each worker of one consumer is handling, in `<root>/<queue>.inflight`: one SLOT-byte
    record per worker, the job's file name while its handler runs, zeros otherwise.

    Two pwrites per job and never an fsync: the writes of a process that dies stay in the page
    cache; only a machine crash loses them, and that is not the message's doing. When a job
    was not finished because its process died, the next consumer of the queue finds its name
    there (`interrupted`) and counts it as a crash; the counts live in `<root>/<queue>.crashes`
    ("name count" lines), rewritten at each start with the names still queued. Best effort: a
    failing write costs the record, never the job.
    """

    def __init__(self, base: str, workers: int) -> None:
        self._fd = os.open(base + ".inflight", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, _IDLE * workers, 0)  # written, not sparse: a record needs no new block

    @staticmethod
    def interrupted(base: str) -> list[str]:
        """The names a previous consumer's workers were handling when it ended."""
        try:
            with open(base + ".inflight", "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        names = (data[i : i + SLOT].rstrip(b"\0").decode("ascii", "replace") for i in range(0, len(data), SLOT))
        return [n for n in names if "," in n and "/" not in n and not n.startswith(".")]

    def begin(self, slot: int, name: str) -> None:
        record = name.encode("ascii", "replace")
        if len(record) < SLOT:  # queue ids are at most 128 characters: always
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, record.ljust(SLOT, b"\0"), slot * SLOT)

    def end(self, slot: int) -> None:
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, _IDLE, slot * SLOT)

    def close(self) -> None:
        """Only after the workers stopped: one that did not finish stays recorded, as interrupted."""
        os.close(self._fd)


def _read_counts(path: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError), open(path, encoding="ascii", errors="replace") as fh:
        for line in fh:
            name, _, count = line.partition(" ")
            if count.strip().isdigit():
                counts[name] = int(count)
    return counts


def _write_counts(path: str, counts: dict[str, int], fsync: bool) -> None:
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as fh:
        fh.writelines(f"{name} {count}\n" for name, count in sorted(counts.items()))
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.rename(tmp, path)


@dataclass
class _Consumer:
    queue: Queue
    handler: Handler
    workers: int
    # SimpleQueue (C) rather than Queue (Python locks): 17 instead of 28 µs of CPU per hand-off here.
    ready: queuelib.SimpleQueue[str | None] = field(default_factory=queuelib.SimpleQueue)
    known: set[str] = field(default_factory=set)  # queued or in flight in this process
    lock_fd: int = -1
    inflight: _Inflight | None = None  # what each worker is handling, on disk
    notify: socket.socket | None = None  # where other processes announce new files of this queue


class SpoolTransport(Transport):
    def __init__(
        self,
        root: str,
        *,
        fsync: bool = True,
        rescan: float = 1.0,
        crash_delay: float = 1.0,
        clock: Callable[[], float] = time.time,
        max_scan_queue: int = 0,
        min_free: int = 0,
    ) -> None:
        self.root = os.path.abspath(root)
        self._fsync = fsync
        self._max_scan_queue = max_scan_queue  # 0: no bound
        self._min_free = min_free
        self._rescan = rescan
        self._crash_delay = crash_delay
        self._clock = clock
        self._consumers: dict[Queue, _Consumer] = {}
        self._threads: list[threading.Thread] = []
        self._timers: list[tuple[float, str, Queue, str]] = []  # (due, kind, queue, name)
        self._cond = threading.Condition()
        self._inflight = 0
        self._idle_waiters = 0  # callers in wait_idle, woken when a job ends
        self._crashes: dict[str, int] = {}
        self._stopping = threading.Event()
        # Directory fds are opened once: fsync of a directory is what makes a rename durable.
        self._dir_fds: dict[str, int] = {}
        self._syncs: dict[str, _GroupSync] = {}
        # name -> (envelope, body) of files announced to this process's consumers (see HANDOFF_BYTES).
        self._handoff: dict[str, tuple[Envelope, bytes]] = {}
        self._handoff_bytes = 0
        self._sender: socket.socket | None = None  # announces files to consumers in other processes
        try:
            for q in [*Queue, "tmp"]:
                os.makedirs(self._dir(q), exist_ok=True)
                self._dir_fds[str(q)] = os.open(self._dir(q), os.O_RDONLY | os.O_DIRECTORY)
                self._syncs[str(q)] = _GroupSync(self._dir_fds[str(q)])
            self._pool = FilePool(self._dir("free"), self._sync_dirs)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directories under {self.root}: {exc.strerror}") from None

    # ------------------------------------------------------------ files

    def _dir(self, queue: Queue | str) -> str:
        return os.path.join(self.root, str(queue))

    def _sync_dir(self, queue: Queue | str) -> None:
        if self._fsync:
            self._syncs[str(queue)].sync()

    def _sync_dirs(self, names: set[str]) -> None:
        for name in names & self._syncs.keys():
            self._sync_dir(name)

    def _write(self, queue: Queue, name: str, envelope: Envelope, body: bytes) -> None:
        """tmp -> fsync -> rename into the queue. The caller fsyncs the queue directory."""
        # The writer's pid in the name lets recovery in another process tell a crash's leftover
        # from a file being written right now.
        tmp = os.path.join(self._dir("tmp"), f"{name}.{os.getpid()}.{threading.get_ident()}")
        try:
            reused = self._pool.claim(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | (0 if reused else os.O_TRUNC), 0o600)
            try:
                pieces = pack(envelope, body)
                total = sum(map(len, pieces))
                written = os.writev(fd, pieces)
                if written != total:  # writev may be short for very large bodies; finish the rest
                    rest = b"".join(pieces)[written:]
                    while rest:
                        rest = rest[os.write(fd, rest) :]
                if reused:  # overwritten from the start; drop what is left of the old content
                    os.ftruncate(fd, total)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(self._dir(queue), name))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise SpoolError(f"cannot store {name} in {queue}: {exc.strerror}") from None

    def _read(self, queue: Queue, name: str) -> tuple[Envelope, bytes]:
        return read_file(os.path.join(self._dir(queue), name))

    # ------------------------------------------------------------ publish

    def publish(self, queue: Queue, envelope: Envelope, body: bytes) -> None:
        name = _name(envelope.queue_id, 0)
        self._write(queue, name, envelope, body)
        try:
            self._sync_dir(queue)
        except OSError as exc:
            raise SpoolError(f"cannot fsync {queue}: {exc.strerror}") from None
        self._announce(queue, name, envelope, body)

    def _announce(self, queue: Queue, name: str, envelope: Envelope | None, body: bytes | None = None) -> None:
        """Tell this process's consumer (or the deferred timer) about a new file; with its
        `envelope` and `body`, the consumer gets them from memory instead of the file."""
        if queue == Queue.DEFERRED and Queue.DELIVER in self._consumers:
            due = envelope.not_before.timestamp() if envelope and envelope.not_before else 0.0
            self._add_timer(due, "deferred", Queue.DEFERRED, name)
            return
        consumer = self._consumers.get(queue)
        if consumer is None:
            if queue not in (Queue.DEFERRED, Queue.DEAD):
                self._tell_other_process(queue, name)
            return
        with self._cond:
            if name in consumer.known:
                return
            consumer.known.add(name)
            if envelope is not None and body is not None and self._handoff_bytes + len(body) <= HANDOFF_BYTES:
                self._handoff[name] = (envelope, body)
                self._handoff_bytes += len(body)
        consumer.ready.put(name)

    def _take_handoff(self, name: str) -> tuple[Envelope, bytes] | None:
        with self._cond:
            held = self._handoff.pop(name, None)
            if held is not None:
                self._handoff_bytes -= len(held[1])
        return held

    def _add_timer(self, due: float, kind: str, queue: Queue, name: str) -> None:
        with self._cond:
            heapq.heappush(self._timers, (due, kind, queue, name))
            self._cond.notify_all()

    # ------------------------------------------------------------ consume

    def consume(self, queue: Queue, handler: Handler, workers: int) -> None:
        if queue == Queue.DEFERRED:
            raise ValueError(f"{queue} is a waiting room, not consumed by handlers")
        self._consumers[queue] = _Consumer(queue, handler, workers)

    def start(self) -> None:
        for consumer in self._consumers.values():
            path = os.path.join(self.root, f"{consumer.queue}.lock")
            consumer.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(consumer.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SpoolError(f"queue {consumer.queue} in {self.root} is consumed by another process") from None
            consumer.notify = self._bind_notify(consumer.queue)
        for consumer in self._consumers.values():
            self._count_interrupted(consumer)
        if self._consumers:  # a publish-only process (a receiver) has nothing to recover
            self._recover()
        for consumer in self._consumers.values():
            for i in range(consumer.workers):
                self._spawn(f"{consumer.queue}-{i}", self._work, consumer, i)
            if consumer.notify is not None:
                self._spawn(f"{consumer.queue}-notify", self._listen, consumer)
        self._spawn("spool-timer", self._timer_loop)

    def _notify_path(self, queue: Queue) -> str:
        return os.path.join(self.root, f"{queue}.notify")

    def _bind_notify(self, queue: Queue) -> socket.socket | None:
        """The socket other processes announce new files of `queue` to; None when the path is
        too long for a Unix socket (sun_path) or cannot be bound: then the rescan alone finds them."""
        path = self._notify_path(queue)
        if len(os.fsencode(path)) >= 100:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead consumer's: the queue's lock is ours now
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
        except OSError as exc:
            sock.close()
            log.warning("no notification socket for %s (%s); relying on the rescan", queue, exc.strerror)
            return None
        return sock

    def _listen(self, consumer: _Consumer) -> None:
        sock = consumer.notify
        assert sock is not None
        while not self._stopping.is_set():
            try:
                data = sock.recv(512)
            except OSError:
                return
            name = data.decode("utf-8", "replace")
            if "," in name and "/" not in name and not name.startswith("."):
                self._announce(consumer.queue, name, None)

    def _tell_other_process(self, queue: Queue, name: str) -> None:
        """Best effort: a consumer process that does not hear it finds the file at its rescan."""
        sender = self._sender
        if sender is None:
            sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sender.setblocking(False)
            with self._cond:
                if self._sender is None:
                    self._sender = sender
                    # Publish-only transports (the CLI's) are seldom stopped: close it when collected.
                    weakref.finalize(self, sender.close)
                else:
                    sender.close()
                    sender = self._sender
        with contextlib.suppress(OSError):  # no consumer process, or its buffer is full
            sender.sendto(name.encode(), self._notify_path(queue))

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _count_interrupted(self, consumer: _Consumer) -> None:
        """Startup, with the queue's lock held (its previous consumer is gone): count a crash
        against every job that consumer was handling when it ended (see _Inflight)."""
        q = consumer.queue
        base = os.path.join(self.root, str(q))
        try:
            counts = _read_counts(base + ".crashes")
            for name in _Inflight.interrupted(base):
                counts[name] = counts.get(name, 0) + 1
                log.warning("%s/%s: the process handling it ended before it finished (%d/%d)",
                            q, name, counts[name], MAX_CRASHES)  # fmt: skip
            counts = {n: c for n, c in counts.items() if os.path.exists(os.path.join(self._dir(q), n))}
            _write_counts(base + ".crashes", counts, self._fsync)
            consumer.inflight = _Inflight(base, consumer.workers)
        except OSError as exc:
            raise SpoolError(f"cannot keep track of the jobs of {q} under {self.root}: {exc.strerror}") from None
        self._crashes.update(counts)

    def _recover(self) -> None:
        """Startup: drop stale tmp files and superseded generations, then queue what is left.

        Other processes may share the spool and be writing right now: only tmp files of writers
        that are gone are removed, and removing a superseded generation is what its committing
        process does next anyway."""
        for leftover in os.listdir(self._dir("tmp")):
            if not _writer_alive(leftover):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self._dir("tmp"), leftover))
        newest: dict[str, tuple[int, Queue]] = {}
        for q in Queue:
            for name in os.listdir(self._dir(q)):
                try:
                    queue_id, gen = _split(name)
                except ValueError:
                    continue
                seen = newest.get(queue_id)
                if seen is None or gen > seen[0]:
                    if seen is not None:
                        self._unlink(seen[1], _name(queue_id, seen[0]))
                    newest[queue_id] = (gen, q)
                else:
                    self._unlink(q, name)
        self._scan_dirs()

    def _scan_dirs(self) -> None:
        """Queue files this process does not know yet (startup, and files other processes added)."""
        for q in self._consumers:
            for name in sorted(os.listdir(self._dir(q))):
                if "," in name:
                    self._announce(q, name, None)
        if Queue.DELIVER in self._consumers:
            with self._cond:
                waiting = {n for _, kind, _, n in self._timers if kind == "deferred"}
            for name in os.listdir(self._dir(Queue.DEFERRED)):
                if "," in name and name not in waiting:
                    try:
                        env = read_envelope(os.path.join(self._dir(Queue.DEFERRED), name))
                    except (OSError, EnvelopeDecodeError, ValueError):
                        continue
                    self._announce(Queue.DEFERRED, name, env)

    def _timer_loop(self) -> None:
        next_scan = self._clock() + self._rescan
        while not self._stopping.is_set():
            due_now: list[tuple[float, str, Queue, str]] = []
            with self._cond:
                now = self._clock()
                while self._timers and self._timers[0][0] <= now:
                    due_now.append(heapq.heappop(self._timers))
                if not due_now:
                    wait = min(next_scan, self._timers[0][0] if self._timers else next_scan) - now
                    self._cond.wait(max(0.0, min(wait, self._rescan)))
            for _, kind, q, name in due_now:
                if kind == "deferred":
                    self._undefer(name)
                else:  # a retry of a job that asked for one, or crashed
                    consumer = self._consumers[q]
                    consumer.ready.put(name)
            if self._clock() >= next_scan:
                next_scan = self._clock() + self._rescan
                try:
                    self._scan_dirs()
                except OSError:
                    log.exception("spool rescan failed")

    def _undefer(self, name: str) -> None:
        try:
            os.rename(os.path.join(self._dir(Queue.DEFERRED), name), os.path.join(self._dir(Queue.DELIVER), name))
            self._sync_dir(Queue.DELIVER)
            self._sync_dir(Queue.DEFERRED)
        except FileNotFoundError:
            return
        except OSError:
            log.exception("cannot move %s from deferred to deliver; trying again later", name)
            self._add_timer(self._clock() + 60, "deferred", Queue.DEFERRED, name)
            return
        self._announce(Queue.DELIVER, name, None)

    def _work(self, consumer: _Consumer, slot: int) -> None:
        inflight = consumer.inflight
        while not self._stopping.is_set():
            name = consumer.ready.get()
            if name is None:  # stop() wakes each worker with one None
                return
            with self._cond:
                self._inflight += 1
            if inflight is not None:
                inflight.begin(slot, name)
            try:
                self._process(consumer, name)
            finally:
                if inflight is not None:
                    inflight.end(slot)
                with self._cond:
                    self._inflight -= 1
                    if self._idle_waiters:  # else the only waiter is the timer thread: let it sleep
                        self._cond.notify_all()

    def _process(self, consumer: _Consumer, name: str) -> None:
        q = consumer.queue
        try:
            held = self._take_handoff(name)
            if held is None:
                envelope, body = self._read(q, name)
            else:
                os.stat(os.path.join(self._dir(q), name))  # still there: not taken by recovery
                envelope, body = held
        except FileNotFoundError:
            self._forget(consumer, name)  # taken by recovery or another step
            return
        except (OSError, EnvelopeDecodeError, ValueError) as exc:
            if q != Queue.DEAD:
                log.error("unreadable spool file %s/%s moved to dead: %s", q, name, exc)
                self._move_raw(q, Queue.DEAD, name)
                self._forget(consumer, name)
                return
            # On dead itself, the consumer (the quarantine) gets the raw bytes under a stand-in envelope.
            try:
                with open(os.path.join(self._dir(q), name), "rb") as fh:
                    body = fh.read()
            except OSError:
                log.exception("cannot read %s/%s; trying again later", q, name)
                self._add_timer(self._clock() + DEAD_RETRY, "retry", q, name)
                return
            envelope = stand_in(body, f"dead: unreadable spool file: {exc}")
        crashes = self._crashes.get(name, 0)
        try:
            if crashes >= MAX_CRASHES and q != Queue.DEAD:  # counted by _count_interrupted
                reason = f"{q}: interrupted {crashes} times (the process handling it ended)"
                log.error("queue_id=%s %s; moved to dead", envelope.queue_id, reason)
                JOBS.labels(q.value, "crash").inc()
                outputs = [Output(Queue.DEAD, envelope.replace(last_error=reason), body)]
            else:
                outputs = list(consumer.handler(Job(q, envelope, body, crashes)))
            # At most one output continues this queue id (it becomes generation gen+1).
            if sum(o.envelope.queue_id == envelope.queue_id for o in outputs) > 1:
                raise RuntimeError(f"handler for {q} returned two outputs with queue id {envelope.queue_id}")
        except RetryLater as exc:
            JOBS.labels(q.value, "retry").inc()
            log.info("queue_id=%s retry in %.0fs: %s", envelope.queue_id, exc.delay, exc.reason)
            self._add_timer(self._clock() + exc.delay, "retry", q, name)
            return
        except Exception as exc:
            crashes = self._crashes[name] = crashes + 1
            JOBS.labels(q.value, "crash").inc()
            log.exception("queue_id=%s handler for %s crashed (%d/%d)", envelope.queue_id, q, crashes, MAX_CRASHES)
            if q == Queue.DEAD:  # nothing leaves dead for dead again: keep it, try again much later
                self._add_timer(self._clock() + DEAD_RETRY, "retry", q, name)
                return
            if crashes < MAX_CRASHES:
                self._add_timer(self._clock() + self._crash_delay * crashes, "retry", q, name)
                return
            reason = "".join(traceback.format_exception_only(exc)).strip()
            outputs = [Output(Queue.DEAD, envelope.replace(last_error=f"{q}: {reason}"), body)]
        try:
            self.commit(q, name, envelope, body, outputs)
        except (SpoolError, OSError) as exc:
            log.error("queue_id=%s cannot commit step of %s, retrying: %s", envelope.queue_id, q, exc)
            self._add_timer(self._clock() + 5.0, "retry", q, name)
            return
        self._crashes.pop(name, None)
        self._forget(consumer, name)
        JOBS.labels(q.value, "done").inc()

    def _forget(self, consumer: _Consumer, name: str) -> None:
        with self._cond:
            consumer.known.discard(name)

    def commit(self, queue: Queue, name: str, envelope: Envelope, body: bytes, outputs: Sequence[Output]) -> None:
        """Store every output durably, then remove the job's file: the one place a job ends."""
        _, gen = _split(name)
        touched: set[Queue] = set()
        announced: list[tuple[Queue, str, Envelope, bytes]] = []
        moved = False
        for out in outputs:
            if out.envelope.queue_id == envelope.queue_id:
                if out.envelope == envelope and out.body is body and not moved:
                    # Unchanged: an atomic rename is the whole step.
                    self._move_raw(queue, out.queue, name)
                    moved = True
                    announced.append((out.queue, name, envelope, body))
                    continue
                out_name = _name(envelope.queue_id, gen + 1)
            else:
                out_name = _name(out.envelope.queue_id, 0)
            self._write(out.queue, out_name, out.envelope, out.body)
            touched.add(out.queue)
            announced.append((out.queue, out_name, out.envelope, out.body))
        for q in touched:
            self._sync_dir(q)
        if not moved:
            # Not fsynced: if a crash brings the file back, recovery drops it for its newer
            # generation, or the step runs again (delivery skips recipients it already did).
            self._pool.release(os.path.join(self._dir(queue), name), len(body))
        for q, n, env, data in announced:
            self._announce(q, n, env, data)

    def _move_raw(self, src: Queue, dst: Queue, name: str) -> None:
        os.rename(os.path.join(self._dir(src), name), os.path.join(self._dir(dst), name))
        self._sync_dir(dst)
        self._sync_dir(src)

    def _unlink(self, queue: Queue, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._dir(queue), name))
        self._sync_dir(queue)

    # ------------------------------------------------------------ state

    def depth(self, queue: Queue) -> int:
        try:
            return sum(1 for n in os.listdir(self._dir(queue)) if "," in n)
        except OSError:
            return 0

    def list(self, queue: Queue) -> list[tuple[str, Envelope]]:
        """(file name, envelope) of every message on a queue, oldest first (for the CLI)."""
        out = []
        for name in sorted(os.listdir(self._dir(queue))):
            with contextlib.suppress(OSError, EnvelopeDecodeError, ValueError):
                out.append((name, read_envelope(os.path.join(self._dir(queue), name))))
        return out

    def accepting(self) -> str | None:
        """Back-pressure: refuse new mail (451 4.3.2) before the spool's disk fills up or the
        scan backlog grows past its bound, instead of failing writes or queueing without end."""
        if self._min_free:
            try:
                st = os.statvfs(self.root)
            except OSError as exc:
                return f"spool unusable: {exc.strerror}"
            if st.f_bavail * st.f_frsize < self._min_free:
                return "spool disk nearly full"
        if self._max_scan_queue and self.depth(Queue.SCAN) > self._max_scan_queue:
            return f"more than {self._max_scan_queue} messages wait to be scanned"
        return None

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._idle_waiters += 1
            try:
                while True:
                    now = self._clock()
                    busy = self._inflight or any(not c.ready.empty() for c in self._consumers.values())
                    busy = busy or any(kind == "retry" or due <= now for due, kind, _, _ in self._timers)
                    if not busy:
                        return True
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.05))
            finally:
                self._idle_waiters -= 1

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for consumer in self._consumers.values():
            for _ in range(consumer.workers):
                consumer.ready.put(None)
            if consumer.notify is not None:
                consumer.notify.shutdown(socket.SHUT_RDWR)  # wakes its listener
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = any(thread.is_alive() for thread in self._threads)
        self._threads.clear()
        for consumer in self._consumers.values():
            if consumer.notify is not None:
                consumer.notify.close()
                consumer.notify = None
                with contextlib.suppress(OSError):
                    os.unlink(self._notify_path(consumer.queue))
            # A worker still in a handler would write its record into whatever file got the fd
            # number next: its fd stays open (a stuck worker's job stays recorded, as it should).
            if consumer.inflight is not None and not stuck:
                consumer.inflight.close()
                consumer.inflight = None
            if consumer.lock_fd >= 0:
                os.close(consumer.lock_fd)
                consumer.lock_fd = -1
        for fd in self._dir_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dir_fds.clear()
        with self._cond:
            self._handoff.clear()
            self._handoff_bytes = 0
            if self._sender is not None:
                self._sender.close()
                self._sender = None

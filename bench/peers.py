"""The processes a benchmark run starts and watches: the sink, clamd, ClamSMTP, the gateway.

Each is a `Proc` (a child process with its own log file), stopped by its own
pid (SIGTERM, then SIGKILL after a grace period); nothing here ever stops a
process it did not start. `Sampler` reads /proc for the CPU time and resident
memory of the processes it watches, a few times a second.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


_given: set[int] = set()  # ports handed out by free_port in this process


def _ephemeral_low() -> int:
    """Where the kernel's range of ports for outgoing connections starts (Linux: 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server a test or the benchmark starts (often in another
    process).

    Taken below the ephemeral range: a port the kernel picks for `bind(0)` is one it may also
    give to the next outgoing connection, and one did take it between this call and the
    server's bind (a scanner's connection to RabbitMQ took its sibling's metrics port in CI).
    Ports below that range are only ever taken by an explicit bind. Never the same one twice."""
    low = min(_ephemeral_low(), 65536)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, low) if low > 11000 else 0
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        _given.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_port(port: int, timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port} after {timeout:.0f}s")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: str

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log: str, env: dict[str, str] | None = None) -> Proc:
        with open(log, "ab") as fh:
            popen = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        return cls(name, popen, log)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, grace: float = 20.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait(5)


def stop_all(procs: Iterable[Proc]) -> None:
    for proc in procs:
        proc.stop()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except OSError:
        return None


class MachineCpu(NamedTuple):
    """CPU seconds of the whole machine since boot, from /proc/stat."""

    busy: float  # this machine's own work: user, system, interrupts (not idle, iowait or steal)
    steal: float  # time a virtual machine's cores wanted to run but the hypervisor ran others
    total: float  # all of it, idle and steal included


def machine_cpu() -> MachineCpu:
    with open("/proc/stat") as fh:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fh.readline().split()[1:9])
    busy = user + nice + system + irq + softirq
    return MachineCpu(busy / CLK_TCK, steal / CLK_TCK, (busy + idle + iowait + steal) / CLK_TCK)


def broker_pids() -> list[int]:
    """The RabbitMQ node's Erlang VM on this machine (beam.smp running the rabbit app), if any."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"beam.smp") and b"rabbit" in argv:
            pids.append(int(entry))
    return pids


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


@dataclass
class Sampler:
    """Samples CPU and RSS of named pids every `interval` seconds in a thread."""

    interval: float = 0.2
    pids: dict[int, str] = field(default_factory=dict)  # pid -> role name
    peak_rss: dict[int, int] = field(default_factory=dict)
    last_cpu: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, pid: int, role: str) -> None:
        with self._lock:
            self.pids[pid] = role

    def forget(self, pid: int) -> None:
        with self._lock:
            self.pids.pop(pid, None)
            self.peak_rss.pop(pid, None)
            self.last_cpu.pop(pid, None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            pids = list(self.pids)
        for pid in pids:
            rss = rss_bytes(pid)
            cpu = cpu_seconds(pid)
            with self._lock:
                if rss is not None and rss > self.peak_rss.get(pid, 0):
                    self.peak_rss[pid] = rss
                if cpu is not None:
                    self.last_cpu[pid] = cpu

    def reset_peaks(self) -> None:
        with self._lock:
            self.peak_rss.clear()

    def cpu(self, roles: Iterable[str] | None = None) -> dict[int, float]:
        """Cumulative CPU seconds per pid now (of `roles` only, when given)."""
        self.sample()
        wanted = set(roles) if roles is not None else None
        with self._lock:
            return {p: c for p, c in self.last_cpu.items() if wanted is None or self.pids.get(p) in wanted}

    def by_role(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        """CPU seconds each role used between two `cpu()` readings, process by process (one
        that started in between counts whole)."""
        out: dict[str, float] = {}
        for pid, used in after.items():
            role = self.pids.get(pid, "?")
            out[role] = out.get(role, 0.0) + used - before.get(pid, 0.0)
        return out

    def peaks(self) -> dict[str, int]:
        """Peak RSS per role ("scanner#2" for the second process of a role)."""
        self.sample()
        out: dict[str, int] = {}
        with self._lock:
            for pid, role in sorted(self.pids.items()):
                key, n = role, 1
                while key in out:
                    n += 1
                    key = f"{role}#{n}"
                out[key] = self.peak_rss.get(pid, 0)
        return out


def need(program: str) -> str:
    path = shutil.which(program) or (f"/usr/sbin/{program}" if os.path.exists(f"/usr/sbin/{program}") else None)
    if path is None:
        raise RuntimeError(f"{program} is not installed (scripts/bench.sh installs it)")
    return path

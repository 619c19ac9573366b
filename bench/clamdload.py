"""The clamd ceiling: the corpus through clamd INSTREAM from N parallel clients.

The same bytes the gateway hands clamd (each message once, whole, one
connection per scan as the scanner's adapter does), with nothing else in the
way: how many messages a second clamd alone can scan on this machine. Bounded
by count and time like the SMTP runs. Threads, because the socket calls let
go of the GIL and the per-scan Python work is a few microseconds.

Run as a process: `python -m bench.clamdload SPEC.json` (writes JSON results).
"""

from __future__ import annotations

import itertools
import json
import pickle
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

CHUNK = 64 * 1024


@dataclass
class Spec:
    host: str
    port: int
    concurrency: int
    total: int
    duration: float
    pool: str  # pickle: list of (sample index, wire bytes, rcpt); the raw message is scanned
    out: str
    tag: str = "clamd"


def instream(address: tuple[str, int], data: bytes, timeout: float = 60.0) -> bytes:
    """One INSTREAM scan; returns clamd's reply without its terminator."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(b"zINSTREAM\0")
        view = memoryview(data)
        for offset in range(0, len(view), CHUNK):
            chunk = view[offset : offset + CHUNK]
            sock.sendall(struct.pack("!L", len(chunk)) + chunk)
        sock.sendall(b"\0\0\0\0")
        reply = b""
        while not reply.endswith(b"\0"):
            data = sock.recv(4096)
            if not data:
                break
            reply += data
    return reply.rstrip(b"\0")


def unwire(data: bytes) -> bytes:
    """The message from DATA-phase bytes: without the terminator, dots unstuffed."""
    body = data[: -len(b".\r\n")]
    body = body[1:] if body.startswith(b"..") else body
    return body.replace(b"\r\n..", b"\r\n.")


def main(argv: list[str]) -> int:
    with open(argv[0]) as fh:
        spec = Spec(**json.load(fh))
    with open(spec.pool, "rb") as pool_file:
        pool = [unwire(data) for _, data, _ in pickle.load(pool_file)]
    seqs = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    found = 0
    errors: list[str] = []
    started = time.time()
    deadline = started + spec.duration

    def worker() -> None:
        nonlocal found
        while True:
            seq = next(seqs)
            if seq >= spec.total or time.time() >= deadline:
                return
            t0 = time.monotonic()
            try:
                # Like the gateway's scan, each message differs from the last as a whole (its headers).
                head = f"X-Bench-Id: {spec.tag}.{seq}.{seq % len(pool)}\r\n".encode()
                reply = instream((spec.host, spec.port), head + pool[seq % len(pool)])
            except OSError as exc:
                with lock:
                    errors.append(str(exc))
                continue
            elapsed = time.monotonic() - t0
            with lock:
                latencies.append(elapsed)
                if reply.endswith(b"FOUND"):
                    found += 1
                elif not reply.endswith(b"OK"):
                    errors.append(reply.decode("utf-8", "replace"))

    threads = [threading.Thread(target=worker) for _ in range(spec.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finished = time.time()
    with open(spec.out, "w") as fh:
        json.dump(
            {
                "started": started,
                "finished": finished,
                "latencies": latencies,
                "found": found,
                "errors": errors[:50],
                "error_count": len(errors),
            },
            fh,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The load generator: N concurrent SMTP sessions, k messages per connection.

Each session connects, says EHLO, and sends messages (MAIL, RCPT and DATA
pipelined when the server offers PIPELINING, RFC 2920) until its share is
sent, then QUIT and, while the run lasts, connects again. Every message gets
a first header `X-Bench-Id: <tag>.<seq>.<sample>` so the sink side can tell
which send it was. The run is bounded in count (`total`) and time
(`duration`): whichever comes first ends it.

Timing: `end` is taken once the last byte of the DATA terminator has left
this process (the transport's buffer limit is 0, so `drain` waits for it);
`reply` when the reply to DATA arrived. Every wait for a reply is also timed
per session, so a stalled session shows up even if it finally got through.

Run as a process (`python -m bench.loadgen SPEC.json`) so that its CPU time
and its GIL are its own; it writes its results as JSON next to the spec.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import pickle
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# A reply that takes longer than this is a stall (the session waited with nothing happening).
STALL_SECONDS = 5.0
REPLY_TIMEOUT = 120.0


@dataclass
class Spec:
    host: str
    port: int
    concurrency: int
    per_connection: int
    total: int
    duration: float
    tag: str
    pool: str  # pickle file: list of (sample index, wire bytes, rcpt)
    out: str
    mail_from: str = "bench@sender.test"
    helo: str = "loadgen.sender.test"


@dataclass
class Result:
    started: float = 0.0  # wall clock of the first connect
    finished: float = 0.0
    sent: list[tuple[int, int, float, float, int]] = field(default_factory=list)  # seq, sample, end, reply, code
    refused: int = 0  # DATA (or MAIL/RCPT) answered other than 2xx/3xx
    errors: list[str] = field(default_factory=list)  # connection-level failures
    sessions: int = 0
    max_wait: float = 0.0  # longest wait for any reply
    stalls: int = 0  # replies that took longer than STALL_SECONDS


class SmtpError(Exception):
    pass


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, result: Result) -> None:
        self.reader = reader
        self.writer = writer
        self.result = result

    async def reply(self) -> tuple[int, list[bytes]]:
        started = time.monotonic()
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            if not line:
                raise SmtpError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                break
        waited = time.monotonic() - started
        if waited > self.result.max_wait:
            self.result.max_wait = waited
        if waited > STALL_SECONDS:
            self.result.stalls += 1
        return int(lines[0][:3]), lines


async def _session(
    spec: Spec, pool: list[tuple[int, bytes, str]], seqs: itertools.count[int], deadline: float, result: Result
) -> bool:
    """One connection; returns False when there is nothing left to send."""
    try:
        reader, writer = await asyncio.open_connection(spec.host, spec.port, limit=1 << 16)
    except OSError as exc:
        result.errors.append(f"connect: {exc}")
        await asyncio.sleep(0.05)
        return time.time() < deadline
    result.sessions += 1
    transport = writer.transport
    assert isinstance(transport, asyncio.WriteTransport)
    transport.set_write_buffer_limits(0)
    s = _Session(reader, writer, result)
    more = True
    try:
        code, _ = await s.reply()
        if code != 220:
            raise SmtpError(f"greeting {code}")
        writer.write(f"EHLO {spec.helo}\r\n".encode())
        code, lines = await s.reply()
        if code != 250:
            raise SmtpError(f"EHLO {code}")
        pipelining = any(line[4:].strip().upper() == b"PIPELINING" for line in lines)
        for _ in range(spec.per_connection):
            seq = next(seqs)
            if seq >= spec.total or time.time() >= deadline:
                more = False
                break
            index, data, rcpt = pool[seq % len(pool)]
            envelope = [f"MAIL FROM:<{spec.mail_from}>\r\n".encode(), f"RCPT TO:<{rcpt}>\r\n".encode(), b"DATA\r\n"]
            if pipelining:
                writer.write(b"".join(envelope))
                codes = [(await s.reply())[0] for _ in envelope]
            else:
                codes = []
                for command in envelope:
                    writer.write(command)
                    codes.append((await s.reply())[0])
                    if codes[-1] >= 400:
                        break
            if codes[-1] != 354:
                result.refused += 1
                writer.write(b"RSET\r\n")
                await s.reply()
                continue
            writer.writelines([f"X-Bench-Id: {spec.tag}.{seq}.{index}\r\n".encode(), data])
            await writer.drain()
            end = time.time()
            code, _ = await s.reply()
            result.sent.append((seq, index, end, time.time(), code))
            if code >= 400:
                result.refused += 1
        writer.write(b"QUIT\r\n")
        await writer.drain()
        await s.reply()
    except (TimeoutError, OSError, SmtpError, asyncio.IncompleteReadError, ValueError) as exc:
        if isinstance(exc, TimeoutError):  # no reply within REPLY_TIMEOUT: the worst stall there is
            result.stalls += 1
            exc = SmtpError(f"no reply within {REPLY_TIMEOUT:.0f}s")
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return more and time.time() < deadline


async def drive(spec: Spec, pool: list[tuple[int, bytes, str]]) -> Result:
    result = Result(started=time.time())
    deadline = result.started + spec.duration
    seqs = itertools.count()

    async def worker() -> None:
        while await _session(spec, pool, seqs, deadline, result):
            pass

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    result.finished = time.time()
    return result


def main(argv: list[str]) -> int:
    with open(argv[0]) as fh:
        spec = Spec(**json.load(fh))
    with open(spec.pool, "rb") as fh:
        pool: list[tuple[int, bytes, str]] = pickle.load(fh)
    result = asyncio.run(drive(spec, pool))
    out: dict[str, Any] = asdict(result)
    out["errors"] = result.errors[:50]
    out["error_count"] = len(result.errors)
    with open(spec.out, "w") as fh:
        json.dump(out, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

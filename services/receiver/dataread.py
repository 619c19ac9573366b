"""The DATA phase reader: message bytes from an `asyncio.StreamReader`, in chunks.

aiosmtpd reads DATA one line at a time, about 1,100 awaits for an 82 KiB
message, and that alone caps a receiver near 200 messages a second. This
reader asks the stream for everything up to the end-of-data marker in one
`readuntil`, and falls back to large slices when the buffer fills first.

What it guarantees, whatever the split of the bytes on the wire:

- The only end of data is `<CRLF>.<CRLF>` (RFC 5321 §4.1.1.4). The CRLF that
  ended the DATA command counts as the first CRLF, so an empty message
  (`.` right after 354) ends it too. A lone `<LF>.<LF>`, `<CR>.<CR>` or any
  mixed ending never does: that is how SMTP smuggling (CVE-2023-51764,
  CVE-2023-51765, CVE-2023-51766) starts a second message.
- It never reads a byte past the end of data: commands the client pipelined
  after it stay in the stream for the command loop. The end marker can
  straddle what was already consumed and what is still to come; then only
  the few bytes that could complete it are read.
- Every limit holds while the bytes stream in: past `max_size` (or once the
  shared memory budget is spent) it keeps draining to the end of data but
  discards, so the refusal comes after the real end (RFC 5321 §4.2.5) and the
  session stays in step.
- Afterwards: a bare CR or LF anywhere refuses the whole message (RFC 5321
  §2.3.8); lines longer than `max_line_length` refuse it (§4.5.3.1.6);
  leading dots are unstuffed (§4.5.2). Both checks are whole-buffer passes
  (`bare_newline`, `line_too_long`), never a split into lines.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from services.receiver.limits import MemoryBudget
from services.receiver.policy import DataProblem
from shared.crlf import CRLF, bare_lf, bare_newline

TERMINATOR = b"\r\n.\r\n"
# A line that starts with a dot, as seen on the wire: the dot is transparency (RFC 5321 §4.5.2).
_STUFFED = b"\r\n."
# A CR that is bare or starts a stuffed line: what makes a message need more than `bare_lf`.
# Almost no message has either, and this one search (the regex engine skips from CR to CR)
# costs less than the unstuffing replace's search alone: 68 µs for a mean corpus message, where
# the replace and `bare_newline` took 154.
_CR_TO_LOOK_AT = re.compile(rb"\r(?:(?!\n)|\n\.)")


@dataclass(frozen=True, slots=True)
class DataResult:
    """What one DATA phase produced.

    `content` is the unstuffed message (empty when `problem` is set); `size`
    its length in octets, exact even when the bytes were discarded;
    `reserved` the bytes still taken from the budget, which the caller gives
    back once the message is stored or refused.
    """

    content: bytes
    size: int
    problem: DataProblem | None
    reserved: int


def _pending(tail: bytes) -> int:
    """How much of the end marker `tail` (the last bytes consumed) already holds.

    The longest suffix of `tail` that is a proper prefix of TERMINATOR; any
    end marker that completes in the coming bytes starts there, so reading
    `len(TERMINATOR) - pending` bytes can never overshoot it.
    """
    for n in range(min(len(tail), len(TERMINATOR) - 1), 0, -1):
        if tail.endswith(TERMINATOR[:n]):
            return n
    return 0


def _drop_last(chunks: list[bytes], n: int) -> None:
    """Remove the last `n` bytes from a list of chunks, copying at most one chunk."""
    while n:
        last = chunks[-1]
        if len(last) <= n:
            n -= len(last)
            chunks.pop()
        else:
            chunks[-1] = last[:-n]
            n = 0


def _stuffed(tail: bytes, chunk: bytes) -> int:
    """Line-start dots that `chunk` completes, given the `tail` consumed before it."""
    return chunk.count(_STUFFED) + (tail[-2:] + chunk[:2]).count(_STUFFED)


def _all_stuffed(chunks: list[bytes]) -> int:
    dots, tail = 0, CRLF
    for chunk in chunks:
        dots += _stuffed(tail, chunk)
        tail = (tail + chunk[-2:])[-2:]
    return dots


async def read_data(
    reader: asyncio.StreamReader,
    *,
    max_size: int,
    max_line_length: int,
    budget: MemoryBudget,
) -> DataResult:
    """Read one DATA phase, right after the 354 reply, up to and including `<CRLF>.<CRLF>`.

    Raises `asyncio.IncompleteReadError` if the stream ends first; any
    budget it took is given back when it raises.
    """
    chunks: list[bytes] = []
    held = 0  # bytes of `chunks`, taken from the budget
    raw = 0  # bytes consumed from the stream, end marker included
    # Occurrences of CRLF "." in CRLF + stream (stuffed dots, plus the end marker's), so the
    # unstuffed size is raw - dots - 2. Counting costs a pass over every chunk: it starts only
    # once the size could be over the limit, or before chunks are dropped.
    dots = 0
    counting = False
    tail = CRLF  # the last (up to 4) bytes consumed; the DATA command ended with CRLF
    problem: DataProblem | None = None
    try:
        while True:
            pending = _pending(tail)
            if pending:
                chunk = await reader.readexactly(len(TERMINATOR) - pending)
            else:
                try:
                    chunk = await reader.readuntil(TERMINATOR)
                except asyncio.LimitOverrunError as exc:
                    # No end marker in the first `consumed` bytes: take them, look again.
                    chunk = await reader.read(exc.consumed)
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", None) from None
            raw += len(chunk)
            keep = problem is None and budget.take(len(chunk))
            if counting:
                dots += _stuffed(tail, chunk)
            elif not keep or raw - 2 > max_size:
                dots = _all_stuffed([*chunks, chunk])
                counting = True
            window = tail + chunk[-len(TERMINATOR) :]
            tail = window[-(len(TERMINATOR) - 1) :]
            if keep:
                chunks.append(chunk)
                held += len(chunk)
            elif problem is None:
                problem = DataProblem.NO_MEMORY
            # raw - dots - 2 only grows towards the final size: the test is exact.
            if counting and raw - dots - 2 > max_size:
                problem = DataProblem.TOO_BIG  # wins over NO_MEMORY: retrying would not help
            if problem is not None and held:
                chunks.clear()
                budget.give(held)
                held = 0
            if window.endswith(TERMINATOR):
                break
    except BaseException:
        budget.give(held)
        raise

    if problem is not None:
        return DataResult(b"", raw - dots - 2, problem, 0)
    _drop_last(chunks, len(TERMINATOR) - len(CRLF))  # the ".\r\n"; its CRLF ended the last line
    body = b"".join(chunks)
    chunks.clear()
    content = body[1:] if body.startswith(b".") else body
    if _CR_TO_LOOK_AT.search(content) is None:
        bare = bare_lf(content)
    else:  # a stuffed line or a bare CR: unstuff, then check every line end
        content = content.replace(_STUFFED, CRLF)
        bare = bare_newline(content)
    if bare:
        problem = DataProblem.BARE_NEWLINE
    elif line_too_long(content, max_line_length):
        problem = DataProblem.LINE_TOO_LONG
    else:
        return DataResult(content, len(content), None, held)
    budget.give(held)
    return DataResult(b"", len(content), problem, 0)


# Both checks (`bare_newline` lives in shared/crlf.py: the scanner and delivery use it too) run over every
# accepted message, about 1,100 lines for 82 KiB. Splitting the message into lines costs an object
# per line; they use whole-buffer C passes instead (bytes.replace and rfind of one byte are memchr
# loops): about half the time, no per-line objects.


def line_too_long(content: bytes, limit: int) -> bool:
    """True when a line of `content` is longer than `limit` octets, CRLF not counted.

    `content` holds no bare CR or LF (`bare_newline` said so), so every LF
    ends a line, one octet after its CR. A line starting at `pos` is short
    enough exactly when an LF lies within `limit + 1` octets of it; every line
    that starts and ends inside that window is short enough too, so the search
    jumps to the last LF in the window (memrchr): about one step per `limit`
    octets instead of one per line.
    """
    end = len(content)
    if end <= limit:
        return False
    pos = 0
    while pos < end:
        cut = content.rfind(b"\n", pos, pos + limit + len(CRLF))
        if cut < 0:
            return end - pos > limit  # no line end ahead: a longer line, or a short unterminated tail
        pos = cut + 1
    return False

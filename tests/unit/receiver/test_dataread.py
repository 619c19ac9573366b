"""services.receiver.dataread: the chunked DATA reader, fed through a real asyncio.StreamReader.

Every case is run with the wire bytes split at every possible position (the
end-of-data marker straddling what was already consumed), one byte at a
time, and with a tiny reader limit that forces the LimitOverrunError path.
Each case lists what must stay unread after the message: the commands a
client pipelined after the end of data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from services.receiver.dataread import TERMINATOR, DataResult, line_too_long, read_data
from services.receiver.limits import MemoryBudget
from services.receiver.policy import DataProblem
from shared.crlf import CRLF, bare_newline

EIGHT_BIT = "Subject: Grüße\r\n\r\nü ".encode() + b"\xff\xfe\xe9\r\n"
PIPELINED = b"MAIL FROM:<next@sender.example>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"


@dataclass(frozen=True)
class Case:
    name: str
    wire: bytes  # what the client sends after 354: message, end of data, pipelined rest
    content: bytes | None  # the unstuffed message, or None when refused
    rest: bytes = b""  # what must still be unread afterwards
    problem: DataProblem | None = None
    max_size: int = 1 << 20
    max_line_length: int = 998


CASES = [
    Case("empty message", b".\r\n", b"", b"QUIT\r\n"),
    Case("empty message, pipelined", b".\r\n", b"", PIPELINED),
    Case("end right after the first line", b"a\r\n.\r\n", b"a\r\n", PIPELINED),
    Case("empty first line", b"\r\n.\r\n", b"\r\n", b"QUIT\r\n"),
    Case("headers and body", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"Subject: x\r\n\r\nbody\r\n", PIPELINED),
    Case("dot-stuffed lines", b"..lead\r\n...two\r\n.\r\n", b".lead\r\n..two\r\n", b"QUIT\r\n"),
    Case("a lone stuffed dot first", b"..\r\n.\r\n", b".\r\n", b"QUIT\r\n"),
    Case("a lone stuffed dot later", b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n", b"QUIT\r\n"),
    Case("dot not alone on its line", b"a\r\n.b\r\n.c.\r\n.\r\n", b"a\r\nb\r\nc.\r\n", b""),
    Case("end marker twice", b"a\r\n.\r\n", b"a\r\n", b"b\r\n.\r\n"),
    Case("8-bit and UTF-8 bytes", EIGHT_BIT + b".\r\n", EIGHT_BIT, b"QUIT\r\n"),
    Case("NUL and 8-bit bytes", b"a\x00\xe9\xff\r\n.\r\n", b"a\x00\xe9\xff\r\n", b"QUIT\r\n"),
    # SMTP smuggling: none of these end the message; the pipelined commands stay message text.
    *(
        Case(
            f"smuggling {fake!r}",
            b"Subject: first\r\n\r\nhello" + fake + PIPELINED + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n",
            None,
            b"QUIT\r\n",
            DataProblem.BARE_NEWLINE,
        )
        for fake in (
            b"\n.\n",
            b"\r.\r",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\n.\r",
            b"\r.\n",
            b"\n\n.\n\n",
        )
    ),
    Case("bare LF", b"a\nb\r\n.\r\n", None, b"QUIT\r\n", DataProblem.BARE_NEWLINE),
    Case("bare CR", b"a\rb\r\n.\r\n", None, b"QUIT\r\n", DataProblem.BARE_NEWLINE),
    Case("CR before the CRLF", b"a\r\r\n.\r\n", None, b"QUIT\r\n", DataProblem.BARE_NEWLINE),
    Case("bare LF right before the end", b"a\n\r\n.\r\n", None, b"", DataProblem.BARE_NEWLINE),
    Case("CRLF dot CR, no end", b"a\r\n.\rb\r\n.\r\n", None, b"QUIT\r\n", DataProblem.BARE_NEWLINE),
    Case("a stuffed line and a bare LF", b"a\r\n..b\nc\r\n.\r\n", None, b"", DataProblem.BARE_NEWLINE),
    Case("a bare LF, then a stuffed line", b"a\nb\r\n..c\r\n.\r\n", None, b"", DataProblem.BARE_NEWLINE),
    Case("a stuffed line and a bare CR", b"..a\r\nb\rc\r\n.\r\n", None, b"", DataProblem.BARE_NEWLINE),
    # Limits: size counts the unstuffed message; the refusal comes after the real end.
    Case("exactly max_size", b"0123456789\r\n.\r\n", b"0123456789\r\n", b"QUIT\r\n", max_size=12),
    Case("one over max_size", b"0123456789A\r\n.\r\n", None, b"QUIT\r\n", DataProblem.TOO_BIG, max_size=12),
    Case("stuffing does not count", b"..\r\n..\r\n..\r\n.\r\n", b".\r\n.\r\n.\r\n", b"", max_size=9),
    Case("far over max_size", b"x" * 300 + b"\r\n.\r\n", None, PIPELINED, DataProblem.TOO_BIG, max_size=10),
    Case("line at max_line_length", b"123456789A\r\n.\r\n", b"123456789A\r\n", b"", max_line_length=10),
    Case("stuffed line at max", b"..23456789A\r\n.\r\n", b".23456789A\r\n", b"", max_line_length=10),
    Case("line over max", b"a\r\n123456789AB\r\n.\r\n", None, b"", DataProblem.LINE_TOO_LONG, max_line_length=10),
]


def splits(data: bytes, mode: str) -> list[list[bytes]]:
    if mode == "whole":
        return [[data]]
    if mode == "bytewise":
        return [[data[i : i + 1] for i in range(len(data))]]
    return [[data[:i], data[i:]] for i in range(len(data) + 1)]  # "every split"


async def feed_and_read(
    pieces: Sequence[bytes], case: Case, limit: int, budget: MemoryBudget
) -> tuple[DataResult, bytes]:
    reader = asyncio.StreamReader(limit=limit)
    task = asyncio.create_task(
        read_data(reader, max_size=case.max_size, max_line_length=case.max_line_length, budget=budget)
    )
    for piece in pieces:
        reader.feed_data(piece)
        await asyncio.sleep(0)  # a yield, not a wait: let the reader consume this piece first
    # A reader that wanted a byte past the end of data would fail here instead of hanging.
    reader.feed_eof()
    result = await task
    return result, await reader.read()


@pytest.mark.parametrize("limit", [1 << 16, 8], ids=["limit64k", "limit8"])
@pytest.mark.parametrize("mode", ["whole", "every split", "bytewise"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reader(case: Case, mode: str, limit: int) -> None:
    async def run() -> None:
        for pieces in splits(case.wire + case.rest, mode):
            budget = MemoryBudget(1 << 30)
            result, rest = await feed_and_read(pieces, case, limit, budget)
            where = f"pieces={[len(p) for p in pieces]}"
            assert rest == case.rest, where
            assert result.problem == case.problem, where
            if case.content is not None:
                assert result.content == case.content, where
                assert result.size == len(case.content)
                assert result.reserved == budget.in_use > 0
            else:
                assert result.content == b""
                assert result.reserved == budget.in_use == 0

    asyncio.run(run())


def test_size_is_exact_when_discarded() -> None:
    case = Case("big", b"..x\r\n" * 100 + b".\r\n", None, b"", DataProblem.TOO_BIG, max_size=10)
    result, _ = asyncio.run(feed_and_read([case.wire], case, 1 << 16, MemoryBudget(1 << 30)))
    assert result.size == len(b".x\r\n" * 100)


def test_budget_spent_drains_and_gives_back() -> None:
    case = Case("budget", b"..x\r\n" * 30 + b".\r\n", None, PIPELINED)

    async def run() -> None:
        for limit in (8, 16, 1 << 16):
            budget = MemoryBudget(50)
            pieces = [case.wire[i : i + 7] for i in range(0, len(case.wire), 7)] + [PIPELINED]
            result, rest = await feed_and_read(pieces, case, limit, budget)
            assert result.problem == DataProblem.NO_MEMORY
            assert result.size == len(b".x\r\n" * 30)  # exact, though the bytes were dropped
            assert rest == PIPELINED  # drained to the real end, not beyond
            assert budget.in_use == 0

    asyncio.run(run())


def test_too_big_wins_over_no_memory() -> None:
    case = Case("both", b"x" * 100 + b"\r\n.\r\n", None, b"", max_size=60)
    result, _ = asyncio.run(feed_and_read([case.wire], case, 16, MemoryBudget(50)))
    assert result.problem == DataProblem.TOO_BIG


def test_a_large_message_in_many_chunks() -> None:
    body = b"".join(b"%06d " % i + b"." * 70 + b"\r\n" for i in range(5000))  # ~400 KB
    wire = body.replace(b"\r\n.", b"\r\n..") + b".\r\n" + PIPELINED
    case = Case("large", wire, body, PIPELINED)

    async def run() -> None:
        # Pieces the size of socket reads, cut anywhere (the end marker too).
        for size in (997, 4093, 65536):
            budget = MemoryBudget(1 << 30)
            pieces = [wire[i : i + size] for i in range(0, len(wire), size)]
            result, rest = await feed_and_read(pieces, case, 4096, budget)
            assert (result.content, result.problem, rest) == (body, None, PIPELINED)

    asyncio.run(run())


@pytest.mark.parametrize("wire", [b"", b"no end", b"a\r\n.\n", b"a\r\n.\r", b"a\r\n.\r\nX"[:-4]])
def test_stream_ends_before_end_of_data(wire: bytes) -> None:
    async def run() -> None:
        budget = MemoryBudget(1 << 30)
        reader = asyncio.StreamReader(limit=8)
        reader.feed_data(wire)
        reader.feed_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await read_data(reader, max_size=100, max_line_length=998, budget=budget)
        assert budget.in_use == 0

    asyncio.run(run())


def _lines_bare(content: bytes) -> bool:
    """The reference: split on CRLF, any CR or LF left is bare."""
    text = b"".join(content.split(b"\r\n"))
    return b"\r" in text or b"\n" in text


def _lines_too_long(content: bytes, limit: int) -> bool:
    return max(map(len, content.split(b"\r\n"))) > limit


@pytest.mark.parametrize(
    ("content", "bare"),
    [
        (b"", False),
        (b"a\r\nb\r\n", False),
        (b"\r\n\r\n\r\n", False),
        (b"unterminated", False),
        (b"a\r\nb", False),
        (b"a\nb\r\n", True),
        (b"a\rb\r\n", True),
        (b"\r", True),
        (b"\n", True),
        (b"\n\r", True),  # as many CRs as LFs, none paired
        (b"a\n\rb\r\n", True),
        (b"\r\r\n\n", True),
        (b"a\r\n\r", True),
        (b"\n\r\n", True),
    ],
)
def test_bare_newline(content: bytes, bare: bool) -> None:
    assert bare_newline(content) is bare is _lines_bare(content)


@pytest.mark.parametrize(
    ("content", "limit", "too_long"),
    [
        (b"", 1, False),
        (b"1234\r\n", 4, False),
        (b"12345\r\n", 4, True),
        (b"1234\r\n1234\r\n1234\r\n", 4, False),
        (b"1\r\n12\r\n12345\r\n1\r\n", 4, True),
        (b"1234\r\n12345", 4, True),  # an unterminated tail counts too
        (b"1234\r\n1234", 4, False),
        (b"\r\n" * 10 + b"x" * 9 + b"\r\n", 8, True),
        (b"x" * 8 + b"\r\n" + b"y" * 8 + b"\r\n", 8, False),
    ],
)
def test_line_too_long(content: bytes, limit: int, too_long: bool) -> None:
    assert line_too_long(content, limit) is too_long is _lines_too_long(content, limit)


def test_checks_agree_with_splitting_into_lines() -> None:
    """Every string of up to 6 pieces from an alphabet of line ends, dots and text, every limit."""
    alphabet = [b"a", b"\r", b"\n", b"\r\n", b".", b"bb"]
    contents = [b""]
    for _ in range(6):
        contents = [c + p for c in contents for p in alphabet] + [b""]
    for content in set(contents):
        bare = _lines_bare(content)
        assert bare_newline(content) is bare, content
        if not bare:  # line_too_long's precondition
            for limit in range(1, 9):
                assert line_too_long(content, limit) is _lines_too_long(content, limit), (content, limit)


def test_reader_agrees_with_unstuffing_line_by_line() -> None:
    """Every wire string of up to 5 pieces from an alphabet of line ends, dots and text: the
    reader's content is what splitting into lines, refusing a bare CR or LF and dropping each
    line's leading dot gives (the reader searches for bare CRs and stuffed lines in one pass)."""
    alphabet = [b"a", b"\r", b"\n", b"\r\n", b".", b"\r\n."]
    wires = [b""]
    for _ in range(5):
        wires = [w + p for w in wires for p in alphabet] + [b""]
    case = Case("any", b"", None)

    async def run() -> None:
        for wire in sorted(set(wires)):
            stream = CRLF + wire + TERMINATOR  # the CRLF that ended the DATA command counts
            end = stream.find(TERMINATOR)
            data = stream[len(CRLF) : end + len(CRLF)]
            if _lines_bare(data):
                expected = None
            else:
                expected = CRLF.join(line[1:] if line.startswith(b".") else line for line in data.split(CRLF))
            result, rest = await feed_and_read([wire + TERMINATOR], case, 1 << 16, MemoryBudget(1 << 30))
            assert rest == stream[end + len(TERMINATOR) :], wire
            if expected is None:
                assert result.problem is DataProblem.BARE_NEWLINE, wire
            else:
                assert (result.problem, result.content) == (None, expected), wire

    asyncio.run(run())

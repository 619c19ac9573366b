"""mimeparse.parse builds exactly the tree the stdlib parser builds, placeholders or not."""

from __future__ import annotations

import email.feedparser
import random
import re
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

import pytest

from services.scanner import mimeparse
from services.scanner.mime import serialize
from shared.crlf import bare_newline


def _shape(m: Message) -> object:
    payload = m.get_payload()
    children = tuple(_shape(p) for p in payload) if isinstance(payload, list) else payload
    return (tuple(m.items()), m.preamble, m.epilogue, tuple(type(d).__name__ for d in m.defects), children)


def _b64(n: int, seed: int) -> bytes:
    import base64

    return base64.encodebytes(random.Random(seed).randbytes(n)).replace(b"\n", b"\r\n")


BIG = _b64(6000, 1)
HEAD = b"From: a@sender.test\r\nSubject: t\r\nMIME-Version: 1.0\r\n"
MIXED = HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'

CASES = {
    "single part": HEAD + b"\r\n" + b"a line of text\r\n" * 400,
    "single part, LF only": (HEAD + b"\r\n" + b"a line of text\r\n" * 400).replace(b"\r\n", b"\n"),
    "attachment": MIXED + b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
    b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" + BIG + b"--b--\r\n",
    "long preamble and epilogue": MIXED + b"p\r\n" * 2000 + b"--b\r\n\r\n" + BIG + b"--b--\r\n" + b"e\r\n" * 2000,
    "signature dashes in a body": MIXED
    + b"--b\r\n\r\n"
    + b"t\r\n" * 800
    + b"-- \r\nme\r\n"
    + b"u\r\n" * 800
    + b"--b--\r\n",
    "attached message": MIXED
    + b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nX-A: 1\r\n\r\n"
    + BIG
    + b"--b--\r\n",
    "attached message without blank line": MIXED
    + b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: in\r\n"
    + BIG
    + b"--b--\r\n",
    "nested multipart": MIXED
    + b'--b\r\nContent-Type: multipart/alternative; boundary="c"\r\n\r\n'
    + b"x\r\n" * 900
    + b"--c\r\n\r\n"
    + BIG
    + b"--c--\r\n--b--\r\n",
    "part without headers or blank line": MIXED + b"--b\r\nnot a header line\r\n" + BIG + b"--b--\r\n",
    "no closing boundary": MIXED + b"--b\r\nContent-Type: application/zip\r\n\r\n" + BIG,
    "bare CR": MIXED + b"--b\r\n\r\n" + BIG[:3000] + b"\r--b\r\n" + BIG + b"--b--\r\n",
    "boundary with trailing space": MIXED + b"--b \r\n\r\n" + BIG + b"--b-- \r\n",
    "looks like a placeholder": HEAD + b"\r\nSMTPGW-ELIDED-00-0\r\n" + BIG,
    "8-bit bytes": HEAD + b"\r\n" + bytes(range(128, 256)) * 40 + b"\r\n" + BIG,
}


def _stdlib_parse(raw: bytes) -> Message:
    """The stdlib's parse with its own boundary regexes (mimeparse replaced them for the process)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(email.feedparser, "re", re)
        return BytesParser(policy=compat32).parsebytes(raw)


@pytest.mark.parametrize("raw", CASES.values(), ids=CASES.keys())
def test_same_tree_as_the_stdlib(raw: bytes) -> None:
    expected = _stdlib_parse(raw)
    got = mimeparse.parse(raw)
    assert _shape(got) == _shape(expected)
    assert serialize(got, "\r\n") == serialize(expected, "\r\n")


def test_long_bodies_are_elided_from_what_the_parser_reads() -> None:
    skeleton, elided = mimeparse._skeleton(CASES["attachment"])
    assert len(skeleton) < 1000
    assert "".join(elided.values()).encode() == BIG.rstrip(b"\r\n")


@pytest.mark.parametrize("name", ["long preamble and epilogue", "attached message"])
def test_a_placeholder_outside_a_leaf_falls_back_to_the_whole_parse(name: str) -> None:
    raw = CASES[name]
    skeleton, elided = mimeparse._skeleton(raw)
    assert elided
    assert not mimeparse._restore(BytesParser(policy=compat32).parsebytes(skeleton), elided)


SEPARATORS = ["--b", "--==_Part_1.2+3(x)?=", "--a b", "--\\d*[x]$^|", "--ünï", "--" + "q" * 70]
LINE_TAILS = ["", "\r\n", "\n", "\r", "--", "--\r\n", "--\n", "  \t\r\n", "-- \n", "x\r\n", "-", "\r\nmore", "\n\n"]


@pytest.mark.parametrize("separator", SEPARATORS)
def test_boundary_matcher_matches_what_the_feedparser_regex_matches(separator: str) -> None:
    pattern = "(?P<sep>" + re.escape(separator) + r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
    real = re.compile(pattern)
    fast = mimeparse._feedparser_compile(pattern)
    assert isinstance(fast, mimeparse._BoundaryRegex)
    lines = [separator + tail for tail in LINE_TAILS]
    lines += [separator[:-1], " " + separator, separator.upper() + "\r\n", "", "text\r\n"]
    for line in lines:
        want, got = real.match(line), fast.match(line)
        assert (want is None) == (got is None), line
        if want is not None and got is not None:
            assert [want.group(g) for g in ("end", "ws", "linesep")] == [got.group(g) for g in ("end", "ws", "linesep")]
            assert want.end() == got.end()


def test_other_patterns_are_compiled_as_usual() -> None:
    for pattern in ["(?P<sep>a)b", "x(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"]:
        assert isinstance(mimeparse._feedparser_compile(pattern), re.Pattern)


def test_the_feedparser_uses_the_boundary_matcher(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    class Counting(mimeparse._BoundaryRegex):
        def __init__(self, separator: str) -> None:
            made.append(separator)
            super().__init__(separator)

    monkeypatch.setattr(mimeparse, "_BoundaryRegex", Counting)
    raw = (
        MIXED
        + b'--b\r\nContent-Type: multipart/alternative; boundary="c"\r\n\r\n--c\r\n\r\n'
        + BIG
        + b"--c--\r\n--b--\r\n"
    )
    assert _shape(mimeparse.parse(raw)) == _shape(_stdlib_parse(raw))
    assert made == ["--b", "--c"]


def _no_search(data: bytes) -> bool:
    """Stands in for the bare-CR check where the caller vouched for the line ends."""
    raise AssertionError("searched for a bare CR in a body marked crlf_clean")


@pytest.mark.parametrize("name", [n for n, raw in CASES.items() if not bare_newline(raw)])
def test_a_crlf_clean_body_is_not_searched_and_parses_the_same(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = CASES[name]
    expected = _stdlib_parse(raw)
    monkeypatch.setattr(mimeparse, "bare_cr", _no_search)
    got = mimeparse.parse(raw, crlf_clean=True)
    assert _shape(got) == _shape(expected)
    assert serialize(got, "\r\n") == serialize(expected, "\r\n")

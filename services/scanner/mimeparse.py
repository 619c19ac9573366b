"""The stdlib's MIME parse, without the stdlib reading every line of every body.

The compat32 `BytesParser` walks the message one line at a time in Python:
a 300 KB base64 attachment is 4,000 lines, and parsing costs about 2.5 ms
for an average 82 KiB message, more than anything else the scanner does.
But the parser only *decides* anything on header lines and on lines that
start with "--" (multipart boundaries, RFC 2046 §5.1.1); every other body
line is appended to the payload of the part it is in, unchanged.

So `parse` hands the parser a skeleton: each long run of body text that
holds no line starting with "--" (a body begins after the first blank line
that follows a boundary or the message's own headers) is replaced by a
one-line placeholder carrying a random nonce. The parser builds the same
tree from the skeleton, and the placeholders are swapped back for the text
they stand for, which the parser would have copied verbatim. The result is
checked before it is used: every placeholder must have landed exactly once in
the payload of a leaf part whose ancestors are all multiparts. Anything else
(a placeholder in a preamble or epilogue, inside an attached message whose
headers it may have hidden, a bare CR that the parser would take for a line
end) falls back to the plain stdlib parse of the whole message, so the tree
is always the one `BytesParser(policy=compat32).parsebytes(raw)` builds.

The parser also compiles a regex for every multipart's boundary
(email/feedparser.py, `boundaryre`). Boundaries are unique per message, so
re's cache never hits and each multipart paid a full compile, about 120 µs
here and 7% of the scanner's CPU. That regex is the literal separator
followed by a fixed tail: this module hands the parser an `re` whose
`compile` answers that one pattern with `_BoundaryRegex` (`startswith` for
the literal, one regex compiled once for the tail), which matches the same
lines with the same groups. Every other pattern goes to `re.compile`. It is
installed for the whole process when this module is imported; every user of
the stdlib parser gets the same results, sooner.
"""

from __future__ import annotations

import email.feedparser
import re
import secrets
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

from shared.crlf import bare_cr

# Bodies shorter than this are not worth a placeholder.
MIN_ELIDED = 1024

_BLANK = re.compile(rb"\r\n\r\n|\n\n")

# How email.feedparser words its boundary regex: "(?P<sep>" + re.escape(separator) + _SEP_TAIL.
_SEP_HEAD = "(?P<sep>"
_SEP_TAIL = r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
_TAIL = re.compile(_SEP_TAIL[1:])
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def parse(raw: bytes, *, crlf_clean: bool = False) -> Message:
    """`BytesParser(policy=compat32).parsebytes(raw)`, faster for messages with long bodies.

    `crlf_clean`: the caller knows `raw` has no bare CR (the envelope's mark: the receiver
    refused any, shared/envelope.py), so the search for one is skipped: 49-59 µs of a mean
    corpus message's time here, about a tenth of `mime.inspect`'s, and 12.03 -> 11.38 M
    instructions per message in `python -m bench.instructions`."""
    plain = BytesParser(policy=compat32)
    if len(raw) < 4 * MIN_ELIDED or (not crlf_clean and bare_cr(raw)):
        # Small, or a bare CR (a line end to the parser, not to the search below).
        return plain.parsebytes(raw)
    skeleton, elided = _skeleton(raw)
    if not elided:
        return plain.parsebytes(raw)
    message = plain.parsebytes(skeleton)
    if _restore(message, elided):
        return message
    return plain.parsebytes(raw)


def _skeleton(raw: bytes) -> tuple[bytes, dict[str, str]]:
    """The message with long body runs replaced by placeholders, and what each stands for."""
    nonce = secrets.token_hex(12)
    pieces: list[bytes] = []
    elided: dict[str, str] = {}
    # Segments run from one "--" line (or the start) to the line end before the next one.
    starts = [0, *_dash_lines(raw)]
    # The message's last line end stays in the skeleton: what the parser makes of it (keep or
    # strip, depending on what the last line belongs to) it then does to the same bytes.
    tail = len(raw) - (2 if raw.endswith(b"\r\n") else 1 if raw.endswith(b"\n") else 0)
    ends = [*starts[1:], tail]
    done = 0
    for start, end in zip(starts, ends, strict=True):
        blank = _BLANK.search(raw, start, end)
        if blank is None:
            continue
        body = blank.end()
        if end - body < MIN_ELIDED:
            continue
        key = f"SMTPGW-ELIDED-{nonce}-{len(elided)}"
        elided[key] = raw[body:end].decode("ascii", "surrogateescape")
        pieces += [raw[done:body], key.encode("ascii")]
        done = end
    pieces.append(raw[done:])
    return b"".join(pieces), elided


def _dash_lines(raw: bytes) -> list[int]:
    """Where the line end before each line that starts with "--" begins (at its CR, if any)."""
    found = []
    at = raw.find(b"\n--")
    while at >= 0:
        found.append(at - 1 if at and raw[at - 1] == 0x0D else at)
        at = raw.find(b"\n--", at + 3)
    return found


def _restore(message: Message, elided: dict[str, str]) -> bool:
    """Put the elided text back; False when a placeholder is not where it may be."""
    left = dict(elided)
    stack = [message]
    while stack:
        node = stack.pop()
        payload = node.get_payload()
        if isinstance(payload, list):
            if node.get_content_maintype() == "message":
                continue  # an attached message's parts are never restored: see below
            stack.extend(p for p in payload if isinstance(p, Message))
            continue
        if not isinstance(payload, str) or "SMTPGW-ELIDED-" not in payload:
            continue
        for key in [k for k in left if k in payload]:
            if payload.count(key) != 1:
                return False
            payload = payload.replace(key, left.pop(key))
        node.set_payload(payload)
    # Placeholders not found in a leaf whose ancestors are all multiparts sit in a preamble, an
    # epilogue or an attached message (whose headers they may hide): the tree is not the same.
    return not left


class _BoundaryRegex:
    """The feedparser's boundary regex for one separator, without compiling it: the separator is
    a literal, so a line matches exactly when it starts with it and the tail matches right after.
    The feedparser reads only `match(line)` and the groups "end" and "linesep" of its result."""

    __slots__ = ("_separator",)

    def __init__(self, separator: str) -> None:
        self._separator = separator

    def match(self, line: str) -> re.Match[str] | None:
        if not line.startswith(self._separator):
            return None
        return _TAIL.match(line, len(self._separator))


def _feedparser_compile(pattern: str, flags: int = 0) -> re.Pattern[str] | _BoundaryRegex:
    if isinstance(pattern, str) and not flags and pattern.startswith(_SEP_HEAD) and pattern.endswith(_SEP_TAIL):
        escaped = pattern[len(_SEP_HEAD) : -len(_SEP_TAIL)]
        separator = _ESCAPED.sub(r"\1", escaped)
        if re.escape(separator) == escaped:  # anything else is not the pattern above
            return _BoundaryRegex(separator)
    return re.compile(pattern, flags)


class _FeedparserRe:
    """What email.feedparser sees as `re`: the module itself, but for `compile`."""

    compile = staticmethod(_feedparser_compile)

    def __getattr__(self, name: str) -> object:
        return getattr(re, name)


setattr(email.feedparser, "re", _FeedparserRe())  # noqa: B010 - a module global, replaced on purpose

"""The MIME walker: parse a message once and list every part the filters look at.

Pure: bytes in, an `Inspection` out. The stdlib parser with the compat32
policy does the parsing (it is about ten times faster than policy.default and
keeps raw header values, so an untouched part serialises back byte for byte);
this module only walks the tree it builds (`mimeparse.parse` spares the parser
the body lines it would only copy):

- every leaf part, decoded (base64, quoted-printable, x-uuencode);
- attached messages (message/rfc822), descended into, including ones that
  were (wrongly) sent base64- or quoted-printable-encoded;
- uuencoded blocks inside text parts ("begin 644 name" ... "end"), which
  mail clients show as attachments;

within `max_parts` (every part and uuencoded block counts) and `max_depth`
(multipart and message nesting). Past a bound the walk stops and the
inspection carries a problem (the "limits" category). The parser never sees
a limit: a message whose nesting makes it recurse too deep fails outright
(`failure`), which quarantines. Malformed MIME otherwise parses "as well as
possible" (the parser records defects and carries on); clamd still scans the
raw bytes whatever the walker made of them.

Each part has a `ref`, its 1-based position path ("2.1.3"; "0" is the whole
message), and a `strip_ref`: which part to replace to get rid of it. An
attachment is its own strip_ref; a body part inside an attached message is
removed with that message; a body part of the message itself has none (a
finding there quarantines the whole message).
"""

from __future__ import annotations

import base64
import binascii
import io
import quopri
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email import errors
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32

import pybase64

from services.scanner.filenames import decode_param
from services.scanner.mimeparse import parse


@dataclass(frozen=True, slots=True)
class Part:
    ref: str
    path: tuple[int, ...]  # indices through get_payload() lists from the root
    depth: int
    content_type: str
    names: tuple[str, ...]  # decoded file names: Content-Disposition filename, Content-Type name
    data: bytes  # decoded payload ("" for containers)
    is_file: bool  # an attachment in the user's eyes: named, disposition attachment, or not text
    strip_ref: str | None  # the part to replace to remove this one; None: it cannot be removed
    container: bool = False  # an attached message (message/rfc822): its parts follow it
    uu_parent: str = ""  # for a uuencoded block: the ref of the text part that holds it
    uu_span: tuple[int, int] = (0, 0)  # ... and where it sits in that part's decoded data

    @property
    def name(self) -> str:
        return self.names[0] if self.names else ""

    @property
    def label(self) -> str:
        """How a verdict names this part: "<ref>:<file name>" (the ref lets the core find it again)."""
        return f"{self.ref}:{self.name}"


@dataclass(frozen=True, slots=True)
class Inspection:
    raw: bytes
    message: Message | None  # the parsed tree; None when parsing failed outright
    parts: tuple[Part, ...] = ()  # leaves and uuencoded blocks, in document order
    nodes: Mapping[str, Part] = field(default_factory=dict)  # every part by ref, containers included
    count: int = 0  # parts seen (containers and uuencoded blocks included)
    problems: tuple[str, ...] = ()  # bounds exceeded: the walk stopped early
    failure: str = ""  # the parse failed outright
    defects: int = 0  # MIME defects the parser noted and worked around
    linesep: str = "\r\n"


def inspect(raw: bytes, max_parts: int, max_depth: int, *, crlf_clean: bool = False) -> Inspection:
    """Parse and walk `raw`. Never raises for any input. `crlf_clean`: see `mimeparse.parse`."""
    linesep = "\r\n" if b"\r\n" in raw[:4096] or b"\n" not in raw[:4096] else "\n"
    try:
        message = parse(raw, crlf_clean=crlf_clean)  # the stdlib's parse, without it reading every body line
    except RecursionError:
        return Inspection(raw, None, failure="MIME structure nested too deeply to parse", linesep=linesep)
    except Exception as exc:  # the parser is lenient; anything it still throws is a failed parse
        return Inspection(raw, None, failure=f"MIME parse failed: {type(exc).__name__}: {exc}", linesep=linesep)
    walker = _Walker(max_parts, max_depth, linesep)
    try:
        walker.walk(message, (), 0, enclosing=None, detached=False)
    except _LimitError as limit:
        walker.problems.append(limit.reason)
    except RecursionError:
        return Inspection(raw, None, failure="MIME structure nested too deeply to walk", linesep=linesep)
    except Exception as exc:  # a part the library cannot even describe: do not guess, quarantine
        return Inspection(raw, None, failure=f"MIME walk failed: {type(exc).__name__}: {exc}", linesep=linesep)
    return Inspection(
        raw,
        message,
        tuple(walker.parts),
        walker.nodes,
        walker.count,
        tuple(walker.problems),
        defects=walker.defects,
        linesep=linesep,
    )


def serialize(message: Message, linesep: str) -> bytes:
    """The tree as bytes: no "From " mangling, no re-folding, the given line ending.

    With compat32 a part that was parsed and not changed comes out as it came in.
    """
    out = io.BytesIO()
    policy = compat32.clone(linesep=linesep, max_line_length=None)
    BytesGenerator(out, mangle_from_=False, policy=policy).flatten(message, unixfrom=False)
    return out.getvalue()


def _source_of(message: Message, linesep: str) -> bytes:
    """The text a part was parsed from, as near as the tree allows: when the parser found no
    blank line after the headers (an encoded body is no header), the generator would add one."""
    text = serialize(message, linesep)
    if any(isinstance(d, errors.MissingHeaderBodySeparatorDefect) for d in message.defects):
        separator = linesep.encode()
        text = text[len(separator) :] if text.startswith(separator) else text.replace(separator * 2, separator, 1)
    return text


def navigate(message: Message, path: tuple[int, ...]) -> Message:
    """The part at `path` in the tree `inspect` built."""
    node = message
    for index in path:
        payload = node.get_payload()
        child = payload[index] if isinstance(payload, list) else None
        if not isinstance(child, Message):
            raise LookupError(f"no part at {path}")
        node = child
    return node


def ref_of(path: tuple[int, ...]) -> str:
    return ".".join(str(i + 1) for i in path) or "0"


class _LimitError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Walker:
    max_parts: int
    max_depth: int
    linesep: str
    parts: list[Part] = field(default_factory=list)
    nodes: dict[str, Part] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    count: int = 0
    defects: int = 0

    def _counted(self) -> None:
        self.count += 1
        if self.count > self.max_parts:
            raise _LimitError(f"more than {self.max_parts} MIME parts (max_parts)")

    def walk(self, msg: Message, path: tuple[int, ...], depth: int, enclosing: str | None, detached: bool) -> None:
        """Visit `msg`. `enclosing` is the strip_ref of the nearest attached message around it;
        `detached` marks parts of a re-parsed encoded message, which cannot be edited in place."""
        self._counted()
        self.defects += len(msg.defects)
        ref = ref_of(path)
        ctype = msg.get_content_type()
        names = _names(msg)
        payload = msg.get_payload()
        if isinstance(payload, list) and msg.get_content_maintype() == "message":
            strip_ref = ref if path and not detached else enclosing
            self.nodes[ref] = Part(ref, path, depth, ctype, names, b"", bool(path), strip_ref, container=True)
            self._descend_message(msg, payload, path, depth, strip_ref, detached)
            return
        if isinstance(payload, list):
            if payload and depth + 1 > self.max_depth:
                raise _LimitError(f"MIME parts nested more than {self.max_depth} levels deep (max_depth)")
            for index, sub in enumerate(payload):
                if isinstance(sub, Message):
                    self.walk(sub, (*path, index), depth + 1, enclosing, detached)
            return
        self._leaf(msg, ref, path, depth, ctype, names, enclosing, detached)

    def _descend_message(
        self,
        msg: Message,
        payload: list[Message | str],
        path: tuple[int, ...],
        depth: int,
        strip_ref: str | None,
        detached: bool,
    ) -> None:
        if not payload or not isinstance(payload[0], Message):
            return
        if depth + 1 > self.max_depth:
            raise _LimitError(f"MIME parts nested more than {self.max_depth} levels deep (max_depth)")
        inner = payload[0]
        cte = str(msg.get("content-transfer-encoding", "")).strip().lower()
        if cte in ("base64", "quoted-printable"):
            # RFC 2046 section 5.2.1 forbids encoding message/rfc822, but senders do it and
            # mail clients decode it. The parser took the encoded text for a message; decode
            # it and parse the result. Its parts cannot be edited in place: removing any of
            # them removes the whole attached message.
            text = _source_of(inner, self.linesep)
            try:
                decoded = base64.b64decode(text) if cte == "base64" else quopri.decodestring(text)
            except (binascii.Error, ValueError):
                decoded = None  # not decodable after all: walk what the parser made of it
            if decoded is not None:
                inner = BytesParser(policy=compat32).parsebytes(decoded)
                detached = True
        self.walk(inner, (*path, 0), depth + 1, strip_ref, detached)

    def _leaf(
        self,
        msg: Message,
        ref: str,
        path: tuple[int, ...],
        depth: int,
        ctype: str,
        names: tuple[str, ...],
        enclosing: str | None,
        detached: bool,
    ) -> None:
        data = decoded_payload(msg)
        maintype = ctype.partition("/")[0]
        disposition = (msg.get_content_disposition() or "").lower()
        is_file = bool(names) or disposition == "attachment" or maintype not in ("text", "multipart", "message")
        # The message's own body cannot be removed, nor can parts of a re-parsed message.
        strip_ref = ref if is_file and path and not detached else enclosing
        part = Part(ref, path, depth, ctype, names, data, is_file, strip_ref)
        self.nodes[ref] = part
        self.parts.append(part)
        if maintype == "text" and b"begin " in data:
            for n, (name, span, block) in enumerate(find_uuencoded(data), start=1):
                self._counted()
                uu_ref = f"{ref}.uu{n}"
                uu_strip = uu_ref if not detached else enclosing
                block_part = Part(
                    uu_ref,
                    path,
                    depth + 1,
                    "application/octet-stream",
                    (name,) if name else (),
                    block,
                    True,
                    uu_strip,
                    uu_parent=ref,
                    uu_span=span,
                )
                self.nodes[uu_ref] = block_part
                self.parts.append(block_part)


def decoded_payload(msg: Message) -> bytes:
    """`msg.get_payload(decode=True)` of a leaf part (b"" when there is none), with well-formed
    base64 decoded by pybase64.

    The stdlib splits a base64 body into lines, joins them and decodes the result with
    binascii in strict mode, a byte at a time: 1.9 ms for a 300 KB attachment, the largest
    single cost of scanning a message with one. Deleting the line ends (as the split and
    join do) and pybase64's SIMD decode take about 0.2 ms. pybase64's validating decode
    accepts exactly what strict binascii accepts, and for such a body the stdlib returns
    the same bytes and records no defect; so only a body that passes it takes this path.
    Anything else (characters outside the alphabet, missing padding, 8-bit bytes) is left
    to the stdlib, with its defects and its lenience.
    """
    if not msg.is_multipart() and str(msg.get("content-transfer-encoding", "")).lower() == "base64":
        payload = msg.get_payload()
        if isinstance(payload, str) and payload.isascii():
            try:
                return pybase64.b64decode(payload.encode("ascii").translate(None, b"\r\n"), validate=True)
            except binascii.Error:
                pass
    data = msg.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _names(msg: Message) -> tuple[str, ...]:
    """Every file name the part announces; a client may use either, so a check must see both."""
    names: list[str] = []
    for param, header in (("filename", "content-disposition"), ("name", "content-type")):
        try:
            value = _param(msg, param, header)
            name = decode_param(value if not isinstance(value, tuple) else (value[0] or "", value[1] or "", value[2]))
        except Exception:  # a parameter so broken it cannot be read names nothing
            continue
        if name and name not in names:
            names.append(name)
    return tuple(names)


def _param(msg: Message, param: str, header: str) -> str | tuple[str | None, str | None, str] | None:
    """`msg.get_param`, except that raw 8-bit header bytes are read as UTF-8 (RFC 6532),
    where compat32 would replace them with U+FFFD before parsing the parameters."""
    raw = next((value for key, value in msg.raw_items() if key.lower() == header), None)
    if isinstance(raw, str) and not raw.isascii():
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            unescaped = Message()
            unescaped[header] = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            return unescaped.get_param(param, header=header)
    return msg.get_param(param, header=header)


# "begin <mode> <name>" at the start of a line opens a uuencoded file (POSIX uuencode(1)); "end"
# closes it. The pattern has no "^": anchored, the regex engine tries every offset of the text
# (1.1 ms for 85 KB); starting with a literal, it jumps from one "begin" to the next (76 µs), and
# `_at_line_start` drops the ones inside a line. A match never spans a line end, so dropping one
# cannot hide a "begin" that starts the next line.
_UU_BEGIN = re.compile(rb"begin[ \t]+([0-7]{1,4})[ \t]+([^\r\n]+?)[ \t]*\r?$", re.MULTILINE)


def _at_line_start(text: bytes, offset: int) -> bool:
    return offset == 0 or text[offset - 1] == 0x0A  # b"\n"


def find_uuencoded(text: bytes) -> list[tuple[str, tuple[int, int], bytes]]:
    """The uuencoded files in `text`: (name, (start, end) offsets, decoded bytes).

    A block runs from its "begin" line to its "end" line (included) or, when a
    line does not decode or "end" is missing, up to the last line that decoded.
    """
    blocks: list[tuple[str, tuple[int, int], bytes]] = []
    position = 0
    for begin in _UU_BEGIN.finditer(text):
        if begin.start() < position or not _at_line_start(text, begin.start()):
            continue
        start, cursor, end = begin.start(), _next_line(text, begin.end()), 0
        decoded: list[bytes] = []
        while cursor < len(text):
            line_end = _next_line(text, cursor)
            line = text[cursor:line_end].rstrip(b"\r\n")
            if line.strip() == b"end":
                end = line_end
                break
            chunk = _decode_uu_line(line)
            if chunk is None:
                break
            decoded.append(chunk)
            cursor = end = line_end
        if not decoded:
            continue
        name = begin.group(2).decode("utf-8", "replace")
        blocks.append((name, (start, end), b"".join(decoded)))
        position = end
    return blocks


def _next_line(text: bytes, offset: int) -> int:
    newline = text.find(b"\n", offset)
    return len(text) if newline < 0 else newline + 1


def _decode_uu_line(line: bytes) -> bytes | None:
    if not line:
        return None
    try:
        return binascii.a2b_uu(line)
    except binascii.Error:
        # Some encoders pad lines oddly; decode only the length the line announces
        # (the workaround the stdlib's own uu decoder used, by Fredrik Lundh).
        nbytes = (((line[0] - 32) & 63) * 4 + 5) // 3
        try:
            return binascii.a2b_uu(line[:nbytes])
        except binascii.Error:
            return None

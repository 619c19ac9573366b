"""Rebuilding a message: attachments replaced by a notice, findings recorded in a header
(and copies of that header the message arrived with removed).

Works on the tree `services.scanner.mime.inspect` parsed (compat32 keeps raw
header values and bodies, so every part that is not replaced serialises back
as it came in) and serialises it with the message's own line ending. Only a
message that changes is re-serialised; the core hands an unchanged message on
as the very bytes object it received.
"""

from __future__ import annotations

import base64
import quopri
from collections import defaultdict
from collections.abc import Mapping, Sequence
from email.header import Header
from email.message import Message

from services.scanner.mime import Inspection, navigate, serialize

# The header that records what the scanner found in a message it delivers anyway.
FINDINGS_HEADER = "X-SMTPGW-Finding"
MAX_FINDING_HEADERS = 10


def replace_parts(inspection: Inspection, notices: Mapping[str, str]) -> bytes:
    """Replace each part named by ref in `notices` with a text/plain part holding its notice.

    A part inside another part being replaced goes with it. A uuencoded block is
    cut out of its text part and the notice put in its place. Raises LookupError
    for an unknown ref or a message that failed to parse.
    """
    message = inspection.message
    if message is None:
        raise LookupError("the message was not parsed")
    refs = [r for r in notices if not any(r.startswith(other + ".") for other in notices if other != r)]
    blocks: dict[str, list[tuple[tuple[int, int], str]]] = defaultdict(list)
    for ref in refs:
        node = inspection.nodes[ref]
        if node.uu_parent:
            blocks[node.uu_parent].append((node.uu_span, notices[ref]))
            continue
        if not node.path:
            raise LookupError("the message itself cannot be replaced by a notice")
        parent = navigate(message, node.path[:-1])
        payload = parent.get_payload()
        if not isinstance(payload, list):
            raise LookupError(f"part {ref} has no parent container")
        payload[node.path[-1]] = _notice_part(notices[ref])
    for parent_ref, spans in blocks.items():
        holder = inspection.nodes[parent_ref]
        text_part = navigate(message, holder.path)
        charset = str(text_part.get_param("charset", "us-ascii") or "us-ascii")
        data = holder.data
        for (start, end), notice in sorted(spans, reverse=True):
            data = data[:start] + _encode_text(notice + "\n", charset) + data[end:]
        _set_decoded_payload(text_part, data)
    return serialize(message, inspection.linesep)


def add_headers(body: bytes, headers: Sequence[tuple[str, str]], linesep: str) -> bytes:
    """Prepend header fields to a message without parsing it again (RFC 5322 section 3.6:
    trace and optional fields may appear anywhere in the header; new ones go on top)."""
    lines = []
    for name, value in headers[:MAX_FINDING_HEADERS]:
        text = " ".join(value.split())  # no CR, LF or other breaks from a file name
        folded = Header(text, charset="utf-8" if not text.isascii() else "us-ascii", header_name=name)
        lines.append(f"{name}: {folded.encode(linesep=linesep)}{linesep}")
    return "".join(lines).encode("ascii") + body


def remove_fields(body: bytes, name: str, linesep: str) -> tuple[bytes, int]:
    """`body` without the fields called `name` (any case, folded lines included) in its own
    header, and how many there were; the very same object when there were none.

    Only the message's header counts: the name in the body, or in the header of a
    message attached to it, is content. The header ends at the first empty line.
    """
    sep = linesep.encode()
    if body.startswith(sep):  # an empty line first: no header at all
        return body, 0
    end = body.find(sep + sep)
    header = body if end < 0 else body[: end + len(sep)]
    target = name.lower().encode("ascii")
    if target not in header.lower():  # the common case: a pass over the header alone (a few KB)
        return body, 0
    kept: list[bytes] = []
    dropping = False
    removed = 0
    for line in header.split(sep):
        if line[:1] in (b" ", b"\t"):  # a folded line belongs to the field above it
            if not dropping:
                kept.append(line)
            continue
        field, colon, _ = line.partition(b":")
        dropping = bool(colon) and field.strip().lower() == target
        removed += dropping
        if not dropping:
            kept.append(line)
    if not removed:
        return body, 0
    return sep.join(kept) + body[len(header) :], removed


def _notice_part(text: str) -> Message:
    part = Message()
    if text.isascii():
        part["Content-Type"] = 'text/plain; charset="us-ascii"'
        part["Content-Transfer-Encoding"] = "7bit"
        payload = text + "\n"
    else:
        part["Content-Type"] = 'text/plain; charset="utf-8"'
        part["Content-Transfer-Encoding"] = "quoted-printable"
        payload = quopri.encodestring((text + "\n").encode("utf-8")).decode("ascii")
    part["Content-Disposition"] = "inline"
    part.set_payload(payload)
    return part


def _encode_text(text: str, charset: str) -> bytes:
    try:
        return text.encode(charset, "replace")
    except LookupError:
        return text.encode("utf-8", "replace")


def _set_decoded_payload(part: Message, data: bytes) -> None:
    """Set a part's content from decoded bytes, encoded the way the part already declares."""
    cte = str(part.get("content-transfer-encoding", "")).strip().lower()
    if cte == "base64":
        part.set_payload(base64.encodebytes(data).decode("ascii"))
    elif cte == "quoted-printable":
        # Line ends are the generator's business; encoding a CR would turn it into "=0D".
        part.set_payload(quopri.encodestring(data.replace(b"\r\n", b"\n")).decode("ascii"))
    else:
        # 7bit, 8bit, binary: the bytes as they are (surrogate escapes carry 8-bit bytes through).
        part.set_payload(data.decode("ascii", "surrogateescape"))

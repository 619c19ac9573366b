"""Bounces: the delivery status notification (RFC 3464) a sender gets back.

Pure: the bounce job's envelope (whose `failures` say which recipients failed
and why) and the original bytes in, the DSN's bytes and envelope out. It runs
from the separate bounce queue, so a storm of bounces never holds up normal
delivery; the DSN itself then goes through the deliver queue like any mail.

The DSN is a multipart/report (RFC 6522) with report-type=delivery-status: a
human-readable part, a message/delivery-status part (Reporting-MTA,
Arrival-Date, then Final-Recipient, Action, Status, Remote-MTA and
Diagnostic-Code per recipient) and the original's header section as
text/rfc822-headers. Only the headers go back, never the full original, which
may carry the malware that made it fail. When an address is not ASCII the
RFC 6533 "global" types are used and the DSN needs SMTPUTF8.

Two kinds of message are never bounced (`suppression_reason`): one whose
sender is the null reverse-path `<>` (a bounce must not cause a bounce, RFC
5321 section 4.5.5), and one the scanner found infected: its sender is almost
certainly forged, and bouncing viruses to it is backscatter (Postfix's
FILTER_README calls it "a VERY BAD IDEA").
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.utils import format_datetime

from shared.envelope import Client, Direction, Envelope, RecipientFailure

# Cap on the original's header section we return: enough for any honest message.
MAX_HEADER_BYTES = 64 * 1024
# Field values are cut here, well under the 998-octet line limit of RFC 5322 section 2.1.1.
MAX_FIELD_CHARS = 900
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Dsn:
    data: bytes
    smtputf8: bool  # an address in it is not ASCII (RFC 6531)
    eight_bit: bool  # some content is 8-bit (RFC 6152)


def suppression_reason(envelope: Envelope) -> str | None:
    """Why this message must not be bounced, or None when a DSN may go to its sender."""
    if not envelope.mail_from:
        return "null sender <>: a bounce is never bounced"
    if any(v.category == "virus" for v in envelope.verdicts):
        return "infected message: its sender is likely forged, no backscatter"
    return None


def original_headers(body: bytes, limit: int = MAX_HEADER_BYTES) -> bytes:
    """The header section of a message, CRLF line ends, cut at a line boundary under `limit`."""
    head = _HEADER_END.split(body, maxsplit=1)[0] if not body.startswith((b"\r\n", b"\n")) else b""
    lines = _LINE_END.split(head)
    out: list[bytes] = []
    size = 0
    for line in lines:
        if size + len(line) + 2 > limit:
            if line[:1] in (b" ", b"\t"):
                # Drop the header whose continuation lines would be cut off, so what is left parses.
                while out and out[-1][:1] in (b" ", b"\t"):
                    out.pop()
                if out:
                    out.pop()
            break
        out.append(line)
        size += len(line) + 2
    return b"".join(line + b"\r\n" for line in out if line)


def _text(value: str, *, utf8: bool = False) -> str:
    """One line for a DSN field: no control characters; non-ASCII only where allowed."""
    value = _UNPRINTABLE.sub(" ", value).strip()[:MAX_FIELD_CHARS]
    return value if utf8 else value.encode("ascii", "replace").decode("ascii")


def _fold(name: str, value: str) -> str:
    """A header field folded at spaces near 78 columns (RFC 5322 section 2.2.3)."""
    words = value.split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > 78 and line.strip() and line != f"{name}:":
            lines.append(line)
            line = " " + word
        else:
            line = f"{line} {word}"
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _diagnostic(failure: RecipientFailure) -> str:
    if failure.code:
        return f"smtp; {failure.code} {failure.status} {failure.message}"
    return f"X-smtpgw; {failure.message}"


def _address_type(address: str) -> str:
    # RFC 6533 section 3: "utf-8" addresses, allowed in message/global-delivery-status only.
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def _human(envelope: Envelope, reporting_mta: str, utf8: bool) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. The details are below.",
        "",
        "For further assistance, please contact your postmaster and",
        f"include the queue id {envelope.parent_id or envelope.queue_id}.",
        "",
    ]
    for f in envelope.failures:
        said = f"host {f.remote} said: " if f.remote else ""
        reply = f"{f.code} {f.status} {f.message}" if f.code else f"{f.status} {f.message}"
        lines.append(_text(f"<{f.rcpt}>: {said}{reply}", utf8=utf8))
    return "\r\n".join(lines) + "\r\n"


def _report(envelope: Envelope, reporting_mta: str, now: datetime, utf8: bool) -> str:
    fields = [
        _fold("Reporting-MTA", f"dns; {reporting_mta}"),
        _fold("X-Smtpgw-Queue-ID", envelope.parent_id or envelope.queue_id),
        _fold("Arrival-Date", format_datetime(envelope.received_at)),
    ]
    blocks = ["".join(fields)]
    for f in envelope.failures:
        block = [
            _fold("Final-Recipient", _text(_address_type(f.rcpt), utf8=utf8)),
            _fold("Action", "failed"),
            _fold("Status", f.status),
        ]
        if f.remote:
            block.append(_fold("Remote-MTA", f"dns; {_text(f.remote)}"))
        block.append(_fold("Diagnostic-Code", _text(_diagnostic(f), utf8=utf8)))
        block.append(_fold("Last-Attempt-Date", format_datetime(now)))
        blocks.append("".join(block))
    return "\r\n".join(blocks)


def _message_id(headers: bytes) -> str:
    value = BytesHeaderParser().parsebytes(headers).get("Message-ID", "")
    value = _text(str(value))
    return value if re.fullmatch(r"<[^<>\s]+>", value) else ""


def build_dsn(envelope: Envelope, original: bytes, *, reporting_mta: str, now: datetime) -> Dsn:
    """The DSN for a bounce job: `envelope.failures` are the failed recipients, `original`
    the message they failed for, `envelope.mail_from` the sender the DSN goes to."""
    addresses = [envelope.mail_from, *(f.rcpt for f in envelope.failures)]
    utf8 = not all(a.isascii() for a in addresses)
    headers = original_headers(original)
    headers_8bit = not headers.isascii()
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    headers_type = "message/global-headers" if headers_8bit else "text/rfc822-headers"
    charset, cte = ("utf-8", "8bit") if utf8 else ("us-ascii", "7bit")

    parts = [
        (
            "Content-Description: Notification\r\n"
            f"Content-Type: text/plain; charset={charset}\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n\r\n"
        ).encode()
        + _human(envelope, reporting_mta, utf8).encode(),
        (
            f"Content-Description: Delivery report\r\nContent-Type: {status_type}\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n\r\n"
        ).encode()
        + _report(envelope, reporting_mta, now, utf8).encode(),
        (
            f"Content-Description: Undelivered Message Headers\r\nContent-Type: {headers_type}\r\n"
            f"Content-Transfer-Encoding: {'8bit' if headers_8bit else '7bit'}\r\n\r\n"
        ).encode()
        + headers,
    ]
    # A boundary derived from the content's hash cannot occur in that content.
    boundary = "=_smtpgw_" + hashlib.sha256(b"".join(parts)).hexdigest()[:40]
    in_reply_to = _message_id(headers)
    top = [
        _fold("Date", format_datetime(now)),
        _fold("From", f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
        _fold("To", f"<{envelope.mail_from}>"),
        _fold("Subject", "Undelivered Mail Returned to Sender"),
        _fold("Message-ID", f"<{envelope.queue_id}@{reporting_mta}>"),
    ]
    if in_reply_to:
        top += [_fold("In-Reply-To", in_reply_to), _fold("References", in_reply_to)]
    top += [
        # RFC 3834 section 5: automatic responses say so, so that nothing answers them.
        _fold("Auto-Submitted", "auto-replied"),
        _fold("MIME-Version", "1.0"),
        f'Content-Type: multipart/report; report-type={status_type.split("/")[1]};\r\n\tboundary="{boundary}"\r\n',
        _fold("Content-Transfer-Encoding", "8bit" if utf8 or headers_8bit else "7bit"),
    ]
    body = b"\r\nThis is a MIME-encapsulated message.\r\n"
    for part in parts:
        body += b"\r\n--" + boundary.encode() + b"\r\n" + part
    body += b"\r\n--" + boundary.encode() + b"--\r\n"
    data = "".join(top).encode() + body
    return Dsn(data, smtputf8=utf8, eight_bit=utf8 or headers_8bit)


def dsn_envelope(envelope: Envelope, dsn: Dsn, *, reporting_mta: str, now: datetime, lifetime: float) -> Envelope:
    """The DSN's envelope: same queue id as the bounce job (its continuation), from <> to the
    original sender, in the opposite direction to the original (a DSN for mail that came in
    from the Internet goes back out to it)."""
    direction = Direction.INCOMING if envelope.direction is Direction.OUTGOING else Direction.OUTGOING
    return Envelope(
        queue_id=envelope.queue_id,
        received_at=now,
        client=Client(ip="127.0.0.1", helo=reporting_mta, relay=True),
        mail_from="",
        rcpt_to=(envelope.mail_from,),
        size=len(dsn.data),
        direction=direction,
        smtputf8=dsn.smtputf8,
        eight_bit=dsn.eight_bit,
        expires_at=now + timedelta(seconds=lifetime),
        parent_id=envelope.parent_id or envelope.queue_id,
    )

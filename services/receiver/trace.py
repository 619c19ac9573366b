"""The `Received:` trace header the receiver puts on top of every message it accepts.

RFC 5321 §4.4 makes it mandatory: who handed us the message (`from` the
HELO name, with the peer's address literal), who took it (`by` our
hostname), how (`with`, RFC 3848 and RFC 6531 §3.7.3 protocol names), our
queue `id`, the recipient when there is just one, and when. It names no
software and no version: that only helps an attacker. Pure: values in, bytes out.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime

# What a HELO name may contribute to a header: printable ASCII, no comment parentheses.
_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x7e]")
_MAX_HELO = 255


def address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3: `[192.0.2.1]`, `[IPv6:2001:db8::1]`."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "[" + _UNSAFE.sub("?", ip)[:64] + "]"
    return f"[IPv6:{addr}]" if addr.version == 6 else f"[{addr}]"


def protocol(*, esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The `with` keyword: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848), UTF8SMTP... (RFC 6531)."""
    if not esmtp:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + suffix


def received_header(
    *,
    helo: str,
    ip: str,
    hostname: str,
    queue_id: str,
    with_protocol: str,
    recipients: Sequence[str],
    received_at: datetime,
) -> bytes:
    """The folded header, CRLF-terminated, ready to go in front of the message."""
    lines = [_from_line(helo, ip), f"\tby {_safe(hostname)} with {with_protocol} id {queue_id}"]
    # Naming the recipient of a message sent to several would tell each about the others.
    rcpt = recipients[0] if len(recipients) == 1 else ""
    date = _date(received_at.replace(microsecond=0))
    if rcpt and not _UNSAFE.search(rcpt) and "<" not in rcpt and ">" not in rcpt:
        lines.append(f"\tfor <{rcpt}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


# What stays the same from one message to the next is formatted once: the `from` line per
# client (a session's messages, a client's sessions), our hostname, the date per second.


@functools.lru_cache(maxsize=1024)
def _from_line(helo: str, ip: str) -> str:
    name = _UNSAFE.sub("?", helo)[:_MAX_HELO] or "unknown"
    return f"Received: from {name} ({address_literal(ip)})"


@functools.lru_cache(maxsize=16)
def _safe(hostname: str) -> str:
    return _UNSAFE.sub("?", hostname)


@functools.lru_cache(maxsize=4)
def _date(second: datetime) -> str:
    return format_datetime(second)

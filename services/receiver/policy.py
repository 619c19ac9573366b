"""Receiver policy: who may send what to whom. Pure: values in, a Decision out.

This is the receiver's only judge. The aiosmtpd hooks (`handler.py`) ask it
about each sender, recipient and finished DATA phase and send back the reply
it decides; nothing here touches sockets, aiosmtpd or the transport.

Relay control is the point of the module (DESIGN.md: "never an open relay").
A client in `[receiver].relay_networks` (an internal mail system) may send to
any recipient. Anyone else may only reach mailboxes that are plainly
`local@internal-domain`: every old trick that made a gateway forward mail
somewhere else is refused with 550 5.7.1 (RFC 3463: "delivery not
authorized"), the way Postfix's `reject_unauth_destination` does:

- percent hack `user%elsewhere@internal` and bang paths `host!user@internal`
  (RFC 5321 §3.6.1 leaves them to local interpretation: an internal host may
  still forward them),
- several `@`, or a quoted local part hiding an `@`, `%` or `!`,
- address literals `user@[192.0.2.1]` (they name no domain of ours),
- source routes `@relay:user@domain` are obsolete (RFC 5321 §3.3 and
  Appendix C): we ignore the route, as servers SHOULD, and judge the mailbox.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Characters that make a local part mean "forward this elsewhere" (RFC 5321 §3.6.1), or
# quoting that could hide one.
_ROUTING_CHARS = frozenset('@%!"\\')


@dataclass(frozen=True, slots=True)
class Decision:
    """One SMTP answer: reply code, RFC 3463 enhanced status, text.

    `address` is what to store for an accepted recipient or sender (source
    route dropped, `postmaster` qualified); `reason` is a short metric label
    from a closed set.
    """

    code: int
    status: str
    text: str
    address: str = ""
    reason: str = "ok"

    @property
    def accepted(self) -> bool:
        return self.code < 400

    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


class DataProblem(enum.StrEnum):
    """What can be wrong with the bytes of a DATA phase (found by `dataread`)."""

    TOO_BIG = "too_big"  # over [receiver].max_message_size
    LINE_TOO_LONG = "line_too_long"  # over [receiver].max_line_length
    BARE_NEWLINE = "bare_newline"  # a CR or LF that is not part of CRLF
    NO_MEMORY = "no_memory"  # the shared in-flight DATA budget is spent


# ---------------------------------------------------------------- clients


def normalise_ip(ip: str) -> str:
    """The peer's address as we compare and record it.

    An IPv4 client reaching an IPv6 socket shows up as `::ffff:192.0.2.1`; it
    is the IPv4 client, so it must match IPv4 relay networks. Scope ids
    (`fe80::1%eth0`) are dropped. Anything unparsable is returned unchanged
    and matches no network.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def is_relay_client(ip: str, relay_networks: Iterable[IPNetwork]) -> bool:
    """True when `ip` lies in one of `relay_networks` (the internal mail systems)."""
    try:
        addr = ipaddress.ip_address(normalise_ip(ip))
    except ValueError:
        return False
    return any(addr in net for net in relay_networks)


@functools.lru_cache(maxsize=4096)
def classify_client(ip: str, relay_networks: tuple[IPNetwork, ...]) -> tuple[str, bool]:
    """(`normalise_ip(ip)`, `is_relay_client(ip, relay_networks)`), remembered per address:
    a new connection from a known client costs a dict lookup, not two address parses."""
    return normalise_ip(ip), is_relay_client(ip, relay_networks)


# ---------------------------------------------------------------- addresses


def normalise_domain(domain: str) -> str:
    """Lower case, no trailing dot, IDNA (A-label) form; "" when it is not a usable domain."""
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return ""
    return domain


def is_internal(domain: str, internal_domains: Iterable[str]) -> bool:
    """True when `domain` is one of ours.

    Entries are compared case-insensitively, with a trailing dot tolerated; an
    entry `.example.test` matches every subdomain of example.test but not
    example.test itself (list both for both), as Postfix's `.domain` and the
    delivery routes do.
    Address literals (`[192.0.2.1]`) are never internal.
    """
    name = normalise_domain(domain)
    if not name or name.startswith(("[", ".")) or ".." in name:
        return False
    for entry in internal_domains:
        if entry.startswith("."):
            if name.endswith(entry):
                return True
        elif name == entry:
            return True
    return False


def strip_route(address: str) -> str | None:
    """`<@a,@b:user@c>` -> `user@c` (RFC 5321 §3.3: the route is ignored); None if broken."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if address.startswith("@"):
        _route, colon, mailbox = address.partition(":")
        if not colon or not mailbox:
            return None
        return mailbox
    return address


def _primary_domain(internal_domains: Iterable[str]) -> str:
    return next(iter(internal_domains), "").lstrip(".")


def _refuse(code: int, status: str, text: str, reason: str) -> Decision:
    return Decision(code, status, text, reason=reason)


RELAY_DENIED = "Relay access denied"


def check_recipient(address: str, *, relay: bool, internal_domains: Iterable[str]) -> Decision:
    """Decide one RCPT TO.

    `relay` is true for clients in relay networks (or, later, authenticated
    submitters): they may send anywhere. Everyone else reaches internal
    mailboxes only. Returns 250 2.1.5 with the address to store, 553 5.1.3 for
    an address that is not `local@domain`, 550 5.7.1 for anything that would
    relay.
    """
    domains = tuple(internal_domains)
    mailbox = strip_route(address)
    if mailbox is None:
        return _refuse(553, "5.1.3", "Bad recipient address syntax", "syntax")
    # RFC 5321 §4.5.1: "postmaster" without a domain MUST be accepted; it is ours.
    if mailbox.lower() == "postmaster" and _primary_domain(domains):
        return Decision(250, "2.1.5", "Ok", address=f"postmaster@{_primary_domain(domains)}")
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain.rstrip("."):
        return _refuse(553, "5.1.3", "Recipient address must be fully qualified: local@domain", "syntax")
    if relay:
        return Decision(250, "2.1.5", "Ok", address=mailbox)
    if domain.startswith("["):
        return _refuse(550, "5.7.1", f"{RELAY_DENIED}: address literals are not accepted", "relay")
    if _ROUTING_CHARS & set(local):
        return _refuse(550, "5.7.1", f"{RELAY_DENIED}: routing characters in the local part", "relay")
    if not is_internal(domain, domains):
        return _refuse(550, "5.7.1", RELAY_DENIED, "relay")
    return Decision(250, "2.1.5", "Ok", address=mailbox)


def check_recipient_count(accepted: int, limit: int) -> Decision | None:
    """The (limit+1)th recipient gets 452 4.5.3 (RFC 5321 §4.5.3.1.10: the client sends the rest later)."""
    if accepted >= limit:
        return _refuse(452, "4.5.3", "Too many recipients", "too_many")
    return None


def check_sender(address: str) -> Decision:
    """Decide one MAIL FROM. `<>` (aiosmtpd hands it over as the string "<>") is the
    null reverse-path of DSNs and must be accepted (RFC 5321 §4.5.5); it is stored as ""."""
    if address.strip() in ("<>", ""):
        return Decision(250, "2.1.0", "Ok", address="")
    mailbox = strip_route(address)
    if mailbox is None:
        return _refuse(553, "5.1.7", "Bad sender address syntax", "syntax")
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain.rstrip("."):
        return _refuse(553, "5.1.7", "Sender address must be fully qualified: local@domain", "syntax")
    return Decision(250, "2.1.0", "Ok", address=mailbox)


# ---------------------------------------------------------------- DATA


def check_data(problem: DataProblem | None) -> Decision | None:
    """The reply for a DATA phase the reader found wrong; None when the bytes are acceptable.

    Every refusal is sent only after the client reached the real end of DATA
    (RFC 5321 §4.2.5), so the session stays in step.
    """
    if problem is None:
        return None
    return _DATA_REPLIES[problem]


_DATA_REPLIES = {
    DataProblem.TOO_BIG: _refuse(552, "5.3.4", "Message size exceeds fixed maximum message size", "too_big"),
    # RFC 5321 §4.5.3.1.6 (line length) and §4.5.3.1.10 ("500 Line too long").
    DataProblem.LINE_TOO_LONG: _refuse(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.6)", "line_too_long"),
    # RFC 5321 §2.3.8: lines end with CRLF only. Bare CR or LF is how SMTP smuggling
    # (CVE-2023-51764 and kin) hides a second message; we never store such a message.
    DataProblem.BARE_NEWLINE: _refuse(
        550, "5.5.2", "Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)", "bare_newline"
    ),
    DataProblem.NO_MEMORY: _refuse(451, "4.3.1", "Insufficient system resources, try again later", "no_memory"),
}


def accepted_reply(queue_id: str) -> Decision:
    return Decision(250, "2.0.0", f"Ok: queued as {queue_id}", reason="queued")


TRANSPORT_FAILED = _refuse(451, "4.3.0", "Local error in processing, try again later", "transport")


def back_pressure(reason: str) -> Decision:
    """`transport.accepting()` said no: tell the client to come back (RFC 3463 4.3.2, system not accepting)."""
    text = " ".join(reason.split())  # one line, whatever the transport said
    return _refuse(451, "4.3.2", f"System not accepting mail now: {text}", "back_pressure")


TOO_MANY_MESSAGES = _refuse(421, "4.7.0", "Too many messages in this connection, closing", "too_many_messages")

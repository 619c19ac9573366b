"""Routing: which next hop each recipient goes to, and in what order MX hosts are tried.

Pure: configured routes and DNS answers in, destinations and ordered hosts
out. The MX adapter (`mx.py`) asks DNS and hands the records here; the
delivery app groups a message's recipients here, one SMTP transaction per
destination.

Routes come from `[delivery].routes`: keys are normalised domains, a key
starting with "." matches that domain's subdomains (not the domain itself,
like Postfix's `.domain` transport entries), and "*" matches the rest. A
route is `smtp://host[:port]` (that host, no MX lookup) or `mx`. When no key
matches and there is no "*", the route is `mx`, the Internet's default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from services.delivery.classify import NULL_MX, ROUTING_LOOP
from shared.config import parse_domain
from shared.errors import PermanentFailure

# RFC 5321 section 5.1 leaves the number of hosts to try to the client; Postfix
# tries at most 5 addresses (smtp_mx_address_limit) so one attempt stays bounded.
MAX_ADDRESSES = 5

# Failure texts lead with their enhanced status (RFC 7505 section 3 gives 5.1.10 for a null MX).
NULL_MX_TEXT = f"{NULL_MX} recipient domain publishes a null MX (RFC 7505): it accepts no mail"
LOOP_TEXT = f"{ROUTING_LOOP} mail for this domain loops back to myself (we are its best MX)"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a group of recipients goes; one SMTP transaction per destination."""

    kind: str  # "relay" (an smtp:// route), "mx" (look up the domain) or "literal" ([192.0.2.1])
    name: str  # relay host, recipient domain, or the literal's address
    port: int  # the port to connect to (mx: the configured mx_port)

    @property
    def key(self) -> str:
        """Stable text naming the destination (log lines, the connection pool)."""
        return f"{self.kind}:{self.name}:{self.port}"


@dataclass(frozen=True, slots=True)
class Hop:
    """One host to try: its name (for logs and Remote-MTA) and the address to connect to."""

    host: str
    address: str
    port: int

    @property
    def relay(self) -> str:
        """Postfix's `relay=` notation: host[address]:port."""
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Grouping:
    groups: dict[Destination, tuple[str, ...]]  # in the order the recipients came
    unroutable: tuple[tuple[str, str], ...]  # (recipient, why) for addresses we cannot route


def recipient_domain(rcpt: str) -> str:
    """The normalised domain of an address, or its domain literal ("[192.0.2.1]").

    Raises ValueError when there is no domain, or it is not a valid one.
    """
    local, at, domain = rcpt.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{rcpt!r} has no domain")
    if domain.startswith("["):
        return domain
    normalised = parse_domain(domain)
    if not normalised:
        raise ValueError(f"{rcpt!r} has an empty domain")
    return normalised


def literal_address(domain: str) -> str | None:
    """The IP address of a domain literal (RFC 5321 section 4.1.3), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def route_for(domain: str, routes: Mapping[str, str]) -> str:
    """The route spec for a domain: exact key, then the closest ".parent" key, then "*", then "mx"."""
    if domain in routes:
        return routes[domain]
    if not domain.startswith("["):
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in routes:
                return routes[parent]
    return routes.get("*", "mx")


def destination_for(domain: str, route: str, mx_port: int) -> Destination:
    """A route spec (validated by the config) applied to a domain."""
    if route != "mx":
        url = urlsplit(route)
        return Destination("relay", url.hostname or "", url.port or 25)
    literal = literal_address(domain)
    if literal is not None:
        return Destination("literal", literal, mx_port)
    if domain.startswith("["):
        raise ValueError(f"{domain!r} is not a valid address literal")
    return Destination("mx", domain, mx_port)


def group_recipients(rcpts: Sequence[str], routes: Mapping[str, str], mx_port: int) -> Grouping:
    """Recipients by destination. Two domains routed to one relay share its transaction."""
    groups: dict[Destination, list[str]] = {}
    unroutable: list[tuple[str, str]] = []
    for rcpt in rcpts:
        try:
            domain = recipient_domain(rcpt)
            dest = destination_for(domain, route_for(domain, routes), mx_port)
        except ValueError as exc:
            unroutable.append((rcpt, str(exc)))
            continue
        groups.setdefault(dest, []).append(rcpt)
    return Grouping({d: tuple(r) for d, r in groups.items()}, tuple(unroutable))


def _host(name: str) -> str:
    return name.rstrip(".").lower()


def is_null_mx(records: Sequence[tuple[int, str]]) -> bool:
    """RFC 7505 section 3: an MX whose exchange is the root (".") says "no mail here".

    A domain MUST NOT publish other MX records beside it; if it does anyway, we
    still honour the owner's declaration rather than guess.
    """
    return any(_host(exchange) == "" for _, exchange in records)


def order_mx(
    records: Sequence[tuple[int, str]],
    *,
    shuffle: Callable[[list[str]], None],
    self_names: Collection[str] = (),
) -> list[str]:
    """MX records -> host names in the order to try them.

    RFC 5321 section 5.1: lowest preference first; hosts of equal preference
    in random order (`shuffle`, injected so tests can be deterministic). If we
    are one of the MX hosts, only hosts more preferred than us are candidates;
    none means the mail would loop back to us. Raises PermanentFailure for a
    null MX and for such a loop.
    """
    if is_null_mx(records):
        raise PermanentFailure(NULL_MX_TEXT)
    mine = {_host(n) for n in self_names if n}
    own_preference = min((pref for pref, exchange in records if _host(exchange) in mine), default=None)
    by_preference: dict[int, list[str]] = {}
    seen: set[str] = set()
    for pref, exchange in sorted(records, key=lambda r: r[0]):
        host = _host(exchange)
        if host in seen or (own_preference is not None and pref >= own_preference):
            continue
        seen.add(host)
        by_preference.setdefault(pref, []).append(host)
    if not by_preference and own_preference is not None:
        raise PermanentFailure(LOOP_TEXT)
    ordered: list[str] = []
    for pref in sorted(by_preference):
        hosts = by_preference[pref]
        shuffle(hosts)
        ordered.extend(hosts)
    return ordered

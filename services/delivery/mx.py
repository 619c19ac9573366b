"""MX lookup adapter: dnspython in, ordered hops out, our errors at the boundary.

Turns a recipient domain into the hosts to try (RFC 5321 section 5.1): the
MX records, ordered by `routing.order_mx`; without MX records, the domain's
own A/AAAA records (the "implicit MX"); a null MX (RFC 7505) or a domain that
does not exist is a permanent failure; a DNS server that does not answer is a
temporary one. dnspython's exceptions never leave this module: they become
`TemporaryFailure`/`PermanentFailure`, whose message leads with the enhanced
status code (RFC 3463) the DSN will carry.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Collection, Sequence

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from services.delivery.classify import BAD_DESTINATION, DNS_FAILURE, UNROUTABLE
from services.delivery.routing import MAX_ADDRESSES, Hop, order_mx
from shared.config import HostPort
from shared.errors import PermanentFailure, TemporaryFailure

log = logging.getLogger(__name__)


class MxResolver:
    """Looks up the hops of a domain. One instance per delivery service; used on its event loop."""

    def __init__(
        self,
        nameservers: Sequence[HostPort],
        timeout: float,
        *,
        self_names: Collection[str] = (),
        rng: random.Random | None = None,
    ) -> None:
        self._self_names = tuple(self_names)
        self._rng = rng or random.Random()
        self._resolver: dns.asyncresolver.Resolver | None
        try:
            if nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [dns.nameserver.Do53Nameserver(ns.host, port=ns.port) for ns in nameservers]
            else:
                resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            # Routes that never say "mx" need no DNS; the first MX lookup will defer instead.
            log.error("no DNS resolver configured (/etc/resolv.conf unusable and [delivery].nameservers empty)")
            self._resolver = None
            return
        resolver.lifetime = timeout
        resolver.timeout = timeout
        self._resolver = resolver

    async def hops(self, domain: str, port: int) -> list[Hop]:
        """The hosts to try for `domain`, best first, each with one address. Raises
        TemporaryFailure (DNS trouble) or PermanentFailure (no such domain, null MX, no hosts)."""
        try:
            answer = await self._query(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise PermanentFailure(f"{BAD_DESTINATION} domain {domain} does not exist (DNS: NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            # RFC 5321 section 5.1: no MX records, so the domain itself is the implicit MX.
            addresses = await self._addresses(domain)
            if not addresses:
                raise PermanentFailure(f"{UNROUTABLE} domain {domain} has no MX and no A/AAAA records") from None
            return [Hop(domain, a, port) for a in addresses[:MAX_ADDRESSES]]
        records = [(rr.preference, rr.exchange.to_text()) for rr in answer]
        hosts = order_mx(records, shuffle=self._rng.shuffle, self_names=self._self_names)
        hops: list[Hop] = []
        trouble: TemporaryFailure | None = None
        for host in hosts:
            try:
                addresses = await self._addresses(host)
            except TemporaryFailure as exc:
                trouble = trouble or exc
                continue
            except PermanentFailure:
                continue  # an MX host name that can never resolve: try the others
            hops.extend(Hop(host, a, port) for a in addresses)
            if len(hops) >= MAX_ADDRESSES:
                break
        if hops:
            return hops[:MAX_ADDRESSES]
        if trouble is not None:
            raise trouble
        raise PermanentFailure(f"{UNROUTABLE} no MX host of {domain} has an address ({', '.join(hosts)})")

    async def _addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of a host; [] when it has none. TemporaryFailure when DNS fails
        for both families, so an unanswered AAAA query does not hide a good A record."""
        answers = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"), return_exceptions=True)
        addresses: list[str] = []
        trouble: BaseException | None = None
        for answer in answers:
            if isinstance(answer, dns.resolver.NXDOMAIN | dns.resolver.NoAnswer):
                continue
            if isinstance(answer, BaseException):
                trouble = trouble or answer
                continue
            addresses.extend(rr.to_text() for rr in answer)
        if not addresses and trouble is not None:
            if isinstance(trouble, TemporaryFailure | PermanentFailure):
                raise trouble
            raise TemporaryFailure(f"{DNS_FAILURE} address lookup of {host} failed: {trouble}")
        return addresses

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        """One query; NXDOMAIN and NoAnswer pass through for the caller, the rest is translated."""
        if self._resolver is None:
            raise TemporaryFailure(f"{DNS_FAILURE} no DNS resolver configured")
        try:
            return await self._resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise
        except (dns.exception.SyntaxError, dns.exception.FormError) as exc:
            # An invalid name (empty label, too long) will never resolve.
            raise PermanentFailure(f"{BAD_DESTINATION} {name!r} is not a valid domain name: {exc}") from None
        except dns.exception.Timeout:
            raise TemporaryFailure(f"{DNS_FAILURE} DNS lookup of {name}/{rdtype} timed out") from None
        except dns.exception.DNSException as exc:
            # SERVFAIL, REFUSED, no nameserver answering: the DNS, not the domain, is at fault.
            raise TemporaryFailure(f"{DNS_FAILURE} DNS lookup of {name}/{rdtype} failed: {exc}") from None

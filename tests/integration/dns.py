"""A real DNS server on loopback for MX tests: Debian's dnsmasq, started per test module.

dnsmasq answers only from its command line (`--no-resolv --no-hosts`, and
`--local=/test/` so unknown names under .test are NXDOMAIN rather than
REFUSED): MX records (`--mx-host`), addresses (`--host-record`), raw records
(`--dns-rr`, used for the RFC 7505 null MX "0 .") and NXDOMAIN domains
(`--address=/domain/`). It listens on a free port of 127.0.0.1; point
`[delivery].nameservers` at `server.address`.
"""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.nameserver
import dns.resolver

from tests.support import missing, wait_until


@dataclass(frozen=True)
class DnsServer:
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def resolver(self, lifetime: float = 1.0) -> dns.resolver.Resolver:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port=self.port)]
        resolver.lifetime = resolver.timeout = lifetime
        return resolver


def _free_udp_and_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for dnsmasq")


@contextlib.contextmanager
def dnsmasq(
    workdir: Path,
    *,
    mx: Sequence[tuple[str, str, int]] = (),
    hosts: Sequence[tuple[str, str]] = (),
    null_mx: Sequence[str] = (),
    nxdomain: Sequence[str] = (),
    local: Sequence[str] = ("test",),
) -> Iterator[DnsServer]:
    """Run dnsmasq with these records: `mx` as (domain, exchange, preference), `hosts` as
    (name, address), `null_mx` and `nxdomain` as domains."""
    binary = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
    if binary is None:
        missing("dnsmasq (Debian package dnsmasq-base)")
    port = _free_udp_and_tcp_port()
    log = workdir / f"dnsmasq-{port}.log"
    args = [
        str(binary),
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--pid-file=",
        f"--user={getpass.getuser()}",
        "--log-queries",
        "--log-facility=-",
    ]
    args += [f"--local=/{domain}/" for domain in local]
    args += [f"--mx-host={domain},{exchange},{pref}" for domain, exchange, pref in mx]
    args += [f"--host-record={name},{address}" for name, address in hosts]
    # RFC 7505: MX RDATA of preference 0 (two bytes) and the root name (one zero byte).
    args += [f"--dns-rr={domain},15,000000" for domain in null_mx]
    args += [f"--address=/{domain}/" for domain in nxdomain]
    server = DnsServer(port, log)
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        probe = server.resolver(lifetime=0.1)

        def answering() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited with {proc.returncode}: {log.read_text(errors='replace')}")
            try:
                probe.resolve("probe.invalid", "A", search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
                return True  # any answer at all means it is up
            except dns.exception.Timeout:
                return False
            return True

        assert wait_until(answering, timeout=10.0), f"dnsmasq did not answer: {log.read_text(errors='replace')}"
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

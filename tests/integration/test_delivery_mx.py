"""MX delivery against a real DNS server (dnsmasq on loopback) and real SMTP servers.

Every MX host resolves to its own 127.0.0.x address, where a capture server
listens on the shared `mx_port`; so where a message lands shows which MX was
used. 127.0.0.5 has nothing listening (connection refused) and 127.0.0.6
greets with 421.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.delivery.app import Delivery
from shared.transport import Queue
from tests.integration.dns import DnsServer, dnsmasq
from tests.integration.test_delivery import BODY, deliver, envelope, make_config
from tests.support import CaptureHandler, capture_server, free_port

pytestmark = pytest.mark.integration

PRIMARY, SECONDARY, PLAIN, DEAD, BUSY = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"

RECORDS = {
    "mx": [
        ("pref.test", "mx2.pref.test", 20),
        ("pref.test", "mx1.pref.test", 10),
        ("fallback.test", "dead.fallback.test", 10),
        ("fallback.test", "mx2.fallback.test", 20),
        ("busy.test", "greets421.busy.test", 10),
        ("busy.test", "mx.busy.test", 20),
        ("down.test", "dead.down.test", 10),
        ("noaddr.test", "ghost.noaddr.test", 10),
    ],
    "hosts": [
        ("mx1.pref.test", PRIMARY),
        ("mx2.pref.test", SECONDARY),
        ("dead.fallback.test", DEAD),
        ("mx2.fallback.test", SECONDARY),
        ("greets421.busy.test", BUSY),
        ("mx.busy.test", PLAIN),
        ("dead.down.test", DEAD),
        ("implicit.test", PLAIN),  # no MX: the implicit MX is the domain itself
    ],
    "null_mx": ["nullmx.test"],
    "nxdomain": ["nx.test"],
}


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsServer]:
    with dnsmasq(tmp_path_factory.mktemp("dns"), **RECORDS) as server:  # type: ignore[arg-type]
        yield server


class _Greets421(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        self.request.sendall(b"421 4.3.2 too busy, try another MX\r\n")


@contextlib.contextmanager
def busy_server(host: str, port: int) -> Iterator[socketserver.ThreadingTCPServer]:
    """A server that answers every connection with a 421 greeting and hangs up."""
    server = socketserver.ThreadingTCPServer((host, port), _Greets421)
    server.daemon_threads = True
    server.connections = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class Hosts:
    port: int
    primary: CaptureHandler
    secondary: CaptureHandler
    plain: CaptureHandler
    busy: socketserver.ThreadingTCPServer


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    port = free_port(PRIMARY)
    with (
        capture_server(PRIMARY, port) as (primary, _),
        capture_server(SECONDARY, port) as (secondary, _),
        capture_server(PLAIN, port) as (plain, _),
        busy_server(BUSY, port) as busy,
    ):
        yield Hosts(port, primary, secondary, plain, busy)


@pytest.fixture
def delivery(dns_server: DnsServer, hosts: Hosts, spool_dir: Path) -> Iterator[Delivery]:
    config = make_config(
        spool_dir, {"*": "mx"}, nameservers=f'["{dns_server.address}"]', mx_port=str(hosts.port), timeout="3s"
    )
    d = Delivery(config)
    yield d
    d.close()


def test_preference_order(delivery: Delivery, hosts: Hosts, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.delivery.app")
    env = envelope(("user@pref.test",))
    assert deliver(delivery, env) == []
    (got,) = hosts.primary.wait_for(1)
    assert got.data == BODY
    assert got.rcpt_tos == ["user@pref.test"]
    assert hosts.secondary.messages == []
    # The canonical Postfix-style line names the MX that took it.
    line = rf"queue_id={env.queue_id} to=<user@pref.test> relay=mx1\.pref\.test\[{PRIMARY}\]:{hosts.port} "
    line += r"delay=\d+\.\d\d dsn=2\.0\.0 status=sent \(250 2\.0\.0 OK captured\)"
    assert re.search(line, caplog.text), caplog.text


def test_next_mx_when_the_first_refuses(delivery: Delivery, hosts: Hosts) -> None:
    assert deliver(delivery, envelope(("user@fallback.test",))) == []
    (got,) = hosts.secondary.wait_for(1)
    assert got.rcpt_tos == ["user@fallback.test"]


def test_next_mx_after_a_4xx_greeting(delivery: Delivery, hosts: Hosts) -> None:
    assert deliver(delivery, envelope(("user@busy.test",))) == []
    (got,) = hosts.plain.wait_for(1)
    assert got.rcpt_tos == ["user@busy.test"]
    assert hosts.busy.connections == 1  # type: ignore[attr-defined]


def test_no_mx_falls_back_to_the_address_record(delivery: Delivery, hosts: Hosts) -> None:
    assert deliver(delivery, envelope(("user@implicit.test",))) == []
    (got,) = hosts.plain.wait_for(1)
    assert got.rcpt_tos == ["user@implicit.test"]


@pytest.mark.parametrize(
    ("rcpt", "status", "words"),
    [
        ("user@nullmx.test", "5.1.10", "null MX"),
        ("user@nx.test", "5.1.2", "does not exist"),
        ("user@noaddr.test", "5.4.4", "no MX host of noaddr.test has an address"),
    ],
)
def test_undeliverable_domains_bounce(delivery: Delivery, hosts: Hosts, rcpt: str, status: str, words: str) -> None:
    (out,) = deliver(delivery, envelope((rcpt,)))
    assert out.queue is Queue.BOUNCE
    (failure,) = out.envelope.failures
    assert failure.status == status
    assert failure.code == 0
    assert words in failure.message
    assert hosts.primary.messages == hosts.secondary.messages == hosts.plain.messages == []


@pytest.mark.parametrize(
    ("rcpt", "error"),
    [
        ("user@down.test", f"4.4.1 connect to dead.down.test[{DEAD}]:"),  # every MX refuses
        ("user@broken.example", "4.4.3 DNS lookup of broken.example/MX failed"),  # the DNS server refuses
    ],
)
def test_unreachable_destinations_are_deferred(delivery: Delivery, rcpt: str, error: str) -> None:
    (out,) = deliver(delivery, envelope((rcpt,)))
    assert out.queue is Queue.DEFERRED
    assert out.envelope.rcpt_to == (rcpt,)
    assert out.envelope.last_error.startswith(error)


def test_one_message_many_domains(delivery: Delivery, hosts: Hosts) -> None:
    env = envelope(("a@pref.test", "b@nx.test", "c@implicit.test", "d@pref.test"))
    (out,) = deliver(delivery, env)
    assert out.queue is Queue.BOUNCE
    assert out.envelope.rcpt_to == ("b@nx.test",)
    (first,) = hosts.primary.wait_for(1)
    (implicit,) = hosts.plain.wait_for(1)
    assert first.rcpt_tos == ["a@pref.test", "d@pref.test"]  # one transaction per destination
    assert implicit.rcpt_tos == ["c@implicit.test"]

"""services.receiver.policy: relay control, limits and DATA replies, as tables."""

from __future__ import annotations

import ipaddress

import pytest

from services.receiver import policy
from services.receiver.policy import DataProblem, Decision

INTERNAL = ("example.test", ".corp.example", "xn--bcher-kva.example")
NETWORKS = (ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))

ACCEPT, SYNTAX, RELAY = (250, "2.1.5"), (553, "5.1.3"), (550, "5.7.1")


@pytest.mark.parametrize(
    ("address", "expected", "stored"),
    [
        # Internal domains: case-insensitive, trailing dot tolerated, ".domain" covers subdomains.
        ("user@example.test", ACCEPT, "user@example.test"),
        ("User@EXAMPLE.TEST", ACCEPT, "User@EXAMPLE.TEST"),
        ("user@example.test.", ACCEPT, "user@example.test."),
        ("user@corp.example", RELAY, ""),  # ".corp.example" is the subdomains only
        ("user@a.b.corp.example", ACCEPT, "user@a.b.corp.example"),
        ("user@bücher.example", ACCEPT, "user@bücher.example"),
        ("jörg@example.test", ACCEPT, "jörg@example.test"),
        ("first.last+tag@example.test", ACCEPT, "first.last+tag@example.test"),
        ("<user@example.test>", ACCEPT, "user@example.test"),
        # RFC 5321 §4.5.1: unqualified postmaster is ours.
        ("postmaster", ACCEPT, "postmaster@example.test"),
        ("PostMaster", ACCEPT, "postmaster@example.test"),
        # Source routes are ignored (RFC 5321 §3.3, Appendix C): only the mailbox counts.
        ("@evil.example:user@example.test", ACCEPT, "user@example.test"),
        ("@a.example,@b.example:user@example.test", ACCEPT, "user@example.test"),
        ("@example.test:user@evil.example", RELAY, ""),
        # Not ours.
        ("user@evil.example", RELAY, ""),
        ("user@sub.example.test", RELAY, ""),  # no leading dot: the domain only
        ("user@notcorp.example", RELAY, ""),  # a suffix, but not a subdomain
        ("user@example.test.evil.example", RELAY, ""),
        ("user@example..test", RELAY, ""),
        ("user@.example.test", RELAY, ""),
        # Relay tricks aimed at an internal host that might forward.
        ("user%evil.example@example.test", RELAY, ""),
        ("evil.example!user@example.test", RELAY, ""),
        ('"user@evil.example"@example.test', RELAY, ""),
        ('"user%evil.example"@example.test', RELAY, ""),
        ('"evil!user"@example.test', RELAY, ""),
        ("user%evil.example", SYNTAX, ""),
        ("user@evil.example@example.test", RELAY, ""),
        ("user\\@evil.example@example.test", RELAY, ""),
        # Address literals name no domain of ours.
        ("user@[127.0.0.1]", RELAY, ""),
        ("user@[IPv6:::1]", RELAY, ""),
        ("user@[10.0.0.1]", RELAY, ""),
        # Not an address at all.
        ("user", SYNTAX, ""),
        ("<>", SYNTAX, ""),
        ("", SYNTAX, ""),
        ("@example.test", SYNTAX, ""),
        ("user@", SYNTAX, ""),
        ("user@.", SYNTAX, ""),
        ("@evil.example", SYNTAX, ""),
        ("@evil.example:", SYNTAX, ""),
    ],
)
def test_recipient_from_the_internet(address: str, expected: tuple[int, str], stored: str) -> None:
    decision = policy.check_recipient(address, relay=False, internal_domains=INTERNAL)
    assert (decision.code, decision.status) == expected
    assert decision.address == stored
    assert decision.reply().startswith(f"{expected[0]} {expected[1]} ")
    if expected == RELAY:
        assert decision.reason == "relay"


@pytest.mark.parametrize(
    ("address", "expected", "stored"),
    [
        ("user@evil.example", ACCEPT, "user@evil.example"),
        ("user@example.test", ACCEPT, "user@example.test"),
        ("user%other@example.net", ACCEPT, "user%other@example.net"),
        ("user@[192.0.2.1]", ACCEPT, "user@[192.0.2.1]"),
        ("@relay.example:user@example.net", ACCEPT, "user@example.net"),
        ("postmaster", ACCEPT, "postmaster@example.test"),
        ("user", SYNTAX, ""),
        ("<>", SYNTAX, ""),
    ],
)
def test_recipient_from_a_relay_client(address: str, expected: tuple[int, str], stored: str) -> None:
    decision = policy.check_recipient(address, relay=True, internal_domains=INTERNAL)
    assert ((decision.code, decision.status), decision.address) == (expected, stored)


@pytest.mark.parametrize(
    ("domain", "internal"),
    [
        ("example.test", True),
        ("EXAMPLE.test.", True),
        ("corp.example", False),
        ("x.corp.example", True),
        ("xcorp.example", False),
        ("bücher.example", True),
        ("BÜCHER.example", True),
        ("example.tes", False),
        ("[127.0.0.1]", False),
        ("", False),
        (".", False),
        ("\udcff.example", False),  # undecodable bytes from a non-UTF-8 client
    ],
)
def test_is_internal(domain: str, internal: bool) -> None:
    assert policy.is_internal(domain, INTERNAL) is internal


@pytest.mark.parametrize(
    ("ip", "normalised", "relay"),
    [
        ("127.0.0.2", "127.0.0.2", True),
        ("127.0.0.1", "127.0.0.1", False),
        ("::ffff:127.0.0.2", "127.0.0.2", True),
        ("::ffff:10.1.2.3", "10.1.2.3", True),
        ("::ffff:192.0.2.1", "192.0.2.1", False),
        ("10.255.255.255", "10.255.255.255", True),
        ("11.0.0.1", "11.0.0.1", False),
        ("fd12::1", "fd12::1", True),
        ("fd12::1%eth0", "fd12::1", True),
        ("FD12:0::1", "fd12::1", True),
        ("2001:db8::1", "2001:db8::1", False),
        ("::1", "::1", False),
        ("not-an-ip", "not-an-ip", False),
        ("", "", False),
    ],
)
def test_relay_clients(ip: str, normalised: str, relay: bool) -> None:
    assert policy.normalise_ip(ip) == normalised
    assert policy.is_relay_client(ip, NETWORKS) is relay
    assert policy.classify_client(ip, NETWORKS) == (normalised, relay)
    # Remembered per address and networks: other networks, another answer.
    assert policy.classify_client(ip, NETWORKS[:1]) == (normalised, relay and normalised.startswith("127."))


@pytest.mark.parametrize(
    ("accepted", "limit", "expected"),
    [(0, 100, None), (99, 100, None), (100, 100, (452, "4.5.3")), (1, 1, (452, "4.5.3"))],
)
def test_recipient_count(accepted: int, limit: int, expected: tuple[int, str] | None) -> None:
    decision = policy.check_recipient_count(accepted, limit)
    assert (decision and (decision.code, decision.status)) == expected


@pytest.mark.parametrize(
    ("address", "expected", "stored"),
    [
        ("<>", (250, "2.1.0"), ""),
        ("sender@example.net", (250, "2.1.0"), "sender@example.net"),
        ("søren@example.net", (250, "2.1.0"), "søren@example.net"),
        ("@relay.example:sender@example.net", (250, "2.1.0"), "sender@example.net"),
        ("sender", (553, "5.1.7"), ""),
        ("sender@", (553, "5.1.7"), ""),
        ("@relay.example", (553, "5.1.7"), ""),
    ],
)
def test_sender(address: str, expected: tuple[int, str], stored: str) -> None:
    decision = policy.check_sender(address)
    assert ((decision.code, decision.status), decision.address) == (expected, stored)


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        (None, None),
        (DataProblem.TOO_BIG, (552, "5.3.4")),
        (DataProblem.LINE_TOO_LONG, (500, "5.5.2")),
        (DataProblem.BARE_NEWLINE, (550, "5.5.2")),
        (DataProblem.NO_MEMORY, (451, "4.3.1")),
    ],
)
def test_data_replies(problem: DataProblem | None, expected: tuple[int, str] | None) -> None:
    decision = policy.check_data(problem)
    assert (decision and (decision.code, decision.status)) == expected
    assert decision is None or decision.reason == problem


@pytest.mark.parametrize(
    ("decision", "reply"),
    [
        (policy.accepted_reply("01ABC"), "250 2.0.0 Ok: queued as 01ABC"),
        (policy.TRANSPORT_FAILED, "451 4.3.0 Local error in processing, try again later"),
        (policy.back_pressure("scan queue\r\nfull"), "451 4.3.2 System not accepting mail now: scan queue full"),
        (policy.TOO_MANY_MESSAGES, "421 4.7.0 Too many messages in this connection, closing"),
    ],
)
def test_fixed_replies(decision: Decision, reply: str) -> None:
    assert decision.reply() == reply

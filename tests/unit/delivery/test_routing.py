"""routing: route lookup, recipient grouping, MX ordering (RFC 5321 section 5.1, RFC 7505)."""

from __future__ import annotations

import random
from collections.abc import Callable
from types import MappingProxyType

import pytest

from services.delivery.routing import (
    Destination,
    Hop,
    destination_for,
    group_recipients,
    is_null_mx,
    literal_address,
    order_mx,
    recipient_domain,
    route_for,
)
from shared.errors import PermanentFailure

ROUTES = MappingProxyType(
    {
        "example.test": "smtp://10.0.0.5:2526",
        ".example.test": "smtp://10.0.0.6",
        "other.test": "smtp://10.0.0.5:2526",
        "mx.test": "mx",
        "*": "mx",
    }
)


@pytest.mark.parametrize(
    ("rcpt", "domain"),
    [
        ("user@example.test", "example.test"),
        ("User@EXAMPLE.Test.", "example.test"),
        ('"a@b"@example.test', "example.test"),
        ("user@bücher.test", "xn--bcher-kva.test"),
        ("user@[192.0.2.1]", "[192.0.2.1]"),
    ],
)
def test_recipient_domain(rcpt: str, domain: str) -> None:
    assert recipient_domain(rcpt) == domain


@pytest.mark.parametrize("rcpt", ["postmaster", "user@", "@example.test", "user@."])
def test_recipient_domain_rejects(rcpt: str) -> None:
    with pytest.raises(ValueError, match="domain"):
        recipient_domain(rcpt)


@pytest.mark.parametrize(
    ("domain", "address"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
        ("[ipv6:2001:DB8::1]", "2001:db8::1"),
        ("[300.1.1.1]", None),
        ("[example.test]", None),
        ("example.test", None),
    ],
)
def test_literal_address(domain: str, address: str | None) -> None:
    assert literal_address(domain) == address


@pytest.mark.parametrize(
    ("domain", "route"),
    [
        ("example.test", "smtp://10.0.0.5:2526"),
        # ".example.test" matches subdomains at any depth, not the domain itself.
        ("a.example.test", "smtp://10.0.0.6"),
        ("b.a.example.test", "smtp://10.0.0.6"),
        ("notexample.test", "mx"),
        ("mx.test", "mx"),
        ("anything.else", "mx"),
        ("[192.0.2.1]", "mx"),
    ],
)
def test_route_for(domain: str, route: str) -> None:
    assert route_for(domain, ROUTES) == route


@pytest.mark.parametrize(
    ("routes", "domain", "route"),
    [
        ({"example.test": "smtp://h:25"}, "elsewhere.test", "mx"),  # no "*": the Internet default
        ({"*": "smtp://smarthost:587"}, "elsewhere.test", "smtp://smarthost:587"),
        ({"*": "smtp://smarthost:587"}, "[192.0.2.1]", "smtp://smarthost:587"),
        ({".test": "smtp://h:25", "*": "mx"}, "a.b.test", "smtp://h:25"),
        ({".b.test": "smtp://near:25", ".test": "smtp://far:25"}, "a.b.test", "smtp://near:25"),
    ],
)
def test_route_for_defaults_and_specificity(routes: dict[str, str], domain: str, route: str) -> None:
    assert route_for(domain, routes) == route


@pytest.mark.parametrize(
    ("domain", "route", "expected"),
    [
        ("example.test", "smtp://10.0.0.5:2526", Destination("relay", "10.0.0.5", 2526)),
        ("example.test", "smtp://relay.example.test", Destination("relay", "relay.example.test", 25)),
        ("example.test", "smtp://[2001:db8::5]:26", Destination("relay", "2001:db8::5", 26)),
        ("example.test", "mx", Destination("mx", "example.test", 2525)),
        ("[192.0.2.1]", "mx", Destination("literal", "192.0.2.1", 2525)),
    ],
)
def test_destination_for(domain: str, route: str, expected: Destination) -> None:
    assert destination_for(domain, route, 2525) == expected


def test_destination_for_rejects_a_bad_literal() -> None:
    with pytest.raises(ValueError, match="literal"):
        destination_for("[nonsense]", "mx", 25)


def test_group_recipients() -> None:
    rcpts = [
        "a@example.test",
        "b@x.example.test",
        "c@other.test",
        "d@far.test",
        "e@EXAMPLE.test",
        "f@far.test",
        "nodomain",
        "g@[192.0.2.1]",
        "h@[bad]",
    ]
    grouping = group_recipients(rcpts, ROUTES, 25)
    relay = Destination("relay", "10.0.0.5", 2526)
    assert grouping.groups == {
        # Two domains routed to the same relay share one transaction.
        relay: ("a@example.test", "c@other.test", "e@EXAMPLE.test"),
        Destination("relay", "10.0.0.6", 25): ("b@x.example.test",),
        Destination("mx", "far.test", 25): ("d@far.test", "f@far.test"),
        Destination("literal", "192.0.2.1", 25): ("g@[192.0.2.1]",),
    }
    assert [r for r, _ in grouping.unroutable] == ["nodomain", "h@[bad]"]
    assert relay.key == "relay:10.0.0.5:2526"


def test_hop_relay_notation() -> None:
    assert Hop("mx1.example.test", "192.0.2.7", 25).relay == "mx1.example.test[192.0.2.7]:25"


def no_shuffle(hosts: list[str]) -> None:
    pass


def reverse(hosts: list[str]) -> None:
    hosts.reverse()


@pytest.mark.parametrize(
    ("records", "shuffle", "expected"),
    [
        ([(10, "mx1.test."), (20, "mx2.test.")], no_shuffle, ["mx1.test", "mx2.test"]),
        ([(20, "mx2.test."), (10, "mx1.test.")], no_shuffle, ["mx1.test", "mx2.test"]),
        # Equal preference: the shuffle decides, but only within the group.
        ([(10, "a.test."), (10, "b.test."), (5, "first.test."), (30, "last.test.")], reverse,
         ["first.test", "b.test", "a.test", "last.test"]),
        # Duplicates are tried once, at their best preference; names are normalised.
        ([(10, "MX.test."), (20, "mx.test"), (30, "other.test")], no_shuffle, ["mx.test", "other.test"]),
        ([(0, "only.test.")], no_shuffle, ["only.test"]),
    ],
)  # fmt: skip
def test_order_mx(records: list[tuple[int, str]], shuffle: Callable[[list[str]], None], expected: list[str]) -> None:
    assert order_mx(records, shuffle=shuffle) == expected


def test_order_mx_randomises_equal_preference() -> None:
    records = [(10, "a.test."), (10, "b.test."), (10, "c.test."), (20, "z.test.")]
    rng = random.Random(7)
    orders = {tuple(order_mx(records, shuffle=rng.shuffle)) for _ in range(200)}
    assert len(orders) == 6  # every permutation of the three equal hosts turns up
    assert all(order[-1] == "z.test" for order in orders)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([(0, ".")], True),
        ([(0, "")], True),
        ([(10, "mx.test."), (0, ".")], True),
        ([(10, "mx.test.")], False),
        ([], False),
    ],
)
def test_is_null_mx(records: list[tuple[int, str]], expected: bool) -> None:
    assert is_null_mx(records) is expected


def test_order_mx_refuses_null_mx() -> None:
    with pytest.raises(PermanentFailure, match=r"^5\.1\.10 "):
        order_mx([(0, ".")], shuffle=no_shuffle)


def test_order_mx_drops_ourselves_and_worse() -> None:
    # We are a backup MX: only the hosts more preferred than us are candidates.
    records = [(10, "primary.test."), (20, "gw.example.test."), (30, "tertiary.test.")]
    assert order_mx(records, shuffle=no_shuffle, self_names={"GW.example.test"}) == ["primary.test"]


@pytest.mark.parametrize(
    "records",
    [
        [(10, "gw.example.test."), (20, "backup.test.")],
        # A host as preferred as we are is not better: it could send the mail straight back.
        [(10, "primary.test."), (10, "gw.example.test.")],
    ],
)
def test_order_mx_best_mx_is_a_loop(records: list[tuple[int, str]]) -> None:
    with pytest.raises(PermanentFailure, match=r"^5\.4\.6 .*loops back"):
        order_mx(records, shuffle=no_shuffle, self_names={"gw.example.test"})

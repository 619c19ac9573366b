"""shared.config: value kinds, loading, environment overrides and error reports.

Table-driven: each case is one row, and each converter is reached through the
key that uses it (`SECTIONS[section]` field metadata), so the tables test what
an operator writes, not private helpers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.config import (
    DEFAULT_ACTIONS,
    SECTIONS,
    Config,
    HostPort,
    load_config,
    parse_duration,
    parse_hostport,
    parse_size,
)
from shared.errors import ConfigError


def converter(section: str, key: str) -> Callable[[object], Any]:
    field = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[key]
    conv: Callable[[object], Any] = field.metadata["conv"]
    return conv


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "smtpgw.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: str | os.PathLike[str] | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return info.value.problems


# ---------------------------------------------------------------- value kinds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("24h", 86400.0),
        ("60d", 5184000.0),
        ("2w", 1209600.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1.5h", 5400.0),
        (" 5 s ", 5.0),
        ("1H", 3600.0),
        ("0s", 0.0),
        (45, 45.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is not a duration"),
        ("10", "is not a duration"),  # a string needs a unit; a bare number must be a TOML number
        ("10x", "is not a duration"),
        ("-5s", "is not a duration"),
        ("1h-30m", "is not a duration"),
        ("soon", "is not a duration"),
        (-1, "must not be negative"),
        (True, "expected a duration"),
        (None, "expected a duration"),
        (["30s"], "expected a duration"),
    ],
)
def test_duration_rejects(text: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10MiB", 10 * 1024**2),
        ("10 MiB", 10 * 1024**2),
        ("10mib", 10 * 1024**2),
        ("128MiB", 128 * 1024**2),
        ("1GiB", 1024**3),
        ("0.5KiB", 512),
        ("500KB", 500_000),
        ("500k", 500_000),
        ("10MB", 10_000_000),
        ("2G", 2_000_000_000),
        ("100b", 100),
        ("100", 100),
        (1024, 1024),
        (0, 0),
    ],
)
def test_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is not a size"),
        ("10XB", "is not a size"),
        ("-1", "is not a size"),
        ("1e3", "is not a size"),
        ("MiB", "is not a size"),
        (-1, "must not be negative"),
        (1.5, "expected a size"),
        (True, "expected a size"),
    ],
)
def test_size_rejects(text: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "hostport", "shown"),
    [
        ("127.0.0.1:2525", HostPort("127.0.0.1", 2525), "127.0.0.1:2525"),
        ("[::1]:25", HostPort("::1", 25), "[::1]:25"),
        ("[::]:25", HostPort("::", 25), "[::]:25"),
        ("[2001:db8::5]:587", HostPort("2001:db8::5", 587), "[2001:db8::5]:587"),
        (":2525", HostPort("0.0.0.0", 2525), "0.0.0.0:2525"),
        ("mx.example.test:25", HostPort("mx.example.test", 25), "mx.example.test:25"),
        (" localhost:25 ", HostPort("localhost", 25), "localhost:25"),
        ("127.0.0.1:0", HostPort("127.0.0.1", 0), "127.0.0.1:0"),
    ],
)
def test_hostport(text: str, hostport: HostPort, shown: str) -> None:
    parsed = parse_hostport(text)
    assert parsed == hostport
    assert str(parsed) == shown
    assert parse_hostport(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1", "is not 'host:port'"),
        ("::1:25", "is not 'host:port'"),  # IPv6 needs brackets
        ("host:", "is not 'host:port'"),
        ("host:smtp", "is not 'host:port'"),
        ("[fe80::1%eth0]:25", "is not 'host:port'"),
        ("host:70000", "port 70000 is out of range"),
        (2525, "expected 'host:port'"),
    ],
)
def test_hostport_rejects(text: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_hostport(text)


@pytest.mark.parametrize(
    ("given", "domains"),
    [
        (["example.test"], ("example.test",)),
        (["Example.TEST."], ("example.test",)),
        ([".example.test"], (".example.test",)),
        (["Bücher.example"], ("xn--bcher-kva.example",)),
        (["a.test", "b.test"], ("a.test", "b.test")),
        (["mail_gw.example.test"], ("mail_gw.example.test",)),
    ],
)
def test_domains(given: list[str], domains: tuple[str, ...]) -> None:
    assert converter("receiver", "internal_domains")(given) == domains


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        (["exa mple.test"], r"item 0 \('exa mple.test'\): 'exa mple.test' is not a domain"),
        (["a.test", "a..test"], r"item 1 .*is not a domain"),
        (["@example.test"], "is not a domain"),
        ([""], "is not a domain"),
        ([42], "expected a string"),
        ("example.test", "expected a list"),
    ],
)
def test_domains_reject(given: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        converter("receiver", "internal_domains")(given)


@pytest.mark.parametrize(
    ("given", "routes"),
    [
        ({"*": "mx"}, {"*": "mx"}),
        ({"Example.TEST": "smtp://10.0.0.5:25", "*": "mx"}, {"example.test": "smtp://10.0.0.5:25", "*": "mx"}),
        ({".example.test": "smtp://mail.example.test"}, {".example.test": "smtp://mail.example.test"}),
        ({"example.test": "smtp://[2001:db8::5]:2525"}, {"example.test": "smtp://[2001:db8::5]:2525"}),
        ({}, {}),
    ],
)
def test_routes(given: dict[str, str], routes: dict[str, str]) -> None:
    assert dict(converter("delivery", "routes")(given)) == routes


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ({"example.test": "smtp://h:99999"}, "'example.test': 'smtp://h:99999' has an invalid port"),
        ({"example.test": "lmtp://h:24"}, "is not 'mx' or 'smtp://host"),
        ({"example.test": "MX"}, "is not 'mx' or 'smtp://host"),
        ({"example.test": "smtp://"}, "is not 'mx' or 'smtp://host"),
        ({"bad domain": "mx"}, "'bad domain': 'bad domain' is not a domain"),
        ({"example.test": 25}, "expected a string"),
        (["mx"], "expected a table"),
    ],
)
def test_routes_reject(given: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        converter("delivery", "routes")(given)


def test_routes_are_frozen() -> None:
    routes = converter("delivery", "routes")({"*": "mx"})
    with pytest.raises(TypeError):
        routes["example.test"] = "smtp://h"


@pytest.mark.parametrize(
    ("given", "changed"),
    [
        ({}, {}),
        ({"virus": "quarantine"}, {"virus": "quarantine"}),
        ({"encrypted": "deliver", "limits": "delete"}, {"encrypted": "deliver", "limits": "delete"}),
        (dict(DEFAULT_ACTIONS), {}),
    ],
)
def test_actions_merge_with_the_defaults(given: dict[str, str], changed: dict[str, str]) -> None:
    assert dict(converter("scanner", "actions")(given)) == {**DEFAULT_ACTIONS, **changed}


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ({"virus": "burn"}, "virus = 'burn' is not one of deliver, strip, quarantine, delete"),
        ({"spam": "delete"}, "unknown category 'spam'; known: virus, "),
        ("quarantine", "expected a table"),
    ],
)
def test_actions_reject(given: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        converter("scanner", "actions")(given)


def test_actions_are_frozen_and_leave_the_defaults_alone() -> None:
    actions = converter("scanner", "actions")({"virus": "delete"})
    with pytest.raises(TypeError):
        actions["virus"] = "deliver"
    assert DEFAULT_ACTIONS["virus"] == "strip"
    assert SECTIONS["scanner"]().actions["virus"] == "strip"


@pytest.mark.parametrize(
    ("given", "networks"),
    [
        (["10.0.0.0/8"], ("10.0.0.0/8",)),
        (["192.0.2.7"], ("192.0.2.7/32",)),
        (["10.1.2.3/8"], ("10.0.0.0/8",)),  # host bits are forgiven, as Postfix's mynetworks does
        (["2001:db8::/32", "::1"], ("2001:db8::/32", "::1/128")),
        ([], ()),
    ],
)
def test_networks(given: list[str], networks: tuple[str, ...]) -> None:
    assert converter("receiver", "relay_networks")(given) == tuple(ipaddress.ip_network(n) for n in networks)


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        (["10.0.0.0/33"], r"item 0 \('10.0.0.0/33'\): '10.0.0.0/33' is not a network"),
        (["10.0.0.0/8", "intranet"], r"item 1 .*'intranet' is not a network"),
        ("10.0.0.0/8", "expected a list"),
    ],
)
def test_networks_reject(given: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        converter("receiver", "relay_networks")(given)


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("receiver", "max_recipients", 0, "must be at least 1"),
        ("receiver", "max_recipients", True, "expected an integer"),
        ("receiver", "max_recipients", "100", "expected an integer"),
        ("receiver", "max_line_length", 77, "must be at least 78"),
        ("receiver", "hostname", 5, "expected a string"),
        ("spool", "fsync", "yes", "expected true or false"),
        ("logging", "level", "verbose", "'verbose' is not one of debug, info, warning, error"),
        ("scanner", "filters", ["virus", "magic"], r"item 1 \('magic'\): 'magic' is not one of"),
        ("scanner", "clamd", "127.0.0.1:3310", "is not 'tcp://host:port' or 'unix:///path/to/clamd.sock'"),
        ("scanner", "clamd", "tcp://127.0.0.1", "is not 'tcp://host:port'"),
        ("scanner", "clamd", "tcp://127.0.0.1:99999", "out of range"),
        ("scanner", "virus_text", "Removed a virus.", "must contain %FILENAME%"),
        ("broker", "url", "redis://localhost", "is not 'embedded' or 'amqp://"),
        ("delivery", "nameservers", ["8.8.8.8"], r"item 0 \('8.8.8.8'\): '8.8.8.8' is not 'host:port'"),
    ],
)
def test_other_values_reject(section: str, key: str, value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        converter(section, key)(value)


@pytest.mark.parametrize(
    ("section", "key", "value", "converted"),
    [
        ("scanner", "clamd", "unix:///run/clamav/clamd.ctl", "unix:///run/clamav/clamd.ctl"),
        (
            "broker",
            "url",
            "amqps://gw:secret@rabbit.example.test:5671/mail",
            "amqps://gw:secret@rabbit.example.test:5671/mail",
        ),
        ("scanner", "filters", ["virus", "limits"], ("virus", "limits")),
        ("delivery", "nameservers", ["127.0.0.1:5353"], (HostPort("127.0.0.1", 5353),)),
        ("logging", "format", "json", "json"),
    ],
)
def test_other_values(section: str, key: str, value: object, converted: object) -> None:
    assert converter(section, key)(value) == converted


# ---------------------------------------------------------------- loading


def test_no_file_gives_the_defaults() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.source == "<defaults>"
    assert config.receiver.max_message_size == 10 * 1024**2
    assert dict(config.delivery.routes) == {"*": "mx"}


def test_file_sets_only_what_it_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [receiver]
        max_recipients = 20
        internal_domains = ["corp.test", ".corp.test"]

        [delivery.routes]
        "corp.test" = "smtp://10.0.0.5"
        "*" = "mx"
        """,
    )
    config = load_config(path, env={})
    assert config.source == str(path)
    assert config.receiver.max_recipients == 20
    assert config.receiver.internal_domains == ("corp.test", ".corp.test")
    assert dict(config.delivery.routes) == {"corp.test": "smtp://10.0.0.5", "*": "mx"}
    assert config.receiver.max_connections == SECTIONS["receiver"]().max_connections
    assert config.scanner == SECTIONS["scanner"]()


def test_config_is_frozen() -> None:
    config = load_config(None, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.receiver.max_recipients = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "section", "key", "value"),
    [
        ({"SMTPGW_RECEIVER__MAX_RECIPIENTS": "50"}, "receiver", "max_recipients", 50),
        ({"SMTPGW_RECEIVER__IDLE_TIMEOUT": "5m"}, "receiver", "idle_timeout", 300.0),
        ({"SMTPGW_RECEIVER__IDLE_TIMEOUT": "90"}, "receiver", "idle_timeout", 90.0),
        ({"SMTPGW_RECEIVER__MAX_MESSAGE_SIZE": "25MiB"}, "receiver", "max_message_size", 25 * 1024**2),
        ({"SMTPGW_RECEIVER__HOSTNAME": "mx1.corp.test"}, "receiver", "hostname", "mx1.corp.test"),
        ({"SMTPGW_RECEIVER__BANNER": "ESMTP ready"}, "receiver", "banner", "ESMTP ready"),
        ({"SMTPGW_RECEIVER__BANNER": '"2024"'}, "receiver", "banner", "2024"),
        ({"SMTPGW_SPOOL__FSYNC": "false"}, "spool", "fsync", False),
        ({"SMTPGW_RECEIVER__LISTEN": "[::1]:25"}, "receiver", "listen", HostPort("::1", 25)),
        (
            {"SMTPGW_BROKER__URL": "amqp://guest:guest@127.0.0.1:5672/%2F"},
            "broker",
            "url",
            "amqp://guest:guest@127.0.0.1:5672/%2F",
        ),
        (
            {"SMTPGW_RECEIVER__INTERNAL_DOMAINS": '["a.test", "b.test"]'},
            "receiver",
            "internal_domains",
            ("a.test", "b.test"),
        ),
        (
            {"SMTPGW_SCANNER__ACTIONS": '{ virus = "quarantine" }'},
            "scanner",
            "actions",
            {**DEFAULT_ACTIONS, "virus": "quarantine"},
        ),
        (
            {"SMTPGW_DELIVERY__ROUTES": '{ "corp.test" = "smtp://10.0.0.5:25", "*" = "mx" }'},
            "delivery",
            "routes",
            {"corp.test": "smtp://10.0.0.5:25", "*": "mx"},
        ),
        # Only SMTPGW_<SECTION>__<KEY> is ours: other variables, even with our prefix, are left alone.
        ({"SMTPGW_TEST_AMQP": "amqp://x", "PATH": "/bin"}, "receiver", "max_recipients", 100),
    ],
)
def test_env_overrides(env: dict[str, str], section: str, key: str, value: object) -> None:
    got = getattr(getattr(load_config(None, env=env), section), key)
    assert (dict(got) if isinstance(value, dict) else got) == value


def test_env_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[receiver]\nmax_recipients = 20\nmax_connections = 7\n")
    config = load_config(path, env={"SMTPGW_RECEIVER__MAX_RECIPIENTS": "50"})
    assert (config.receiver.max_recipients, config.receiver.max_connections) == (50, 7)


def test_env_is_read_from_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTPGW_RECEIVER__MAX_RECIPIENTS", "42")
    assert load_config(None).receiver.max_recipients == 42


# ---------------------------------------------------------------- problems


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        (
            "[bogus]\nx = 1\n",
            {},
            ["{file}:bogus: unknown section; known: receiver, broker, "],
        ),
        (
            "[receiver]\nmax_recipents = 5\n",
            {},
            ["{file}:receiver.max_recipents: unknown key; known: listen, hostname, "],
        ),
        ("receiver = 5\n", {}, ["{file}:receiver: expected a [receiver] table"]),
        ("", {"SMTPGW_BOGUS__X": "1"}, ["$SMTPGW_BOGUS__X: unknown section 'bogus'"]),
        ("", {"SMTPGW_RECEIVER__NOPE": "1"}, ["$SMTPGW_RECEIVER__NOPE: unknown key; known: listen, "]),
        ("", {"SMTPGW_RECEIVER__MAX_RECIPIENTS": "lots"}, ["$SMTPGW_RECEIVER__MAX_RECIPIENTS: expected an integer"]),
        (
            "[receiver]\nmax_recipients = 5\n",
            {"SMTPGW_RECEIVER__MAX_RECIPIENTS": "0"},
            ["$SMTPGW_RECEIVER__MAX_RECIPIENTS: must be at least 1"],
        ),
        (
            '[receiver]\nmax_recipients = 0\nidle_timeout = "soon"\n[delivery]\nroutes = { "x.test" = "ftp://h" }\n',
            {"SMTPGW_SPOOL__FSYNC": "maybe"},
            [
                "{file}:receiver.max_recipients: must be at least 1",
                "{file}:receiver.idle_timeout: 'soon' is not a duration",
                "{file}:delivery.routes: 'x.test': 'ftp://h' is not 'mx' or 'smtp://host[:port]'",
                "$SMTPGW_SPOOL__FSYNC: expected true or false, got 'maybe'",
            ],
        ),
    ],
)
def test_problems_are_reported_together(tmp_path: Path, text: str, env: dict[str, str], expected: list[str]) -> None:
    path = write(tmp_path, text)
    problems = problems_of(path, env)
    wanted = [e.format(file=path) for e in expected]
    assert len(problems) == len(wanted), problems
    for want in wanted:
        assert any(p.startswith(want) for p in problems), f"{want!r} not in {problems}"


def test_config_error_message_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "[receiver]\nmax_recipients = 0\nworkers = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).splitlines() == info.value.problems
    assert len(info.value.problems) == 2


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    assert problems_of(path) == [f"{path}: file not found"]


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory where the file should be: reading fails for root too.
    assert problems_of(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[receiver\n", "(at line 1, column 10)"),
        ("[receiver]\nmax_recipients = \n", "(at line 2, column 18)"),
        ("[receiver]\nlisten = '1\n", "(at end of document)"),
    ],
)
def test_invalid_toml(tmp_path: Path, text: str, where: str) -> None:
    path = write(tmp_path, text)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}: not valid TOML: ")
    assert problem.endswith(where)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[receiver]\ninternal_domains = []\n", "receiver.internal_domains: must name at least one domain"),
        (
            '[delivery]\nretry_interval = "2h"\nmax_queue_lifetime = "1h"\n',
            "delivery.max_queue_lifetime: must not be shorter than delivery.retry_interval",
        ),
        (
            '[receiver]\nmax_message_size = "64MiB"\ndata_memory_budget = "32MiB"\n',
            "receiver.data_memory_budget: must be at least receiver.max_message_size",
        ),
    ],
)
def test_cross_checks(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{expected}")


@pytest.mark.parametrize(
    "text",
    [
        '[delivery]\nretry_interval = "1h"\nmax_queue_lifetime = "1h"\n',
        '[receiver]\nmax_message_size = "32MiB"\ndata_memory_budget = "32MiB"\n',
    ],
)
def test_cross_checks_allow_the_boundary(tmp_path: Path, text: str) -> None:
    load_config(write(tmp_path, text), env={})

"""The configuration files in etc/ against the code that reads them.

etc/smtpgw.example.toml is the operator's reference, commented like Mailman's
schema.cfg: every section and key of `shared.config.SECTIONS`, set to its
default, with a comment explaining it. These tests are built on `SECTIONS` and
`dataclasses.fields`, so a key that is added, renamed or given a new default
without the reference being updated fails here: the documentation cannot drift.

etc/smtpgw.toml is what `make run` uses; it must load and send example.test to
the local capture sink.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shared.config import SECTIONS, HostPort, load_config

ETC = Path(__file__).resolve().parents[3] / "etc"
EXAMPLE = ETC / "smtpgw.example.toml"
RUN_CONFIG = ETC / "smtpgw.toml"

KEYS = [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _example() -> dict[str, Any]:
    with EXAMPLE.open("rb") as fh:
        return tomllib.load(fh)


def _comments_above_keys(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> the comment lines directly above the key (no blank line between).

    A `[section.key]` table header counts as the key `key` of `section`; the
    entries inside such a table are values, not keys of the section.
    """
    found: dict[tuple[str, str], list[str]] = {}
    section: str | None = None
    in_subtable = False
    comment: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comment.append(line)
            continue
        header = re.fullmatch(r"\[(\w+)(?:\.(\w+))?\]", line)
        key = re.match(r"(\w+)\s*=", line)
        if header:
            section, sub = header.group(1), header.group(2)
            in_subtable = sub is not None
            if sub is not None:
                found[(section, sub)] = comment
        elif key and section is not None and not in_subtable:
            found[(section, key.group(1))] = comment
        comment = []
    return found


def test_names_every_section_and_no_other() -> None:
    assert list(_example()) == list(SECTIONS)


@pytest.mark.parametrize(("section", "key"), KEYS)
def test_names_every_key(section: str, key: str) -> None:
    assert key in _example()[section], f"etc/smtpgw.example.toml lacks [{section}] {key}"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_names_no_unknown_key(section: str) -> None:
    known = {f.name for f in dataclasses.fields(SECTIONS[section])}
    assert set(_example()[section]) - known == set()


@pytest.mark.parametrize(("section", "key"), KEYS)
def test_explains_every_key(section: str, key: str) -> None:
    comment = _comments_above_keys(EXAMPLE.read_text(encoding="utf-8")).get((section, key), [])
    assert any(len(line) > len("# ") for line in comment), f"[{section}] {key} has no comment right above it"


@pytest.mark.parametrize(("section", "key"), KEYS)
def test_value_is_the_default(section: str, key: str) -> None:
    # Per key, through the key's own converter, so one wrong value names itself.
    field = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[key]
    written = _example()[section].get(key)
    assert written is not None, f"etc/smtpgw.example.toml lacks [{section}] {key}"
    assert field.metadata["conv"](written) == getattr(SECTIONS[section](), key)


def test_loads_to_the_defaults() -> None:
    config = load_config(EXAMPLE, env={})
    assert dataclasses.replace(config, source="<defaults>") == load_config(None, env={})


def test_run_config_sends_example_test_to_the_sink() -> None:
    config = load_config(RUN_CONFIG, env={})
    assert config.receiver.listen == HostPort("127.0.0.1", 2525)
    assert config.receiver.internal_domains == ("example.test",)
    assert dict(config.delivery.routes) == {"example.test": "smtp://127.0.0.1:2526", "*": "mx"}
    assert config.broker.url == "embedded"
    assert config.spool.dir == "var/spool"
    assert config.quarantine.dir == "var/quarantine"
    assert config.scanner.clamd == "tcp://127.0.0.1:3310"
    assert config.metrics.listen == HostPort("127.0.0.1", 9101)

"""LiveRules: the scanner's rules in force, reloaded live, kept when a bundle fails."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.scanner.app import build_handler
from services.scanner.rules import LiveRules, apply_rules
from shared.config import Config
from shared.envelope import Action
from shared.rules import MANIFEST, RULES_LOADED, RULES_UPDATED, AttachmentRules, Rules
from shared.transport import Queue
from tests.unit.scanner.builders import FakeClamd, mail, settings
from tests.unit.scanner.test_app import job


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def install(root: Path, name: str, version: str, attachments: bytes) -> Path:
    """An installed bundle `root.versions/name`, made active by pointing the `root` symlink at it."""
    versions = root.with_name(root.name + ".versions")
    directory = versions / name
    directory.mkdir(parents=True)
    doc = {"format": 1, "version": version, "files": {"attachments.toml": hashlib.sha256(attachments).hexdigest()}}
    (directory / "attachments.toml").write_bytes(attachments)
    (directory / MANIFEST).write_text(json.dumps(doc))
    link = root.with_name(".link")
    os.symlink(f"{versions.name}/{name}", link)
    os.replace(link, root)
    return directory


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("smtpgw_scanner_rules_reloads_total", {"result": result}) or 0.0


@pytest.mark.parametrize(
    ("rules", "configured", "expected"),
    [
        (Rules(), ("exe",), ("exe",)),
        (Rules("1", attachments=AttachmentRules(("js",))), ("exe",), ("exe", "js")),
        (Rules("1", attachments=AttachmentRules(("js", "exe"))), ("exe",), ("exe", "js")),
        (Rules("1", attachments=AttachmentRules(("js",), "replace")), ("exe",), ("js",)),
    ],
)
def test_apply(rules: Rules, configured: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert apply_rules(rules, settings(blocked_extensions=list(configured))).blocked_extensions == expected


def test_without_rules_dir_the_configuration_alone() -> None:
    base = settings()
    live = LiveRules(base)
    assert live.rules == Rules()
    assert live.settings() is base


def test_loads_the_active_bundle_at_start(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    install(root, "20260101T000000Z-1", "1", b'blocked_extensions = ["xyz"]')
    live = LiveRules(settings(rules_dir=str(root), blocked_extensions=["exe"]))
    assert live.rules.version == "1"
    assert live.settings().blocked_extensions == ("exe", "xyz")


def test_no_bundle_yet_means_the_configured_lists(tmp_path: Path) -> None:
    live = LiveRules(settings(rules_dir=str(tmp_path / "rules"), blocked_extensions=["exe"]))
    assert live.rules == Rules()
    assert live.settings().blocked_extensions == ("exe",)


def test_reload_swaps_and_a_broken_bundle_keeps_the_rules_in_force(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    install(root, "20260101T000000Z-1", "1", b'blocked_extensions = ["xyz"]')
    live = LiveRules(settings(rules_dir=str(root)))
    install(root, "20260101T000001Z-2", "2", b'blocked_extensions = ["abc"]')
    result = live.reload()
    assert (result.ok, result.changed, result.version) == (True, True, "2")
    assert "abc" in live.settings().blocked_extensions

    broken = install(root, "20260101T000002Z-3", "3", b'blocked_extensions = ["abc"]')
    (broken / "attachments.toml").write_bytes(b'blocked_extensions = ["abc", "changed"]')  # sum no longer matches
    failed = reloads("failed")
    result = live.reload()
    assert (result.ok, result.version) == (False, "2")
    assert "SHA-256" in result.error
    assert live.rules.version == "2"
    assert "abc" in live.settings().blocked_extensions
    assert reloads("failed") == failed + 1

    again = live.reload()
    assert (again.ok, again.changed) == (False, False)


def test_same_bundle_again_is_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    install(root, "20260101T000000Z-1", "1", b'blocked_extensions = ["xyz"]')
    live = LiveRules(settings(rules_dir=str(root)))
    before = live.settings()
    result = live.reload()
    assert (result.ok, result.changed) == (True, False)
    assert live.settings() is before


def test_notices_a_new_bundle_on_its_own_within_the_interval(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    install(root, "20260101T000000Z-1", "1", b'blocked_extensions = ["xyz"]')
    clock = Clock()
    live = LiveRules(settings(rules_dir=str(root)), check_interval=5, clock=clock)
    install(root, "20260101T000001Z-2", "2", b'blocked_extensions = ["abc"]')
    clock.now += 4
    assert "abc" not in live.settings().blocked_extensions  # not looked yet
    clock.now += 1
    assert "abc" in live.settings().blocked_extensions
    assert live.rules.version == "2"


def test_a_broken_bundle_is_not_retried_until_it_changes(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    install(root, "20260101T000000Z-1", "1", b'blocked_extensions = ["xyz"]')
    clock = Clock()
    live = LiveRules(settings(rules_dir=str(root)), check_interval=5, clock=clock)
    install(root, "20260101T000001Z-2", "2", b"blocked_extensions = [")  # not TOML; sum matches
    failed = reloads("failed")
    for _ in range(3):
        clock.now += 5
        assert live.settings().blocked_extensions[-1] == "xyz"
    assert reloads("failed") == failed + 1
    install(root, "20260101T000002Z-3", "3", b'blocked_extensions = ["abc"]')
    clock.now += 5
    assert live.settings().blocked_extensions[-1] == "abc"


def test_event_reloads_and_reports(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    install(root, "20260101T000000Z-1", "1", b'blocked_extensions = ["xyz"]')
    live = LiveRules(settings(rules_dir=str(root)))
    sent: list[tuple[str, Mapping[str, object]]] = []
    on_event = live.subscriber(lambda name, data: sent.append((name, data)))

    on_event("something.else", {})
    assert sent == []
    install(root, "20260101T000001Z-2", "2", b'blocked_extensions = ["abc"]')
    on_event(RULES_UPDATED, {"version": "2"})
    [(name, report)] = sent
    assert name == RULES_LOADED
    assert {k: report[k] for k in ("requested", "version", "ok", "error")} == {
        "requested": "2", "version": "2", "ok": True, "error": ""
    }  # fmt: skip
    assert str(report["scanner"]).endswith(f":{os.getpid()}")

    install(root, "20260101T000002Z-3", "3", b"mode = 1")
    on_event(RULES_UPDATED, {"version": "3"})
    report = sent[-1][1]
    assert (report["ok"], report["version"], report["requested"]) == (False, "2", "3")
    assert "mode 1" in str(report["error"])


def test_the_handler_scans_with_the_rules_in_force(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    config = Config(scanner=settings(rules_dir=str(root), blocked_extensions=["exe"]))
    install(root, "20260101T000000Z-1", "1", b'blocked_extensions = ["xyz"]')
    live = LiveRules(config.scanner)
    handle = build_handler(config, FakeClamd(), live)
    body = mail(attachments=[("report.abc", b"data")])

    [out] = handle(job(body))
    assert (out.queue, out.body) == (Queue.DELIVER, body)  # clean: on as it came

    install(root, "20260101T000001Z-2", "2", b'blocked_extensions = ["abc"]')
    live.reload()
    outputs = handle(job(body))
    assert [v.action for v in outputs[-1].envelope.verdicts[1:]] == [Action.STRIP]


def test_concurrent_readers_see_old_or_new_never_a_mix(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    install(root, "20260101T000000Z-1", "1", b'blocked_extensions = ["a1", "b1"]\nmode = "replace"')
    live = LiveRules(settings(rules_dir=str(root)))
    seen: set[tuple[str, ...]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(live.settings().blocked_extensions)
            time.sleep(0)  # yield the GIL, so the reloads are not starved (not a wait)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(2, 8):
        install(
            root,
            f"20260101T0000{i:02d}Z-{i}",
            str(i),
            f'blocked_extensions = ["a{i}", "b{i}"]\nmode = "replace"'.encode(),
        )
        live.reload()
    stop.set()
    for t in readers:
        t.join()
    assert all(len(s) == 2 and s[0][1:] == s[1][1:] for s in seen)
    assert dataclasses.replace(live.settings(), blocked_extensions=()) == dataclasses.replace(
        settings(rules_dir=str(root)), blocked_extensions=()
    )

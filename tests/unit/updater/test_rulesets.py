"""Rule bundle updates, with a fake download and fake scanners (services/updater/rulesets.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.updater.bundle import build_bundle, generate_key, load_private_key
from services.updater.errors import FetchError, UpdateError
from services.updater.rulesets import RuleSet
from services.updater.state import Result
from shared.config import Config, ScannerConfig, UpdaterConfig
from shared.rules import load_rules

PRIVATE, PUBLIC = generate_key()
KEY = load_private_key(PRIVATE)
_, OTHER_PUBLIC = generate_key()


def rules(*extensions: str) -> dict[str, bytes]:
    return {"attachments.toml": f"blocked_extensions = {list(extensions)!r}\n".replace("'", '"').encode()}


@dataclass
class FakeFetcher:
    data: bytes = b""
    error: FetchError | None = None

    def fetch(self, url: str) -> bytes:
        if self.error is not None:
            raise self.error
        return self.data


@dataclass
class FakeScanners:
    """Answers each announcement; `fail` names versions a scanner cannot load."""

    fail: set[str] = field(default_factory=set)
    announced: list[str] = field(default_factory=list)

    def __call__(self, version: str) -> list[Mapping[str, object]]:
        self.announced.append(version)
        if version in self.fail:
            return [{"requested": version, "ok": False, "error": "disk says no", "scanner": "host:1"}]
        return []


@dataclass
class Clock:
    now: float = 1_795_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def ruleset(tmp_path: Path, fetcher: FakeFetcher, scanners: FakeScanners, **updater: object) -> RuleSet:
    settings = {"bundle_url": "https://rules.example.test/bundle.tar.gz", "bundle_public_keys": (PUBLIC,), **updater}
    config = Config(scanner=ScannerConfig(rules_dir=str(tmp_path / "rules")), updater=UpdaterConfig(**settings))  # type: ignore[arg-type]
    return RuleSet(config, fetcher, scanners, Clock())  # type: ignore[arg-type]


def test_new_versions_are_installed_and_announced(tmp_path: Path) -> None:
    fetcher, scanners = FakeFetcher(build_bundle(rules("xyz"), "1", KEY)), FakeScanners()
    rs = ruleset(tmp_path, fetcher, scanners)
    outcome = rs.update()
    assert (outcome.result, outcome.version, outcome.detail) == (Result.ACTIVATED, "1", "signed by key 1")
    assert load_rules(tmp_path / "rules").attachments.blocked_extensions == ("xyz",)  # type: ignore[union-attr]
    assert os.path.islink(tmp_path / "rules")
    assert scanners.announced == ["1"]

    assert rs.update().result is Result.UNCHANGED
    assert scanners.announced == ["1"]

    fetcher.data = build_bundle(rules("abc"), "2", KEY)
    assert rs.update().result is Result.ACTIVATED
    assert load_rules(tmp_path / "rules").version == "2"
    assert scanners.announced == ["1", "2"]


def _tampered_sums() -> bytes:
    from services.updater.bundle import build_manifest, pack, sign

    manifest = build_manifest(rules("xyz"), "9")
    return pack({**rules("other"), "manifest.json": manifest, "manifest.sig": sign(manifest, KEY)})


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"garbage", "not a readable tar.gz"),
        (build_bundle(rules("xyz"), "9", KEY)[:-20], "not a readable tar.gz"),
        (_tampered_sums(), "SHA-256 is"),
        (build_bundle(rules("xyz"), "9", None), "not signed"),
        (build_bundle(rules("a b"), "9", KEY), "is not a file name extension"),
    ],
)
def test_refused_bundles_change_nothing(tmp_path: Path, data: bytes, error: str) -> None:
    fetcher, scanners = FakeFetcher(build_bundle(rules("xyz"), "1", KEY)), FakeScanners()
    rs = ruleset(tmp_path, fetcher, scanners)
    rs.update()
    fetcher.data = data
    outcome = rs.update()
    assert outcome.result is Result.REFUSED
    assert error in outcome.detail
    assert outcome.version == "1"
    assert load_rules(tmp_path / "rules").version == "1"
    assert scanners.announced == ["1"]


def test_a_bundle_signed_by_someone_else(tmp_path: Path) -> None:
    rs = ruleset(
        tmp_path, FakeFetcher(build_bundle(rules("xyz"), "1", KEY)), FakeScanners(), bundle_public_keys=(OTHER_PUBLIC,)
    )
    outcome = rs.update()
    assert (outcome.result, outcome.version) == (Result.REFUSED, "")
    assert "bad signature" in outcome.detail
    assert not (tmp_path / "rules").exists()


def test_unsigned_when_allowed(tmp_path: Path) -> None:
    rs = ruleset(tmp_path, FakeFetcher(build_bundle(rules("xyz"), "1", None)), FakeScanners(), allow_unsigned=True)
    assert (rs.update().result, rs.update().result) == (Result.ACTIVATED, Result.UNCHANGED)


def test_downgrades_and_changed_contents_under_the_same_version_are_refused(tmp_path: Path) -> None:
    fetcher = FakeFetcher(build_bundle(rules("xyz"), "2", KEY))
    rs = ruleset(tmp_path, fetcher, FakeScanners())
    rs.update()
    fetcher.data = build_bundle(rules("xyz"), "1", KEY)
    assert "older than the active 2" in rs.update().detail
    fetcher.data = build_bundle(rules("changed"), "2", KEY)
    assert "is active with other contents" in rs.update().detail
    assert load_rules(tmp_path / "rules").attachments.blocked_extensions == ("xyz",)  # type: ignore[union-attr]


def test_a_download_failure_is_reported(tmp_path: Path) -> None:
    rs = ruleset(tmp_path, FakeFetcher(error=FetchError("HTTP 503", temporary=True)), FakeScanners())
    outcome = rs.update()
    assert (outcome.result, outcome.detail) == (Result.FAILED, "HTTP 503")


def test_a_scanner_that_cannot_load_it_rolls_everyone_back(tmp_path: Path) -> None:
    fetcher, scanners = FakeFetcher(build_bundle(rules("xyz"), "1", KEY)), FakeScanners(fail={"2"})
    rs = ruleset(tmp_path, fetcher, scanners)
    rs.update()
    before = rs.store.versions()  # type: ignore[union-attr]
    fetcher.data = build_bundle(rules("abc"), "2", KEY)
    outcome = rs.update()
    assert (outcome.result, outcome.version) == (Result.ROLLED_BACK, "1")
    assert "scanner host:1: disk says no" in outcome.detail
    assert load_rules(tmp_path / "rules").version == "1"
    assert scanners.announced == ["1", "2", "1"]  # the previous version announced again
    assert rs.store.versions() == before  # type: ignore[union-attr]


def test_the_first_bundle_failing_goes_back_to_the_configured_lists(tmp_path: Path) -> None:
    scanners = FakeScanners(fail={"1"})
    rs = ruleset(tmp_path, FakeFetcher(build_bundle(rules("xyz"), "1", KEY)), scanners)
    outcome = rs.update()
    assert outcome.result is Result.ROLLED_BACK
    assert not (tmp_path / "rules").exists()
    assert scanners.announced == ["1", ""]


def test_rollback_by_hand_and_withdrawn_versions(tmp_path: Path) -> None:
    fetcher, scanners = FakeFetcher(build_bundle(rules("xyz"), "1", KEY)), FakeScanners()
    rs = ruleset(tmp_path, fetcher, scanners)
    rs.update()
    fetcher.data = build_bundle(rules("abc"), "2", KEY)
    rs.update()
    outcome, left = rs.rollback()
    assert (outcome.result, outcome.version, left) == (Result.ROLLED_BACK, "1", "2")
    assert load_rules(tmp_path / "rules").version == "1"
    assert scanners.announced[-1] == "1"
    again = rs.update(withdrawn=[left])
    assert (again.result, again.version) == (Result.UNCHANGED, "1")
    assert "was rolled back" in again.detail
    fetcher.data = build_bundle(rules("abc", "def"), "3", KEY)
    assert rs.update(withdrawn=[left]).result is Result.ACTIVATED


def test_rollback_without_a_previous_version(tmp_path: Path) -> None:
    rs = ruleset(tmp_path, FakeFetcher(build_bundle(rules("xyz"), "1", KEY)), FakeScanners())
    with pytest.raises(UpdateError, match="no previous rule bundle"):
        rs.rollback()
    rs.update()
    with pytest.raises(UpdateError, match="no previous rule bundle"):
        rs.rollback()


def test_not_configured(tmp_path: Path) -> None:
    rs = ruleset(tmp_path, FakeFetcher(), FakeScanners(), bundle_url="")
    assert rs.update().result is Result.SKIPPED

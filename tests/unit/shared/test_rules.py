"""The rule bundle format and its validation (shared.rules), table-driven."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shared.rules import (
    MANIFEST,
    SIGNATURE,
    AttachmentRules,
    Rules,
    RulesError,
    load_rules,
    validate_bundle,
    version_key,
)

ATTACHMENTS = b'blocked_extensions = ["js", ".JAR", " iso "]\nmode = "extend"\n'


def bundle(files: dict[str, bytes], version: str = "1.0", **manifest: object) -> dict[str, bytes]:
    doc = {
        "format": 1,
        "version": version,
        "created": "2026-11-27T12:00:00Z",
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        **manifest,
    }
    return {**files, MANIFEST: json.dumps(doc).encode()}


def test_a_good_bundle() -> None:
    rules = validate_bundle(bundle({"attachments.toml": ATTACHMENTS}, "2026.11.27-1"))
    assert rules == Rules("2026.11.27-1", "2026-11-27T12:00:00Z", AttachmentRules(("js", "jar", "iso"), "extend"))


def test_the_signature_is_not_part_of_the_contents() -> None:
    files = {**bundle({"attachments.toml": ATTACHMENTS}), SIGNATURE: b"c2ln\n"}
    assert validate_bundle(files).version == "1.0"


@pytest.mark.parametrize(
    ("attachments", "expected"),
    [
        (b'blocked_extensions = ["js"]', ("exe", "js")),
        (b'blocked_extensions = ["js", "exe"]\nmode = "extend"', ("exe", "js")),
        (b'blocked_extensions = ["js"]\nmode = "replace"', ("js",)),
        (b'mode = "replace"', ()),
    ],
)
def test_extend_or_replace(attachments: bytes, expected: tuple[str, ...]) -> None:
    rules = validate_bundle(bundle({"attachments.toml": attachments}))
    assert rules.attachments is not None
    assert rules.attachments.apply(("exe",)) == expected


def _tamper(files: dict[str, bytes]) -> dict[str, bytes]:
    return {**files, "attachments.toml": files["attachments.toml"] + b"# changed\n"}


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({}, "no manifest.json"),
        ({MANIFEST: b"{not json"}, "not JSON"),
        ({MANIFEST: b"[]"}, "not a JSON object"),
        (_tamper(bundle({"attachments.toml": ATTACHMENTS})), "SHA-256 is"),
        ({**bundle({"attachments.toml": ATTACHMENTS}), "extra.toml": b""}, "extra.toml not listed"),
        (
            {MANIFEST: bundle({"attachments.toml": ATTACHMENTS})[MANIFEST]},
            "attachments.toml listed in manifest.json but missing",
        ),
        (bundle({"attachments.toml": ATTACHMENTS}, format=2), "format 2 is newer"),
        (bundle({"attachments.toml": ATTACHMENTS}, format="1"), "format must be a positive integer"),
        (bundle({"attachments.toml": ATTACHMENTS}, version="../x"), "version '../x' is not like"),
        (bundle({"attachments.toml": ATTACHMENTS}, version=""), "is not like"),
        (bundle({"attachments.toml": ATTACHMENTS}, signer="me"), "unknown keys signer"),
        (bundle({"spam.cf": b"x"}), "unknown rule file 'spam.cf'"),
        (bundle({}), "files must map"),
        (bundle({"attachments.toml": b"blocked_extensions = ["}), "attachments.toml: is not valid TOML"),
        (bundle({"attachments.toml": b"\xff"}), "is not UTF-8"),
        (bundle({"attachments.toml": b'blocked_extensions = "exe"'}), "must be a list"),
        (bundle({"attachments.toml": b'blocked_extensions = ["a b"]'}), "'a b' is not a file name extension"),
        (bundle({"attachments.toml": b"blocked_extensions = [1]"}), "1 is not a file name extension"),
        (bundle({"attachments.toml": b'mode = "merge"'}), "mode 'merge' is not 'extend' or 'replace'"),
        (bundle({"attachments.toml": b'allowed_extensions = ["pdf"]'}), "unknown keys allowed_extensions"),
    ],
)
def test_refused(files: dict[str, bytes], error: str) -> None:
    with pytest.raises(RulesError, match=error.replace("(", r"\(").replace("[", r"\[")):
        validate_bundle(files)


def test_a_bad_digest_in_the_manifest() -> None:
    files = bundle({"attachments.toml": ATTACHMENTS})
    doc = json.loads(files[MANIFEST])
    doc["files"]["attachments.toml"] = "ABC"
    with pytest.raises(RulesError, match="is not a SHA-256"):
        validate_bundle({**files, MANIFEST: json.dumps(doc).encode()})


def test_load_rules_reads_what_the_manifest_lists(tmp_path: Path) -> None:
    for name, data in bundle({"attachments.toml": ATTACHMENTS}, "7").items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "notes.txt").write_text("not part of the bundle")
    assert load_rules(tmp_path).version == "7"


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        (lambda d: None, "manifest.json: no such file"),
        (
            lambda d: (d / MANIFEST).write_bytes(bundle({"attachments.toml": ATTACHMENTS})[MANIFEST]),
            "toml: no such file",
        ),
        (lambda d: (d / MANIFEST).write_bytes(b"x" * (5 * 1024 * 1024)), "larger than"),
    ],
)
def test_load_rules_refuses(tmp_path: Path, setup: object, error: str) -> None:
    setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(RulesError, match=error):
        load_rules(tmp_path)


def test_load_rules_never_reads_outside_the_directory(tmp_path: Path) -> None:
    inner = tmp_path / "bundle"
    inner.mkdir()
    (tmp_path / "secret.toml").write_text("x")
    doc = {"format": 1, "version": "1", "files": {"../secret.toml": "0" * 64}}
    (inner / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(RulesError, match="unknown rule file"):
        load_rules(inner)


@pytest.mark.parametrize(
    ("older", "newer"),
    [("1.9", "1.10"), ("2026.11.27-1", "2026.11.27-2"), ("1", "2"), ("1.0", "1.0.1"), ("9", "10"), ("1a", "1b")],
)
def test_version_order(older: str, newer: str) -> None:
    assert version_key(older) < version_key(newer)

"""smtpgw rule bundles: the format the scanner's lists travel in, and the one
function that validates them.

The updater fetches a bundle, checks its signature and installs it; the
scanner loads the installed bundle. Both judge its content with
`validate_bundle` (the scanner through `load_rules`), so a bundle the
updater accepts is one every scanner can load, and a scanner never runs on
rules the updater would have refused.

A bundle is a set of flat files (a tar.gz on the wire, a directory once
installed):

    manifest.json     {"format": 1, "version": "2026.11.27-1", "created": "2026-11-27T12:00:00Z",
                       "files": {"attachments.toml": "<sha256 hex>"}}
    manifest.sig      base64 Ed25519 signature of manifest.json (checked by the updater only)
    attachments.toml  blocked_extensions = ["js", "jar"]
                      mode = "extend"        # or "replace" the [scanner] list

Every file but the signature is listed in the manifest with its SHA-256, so
the signature of the manifest covers them all. `RULE_FILES` names the rule
files this version understands; a bundle with another (content-filter lists
and spam rules are meant to come this way) or a newer `format` is refused
rather than half applied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from shared.errors import GatewayError

# Transport events (shared.transport publish_event/subscribe_events) between the updater and the scanners.
RULES_UPDATED = "rules.updated"  # updater -> scanners: {"version": the bundle now installed ("" for none)}
RULES_LOADED = "rules.loaded"  # scanner -> updater: {"requested", "version", "ok", "error", "scanner"}

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = 1
MAX_FILE_SIZE = 4 * 1024 * 1024  # rule lists are small; anything bigger is not one

_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+-]{0,63}")
_FILE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.[a-z0-9]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXTENSION = re.compile(r"[a-z0-9][a-z0-9_+-]{0,31}")


class RulesError(GatewayError):
    """A rule bundle is malformed, incomplete, or not what its manifest says."""


@dataclass(frozen=True, slots=True)
class Manifest:
    format: int
    version: str
    created: str
    files: Mapping[str, str]  # file name -> SHA-256 hex


@dataclass(frozen=True, slots=True)
class AttachmentRules:
    """attachments.toml: extensions to block, added to `[scanner].blocked_extensions` or replacing it."""

    blocked_extensions: tuple[str, ...] = ()
    mode: str = "extend"

    def apply(self, configured: Sequence[str]) -> tuple[str, ...]:
        if self.mode == "replace":
            return self.blocked_extensions
        return tuple(dict.fromkeys([*configured, *self.blocked_extensions]))


@dataclass(frozen=True, slots=True)
class Rules:
    """The rules of one bundle; `Rules()` is "no bundle": the configuration alone."""

    version: str = ""
    created: str = ""
    attachments: AttachmentRules | None = None


# ---------------------------------------------------------------- validation


def validate_bundle(files: Mapping[str, bytes]) -> Rules:
    """Bundle files (name -> bytes; the signature may be among them) -> Rules, or RulesError.

    Checks that the manifest is well formed, that the files are exactly the
    ones it lists with the SHA-256 it gives, and that every rule file parses
    and makes sense.
    """
    if MANIFEST not in files:
        raise RulesError(f"no {MANIFEST}")
    manifest = parse_manifest(files[MANIFEST])
    present = set(files) - {MANIFEST, SIGNATURE}
    missing = sorted(set(manifest.files) - present)
    extra = sorted(present - set(manifest.files))
    if missing:
        raise RulesError(f"{', '.join(missing)} listed in {MANIFEST} but missing")
    if extra:
        raise RulesError(f"{', '.join(extra)} not listed in {MANIFEST}")
    for name, digest in manifest.files.items():
        actual = hashlib.sha256(files[name]).hexdigest()
        if actual != digest:
            raise RulesError(f"{name}: SHA-256 is {actual}, {MANIFEST} says {digest}")
    parsed: dict[str, Any] = {}
    for name in sorted(manifest.files):
        field, parse = RULE_FILES[name]
        try:
            parsed[field] = parse(files[name])
        except RulesError as exc:
            raise RulesError(f"{name}: {exc}") from None
    return Rules(manifest.version, manifest.created, **parsed)


def parse_manifest(data: bytes) -> Manifest:
    if len(data) > MAX_FILE_SIZE:
        raise RulesError(f"{MANIFEST} is larger than {MAX_FILE_SIZE} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RulesError(f"{MANIFEST} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RulesError(f"{MANIFEST} is not a JSON object")
    unknown = sorted(set(doc) - {"format", "version", "created", "files"})
    if unknown:
        raise RulesError(f"{MANIFEST}: unknown keys {', '.join(unknown)}")
    fmt = doc.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise RulesError(f"{MANIFEST}: format must be a positive integer")
    if fmt > FORMAT:
        raise RulesError(f"bundle format {fmt} is newer than this smtpgw understands ({FORMAT})")
    version = doc.get("version")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise RulesError(f"{MANIFEST}: version {version!r} is not like '2026.11.27-1' (letters, digits, . _ + -)")
    created = doc.get("created", "")
    if not isinstance(created, str):
        raise RulesError(f"{MANIFEST}: created must be a string")
    listed = doc.get("files")
    if not isinstance(listed, dict) or not listed:
        raise RulesError(f"{MANIFEST}: files must map each rule file to its SHA-256")
    for name, digest in listed.items():
        if name not in RULE_FILES:
            known = ", ".join(RULE_FILES)
            raise RulesError(f"{MANIFEST}: unknown rule file {name!r} (this smtpgw understands {known})")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise RulesError(f"{MANIFEST}: {name}: {digest!r} is not a SHA-256 in lower-case hex")
    return Manifest(fmt, version, created, MappingProxyType(dict(listed)))


def _parse_attachments(data: bytes) -> AttachmentRules:
    doc = _toml(data)
    unknown = sorted(set(doc) - {"blocked_extensions", "mode"})
    if unknown:
        raise RulesError(f"unknown keys {', '.join(unknown)} (known: blocked_extensions, mode)")
    mode = doc.get("mode", "extend")
    if mode not in ("extend", "replace"):
        raise RulesError(f"mode {mode!r} is not 'extend' or 'replace'")
    raw = doc.get("blocked_extensions", [])
    if not isinstance(raw, list):
        raise RulesError("blocked_extensions must be a list of extensions")
    extensions = []
    for item in raw:
        ext = item.strip().lower().lstrip(".") if isinstance(item, str) else None
        if ext is None or not _EXTENSION.fullmatch(ext):
            raise RulesError(f"blocked_extensions: {item!r} is not a file name extension like 'exe'")
        extensions.append(ext)
    return AttachmentRules(tuple(dict.fromkeys(extensions)), mode)


def _toml(data: bytes) -> dict[str, Any]:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RulesError("is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"is not valid TOML: {exc}") from None


# Rule file name -> (field of Rules, parser). Content-filter lists and spam rules get their entry here.
RULE_FILES: Mapping[str, tuple[str, Callable[[bytes], Any]]] = MappingProxyType({
    "attachments.toml": ("attachments", _parse_attachments),
})  # fmt: skip


# ---------------------------------------------------------------- installed bundles


def read_bundle_dir(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """The files of an installed bundle: the manifest, the signature if any, and the files the
    manifest lists. Other files in the directory are not part of the bundle."""
    files = {MANIFEST: _read(directory, MANIFEST)}
    # No signature: an unsigned bundle the updater was allowed to accept.
    with contextlib.suppress(RulesError):
        files[SIGNATURE] = _read(directory, SIGNATURE)
    try:
        listed = json.loads(files[MANIFEST]).get("files", {})
    except (ValueError, AttributeError):
        listed = {}  # validate_bundle says what is wrong with it
    for name in listed if isinstance(listed, dict) else ():
        if isinstance(name, str) and _FILE_NAME.fullmatch(name):
            files[name] = _read(directory, name)
    return files


def load_rules(directory: str | os.PathLike[str]) -> Rules:
    """Load and validate the bundle installed in `directory`. Raises RulesError."""
    return validate_bundle(read_bundle_dir(directory))


def _read(directory: str | os.PathLike[str], name: str) -> bytes:
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise RulesError(f"{path}: no such file") from None
    except OSError as exc:
        raise RulesError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_FILE_SIZE:
        raise RulesError(f"{path} is larger than {MAX_FILE_SIZE} bytes")
    return data


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for bundle versions: digit runs compare as numbers ("1.10" > "1.9")."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|[^\d]+", version))

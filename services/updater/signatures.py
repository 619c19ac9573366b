"""ClamAV signatures: fetch, verify, activate, roll back.

One update of the signature set, in separate steps:

1. stage    a new directory beside the versions, holding the active set's
            files (so files put there by hand, and freshclam's state, carry
            over), the files of `signature_urls` fetched anew, and whatever
            freshclam brings; files fetched from a URL no longer configured
            are left out;
2. compare  nothing new (same files, same contents) ends the update here;
            so does a set that was rolled back by hand (`withdrawn`);
3. verify   a version marker is added, and a throw-away clamscan must load
            the set, detect EICAR, the marker and the configured canaries,
            and pass the clean samples (canary.py);
4. activate the symlink is swapped (versions.py), every clamd is told to
            RELOAD and must prove it loaded this very set (clamds.py);
5. roll back when a clamd does not confirm: the previous version is put
            back and reloaded, and the failed one removed.

Nothing before step 4 touches what clamd loads, so a download that fails, a
truncated or corrupted file, or a set that misses a canary changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from services.updater.canary import CLEAN_SAMPLES, EICAR, Canary, check_canaries, load_canaries
from services.updater.clamds import MARKER_FILE, Marker, confirm_reload
from services.updater.errors import ActivationError, FetchError, UpdateError, VerificationError
from services.updater.fetch import Fetcher
from services.updater.freshclam import run_freshclam
from services.updater.state import Outcome, Result
from services.updater.versions import VersionStore
from shared.clamd import ClamdClient
from shared.config import CLAMAV_DB_EXTENSIONS, UpdaterConfig

log = logging.getLogger(__name__)

COMPONENT = "signatures"
METADATA_FILE = "smtpgw-version.json"
LOCAL = "local"  # a file of unknown origin: put there by hand or by scripts/clamd.sh; carried over
FRESHCLAM = "freshclam"


@dataclass(frozen=True, slots=True)
class SetInfo:
    """What the updater knows about one signature set (its smtpgw-version.json)."""

    version: str
    digest: str
    created: float = 0.0
    signatures: int | None = None
    sources: dict[str, str] = field(default_factory=dict)  # file name -> URL, "freshclam" or "local"
    marker: Marker | None = None


def read_info(directory: Path) -> SetInfo:
    """The set's metadata; for a set the updater did not build, what its files tell."""
    marker = None
    with contextlib.suppress(OSError):
        marker = Marker.parse((directory / MARKER_FILE).read_text(encoding="ascii"))
    try:
        doc = json.loads((directory / METADATA_FILE).read_text(encoding="utf-8"))
        return SetInfo(
            str(doc["version"]),
            str(doc["digest"]),
            float(doc.get("created", 0)),
            int(doc["signatures"]) if doc.get("signatures") is not None else None,
            {str(k): str(v) for k, v in doc.get("sources", {}).items()},
            marker,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return SetInfo(directory.name, set_digest(directory), marker=marker)


def set_digest(directory: Path) -> str:
    """SHA-256 over the names and contents of the set's database files: equal digests, equal sets."""
    total = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = directory / name
        if name == MARKER_FILE or not _is_database(name) or not path.is_file():
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1024 * 1024):
                digest.update(chunk)
        total.update(f"{name}\0{digest.hexdigest()}\n".encode())
    return total.hexdigest()


def _is_database(name: str) -> bool:
    return not name.startswith(".") and name.rpartition(".")[2].lower() in CLAMAV_DB_EXTENSIONS


class SignatureSet:
    """The signature set clamd loads from `[updater].database_dir`."""

    component = COMPONENT

    def __init__(
        self,
        config: UpdaterConfig,
        fetcher: Fetcher,
        clamds: Sequence[ClamdClient],
        *,
        clamscan: str = "clamscan",
        freshclam: str = "freshclam",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._fetcher = fetcher
        self._clamds = list(clamds)
        self._clamscan = clamscan
        self._freshclam = freshclam
        self._clock = clock
        self.store = VersionStore(config.database_dir, clock)

    def configured(self) -> bool:
        return bool(self._config.signature_urls or self._config.freshclam)

    def active(self) -> SetInfo | None:
        directory = self.store.active_dir()
        return read_info(directory) if directory is not None else None

    # ------------------------------------------------------------ update

    def update(self, withdrawn: Sequence[str] = ()) -> Outcome:
        """One update; never raises for what an update can meet (see Result)."""
        if not self.configured():
            return Outcome(COMPONENT, Result.SKIPPED, detail="no signature_urls and freshclam off")
        source = self.store.active_dir()
        current = read_info(source) if source is not None else None
        in_force = current.version if current else ""
        try:
            staging = self.store.staging()
        except OSError as exc:
            return Outcome(COMPONENT, Result.FAILED, in_force, f"cannot create a staging directory: {exc}")
        try:
            sources = self._stage(staging, source, current)
            digest = set_digest(staging)
            if current is not None and digest == current.digest:
                self.store.discard(staging)
                return Outcome(COMPONENT, Result.UNCHANGED, in_force, "no new signatures")
            if digest in withdrawn:
                self.store.discard(staging)
                return Outcome(COMPONENT, Result.UNCHANGED, in_force, "only a set that was rolled back is on offer")
            name = self.store.new_name(digest[:8])
            marker = Marker.new(name)
            (staging / MARKER_FILE).write_text(marker.ndb(), encoding="ascii")
            report = check_canaries(
                staging,
                [Canary("EICAR", EICAR), Canary("version marker", marker.probe, marker.signature),
                 *load_canaries(self._config.canaries_dir)],
                [*CLEAN_SAMPLES, *load_canaries(self._config.clean_canaries_dir)],
                clamscan=self._clamscan,
            )  # fmt: skip
            count = max(0, report.signatures - 1)  # the marker is not a signature anyone asked for
            info = SetInfo(name, digest, self._clock(), count, sources, marker)
            _write_metadata(staging / METADATA_FILE, info)
            self.store.commit(staging, name)
        except FetchError as exc:
            self.store.discard(staging)
            return Outcome(COMPONENT, Result.FAILED, in_force, str(exc))
        except VerificationError as exc:
            self.store.discard(staging)
            return Outcome(COMPONENT, Result.REFUSED, in_force, str(exc))
        except OSError as exc:
            self.store.discard(staging)
            return Outcome(COMPONENT, Result.FAILED, in_force, f"cannot build the new signature set: {exc}")
        return self._activate(info, current)

    def _stage(self, staging: Path, source: Path | None, current: SetInfo | None) -> dict[str, str]:
        """Fill `staging`; returns where each file came from."""
        by_name = {urlsplit(url).path.rsplit("/", 1)[-1]: url for url in self._config.signature_urls}
        sources: dict[str, str] = {}
        if source is not None and current is not None:
            # Hard links cost nothing and are safe: nothing rewrites a file in place, a fetched file
            # replaces its name by rename. freshclam may patch files, so with it, copies.
            link = not self._config.freshclam
            for entry in os.scandir(source):
                if entry.name in (MARKER_FILE, METADATA_FILE) or entry.name.startswith(".") or not entry.is_file():
                    continue
                origin = current.sources.get(entry.name, LOCAL)
                if "://" in origin and by_name.get(entry.name) != origin:
                    continue  # fetched from a URL that is no longer configured
                _copy(entry.path, staging / entry.name, link)
                sources[entry.name] = origin
        for name, url in by_name.items():
            self._fetcher.fetch_to(url, str(staging / name))
            sources[name] = url
        if self._config.freshclam:
            tail = run_freshclam(
                staging,
                self._config.freshclam_config,
                self._config.state_dir,
                official=self._config.freshclam_official,
                binary=self._freshclam,
                timeout=10 * self._config.timeout,
            )
            log.info("freshclam: %s", tail)
            for name in os.listdir(staging):
                if _is_database(name) and name not in sources:
                    sources[name] = FRESHCLAM
        return sources

    def _activate(self, info: SetInfo, current: SetInfo | None) -> Outcome:
        try:
            previous = self.store.activate(info.version)
        except OSError as exc:
            self.store.remove(info.version)
            in_force = current.version if current else ""
            return Outcome(COMPONENT, Result.FAILED, in_force, f"cannot switch to the new set: {exc}")
        try:
            versions = confirm_reload(self._clamds, info.marker, current.marker if current else None, self._timeout)
        except ActivationError as exc:
            restored = self._restore(previous, info)
            return Outcome(COMPONENT, Result.ROLLED_BACK, previous or "", f"{exc}; {restored}")
        log.info("signatures %s active; clamd: %s", info.version, ", ".join(f"{a} {v}" for a, v in versions.items()))
        self.store.prune(self._config.keep_versions)
        return Outcome(COMPONENT, Result.ACTIVATED, info.version, f"{info.signatures} signatures")

    def _restore(self, previous: str | None, failed: SetInfo) -> str:
        """Put `previous` back after `failed` could not be activated; says how that went."""
        if previous is None:
            with contextlib.suppress(OSError):
                os.unlink(self.store.path)
            self.store.remove(failed.version)
            return "there was no previous version to restore"
        self.store.activate(previous)
        self.store.remove(failed.version)
        marker = read_info(self.store.root / previous).marker
        try:
            confirm_reload(self._clamds, marker, failed.marker, self._timeout)
        except ActivationError as exc:
            # The link is back: any clamd that (re)starts or reloads loads the previous version.
            return f"{previous} restored, but not yet confirmed: {exc}"
        return f"{previous} restored"

    @property
    def _timeout(self) -> float:
        return self._config.reload_timeout

    # ------------------------------------------------------------ rollback

    def rollback(self) -> tuple[Outcome, str]:
        """Go back to the previous version by hand. Returns the outcome and the digest of the set
        left, which the caller withdraws so that no scheduled update installs it again."""
        active = self.store.active()
        previous = self.store.previous()
        if active is None or previous is None:
            raise UpdateError("no previous signature set to roll back to")
        leaving = read_info(self.store.root / active)
        self.store.activate(previous)
        target = read_info(self.store.root / previous)
        try:
            confirm_reload(self._clamds, target.marker, leaving.marker, self._timeout)
        except ActivationError as exc:
            self.store.activate(active)
            with contextlib.suppress(ActivationError):
                confirm_reload(self._clamds, leaving.marker, target.marker, self._timeout)
            raise ActivationError(f"rollback to {previous} failed, {active} stays: {exc}") from None
        return Outcome(COMPONENT, Result.ROLLED_BACK, previous, f"rolled back from {active}"), leaving.digest


def _copy(src: str, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    shutil.copy2(src, dst)


def _write_metadata(path: Path, info: SetInfo) -> None:
    doc = {
        "version": info.version,
        "digest": info.digest,
        "created": info.created,
        "signatures": info.signatures,
        "sources": info.sources,
        "marker": info.marker.signature if info.marker else None,
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")

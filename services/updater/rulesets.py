"""smtpgw rule bundles: fetch, verify, install, announce, roll back.

One update of the rules, in separate steps:

1. fetch     the bundle at `bundle_url` (fetch.py);
2. verify    unpack it without extracting anything (bundle.py), check its
             Ed25519 signature against `bundle_public_keys`, its manifest's
             SHA-256 sums and every rule file (`shared.rules.validate_bundle`,
             the scanner's own validation); a version that is not newer than
             the active one is not installed (an old signed bundle replayed
             by a mirror must not downgrade the rules);
3. install   write it to a staging directory and load it from there with
             `shared.rules.load_rules`, exactly as a scanner will;
4. activate  swap the `[scanner].rules_dir` symlink (versions.py) and
             announce "rules.updated"; scanners reload, keeping their old
             rules if the new ones fail there, and say so ("rules.loaded");
5. roll back when any scanner reports that it could not load the bundle:
             the previous version is put back and announced again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence

from services.updater.bundle import check_signature, unpack_bundle
from services.updater.errors import ActivationError, FetchError, UpdateError, VerificationError
from services.updater.fetch import Fetcher
from services.updater.state import Outcome, Result
from services.updater.versions import VersionStore
from shared.config import Config
from shared.rules import MANIFEST, Rules, RulesError, load_rules, validate_bundle, version_key

log = logging.getLogger(__name__)

COMPONENT = "rules"

# Announce a version to the scanners; returns the reports of those that could not load it.
Announce = Callable[[str], Sequence[Mapping[str, object]]]


class RuleSet:
    """The rule bundle installed in `[scanner].rules_dir`."""

    component = COMPONENT

    def __init__(
        self, config: Config, fetcher: Fetcher, announce: Announce, clock: Callable[[], float] = time.time
    ) -> None:
        self._config = config.updater
        self._fetcher = fetcher
        self._announce = announce
        self.store = VersionStore(config.scanner.rules_dir, clock) if config.scanner.rules_dir else None

    def configured(self) -> bool:
        return bool(self._config.bundle_url and self.store is not None)

    def active(self) -> Rules | None:
        """The bundle in force, or None (none installed, or unreadable)."""
        directory = self.store.active_dir() if self.store is not None else None
        if directory is None:
            return None
        try:
            return load_rules(directory)
        except RulesError:
            return None

    # ------------------------------------------------------------ update

    def update(self, withdrawn: Sequence[str] = ()) -> Outcome:
        if not self.configured() or self.store is None:
            return Outcome(COMPONENT, Result.SKIPPED, detail="no bundle_url")
        current = self.active()
        in_force = current.version if current else ""
        try:
            files = unpack_bundle(self._fetcher.fetch(self._config.bundle_url))
            vouched = check_signature(files, self._config.bundle_public_keys, self._config.allow_unsigned)
            rules = validate_bundle(files)
        except FetchError as exc:
            return Outcome(COMPONENT, Result.FAILED, in_force, str(exc))
        except (VerificationError, RulesError) as exc:
            return Outcome(COMPONENT, Result.REFUSED, in_force, f"bundle refused: {exc}")
        if current is not None and rules.version == current.version:
            if self._installed_manifest() != files[MANIFEST]:
                detail = (
                    f"bundle refused: version {rules.version} is active with other contents"
                    " (a change needs a new version)"
                )
                return Outcome(COMPONENT, Result.REFUSED, in_force, detail)
            return Outcome(COMPONENT, Result.UNCHANGED, in_force, "no new rules")
        if rules.version in withdrawn:
            return Outcome(COMPONENT, Result.UNCHANGED, in_force, f"version {rules.version} was rolled back; not again")
        if current is not None and version_key(rules.version) < version_key(current.version):
            detail = f"bundle refused: version {rules.version} is older than the active {current.version}"
            return Outcome(COMPONENT, Result.REFUSED, in_force, detail)
        if vouched.startswith("unsigned"):
            log.warning("installing an unsigned rule bundle (allow_unsigned = true): %s", vouched)
        try:
            name = self._install(files, rules)
        except VerificationError as exc:
            return Outcome(COMPONENT, Result.REFUSED, in_force, f"bundle refused: {exc}")
        except OSError as exc:
            return Outcome(COMPONENT, Result.FAILED, in_force, f"cannot install the bundle: {exc}")
        return self._activate(name, rules, in_force, vouched)

    def _installed_manifest(self) -> bytes | None:
        directory = self.store.active_dir() if self.store is not None else None
        try:
            return (directory / MANIFEST).read_bytes() if directory is not None else None
        except OSError:
            return None

    def _install(self, files: Mapping[str, bytes], rules: Rules) -> str:
        """Write the bundle to staging, load it as a scanner will, give it its version name."""
        assert self.store is not None
        staging = self.store.staging()
        try:
            for name, data in files.items():
                (staging / name).write_bytes(data)
            try:
                loaded = load_rules(staging)
            except RulesError as exc:
                raise VerificationError(f"the installed bundle does not load: {exc}") from None
            if loaded != rules:  # pragma: no cover - the same bytes through the same function
                raise VerificationError("the installed bundle loads differently from the one fetched")
            name = self.store.new_name(rules.version)
            self.store.commit(staging, name)
        except BaseException:
            self.store.discard(staging)
            raise
        return name

    def _activate(self, name: str, rules: Rules, in_force: str, vouched: str) -> Outcome:
        assert self.store is not None
        try:
            previous = self.store.activate(name)
        except OSError as exc:
            self.store.remove(name)
            return Outcome(COMPONENT, Result.FAILED, in_force, f"cannot switch to the new bundle: {exc}")
        failures = self._announce(rules.version)
        if failures:
            problem = "; ".join(f"scanner {f.get('scanner', '?')}: {f.get('error', '?')}" for f in failures)
            restored = self._restore(previous, name)
            return Outcome(
                COMPONENT, Result.ROLLED_BACK, in_force, f"{rules.version} failed to load: {problem}; {restored}"
            )
        self.store.prune(self._config.keep_versions)
        return Outcome(COMPONENT, Result.ACTIVATED, rules.version, vouched)

    def _restore(self, previous: str | None, failed: str) -> str:
        assert self.store is not None
        if previous is None:
            with contextlib.suppress(OSError):
                os.unlink(self.store.path)
            restored = "no previous bundle: back to the configured lists"
        else:
            self.store.activate(previous)
            restored = f"{previous} restored"
        self.store.remove(failed)
        back = self.active()
        self._announce(back.version if back else "")
        return restored

    # ------------------------------------------------------------ rollback

    def rollback(self) -> tuple[Outcome, str]:
        """Go back to the previous bundle by hand. Returns the outcome and the bundle version left,
        which the caller withdraws so that no scheduled update installs it again."""
        if self.store is None:
            raise UpdateError("no [scanner] rules_dir: no rule bundles to roll back")
        active = self.store.active()
        previous = self.store.previous()
        leaving = self.active()
        if active is None or previous is None or leaving is None:
            raise UpdateError("no previous rule bundle to roll back to")
        self.store.activate(previous)
        back = self.active()
        if back is None:
            self.store.activate(active)
            raise ActivationError(f"the previous bundle {previous} does not load; {leaving.version} stays")
        failures = self._announce(back.version)
        if failures:
            log.warning("some scanners could not load %s: %s", back.version, failures)
        return Outcome(
            COMPONENT, Result.ROLLED_BACK, back.version, f"rolled back from {leaving.version}"
        ), leaving.version

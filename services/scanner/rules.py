"""The scanner's rules in force: `[scanner]` settings with the active rule bundle applied.

`LiveRules` holds one immutable (rules, settings) pair and replaces it as a
whole, so a worker thread reads the settings for a message in one attribute
load and never sees half of an update. The bundle comes from
`[scanner].rules_dir`, where the updater installs it (a symlink it swaps
atomically), and is judged by `shared.rules.load_rules`, the very function
the updater verified it with.

It is reloaded
- when the updater announces new rules (the "rules.updated" event on the
  transport: in-process in embedded mode, a fanout exchange on RabbitMQ); the
  scanner answers with "rules.loaded", so that the updater can roll back an
  update that some scanner could not load;
- when, looked at no more often than every `check_interval`, the installed
  bundle changed without an announcement reaching this process (an update
  made by `smtpgw update now` in another process over the embedded spool, or
  announced while this process was reconnecting to the broker).

A bundle that fails to load leaves the rules in force untouched: logged,
counted in `smtpgw_scanner_rules_reloads_total{result="failed"}`, reported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.config import ScannerConfig
from shared.errors import GatewayError
from shared.logging import event
from shared.metrics import SCANNER_RULES_RELOADS, SCANNER_RULES_VERSION
from shared.rules import MANIFEST, RULES_LOADED, RULES_UPDATED, Rules, RulesError, load_rules
from shared.transport import EventCallback

log = logging.getLogger(__name__)

CHECK_INTERVAL = 5.0

Stamp = tuple[int, int, int] | None  # (st_dev, st_ino, st_mtime_ns) of the installed manifest


def apply_rules(rules: Rules, settings: ScannerConfig) -> ScannerConfig:
    """`[scanner]` settings with `rules` applied (pure)."""
    if rules.attachments is None:
        return settings
    return dataclasses.replace(settings, blocked_extensions=rules.attachments.apply(settings.blocked_extensions))


@dataclass(frozen=True, slots=True)
class Reload:
    """What one reload did: `ok` false means the rules in force stayed, `error` says why."""

    ok: bool
    changed: bool
    version: str  # the version in force afterwards ("" for the configuration alone)
    error: str = ""


@dataclass(frozen=True, slots=True)
class _Active:
    rules: Rules
    settings: ScannerConfig
    stamp: Stamp


class LiveRules:
    """The rules in force for this scanner process. Thread-safe."""

    def __init__(
        self,
        settings: ScannerConfig,
        *,
        check_interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = settings
        self._dir = settings.rules_dir
        self._interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._active = _Active(Rules(), settings, None)
        self._rejected: Stamp = None  # the installed bundle that failed to load, not retried until it changes
        self._checked = clock()
        _show_version("")
        if self._dir:
            self.reload()

    @property
    def rules(self) -> Rules:
        return self._active.rules

    def settings(self) -> ScannerConfig:
        """The settings for one message. Cheap: at most every `check_interval` one stat() looks
        whether the installed bundle changed, and only then is it loaded."""
        active = self._active
        if self._dir and self._clock() - self._checked >= self._interval:
            self._checked = self._clock()
            stamp = _stamp(self._dir)
            if stamp not in (active.stamp, self._rejected) and self._lock.acquire(blocking=False):
                # Other workers go on with the rules in force meanwhile.
                try:
                    self._reload_locked()
                finally:
                    self._lock.release()
                active = self._active
        return active.settings

    def reload(self) -> Reload:
        """Load the installed bundle and put it in force; on failure keep the rules in force."""
        with self._lock:
            return self._reload_locked()

    def _reload_locked(self) -> Reload:
        current = self._active
        stamp = _stamp(self._dir)  # before loading: a swap in between means one more reload, never a missed one
        try:
            rules = load_rules(self._dir)
        except RulesError as exc:
            self._rejected = stamp
            SCANNER_RULES_RELOADS.labels("failed").inc()
            in_force = current.rules.version or "the configured lists only"
            event(log, "rule bundle not loaded; the rules in force stay", logging.WARNING, rules_dir=self._dir,
                  error=str(exc), in_force=in_force)  # fmt: skip
            return Reload(False, False, current.rules.version, str(exc))
        self._rejected = None
        if rules == current.rules:
            self._active = dataclasses.replace(current, stamp=stamp)
            SCANNER_RULES_RELOADS.labels("unchanged").inc()
            return Reload(True, False, rules.version)
        self._active = _Active(rules, apply_rules(rules, self._base), stamp)
        SCANNER_RULES_RELOADS.labels("loaded").inc()
        _show_version(rules.version)
        event(log, "rule bundle loaded", rules_version=rules.version, previous=current.rules.version or "-")
        return Reload(True, True, rules.version)

    def subscriber(self, publish: Callable[[str, Mapping[str, object]], None]) -> EventCallback:
        """The transport event callback: reload on "rules.updated", answer with "rules.loaded"."""
        scanner = f"{socket.gethostname()}:{os.getpid()}"

        def on_event(name: str, data: Mapping[str, Any]) -> None:
            if name != RULES_UPDATED or not self._dir:
                return
            result = self.reload()
            report = {
                "requested": str(data.get("version", "")),
                "version": result.version,
                "ok": result.ok,
                "error": result.error,
                "scanner": scanner,
            }
            try:
                publish(RULES_LOADED, report)
            except GatewayError as exc:
                log.warning("could not report the rules reload to the updater: %s", exc)

        return on_event


def _stamp(directory: str) -> Stamp:
    try:
        st = os.stat(os.path.join(directory, MANIFEST))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def _show_version(version: str) -> None:
    SCANNER_RULES_VERSION.clear()
    SCANNER_RULES_VERSION.labels(version or "config").set(1)

"""The updater service: wiring, the schedule, status.

`Updater` runs one update of each component (signatures.py, rulesets.py)
under the update lock, records the outcomes (state.py) and counts them;
`start()` runs updates on the schedule (at start-up, then every `interval`
plus up to `jitter`) in a thread until `close()`. `rollback()` goes back one
version by hand and withdraws the version it left, so that the schedule does
not install it again. `read_status` and `format_status` are what
`smtpgw update status` and the metrics collector show.

One canonical log line per component and run:

    update component=signatures result=activated version=20261127T130000Z-5e1f0c2a detail="4 signatures"
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from services.updater.errors import UpdateError
from services.updater.fetch import Fetcher
from services.updater.rulesets import RuleSet
from services.updater.signatures import SignatureSet, read_info
from services.updater.state import COMPONENTS, Outcome, Result, load_state, save_state, update_lock
from services.updater.versions import VersionStore
from shared.clamd import ClamdClient
from shared.config import Config
from shared.errors import GatewayError
from shared.logging import event
from shared.metrics import UPDATER_RUNS, UpdaterCollector
from shared.rules import RULES_LOADED, RULES_UPDATED, RulesError, load_rules
from shared.transport import Transport

log = logging.getLogger(__name__)

# Longest wait for another update (scheduled, or by hand) to finish before giving up.
LOCK_TIMEOUT = 30 * 60.0


def next_delay(interval: float, jitter: float, draw: Callable[[], float] = random.random) -> float:
    """Seconds until the next scheduled update: the interval plus a random share of the jitter."""
    return interval + jitter * draw()


class Component(Protocol):
    component: str

    def configured(self) -> bool: ...
    def update(self, withdrawn: Sequence[str] = ()) -> Outcome: ...
    def rollback(self) -> tuple[Outcome, str]: ...


class Announcer:
    """Tells the scanners about new rules over the transport and hears their reports."""

    def __init__(self, transport: Transport | None, window: float) -> None:
        self._transport = transport
        self._window = window
        self._reports: list[Mapping[str, Any]] = []
        self._lock = threading.Lock()
        if transport is not None:
            transport.subscribe_events(self._on_event)

    def _on_event(self, name: str, data: Mapping[str, Any]) -> None:
        if name == RULES_LOADED:
            with self._lock:
                self._reports.append(dict(data))

    def __call__(self, version: str) -> list[Mapping[str, Any]]:
        """Announce `version`; returns the reports of scanners that failed to load it."""
        if self._transport is None:
            return []
        with self._lock:
            self._reports.clear()
        try:
            self._transport.publish_event(RULES_UPDATED, {"version": version})
        except GatewayError as exc:
            # Scanners also notice a new bundle on their own within seconds (services/scanner/rules.py).
            log.warning("could not announce rules %s: %s", version, exc)
            return []
        # The in-process transport calls every subscriber before publish_event returns; over
        # RabbitMQ the reports come back asynchronously, within the window.
        if type(self._transport).publish_event is not Transport.publish_event:
            time.sleep(self._window)
        with self._lock:
            return [r for r in self._reports if r.get("requested") == version and not r.get("ok")]


class Updater:
    """Updates the signatures and the rules; thread-safe through the update lock."""

    def __init__(
        self,
        config: Config,
        transport: Transport | None = None,
        *,
        fetcher: Fetcher | None = None,
        clamds: Sequence[ClamdClient] | None = None,
        clamscan: str = "clamscan",
        freshclam: str = "freshclam",
        clock: Callable[[], float] = time.time,
    ) -> None:
        u = config.updater
        self._config = config
        self._clock = clock
        fetcher = fetcher or Fetcher(u.timeout, u.retries, u.retry_wait, u.max_download_size)
        if clamds is None:
            clamds = [ClamdClient(address, u.timeout) for address in (u.clamd or (config.scanner.clamd,))]
        self.signatures = SignatureSet(u, fetcher, clamds, clamscan=clamscan, freshclam=freshclam, clock=clock)
        self.rules = RuleSet(config, fetcher, Announcer(transport, u.report_window), clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def components(self) -> tuple[Component, ...]:
        return (self.signatures, self.rules)

    def update_now(self) -> list[Outcome]:
        """One update of every component. Raises UpdateError only when the lock cannot be had."""
        u = self._config.updater
        if not any(c.configured() for c in self.components):
            return [c.update() for c in self.components]  # all skipped; no lock, no state to keep
        with update_lock(u.state_dir, LOCK_TIMEOUT):
            state = load_state(u.state_dir)
            outcomes = []
            for component in self.components:
                try:
                    outcome = component.update(state.get(component.component).withdrawn)
                except Exception as exc:
                    # Whatever went wrong, the update is over and the gateway keeps what it has.
                    log.exception("update of %s failed unexpectedly", component.component)
                    outcome = Outcome(component.component, Result.FAILED, detail=f"unexpected error: {exc!r}")
                outcomes.append(outcome)
                state = state.record(outcome, self._clock())
                _count(outcome)
            save_state(u.state_dir, state)
        return outcomes

    def rollback(self, components: Sequence[str] = COMPONENTS) -> list[Outcome]:
        """Go back one version of each named component that has one. Raises UpdateError when none has."""
        u = self._config.updater
        with update_lock(u.state_dir, LOCK_TIMEOUT):
            state = load_state(u.state_dir)
            outcomes, problems = [], []
            for component in self.components:
                if component.component not in components:
                    continue
                try:
                    outcome, left = component.rollback()
                except UpdateError as exc:
                    problems.append(f"{component.component}: {exc}")
                    continue
                outcomes.append(outcome)
                state = state.withdraw(component.component, left).record(outcome, self._clock())
                _count(outcome)
            save_state(u.state_dir, state)
        if not outcomes:
            raise UpdateError("; ".join(problems) or "nothing to roll back")
        return outcomes

    # ------------------------------------------------------------ schedule

    def start(self) -> None:
        """Update now, then every interval (plus jitter), in a thread, until close()."""
        if not any(c.configured() for c in self.components):
            log.info("updater: nothing to update (no signature_urls, freshclam off, no bundle_url)")
            return
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        u = self._config.updater
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                self.update_now()
            except Exception:
                log.exception("update run failed")
            delay = next_delay(u.interval, u.jitter)
            log.info("next update in %.0fs", delay)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def _count(outcome: Outcome) -> None:
    if outcome.result is Result.SKIPPED:
        return
    UPDATER_RUNS.labels(outcome.component, str(outcome.result)).inc()
    level = logging.INFO if outcome.result.ok else logging.WARNING
    event(log, "update", level, component=outcome.component, result=str(outcome.result),
          version=outcome.version or "-", detail=outcome.detail)  # fmt: skip


# ---------------------------------------------------------------- status


def read_status(config: Config, now: float | None = None) -> dict[str, Any]:
    """The updater's state for people and for Prometheus, from the files alone."""
    u = config.updater
    now = time.time() if now is None else now
    state = load_state(u.state_dir)
    components: dict[str, dict[str, Any]] = {}
    signatures_store = VersionStore(u.database_dir)
    signatures_count = None
    if u.signature_urls or u.freshclam:
        active_dir = signatures_store.active_dir()
        info = None
        if active_dir is not None:
            info = read_info(active_dir)
            signatures_count = info.signatures
        components["signatures"] = _component(state.get("signatures"), signatures_store, info.version if info else "")
    if u.bundle_url and config.scanner.rules_dir:
        rules_store = VersionStore(config.scanner.rules_dir)
        rules_dir = rules_store.active_dir()
        version = ""
        if rules_dir is not None:
            try:
                version = load_rules(rules_dir).version
            except RulesError:
                version = "(unreadable)"
        components["rules"] = _component(state.get("rules"), rules_store, version)
    for c in components.values():
        c["overdue"] = now - c["last_success"] > u.max_age
    return {"max_age": u.max_age, "signatures": signatures_count, "components": components, "now": now}


def _component(state: Any, store: VersionStore, version: str) -> dict[str, Any]:
    active = store.active()
    return {
        "version": version,
        "directory": active or "",
        "versions": store.versions(),
        "last_attempt": state.last_attempt,
        "last_success": state.last_success,
        "result": state.result,
        "detail": state.detail,
        "withdrawn": list(state.withdrawn),
    }


def format_status(status: Mapping[str, Any]) -> str:
    lines = []
    if not status["components"]:
        return "nothing to update: no signature_urls, freshclam off and no bundle_url ([updater])"
    for name, c in status["components"].items():
        lines.append(f"{name}:")
        lines.append(f"  active        {c['version'] or '(none)'}")
        others = [v for v in c["versions"] if v != c["directory"]]
        if name == "rules" and c["directory"]:
            lines.append(f"  directory     {c['directory']}")
        if name == "signatures" and status.get("signatures") is not None:
            lines.append(f"  signatures    {status['signatures']}")
        lines.append(f"  kept          {', '.join(others) or '(none)'}")
        lines.append(f"  last attempt  {_when(c['last_attempt'])}  {c['result'] or '-'}")
        if c["detail"]:
            lines.append(f"                {c['detail']}")
        overdue = "  OVERDUE" if c["overdue"] else ""
        lines.append(f"  last success  {_when(c['last_success'])}  (max age {_duration(status['max_age'])}){overdue}")
        if c["withdrawn"]:
            lines.append(f"  withdrawn     {', '.join(c['withdrawn'])}")
    return "\n".join(lines)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "never"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def collector(config: Config) -> UpdaterCollector:
    """The Prometheus collector of the updater's state (registered by `smtpgw run updater`)."""

    def status() -> Mapping[str, Any]:
        return read_status(config)

    return UpdaterCollector(status)

"""The updater's memory: results of the last attempts, and versions withdrawn by rollback.

One JSON file in `[updater].state_dir`, replaced atomically (tmp, fsync,
rename), read by `smtpgw update status` and the metrics collector, so both
say the same whichever process ran the update. Beside it a lock file: one
update at a time per state directory, whether scheduled or run by hand.

Outcomes come from a small closed vocabulary (`Result`), the metric label values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.updater.errors import UpdateError

STATE_FILE = "state.json"
LOCK_FILE = "update.lock"
COMPONENTS = ("signatures", "rules")
MAX_WITHDRAWN = 50


class Result(enum.StrEnum):
    ACTIVATED = "activated"  # a new version is in force
    UNCHANGED = "unchanged"  # nothing new (or only what was withdrawn)
    REFUSED = "refused"  # verification failed; nothing changed
    FAILED = "failed"  # could not fetch or store it; nothing changed
    ROLLED_BACK = "rolled_back"  # activation failed somewhere; the previous version is back
    SKIPPED = "skipped"  # not configured

    @property
    def ok(self) -> bool:
        return self in (Result.ACTIVATED, Result.UNCHANGED, Result.SKIPPED)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one update (or rollback) did to one component."""

    component: str
    result: Result
    version: str = ""  # the version in force afterwards
    detail: str = ""  # why, for people


@dataclass(frozen=True, slots=True)
class ComponentState:
    last_attempt: float = 0.0
    last_success: float = 0.0
    result: str = ""
    detail: str = ""
    withdrawn: tuple[str, ...] = ()  # versions rolled back by hand: not installed again


@dataclass(frozen=True, slots=True)
class State:
    components: dict[str, ComponentState] = field(default_factory=dict)

    def get(self, component: str) -> ComponentState:
        return self.components.get(component, ComponentState())

    def record(self, outcome: Outcome, now: float) -> State:
        """The state after `outcome` (a skipped component keeps its record)."""
        if outcome.result is Result.SKIPPED:
            return self
        before = self.get(outcome.component)
        after = dataclasses.replace(
            before,
            last_attempt=now,
            last_success=now if outcome.result.ok else before.last_success,
            result=str(outcome.result),
            detail=outcome.detail,
        )
        return State({**self.components, outcome.component: after})

    def withdraw(self, component: str, version: str) -> State:
        before = self.get(component)
        withdrawn = (*[v for v in before.withdrawn if v != version], version)[-MAX_WITHDRAWN:]
        return State({**self.components, component: dataclasses.replace(before, withdrawn=withdrawn)})


def load_state(state_dir: str) -> State:
    """The saved state; an empty one when there is none or it is unreadable (it is only memory)."""
    try:
        doc = json.loads((Path(state_dir) / STATE_FILE).read_text(encoding="utf-8"))
        components = {
            name: ComponentState(
                float(c.get("last_attempt", 0)),
                float(c.get("last_success", 0)),
                str(c.get("result", "")),
                str(c.get("detail", "")),
                tuple(str(v) for v in c.get("withdrawn", [])),
            )
            for name, c in doc.get("components", {}).items()
            if name in COMPONENTS
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return State()
    return State(components)


def save_state(state_dir: str, state: State) -> None:
    os.makedirs(state_dir, exist_ok=True)
    doc = {"components": {name: dataclasses.asdict(c) for name, c in state.components.items()}}
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=state_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(state_dir, STATE_FILE))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def update_lock(state_dir: str, timeout: float) -> Iterator[None]:
    """Hold the update lock (flock on state_dir/update.lock), waiting up to `timeout`."""
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UpdateError(f"another update holds {state_dir}/{LOCK_FILE}; try again later") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock

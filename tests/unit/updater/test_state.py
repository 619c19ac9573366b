"""The updater's state file and lock (services/updater/state.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.updater.errors import UpdateError
from services.updater.state import (
    STATE_FILE,
    ComponentState,
    Outcome,
    Result,
    State,
    load_state,
    save_state,
    update_lock,
)


@pytest.mark.parametrize(
    ("result", "ok"),
    [
        (Result.ACTIVATED, True),
        (Result.UNCHANGED, True),
        (Result.SKIPPED, True),
        (Result.REFUSED, False),
        (Result.FAILED, False),
        (Result.ROLLED_BACK, False),
    ],
)
def test_which_results_count_as_success(result: Result, ok: bool) -> None:
    assert result.ok is ok


def test_record() -> None:
    state = State().record(Outcome("signatures", Result.ACTIVATED, "v1", "3 signatures"), 100.0)
    state = state.record(Outcome("signatures", Result.REFUSED, "v1", "canary missed"), 200.0)
    state = state.record(Outcome("rules", Result.SKIPPED), 200.0)
    assert state.get("signatures") == ComponentState(200.0, 100.0, "refused", "canary missed")
    assert "rules" not in state.components


def test_withdraw_keeps_the_last_ones_once() -> None:
    state = State()
    for v in ["a", "b", "a", *[str(i) for i in range(60)]]:
        state = state.withdraw("rules", v)
    withdrawn = state.get("rules").withdrawn
    assert len(withdrawn) == 50
    assert withdrawn[-1] == "59"
    assert len(set(withdrawn)) == len(withdrawn)


def test_save_and_load(tmp_path: Path) -> None:
    state = State().record(Outcome("rules", Result.ACTIVATED, "2"), 5.0).withdraw("rules", "1")
    save_state(str(tmp_path / "state"), state)
    assert load_state(str(tmp_path / "state")) == state
    assert [p.name for p in (tmp_path / "state").iterdir()] == [STATE_FILE]


@pytest.mark.parametrize("content", ["", "{", "[]", '{"components": {"rules": {"last_attempt": "x"}}}'])
def test_an_unreadable_state_is_forgotten(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    assert load_state(str(tmp_path)) == State()


def test_one_update_at_a_time(tmp_path: Path) -> None:
    with (
        update_lock(str(tmp_path), timeout=1),
        pytest.raises(UpdateError, match="another update"),
        update_lock(str(tmp_path), timeout=0),
    ):
        pass
    with update_lock(str(tmp_path), timeout=0):
        pass  # released

"""services.runner: a stop that hangs says where."""

from __future__ import annotations

import time

import pytest

from services.runner import stacks_if_slow


def test_a_slow_block_writes_every_threads_stack(capfd: pytest.CaptureFixture[str]) -> None:
    with stacks_if_slow(0.1):
        time.sleep(0.4)
    err = capfd.readouterr().err
    assert "most recent call first" in err
    assert "test_a_slow_block_writes_every_threads_stack" in err


def test_a_quick_block_writes_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    with stacks_if_slow(0.3):
        pass
    time.sleep(0.5)  # past the deadline: the dump was cancelled, not merely late
    assert capfd.readouterr().err == ""

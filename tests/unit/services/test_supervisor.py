"""services.supervisor: what its readiness says about the children it runs."""

from __future__ import annotations

import sys

from services.supervisor import _Child, _not_running


def test_readiness_names_the_children_that_do_not_run() -> None:
    running = _Child("receiver", [sys.executable, "-c", "import time; time.sleep(30)"], {})
    dead = _Child("scanner", [sys.executable, "-c", "pass"], {})
    never = _Child("delivery", [], {})  # not started yet
    running.start()
    dead.start()
    assert dead.proc is not None
    dead.proc.wait(10)
    try:
        assert _not_running([running, dead, never]) == "not running: scanner, delivery"
        assert _not_running([running]) is None
    finally:
        assert running.proc is not None
        running.proc.kill()
        running.proc.wait()

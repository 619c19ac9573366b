"""Liveness and readiness of a service process, answered on the metrics port beside /metrics.

- `/healthz` (liveness): 200 while every event loop the process watches has run a callback
  within its allowance, 503 naming the stalled ones. A loop blocked by a hung call stops
  answering SMTP or delivering without the process dying; restarting it is the cure.
- `/readyz` (readiness): 200 while every check passes (the broker connected, clamd answering
  for a scanner), 503 with the reasons. Not ready is not dead: the process keeps retrying, and
  an orchestrator only holds new work back from it.

Checks are asked at request time, each at most every CHECK_TTL seconds (an orchestrator and a
load balancer may both poll), and a check that raises counts as failing with what it raised.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

# How often a watched loop beats, and how long it may go without a beat before it counts as stalled.
BEAT = 1.0
LOOP_ALLOWANCE = 30.0
# A readiness check's answer is reused for this long.
CHECK_TTL = 5.0

Check = Callable[[], str | None]  # None when fine, else what is wrong


class Health:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._beats: dict[str, tuple[float, float]] = {}  # name -> (last beat, allowance)
        self._checks: dict[str, Check] = {}
        self._answers: dict[str, tuple[float, str | None]] = {}  # name -> (asked at, answer)

    def watch_loop(self, name: str, loop: asyncio.AbstractEventLoop, allowance: float = LOOP_ALLOWANCE) -> None:
        """Count the process live only while `loop` keeps running its callbacks (from any thread)."""
        self.beat(name, allowance)

        def beat() -> None:
            self.beat(name, allowance)
            loop.call_later(BEAT, beat)

        loop.call_soon_threadsafe(beat)

    def beat(self, name: str, allowance: float) -> None:
        with self._lock:
            self._beats[name] = (self._clock(), allowance)

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def stalled(self) -> list[str]:
        """What keeps the process from being live: the loops that missed their allowance."""
        now = self._clock()
        with self._lock:
            beats = dict(self._beats)
        return [
            f"{name}: no beat for {now - last:.0f}s"
            for name, (last, allowance) in beats.items()
            if now - last > allowance
        ]

    def unready(self) -> list[str]:
        """What keeps the process from being ready: the failing checks and why."""
        return [f"{name}: {answer}" for name in list(self._checks) if (answer := self._ask(name)) is not None]

    def _ask(self, name: str) -> str | None:
        now = self._clock()
        with self._lock:
            asked = self._answers.get(name)
        if asked is not None and now - asked[0] < CHECK_TTL:
            return asked[1]
        try:
            answer = self._checks[name]()
        except Exception as exc:
            answer = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._answers[name] = (now, answer)
        return answer

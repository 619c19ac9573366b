"""The event loop every service runs on: uvloop's.

uvloop runs the loop itself, its sockets, timers and the wake-ups from other
threads in C (libuv), where asyncio's own loop runs them in Python. With
aiosmtpd's line-by-line DATA path that made no difference (the issue that
asked for the chunked reader measured 200-203 msg/s either way); with the
chunked reader (services/receiver/dataread.py) the loop's own work is a
visible share of the receiver and of delivery, and uvloop takes 4.5% off the
instructions a message costs the one-process gateway (`python -m
bench.instructions`: 12.61 M with asyncio's loop, 12.04 M with uvloop).

uvloop's transports implement asyncio's transport methods without being
subclasses of asyncio's transport classes: test for a method, never with
isinstance(transport, asyncio.WriteTransport).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop, not yet set as any thread's current one."""
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a new uvloop loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)

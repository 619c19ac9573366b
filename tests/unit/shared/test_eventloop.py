"""The services' event loop (shared/eventloop.py)."""

from __future__ import annotations

import asyncio

import uvloop

from shared import eventloop


def test_run_returns_the_result_from_a_uvloop_loop() -> None:
    async def running_loop() -> asyncio.AbstractEventLoop:
        await asyncio.sleep(0)
        return asyncio.get_running_loop()

    loop = eventloop.run(running_loop())
    assert isinstance(loop, uvloop.Loop)
    assert loop.is_closed()


def test_new_event_loop_is_a_fresh_uvloop_loop() -> None:
    loop = eventloop.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7
    finally:
        loop.close()


def test_delivery_runs_its_loop_on_uvloop() -> None:
    from services.delivery.app import _LoopThread

    thread = _LoopThread("test-delivery", 1)
    try:

        async def running_loop() -> asyncio.AbstractEventLoop:
            return asyncio.get_running_loop()

        assert isinstance(thread.submit(running_loop(), 10), uvloop.Loop)
    finally:
        thread.stop()

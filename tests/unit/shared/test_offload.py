"""shared.offload: blocking calls on worker threads, results back on the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import operator
import threading
from collections.abc import Awaitable, Callable

import pytest

from shared import eventloop
from shared.offload import Offload

_field: contextvars.ContextVar[str] = contextvars.ContextVar("field", default="")


def run_with(threads: int, body: Callable[[Offload], Awaitable[None]]) -> None:
    async def main() -> None:
        offload = Offload(threads, "test")
        offload.start(asyncio.get_running_loop())
        try:
            await body(offload)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, offload.stop)

    eventloop.run(main())


def test_results_exceptions_and_context() -> None:
    async def body(offload: Offload) -> None:
        loop_thread = threading.get_ident()
        assert await offload.run(lambda: threading.get_ident()) != loop_thread  # not on the loop
        _field.set("queue id 1")
        assert await offload.run(_field.get) == "queue id 1"  # the caller's log context goes along
        with pytest.raises(ZeroDivisionError):
            await offload.run(lambda: 1 // 0)
        assert await offload.run(lambda: 42) == 42  # a failure leaves the threads working

    run_with(2, body)


def test_many_concurrent_calls_all_come_back() -> None:
    async def body(offload: Offload) -> None:
        results = await asyncio.gather(*(offload.run(functools.partial(operator.mul, i, i)) for i in range(500)))
        assert results == [i * i for i in range(500)]

    run_with(4, body)


def test_calls_run_side_by_side() -> None:
    """`threads` calls at once: two calls that each wait for the other finish only together."""
    barrier = threading.Barrier(2, timeout=10)

    async def body(offload: Offload) -> None:
        assert sorted(await asyncio.gather(offload.run(barrier.wait), offload.run(barrier.wait))) == [0, 1]

    run_with(2, body)


def test_a_cancelled_caller_does_not_stop_its_call() -> None:
    """A publish under way finishes though its session went away (it may be durable already)."""
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def call() -> str:
        started.set()
        release.wait(10)
        done.set()
        return "stored"

    async def body(offload: Offload) -> None:
        task = asyncio.ensure_future(offload.run(call))
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await offload.run(lambda: "next") == "next"  # its result was dropped, not delivered
        assert done.is_set()

    run_with(1, body)


def test_stop_finishes_queued_calls() -> None:
    ran: list[int] = []

    async def main() -> None:
        offload = Offload(1, "test")
        offload.start(asyncio.get_running_loop())
        futures = [asyncio.ensure_future(offload.run(functools.partial(ran.append, i))) for i in range(20)]
        await asyncio.sleep(0)  # a yield, not a wait: the calls are queued
        await asyncio.get_running_loop().run_in_executor(None, offload.stop)
        await asyncio.gather(*futures)

    eventloop.run(main())
    assert ran == list(range(20))


def test_calls_queued_when_the_loop_is_gone_still_run() -> None:
    """Delivery stops its loop before its offload: ledger records handed over must still be
    written, more of them than there are threads, though no result can come back."""
    ran: list[int] = []
    gate = threading.Event()

    def record(i: int) -> None:
        gate.wait(10)
        ran.append(i)

    loop = eventloop.new_event_loop()
    offload = Offload(1, "test")  # one thread: the first result finds the loop closed
    offload.start(loop)

    async def hand_over() -> list[asyncio.Future[None]]:
        tasks = [asyncio.ensure_future(offload.run(functools.partial(record, i))) for i in range(10)]
        await asyncio.sleep(0)
        return tasks

    tasks = loop.run_until_complete(hand_over())
    for task in tasks:  # as _LoopThread does when it stops: its tasks are cancelled, then it closes
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()
    gate.set()
    offload.stop()
    assert sorted(ran) == list(range(10))

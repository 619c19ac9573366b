"""Worker threads for an event loop's blocking calls: the receiver's `transport.publish` and
`transport.accepting`, delivery's ledger records.

A publish fsyncs the spool or waits for a broker confirm, and a ledger record
fdatasyncs its journal, so neither may run on the event loop.
`loop.run_in_executor` (or `asyncio.to_thread`) would do, but costs per call a
`concurrent.futures` future chained to an asyncio one, the executor's
thread-count bookkeeping, and one wake-up of the loop (a write to its
self-pipe and an extra pass through epoll) per result. Here a call is one
queue put and one asyncio future; a worker that finishes queues its result
and wakes the loop only if no wake-up is pending already, so results that
finish together (busy times, many sessions) come back in one pass.

Nothing is batched on the way in: each call starts as soon as a thread is
free, and its caller resumes as soon as it returned, so a 250 waits for its
own message's durability and nothing else. With 8 tasks calling at once, a
call cost 13–15 µs of CPU here against 52–57 through `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# One finished call: the caller's future, and what the call returned or raised.
_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]
_Job = tuple["asyncio.Future[Any]", contextvars.Context, Callable[[], Any]]


class Offload:
    """`threads` worker threads running blocking calls for coroutines of one event loop."""

    def __init__(self, threads: int, name: str) -> None:
        self._size = threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done: list[_Outcome] = []
        self._waking = False  # a _deliver is scheduled on the loop and has not run yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for i in range(self._size):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    async def run(self, call: Callable[[], T]) -> T:
        """`call()` on a worker thread, in a copy of this task's context (its log fields).

        If the awaiting task is cancelled, the call still runs to its end (a
        publish under way may already be durable); only its result is dropped.
        """
        assert self._loop is not None, "Offload.start() first"
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((future, contextvars.copy_context(), call))
        return await future

    def stop(self) -> None:
        """Let the calls already queued finish, then end the threads (blocks)."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    # ------------------------------------------------------------ worker side

    def _work(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, context, call = job
            outcome: _Outcome
            try:
                outcome = (future, context.run(call), None)
            except BaseException as exc:  # handed to the awaiting task, as an executor would
                outcome = (future, None, exc)
            with self._lock:
                self._done.append(outcome)
                wake = not self._waking
                self._waking = True
            # A closed loop raises: nobody waits for results any more, but the calls queued
            # behind this one (a publish, a ledger record) must still run, so work goes on.
            if wake:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            done, self._done = self._done, []
            self._waking = False
        for future, result, error in done:
            if future.cancelled():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

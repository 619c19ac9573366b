"""services.receiver.limits: the connection gate and the in-flight DATA budget, in one process and shared."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from services.receiver.limits import ConnectionGate, MemoryBudget, SharedCounters


def test_gate_caps_total_and_per_client() -> None:
    gate = ConnectionGate(max_total=3, max_per_client=2)
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") is None
    assert "your address" in (gate.admit("192.0.2.1") or "")  # third from one client
    assert gate.admit("192.0.2.2") is None
    assert "Too many connections" in (gate.admit("192.0.2.3") or "")  # fourth in total
    assert gate.open == 3  # refused connections are not counted
    gate.leave("192.0.2.1")
    assert gate.admit("192.0.2.3") is None
    assert gate.admit("192.0.2.1") is not None  # total is full again
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        gate.leave(ip)
    assert gate.open == 0
    assert gate.admit("192.0.2.1") is None
    assert gate.admit("192.0.2.1") is None


def test_budget_take_and_give() -> None:
    seen: list[int] = []
    budget = MemoryBudget(100, seen.append)
    assert budget.take(60)
    assert not budget.take(41)  # would exceed: nothing taken
    assert budget.take(40)
    assert budget.in_use == 100
    budget.give(60)
    budget.give(0)
    assert budget.in_use == 40
    assert seen == [60, 100, 40]


@pytest.fixture
def group() -> Iterator[tuple[SharedCounters, SharedCounters]]:
    """The counters of a group of two processes, as each process sees them (slots 0 and 1)."""
    leader = SharedCounters.create(2)
    other = SharedCounters(leader.path, 2, 1)
    yield leader, other
    other.close()
    leader.close(unlink=True)
    assert not os.path.exists(leader.path)


def test_shared_gate_counts_every_process(group: tuple[SharedCounters, SharedCounters]) -> None:
    leader, other = group
    here = ConnectionGate(max_total=3, max_per_client=2, shared=leader)
    there = ConnectionGate(max_total=3, max_per_client=2, shared=other)
    assert here.admit("192.0.2.1") is None
    assert there.admit("192.0.2.1") is None
    assert "your address" in (there.admit("192.0.2.1") or "")  # the client's third, in either process
    assert "your address" in (here.admit("192.0.2.1") or "")
    assert there.admit("192.0.2.2") is None
    assert "Too many connections" in (here.admit("192.0.2.3") or "")  # the group's fourth
    assert here.open == there.open == 3
    here.leave("192.0.2.1")
    assert there.admit("192.0.2.3") is None
    for gate, ip in ((there, "192.0.2.1"), (there, "192.0.2.2"), (there, "192.0.2.3")):
        gate.leave(ip)
    assert here.open == 0


def test_shared_budget_counts_every_process(group: tuple[SharedCounters, SharedCounters]) -> None:
    leader, other = group
    seen: list[int] = []
    here = MemoryBudget(100, seen.append, shared=leader)
    there = MemoryBudget(100, shared=other)
    assert here.take(60)
    assert not there.take(41)  # would exceed the group's budget: nothing taken
    assert there.take(40)
    assert here.in_use == there.in_use == 100
    here.give(60)
    assert there.in_use == 40
    assert seen == [60, 0]  # each process reports its own bytes: the processes' gauges add up


def test_a_dead_process_slot_is_cleared(group: tuple[SharedCounters, SharedCounters]) -> None:
    leader, other = group
    there = ConnectionGate(max_total=2, max_per_client=2, shared=other)
    assert there.admit("192.0.2.1") is None
    assert there.admit("192.0.2.1") is None
    assert MemoryBudget(100, shared=other).take(100)
    here = ConnectionGate(max_total=2, max_per_client=2, shared=leader)
    assert here.admit("192.0.2.9") is not None
    leader.clear(1)  # process 1 died: its connections and bytes went with it
    assert (leader.connections, leader.data) == (0, 0)
    assert here.admit("192.0.2.1") is None


def test_closed_counters_keep_their_last_totals() -> None:
    counters = SharedCounters.create(1)
    gate = ConnectionGate(5, 5, shared=counters)
    assert gate.admit("192.0.2.1") is None
    counters.close(unlink=True)
    assert gate.open == 1
    counters.close(unlink=True)  # twice is harmless

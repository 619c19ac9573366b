"""services.receiver.limits: the connection gate and the in-flight DATA budget."""

from __future__ import annotations

from services.receiver.limits import ConnectionGate, MemoryBudget


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

"""Liveness and readiness (shared/health.py), served on the metrics port (shared/metrics.serve)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from shared.health import CHECK_TTL, Health
from shared.metrics import serve
from tests.support import free_port, wait_until


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_blocked_event_loop_makes_the_process_not_live_until_it_runs_again() -> None:
    health = Health()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        health.watch_loop("delivery loop", loop, allowance=0.3)
        assert wait_until(lambda: health.stalled() == [], timeout=2)
        loop.call_soon_threadsafe(time.sleep, 1.0)  # a hung call on the loop
        assert wait_until(lambda: health.stalled() != [], timeout=2)
        assert health.stalled()[0].startswith("delivery loop: no beat for ")
        assert wait_until(lambda: health.stalled() == [], timeout=3)  # it beats again once free
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_readiness_asks_each_check_at_most_every_ttl_and_a_raising_check_fails() -> None:
    now = [0.0]
    asked: list[int] = []
    health = Health(clock=lambda: now[0])

    def broker() -> str | None:
        asked.append(1)
        return None if len(asked) > 1 else "broker unreachable: connection refused"

    def clamd() -> str | None:
        raise OSError("no route")

    health.add_check("broker", broker)
    assert health.unready() == ["broker: broker unreachable: connection refused"]
    now[0] += CHECK_TTL / 2
    assert health.unready() == ["broker: broker unreachable: connection refused"]  # the cached answer
    assert len(asked) == 1
    now[0] += CHECK_TTL
    assert health.unready() == []
    health.add_check("clamd", clamd)
    assert health.unready() == ["clamd: OSError: no route"]


def test_the_metrics_port_answers_healthz_readyz_and_metrics() -> None:
    registry = CollectorRegistry()
    Counter("smtpgw_probe_test_total", "a metric of this test", registry=registry).inc()
    health = Health()
    trouble: list[str] = ["clamd: tcp://127.0.0.1:1 does not answer PING"]
    health.add_check("clamd", lambda: trouble[0] if trouble else None)
    port = free_port()
    serve("127.0.0.1", port, registry, health=health)
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (503, "clamd: clamd: tcp://127.0.0.1:1 does not answer PING\n")
    status, text = get(port, "/metrics")
    assert status == 200
    assert "smtpgw_probe_test_total 1.0" in text
    # Without a Health, every path is the metrics (prometheus_client's behaviour).
    plain = free_port()
    serve("127.0.0.1", plain, registry)
    assert "smtpgw_probe_test_total" in get(plain, "/healthz")[1]

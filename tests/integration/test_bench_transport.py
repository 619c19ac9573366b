"""bench.transport against the real broker: it moves every message through both hops and reports."""

from __future__ import annotations

import pytest

from bench import transport

pytestmark = pytest.mark.integration


def test_transport_bench_moves_every_message_and_compares_with_bare_pika(
    rabbitmq_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert transport.main(["--messages", "30", "--url", rabbitmq_url]) == 0
    out = capsys.readouterr().out
    assert "pika    publish" in out
    assert "smtpgw  scan, then deliver" in out
    assert "× bare pika" in out.splitlines()[-1]

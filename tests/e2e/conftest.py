from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.gateway import Gateway
from tests.support import CaptureHandler, capture_server


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def downstream() -> Iterator[tuple[CaptureHandler, int]]:
    """The internal mail system: a real SMTP server that captures what the gateway delivers."""
    with capture_server() as server:
        yield server


@pytest.fixture
def make_gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """Factory for gateways; stops them afterwards and prints their logs if the test failed."""
    made: list[Gateway] = []

    def make(sections: dict[str, dict[str, object]]) -> Gateway:
        gw = Gateway(tmp_path / f"gw{len(made)}", sections)
        made.append(gw)
        return gw

    (tmp_path).mkdir(exist_ok=True)
    for i in range(4):
        (tmp_path / f"gw{i}").mkdir(exist_ok=True)
    yield make
    for gw in made:
        gw.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for gw in made:
            print(gw.logs())

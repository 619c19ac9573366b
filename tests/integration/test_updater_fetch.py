"""Downloads over real HTTP on loopback: what is retried, what is not, what a truncated
transfer and a slow or absent server give (services/updater/fetch.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from services.updater.errors import FetchError
from services.updater.fetch import Fetcher
from tests.integration.peers import Response, Site, site
from tests.support import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def mirror() -> Iterator[Site]:
    with site() as s:
        yield s


def fetcher(timeout: float = 5) -> Fetcher:
    return Fetcher(timeout=timeout, attempts=3, wait=0.01, max_size=1024 * 1024)


def retries(reason: str) -> float:
    return REGISTRY.get_sample_value("smtpgw_updater_download_retries_total", {"reason": reason}) or 0.0


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_temporary_errors_are_retried(mirror: Site, status: int) -> None:
    mirror.routes["/f"] = [Response(b"busy", status), Response(b"busy", status), Response(b"data")]
    before = retries("http")
    assert fetcher().fetch(mirror.url("/f")) == b"data"
    assert mirror.hits["/f"] == 3
    assert retries("http") == before + 2


def test_retries_end(mirror: Site) -> None:
    mirror.routes["/f"] = Response(b"down", 503)
    with pytest.raises(FetchError, match="HTTP 503") as caught:
        fetcher().fetch(mirror.url("/f"))
    assert (mirror.hits["/f"], caught.value.temporary) == (3, True)


@pytest.mark.parametrize("status", [403, 404, 410])
def test_permanent_errors_are_not_retried(mirror: Site, status: int) -> None:
    mirror.routes["/f"] = Response(b"no", status)
    with pytest.raises(FetchError, match=f"HTTP {status}") as caught:
        fetcher().fetch(mirror.url("/f"))
    assert (mirror.hits["/f"], caught.value.temporary) == (1, False)


def test_a_truncated_transfer_is_never_a_file(mirror: Site) -> None:
    mirror.routes["/f"] = [Response(b"x" * 1000, send=10), Response(b"x" * 1000)]
    assert fetcher().fetch(mirror.url("/f")) == b"x" * 1000
    mirror.routes["/g"] = Response(b"x" * 1000, send=999)
    with pytest.raises(FetchError, match="truncated") as caught:
        fetcher().fetch(mirror.url("/g"))
    assert (caught.value.reason, mirror.hits["/g"]) == ("truncated", 3)


def test_a_slow_server_times_out(mirror: Site) -> None:
    mirror.routes["/f"] = Response(b"late", stall=5)
    with pytest.raises(FetchError, match="timed out") as caught:
        Fetcher(timeout=0.2, attempts=2, wait=0.01, max_size=1024).fetch(mirror.url("/f"))
    assert (caught.value.reason, caught.value.temporary, mirror.hits["/f"]) == ("timeout", True, 2)


def test_nobody_listening() -> None:
    with pytest.raises(FetchError) as caught:
        fetcher().fetch(f"http://127.0.0.1:{free_port()}/f")
    assert (caught.value.reason, caught.value.temporary) == ("network", True)


def test_too_big_is_refused_without_reading_it(mirror: Site) -> None:
    mirror.routes["/f"] = Response(b"x" * 2000)
    with pytest.raises(FetchError, match="over max_download_size") as caught:
        Fetcher(timeout=5, attempts=3, wait=0.01, max_size=1000).fetch(mirror.url("/f"))
    assert (caught.value.temporary, mirror.hits["/f"]) == (False, 1)

"""The adapter's pure parts; its protocol against real and dummy servers is in
tests/integration/test_scanner_clamd.py."""

from __future__ import annotations

import pytest

from shared.clamd import ClamdClient


@pytest.mark.parametrize(
    "address", ["tcp://127.0.0.1:3310", "tcp://[::1]:3310", "tcp://clamd.internal:3310", "unix:///run/clamd.sock"]
)
def test_addresses(address: str) -> None:
    assert ClamdClient(address, 5).address == address


@pytest.mark.parametrize("address", ["127.0.0.1:3310", "tcp://127.0.0.1", "http://x:1", "unix://", ""])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="tcp://host:port"):
        ClamdClient(address, 5)

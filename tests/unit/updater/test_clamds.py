"""Reload and confirm, against fake clamds (services/updater/clamds.py); against a real one in
tests/integration/test_updater.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.updater.canary import EICAR
from services.updater.clamds import Marker, confirm_reload
from services.updater.errors import ActivationError
from shared.clamd import ScanResult, ScanStatus
from shared.errors import ScanError, ScannerUnavailable

OLD = Marker.new("20260101T000000Z-old")
NEW = Marker.new("20260101T010000Z-new")


@dataclass
class FakeClamd:
    """Loads `pending` after `delay` polls of a RELOAD."""

    loaded: Marker | None = OLD
    pending: Marker | None = NEW
    delay: int = 2
    eicar: bool = True
    refuse_reload: bool = False
    down_for: int = 0
    address: str = "tcp://fake:3310"
    polls: int = field(default=0)
    reloading: bool = False

    def reload(self) -> None:
        if self.refuse_reload:
            raise ScanError("answered RELOAD with b'ERROR'")
        self.reloading = True

    def scan(self, data: bytes) -> ScanResult:
        if self.down_for:
            self.down_for -= 1
            raise ScannerUnavailable("connection refused")
        if self.reloading:
            self.polls += 1
            if self.polls >= self.delay:
                self.loaded, self.reloading = self.pending, False
        if data == EICAR:
            return ScanResult(ScanStatus.FOUND, "Eicar-Test-Signature") if self.eicar else ScanResult(ScanStatus.OK)
        if self.loaded is not None and data == self.loaded.probe:
            return ScanResult(ScanStatus.FOUND, self.loaded.signature + ".UNOFFICIAL")
        return ScanResult(ScanStatus.OK)

    def version(self) -> str:
        return "ClamAV 1.4.6"

    def ping(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def confirm(
    clients: list[FakeClamd], expect: Marker | None, leaving: Marker | None, timeout: float = 5
) -> dict[str, str]:
    clock = Clock()
    return confirm_reload(clients, expect, leaving, timeout, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]


def test_marker_round_trip() -> None:
    assert Marker.parse(NEW.ndb()) == NEW
    assert NEW.signature == "Smtpgw.Version.20260101T010000Z-new"
    assert NEW.probe != Marker.new("20260101T010000Z-new").probe  # a fresh secret each time


@pytest.mark.parametrize("text", ["", "Other.Sig:0:*:41", "Smtpgw.Version.x:0:*:zz", "a:b"])
def test_not_a_marker(text: str) -> None:
    assert Marker.parse(text) is None


def test_waits_until_every_clamd_has_the_new_marker() -> None:
    a, b = FakeClamd(address="tcp://a:1"), FakeClamd(address="tcp://b:1", delay=5, down_for=2)
    assert confirm([a, b], NEW, OLD) == {"tcp://a:1": "ClamAV 1.4.6", "tcp://b:1": "ClamAV 1.4.6"}
    assert a.loaded is NEW
    assert b.loaded is NEW


def test_going_back_to_a_set_without_marker_waits_for_the_old_one_to_go() -> None:
    clamd = FakeClamd(loaded=NEW, pending=None, delay=3)
    confirm([clamd], None, NEW)
    assert clamd.loaded is None


@pytest.mark.parametrize(
    ("clamd", "error"),
    [
        (FakeClamd(delay=10**9), "did not confirm the reload within 5s: still the previous signatures"),
        (FakeClamd(down_for=10**9), "did not confirm the reload within 5s: connection refused"),
        (FakeClamd(eicar=False), "no longer detects EICAR"),
        (FakeClamd(refuse_reload=True), "refused RELOAD"),
    ],
)
def test_not_confirmed(clamd: FakeClamd, error: str) -> None:
    with pytest.raises(ActivationError, match=error):
        confirm([clamd], NEW, OLD)

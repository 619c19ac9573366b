"""Versioned directories behind an atomically swapped symlink (services/updater/versions.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.updater.versions import VersionStore, stamp

T0 = 1_795_000_000.0  # 2026-11-18


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def build(store: VersionStore, tag: str, content: str) -> str:
    staging = store.staging()
    (staging / "file.ndb").write_text(content)
    name = store.new_name(tag)
    store.commit(staging, name)
    return name


def test_nothing_installed(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "db")
    assert (store.active(), store.active_dir(), store.versions(), store.previous()) == (None, None, [], None)


def test_activate_swaps_a_relative_symlink(tmp_path: Path) -> None:
    clock = Clock()
    store = VersionStore(tmp_path / "db", clock)
    first = build(store, "a", "1")
    assert first == f"{stamp(T0)}-a"
    assert store.activate(first) is None
    assert os.readlink(tmp_path / "db") == f"db.versions/{first}"
    assert (tmp_path / "db" / "file.ndb").read_text() == "1"
    clock.now += 60
    second = build(store, "b", "2")
    assert store.activate(second) == first
    assert (tmp_path / "db" / "file.ndb").read_text() == "2"
    assert (store.active(), store.previous(), store.versions()) == (second, first, [first, second])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".db.link")]
    assert (store.root / second).stat().st_mode & 0o777 == 0o755  # readable by a clamd running as another user


def test_a_plain_directory_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "seed.hsb").write_text("seed")
    store = VersionStore(tmp_path / "db", Clock())
    assert store.active() is None
    assert store.active_dir() == tmp_path / "db"
    name = build(store, "new", "x")
    seed = f"{stamp(T0 - 1)}-seed"  # older than the version built from it, whatever the clock says
    assert store.activate(name) == seed
    assert store.versions() == [seed, name]
    assert (store.root / seed / "seed.hsb").read_text() == "seed"
    assert store.previous() == seed


def test_a_clock_that_goes_back_never_sorts_a_new_version_first(tmp_path: Path) -> None:
    clock = Clock()
    store = VersionStore(tmp_path / "db", clock)
    first = build(store, "a", "1")
    clock.now -= 3600
    second = build(store, "b", "2")
    assert store.versions() == [first, second]
    assert second == f"{stamp(T0 + 1)}-b"


def test_a_link_elsewhere_is_not_a_version(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink("elsewhere", tmp_path / "db")
    store = VersionStore(tmp_path / "db")
    assert store.active() is None
    assert store.active_dir() == tmp_path / "db"


def test_prune_keeps_the_newest_and_the_active(tmp_path: Path) -> None:
    clock = Clock()
    store = VersionStore(tmp_path / "db", clock)
    names = []
    for i in range(6):
        clock.now += 60
        names.append(build(store, str(i), str(i)))
    store.activate(names[1])
    leftover = store.staging()
    assert store.prune(keep=2) == [names[0], names[2], names[3]]
    assert store.versions() == [names[1], names[4], names[5]]
    assert not leftover.exists()


def test_remove_refuses_the_active_one(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "db", Clock())
    name = build(store, "a", "1")
    store.activate(name)
    with pytest.raises(ValueError, match="is active"):
        store.remove(name)


def test_activate_a_missing_version(tmp_path: Path) -> None:
    store = VersionStore(tmp_path / "db")
    with pytest.raises(FileNotFoundError):
        store.activate("20260101T000000Z-nope")

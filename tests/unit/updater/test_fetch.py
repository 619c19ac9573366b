"""Downloads from file:// URLs and into a full disk (services/updater/fetch.py); over HTTP in
tests/integration/test_updater_fetch.py."""

from __future__ import annotations

import errno
import hashlib
import io
from pathlib import Path

import pytest

from services.updater.errors import FetchError
from services.updater.fetch import Fetcher


def fetcher(max_size: int = 1024) -> Fetcher:
    return Fetcher(timeout=5, attempts=3, wait=0, max_size=max_size)


def test_fetch_a_file_url(tmp_path: Path) -> None:
    (tmp_path / "sigs.ndb").write_bytes(b"A:0:*:41\n")
    assert fetcher().fetch((tmp_path / "sigs.ndb").as_uri()) == b"A:0:*:41\n"


def test_fetch_to_replaces_the_target_whole(tmp_path: Path) -> None:
    (tmp_path / "src.ndb").write_bytes(b"new")
    target = tmp_path / "out" / "sigs.ndb"
    target.parent.mkdir()
    target.write_bytes(b"old")
    digest = fetcher().fetch_to((tmp_path / "src.ndb").as_uri(), str(target))
    assert (target.read_bytes(), digest) == (b"new", hashlib.sha256(b"new").hexdigest())
    assert target.stat().st_mode & 0o777 == 0o644  # readable by a clamd running as another user
    assert [p.name for p in target.parent.iterdir()] == ["sigs.ndb"]


@pytest.mark.parametrize(("size", "reason"), [(1025, "size"), (1024, None)])
def test_size_limit(tmp_path: Path, size: int, reason: str | None) -> None:
    (tmp_path / "big").write_bytes(b"x" * size)
    if reason is None:
        assert len(fetcher().fetch((tmp_path / "big").as_uri())) == size
        return
    with pytest.raises(FetchError, match="max_download_size") as caught:
        fetcher().fetch((tmp_path / "big").as_uri())
    assert (caught.value.temporary, caught.value.reason) == (False, reason)


def test_a_missing_file_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        fetcher().fetch((tmp_path / "missing.ndb").as_uri())
    assert not caught.value.temporary


class FullDisk(io.BytesIO):
    writes = 0

    def write(self, data: object) -> int:
        self.writes += 1
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_reported_not_retried(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x" * 100)
    full = FullDisk()
    with pytest.raises(FetchError, match="cannot store it: No space left on device") as caught:
        fetcher().download((tmp_path / "src").as_uri(), full)
    assert (caught.value.temporary, caught.value.reason, full.writes) == (False, "storage", 1)


def test_fetch_to_an_unwritable_place(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x")
    with pytest.raises(FetchError, match="cannot write in"):
        fetcher().fetch_to((tmp_path / "src").as_uri(), str(tmp_path / "no" / "such" / "dir" / "x.ndb"))

"""Spool files reused instead of created: only after their old directory was fsynced, never
across a reboot, never one file for two writers, within the pool's bounds."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from shared import filepool
from shared.filepool import FilePool
from shared.spool import SpoolTransport
from shared.transport import Job, Output, Queue
from tests.support import wait_until
from tests.unit.shared.test_spool import env


class Dirs:
    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("scan", "deliver", "tmp"):
            (root / d).mkdir()
        self.synced: list[set[str]] = []

    def pool(self, **kwargs: object) -> FilePool:
        return FilePool(str(self.root / "free"), self.synced.append, **kwargs)  # type: ignore[arg-type]

    def file(self, queue: str, name: str, data: bytes = b"x" * 100) -> str:
        path = self.root / queue / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dirs:
    monkeypatch.setattr(filepool, "LIST_EVERY", 0.0)
    return Dirs(tmp_path)


def test_a_released_file_is_reused_after_its_directory_was_synced(dirs: Dirs) -> None:
    pool = dirs.pool()
    path = dirs.file("scan", "a,0")
    inode = os.stat(path).st_ino
    pool.release(path, 100)
    assert not os.path.exists(path)
    assert dirs.synced == []
    target = str(dirs.root / "tmp" / "b,0.1.2")
    assert pool.claim(target)
    assert dirs.synced == [{"scan"}]  # before the claim: the release is durable
    assert os.stat(target).st_ino == inode
    assert not pool.claim(str(dirs.root / "tmp" / "c,0.1.2"))  # the pool is empty now


def test_files_released_by_another_process_are_found(dirs: Dirs) -> None:
    releaser, claimer = dirs.pool(), dirs.pool()
    releaser.release(dirs.file("scan", "a,0"), 100)
    releaser.release(dirs.file("deliver", "b,1"), 100)
    assert claimer.claim(str(dirs.root / "tmp" / "x"))
    assert dirs.synced == [{"scan", "deliver"}]
    assert claimer.claim(str(dirs.root / "tmp" / "y"))
    assert not claimer.claim(str(dirs.root / "tmp" / "z"))


def test_files_from_an_earlier_boot_are_unlinked_not_reused(dirs: Dirs) -> None:
    before, after = dirs.pool(boot="aaaa"), dirs.pool(boot="bbbb")
    before.release(dirs.file("scan", "a,0"), 100)
    (dirs.root / "free" / "junk").write_bytes(b"")
    assert not after.claim(str(dirs.root / "tmp" / "x"))
    assert os.listdir(dirs.root / "free") == []


def test_large_files_and_a_full_pool_are_unlinked(dirs: Dirs) -> None:
    pool = dirs.pool(max_files=2, max_bytes=1000)
    pool.release(dirs.file("scan", "big,0"), 1001)
    assert os.listdir(dirs.root / "free") == []
    for n in range(4):
        pool.release(dirs.file("scan", f"m{n},0"), 100)
    assert len(os.listdir(dirs.root / "free")) == 2
    assert os.listdir(dirs.root / "scan") == []
    pool.release(str(dirs.root / "scan" / "gone,0"), 100)  # already gone: nothing to do


def test_without_a_boot_id_nothing_is_pooled(dirs: Dirs) -> None:
    pool = dirs.pool(boot="")
    path = dirs.file("scan", "a,0")
    pool.release(path, 100)
    assert not os.path.exists(path)
    assert os.listdir(dirs.root / "free") == []
    assert not pool.claim(str(dirs.root / "tmp" / "x"))


def test_each_pooled_file_goes_to_one_writer(dirs: Dirs) -> None:
    releaser = dirs.pool()
    for n in range(200):
        releaser.release(dirs.file("scan", f"m{n},0"), 100)
    pools = [dirs.pool() for _ in range(4)]
    claimed: list[str] = []
    lock = threading.Lock()

    def writer(pool: FilePool, index: int) -> None:
        for n in range(100):
            target = str(dirs.root / "tmp" / f"w{index}.{n}")
            if pool.claim(target):
                with lock:
                    claimed.append(target)

    threads = [threading.Thread(target=writer, args=(pools[i % 4], i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 200
    assert sorted(os.listdir(dirs.root / "tmp")) == sorted(os.path.basename(c) for c in claimed)
    assert os.listdir(dirs.root / "free") == []


def test_the_spool_writes_into_reused_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages flow through the same few files, and each one written over a longer one's
    file reads back as itself."""
    monkeypatch.setattr(filepool, "LIST_EVERY", 0.0)
    t = SpoolTransport(str(tmp_path), rescan=0.05)
    sizes = [50_000, 10, 30_000, 5, 70_000, 1]
    seen: list[bytes] = []

    def scan(job: Job) -> list[Output]:
        return [Output(Queue.DELIVER, job.envelope.replace(last_error="scanned"), job.body)]

    def deliver(job: Job) -> list[Output]:
        seen.append(job.body)
        return []

    t.consume(Queue.SCAN, scan, 1)
    t.consume(Queue.DELIVER, deliver, 1)
    t.start()
    try:
        inodes: set[int] = set()
        sent: list[bytes] = []
        for n, size in enumerate(sizes):
            sent.append(bytes([65 + n]) * size)
            t.publish(Queue.SCAN, env(), sent[-1])
            assert wait_until(lambda: len(seen) == len(sent))
            inodes.update(os.stat(tmp_path / "free" / f).st_ino for f in os.listdir(tmp_path / "free"))
        assert seen == sent
        assert len(inodes) <= 3  # the same few files, over and over
    finally:
        t.stop()

    writer = SpoolTransport(str(tmp_path))  # no consumers: the files stay where they are written
    for n, size in enumerate(reversed(sizes)):
        e = env()
        writer._write(Queue.SCAN, f"{e.queue_id},0", e, bytes([97 + n]) * size)
        assert writer._read(Queue.SCAN, f"{e.queue_id},0") == (e, bytes([97 + n]) * size)
        writer._pool.release(str(tmp_path / "scan" / f"{e.queue_id},0"), size)
    assert len(os.listdir(tmp_path / "free")) <= 3

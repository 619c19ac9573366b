"""Versioned directories, switched atomically: the updater's activation step.

A directory that a reader loads as a whole (clamd's DatabaseDirectory, the
scanner's rules_dir) is a symlink to one complete version:

    var/clamav -> clamav.versions/20261127T130000Z-5e1f0c2a
    var/clamav.versions/
        20261127T120000Z-seed/          the previous versions, kept for rollback
        20261127T130000Z-5e1f0c2a/      the active one
        .staging-k2j4l1/                being built; never looked at by a reader

A new version is built in a staging directory beside the others (same file
system), renamed to its name once complete, and put in force by renaming a
new symlink over the old one: rename(2) replaces the link atomically, so a
reader opening the path sees the old version or the new one, never a mix or
nothing. This is the switchboard's tmp -> fsync -> rename, one level up.

Version names start with a UTC timestamp, so sorting them sorts them by age:
"previous" means the newest version older than the active one. A plain
directory found at the path (a first start, an older layout) is taken over
as the version "<timestamp>-seed". scripts/clamd.sh follows the same layout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

STAGING_PREFIX = ".staging-"
_NAME = re.compile(r"\d{8}T\d{6}Z-[0-9A-Za-z._+-]+")


def stamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")


class VersionStore:
    """The versions of the directory at `path`. Not thread-safe: the caller holds the update lock."""

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time) -> None:
        self.path = Path(os.path.abspath(path))
        self.root = self.path.with_name(self.path.name + ".versions")
        self._clock = clock

    def active(self) -> str | None:
        """The active version's name; None when there is none (nothing installed yet, or the path
        is a plain directory not yet taken over, or a link to somewhere else)."""
        try:
            target = os.readlink(self.path)
        except OSError:
            return None
        parent, _, name = target.rpartition("/")
        if parent != self.root.name or not _NAME.fullmatch(name):
            return None
        return name if (self.root / name).is_dir() else None

    def active_dir(self) -> Path | None:
        """The directory readers load right now (the active version, or a plain directory)."""
        name = self.active()
        if name is not None:
            return self.root / name
        return self.path if self.path.is_dir() else None

    def versions(self) -> list[str]:
        """Every complete version, oldest first."""
        try:
            names = [e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _NAME.fullmatch(n))

    def previous(self, name: str | None = None) -> str | None:
        """The newest version older than `name` (default: the active one)."""
        name = name or self.active()
        older = [v for v in self.versions() if name is None or v < name]
        return older[-1] if older else None

    def new_name(self, tag: str) -> str:
        """A name for a new version: now, and never older than the newest there is (a clock that
        went back must not make a new version sort before an old one)."""
        name = f"{stamp(self._clock())}-{tag}"
        newest = self.versions()[-1:] or [""]
        if name <= newest[0]:
            name = f"{stamp(_parse_stamp(newest[0]) + 1)}-{tag}"
        return name

    # ------------------------------------------------------------ building

    def staging(self) -> Path:
        """A new, empty staging directory beside the versions."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        # mkdtemp makes it private; the reader (clamd, a scanner) may run as another user.
        staging.chmod(0o755)
        return staging

    def commit(self, staging: Path, name: str) -> Path:
        """Give a complete staging directory its version name (not yet active)."""
        for entry in os.scandir(staging):
            if entry.is_file(follow_symlinks=False):
                _fsync(entry.path)
        target = self.root / name
        os.rename(staging, target)
        _fsync(self.root)
        return target

    def discard(self, directory: Path) -> None:
        shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------ switching

    def take_over(self) -> str | None:
        """Make a plain directory at the path the first version. Returns its name, if it did."""
        if self.path.is_symlink() or not self.path.is_dir():
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        # The plain directory is older than any version built from it: its name must sort first.
        existing = self.versions()
        when = self._clock() if not existing else _parse_stamp(existing[0]) - 1
        name = f"{stamp(when)}-seed"
        os.rename(self.path, self.root / name)
        # Between the rename and the link the path is missing for a moment; this happens once,
        # and clamd only reads the directory when told to reload or at its SelfCheck.
        self._link(name)
        return name

    def activate(self, name: str) -> str | None:
        """Point the path at version `name` atomically. Returns the version that was active."""
        if not (self.root / name).is_dir():
            raise FileNotFoundError(f"{self.root / name}: no such version")
        self.take_over()
        before = self.active()
        self._link(name)
        return before

    def _link(self, name: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.link-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(f"{self.root.name}/{name}", tmp)
        os.replace(tmp, self.path)
        _fsync(self.path.parent)

    def prune(self, keep: int, protect: set[str] | None = None) -> list[str]:
        """Remove all but the `keep` newest versions besides the active one (and `protect`), and
        leftover staging directories. Returns the versions removed."""
        active = self.active()
        spare = {active, *(protect or set())}
        others = [v for v in self.versions() if v not in spare]
        removed = others[: max(0, len(others) - keep)]
        for name in removed:
            shutil.rmtree(self.root / name, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                if entry.name.startswith(STAGING_PREFIX):
                    shutil.rmtree(entry.path, ignore_errors=True)
        return removed

    def remove(self, name: str) -> None:
        if name == self.active():
            raise ValueError(f"{name} is active")
        shutil.rmtree(self.root / name, ignore_errors=True)


def _parse_stamp(name: str) -> float:
    return datetime.strptime(name[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

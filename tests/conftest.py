"""Shared fixtures: real peers, found or started, never faked.

A missing peer skips the test on a developer's machine but fails it in CI
(CI=1), as dramatiq's check_rabbitmq does: CI must never be green because
something was quietly not tested.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import missing

ROOT = Path(__file__).resolve().parent.parent
CLAMD_PORT = int(os.environ.get("CLAMD_PORT", "3310"))
RABBITMQ_URL = os.environ.get("SMTPGW_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _clamd_pings() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", CLAMD_PORT), timeout=2) as s:
            s.sendall(b"zPING\0")
            return s.recv(16).startswith(b"PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def clamd_address() -> str:
    """tcp:// address of a real clamd with the project's signatures (started if needed)."""
    if not _clamd_pings():
        subprocess.run([str(ROOT / "scripts" / "clamd.sh")], check=False, capture_output=True)
    if not _clamd_pings():
        missing(f"clamd on 127.0.0.1:{CLAMD_PORT}")
    return f"tcp://127.0.0.1:{CLAMD_PORT}"


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            pass
    except OSError:
        missing("RabbitMQ on 127.0.0.1:5672")
    return RABBITMQ_URL


@pytest.fixture
def promtool() -> str:
    """promtool from Debian's prometheus package: skipped on a developer's machine without it, failed in CI."""
    path = shutil.which("promtool")
    if path is None:
        missing("promtool (Debian package prometheus)")
    return path


@pytest.fixture
def spool_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "spool"
    path.mkdir()
    return path

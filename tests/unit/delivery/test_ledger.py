"""ledger: delivered recipients recorded per queue id, in a temporary directory."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.delivery.ledger import DeliveryLedger, FileLedger


@pytest.fixture
def ledger(tmp_path: Path) -> FileLedger:
    return FileLedger(str(tmp_path / "delivered"))


def test_record_and_lookup(ledger: FileLedger) -> None:
    assert not ledger.was_delivered("Q1", "a@example.test")
    ledger.record("Q1", ["a@example.test"])
    ledger.record("Q1", ["b@example.test", "Ü@example.test"])
    assert ledger.was_delivered("Q1", "a@example.test")
    assert ledger.was_delivered("Q1", "Ü@example.test")
    assert not ledger.was_delivered("Q1", "c@example.test")
    assert not ledger.was_delivered("Q2", "a@example.test")  # per queue id
    assert ledger.was_delivered("Q1", "b@example.test")
    assert not ledger.was_delivered("Q1", "B@example.test")  # local parts are case-sensitive


def test_survives_a_new_instance(tmp_path: Path) -> None:
    FileLedger(str(tmp_path)).record("Q1.b0", ["a@example.test"])
    assert FileLedger(str(tmp_path)).was_delivered("Q1.b0", "a@example.test")


def test_torn_last_line_is_not_a_record(ledger: FileLedger) -> None:
    ledger.record("Q1", ["a@example.test"])
    with open(os.path.join(ledger.directory, "Q1"), "ab") as fh:
        fh.write(b"b@example.te")  # a crash mid-append
    assert ledger.was_delivered("Q1", "a@example.test")
    assert not ledger.was_delivered("Q1", "b@example.te")


@pytest.mark.parametrize("queue_id", ["../escape", "", ".hidden", "a/b", "x" * 200])
def test_unsafe_queue_ids_are_refused(ledger: FileLedger, queue_id: str) -> None:
    with pytest.raises(ValueError, match="unsafe queue id"):
        ledger.record(queue_id, ["a@example.test"])


def test_purge_forgets_old_messages(ledger: FileLedger) -> None:
    ledger.record("OLD", ["a@example.test"])
    ledger.record("NEW", ["a@example.test"])
    old = time.time() - 3 * 86400
    os.utime(os.path.join(ledger.directory, "OLD"), (old, old))
    removed = ledger.purge(datetime.now(UTC) - timedelta(days=1))
    assert removed == 1
    assert not ledger.was_delivered("OLD", "a@example.test")
    assert ledger.was_delivered("NEW", "a@example.test")


def test_file_ledger_is_a_delivery_ledger(ledger: FileLedger) -> None:
    backend: DeliveryLedger = ledger  # the interface a networked ledger will implement too
    backend.record("Q1", [])
    assert not os.path.exists(os.path.join(ledger.directory, "Q1"))  # nothing to record, no file

from __future__ import annotations

from services.scanner.context import ScanContext
from services.scanner.mime import inspect
from services.scanner.policy import limits
from tests.unit.scanner.builders import FakeClamd, mail, settings


def test_within_bounds() -> None:
    config = settings()
    ctx = ScanContext(inspect(mail(attachments=[("a.txt", b"a")]), 10, 5), config, FakeClamd())
    assert limits.check(ctx) == []


def test_too_many_parts_quarantines_the_message() -> None:
    config = settings(max_parts=3, actions={"limits": "strip"})
    ctx = ScanContext(inspect(mail(attachments=[(f"{i}.txt", b"x") for i in range(5)]), 3, 5), config, FakeClamd())
    [verdict] = limits.check(ctx)
    # "strip" cannot apply: no single part makes the message complete again.
    assert (verdict.category, str(verdict.action), verdict.part) == ("limits", "quarantine", "")
    assert "more than 3 MIME parts" in verdict.reason


def test_configured_action() -> None:
    config = settings(actions={"limits": "delete"})
    ctx = ScanContext(inspect(mail(attachments=[(f"{i}.txt", b"x") for i in range(5)]), 3, 5), config, FakeClamd())
    assert [str(v.action) for v in limits.check(ctx)] == ["delete"]

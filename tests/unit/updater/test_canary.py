"""Reading clamscan's output, and the canaries (services/updater/canary.py).
The throw-away engine itself runs in tests/integration/test_updater_verify.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.updater.canary import Canary, load_canaries, parse_clamscan
from services.updater.errors import VerificationError

SUMMARY = """
----------- SCAN SUMMARY -----------
Known viruses: 8712
Engine version: 1.4.6
"""


@pytest.mark.parametrize(
    ("output", "results", "count"),
    [
        ("/t/detect-0000: Eicar-Test-Signature FOUND\n/t/clean-0000: OK\n" + SUMMARY,
         {"/t/detect-0000": "Eicar-Test-Signature", "/t/clean-0000": ""}, 8712),
        ("/t/a b: c: Smtpgw.Version.X.UNOFFICIAL FOUND\n" + SUMMARY,
         {"/t/a b: c": "Smtpgw.Version.X.UNOFFICIAL"}, 8712),
        ("ERROR: Malformed database\n", {}, None),
        ("Known viruses: many\n", {}, None),
        ("/t/x: Access denied. ERROR\n" + SUMMARY, {}, 8712),
    ],
)  # fmt: skip
def test_parse_clamscan(output: str, results: dict[str, str], count: int | None) -> None:
    assert parse_clamscan(output) == (results, count)


def test_load_canaries(tmp_path: Path) -> None:
    (tmp_path / "b.bin").write_bytes(b"B")
    (tmp_path / "a.txt").write_bytes(b"A")
    (tmp_path / ".hidden").write_bytes(b"H")
    (tmp_path / "sub").mkdir()
    assert load_canaries(str(tmp_path)) == [Canary("a.txt", b"A"), Canary("b.bin", b"B")]
    assert load_canaries("") == []
    with pytest.raises(VerificationError, match="cannot read canaries"):
        load_canaries(str(tmp_path / "missing"))

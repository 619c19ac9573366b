from __future__ import annotations

import pytest

from services.scanner.reply import category_of
from shared.clamd import ScanStatus, is_size_limit, parse_reply


@pytest.mark.parametrize(
    ("reply", "status", "signature"),
    [
        (b"stream: OK\0", ScanStatus.OK, ""),
        (b"stream: OK", ScanStatus.OK, ""),
        (b"1: stream: OK\0", ScanStatus.OK, ""),
        (b"stream: Eicar-Test-Signature FOUND\0", ScanStatus.FOUND, "Eicar-Test-Signature"),
        (b"stream: Win.Test.EICAR_HDB-1 FOUND\n", ScanStatus.FOUND, "Win.Test.EICAR_HDB-1"),
        (
            b"stream: Eicar-Test-Signature(44d88612fea8a8f36de82e1278abb02f:68) FOUND\0",
            ScanStatus.FOUND,
            "Eicar-Test-Signature",
        ),
        (
            b"stream: Heuristics.Limits.Exceeded.MaxRecursion FOUND\0",
            ScanStatus.FOUND,
            "Heuristics.Limits.Exceeded.MaxRecursion",
        ),
        (b"INSTREAM size limit exceeded. ERROR\0", ScanStatus.ERROR, ""),
        (b"stream: Can't allocate memory ERROR\0", ScanStatus.ERROR, ""),
        (b"UNKNOWN COMMAND\0", ScanStatus.ERROR, ""),
        # Anything unexpected is an error, never clean.
        (b"OK\0", ScanStatus.ERROR, ""),
        (b"stream: FOUND\0", ScanStatus.ERROR, ""),
        (b"stream: OK and more\0", ScanStatus.ERROR, ""),
        (b"\xff\xfe garbage", ScanStatus.ERROR, ""),
        (b"", ScanStatus.ERROR, ""),
    ],
)
def test_parse_reply(reply: bytes, status: ScanStatus, signature: str) -> None:
    result = parse_reply(reply)
    assert result.status is status
    assert result.signature == signature
    assert result.clean is (status is ScanStatus.OK)
    assert result.found is (status is ScanStatus.FOUND)


def test_size_limit_is_recognised() -> None:
    assert is_size_limit(parse_reply(b"INSTREAM size limit exceeded. ERROR\0"))
    assert not is_size_limit(parse_reply(b"stream: lstat() failed ERROR\0"))
    assert not is_size_limit(parse_reply(b"stream: OK\0"))


@pytest.mark.parametrize(
    ("signature", "category"),
    [
        ("Eicar-Test-Signature", "virus"),
        ("Heuristics.Limits.Exceeded.MaxRecursion", "unscannable"),
        ("Heuristics.Limits.Exceeded.MaxFileSize", "unscannable"),
        ("Heuristics.Encrypted.Zip", "encrypted"),
        ("Heuristics.Encrypted.PDF", "encrypted"),
        ("Heuristics.Phishing.Email.SpoofedDomain", "virus"),
    ],
)
def test_category_of(signature: str, category: str) -> None:
    assert category_of(signature) == category

from __future__ import annotations

from services.scanner.context import ScanContext
from services.scanner.mime import inspect
from services.scanner.policy import archives
from shared.config import ScannerConfig
from tests.unit.scanner.builders import FakeClamd, mail, patch_zip_sizes, settings, zip_of


def check(raw: bytes, config: ScannerConfig | None = None) -> list[tuple[str, str, str]]:
    config = config or settings()
    ctx = ScanContext(inspect(raw, config.max_parts, config.max_depth), config, FakeClamd())
    return [(v.category, str(v.action), v.part) for v in archives.check(ctx)]


def nest(levels: int) -> bytes:
    data = zip_of([("a.txt", b"a")])
    for _ in range(levels):
        data = zip_of([("inner.zip", data)])
    return data


def test_clean_archives_pass() -> None:
    assert check(mail(attachments=[("a.zip", nest(3)), ("b.pdf", b"%PDF")])) == []


def test_over_limits_and_unreadable_is_the_archive_category() -> None:
    assert check(mail(attachments=[("deep.zip", nest(12))])) == [("archive", "quarantine", "2:deep.zip")]
    assert check(mail(attachments=[("a.zip", nest(3))]), settings(archive_max_depth=2)) == [
        ("archive", "quarantine", "2:a.zip")
    ]
    assert check(mail(attachments=[("broken.zip", b"PK\x03\x04 broken")])) == [
        ("archive", "quarantine", "2:broken.zip")
    ]


def test_encrypted_members() -> None:
    locked = patch_zip_sizes(zip_of([("secret.doc", b"s")]), flags=0x1)
    assert check(mail(attachments=[("locked.zip", locked)])) == [("encrypted", "quarantine", "2:locked.zip")]
    assert check(mail(attachments=[("locked.zip", locked)]), settings(actions={"encrypted": "strip"})) == [
        ("encrypted", "strip", "2:locked.zip")
    ]


def test_archive_as_the_whole_message_quarantines_even_when_strip_is_asked() -> None:
    raw = b"Subject: x\r\nContent-Type: application/zip; name=a.zip\r\n\r\nPK\x03\x04 broken"
    assert check(raw, settings(actions={"archive": "strip"})) == [("archive", "quarantine", "0:a.zip")]

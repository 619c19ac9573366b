from __future__ import annotations

import gzip

import pytest

from services.scanner.context import ScanContext
from services.scanner.mime import inspect
from services.scanner.policy import attachments
from shared.config import ScannerConfig
from shared.envelope import Action
from tests.unit.scanner.builders import FakeClamd, mail, patch_zip_sizes, raw_mail, settings, tar_of, text_part, zip_of

PE = b"MZ\x90\x00" + b"\x00" * 200


def check(raw: bytes, config: ScannerConfig | None = None) -> list[tuple[str, str, str]]:
    config = config or settings()
    ctx = ScanContext(inspect(raw, config.max_parts, config.max_depth), config, FakeClamd())
    return [(v.category, str(v.action), v.part) for v in attachments.check(ctx)]


@pytest.mark.parametrize(
    "name",
    [
        "setup.exe",
        "SETUP.EXE",
        "invoice.pdf.exe",
        "run.bat.",
        "run.vbs ",
        "x.scr",
        "a.lnk",
        "fwd.eml",
        "help.chm",
        "x.Com",
    ],
)
def test_blocked_names(name: str) -> None:
    assert check(mail(attachments=[(name, b"harmless")])) == [("attachment", "strip", f"2:{name}")]


@pytest.mark.parametrize(
    "name", ["report.pdf", "photo.exe.jpg", "exe", "setup.exe.txt", "www.example.com.pdf", "notes"]
)
def test_allowed_names(name: str) -> None:
    assert check(mail(attachments=[(name, b"harmless")])) == []


def test_name_from_content_type_alone_and_from_either_header() -> None:
    only_type = raw_mail(text_part(b"hi"), b"Content-Type: application/octet-stream; name=tool.exe\r\n\r\nx")
    assert check(only_type) == [("attachment", "strip", "2:tool.exe")]
    mismatch = raw_mail(
        text_part(b"hi"),
        b'Content-Type: application/pdf; name="tool.exe"\r\nContent-Disposition: attachment; filename="a.pdf"\r\n\r\nx',
    )
    assert check(mismatch) == [("attachment", "strip", "2:a.pdf")]


def test_encoded_names() -> None:
    rfc2231 = (
        b"Content-Disposition: attachment; filename*0*=utf-8''r%C3%A9sum%C3%A9;"
        b' filename*1=".e"; filename*2="xe"\r\n\r\nx'
    )
    rfc2047 = b'Content-Disposition: attachment; filename="=?utf-8?B?cmVwb3J0LmV4ZQ==?="\r\n\r\nx'
    assert check(raw_mail(text_part(b"hi"), rfc2231)) == [("attachment", "strip", "2:résumé.exe")]
    assert check(raw_mail(text_part(b"hi"), rfc2047)) == [("attachment", "strip", "2:report.exe")]


@pytest.mark.parametrize(
    "content",
    [PE, b"\x7fELF\x02\x01\x01" + bytes(100), b"#!/bin/sh\nrm -rf ~\n", b"\xcf\xfa\xed\xfe" + bytes(100)],
)
def test_executable_content_whatever_the_name(content: bytes) -> None:
    raw = mail(attachments=[("photo.jpg", content)])
    assert check(raw) == [("attachment", "strip", "2:photo.jpg")]
    assert check(raw, settings(block_executables=False)) == []


def test_executable_text_in_the_body_is_not_an_attachment() -> None:
    assert check(mail("#!/bin/sh\necho this is how you do it\n")) == []


@pytest.mark.parametrize(
    "archive",
    [
        zip_of([("docs/readme.txt", b"r"), ("docs/tool.exe", b"harmless")]),
        zip_of([("inner.zip", zip_of([("deep.scr", b"s")]))]),
        gzip.compress(tar_of([("bin/run.bat", b"echo")])),
        tar_of([("x.tar", tar_of([("y.pif", b"p")]))]),
        zip_of([("photo.jpg", PE)]),
        patch_zip_sizes(zip_of([("tool.exe", b"t")]), flags=0x1),  # encrypted, but names are readable
    ],
)
def test_blocked_files_inside_archives(archive: bytes) -> None:
    [(category, action, part)] = check(mail(attachments=[("files.zip", archive)]))
    assert (category, action, part) == ("attachment", "strip", "2:files.zip")


def test_uuencoded_and_attached_message_names() -> None:
    uu = b"see:\r\nbegin 644 tool.exe\r\n#86)C\r\n`\r\nend\r\n"
    assert check(raw_mail(text_part(uu))) == [("attachment", "strip", "1.uu1:tool.exe")]
    attached = (
        b"Content-Type: message/rfc822\r\nContent-Disposition: attachment; filename=fwd.eml\r\n\r\nSubject: x\r\n\r\nhi"
    )
    assert check(raw_mail(text_part(b"hi"), attached)) == [("attachment", "strip", "2:fwd.eml")]


def test_configured_list_and_action() -> None:
    raw = mail(attachments=[("a.PDF", b"x"), ("b.exe", b"x")])
    assert check(raw, settings(blocked_extensions=[".pdf"])) == [("attachment", "strip", "2:a.PDF")]
    assert check(raw, settings(actions={"attachment": "quarantine"})) == [("attachment", "quarantine", "3:b.exe")]
    assert check(raw, settings(blocked_extensions=[])) == []


def test_blocked_body_cannot_be_stripped() -> None:
    single = b"Subject: x\r\nContent-Type: application/octet-stream; name=tool.exe\r\n\r\nMZ"
    [(category, action, part)] = check(single)
    assert (category, action) == ("attachment", str(Action.QUARANTINE))
    assert part == "0:tool.exe"

from __future__ import annotations

import pytest

from services.scanner.filenames import clean_for_display, decode_param, extension, is_double_extension, normalize
from services.scanner.mime import inspect
from tests.unit.scanner.builders import raw_mail


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        (b"attachment", ""),
        (b"attachment; filename=report.pdf", "report.pdf"),
        (b'attachment; filename="quoted name.exe"', "quoted name.exe"),
        # RFC 2231: charset and language, percent-encoded, continuations (section 3 and 4)
        (b"attachment; filename*=utf-8''r%C3%A9sum%C3%A9.exe", "résumé.exe"),
        (b"attachment; filename*=iso-8859-1'de'gr%FC%DFe.exe", "grüße.exe"),
        (b'attachment; filename*0*=utf-8\'\'r%C3%A9sum%C3%A9; filename*1=".e"; filename*2="xe"', "résumé.exe"),
        (b'attachment; filename*0="invoice.pdf"; filename*1=".exe"', "invoice.pdf.exe"),
        (b"attachment; filename*=no-such-charset''a.exe", "a.exe"),
        # RFC 2047 encoded words, B and Q, split in two, next to plain text
        (b'attachment; filename="=?utf-8?B?cmVwb3J0LmV4ZQ==?="', "report.exe"),
        (b'attachment; filename="=?UTF-8?Q?r=C3=A9sum=C3=A9.exe?="', "résumé.exe"),
        (b'attachment; filename="=?utf-8?Q?invoice?= =?utf-8?Q?.pdf.exe?="', "invoice.pdf.exe"),
        (b'attachment; filename="=?iso-8859-1?q?gr=FC=DFe?=.exe"', "grüße.exe"),
        (b'attachment; filename="=?x-unknown?Q?abc?=.exe"', "abc.exe"),
        (b'attachment; filename="=?utf-8?B?!!!?="', ""),
        # raw 8-bit UTF-8 in the header (the parser keeps it as surrogate escapes)
        ('attachment; filename="résumé.exe"'.encode(), "résumé.exe"),
        (b'attachment; filename="bad\xff.exe"', "bad\ufffd.exe"),
    ],
)
def test_file_name_decoding(disposition: bytes, expected: str) -> None:
    """The whole path: raw header bytes, the parser, parameter parsing, decoding."""
    raw = raw_mail(b"Content-Type: text/plain\r\n\r\nbody", b"Content-Disposition: " + disposition + b"\r\n\r\ndata")
    part = inspect(raw, 100, 10).parts[1]
    assert part.name == expected
    assert part.is_file


@pytest.mark.parametrize(
    ("content_type", "disposition", "names"),
    [
        (b"application/pdf; name=a.exe", b"attachment; filename=a.pdf", ("a.pdf", "a.exe")),
        (b"application/pdf; name=a.pdf", b"attachment; filename=a.pdf", ("a.pdf",)),
        (b"application/octet-stream; name*=utf-8''%E2%82%AC.scr", b"inline", ("€.scr",)),
        (b"text/plain", b"attachment", ()),
    ],
)
def test_both_name_sources_are_kept(content_type: bytes, disposition: bytes, names: tuple[str, ...]) -> None:
    raw = raw_mail(b"Content-Type: " + content_type + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\nx")
    assert inspect(raw, 100, 10).parts[0].names == names


def test_decode_param_values() -> None:
    assert decode_param(None) == ""
    assert decode_param('"x.exe"') == "x.exe"
    assert decode_param(("utf-8", "", "r\xc3\xa9.exe")) == "ré.exe"  # as compat32 returns RFC 2231 values


@pytest.mark.parametrize(
    ("name", "ext"),
    [
        ("setup.exe", "exe"),
        ("SETUP.EXE", "exe"),
        ("invoice.pdf.exe", "exe"),
        ("run.bat.", "bat"),
        ("run.vbs ", "vbs"),
        ("run.vbs . . ", "vbs"),
        ("x.exe\u3000", "exe"),
        ("x.exe::$DATA", "exe"),
        ("C:\\Users\\x\\evil.scr", "scr"),
        ("../../evil.pif", "pif"),
        ("invoice\u202efdp.exe", "exe"),  # right-to-left override: displays as "invoiceexe.pdf"
        ("e\u0000vil.com", "com"),
        ("ev\u200bil.e\u200bxe", "exe"),  # zero-width characters vanish
        ("photo.exe.jpg", "jpg"),
        (".bashrc", ""),
        ("noextension", ""),
        ("...", ""),
        ("", ""),
    ],
)
def test_extension(name: str, ext: str) -> None:
    assert extension(name) == ext


@pytest.mark.parametrize(
    ("name", "double"),
    [("invoice.pdf.exe", True), ("a.tar.gz", True), ("setup.exe", False), (".exe", False), ("x", False)],
)
def test_is_double_extension(name: str, double: bool) -> None:
    assert is_double_extension(name) is double


def test_normalize_and_display() -> None:
    assert normalize("dir/sub\\x.exe. ") == "x.exe"
    assert clean_for_display("a\r\nb\u202ec") == "abc"
    assert len(clean_for_display("x" * 1000)) == 200

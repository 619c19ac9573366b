from __future__ import annotations

import base64
import binascii
import email
import email.message
import os
import re
from email.policy import compat32

import pytest

from services.scanner.mime import inspect
from services.scanner.rebuild import add_headers, remove_fields, replace_parts
from tests.unit.scanner.builders import mail, raw_mail, text_part


def segments(raw: bytes) -> list[bytes]:
    boundary = re.search(rb'boundary="([^"]+)"', raw).group(1)  # type: ignore[union-attr]
    return raw.split(b"--" + boundary)


def decoded_parts(raw: bytes) -> list[bytes]:
    msg = email.message_from_bytes(raw, policy=compat32)
    payloads = [p.get_payload(decode=True) for p in msg.walk() if not p.is_multipart()]
    return [p if isinstance(p, bytes) else b"" for p in payloads]


@pytest.mark.parametrize("linesep", ["\r\n", "\n"])
def test_replaced_part_only_everything_else_byte_identical(linesep: str) -> None:
    files = [("a.pdf", os.urandom(3000)), ("evil.exe", b"MZ" + os.urandom(500)), ("c.bin", os.urandom(100))]
    raw = mail("Body text\nwith lines\n", files, linesep=linesep)
    rebuilt = replace_parts(inspect(raw, 100, 10), {"3": "The attachment (evil.exe) was removed."})
    before, after = segments(raw), segments(rebuilt)
    assert len(before) == len(after)
    assert [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b] == [3]
    assert b"MZ" not in after[3]
    assert f"The attachment (evil.exe) was removed.{linesep}".encode() in after[3]
    assert (linesep == "\n") is (b"\r\n" not in rebuilt)
    payloads = decoded_parts(rebuilt)
    assert payloads[1] == files[0][1]
    assert payloads[3] == files[2][1]


def test_preamble_epilogue_and_headers_survive() -> None:
    raw = raw_mail(text_part(b"hi"), text_part(b"x", name="x.exe"), headers=b"X-Long: " + b"word " * 40 + b"\r\n")
    rebuilt = replace_parts(inspect(raw, 100, 10), {"2": "removed"})
    assert rebuilt.split(b"--BOUNDARY")[0] == raw.split(b"--BOUNDARY")[0]  # headers unfolded-as-received, preamble
    assert rebuilt.endswith(b"--BOUNDARY--\r\nepilogue\r\n")


def test_non_ascii_notice() -> None:
    raw = mail(attachments=[("résumé.exe", b"MZ")])
    rebuilt = replace_parts(inspect(raw, 100, 10), {"2": "Der Anhang (résumé.exe) wurde entfernt."})
    part = email.message_from_bytes(rebuilt, policy=compat32).get_payload(1)
    assert isinstance(part, email.message.Message)
    assert part.get_content_type() == "text/plain"
    data = part.get_payload(decode=True)
    assert isinstance(data, bytes)
    text = data.decode(part.get_content_charset() or "ascii")
    assert text.rstrip() == "Der Anhang (résumé.exe) wurde entfernt."
    assert rebuilt.isascii()


def test_part_inside_an_attached_message_and_the_message_itself() -> None:
    inner = mail("inner body\n", [("inner.exe", b"MZ")], subject="inner")
    raw = raw_mail(text_part(b"fwd"), b"Content-Type: message/rfc822\r\n\r\n" + inner)
    inspection = inspect(raw, 100, 10)
    rebuilt = replace_parts(inspection, {"2.1.2": "inner removed"})
    assert decoded_parts(rebuilt) == [b"fwd", b"inner body\r\n", b"inner removed\r\n"]
    inspection = inspect(raw, 100, 10)
    # The attached message goes as a whole; a part inside it named too is simply gone with it.
    rebuilt = replace_parts(inspection, {"2": "message removed", "2.1.2": "inner removed"})
    assert decoded_parts(rebuilt) == [b"fwd", b"message removed\r\n"]


def uu(name: str, data: bytes) -> bytes:
    return f"begin 644 {name}\r\n".encode() + binascii.b2a_uu(data).replace(b"\n", b"\r\n") + b"`\r\nend\r\n"


@pytest.mark.parametrize("cte", [b"7bit", b"base64", b"quoted-printable"])
def test_uuencoded_block_is_cut_out_of_its_text(cte: bytes) -> None:
    text = b"Hello,\r\n" + uu("a.exe", b"first") + b"middle\r\n" + uu("b.exe", b"second") + b"bye\r\n"
    body = base64.encodebytes(text).replace(b"\n", b"\r\n") if cte == b"base64" else text
    raw = raw_mail(text_part(body, cte=cte), text_part(b"other"))
    rebuilt = replace_parts(inspect(raw, 100, 10), {"1.uu1": "[a.exe removed]", "1.uu2": "[b.exe removed]"})
    first, second = decoded_parts(rebuilt)
    assert first.replace(b"\r\n", b"\n") == b"Hello,\n[a.exe removed]\nmiddle\n[b.exe removed]\nbye\n"
    assert second == b"other"


def test_the_message_itself_cannot_be_replaced() -> None:
    with pytest.raises(LookupError):
        replace_parts(inspect(b"Subject: x\r\n\r\nbody\r\n", 100, 10), {"0": "x"})


def test_add_headers() -> None:
    body = b"Subject: x\r\n\r\nbody\r\n"
    out = add_headers(
        body, [("X-SMTPGW-Finding", "attachment: strip: 'a\r\nBcc: victim@example.org.exe' " + "word " * 30)], "\r\n"
    )
    assert out.endswith(body)
    headers = email.message_from_bytes(out, policy=compat32)
    assert headers["Bcc"] is None
    assert "Bcc: victim@example.org.exe" in " ".join(headers["X-SMTPGW-Finding"].split())
    lines = out[: -len(body)].split(b"\r\n")
    assert len(lines) > 2  # folded
    assert all(len(line) <= 78 for line in lines)
    assert not any(line.startswith(b"Bcc") for line in lines)
    utf8 = add_headers(body, [("X-SMTPGW-Finding", "virus: strip: 'résumé.exe'")], "\n")
    assert utf8.isascii()
    assert b"=?utf-8?" in utf8


# ---------------------------------------------------------------- remove_fields

HEAD = b"Received: from a\r\n\tby b\r\nSubject: s\r\n"


@pytest.mark.parametrize(
    ("header", "kept", "count"),
    [
        (b"X-SMTPGW-Finding: virus: strip: forged\r\n", b"", 1),
        (b"x-smtpgw-finding: lower case\r\n", b"", 1),
        (b"X-SMTPGW-FINDING  : space before the colon\r\n", b"", 1),
        # Folded over three lines, with a tab and spaces: every line of it goes.
        (b"X-SMTPGW-Finding: one\r\n two\r\n\tthree\r\nX-Other: kept\r\n", b"X-Other: kept\r\n", 1),
        (b"X-SMTPGW-Finding: a\r\nX-Keep: 1\r\nX-SMTPGW-Finding: b\r\n c\r\n", b"X-Keep: 1\r\n", 2),
        # Names that only begin or end like it are other fields.
        (b"X-SMTPGW-Findings: other\r\nX-SMTPGW-Finding-Note: other\r\n", None, 0),
        (b"Comment: X-SMTPGW-Finding: in a value\r\n", None, 0),
    ],
)
def test_remove_fields_takes_every_line_of_the_named_fields(header: bytes, kept: bytes | None, count: int) -> None:
    body = b"\r\nX-SMTPGW-Finding: in the body, not a field\r\n"
    raw = HEAD + header + body
    out, removed = remove_fields(raw, "X-SMTPGW-Finding", "\r\n")
    assert removed == count
    if kept is None:
        assert out is raw  # nothing removed: the same object, no copy
    else:
        assert out == HEAD + kept + body


def test_remove_fields_looks_only_at_the_message_header() -> None:
    """The body, and the header of a message attached to it, are content."""
    inner = b"X-SMTPGW-Finding: inside an attached message\r\nSubject: inner\r\n\r\ntext\r\n"
    raw = raw_mail(b"Content-Type: message/rfc822\r\n\r\n" + inner)
    out, removed = remove_fields(raw, "X-SMTPGW-Finding", "\r\n")
    assert (out, removed) == (raw, 0)
    assert out is raw


@pytest.mark.parametrize("linesep", ["\r\n", "\n"])
def test_remove_fields_with_either_line_end_and_without_a_body(linesep: str) -> None:
    sep = linesep.encode()
    raw = b"Subject: s" + sep + b"X-SMTPGW-Finding: x" + sep + b" folded" + sep + b"To: u" + sep
    assert remove_fields(raw, "X-SMTPGW-Finding", linesep) == (b"Subject: s" + sep + b"To: u" + sep, 1)
    with_body = raw + sep + b"X-SMTPGW-Finding: body" + sep
    assert remove_fields(with_body, "X-SMTPGW-Finding", linesep) == (
        b"Subject: s" + sep + b"To: u" + sep + sep + b"X-SMTPGW-Finding: body" + sep,
        1,
    )
    no_header = sep + b"X-SMTPGW-Finding: body" + sep
    assert remove_fields(no_header, "X-SMTPGW-Finding", linesep) == (no_header, 0)

from __future__ import annotations

import base64
import binascii
import os
import quopri
import random
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP, compat32

import pytest

from services.scanner.mime import decoded_payload, find_uuencoded, inspect, navigate
from services.scanner.mimeparse import parse
from tests.unit.scanner.builders import mail, raw_mail, text_part


def uuencode(name: str, data: bytes) -> bytes:
    lines = [f"begin 644 {name}\n".encode()]
    lines += [binascii.b2a_uu(data[i : i + 45]) for i in range(0, len(data), 45)]
    return b"".join([*lines, b"`\n", b"end\n"])


def forwarded(inner: bytes, cte: bytes = b"7bit") -> bytes:
    body = inner
    if cte == b"base64":
        body = base64.encodebytes(inner).replace(b"\n", b"\r\n")
    elif cte == b"quoted-printable":
        body = quopri.encodestring(inner)
    return raw_mail(
        text_part(b"see the forwarded message"),
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: " + cte + b"\r\n\r\n" + body,
    )


INNER = mail("inner body\n", [("inner.exe", b"MZ inner")], subject="inner")


def test_parts_refs_names_and_strip_targets() -> None:
    raw = mail("body\n", [("a.pdf", b"%PDF-1.4 a"), ("b.zip", b"PK\x03\x04b")])
    result = inspect(raw, 100, 10)
    assert [(p.ref, p.name, p.is_file, p.strip_ref) for p in result.parts] == [
        ("1", "", False, None),  # the body: cannot be removed
        ("2", "a.pdf", True, "2"),
        ("3", "b.zip", True, "3"),
    ]
    assert result.parts[1].data == b"%PDF-1.4 a"  # decoded from base64
    assert result.count == 4
    assert not result.problems
    assert not result.failure
    assert result.message is not None
    assert navigate(result.message, result.parts[2].path).get_filename() == "b.zip"


def test_single_part_message_is_its_own_body() -> None:
    result = inspect(b"Subject: x\r\nContent-Type: application/octet-stream; name=x.exe\r\n\r\nMZ", 100, 10)
    [part] = result.parts
    assert (part.ref, part.is_file, part.strip_ref) == ("0", True, None)


@pytest.mark.parametrize("cte", [b"7bit", b"base64", b"quoted-printable"])
def test_attached_message_is_walked(cte: bytes) -> None:
    result = inspect(forwarded(INNER, cte), 100, 10)
    container = result.nodes["2"]
    assert container.container
    assert container.strip_ref == "2"
    inner = {p.name or p.content_type: p for p in result.parts}
    assert inner["inner.exe"].data == b"MZ inner"
    # The forwarded body goes with the forwarded message.
    assert inner["text/plain"].strip_ref in (None, "2")
    assert inner["text/plain"].data.startswith(b"inner body")
    assert [p.strip_ref for p in result.parts if p.data.startswith(b"inner body")] == ["2"]
    # An attachment of a plain attached message can be removed on its own; of an encoded one, only with it.
    assert inner["inner.exe"].strip_ref == ("2.1.2" if cte == b"7bit" else "2")


def test_uuencoded_blocks_in_text_parts() -> None:
    payload = os.urandom(200)
    text = b"Hello,\r\nthe file:\r\n" + uuencode("tool.exe", payload).replace(b"\n", b"\r\n") + b"regards\r\n"
    result = inspect(raw_mail(text_part(text)), 100, 10)
    body, block = result.parts
    assert block.ref == "1.uu1"
    assert block.name == "tool.exe"
    assert block.data == payload
    assert block.uu_parent == "1"
    assert block.strip_ref == "1.uu1"
    start, end = block.uu_span
    assert body.data[:start] == b"Hello,\r\nthe file:\r\n"
    assert body.data[end:] == b"regards\r\n"


@pytest.mark.parametrize(
    ("text", "blocks"),
    [
        (uuencode("a.bin", b"abc"), [("a.bin", b"abc")]),
        (uuencode("a.bin", b"abc") + uuencode("b.exe", b"x" * 100), [("a.bin", b"abc"), ("b.exe", b"x" * 100)]),
        (uuencode("a.bin", b"abc")[:-4], [("a.bin", b"abc")]),  # no "end": up to the last decodable line
        (b"to begin 644 with, some prose\n", []),
        (b"begin 644 x.txt\nthis is not uuencoded at all\n", []),
        (b"begin 644 x.exe\n", []),
        # Only at the start of a line: not after other text, not after a CR alone, not indented.
        (b"x begin 644 a.bin\n" + uuencode("a.bin", b"abc")[len(b"begin 644 a.bin\n") :], []),
        (b"text\r" + uuencode("a.bin", b"abc"), []),
        (b"  " + uuencode("a.bin", b"abc"), []),
        # A "begin" inside a line does not hide the one that starts the next line.
        (b"begin begin 644 z\n" + uuencode("a.bin", b"abc"), [("a.bin", b"abc")]),
        (b"to begin 644 x\r\n" + uuencode("a.bin", b"abc").replace(b"\n", b"\r\n"), [("a.bin", b"abc")]),
    ],
)
def test_find_uuencoded(text: bytes, blocks: list[tuple[str, bytes]]) -> None:
    assert [(name, data) for name, _, data in find_uuencoded(text)] == blocks


def test_too_many_parts_is_a_problem_and_stops_the_walk() -> None:
    raw = mail("body\n", [(f"f{i}.txt", b"x") for i in range(20)])
    result = inspect(raw, 10, 10)
    assert result.problems == ("more than 10 MIME parts (max_parts)",)
    assert len(result.parts) < 10


def test_uuencoded_blocks_count_as_parts() -> None:
    text = b"".join(uuencode(f"f{i}.bin", b"data") for i in range(5))
    assert inspect(raw_mail(text_part(text)), 4, 10).problems


def nested(depth: int) -> bytes:
    msg = EmailMessage()
    msg.set_content("leaf")
    for _ in range(depth):
        outer = EmailMessage()
        outer.make_mixed()
        outer.attach(msg)
        msg = outer
    msg["Subject"] = "nested"
    return msg.as_bytes(policy=SMTP)


def test_nesting_bound() -> None:
    assert not inspect(nested(5), 100, 5).problems
    assert inspect(nested(6), 100, 5).problems == ("MIME parts nested more than 5 levels deep (max_depth)",)
    # message/rfc822 nesting counts too
    assert inspect(forwarded(forwarded(INNER)), 100, 2).problems


def test_nesting_too_deep_for_the_parser_fails_outright() -> None:
    raw = b"Subject: leaf\r\n\r\nbody\r\n"
    for _ in range(1500):
        raw = b"Content-Type: message/rfc822\r\n\r\n" + raw
    result = inspect(raw, 100_000, 100_000)
    assert result.failure
    assert result.message is None
    assert not result.parts


MALFORMED = [
    b"",
    b"\r\n\r\n",
    b"no headers at all, just text\r\n",
    b"\x00\xff\xfe binary junk \x80\x81" * 100,
    # multipart without a boundary parameter
    b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n",
    # boundary never closed, truncated in a part
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: application/zip; name=a.zip\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\nUEsDBAo",
    # invalid base64, unknown transfer encoding, unknown charset, broken parameters
    b"Content-Type: text/plain; charset=x-nonsense\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64$$$\r\n",
    b"Content-Type: application/x; name*0*=bogus'';\r\nContent-Transfer-Encoding: x-weird\r\n\r\ndata\r\n",
    b"Content-Type: ;;;; boundary==\"\r\nContent-Disposition: attachment; filename*='''%%%\r\n\r\nx\r\n",
    b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n",
    b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nabc\r\n",  # bad padding
    b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 a\r\n!!!!\r\n",
    # a header line without a colon, folded garbage
    b"Subject: x\r\n this is folded\r\nnot a header\r\n\r\nbody\r\n",
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_mime_never_raises(raw: bytes) -> None:
    result = inspect(raw, 100, 10)
    assert result.raw is raw
    assert result.failure == ""
    assert result.message is not None
    for part in result.parts:
        assert isinstance(part.data, bytes)


def test_defects_are_counted() -> None:
    assert inspect(MALFORMED[4], 100, 10).defects >= 1


@pytest.mark.parametrize(("linesep", "raw"), [("\r\n", mail()), ("\n", mail(linesep="\n"))])
def test_line_ending_is_detected(linesep: str, raw: bytes) -> None:
    assert inspect(raw, 100, 10).linesep == linesep


def _base64_bodies() -> list[bytes]:
    """Well-formed base64 bodies and every kind of damage the stdlib is lenient about."""
    rng = random.Random(7)
    bodies = [b"", b"\r\n", b"YWJj", b"YWI=\r\n", b"YW==\r\n", b"YWJj\nYWJj\n", b"YWJj\rYWJj\r", b"YWJj \r\n"]
    bodies += [b"YWI=YWJj\r\n", b"=YWJj\r\n", b"YWJ\r\n", b"Y\r\n", b"YW=j\r\n", b"YWJjZA===\r\n", b"YWJj\xe9\r\n"]
    for _ in range(400):
        data = rng.randbytes(rng.randrange(0, 600))
        encoded = base64.b64encode(data)
        width = rng.choice([4, 60, 76, 77, 1000])
        body = b"\r\n".join(encoded[i : i + width] for i in range(0, len(encoded), width)) + b"\r\n"
        if rng.random() < 0.6 and body:
            at = rng.randrange(len(body))
            damage = rng.choice([b"", b"=", b"==", b"\n", b"\r", b" ", b"*", b"-", b"\x00", b"\xff", b"A"])
            body = body[:at] + damage + body[at + rng.choice([0, 1]) :]
        bodies.append(body)
    return bodies


def test_decoded_payload_is_what_the_stdlib_decodes() -> None:
    for body in _base64_bodies():
        raw = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body
        ours, theirs = parse(raw), BytesParser(policy=compat32).parsebytes(raw)
        assert decoded_payload(ours) == theirs.get_payload(decode=True), body
        assert [type(d) for d in ours.defects] == [type(d) for d in theirs.defects], body


def test_decoded_payload_of_other_encodings_and_containers() -> None:
    raw = mail("body\n", [("a.pdf", b"%PDF-1.4 a")])
    message = parse(raw)
    assert decoded_payload(message) == b""  # a multipart has no payload of its own
    leaves = [navigate(message, (i,)) for i in range(2)]
    assert [decoded_payload(leaf) for leaf in leaves] == [leaf.get_payload(decode=True) for leaf in leaves]
    assert decoded_payload(leaves[1]) == b"%PDF-1.4 a"

"""The scanner's job handler with the real clamd: what it delivers, removes and holds.

The bundled test signatures (etc/clamav/smtpgw.hsb) are SHA-256 hashes of whole
files, so the EICAR cases carry EICAR as an exact file (base64, or quoted-
printable ending in a soft line break); a text part ending in a line break is
a different file to a hash signature.
"""

from __future__ import annotations

import base64
import binascii
import email
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from email.policy import compat32
from pathlib import Path

import pytest

from services.scanner.app import build_handler
from shared.clamd import ClamdClient
from shared.config import Config
from shared.envelope import Action, Client, Envelope
from shared.transport import Job, Output, Queue
from tests.support import EICAR, TESTFILES
from tests.unit.scanner.builders import mail, patch_zip_sizes, raw_mail, settings, text_part, zip_of

pytestmark = pytest.mark.integration

VIRUS_ONLY = {"blocked_extensions": [], "block_executables": False, "filters": ["limits", "virus"]}


def job(body: bytes, queue_id: str = "01JSCANTEST") -> Job:
    env = Envelope(
        queue_id,
        datetime.now(UTC),
        Client("192.0.2.1"),
        "sender@example.org",
        ("user@example.test",),
        len(body),
    )
    return Job(Queue.SCAN, env, body)


def scan(clamd_address: str, body: bytes, **scanner: object) -> list[Output]:
    handler = build_handler(Config(scanner=settings(**scanner)), ClamdClient(clamd_address, 60))
    return list(handler(job(body)))


def delivered(outputs: Sequence[Output]) -> list[bytes]:
    return [o.body for o in outputs if o.queue is Queue.DELIVER]


def leaf_payloads(body: bytes) -> list[bytes]:
    msg = email.message_from_bytes(body, policy=compat32)
    payloads = [p.get_payload(decode=True) for p in msg.walk() if not p.is_multipart()]
    return [p if isinstance(p, bytes) else b"" for p in payloads]


def qp_attachment(name: str, data: bytes) -> bytes:
    # A soft line break at the end: the decoded file is exactly `data` (RFC 2045 section 6.7, rule 5).
    return text_part(data + b"=", name=name, cte=b"quoted-printable", disposition=b"attachment")


def b64_attachment(name: str, data: bytes, ctype: bytes = b"application/octet-stream") -> bytes:
    return text_part(base64.encodebytes(data).replace(b"\n", b"\r\n"), name=name, ctype=ctype, cte=b"base64")


EICAR_CASES = {
    "plain text attachment": raw_mail(text_part(b"see attachment"), qp_attachment("readme.txt", EICAR)),
    "base64 attachment": mail(attachments=[("notes.txt", EICAR)]),
    "zipped": mail(attachments=[("files.zip", zip_of([("eicar.txt", EICAR)]))]),
    "nested zip": mail(attachments=[("outer.zip", zip_of([("inner.zip", zip_of([("eicar.txt", EICAR)]))]))]),
    "renamed": raw_mail(text_part(b"photo"), b64_attachment("holiday.jpg", EICAR, b"image/jpeg")),
    "forwarded message": raw_mail(
        text_part(b"fwd"), b"Content-Type: message/rfc822\r\n\r\n" + mail(attachments=[("e.txt", EICAR)])
    ),
}


@pytest.mark.parametrize("case", list(EICAR_CASES))
def test_eicar_attachment_is_removed(clamd_address: str, case: str) -> None:
    body = EICAR_CASES[case]
    outputs = scan(clamd_address, body)
    held, sent = outputs
    assert (held.queue, held.body, held.envelope.queue_id) == (Queue.QUARANTINE, body, "01JSCANTEST.q")
    assert sent.queue is Queue.DELIVER
    assert EICAR not in sent.body
    assert all(EICAR not in p for p in leaf_payloads(sent.body))
    assert b"was infected with a virus and removed" in sent.body
    assert [v.category for v in sent.envelope.verdicts] == ["virus"]
    assert sent.envelope.verdicts[0].reason.startswith("Eicar-Test-Signature")
    assert sent.envelope.size == len(sent.body)


def test_eicar_body_quarantines_the_message(clamd_address: str) -> None:
    body = b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(EICAR)
    [held] = scan(clamd_address, body, actions={"virus": "strip"})
    assert (held.queue, held.body) == (Queue.QUARANTINE, body)
    assert held.envelope.verdicts[0].category == "virus"
    assert held.envelope.verdicts[0].action is Action.QUARANTINE


@pytest.mark.parametrize("policy", ["default", "virus-only"])
def test_every_clamav_testfile_is_removed_or_held(clamd_address: str, policy: str) -> None:
    files = sorted(os.listdir(TESTFILES))
    assert len(files) > 30
    handler = build_handler(
        Config(scanner=settings(**(VIRUS_ONLY if policy == "virus-only" else {}))), ClamdClient(clamd_address, 60)
    )
    for name in files:
        content = Path(TESTFILES, name).read_bytes()
        outputs = handler(job(mail(f"test file {name}\n", [(name, content)])))
        for body in delivered(outputs):
            assert content not in leaf_payloads(body), f"{name} reached the mail system intact"
            assert base64.encodebytes(content)[:200] not in body, name
        categories = {v.category for o in outputs for v in o.envelope.verdicts}
        expected = (
            {"virus", "unscannable"} if policy == "virus-only" else {"virus", "unscannable", "attachment", "archive"}
        )
        assert categories, name
        assert categories <= expected, (name, categories)


def test_emax_archive_with_only_clamd_standing_in_the_way(clamd_address: str) -> None:
    """clam_cache_emax.tgz nests deeper than clamd's MaxRecursion: with AlertExceedsMax that is
    Heuristics.Limits.Exceeded, the "unscannable" category, held by default."""
    body = mail("see attached\n", [("clam_cache_emax.tgz", Path(TESTFILES, "clam_cache_emax.tgz").read_bytes())])
    [held] = scan(clamd_address, body, **VIRUS_ONLY)
    assert held.queue is Queue.QUARANTINE
    assert held.envelope.verdicts[0].category == "unscannable"
    assert held.envelope.verdicts[0].part == "2:clam_cache_emax.tgz"
    [held] = scan(clamd_address, body)  # the default chain: the archive filter sees it first
    assert held.envelope.verdicts[0].category == "archive"


def test_clean_mail_is_delivered_untouched(clamd_address: str) -> None:
    body = mail("Hello,\nthe figures are attached.\n", [("figures.pdf", b"%PDF-1.7\n" + os.urandom(100_000))])
    [out] = scan(clamd_address, body)
    assert out.queue is Queue.DELIVER
    assert out.body is body
    assert out.envelope.verdicts == ()  # it goes on as it came (the spool moves its file)


def test_infected_and_clean_attachments_together(clamd_address: str) -> None:
    keep = os.urandom(20_000)
    body = mail("two files\n", [("keep.bin", keep), ("bad.txt", EICAR), ("also.pdf", b"%PDF-1.4 fine")])
    _, sent = scan(clamd_address, body)
    payloads = leaf_payloads(sent.body)
    assert keep in payloads
    assert b"%PDF-1.4 fine" in payloads
    assert EICAR not in payloads
    assert sent.body.count(b"The attachment (bad.txt) was infected with a virus and removed.") == 1


def test_uuencoded_eicar_is_cut_out(clamd_address: str) -> None:
    block = b"begin 644 eicar.com\r\n" + binascii.b2a_uu(EICAR[:45]) + binascii.b2a_uu(EICAR[45:]) + b"`\r\nend\r\n"
    body = raw_mail(text_part(b"Hello,\r\n" + block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"bye\r\n"))
    outputs = scan(clamd_address, body, **VIRUS_ONLY)
    [sent] = delivered(outputs)
    text = leaf_payloads(sent)[0]
    assert text.startswith(b"Hello,\r\n")
    assert text.endswith(b"bye\r\n")
    assert b"begin 644" not in text
    assert b"The attachment (eicar.com) was infected" in text


def test_encrypted_zip_is_held(clamd_address: str) -> None:
    locked = patch_zip_sizes(zip_of([("secret.doc", b"secret " * 100)]), flags=0x1)
    [held] = scan(clamd_address, mail(attachments=[("secret.zip", locked)]))
    assert held.queue is Queue.QUARANTINE
    assert held.envelope.verdicts[0].category == "encrypted"
    # clamd says the same on its own (AlertEncryptedArchive in the bundled clamd.conf).
    [held] = scan(clamd_address, mail(attachments=[("secret.zip", locked)]), **VIRUS_ONLY)
    assert held.envelope.verdicts[0].category == "encrypted"

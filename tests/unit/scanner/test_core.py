from __future__ import annotations

import email
from email.policy import compat32

import pytest

from services.scanner import core
from services.scanner.core import decide, scan_message, strip_refs
from shared.envelope import Action, Verdict
from tests.unit.scanner.builders import NEEDLE, FakeClamd, mail, raw_mail, settings, text_part

D, S, Q, X = Action.DELIVER, Action.STRIP, Action.QUARANTINE, Action.DELETE


@pytest.mark.parametrize(
    ("actions", "combined"),
    [
        ((), D),
        ((D,), D),
        ((D, S), S),
        ((S, S), S),
        ((S, X), X),  # deleting the message wins over cleaning it
        ((X, Q), Q),  # quarantine loses nothing: it wins over delete
        ((S, Q, D), Q),
        ((D, X), X),
    ],
)
def test_decide(actions: tuple[Action, ...], combined: Action) -> None:
    assert decide([Verdict("f", "c", a, "r") for a in actions]) is combined


def test_strip_refs() -> None:
    verdicts = [
        Verdict("attachments", "attachment", S, "r", "2:a.exe"),
        Verdict("virus", "virus", S, "r", "2:a.exe"),
        Verdict("attachments", "attachment", S, "r", "2:a.exe"),
        Verdict("archives", "archive", S, "r", "3.1:b.zip"),
        Verdict("virus", "virus", Q, "r", "4:c"),
    ]
    assert strip_refs(verdicts) == {"2": "virus", "3.1": "archive"}


def test_clean_message_one_parse_one_call_same_bytes() -> None:
    raw = mail("hello\n", [("a.pdf", b"%PDF-1.4")])
    clamd = FakeClamd()
    outcome = scan_message(raw, settings(), clamd)
    assert outcome.action is D
    assert outcome.body is raw
    assert outcome.clamd_calls == 1
    assert clamd.calls == [raw]
    assert [(v.category, v.action) for v in outcome.verdicts] == [("clean", D)]


def infected_attachment(name: str = "notes.txt") -> bytes:
    return raw_mail(text_part(b"hello"), text_part(NEEDLE, name=name, disposition=b"attachment"))


def test_strip_rebuilds_with_the_notice_and_scans_again() -> None:
    raw = infected_attachment()
    clamd = FakeClamd()
    outcome = scan_message(raw, settings(), clamd)
    assert outcome.action is S
    assert NEEDLE not in outcome.body
    assert b"The attachment (notes.txt) was infected with a virus and removed." in outcome.body
    assert outcome.clamd_calls == 4  # message, its two parts, the rebuilt message
    assert outcome.body.endswith(clamd.calls[-1])  # the rescan saw the rebuilt message (the header came after)
    headers = email.message_from_bytes(outcome.body, policy=compat32)
    assert headers["X-SMTPGW-Finding"].startswith("virus: strip: Test.Needle in 'notes.txt'")


def test_blocked_attachment_notice_uses_blocked_text() -> None:
    config = settings(blocked_text="Removed: %FILENAME%.")
    outcome = scan_message(mail(attachments=[("tool.exe", b"x")]), config, FakeClamd())
    assert outcome.action is S
    assert b"Removed: tool.exe." in outcome.body


def test_what_remains_infected_after_stripping_is_quarantined() -> None:
    raw = infected_attachment().replace(b"Subject: raw", b"Subject: raw\r\nX-Trigger: yes")
    clamd = FakeClamd(verdict=lambda data: "Test.Needle" if NEEDLE in data or b"X-Trigger" in data else None)
    outcome = scan_message(raw, settings(), clamd)
    assert outcome.action is Q
    assert outcome.body is raw
    assert (
        outcome.verdicts[0].reason
        == "Test.Needle still found after removing the infected attachments (not in a removable attachment)"
    )


def test_chain_order_and_first_decisive_verdict_ends_it() -> None:
    raw = mail(attachments=[(f"{i}.exe", b"x") for i in range(5)])
    clamd = FakeClamd()
    outcome = scan_message(raw, settings(max_parts=3), clamd)
    assert outcome.action is Q
    assert [v.category for v in outcome.verdicts] == ["limits"]
    assert clamd.calls == []  # limits came first and decided
    clamd = FakeClamd()
    outcome = scan_message(raw, settings(max_parts=3, filters=["virus", "limits", "attachments"]), clamd)
    assert len(clamd.calls) == 1
    assert [v.category for v in outcome.verdicts] == ["limits"]


def test_combining_filters() -> None:
    raw = raw_mail(
        text_part(b"hello"),
        text_part(b"x", name="tool.exe", disposition=b"attachment"),
        text_part(NEEDLE, name="notes.txt", disposition=b"attachment"),
    )
    outcome = scan_message(raw, settings(), FakeClamd())
    assert outcome.action is S
    assert {(v.category, v.part) for v in outcome.verdicts} == {("attachment", "2:tool.exe"), ("virus", "3:notes.txt")}
    assert outcome.body.count(b"was blocked by the mail policy") == 1
    assert outcome.body.count(b"was infected with a virus") == 1
    outcome = scan_message(raw, settings(actions={"virus": "quarantine"}), FakeClamd())
    assert outcome.action is Q
    assert outcome.verdicts[0].category == "virus"  # the reason for the quarantine comes first
    outcome = scan_message(raw, settings(actions={"virus": "delete"}), FakeClamd())
    assert outcome.action is X


def test_findings_delivered_anyway_are_recorded_in_a_header() -> None:
    raw = mail(attachments=[("tool.exe", b"x")])
    outcome = scan_message(raw, settings(actions={"attachment": "deliver"}), FakeClamd())
    assert outcome.action is D
    assert outcome.body.endswith(raw)
    assert outcome.body.startswith(b"X-SMTPGW-Finding: attachment: deliver: blocked file type .exe")


def test_finding_fields_a_message_arrives_with_are_removed() -> None:
    """Only the gateway writes X-SMTPGW-Finding: a sender's copies go, whatever the verdict."""
    forged = b"X-SMTPGW-Finding: clean: deliver: checked by your bank\r\n"
    clean = mail("hello\n")
    outcome = scan_message(forged + clean, settings(), FakeClamd())
    assert (outcome.action, outcome.body, outcome.forged) == (D, clean, 1)
    assert outcome.verdicts[0].category == "clean"
    # With findings of its own: the gateway's fields on top, the forged one gone.
    raw = mail(attachments=[("tool.exe", b"x")])
    outcome = scan_message(forged + raw, settings(actions={"attachment": "deliver"}), FakeClamd())
    assert outcome.body.startswith(b"X-SMTPGW-Finding: attachment: deliver: blocked file type .exe")
    assert outcome.body.endswith(b"\r\n" + raw)  # the gateway's one field, then the message as sent
    assert outcome.body.count(b"X-SMTPGW-Finding:") == 1
    assert outcome.forged == 1
    stripped = scan_message(forged + raw, settings(), FakeClamd())
    assert stripped.action is S
    assert stripped.forged == 1
    assert stripped.body.count(b"X-SMTPGW-Finding:") == 1
    assert b"your bank" not in stripped.body
    # What is not delivered keeps them: the quarantine holds the message as it came.
    held = scan_message(forged + raw, settings(actions={"attachment": "quarantine"}), FakeClamd())
    assert (held.action, held.body, held.forged) == (Q, forged + raw, 0)


@pytest.mark.parametrize(("configured", "expected"), [("deliver", Q), ("strip", Q), ("quarantine", Q), ("delete", X)])
def test_a_failed_parse_never_delivers(configured: str, expected: Action) -> None:
    raw = b"Subject: leaf\r\n\r\nbody\r\n"
    for _ in range(1500):
        raw = b"Content-Type: message/rfc822\r\n\r\n" + raw
    clamd = FakeClamd()
    outcome = scan_message(raw, settings(actions={"limits": configured}), clamd)
    assert outcome.action is expected
    assert outcome.verdicts[0].filter == "mime"


def test_a_rebuild_that_fails_quarantines(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> bytes:
        raise LookupError("no such part")

    monkeypatch.setattr(core, "replace_parts", broken)
    outcome = scan_message(mail(attachments=[("tool.exe", b"x")]), settings(), FakeClamd())
    assert outcome.action is Q
    assert "cannot remove attachments" in outcome.verdicts[0].reason


def test_malformed_mime_is_still_scanned() -> None:
    raw = b"Content-Type: multipart/mixed\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n" + NEEDLE + b"\r\n--x--\r\n"
    clamd = FakeClamd()
    outcome = scan_message(raw, settings(), clamd)
    assert clamd.calls[0] is raw
    assert outcome.action is Q  # found, and not in a part that could be removed

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from services.scanner import mimeparse
from services.scanner.app import build_handler, outputs_for
from services.scanner.core import Outcome
from shared.config import Config
from shared.envelope import Action, Client, Envelope, Verdict
from shared.errors import RetryLater, ScanError, ScanLimitExceeded, ScannerUnavailable
from shared.transport import Job, Queue
from tests.unit.scanner.builders import NEEDLE, FakeClamd, mail, raw_mail, settings, text_part

PREVIOUS = Verdict("receiver", "accepted", Action.DELIVER, "earlier step")


def job(body: bytes, *, crlf_clean: bool = False) -> Job:
    env = Envelope(
        queue_id="01JTESTQUEUEID",
        received_at=datetime(2026, 1, 1, tzinfo=UTC),
        client=Client("192.0.2.1"),
        mail_from="sender@example.org",
        rcpt_to=("user@example.test",),
        size=len(body),
        verdicts=(PREVIOUS,),
        crlf_clean=crlf_clean,
    )
    return Job(Queue.SCAN, env, body)


def outcome(action: Action, body: bytes, *verdicts: Verdict) -> Outcome:
    return Outcome(action, verdicts or (Verdict("scanner", "clean", Action.DELIVER, "ok"),), body, 1, 1)


FINDING = Verdict("attachments", "attachment", Action.STRIP, "blocked", "2:a.exe")


def test_clean_mail_goes_on_unchanged() -> None:
    """The same envelope and body objects: the spool moves the file instead of rewriting it."""
    j = job(b"Subject: x\r\n\r\nhi\r\n")
    [out] = outputs_for(j, outcome(Action.DELIVER, j.body))
    assert out.queue is Queue.DELIVER
    assert out.body is j.body
    assert out.envelope is j.envelope


def test_findings_delivered_with_the_body_unchanged_are_recorded() -> None:
    j = job(b"Subject: x\r\n\r\nhi\r\n")
    finding = Verdict("spam", "spam", Action.DELIVER, "score 6")
    [out] = outputs_for(j, outcome(Action.DELIVER, j.body, finding))
    assert out.body is j.body
    assert out.envelope.queue_id == j.envelope.queue_id
    assert out.envelope.verdicts == (PREVIOUS, finding)
    assert out.envelope.size == j.envelope.size


def test_strip_keeps_the_original_in_quarantine() -> None:
    j = job(b"Subject: x\r\n\r\noriginal\r\n")
    new = b"Subject: x\r\n\r\nstripped\r\n"
    held, delivered = outputs_for(j, outcome(Action.STRIP, new, FINDING))
    assert (held.queue, held.body) == (Queue.QUARANTINE, j.body)
    assert held.envelope.queue_id == "01JTESTQUEUEID.q"
    assert held.envelope.parent_id == "01JTESTQUEUEID"
    assert held.envelope.verdicts == (PREVIOUS, FINDING)
    assert (delivered.queue, delivered.body) == (Queue.DELIVER, new)
    assert delivered.envelope.queue_id == "01JTESTQUEUEID"
    assert delivered.envelope.size == len(new)


@pytest.mark.parametrize("clean", [True, False])
def test_an_unchanged_body_keeps_its_line_end_check(clean: bool) -> None:
    j = job(b"Subject: x\r\n\r\nhi\r\n", crlf_clean=clean)
    finding = Verdict("spam", "spam", Action.DELIVER, "score 6")
    for out in (
        *outputs_for(j, outcome(Action.DELIVER, j.body)),
        *outputs_for(j, outcome(Action.DELIVER, j.body, finding)),
    ):
        assert out.envelope.crlf_clean is clean


@pytest.mark.parametrize(
    ("new", "clean"),
    [(b"Subject: x\r\n\r\nstripped\r\n", True), (b"Subject: x\r\n\r\nstripped\n", False)],
)
def test_a_rebuilt_body_is_checked_anew(new: bytes, clean: bool) -> None:
    """Delivery skips its own search only for a body marked clean: a rebuilt body gets the mark
    from a check of its own bytes, whatever the original had; the original keeps its own."""
    j = job(b"Subject: x\r\n\r\noriginal\r\n", crlf_clean=True)
    held, delivered = outputs_for(j, outcome(Action.STRIP, new, FINDING))
    assert held.envelope.crlf_clean is True
    assert delivered.envelope.crlf_clean is clean


def test_quarantine_and_delete() -> None:
    j = job(b"Subject: x\r\n\r\nhi\r\n")
    finding = Verdict("virus", "virus", Action.QUARANTINE, "found")
    [held] = outputs_for(j, outcome(Action.QUARANTINE, j.body, finding))
    assert (held.queue, held.body, held.envelope.queue_id) == (Queue.QUARANTINE, j.body, j.envelope.queue_id)
    assert outputs_for(j, outcome(Action.DELETE, j.body, finding)) == []


def test_deliver_with_findings_updates_the_size() -> None:
    j = job(b"Subject: x\r\n\r\nhi\r\n")
    marked = b"X-SMTPGW-Finding: x\r\n" + j.body
    [out] = outputs_for(j, outcome(Action.DELIVER, marked, Verdict("f", "attachment", Action.DELIVER, "r")))
    assert (out.queue, out.body, out.envelope.size) == (Queue.DELIVER, marked, len(marked))


@pytest.mark.parametrize(
    "error", [ScannerUnavailable("connection refused"), ScanLimitExceeded("size limit"), ScanError("garbage")]
)
def test_scan_failures_retry_later_never_pass(error: ScanError) -> None:
    config = Config(scanner=settings(retry_delay="45s"))
    handler = build_handler(config, FakeClamd(error=error))
    with pytest.raises(RetryLater) as raised:
        handler(job(mail()))
    assert raised.value.delay == 45.0
    assert str(error) in raised.value.reason


def test_handler_end_to_end_with_metrics_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    def sample(category: str, action: str) -> float:
        return (
            REGISTRY.get_sample_value("smtpgw_scanner_verdicts_total", {"category": category, "action": action}) or 0.0
        )

    before = sample("virus", "strip"), sample("clean", "deliver")
    handler = build_handler(Config(), FakeClamd())
    raw = raw_mail(text_part(b"hello"), text_part(NEEDLE, name="notes.txt", disposition=b"attachment"))
    with caplog.at_level(logging.INFO, logger="services.scanner.app"):
        held, delivered = handler(job(raw))
        [clean] = handler(job(mail()))
    assert NEEDLE in held.body
    assert NEEDLE not in delivered.body
    assert clean.queue is Queue.DELIVER
    assert (sample("virus", "strip"), sample("clean", "deliver")) == (before[0] + 1, before[1] + 1)
    lines = [r for r in caplog.records if r.getMessage() == "scanned"]
    assert len(lines) == 2
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert (fields["verdict"], fields["action"], fields["parts"], fields["clamd"]) == ("virus", "strip", 2, 4)
    assert fields["part"] == "2:notes.txt"
    assert float(fields["duration"]) >= 0
    assert lines[1].fields["verdict"] == "clean"  # type: ignore[attr-defined]


def test_a_message_that_came_with_finding_fields_is_delivered_without_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    j = job(b"X-SMTPGW-Finding: virus: deliver: forged\r\n" + mail(), crlf_clean=True)
    with caplog.at_level(logging.INFO, logger="services.scanner.app"):
        [out] = build_handler(Config(), FakeClamd())(j)
    assert (out.queue, out.body) == (Queue.DELIVER, mail())
    assert out.envelope.size == len(mail())
    [line] = [r for r in caplog.records if r.getMessage() == "scanned"]
    assert line.fields["verdict"] == "clean"  # type: ignore[attr-defined]
    assert line.fields["forged_findings"] == 1  # type: ignore[attr-defined]


def test_delete_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    handler = build_handler(Config(scanner=settings(actions={"attachment": "delete"})), FakeClamd())
    with caplog.at_level(logging.INFO, logger="services.scanner.app"):
        assert handler(job(mail(attachments=[("a.exe", b"x")]))) == []
    [line] = [r for r in caplog.records if r.getMessage() == "scanned"]
    assert line.levelno == logging.WARNING
    assert line.fields["action"] == "delete"  # type: ignore[attr-defined]


def test_outage_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    clamd = FakeClamd(error=ScannerUnavailable("down"))
    handler = build_handler(Config(), clamd)
    with caplog.at_level(logging.INFO, logger="services.scanner.app"):
        for _ in range(3):
            with pytest.raises(RetryLater):
                handler(job(mail()))
        clamd.error = None
        handler(job(mail()))
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("clamd failed; messages wait and are retried") == 1
    assert messages.count("clamd answers again") == 1


@pytest.mark.parametrize("clean", [True, False])
def test_the_envelope_mark_spares_the_parser_its_bare_cr_search(clean: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    searched: list[int] = []

    def recording(data: bytes) -> bool:
        searched.append(len(data))
        return False

    monkeypatch.setattr(mimeparse, "bare_cr", recording)
    body = mail(attachments=[("report.pdf", b"%PDF-1.4\n" + bytes(range(256)) * 64)])
    assert len(body) >= 4 * mimeparse.MIN_ELIDED  # long enough for the parser's elided path
    [out] = build_handler(Config(), FakeClamd())(job(body, crlf_clean=clean))
    assert out.queue is Queue.DELIVER
    assert searched == ([] if clean else [len(body)])

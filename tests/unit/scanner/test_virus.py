from __future__ import annotations

import binascii

import pytest

from services.scanner.context import ScanContext
from services.scanner.mime import inspect
from services.scanner.policy import virus
from shared.config import ScannerConfig
from shared.errors import ScannerUnavailable
from tests.unit.scanner.builders import NEEDLE, FakeClamd, mail, raw_mail, settings, text_part, zip_of


def run(
    raw: bytes, clamd: FakeClamd, config: ScannerConfig | None = None
) -> tuple[list[tuple[str, str, str]], ScanContext]:
    config = config or settings()
    ctx = ScanContext(inspect(raw, config.max_parts, config.max_depth), config, clamd)
    return [(v.category, str(v.action), v.part) for v in virus.check(ctx)], ctx


def test_clean_message_costs_one_call() -> None:
    clamd = FakeClamd()
    raw = mail("hello\n", [("a.pdf", b"%PDF"), ("b.txt", b"text")])
    assert run(raw, clamd)[0] == []
    assert clamd.calls == [raw]


def test_infected_attachment_is_located() -> None:
    clamd = FakeClamd()
    raw = raw_mail(text_part(b"hello"), text_part(NEEDLE, name="notes.txt", disposition=b"attachment"), text_part(b"x"))
    verdicts, ctx = run(raw, clamd)
    assert verdicts == [("virus", "strip", "2:notes.txt")]
    assert ctx.infected
    assert clamd.calls[0] is ctx.inspection.raw
    assert clamd.calls[1:] == [b"hello", NEEDLE, b"x"]  # then each part on its own


def test_infected_body_quarantines() -> None:
    verdicts, _ = run(raw_mail(text_part(b"body " + NEEDLE), text_part(b"x", name="a.txt")), FakeClamd())
    [(category, action, part)] = verdicts
    assert (category, action, part) == ("virus", "quarantine", "1:")


def test_infection_no_part_explains_quarantines_the_message() -> None:
    # clamd sees it in the whole message only (say, split across parts).
    clamd = FakeClamd(verdict=lambda data: "Split.Sig" if b"PART-A" in data and b"PART-B" in data else None)
    raw = raw_mail(text_part(b"PART-A", name="a.txt"), text_part(b"PART-B", name="b.txt"))
    verdicts, _ = run(raw, clamd)
    assert verdicts == [("virus", "quarantine", "")]


def test_uuencoded_block_is_what_gets_removed() -> None:
    # The fake finds the needle in the decoded block and in the raw text holding it.
    text = b"see:\r\nbegin 644 tool.bin\r\n" + binascii.b2a_uu(NEEDLE).replace(b"\n", b"\r\n") + b"`\r\nend\r\n"
    clamd = FakeClamd(verdict=lambda data: "Test.Needle" if NEEDLE in data or b"begin 644" in data else None)
    verdicts, _ = run(raw_mail(text_part(text)), clamd)
    assert verdicts == [("virus", "strip", "1.uu1:tool.bin")]


@pytest.mark.parametrize(
    ("signature", "category"),
    [("Heuristics.Limits.Exceeded.MaxRecursion", "unscannable"), ("Heuristics.Encrypted.Zip", "encrypted")],
)
def test_heuristic_categories(signature: str, category: str) -> None:
    raw = raw_mail(text_part(b"hi"), text_part(NEEDLE, name="x.zip", disposition=b"attachment"))
    verdicts, _ = run(raw, FakeClamd(signature=signature))
    assert verdicts == [(category, "quarantine", "2:x.zip")]


def test_archives_are_also_scanned_on_their_own() -> None:
    archive = zip_of([("a.txt", b"a")])
    # A clamd that finds nothing in the message but something in the archive alone.
    clamd = FakeClamd(verdict=lambda data: "Heuristics.Limits.Exceeded.MaxRecursion" if data == archive else None)
    raw = mail("hi\n", [("a.zip", archive), ("b.pdf", b"%PDF"), ("c.7z", b"7z\xbc\xaf\x27\x1c..."), ("d.rar", b"junk")])
    verdicts, _ = run(raw, clamd)
    assert verdicts == [("unscannable", "quarantine", "2:a.zip")]
    assert len(clamd.calls) == 4  # the message, then each archive-like attachment (by content or name)


def test_configured_virus_action() -> None:
    raw = raw_mail(text_part(b"hello"), text_part(NEEDLE, name="notes.txt", disposition=b"attachment"))
    assert run(raw, FakeClamd(), settings(actions={"virus": "delete"}))[0] == [("virus", "delete", "2:notes.txt")]


def test_clamd_failure_propagates() -> None:
    with pytest.raises(ScannerUnavailable):
        run(mail(), FakeClamd(error=ScannerUnavailable("down")))

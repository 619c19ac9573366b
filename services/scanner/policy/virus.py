"""Filter "virus": clamd.

ClamAV decodes MIME, transfer encodings and archives itself, so one INSTREAM
scan of the raw message finds whatever any part carries: a clean message
costs exactly one clamd call. Only when that scan finds something are the
parts scanned one by one, to learn which attachment to remove; when no part
on its own explains the finding (an infected body, or something ClamAV sees
only in the message as a whole), the finding concerns the message and
quarantines it.

Archive attachments are also scanned on their own even when the message is
clean: inside a message an archive sits a few levels deeper, and a clamd run
without AlertExceedsMax answers OK when it hits its recursion limit there.

A clamd failure raises ScanError (never a verdict): the message is retried,
never passed unscanned.
"""

from __future__ import annotations

from services.scanner.archive import detect
from services.scanner.context import ScanContext
from services.scanner.magic import archive_format_by_name
from services.scanner.mime import Part
from services.scanner.reply import category_of
from shared.clamd import ScanResult
from shared.envelope import Verdict


def check(ctx: ScanContext) -> list[Verdict]:
    whole = ctx.clamd.scan(ctx.inspection.raw)
    if whole.found:
        ctx.infected = True
        return _locate(ctx, whole)
    verdicts = []
    for part in ctx.inspection.parts:
        if _is_archive(part):
            result = ctx.clamd.scan(part.data)
            if result.found:
                verdicts.append(_verdict(ctx, result, part))
    return verdicts


def _locate(ctx: ScanContext, whole: ScanResult) -> list[Verdict]:
    parts = [p for p in ctx.inspection.parts if p.data]
    results = {p.ref: ctx.clamd.scan(p.data) for p in parts}
    # A text part holding an infected uuencoded block is infected through it; the block is what goes.
    explained = {p.uu_parent for p in parts if p.uu_parent and results[p.ref].found}
    verdicts = [_verdict(ctx, results[p.ref], p) for p in parts if results[p.ref].found and p.ref not in explained]
    if not verdicts:
        reason = f"{whole.signature} in the message (not in any one part)"
        verdicts.append(ctx.verdict("virus", category_of(whole.signature), reason))
    return verdicts


def _verdict(ctx: ScanContext, result: ScanResult, part: Part) -> Verdict:
    where = repr(part.name) if part.name else f"part {part.ref} ({part.content_type})"
    return ctx.verdict("virus", category_of(result.signature), f"{result.signature} in {where}", part)


def _is_archive(part: Part) -> bool:
    if not part.is_file or not part.data:
        return False
    return detect(part.data) is not None or any(archive_format_by_name(name) for name in part.names)

"""Filter "archives": archive attachments over the limits, unreadable, or encrypted.

Zip, tar, gzip, bzip2 and xz attachments are opened (by content, whatever
their name; see `services.scanner.archive`) within `archive_max_depth`,
`archive_max_size`, `archive_max_ratio` and `archive_max_entries`. Over a
limit or unreadable is the "archive" category; a password-protected member
(zip encryption flag) is "encrypted": its content cannot be checked by us or
by clamd.
"""

from __future__ import annotations

from services.scanner.context import ScanContext
from shared.envelope import Verdict


def check(ctx: ScanContext) -> list[Verdict]:
    verdicts = []
    for part in ctx.inspection.parts:
        report = ctx.archive(part)
        if report is None:
            continue
        if report.problem:
            verdicts.append(ctx.verdict("archives", "archive", report.problem, part))
        if report.encrypted:
            reason = f"password-protected archive: {report.encrypted} cannot be scanned"
            verdicts.append(ctx.verdict("archives", "encrypted", reason, part))
    return verdicts

"""Filter "attachments": blocked file types, by name and by content.

An attachment is blocked (category "attachment") when
- any name it carries (Content-Disposition filename, Content-Type name; RFC
  2231 and RFC 2047 decoded) ends in a `blocked_extensions` extension, judged
  the way Windows would: case-insensitive, the last extension only (so
  "invoice.pdf.exe" is an .exe), trailing dots and spaces dropped;
- with `block_executables`, its content is a program (PE/MZ, ELF, Mach-O,
  "#!" script), whatever it is called;
- it is an archive holding such a file, at any depth (zip, tar, and the
  compressed streams around them), or an attached message named so.
"""

from __future__ import annotations

from services.scanner.context import ScanContext
from services.scanner.filenames import extension, is_double_extension
from services.scanner.magic import executable_kind
from services.scanner.mime import Part
from shared.envelope import Verdict


def check(ctx: ScanContext) -> list[Verdict]:
    blocked = frozenset(e.strip().lower().lstrip(".") for e in ctx.config.blocked_extensions)
    verdicts = []
    for part in ctx.inspection.nodes.values():
        reason = _blocked_name(part.names, blocked)
        if not reason and not part.container:
            reason = _blocked_content(ctx, part, blocked)
        if reason:
            verdicts.append(ctx.verdict("attachments", "attachment", reason, part))
    return verdicts


def _blocked_name(names: tuple[str, ...], blocked: frozenset[str]) -> str:
    for name in names:
        ext = extension(name)
        if ext and ext in blocked:
            double = " behind a decoy extension" if is_double_extension(name) else ""
            return f"blocked file type .{ext}{double}: {name!r}"
    return ""


def _blocked_content(ctx: ScanContext, part: Part, blocked: frozenset[str]) -> str:
    if not part.is_file:
        return ""
    if ctx.config.block_executables:
        kind = executable_kind(part.data)
        if kind:
            return f"executable content ({kind}) in {part.name or part.content_type!r}"
    report = ctx.archive(part)
    if report is None:
        return ""
    for member in report.members:
        ext = extension(member.name)
        if ext and ext in blocked:
            return f"archive {part.name!r} contains {member.path!r}: blocked file type .{ext}"
        if ctx.config.block_executables and member.executable:
            return f"archive {part.name!r} contains {member.path!r}: executable content ({member.executable})"
    return ""

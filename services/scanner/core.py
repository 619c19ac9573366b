"""The scanner's pure core: run the policy chain on one message and decide.

Values in, values out: the raw message, the `[scanner]` settings and
something that scans bytes with clamd (the adapter, or a fake in tests);
out comes an `Outcome`: the action, the verdicts, and the body to hand on.

- The message is parsed once (`mime.inspect`). A parse that fails outright
  quarantines, whatever the filters would say.
- The filters run in the order `[scanner].filters` names. The first decisive
  verdict (quarantine or delete) ends the chain, as in Haraka's hook chain:
  nothing later could change the outcome, and clamd is spared.
- Verdicts combine, strongest first: quarantine > delete > strip > deliver.
  Quarantine wins over delete because it loses nothing: an administrator
  can still delete; nobody can undelete.
- "strip" replaces the named attachments with a notice (`virus_text` for
  infected ones, `blocked_text` for the rest) and re-serialises; when clamd
  had found something, the rebuilt message is scanned again, and anything
  still found quarantines it. An unchanged message keeps its original bytes.
- A message delivered despite findings (actions set to "deliver", or
  stripped) carries them in X-SMTPGW-Finding header fields. Fields of that
  name a message arrived with are removed from what is delivered, whatever
  the verdict: a sender can write them too, and the mail system downstream
  must be able to trust that the gateway wrote every one it sees
  (amavisd-new removes X-Spam-* headers from incoming mail for the same
  reason). The quarantined original keeps them.

ScanError from clamd propagates: the caller retries the message later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from services.scanner.context import ScanContext
from services.scanner.filenames import clean_for_display
from services.scanner.mime import inspect
from services.scanner.policy import archives, attachments, limits, virus
from services.scanner.rebuild import FINDINGS_HEADER, add_headers, remove_fields, replace_parts
from services.scanner.reply import VirusScanner, category_of
from shared.clamd import ScanResult
from shared.config import ScannerConfig
from shared.envelope import Action, Verdict

log = logging.getLogger(__name__)

Filter = Callable[[ScanContext], list[Verdict]]

FILTERS: Mapping[str, Filter] = {
    "limits": limits.check,
    "attachments": attachments.check,
    "archives": archives.check,
    "virus": virus.check,
}

DECISIVE = frozenset({Action.QUARANTINE, Action.DELETE})
_STRENGTH = {Action.DELIVER: 0, Action.STRIP: 1, Action.DELETE: 2, Action.QUARANTINE: 3}


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    verdicts: tuple[Verdict, ...]  # strongest first; one "clean" verdict when nothing was found
    body: bytes  # the original object unless the message was changed
    parts: int  # leaf parts and uuencoded blocks seen
    clamd_calls: int
    defects: int = 0  # MIME defects the parser worked around
    forged: int = 0  # FINDINGS_HEADER fields the message came with, removed from `body`


class _CountingScanner:
    """Counts clamd calls for the log line (and for the tests that a clean message costs one)."""

    def __init__(self, scanner: VirusScanner) -> None:
        self._scanner = scanner
        self.calls = 0

    def scan(self, data: bytes) -> ScanResult:
        self.calls += 1
        return self._scanner.scan(data)


def decide(verdicts: Sequence[Verdict]) -> Action:
    """The combined action: the strongest of the verdicts' actions (deliver when none)."""
    return max((v.action for v in verdicts), key=_STRENGTH.__getitem__, default=Action.DELIVER)


def strip_refs(verdicts: Sequence[Verdict]) -> dict[str, str]:
    """ref -> category of every part to remove; "virus" wins when a part has several findings."""
    refs: dict[str, str] = {}
    for v in verdicts:
        if v.action is Action.STRIP and v.part:
            ref = v.part.split(":", 1)[0]
            if refs.get(ref) != "virus":
                refs[ref] = v.category
    return refs


def scan_message(raw: bytes, config: ScannerConfig, clamd: VirusScanner, *, crlf_clean: bool = False) -> Outcome:
    """Run the chain on `raw` and decide. Raises ScanError when clamd fails. `crlf_clean`: the
    envelope's mark that `raw` has no bare CR or LF (see `mimeparse.parse`)."""
    counter = _CountingScanner(clamd)
    inspection = inspect(raw, config.max_parts, config.max_depth, crlf_clean=crlf_clean)
    ctx = ScanContext(inspection, config, counter)
    verdicts: list[Verdict] = []
    if inspection.failure:
        verdicts.append(_must_hold(ctx, "mime", "limits", inspection.failure))
    else:
        for name in config.filters:
            found = FILTERS[name](ctx)
            verdicts.extend(found)
            if any(v.action in DECISIVE for v in found):
                break
    action = decide(verdicts)
    body = raw
    if action is Action.STRIP:
        stripped, extra = _strip(ctx, verdicts)
        verdicts.extend(extra)
        action = decide(verdicts)
        if action is Action.STRIP:
            body = stripped
    forged = 0
    if action in (Action.DELIVER, Action.STRIP):
        body, forged = remove_fields(body, FINDINGS_HEADER, inspection.linesep)
        if verdicts:
            findings = [(FINDINGS_HEADER, f"{v.category}: {v.action}: {v.reason}") for v in _ordered(verdicts)]
            body = add_headers(body, findings, inspection.linesep)
    if not verdicts:
        verdicts.append(
            Verdict("scanner", "clean", Action.DELIVER, f"passed {', '.join(config.filters) or 'no filters'}")
        )
    return Outcome(action, _ordered(verdicts), body, len(inspection.parts), counter.calls, inspection.defects, forged)


def _strip(ctx: ScanContext, verdicts: list[Verdict]) -> tuple[bytes, list[Verdict]]:
    """Rebuild without the stripped parts; returns the new body and any further verdicts."""
    config = ctx.config
    notices = {}
    for ref, category in strip_refs(verdicts).items():
        node = ctx.inspection.nodes.get(ref)
        name = clean_for_display(node.name if node and node.name else f"part {ref}")
        template = config.virus_text if category == "virus" else config.blocked_text
        notices[ref] = template.replace("%FILENAME%", name)
    try:
        body = replace_parts(ctx.inspection, notices)
    except Exception as exc:  # a tree the generator cannot write back: keep it whole instead
        log.warning("cannot rebuild the message without its stripped parts: %s: %s", type(exc).__name__, exc)
        return ctx.inspection.raw, [_must_hold(ctx, "scanner", "limits", f"cannot remove attachments: {exc}")]
    if ctx.infected:
        again = ctx.clamd.scan(body)
        if again.found:
            reason = f"{again.signature} still found after removing the infected attachments"
            return body, [ctx.verdict("virus", category_of(again.signature), reason)]
    return body, []


def _must_hold(ctx: ScanContext, filter: str, category: str, reason: str) -> Verdict:
    """A finding that must not be delivered: quarantine, unless the category deletes."""
    action = Action(ctx.config.actions[category])
    return Verdict(filter, category, action if action is Action.DELETE else Action.QUARANTINE, reason)


def _ordered(verdicts: Sequence[Verdict]) -> tuple[Verdict, ...]:
    # Strongest first: the quarantine store files a message under its first verdict's category.
    return tuple(sorted(verdicts, key=lambda v: -_STRENGTH[v.action]))

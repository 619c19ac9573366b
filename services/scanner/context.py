"""What each filter of the policy chain is handed: the inspected message, the
scanner settings and clamd, plus the helpers every filter shares.

Filters are plain functions `check(ctx) -> list[Verdict]` (compare Mailman's
rule interface `check(mlist, msg, msgdata)`); they read the context and
return findings. The context turns a finding into a `Verdict` with the action
configured for its category, and remembers archive inspections so that the
attachment and archive filters open each archive once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.scanner.archive import ArchiveLimits, ArchiveReport, inspect_archive
from services.scanner.mime import Inspection, Part
from services.scanner.reply import VirusScanner
from shared.config import ScannerConfig
from shared.envelope import Action, Verdict


@dataclass
class ScanContext:
    inspection: Inspection
    config: ScannerConfig
    clamd: VirusScanner
    # Set by the virus filter when clamd found something in the whole message: the
    # message that remains after stripping must then be scanned again.
    infected: bool = False
    _archives: dict[str, ArchiveReport | None] = field(default_factory=dict)

    def verdict(self, filter: str, category: str, reason: str, part: Part | None = None) -> Verdict:
        """A finding -> Verdict, with the action `[scanner.actions]` names for `category`.

        "strip" needs something to remove: when the finding is not in a removable
        attachment (the message body, the message as a whole), it becomes "quarantine".
        """
        action = Action(self.config.actions[category])
        target = part.strip_ref if part is not None else None
        if action is Action.STRIP and target is None:
            action = Action.QUARANTINE
            reason = f"{reason} (not in a removable attachment)"
        if action is Action.STRIP and part is not None and target is not None:
            holder = self.inspection.nodes.get(target)
            label = f"{target}:{part.name or (holder.name if holder else '')}"
        else:
            label = part.label if part is not None else ""
        return Verdict(filter, category, action, reason, label)

    def archive(self, part: Part) -> ArchiveReport | None:
        """The archive inspection of an attachment, computed once per message."""
        if part.ref not in self._archives:
            report = None
            if part.is_file and part.data:
                config = self.config
                limits = ArchiveLimits(
                    config.archive_max_depth,
                    config.archive_max_size,
                    config.archive_max_ratio,
                    config.archive_max_entries,
                )
                report = inspect_archive(part.data, part.name, limits)
            self._archives[part.ref] = report
        return self._archives[part.ref]

"""Filter "limits": the MIME walk went past `max_parts` or `max_depth`.

The walker stops at the bound, so the later filters see only what came
before it; the finding concerns the whole message (category "limits",
quarantine by default, and "strip" means quarantine: there is no part to
remove that would make the rest complete).
"""

from __future__ import annotations

from services.scanner.context import ScanContext
from shared.envelope import Verdict


def check(ctx: ScanContext) -> list[Verdict]:
    return [ctx.verdict("limits", "limits", problem) for problem in ctx.inspection.problems]

"""`smtpgw update now|status|rollback`: the updater's administrator verbs.

    smtpgw update now -c FILE         one update of everything configured, now; exit 0 when each
                                      component was activated or had nothing new, 1 when one was
                                      refused, failed or rolled back (the reason on stderr)
    smtpgw update status -c FILE [--json]
    smtpgw update rollback -c FILE [--component signatures|rules]

`now` and `rollback` run in this process under the same lock as the
scheduled updater. With RabbitMQ they announce new rules to the running
scanners over the broker and hear their reports; over the embedded spool the
running scanners notice the new bundle on their own within seconds.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from services.updater.app import Updater, format_status, read_status
from services.updater.state import COMPONENTS, Outcome, Result
from shared.config import Config
from shared.transport import Transport, open_transport


def update_command(
    config: Config, action: str, *, as_json: bool = False, components: Sequence[str] = COMPONENTS
) -> int:
    if action == "status":
        status = read_status(config)
        print(json.dumps(status, indent=2, sort_keys=True) if as_json else format_status(status))
        return 0
    transport: Transport | None = None if config.broker.url == "embedded" else open_transport(config)
    try:
        updater = Updater(config, transport)
        if transport is not None:
            transport.start()
            transport.wait_idle(10)  # the event subscription is up before anything is announced
        outcomes = updater.update_now() if action == "now" else updater.rollback(components)
    finally:
        if transport is not None:
            transport.stop(5)
    return report(outcomes, rollback=action == "rollback")


def report(outcomes: Sequence[Outcome], *, rollback: bool = False) -> int:
    """Print one line per component; returns the exit code."""
    failed = False
    for o in outcomes:
        if o.result is Result.SKIPPED:
            print(f"{o.component}: not configured ({o.detail})")
            continue
        good = o.result is Result.ROLLED_BACK if rollback else o.result.ok
        version = f" {o.version}" if o.version else ""
        if good:
            print(f"{o.component}: {o.result}{version}" + (f" ({o.detail})" if o.detail else ""))
        else:
            failed = True
            in_force = f" ({o.version or 'nothing'} stays in force)" if o.result is not Result.ROLLED_BACK else ""
            print(f"{o.component}: {o.result}{in_force}: {o.detail}", file=sys.stderr)
    return 1 if failed else 0

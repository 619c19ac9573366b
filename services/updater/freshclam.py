"""freshclam, run into the staging directory: the official databases from the official
or a private mirror, and the operator's DatabaseCustomURL sources.

freshclam does the hard parts of ClamAV's own distribution: CVD digital
signatures, incremental .cdiff updates, mirror cool-downs. The updater only
points it at the staging directory (a copy of the active version, so
incremental updates and freshclam.dat carry over), runs it once in the
foreground, and verifies and activates the result like any other update. It
must not notify clamd itself: clamd reloads only what the updater activates.

`render_config` (pure) writes the operator's freshclam.conf with the settings
the updater has to control replaced.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from services.updater.errors import FetchError

# Settings the updater decides, whatever the operator's freshclam.conf says (freshclam.conf(5)).
CONTROLLED = ("DatabaseDirectory", "DatabaseOwner", "Foreground", "NotifyClamd", "PidFile", "UpdateLogFile", "Checks")
OFFICIAL_MIRROR = "database.clamav.net"  # freshclam.conf(5)'s default DatabaseMirror
# freshclam exit codes worth trying again at the next run (network, mirrors out of sync, cool-down).
_TEMPORARY = frozenset({11, 52, 58, 59})


def render_config(operator: str, datadir: str, owner: str) -> str:
    """The operator's freshclam.conf, with the CONTROLLED settings set by us."""
    controlled = {name.lower() for name in CONTROLLED}
    kept = []
    for line in operator.splitlines():
        words = line.split(None, 1)
        if words and not words[0].startswith("#") and words[0].lower() in controlled:
            continue
        kept.append(line)
    ours = [
        "# Set by smtpgw's updater:",
        f"DatabaseDirectory {datadir}",
        f"DatabaseOwner {owner}",
        "Foreground yes",
    ]
    # freshclam insists on a mirror even for DatabaseCustomURL alone; without one, the official.
    if not any(line.split(None, 1)[:1] in (["DatabaseMirror"], ["PrivateMirror"]) for line in kept):
        ours.append(f"DatabaseMirror {OFFICIAL_MIRROR}")
    return "\n".join([*kept, *ours]) + "\n"


def run_freshclam(
    staging: str | os.PathLike[str],
    operator_config: str,
    state_dir: str,
    *,
    official: bool = True,
    binary: str = "freshclam",
    timeout: float = 600.0,
) -> str:
    """Update the databases in `staging`. Returns freshclam's last lines; raises FetchError."""
    operator = Path(operator_config).read_text(encoding="utf-8") if operator_config else ""
    os.makedirs(state_dir, exist_ok=True)
    conf = Path(state_dir) / "freshclam.conf"
    # freshclam drops privileges to DatabaseOwner; it must own what it writes to staging, which we own.
    conf.write_text(
        render_config(operator, os.path.abspath(staging), pwd.getpwuid(os.getuid()).pw_name), encoding="utf-8"
    )
    command = [binary, f"--config-file={conf}", "--stdout"]
    if not official:
        command.append("--update-db=custom")  # only the DatabaseCustomURL sources
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise FetchError(f"{binary} is not installed", temporary=False) from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"freshclam did not finish within {timeout:g}s", temporary=True, reason="timeout") from None
    tail = _tail(done.stdout + done.stderr)
    # 0: updated, 1: already up to date (freshclam(1)).
    if done.returncode not in (0, 1):
        raise FetchError(f"freshclam failed (exit {done.returncode}): {tail}", temporary=done.returncode in _TEMPORARY)
    return tail


def _tail(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "(no output)"

"""The throw-away engine: does a staged signature set load, detect what it must, and pass
what it must not?

Before a signature set may replace the active one, `clamscan` (the same
libclamav as clamd) loads the staging directory on its own, and scans:
- canaries that must be detected: the EICAR test file, the set's version
  marker (which proves that every file of the set was loaded), and the files
  of `[updater].canaries_dir`;
- clean samples that must not be: a plain text, a short mail and a web page
  built in, and the files of `[updater].clean_canaries_dir`.
A set that does not load (a corrupted or truncated file: clamscan exits 2),
misses a canary (an update that would blind the gateway, e.g. an .ign2 that
switches off a signature) or flags a clean sample (a false positive on
ordinary mail) is refused. clamscan's summary also gives the signature count.

`parse_clamscan` is pure; `check_canaries` runs clamscan.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.updater.errors import VerificationError

# The EICAR test file (https://www.eicar.org/download-anti-malware-testfile/): every engine detects it.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MAX_CANARY_SIZE = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Canary:
    name: str
    data: bytes
    expect: str = ""  # a prefix the detected signature name must have ("" : any detection)


CLEAN_SAMPLES = (
    Canary("clean-text.txt", b"Minutes of the weekly meeting.\n\n1. Budget approved.\n2. Next meeting on Monday.\n"),
    Canary(
        "clean-mail.eml",
        b"From: Alice <alice@example.test>\r\nTo: Bob <bob@example.test>\r\nSubject: Lunch\r\n"
        b"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMessage-ID: <canary@example.test>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nShall we meet at noon?\r\n",
    ),
    Canary(
        "clean-page.html",
        b"<!DOCTYPE html>\n<html><head><title>Welcome</title></head>"
        b"<body><p>Our opening hours: 9 to 5.</p><a href='https://example.test/'>Home</a></body></html>\n",
    ),
)


@dataclass(frozen=True, slots=True)
class CanaryReport:
    signatures: int  # "Known viruses" of clamscan's summary
    detected: dict[str, str]  # canary name -> signature


def load_canaries(directory: str) -> list[Canary]:
    """The regular files of `directory` (not recursive), by name. Raises VerificationError."""
    if not directory:
        return []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise VerificationError(f"cannot read canaries in {directory}: {exc.strerror}") from None
    canaries = []
    for entry in entries:
        if entry.is_file() and not entry.name.startswith("."):
            if entry.stat().st_size > MAX_CANARY_SIZE:
                raise VerificationError(f"canary {entry.path} is larger than {MAX_CANARY_SIZE} bytes")
            canaries.append(Canary(entry.name, Path(entry.path).read_bytes()))
    return canaries


def check_canaries(
    database: str | os.PathLike[str],
    must_detect: Sequence[Canary],
    must_pass: Sequence[Canary],
    *,
    clamscan: str = "clamscan",
    timeout: float = 600.0,
) -> CanaryReport:
    """Load `database` in a throw-away clamscan and scan the canaries. Raises VerificationError."""
    with tempfile.TemporaryDirectory(prefix="smtpgw-canaries-") as tmp:
        # Own file names: a canary's name could hold ": " or a newline and confuse the parsing.
        names: dict[str, Canary] = {}
        for prefix, canaries in (("detect", must_detect), ("clean", must_pass)):
            for i, canary in enumerate(canaries):
                path = os.path.join(tmp, f"{prefix}-{i:04d}")
                Path(path).write_bytes(canary.data)
                names[path] = canary
        command = [clamscan, "--stdout", f"--database={database}", *names]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except FileNotFoundError:
            raise VerificationError(f"cannot verify signatures: {clamscan} is not installed") from None
        except subprocess.TimeoutExpired:
            raise VerificationError(f"clamscan did not finish within {timeout:g}s") from None
        results, signatures = parse_clamscan(done.stdout)
        if done.returncode not in (0, 1) or signatures is None:
            raise VerificationError(f"the signature set does not load: {_last_lines(done.stderr or done.stdout)}")
        detected: dict[str, str] = {}
        for path, canary in names.items():
            found = results.get(path)
            if path.startswith(os.path.join(tmp, "detect-")):
                if not found:
                    raise VerificationError(f"canary {canary.name} is not detected by the new signatures")
                if canary.expect and not found.startswith(canary.expect):
                    raise VerificationError(f"canary {canary.name} is detected as {found}, not {canary.expect}")
                detected[canary.name] = found
            elif found:
                raise VerificationError(f"clean sample {canary.name} is detected as {found} (a false positive)")
            elif path not in results:
                raise VerificationError(f"clamscan did not scan {canary.name}: {_last_lines(done.stderr)}")
    return CanaryReport(signatures, detected)


_LINE = re.compile(r"^(?P<path>.+?): (?:(?P<sig>\S+) FOUND|OK)$")


def parse_clamscan(output: str) -> tuple[dict[str, str], int | None]:
    """clamscan's --stdout -> ({path: signature, or "" when OK}, "Known viruses" or None)."""
    results: dict[str, str] = {}
    signatures = None
    for line in output.splitlines():
        match = _LINE.match(line)
        if match:
            results[match["path"]] = match["sig"] or ""
        elif line.startswith("Known viruses:"):
            try:
                signatures = int(line.partition(":")[2])
            except ValueError:
                signatures = None
    return results, signatures


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "(no output)"

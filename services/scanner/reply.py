"""How the scanner reads clamd's answers: what it needs from clamd, and which
category a signature belongs to.

Pure. The reply values themselves (`ScanResult`, `ScanStatus`, `parse_reply`)
live with the clamd adapter in `shared/clamd.py`, which the updater shares;
this module holds the scanner's own reading of them, and the protocol the
core is handed, so tests can pass a fake instead of the adapter.

A FOUND is split by its signature: ClamAV reports its own limits as
Heuristics.Limits.Exceeded.* (with AlertExceedsMax) and password-protected
content as Heuristics.Encrypted.* (with AlertEncryptedArchive/Doc); neither is
a clean verdict.
"""

from __future__ import annotations

from typing import Protocol

from shared.clamd import ScanResult


class VirusScanner(Protocol):
    """What the core needs from clamd: scan bytes, get OK or FOUND; errors raise ScanError."""

    def scan(self, data: bytes) -> ScanResult: ...


def category_of(signature: str) -> str:
    """Signature name -> scanner category: "unscannable", "encrypted" or "virus"."""
    if signature.startswith("Heuristics.Limits.Exceeded"):
        return "unscannable"
    if signature.startswith("Heuristics.Encrypted"):
        return "encrypted"
    return "virus"

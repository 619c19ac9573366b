"""clamd replies as values: the typed result of one scan and how a signature is classified.

Pure, shared by the clamd adapter (which parses what the socket returned) and
the virus filter (which maps a signature to a category). Kept apart from
`clamd.py` so the core never imports the socket code.

Infected is not scan-failed (compare rspamd's lua_scanners/clamav.lua): a
reply is OK, FOUND with a signature, or ERROR. A FOUND is further split by
its signature: ClamAV reports its own limits as Heuristics.Limits.Exceeded.*
(with AlertExceedsMax) and password-protected content as Heuristics.Encrypted.*
(with AlertEncryptedArchive/Doc); neither is a clean verdict.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Protocol


class ScanStatus(enum.StrEnum):
    OK = "OK"
    FOUND = "FOUND"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class ScanResult:
    status: ScanStatus
    signature: str = ""  # FOUND: the signature name, e.g. "Eicar-Test-Signature"
    text: str = ""  # the reply as clamd sent it, without the terminator

    @property
    def clean(self) -> bool:
        return self.status is ScanStatus.OK

    @property
    def found(self) -> bool:
        return self.status is ScanStatus.FOUND


class VirusScanner(Protocol):
    """What the core needs from clamd: scan bytes, get OK or FOUND; errors raise ScanError."""

    def scan(self, data: bytes) -> ScanResult: ...


# INSTREAM replies "stream: OK" or "stream: Eicar-Test-Signature FOUND"; with
# ExtendedDetectionInfo some versions append "(md5:size)" to the name, and inside an
# IDSESSION every reply is prefixed "<n>: ". Signature names never contain spaces.
_OK = re.compile(r"^(?:\d+: )?stream: OK$")
_FOUND = re.compile(r"^(?:\d+: )?stream: (\S+?)(?:\([0-9a-f]{32,64}:\d+\))? FOUND$")


def parse_reply(reply: bytes) -> ScanResult:
    """One clamd scan reply (terminator included or not) -> ScanResult.

    Anything that is neither "...: OK" nor "...: <name> FOUND" is an ERROR
    result carrying the text, whether clamd said "... ERROR" or something
    unexpected: an unknown reply must never read as clean.
    """
    text = reply.rstrip(b"\0\r\n").decode("utf-8", "replace").strip()
    if _OK.match(text):
        return ScanResult(ScanStatus.OK, text=text)
    found = _FOUND.match(text)
    if found:
        return ScanResult(ScanStatus.FOUND, signature=found.group(1), text=text)
    return ScanResult(ScanStatus.ERROR, text=text or "(empty reply)")


def is_size_limit(result: ScanResult) -> bool:
    """clamd refused the stream: "INSTREAM size limit exceeded. ERROR" (StreamMaxLength)."""
    return result.status is ScanStatus.ERROR and "size limit exceeded" in result.text.lower()


def category_of(signature: str) -> str:
    """Signature name -> scanner category: "unscannable", "encrypted" or "virus"."""
    if signature.startswith("Heuristics.Limits.Exceeded"):
        return "unscannable"
    if signature.startswith("Heuristics.Encrypted"):
        return "encrypted"
    return "virus"

"""Telling every clamd to reload, and making sure it did.

clamd answers RELOAD at once ("RELOADING") and loads the new databases in the
background (ConcurrentDatabaseReload: the old engine keeps scanning
meanwhile), and VERSION names the database version only when an official
daily database is loaded. So the answer to RELOAD proves nothing, and VERSION
alone cannot tell a set of custom signatures from the next one.

Each signature set the updater builds therefore carries a marker: one
signature of its own (`smtpgw-version.ndb`) that matches a probe string
unique to that version. A clamd has loaded a version exactly when scanning
the probe finds that version's marker; it has left a version when the old
probe is no longer found. After that, VERSION must answer and EICAR must be
found: the engine now in force works.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.updater.canary import EICAR
from services.updater.errors import ActivationError
from shared.clamd import ClamdClient
from shared.errors import ScanError, ScannerUnavailable

MARKER_FILE = "smtpgw-version.ndb"
MARKER_PREFIX = "Smtpgw.Version."


@dataclass(frozen=True, slots=True)
class Marker:
    """The version marker of one signature set."""

    signature: str  # e.g. "Smtpgw.Version.20261127T130000Z-5e1f0c2a"
    probe: bytes  # what that signature matches, and nothing else will

    def ndb(self) -> str:
        """The marker as a ClamAV body signature (.ndb: name:target type:offset:hex)."""
        return f"{self.signature}:0:*:{self.probe.hex()}\n"

    @classmethod
    def new(cls, version: str) -> Marker:
        return cls(MARKER_PREFIX + version, f"SMTPGW-SIGNATURE-SET {version} {secrets.token_hex(16)}".encode())

    @classmethod
    def parse(cls, ndb: str) -> Marker | None:
        """The marker in an smtpgw-version.ndb, or None."""
        fields = ndb.strip().split(":")
        if len(fields) != 4 or not fields[0].startswith(MARKER_PREFIX):
            return None
        try:
            return cls(fields[0], bytes.fromhex(fields[3]))
        except ValueError:
            return None


def confirm_reload(
    clients: Sequence[ClamdClient],
    expect: Marker | None,
    leaving: Marker | None,
    timeout: float,
    *,
    poll: float = 0.1,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, str]:
    """RELOAD every clamd and wait until each has `expect`'s marker (or, when the set to load has
    none, no longer has `leaving`'s), answers VERSION and detects EICAR.

    Returns {address: VERSION answer}. Raises ActivationError naming the first clamd that did
    not confirm within `timeout`.
    """
    deadline = clock() + timeout
    unreached = set()
    for client in clients:
        if not _reload(client):
            unreached.add(client.address)
    versions = {}
    for client in clients:
        last = "no answer yet"
        while True:
            try:
                if client.address in unreached:
                    # Down or restarting: keep asking until the deadline (a clamd that starts
                    # loads whatever is active, but it must still say so in time).
                    if not _reload(client):
                        raise ScannerUnavailable(f"cannot reach clamd at {client.address}")
                    unreached.discard(client.address)
                if _loaded(client, expect, leaving):
                    versions[client.address] = client.version()
                    if not client.scan(EICAR).found:
                        raise ActivationError(f"clamd at {client.address} no longer detects EICAR after RELOAD")
                    break
                last = "still the previous signatures"
            except ScannerUnavailable as exc:
                last = str(exc)
            except ScanError as exc:
                last = str(exc)
            if clock() >= deadline:
                raise ActivationError(
                    f"clamd at {client.address} did not confirm the reload within {timeout:g}s: {last}"
                )
            sleep(poll)
    return versions


def _reload(client: ClamdClient) -> bool:
    """RELOAD; False when clamd cannot be reached. A clamd that answers something else than
    RELOADING refuses: ActivationError."""
    try:
        client.reload()
    except ScannerUnavailable:
        return False
    except ScanError as exc:
        raise ActivationError(f"clamd at {client.address} refused RELOAD: {exc}") from None
    return True


def _loaded(client: ClamdClient, expect: Marker | None, leaving: Marker | None) -> bool:
    if expect is not None:
        result = client.scan(expect.probe)
        return result.found and result.signature.startswith(expect.signature)
    if leaving is not None:
        return not client.scan(leaving.probe).found
    return client.ping()

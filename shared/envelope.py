"""The envelope: the one typed record every service shares about a message.

The receiver creates it; each later step makes a changed copy (`replace`),
never mutates it. The raw message bytes travel beside it, inside the AMQP
message or the spool file, never inside the envelope.

The codec (`encode`/`decode`) is kept apart from the model: JSON with a
schema number, and `decode` refuses any schema it does not know rather than
guess (compare Mailman's QFILE_SCHEMA_VERSION).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared.errors import EnvelopeDecodeError

SCHEMA = 1

# What a queue id may look like: it names files in the spool, the quarantine and the ledger, so a
# decoded envelope with anything else (a path, a NUL) is refused. Base32 ids plus the suffixes of
# derived messages (".q", ".b1") and the broker's "undecodable-<hash>" stand-ins fit.
QUEUE_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")

# Crockford's base32 alphabet: queue ids are case-insensitive-safe and avoid I, L, O, U.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_queue_id() -> str:
    """A sortable, unique queue id: 48-bit milliseconds then 60 random bits (ULID-like)."""
    n = (int(time.time() * 1000) << 60) | secrets.randbits(60)
    return "".join(_ALPHABET[(n >> shift) & 31] for shift in range(105, -1, -5))


class Direction(enum.StrEnum):
    INCOMING = "incoming"  # from the Internet to an internal domain
    OUTGOING = "outgoing"  # from a relay network or an authenticated submitter


class Action(enum.StrEnum):
    """What a filter decided; the scanner combines them (strongest wins)."""

    DELIVER = "deliver"
    STRIP = "strip"  # remove the offending attachment, deliver the rest
    QUARANTINE = "quarantine"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Client:
    ip: str
    helo: str = ""
    tls: bool = False
    authenticated: str = ""  # the AUTH user, if any
    relay: bool = False  # from a relay network or authenticated: may send anywhere


@dataclass(frozen=True, slots=True)
class Verdict:
    """One filter's finding. `category` is a key of [scanner].actions, or "clean"."""

    filter: str
    category: str
    action: Action
    reason: str
    part: str = ""  # the attachment's file name (or MIME path) it is about


@dataclass(frozen=True, slots=True)
class RecipientFailure:
    """A recipient that could not be delivered: the reply that says why."""

    rcpt: str
    code: int
    status: str  # enhanced status, e.g. "5.1.1"
    message: str
    remote: str = ""  # the host that answered, if any


@dataclass(frozen=True, slots=True)
class Envelope:
    queue_id: str
    received_at: datetime
    client: Client
    mail_from: str  # "" is the null reverse-path (DSNs)
    rcpt_to: tuple[str, ...]
    size: int
    direction: Direction = Direction.INCOMING
    smtputf8: bool = False
    eight_bit: bool = False
    verdicts: tuple[Verdict, ...] = ()
    attempts: int = 0
    not_before: datetime | None = None
    expires_at: datetime | None = None  # past this: bounce, stop retrying
    failures: tuple[RecipientFailure, ...] = ()  # set on the way to the bounce queue
    parent_id: str = ""  # for DSNs and notifications: the message they are about
    last_error: str = ""  # why the last attempt failed (deferral reply, crash reason)
    # True only where the body was made and `shared.crlf.bare_newline` found every line ending
    # in CRLF (the receiver, the scanner when it rebuilds a body): the scanner's MIME parse and
    # delivery then take the body as it is without checking it again. False (every other
    # producer, older versions) costs them that check. Whoever changes a body must set it anew.
    crlf_clean: bool = False
    schema: int = SCHEMA

    def replace(self, **changes: Any) -> Envelope:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- codec


def _plain(obj: object) -> object:
    """Envelope -> JSON-ready values. Hand-rolled: `dataclasses.asdict` deep-copies every value,
    which made encoding cost ~170 µs, once per message per step."""
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    names = _FIELDS.get(type(obj))
    if names is not None:
        return {name: _plain(getattr(obj, name)) for name in names}
    return obj


_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in (Envelope, Client, Verdict, RecipientFailure)
}


def encode(env: Envelope) -> bytes:
    """Envelope -> compact JSON bytes."""
    return json.dumps(_plain(env), separators=(",", ":")).encode()


def _dt(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("timestamp must be a string")
    dt = datetime.fromisoformat(value)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def decode(data: bytes) -> Envelope:
    """JSON bytes -> Envelope. Raises EnvelopeDecodeError for anything else."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeDecodeError(f"envelope is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise EnvelopeDecodeError("envelope is not a JSON object")
    if raw.get("schema") != SCHEMA:
        raise EnvelopeDecodeError(f"unknown envelope schema {raw.get('schema')!r}, this build reads {SCHEMA}")
    if not isinstance(raw.get("queue_id"), str) or not QUEUE_ID.fullmatch(raw["queue_id"]):
        raise EnvelopeDecodeError(f"envelope has an invalid queue id {str(raw.get('queue_id'))[:100]!r}")
    try:
        return Envelope(
            queue_id=str(raw["queue_id"]),
            received_at=_dt(raw["received_at"]),  # type: ignore[arg-type]
            client=Client(**raw["client"]),
            mail_from=str(raw["mail_from"]),
            rcpt_to=tuple(str(r) for r in raw["rcpt_to"]),
            size=int(raw["size"]),
            direction=Direction(raw.get("direction", "incoming")),
            smtputf8=bool(raw.get("smtputf8", False)),
            eight_bit=bool(raw.get("eight_bit", False)),
            verdicts=tuple(Verdict(**{**v, "action": Action(v["action"])}) for v in raw.get("verdicts", ())),
            attempts=int(raw.get("attempts", 0)),
            not_before=_dt(raw.get("not_before")),
            expires_at=_dt(raw.get("expires_at")),
            failures=tuple(RecipientFailure(**f) for f in raw.get("failures", ())),
            parent_id=str(raw.get("parent_id", "")),
            last_error=str(raw.get("last_error", "")),
            crlf_clean=raw.get("crlf_clean") is True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeDecodeError(f"envelope is malformed: {exc!r}") from None

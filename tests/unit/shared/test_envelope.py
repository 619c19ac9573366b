from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from shared.envelope import (
    SCHEMA,
    Action,
    Client,
    Direction,
    Envelope,
    RecipientFailure,
    Verdict,
    decode,
    encode,
    new_queue_id,
)
from shared.errors import EnvelopeDecodeError


def make() -> Envelope:
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    return Envelope(
        queue_id=new_queue_id(),
        received_at=now,
        client=Client("192.0.2.1", "mx.example.org", tls=True, relay=False),
        mail_from="sender@example.org",
        rcpt_to=("a@example.test", "b@example.test"),
        size=1234,
        direction=Direction.INCOMING,
        smtputf8=True,
        verdicts=(Verdict("virus", "virus", Action.STRIP, "Eicar FOUND", "x.com"),),
        attempts=2,
        not_before=now + timedelta(minutes=30),
        expires_at=now + timedelta(days=1),
        failures=(RecipientFailure("a@example.test", 550, "5.1.1", "no such user", "mx1"),),
        parent_id="PARENT",
        last_error="451 try later",
        crlf_clean=True,
    )


def test_roundtrip_keeps_every_field() -> None:
    env = make()
    assert decode(encode(env)) == env


@pytest.mark.parametrize("value", ["absent", None, 1, "true", False])
def test_only_a_true_crlf_clean_spares_delivery_its_check(value: object) -> None:
    """An envelope of an older version has no `crlf_clean`; anything but JSON true counts as not
    checked, so delivery searches the body for bare line ends as before."""
    raw = json.loads(encode(make()))
    if value == "absent":
        del raw["crlf_clean"]
    else:
        raw["crlf_clean"] = value
    assert decode(json.dumps(raw).encode()).crlf_clean is False


def test_an_envelope_of_an_older_version_with_a_body_hash_still_decodes() -> None:
    """Earlier envelopes carried the body's SHA-256, which nothing read; spool files and
    queued broker messages written then still hold it."""
    env = make()
    raw = json.loads(encode(env))
    raw["sha256"] = "ab" * 32
    assert decode(json.dumps(raw).encode()) == env
    assert "sha256" not in json.loads(encode(env))


def test_replace_makes_a_copy() -> None:
    env = make()
    other = env.replace(attempts=3)
    assert env.attempts == 2
    assert other.attempts == 3
    with pytest.raises(AttributeError):
        env.attempts = 5  # type: ignore[misc]


def test_queue_ids_are_unique_and_sortable() -> None:
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 22 and i.isalnum() for i in ids)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema": 99}', "unknown envelope schema 99"),
        (b'{"schema": %d}' % SCHEMA, "invalid queue id"),
        (b'{"schema": %d, "queue_id": "../../etc/passwd"}' % SCHEMA, "invalid queue id"),
        (b'{"schema": %d, "queue_id": "x\\u0000y"}' % SCHEMA, "invalid queue id"),
        (b'{"schema": %d, "queue_id": "x", "received_at": 5}' % SCHEMA, "malformed"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_decode_refuses_garbage(data: bytes, message: str) -> None:
    with pytest.raises(EnvelopeDecodeError, match=message):
        decode(data)

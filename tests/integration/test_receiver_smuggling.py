"""SMTP smuggling (CVE-2023-51764 family) over a raw socket.

The attacker's message hides a fake end of data (`<LF>.<LF>`, `<CR>.<CR>`,
mixed endings) followed by a whole second transaction. Whatever the variant
and however the bytes are split into writes, the receiver must never see the
end of the first message there, and so never store a second one: the only end
of data is `<CR><LF>.<CR><LF>`, and a message holding a bare CR or LF is
refused (550 5.5.2) once its real end arrived.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.spool import SpoolTransport
from tests.integration.test_receiver_support import RawClient, make_config, running, stored

pytestmark = pytest.mark.integration

FAKE_ENDS = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n", b"\n\n.\n\n"]

SMUGGLED = (
    b"MAIL FROM:<ceo@example.test>\r\n"
    b"RCPT TO:<victim@example.test>\r\n"
    b"DATA\r\n"
    b"From: <ceo@example.test>\r\nSubject: smuggled\r\n\r\nPay the invoice.\r\n"
)


@pytest.fixture
def spool(spool_dir: Path) -> SpoolTransport:
    return SpoolTransport(str(spool_dir))


@pytest.mark.parametrize("split", ["one write", "write ends at the fake end"])
@pytest.mark.parametrize("fake", FAKE_ENDS, ids=[repr(f) for f in FAKE_ENDS])
def test_fake_end_of_data_never_starts_a_second_message(spool: SpoolTransport, fake: bytes, split: str) -> None:
    first = b"From: <attacker@sender.example>\r\nSubject: first\r\n\r\nhello" + fake
    rest = SMUGGLED + b".\r\n"  # the real end: it closes the (one) message
    with running(make_config(), spool) as receiver, RawClient(receiver.port) as raw:
        raw.start(sender=b"<attacker@sender.example>", rcpt=b"<victim@example.test>")
        if split == "one write":
            raw.send(first + rest + b"QUIT\r\n")
        else:
            raw.send(first)
            raw.send(rest + b"QUIT\r\n")
        assert raw.reply() == [b"550 5.5.2 Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)"]
        assert raw.reply() == [b"221 2.0.0 Bye"]  # the smuggled commands never ran
        assert raw.closed()
    assert stored(spool) == []


@pytest.mark.parametrize("fake", [b"\n.\n", b"\r.\r", b"\r\n.\n"], ids=repr)
def test_a_smuggling_attempt_leaves_the_session_in_step(spool: SpoolTransport, fake: bytes) -> None:
    """After the refusal, a genuine transaction on the same connection is the only message stored."""
    with running(make_config(), spool) as receiver, RawClient(receiver.port) as raw:
        raw.start()
        raw.send(b"Subject: first\r\n\r\nhello" + fake + SMUGGLED + b".\r\n")
        assert raw.reply()[0].startswith(b"550 5.5.2 ")
        raw.send(
            b"MAIL FROM:<sender@sender.example>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n"
            b"Subject: genuine\r\n\r\nok\r\n.\r\nQUIT\r\n"
        )
        assert [raw.code() for _ in range(5)] == [250, 250, 354, 250, 221]
    [(env, body)] = stored(spool)
    assert env.rcpt_to == ("user@example.test",)
    assert body.endswith(b"Subject: genuine\r\n\r\nok\r\n")
    assert b"smuggled" not in body


def test_end_of_data_split_across_writes_is_still_the_end(spool: SpoolTransport) -> None:
    """The real `<CR><LF>.<CR><LF>` cut into one-byte writes ends the message, and nothing after it is eaten."""
    with running(make_config(), spool) as receiver, RawClient(receiver.port) as raw:
        raw.start()
        raw.send(b"Subject: slow\r\n\r\nbody")
        for byte in b"\r\n.\r\n":
            raw.send(bytes([byte]))
        assert raw.reply()[0].startswith(b"250 2.0.0 ")
        assert raw.command(b"NOOP") == [b"250 2.0.0 OK"]
    [(_, body)] = stored(spool)
    assert body.endswith(b"\r\n\r\nbody\r\n")

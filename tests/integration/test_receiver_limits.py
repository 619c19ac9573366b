"""Every limit of the receiver answered with the right SMTP code, over real sockets."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from shared.spool import SpoolTransport
from tests.integration.test_receiver_support import RawClient, make_config, running, stored
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def spool(spool_dir: Path) -> SpoolTransport:
    return SpoolTransport(str(spool_dir))


def test_size_parameter_over_the_limit(spool: SpoolTransport) -> None:
    with (
        running(make_config(max_message_size=65536), spool) as receiver,
        smtplib.SMTP("127.0.0.1", receiver.port) as client,
    ):
        _, features = client.ehlo("client.example")
        assert b"SIZE 65536" in features
        code, reply = client.mail("sender@sender.example", ["SIZE=65537"])
        assert (code, reply[:6]) == (552, b"5.3.4 ")
        assert client.mail("sender@sender.example", ["SIZE=65536"])[0] == 250


def test_data_over_the_limit_is_drained_then_refused(spool: SpoolTransport) -> None:
    with running(make_config(max_message_size=65536), spool) as receiver, RawClient(receiver.port) as raw:
        raw.start()
        raw.send(b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n" + (b"y" * 76 + b"\r\n") * 2000 + b".\r\n")
        assert raw.reply() == [b"552 5.3.4 Message size exceeds fixed maximum message size"]
        assert raw.command(b"NOOP") == [b"250 2.0.0 OK"]  # in step: the body was not read as commands
        assert receiver.data_inflight == 0
    assert stored(spool) == []


def test_exactly_max_size_is_accepted(spool: SpoolTransport) -> None:
    message = b"Subject: fits\r\n\r\n" + b"z" * (1000 - 17 - 2) + b"\r\n"
    assert len(message) == 1000
    with (
        running(make_config(max_message_size=1000), spool) as receiver,
        smtplib.SMTP("127.0.0.1", receiver.port) as client,
    ):
        assert client.sendmail("sender@sender.example", ["user@example.test"], message) == {}
    [(_, body)] = stored(spool)
    assert body.endswith(message)


def test_the_recipient_after_max_recipients_is_deferred(spool: SpoolTransport) -> None:
    with running(make_config(), spool) as receiver, smtplib.SMTP("127.0.0.1", receiver.port) as client:
        client.ehlo("client.example")
        client.mail("sender@sender.example")
        for i in range(100):
            assert client.rcpt(f"user{i}@example.test")[0] == 250
        assert client.rcpt("user100@example.test") == (452, b"4.5.3 Too many recipients")
        assert client.data(b"Subject: many\r\n\r\nx\r\n")[0] == 250
    [(env, _)] = stored(spool)
    assert len(env.rcpt_to) == 100


def test_messages_per_connection(spool: SpoolTransport) -> None:
    with running(make_config(max_messages_per_connection=2), spool) as receiver, RawClient(receiver.port) as raw:
        raw.reply()
        raw.command(b"EHLO client.example")
        for _ in range(2):
            raw.send(
                b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<user@example.test>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n"
            )
            assert [raw.code() for _ in range(4)] == [250, 250, 354, 250]
        # Pipelined after the 421: must not be read as commands.
        raw.send(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n")
        assert raw.reply() == [b"421 4.7.0 Too many messages in this connection, closing"]
        assert raw.closed()
    assert len(stored(spool)) == 2


def test_max_connections(spool: SpoolTransport) -> None:
    with running(make_config(max_connections=2, max_connections_per_client=5), spool) as receiver:
        with RawClient(receiver.port) as one, RawClient(receiver.port, source="127.0.0.2") as two:
            assert one.reply()[0].startswith(b"220 ")
            assert two.reply()[0].startswith(b"220 ")
            with RawClient(receiver.port, source="127.0.0.3") as three:
                [reply] = three.reply()
                assert reply.startswith(b"421 4.7.0 ")
                assert three.closed()
            assert one.command(b"QUIT") == [b"221 2.0.0 Bye"]
        # Closed connections give their places back.
        assert wait_until(lambda: receiver.connections == 0)
        with RawClient(receiver.port) as four:
            assert four.reply()[0].startswith(b"220 ")


def test_max_connections_per_client(spool: SpoolTransport) -> None:
    with (
        running(make_config(max_connections=10, max_connections_per_client=1), spool) as receiver,
        RawClient(receiver.port) as first,
    ):
        assert first.reply()[0].startswith(b"220 ")
        with RawClient(receiver.port) as second:
            assert second.reply() == [
                b"421 4.7.0 mx.example.test Too many connections from your address, try again later"
            ]
            assert second.closed()
        with RawClient(receiver.port, source="127.0.0.2") as other:
            assert other.reply()[0].startswith(b"220 ")
        assert first.command(b"NOOP") == [b"250 2.0.0 OK"]


def test_idle_timeout(spool: SpoolTransport) -> None:
    with running(make_config(idle_timeout=0.3), spool) as receiver, RawClient(receiver.port) as raw:
        raw.reply()
        raw.command(b"EHLO client.example")
        started = time.monotonic()
        assert raw.reply() == [b"421 4.4.2 mx.example.test Idle timeout, closing connection"]
        assert raw.closed()
        assert time.monotonic() - started >= 0.25


def test_each_command_restarts_the_idle_time(spool: SpoolTransport) -> None:
    """Commands spaced below the timeout keep the session for longer than the timeout in total."""
    with running(make_config(idle_timeout=0.5), spool) as receiver, RawClient(receiver.port) as raw:
        raw.reply()
        started = time.monotonic()
        for _ in range(5):
            time.sleep(0.2)  # pacing the client (not waiting for a result): 1 s, twice the timeout
            assert raw.command(b"NOOP") == [b"250 2.0.0 OK"]
        assert time.monotonic() - started > 0.9
        quiet = time.monotonic()
        assert raw.reply() == [b"421 4.4.2 mx.example.test Idle timeout, closing connection"]
        assert time.monotonic() - quiet >= 0.45
        assert raw.closed()


def test_unrecognised_commands_end_the_session(spool: SpoolTransport) -> None:
    with running(make_config(), spool) as receiver, RawClient(receiver.port) as raw:
        raw.reply()
        for i in range(4):
            assert raw.command(b"FROB%d" % i) == [b'500 5.5.2 Error: command "FROB%d" not recognized' % i]
        assert raw.command(b"FROB") == [b"502 5.5.1 Too many unrecognized commands, goodbye."]
        assert raw.closed()


def test_streaming_data_resets_the_idle_timer(spool: SpoolTransport) -> None:
    """DATA that keeps coming, slower than the timeout in total, is not idle."""
    with running(make_config(idle_timeout=0.6), spool) as receiver, RawClient(receiver.port) as raw:
        raw.start()
        started = time.monotonic()
        for i in range(8):
            raw.send(b"line %d\r\n" % i)
            time.sleep(0.15)  # pacing the sender (not waiting for a result): 1.2 s, twice the timeout
        raw.send(b".\r\n")
        assert raw.reply()[0].startswith(b"250 2.0.0 ")
        assert time.monotonic() - started > 1.0
    [(_, body)] = stored(spool)
    assert body.endswith(b"line 7\r\n")


def test_command_line_too_long(spool: SpoolTransport) -> None:
    with running(make_config(), spool) as receiver, RawClient(receiver.port) as raw:
        raw.reply()
        raw.command(b"EHLO client.example")
        assert raw.command(b"RCPT TO:<" + b"a" * 600 + b"@example.test>") == [b"500 5.5.2 Command line too long"]
        assert raw.command(b"NOOP " + b"x" * 100_000) == [b"500 5.5.2 Command line too long"]
        assert raw.command(b"NOOP") == [b"250 2.0.0 OK"]


@pytest.mark.parametrize(("length", "accepted"), [(998, True), (999, False)])
def test_message_line_length(spool: SpoolTransport, length: int, accepted: bool) -> None:
    with running(make_config(), spool) as receiver, RawClient(receiver.port) as raw:
        raw.start()
        raw.send(b"Subject: long\r\n\r\n" + b"L" * length + b"\r\n.\r\n")
        [reply] = raw.reply()
        if accepted:
            assert reply.startswith(b"250 2.0.0 ")
        else:
            assert reply == b"500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
            assert raw.command(b"NOOP") == [b"250 2.0.0 OK"]
    assert len(stored(spool)) == int(accepted)


def test_memory_budget_exhausted_answers_451(spool: SpoolTransport) -> None:
    """Two sessions share a 64 KiB budget: while one holds 40 KiB, a second 40 KiB message is refused."""
    config = make_config(max_message_size=65536, data_memory_budget=65536)
    part = (b"p" * 78 + b"\r\n") * 512  # 40 KiB
    with running(config, spool) as receiver, RawClient(receiver.port) as holder:
        holder.start()
        holder.send(b"Subject: holder\r\n\r\n" + part)
        assert wait_until(lambda: receiver.data_inflight >= len(part))
        with smtplib.SMTP("127.0.0.1", receiver.port) as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("sender@sender.example", ["user@example.test"], b"Subject: second\r\n\r\n" + part)
            assert (info.value.smtp_code, info.value.smtp_error) == (
                451,
                b"4.3.1 Insufficient system resources, try again later",
            )
            assert client.noop()[0] == 250
        holder.send(b".\r\n")
        assert holder.reply()[0].startswith(b"250 2.0.0 ")
        assert wait_until(lambda: receiver.data_inflight == 0)
    [(_, body)] = stored(spool)
    assert body.endswith(b"Subject: holder\r\n\r\n" + part)


def test_client_vanishing_mid_data_gives_everything_back(spool: SpoolTransport) -> None:
    with running(make_config(), spool) as receiver:
        with RawClient(receiver.port) as raw:
            raw.start()
            raw.send(b"Subject: cut\r\n\r\n" + (b"c" * 78 + b"\r\n") * 1000)
            assert wait_until(lambda: receiver.data_inflight > 0)
        assert wait_until(lambda: receiver.data_inflight == 0 and receiver.connections == 0)
        with smtplib.SMTP("127.0.0.1", receiver.port) as client:  # and the receiver carries on
            assert client.noop()[0] == 250
    assert stored(spool) == []

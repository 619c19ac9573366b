"""services.receiver.smtp: enhanced status codes on aiosmtpd's replies; the fast address parse; the session
set up as aiosmtpd would."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP

from services.receiver.handler import ReceiverHandler
from services.receiver.limits import ConnectionGate, MemoryBudget
from services.receiver.smtp import ReceiverSMTP, plain_address, with_enhanced_status
from shared import eventloop
from shared.config import Config
from shared.offload import Offload
from tests.integration.test_receiver_support import FailingTransport


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("252 Cannot VRFY user", "252 2.0.0 Cannot VRFY user"),
        ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
        ("500 Command line too long", "500 5.5.2 Command line too long"),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        (
            "552 Error: message size exceeds fixed maximum message size",
            "552 5.3.4 Error: message size exceeds fixed maximum message size",
        ),
        ("555 MAIL FROM parameters not recognized", "555 5.5.4 MAIL FROM parameters not recognized"),
        ("554 Command refused", "554 5.0.0 Command refused"),
        ("599 Something new", "599 5.0.0 Something new"),
        ("250-Multi line", "250-2.0.0 Multi line"),
        ("250", "250 2.0.0"),
        # Already coded: unchanged.
        ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
        ("530 5.7.0 Authentication required", "530 5.7.0 Authentication required"),
        ("421 4.7.0 MAIL sent too many times", "421 4.7.0 MAIL sent too many times"),
        ("250 2.0.0", "250 2.0.0"),
        # No enhanced codes exist for 1xx/3xx (RFC 3463 classes are 2, 4, 5).
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("not a reply", "not a reply"),
    ],
)
def test_with_enhanced_status(reply: str, expected: str) -> None:
    assert with_enhanced_status(reply) == expected


class _Settings:
    local_part_limit = 0  # what aiosmtpd's _getaddr reads from its session


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.example>",
        "<a@b.example>  SIZE=10 BODY=8BITMIME",
        "<a@b.example>SIZE=10",
        " <a@b.example> x",
        "<A.b+c@B.Example> ",
        "<o'neil@x.example>",
        "<first.last-tag_x=y@sub-1.b.example> SMTPUTF8",
        "<a@b>",
        "<a@-b.example>",
    ],
)
def test_plain_address_parses_like_aiosmtpd(arg: str) -> None:
    assert plain_address(arg) is not None
    assert plain_address(arg) == SMTP._getaddr(_Settings(), arg)


@pytest.mark.parametrize(
    "arg",
    [
        "<>",
        "a@b.example",
        "<a..b@c.example>",
        "<.a@c.example>",
        '<"quoted local"@b.example>',
        "<@route.example:a@b.example>",
        "<a@[192.0.2.1]>",
        "<jörg@example.test>",
        "<a@b.example> (comment)",
        "<a@b..example>",
        "<a@b_c.example>",
        "<a@b.example",
    ],
)
def test_unusual_addresses_go_to_the_full_parser(arg: str) -> None:
    assert plain_address(arg) is None


def test_session_has_every_attribute_aiosmtpd_sets() -> None:
    """ReceiverSMTP.__init__ replaces SMTP.__init__: nothing aiosmtpd's methods read may be missing
    (this fails first when an aiosmtpd upgrade adds one), and the reflected parts must agree."""
    config = Config()
    settings = config.receiver
    loop = eventloop.new_event_loop()
    try:
        handler = ReceiverHandler(config, FailingTransport(), Offload(1, "test"))
        plain = SMTP(
            handler,
            data_size_limit=settings.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.hostname,
            ident=settings.banner,
            timeout=settings.idle_timeout,
            loop=loop,
        )
        ours = ReceiverSMTP(
            handler, settings=settings, gate=ConnectionGate(10, 10), budget=MemoryBudget(1 << 20), loop=loop
        )
        missing = {name for name in vars(plain) if not hasattr(ours, name)}
        assert missing == set()
        for name in (
            "__ident__", "data_size_limit", "enable_SMTPUTF8", "_decode_data", "hostname", "tls_context",
            "require_starttls", "_timeout_duration", "_tls_handshake_okay", "_auth_require_tls", "_auth_required",
            "_authenticator", "_auth_callback", "_proxy_timeout", "_enforce_call_limit", "_ehlo_hook_ver",
            "session", "envelope", "transport",
        ):  # fmt: skip
            assert getattr(ours, name) == getattr(plain, name), name
        assert ours._handle_hooks == plain._handle_hooks
        assert ours._smtp_methods.keys() == plain._smtp_methods.keys()
        assert ours._smtp_methods["QUIT"] is ReceiverSMTP.smtp_QUIT  # our commands, not aiosmtpd's
        assert ours._smtp_methods["DATA"] is ReceiverSMTP.smtp_DATA
        assert ours._auth_methods.keys() == plain._auth_methods.keys()
        reader = ours._stream_reader  # the session's reader, handed over at connection_made
        assert isinstance(reader, asyncio.StreamReader)
        assert reader._limit == ReceiverSMTP.line_length_limit  # type: ignore[attr-defined]
    finally:
        loop.close()

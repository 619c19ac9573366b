"""`smtpgw sink`, the capture MTA `make run` delivers to, as a real process."""

from __future__ import annotations

import smtplib
import sys
from pathlib import Path

import pytest

from tests.e2e.gateway import Process, port_open
from tests.support import free_port, wait_until

pytestmark = [pytest.mark.e2e]


def test_sink_stores_each_message_with_its_envelope_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    mail = tmp_path / "mail"
    argv = [sys.executable, "-m", "services.cli", "sink", "--listen", f"127.0.0.1:{port}", "--dir", str(mail)]
    sink = Process("sink", argv, tmp_path / "sink.log")
    sink.start()
    try:
        assert wait_until(lambda: port_open(port), 30), sink.log()
        body = b"Subject: hi\r\n\r\nline one\r\n.a line that starts with a dot\r\n"
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            refused = client.sendmail("a@example.org", ["b@example.test", "c@example.test"], body)
        assert refused == {}
        [stored] = (mail / "new").iterdir()  # stored before the 250: no waiting
        assert stored.read_bytes() == (
            b"X-Sink-Mail-From: <a@example.org>\r\nX-Sink-Rcpt-To: <b@example.test>, <c@example.test>\r\n" + body
        )
        assert list((mail / "tmp").iterdir()) == []
        assert sink.terminate(15) == 0, sink.log()
        assert "listening on 127.0.0.1:" in sink.log()
    finally:
        sink.kill()

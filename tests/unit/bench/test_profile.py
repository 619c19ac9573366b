"""The profile summary charges each sample to the smtpgw part that called the leaf."""

from __future__ import annotations

import pytest

from bench import profile

RAW = [
    "thread (1): MainThread;run (services/runner.py:1);SMTP._handle_client (aiosmtpd/smtp.py:756);"
    "ReceiverSMTP.smtp_DATA (services/receiver/smtp.py:319);read_data (services/receiver/dataread.py:165) 5\n",
    "thread (2): scan-0;SpoolTransport._process (shared/spool.py:385);handle (services/scanner/app.py:66);"
    "inspect (services/scanner/mime.py:90);FeedParser._parsegen (email/feedparser.py:404) 3\n",
    "thread (3): delivery-loop;SmtpClient._transact (services/delivery/smtp_client.py:351);"
    "normalize_message_line_endings (aiosmtplib/protocol.py:41) 4\n",
    "thread (2): scan-0;SpoolTransport._process (shared/spool.py:385);handle (services/scanner/app.py:66);"
    "event (shared/logging.py:43);JSONEncoder.iterencode (json/encoder.py:258) 2\n",
    "thread (4): receiver-publish_0;SpoolTransport._write (shared/spool.py:188) 1\n",
    "thread (5): asyncio_0;BaseEventLoop._run_once (asyncio/base_events.py:1922) 1\n",
]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (RAW[0], "receiver (aiosmtpd, DATA reader)"),
        (RAW[1], "scanner (MIME, policy, clamd client)"),
        (RAW[2], "delivery (aiosmtplib, ledger)"),
        (RAW[3], "logging"),
        (RAW[4], "spool and envelope codec"),
        (RAW[5], profile.OTHER),
    ],
)
def test_component(line: str, expected: str) -> None:
    assert profile.component(line.rpartition(" ")[0]) == expected


def test_summary_and_table() -> None:
    totals = profile.summarise([*RAW, "garbage\n"])
    assert sum(totals.values()) == 16
    text = profile.table(totals)
    assert text.splitlines()[2] == "| receiver (aiosmtpd, DATA reader) | 31% |"
    assert profile.top_functions(RAW, 1) == [("read_data (services/receiver/dataread.py:165)", 5)]

"""Scanners in separate processes pick up a new attachment list from a rule bundle, without a
restart: two `smtpgw run scanner` processes on RabbitMQ, `smtpgw update now` installs a signed
bundle and announces it on the fanout exchange, both reload and report, and mail with the newly
blocked file type stops getting through.
"""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Mapping
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest

from services.updater.bundle import build_bundle, generate_key, load_private_key
from shared.broker import BrokerTransport
from shared.config import BrokerConfig
from shared.rules import RULES_LOADED, RULES_UPDATED
from shared.transport import Queue
from tests.e2e.gateway import Process, metrics_text, write_config
from tests.integration.test_transport_contract import Sink, delete_namespace, make_envelope
from tests.support import free_port, wait_until

pytestmark = pytest.mark.integration

PRIVATE, PUBLIC = generate_key()


def mail_with(name: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "sender@example.org", "user@example.test", name
    msg.set_content("Attached.\n")
    msg.add_attachment(
        b"harmless bytes " + name.encode(), maintype="application", subtype="octet-stream", filename=name
    )
    return msg.as_bytes(policy=SMTP)


class Reports:
    """The "rules.loaded" reports the scanners send, as the updater hears them."""

    def __init__(self) -> None:
        self.seen: list[Mapping[str, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, name: str, data: Mapping[str, Any]) -> None:
        if name == RULES_LOADED:
            with self.cond:
                self.seen.append(data)
                self.cond.notify_all()

    def scanners(self, requested: str) -> dict[str, Mapping[str, Any]]:
        with self.cond:
            return {str(r["scanner"]): r for r in self.seen if r["requested"] == requested}


def test_scanners_in_separate_processes_reload_a_bundle(tmp_path: Path, rabbitmq_url: str, clamd_address: str) -> None:
    broker = BrokerConfig(url=rabbitmq_url, namespace=f"test-{uuid.uuid4().hex[:12]}", confirm_timeout=5.0)
    bundle = tmp_path / "bundle.tar.gz"
    config = write_config(
        tmp_path / "smtpgw.toml",
        {
            "broker": {"url": rabbitmq_url, "namespace": broker.namespace, "confirm_timeout": "5s"},
            "scanner": {
                "clamd": clamd_address,
                "threads": 1,
                "rules_dir": str(tmp_path / "rules"),
                "retry_delay": "1s",
            },
            "updater": {
                "bundle_url": bundle.as_uri(),
                "bundle_public_keys": [PUBLIC],
                "state_dir": str(tmp_path / "updater"),
                "report_window": "3s",
            },
            "logging": {"format": "json"},
        },
    )
    ports = [free_port(), free_port()]
    scanners = [
        Process(
            f"scanner{i}",
            [sys.executable, "-m", "services.cli", "run", "scanner", "-c", str(config)],
            tmp_path / f"scanner{i}.log",
            env={"SMTPGW_METRICS__LISTEN": f"127.0.0.1:{port}"},
        )
        for i, port in enumerate(ports)
    ]
    reports = Reports()
    delivered = Sink()
    test_side = BrokerTransport(broker, retry_interval=0.5)
    test_side.subscribe_events(reports)
    test_side.consume(Queue.DELIVER, delivered, 2)
    test_side.consume(Queue.QUARANTINE, Sink(), 1)
    try:
        test_side.start()
        for p in scanners:
            p.start()
        # Both scanners listen to events once they answer one (no bundle yet: they say they could not load it).
        assert wait_until(
            lambda: test_side.publish_event(RULES_UPDATED, {"version": "probe"}) or len(reports.scanners("probe")) == 2,
            timeout=60,
            interval=0.5,
        ), "\n".join(p.log() for p in scanners)
        pids = {p.proc.pid for p in scanners if p.proc}

        def scan(name: str) -> list[str]:
            """Categories of the findings on a message with attachment `name`, scanned by some scanner."""
            body = mail_with(name)
            before = len(delivered.jobs)
            test_side.publish(Queue.SCAN, make_envelope(body), body)
            [job] = delivered.wait_for(before + 1)[before:]
            return [v.category for v in job.envelope.verdicts]

        assert scan("data.xyz") == []  # clean: it goes on as it came, no verdict added

        bundle.write_bytes(
            build_bundle({"attachments.toml": b'blocked_extensions = ["xyz"]\n'}, "1", load_private_key(PRIVATE))
        )
        update = Process(
            "update",
            [sys.executable, "-m", "services.cli", "update", "now", "-c", str(config)],
            tmp_path / "update.log",
        )
        update.start()
        assert update.proc is not None
        assert update.proc.wait(60) == 0, update.log()
        assert "rules: activated 1" in update.log()

        # Each scanner process heard the announcement, reloaded, and said so.
        assert wait_until(lambda: len(reports.scanners("1")) == 2, timeout=20), reports.seen
        assert {(r["ok"], r["version"]) for r in reports.scanners("1").values()} == {(True, "1")}
        for port in ports:
            assert 'smtpgw_scanner_rules_version_info{version="1"} 1.0' in metrics_text(port)

        # Whichever scanner takes a message now blocks .xyz; nothing was restarted.
        for i in range(6):
            assert scan(f"data{i}.xyz") == ["attachment"]
        assert scan("data.txt") == []
        assert all(p.alive() for p in scanners)
        assert {p.proc.pid for p in scanners if p.proc} == pids
    except BaseException:
        for p in scanners:
            print(f"===== {p.name} =====\n{p.log()[-5000:]}")
        raise
    finally:
        for p in scanners:
            p.terminate(20)
        test_side.stop(5)
        delete_namespace(broker, [test_side])

"""A new custom signature reaches a running gateway: `smtpgw run all` keeps running, its clamd
reloads, and a test pattern that passed a minute ago is caught in mail passing through.

Real processes: the gateway (`smtpgw run all`, which includes the updater), a clamd of the
test's own, `smtpgw update now` from the command line, a loopback HTTP server as the signature
source, real SMTP on both sides.
"""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.e2e.gateway import Gateway
from tests.integration.peers import Response, ndb, own_clamd, site
from tests.support import capture_server

pytestmark = pytest.mark.integration

PATTERN = b"SMTPGW-GATEWAY-RELOAD-TEST-PATTERN-0042"


def message(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "sender@example.org", "user@example.test", subject
    msg.set_content("See the attached notes.\n")
    msg.add_attachment(
        b"notes: " + PATTERN + b"\n", maintype="application", subtype="octet-stream", filename="notes.bin"
    )
    return msg.as_bytes(policy=email.policy.SMTP)


def send(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("sender@example.org", ["user@example.test"], data)


def parts(data: bytes) -> list[bytes]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return [part.get_payload(decode=True) or b"" for part in msg.walk() if not part.is_multipart()]


def test_a_new_signature_is_caught_without_restarting_anything(tmp_path: Path) -> None:
    with own_clamd(tmp_path / "clamd") as clamd, site() as mirror, capture_server() as (handler, port):
        # Not published yet: the gateway's updater finds nothing at start-up (and keeps running).
        mirror.routes["/sigs/gateway.ndb"] = Response(b"not yet", 404)
        (tmp_path / "gw").mkdir()
        gw = Gateway(
            tmp_path / "gw",
            {
                "scanner": {"clamd": clamd.address, "threads": 2, "retry_delay": "1s"},
                "delivery": {
                    "routes": {"example.test": f"smtp://127.0.0.1:{port}"},
                    "retry_interval": "1s",
                    "max_queue_lifetime": "60s",
                },
                "updater": {
                    "database_dir": str(clamd.database_dir),
                    "state_dir": str(tmp_path / "gw" / "updater"),
                    "signature_urls": [mirror.url("/sigs/gateway.ndb")],
                    "timeout": "5s",
                    "retries": 1,
                },
            },
        )
        try:
            gateway = gw.run_all()
            send(gw.smtp_port, message("before"))
            [before] = handler.wait_for(1)
            assert PATTERN + b"\n" in [p.removeprefix(b"notes: ") for p in parts(before.data)]
            assert b"X-SMTPGW-Finding" not in before.data

            mirror.serve("/sigs/gateway.ndb", ndb("Smtpgw.Test.Gateway", PATTERN))
            update = gw.cli("update", "now")
            assert update.returncode == 0, update.stdout + update.stderr
            assert "signatures: activated" in update.stdout

            send(gw.smtp_port, message("after"))
            after = handler.wait_for(2)[1]
            assert b"Smtpgw.Test.Gateway" in after.data  # the X-SMTPGW-Finding header names it
            assert not any(PATTERN in p for p in parts(after.data))
            assert any(b"notes.bin" in p and b"infected" in p for p in parts(after.data))

            # Nothing was restarted: the same gateway process, the same clamd.
            assert gateway.alive()
            assert clamd.process.poll() is None
            status = json.loads(gw.cli("update", "status", "--json").stdout)
            assert status["components"]["signatures"]["result"] == "activated"
            assert status["signatures"] == 4
        except BaseException:
            print(gw.logs())
            raise
        finally:
            gw.stop()

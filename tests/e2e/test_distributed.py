"""Distributed mode end to end: every service its own `smtpgw run <role>` process, all on one
RabbitMQ (a namespace of their own per test, deleted afterwards), a real clamd behind a TCP
proxy the test can take down, Redis as the delivery ledger, and a capture SMTP server as the
internal mail system.

- `test_distributed_run_survives_faults`: receiver + 3 scanner replicas + delivery + quarantine
  take SMTPGW_E2E_MESSAGES messages (default 300; the issue's numbers come from 1,000) of a
  realistic mix while one scanner and then the delivery process are killed with -9 and
  restarted, clamd is unreachable for a while, and a scanner and the delivery process get
  SIGTERM mid-run (they finish what they hold, ack it and exit 0). Every clean message arrives
  exactly once and unchanged, every dangerous one is stripped or held, none is lost, and the
  work spreads over all three scanners. A poison (undecodable) message ends in the quarantine
  under "dead".
- `test_rabbitmq_restart_during_a_run`: `rabbitmqctl stop_app` / `start_app` in the middle of a
  smaller run. SMTP sessions outside DATA survive it; nothing is lost or duplicated.

Each run prints one summary line: sent, delivered, lost, duplicated and the recovery time of
each fault, mostly from the end of the fault (process restarted, clamd back, broker started)
until every message accepted before that moment had arrived (`catch_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import http.client
import io
import itertools
import os
import queue as queuelib
import random
import re
import shutil
import signal
import smtplib
import subprocess
import threading
import time
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pika
import pytest

from services.quarantine.store import QuarantineError, QuarantineStore
from services.runner import STOP_TRACE_AFTER
from shared.broker import BrokerTransport
from shared.config import BrokerConfig
from shared.transport import Queue
from tests.e2e.gateway import Gateway, Process, metrics_text, port_open
from tests.support import EICAR, TcpProxy, free_port, missing, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MESSAGES = int(os.environ.get("SMTPGW_E2E_MESSAGES", "300"))
# Messages per second the senders offer: sending lasts about 30 s whatever the count, so the
# faults below hit a gateway that is busy, as in production, not one that already drained.
RATE = float(os.environ.get("SMTPGW_E2E_RATE", "0")) or max(10.0, MESSAGES / 30)
SENDERS = 4  # concurrent SMTP client connections
SCANNERS = 3
SCANNER_THREADS = 2
DELIVERY_THREADS = 4
REDIS_URL = "redis://127.0.0.1:6379/0"
DOWNTIME = 2.0  # a killed process stays down this long before it is started again
CLAMD_DOWNTIME = 5.0
BROKER_DOWNTIME = 5.0

# ---------------------------------------------------------------- the mix

# kind -> share of twenty messages. "big" is added once: a 15 MiB attachment, 20 MiB encoded.
MIX = {
    "text": 8,
    "html": 3,
    "pdf": 3,
    "zip": 2,
    "eicar-attached": 1,
    "eicar-zipped": 1,
    "exe": 1,
    "eicar-body": 1,
}
CLEAN = {"text", "html", "pdf", "zip", "big"}  # arrive exactly once, byte for byte
STRIPPED = {"eicar-attached", "eicar-zipped", "exe"}  # arrive once, the dangerous part removed
HELD = {"eicar-body"}  # never arrive: quarantined whole (virus in the body cannot be removed)
MZ = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"tool payload " * 40
TEST_ID = re.compile(rb"^X-Test-Id: (m\d+)\r?$", re.MULTILINE)


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def build_message(i: int, kind: str, rng: random.Random) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"sender{i % 7}@example.org"
    msg["To"] = "user@example.test"
    msg["Subject"] = f"{kind} message {i}"
    msg["Message-ID"] = f"<m{i:05d}.{kind}@example.org>"
    msg["X-Test-Id"] = f"m{i:05d}"
    words = " ".join(rng.choice(("quarterly", "report", "meeting", "invoice", "lunch", "deadline")) for _ in range(60))
    if kind == "eicar-body":
        msg.set_content(EICAR.decode() + "\n")
    else:
        msg.set_content(f"Message {i}.\n{words}\n")
    if kind == "html":
        msg.add_alternative(f"<html><body><p>Message {i}</p><p>{words}</p></body></html>", subtype="html")
    elif kind == "pdf":
        pdf = b"%PDF-1.4\n" + rng.randbytes(rng.randrange(5_000, 120_000)) + b"\n%%EOF\n"
        msg.add_attachment(pdf, maintype="application", subtype="pdf", filename=f"report-{i}.pdf")
    elif kind == "zip":
        archive = _zip({"readme.txt": words.encode(), "data.csv": b"a,b\n1,2\n" * rng.randrange(10, 500)})
        msg.add_attachment(archive, maintype="application", subtype="zip", filename=f"files-{i}.zip")
    elif kind == "big":
        msg.add_attachment(rng.randbytes(15 * 1024 * 1024), maintype="application", subtype="octet-stream",
                           filename="backup.bin")  # fmt: skip
    elif kind == "eicar-attached":
        msg.add_attachment(EICAR, maintype="application", subtype="octet-stream", filename="notes.txt")
    elif kind == "eicar-zipped":
        msg.add_attachment(_zip({"eicar.com": EICAR}), maintype="application", subtype="zip", filename="files.zip")
    elif kind == "exe":
        msg.add_attachment(MZ, maintype="application", subtype="octet-stream", filename="setup.exe")
    return msg.as_bytes(policy=email.policy.SMTP)


def build_mix(count: int, seed: int = 3) -> dict[str, tuple[str, bytes]]:
    """test id -> (kind, message bytes), the kinds shuffled in blocks of twenty."""
    rng = random.Random(seed)
    block = [kind for kind, share in MIX.items() for _ in range(share)]
    kinds: list[str] = []
    while len(kinds) < count:
        rng.shuffle(block)
        kinds.extend(block)
    kinds = kinds[:count]
    kinds[count // 2] = "big"
    return {f"m{i:05d}": (kind, build_message(i, kind, rng)) for i, kind in enumerate(kinds)}


def payloads(data: bytes) -> list[bytes]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return [part.get_payload(decode=True) or b"" for part in msg.walk() if not part.is_multipart()]


def zipped_names(blob: bytes) -> list[str]:
    with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return zf.namelist()
    return []


# ---------------------------------------------------------------- downstream


@dataclass
class Downstream:
    """The internal mail system: records each arrival's test id and time. While `gate` is clear
    it keeps every transaction waiting at RCPT, before anything is committed."""

    arrivals: dict[str, list[tuple[float, bytes]]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)
    gate: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0

    def __post_init__(self) -> None:
        self.gate.set()

    async def handle_RCPT(
        self, server: object, session: object, envelope: object, address: str, options: list[str]
    ) -> str:
        if not self.gate.is_set():
            with self.lock:
                self.waiting += 1
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
            finally:
                with self.lock:
                    self.waiting -= 1
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        data = bytes(envelope.original_content or b"")  # type: ignore[attr-defined]
        match = TEST_ID.search(data)
        with self.lock:
            self.arrivals[match.group(1).decode() if match else "?"].append((time.monotonic(), data))
        return "250 2.0.0 OK captured"

    def arrived(self) -> set[str]:
        with self.lock:
            return set(self.arrivals)

    def first_arrival(self, test_id: str) -> float | None:
        with self.lock:
            times = self.arrivals.get(test_id)
            return times[0][0] if times else None


@contextlib.contextmanager
def downstream_server() -> Iterator[tuple[Downstream, int]]:
    from aiosmtpd.controller import Controller

    handler = Downstream()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, data_size_limit=64 * 1024 * 1024)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# ---------------------------------------------------------------- the sending MTA


class Sender:
    """SENDERS client threads sending the mix over long-lived SMTP sessions, like an MTA: a 4xx
    means try again shortly; a connection lost before the reply to DATA means send it again
    (RFC 1047: then it may arrive twice, which is counted apart from the gateway's duplicates)."""

    def __init__(self, port: int, mix: dict[str, tuple[str, bytes]], rate: float = RATE) -> None:
        self.port = port
        self.mix = mix
        self.rate = rate
        self.slots = itertools.count()
        self.started = time.monotonic()
        self.todo: queuelib.Queue[str] = queuelib.Queue()
        for test_id in mix:
            self.todo.put(test_id)
        self.accepted: dict[str, float] = {}
        self.tempfails: Counter[str] = Counter()  # "451 4.3.2" -> count
        self.resent: Counter[str] = Counter()  # test id -> resends after an unanswered DATA
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, name=f"sender-{n}", daemon=True) for n in range(SENDERS)]

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def accepted_before(self, moment: float) -> set[str]:
        with self.lock:
            return {test_id for test_id, at in self.accepted.items() if at < moment}

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _run(self) -> None:
        smtp: smtplib.SMTP | None = None
        sent_on_session = 0
        while not self.stop.is_set():
            try:
                test_id = self.todo.get_nowait()
            except queuelib.Empty:
                break
            # The offered load: message k is not sent before k / rate seconds into the run.
            self.stop.wait(max(0.0, self.started + next(self.slots) / self.rate - time.monotonic()))
            backoff = 0.1
            while not self.stop.is_set():
                try:
                    if smtp is None or sent_on_session >= 50:
                        with contextlib.suppress(smtplib.SMTPException, OSError):
                            if smtp is not None:
                                smtp.quit()
                        smtp, sent_on_session = smtplib.SMTP("127.0.0.1", self.port, timeout=60), 0
                        smtp.ehlo("mta.example.org")
                    smtp.sendmail("sender@example.org", ["user@example.test"], self.mix[test_id][1])
                    with self.lock:
                        self.accepted[test_id] = time.monotonic()
                    sent_on_session += 1
                    break
                except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused) as exc:
                    reply = _reply_of(exc)
                    if not reply.startswith("4"):
                        with self.lock:
                            self.errors.append(f"{test_id}: {reply}")
                        break
                    with self.lock:
                        self.tempfails[reply[:9]] += 1
                    if reply.startswith("421"):
                        smtp = None
                except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, OSError) as exc:
                    if smtp is not None and isinstance(exc, smtplib.SMTPServerDisconnected | TimeoutError):
                        with self.lock:
                            self.resent[test_id] += 1
                    smtp = None
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
        if smtp is not None:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()


def _reply_of(exc: smtplib.SMTPException) -> str:
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, text = next(iter(exc.recipients.values()))
    else:
        code, text = exc.smtp_code, exc.smtp_error  # type: ignore[attr-defined]
    return f"{code} {text.decode(errors='replace') if isinstance(text, bytes) else text}"


# ---------------------------------------------------------------- the cluster


@dataclass
class Replica:
    role: str
    name: str
    metrics_port: int
    process: Process
    jobs_done: list[int] = field(default_factory=lambda: [0])  # scan jobs done, per incarnation
    down: bool = False  # stopped on purpose, not expected to run


class Cluster:
    """The gateway's services as separate processes sharing one config, each with its own
    metrics port, plus a broker handle of the test's own for queue depths and consumer counts."""

    def __init__(
        self,
        workdir: Path,
        rabbitmq_url: str,
        clamd: str,
        downstream_port: int,
        scanners: int = SCANNERS,
        **broker: object,
    ) -> None:
        self.scanners = scanners
        self.namespace = f"e2e-{uuid.uuid4().hex[:10]}"
        self.broker_config = BrokerConfig(url=rabbitmq_url, namespace=self.namespace, confirm_timeout=5.0)
        self.gateway = Gateway(
            workdir,
            {
                "receiver": {"max_message_size": "32MiB", "max_connections_per_client": 100},
                "broker": {"url": rabbitmq_url, "namespace": self.namespace, "confirm_timeout": "5s", **broker},
                "scanner": {"clamd": clamd, "retry_delay": "1s", "clamd_timeout": "30s"},
                "delivery": {
                    "routes": {"example.test": f"smtp://127.0.0.1:{downstream_port}", "*": "mx"},
                    "retry_interval": "2s",
                    "max_queue_lifetime": "30m",
                    "threads": DELIVERY_THREADS,
                    "ledger": REDIS_URL,
                },
                "logging": {"format": "json", "level": "info"},
            },
        )
        self.replicas: dict[str, Replica] = {}
        self.broker = BrokerTransport(self.broker_config, retry_interval=2.0, name="e2e-observer")
        self._scraping = threading.Event()
        self._scraper: threading.Thread | None = None

    # processes

    def spawn(self, role: str, name: str, *extra: str) -> Replica:
        port = free_port()
        env = {"SMTPGW_METRICS__LISTEN": f"127.0.0.1:{port}"}
        process = self.gateway.spawn("run", role, *extra, name=name, env=env)
        replica = Replica(role, name, port, process)
        self.replicas[name] = replica
        return replica

    def start_all(self) -> None:
        self.spawn("receiver", "receiver")
        for n in range(self.scanners):
            self.spawn("scanner", f"scanner-{n}", "--threads", str(SCANNER_THREADS))
        self.spawn("delivery", "delivery")
        self.spawn("quarantine", "quarantine")
        self.wait_ready()
        self._scraper = threading.Thread(target=self._scrape, name="scraper", daemon=True)
        self._scraper.start()

    def restart(self, name: str) -> None:
        replica = self.replicas[name]
        replica.jobs_done.append(0)
        replica.down = False
        replica.process.start()

    def stop(self, name: str) -> int | None:
        """SIGTERM to one process, which stays down until `restart`; its exit code."""
        replica = self.replicas[name]
        replica.down = True
        return replica.process.terminate(timeout=45)

    def consumers(self) -> dict[Queue, int]:
        return {
            q: self.broker.consumers(q) for q in (Queue.SCAN, Queue.DELIVER, Queue.BOUNCE, Queue.QUARANTINE, Queue.DEAD)
        }

    def wait_ready(self, timeout: float = 60, scanners: int | None = None) -> None:
        expected = {
            Queue.SCAN: self.scanners if scanners is None else scanners,
            Queue.DELIVER: 1,
            Queue.BOUNCE: 1,
            Queue.QUARANTINE: 1,
            Queue.DEAD: 1,
        }

        def ready() -> bool:
            for replica in self.replicas.values():
                if not replica.down and not replica.process.alive():
                    raise RuntimeError(f"{replica.name} exited:\n{replica.process.log()[-5000:]}")
            with contextlib.suppress(Exception):
                return port_open(self.gateway.smtp_port) and self.consumers() == expected
            return False

        if not wait_until(ready, timeout=timeout, interval=0.1):
            raise RuntimeError(f"the cluster did not come up: {self.consumers()}\n{self.gateway.logs()}")

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM to each: each finishes its in-flight work, acks and exits 0."""
        codes: dict[str, int | None] = {}
        threads = []
        for name, replica in self.replicas.items():

            def term(name: str = name, replica: Replica = replica) -> None:
                codes[name] = replica.process.terminate(timeout=45)

            threads.append(threading.Thread(target=term))
            threads[-1].start()
        for thread in threads:
            thread.join()
        self._scraping.set()
        return codes

    # observation

    def _scrape(self) -> None:
        pattern = re.compile(r'^smtpgw_queue_jobs_total\{queue="scan",result="done"\} (\S+)$', re.MULTILINE)
        while not self._scraping.wait(0.3):
            for replica in list(self.replicas.values()):
                if replica.role != "scanner" or not replica.process.alive():
                    continue
                # A scanner killed (or stopping) mid-response cuts the body short: IncompleteRead.
                with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                    found = pattern.search(metrics_text(replica.metrics_port))
                    if found:
                        replica.jobs_done[-1] = max(replica.jobs_done[-1], int(float(found.group(1))))

    def ledger_skipped(self) -> int:
        """Redelivered recipients the delivery ledger kept from going out twice (all incarnations)."""
        return self.replicas["delivery"].process.log().count("status=duplicate")

    def scan_jobs(self) -> dict[str, int]:
        return {r.name: sum(r.jobs_done) for r in self.replicas.values() if r.role == "scanner"}

    def depths(self) -> dict[Queue, int]:
        return {q: self.broker.depth(q) for q in Queue}

    def idle(self) -> bool:
        with contextlib.suppress(Exception):
            return not any(self.depths().values())
        return False

    def publish_garbage(self) -> None:
        """A poison message: bytes that are no message frame at all, straight onto the scan queue."""
        connection = pika.BlockingConnection(pika.URLParameters(self.broker_config.url))
        try:
            connection.channel().basic_publish(
                "", self.broker.names.queue(Queue.SCAN), b"\x00poison: not a frame",
                pika.BasicProperties(delivery_mode=2, message_id="poison-1"),
            )  # fmt: skip
        finally:
            connection.close()

    def quarantined(self) -> list[tuple[str, str, bytes]]:
        """(category, reason, bytes) of every quarantine entry."""
        store = QuarantineStore(str(self.gateway.workdir / "quarantine"))
        out = []
        for entry in store.entries():
            # An entry removed between the listing and the read is gone, not an error.
            with contextlib.suppress(OSError, QuarantineError):
                out.append((entry.category, entry.reason, store.read(entry.queue_id)[1]))
        return out

    def cleanup(self) -> None:
        """Delete the namespace's queues (delay queues too) and its ledger keys."""
        self._scraping.set()
        delay_queues: set[str] = set()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            listed = subprocess.run(
                ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            delay_queues = {n.strip() for n in listed.stdout.split() if n.startswith(f"{self.namespace}.delay.")}
        try:
            self.broker.delete_topology(delay_queues)
        finally:
            self.broker.stop(5)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{self.namespace}:*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def cluster_factory(
    request: pytest.FixtureRequest, tmp_path: Path, rabbitmq_url: str
) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []
    _redis_available()

    def make(clamd: str, downstream_port: int, **options: object) -> Cluster:
        workdir = tmp_path / f"cluster{len(made)}"
        workdir.mkdir()
        made.append(Cluster(workdir, rabbitmq_url, clamd, downstream_port, **options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for cluster in made:
        cluster.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for cluster in made:
            print(cluster.gateway.logs())
    for cluster in made:
        cluster.cleanup()


def _redis_available() -> None:
    if not port_open(6379):
        missing("Redis on 127.0.0.1:6379")


# ---------------------------------------------------------------- checking a run


@dataclass
class Outcome:
    sent: int
    delivered: int
    lost: list[str]
    duplicated: dict[str, int]  # test id -> extra copies
    resent_by_client: int
    dangerous_delivered: list[str]
    changed: list[str]


def check_run(mix: dict[str, tuple[str, bytes]], sender: Sender, downstream: Downstream, held: set[str]) -> Outcome:
    lost, dangerous, changed = [], [], []
    duplicated: dict[str, int] = {}
    with downstream.lock:
        arrivals = {k: list(v) for k, v in downstream.arrivals.items()}
    for test_id in sender.accepted:
        kind, original = mix[test_id]
        copies = [data for _, data in arrivals.get(test_id, [])]
        if kind in HELD:
            if copies:
                dangerous.append(test_id)
            elif test_id not in held:
                lost.append(test_id)
            continue
        if not copies:
            lost.append(test_id)
            continue
        if len(copies) > 1:
            duplicated[test_id] = len(copies) - 1
        for data in copies:
            if kind in CLEAN and not (data.startswith(b"Received: ") and data.endswith(original)):
                changed.append(test_id)
            parts = payloads(data)
            if EICAR in data or any(EICAR in p or MZ in p or "eicar.com" in zipped_names(p) for p in parts):
                dangerous.append(test_id)
    delivered = sum(1 for test_id in sender.accepted if arrivals.get(test_id) and mix[test_id][0] not in HELD)
    return Outcome(
        sent=len(sender.accepted),
        delivered=delivered,
        lost=sorted(lost),
        duplicated=duplicated,
        resent_by_client=sum(sender.resent.values()),
        dangerous_delivered=sorted(set(dangerous)),
        changed=sorted(set(changed)),
    )


def traces(downstream: Downstream, test_ids: Iterable[str]) -> dict[str, list[str]]:
    """The start of each arrived copy of these messages (their Received: header, with the queue id)."""
    with downstream.lock:
        return {
            t: [data[:240].decode("utf-8", "replace") for _, data in downstream.arrivals.get(t, [])] for t in test_ids
        }


def held_ids(cluster: Cluster) -> set[str]:
    """Test ids of messages quarantined whole (not the `.q` copies of stripped originals)."""
    found = set()
    for category, _reason, data in cluster.quarantined():
        match = TEST_ID.search(data)
        if category == "virus" and match:
            found.add(match.group(1).decode())
    return found


def catch_up(sender: Sender, downstream: Downstream, mix: dict[str, tuple[str, bytes]], since: float,
             timeout: float = 120) -> float:  # fmt: skip
    """Seconds from `since` until every deliverable message accepted before it has arrived."""
    waiting = {t for t in sender.accepted_before(since) if mix[t][0] not in HELD}
    assert wait_until(lambda: waiting <= downstream.arrived(), timeout=timeout, interval=0.05), (
        f"{len(waiting - downstream.arrived())} message(s) accepted before the fault ended never arrived"
    )
    return max([since] + [downstream.first_arrival(t) or since for t in waiting]) - since


def first_new_arrival(sender: Sender, downstream: Downstream, since: float) -> float | None:
    """When the first message accepted after `since` arrived, if one has."""
    with sender.lock:
        fresh = [t for t, at in sender.accepted.items() if at >= since]
    times = [at for t in fresh if (at := downstream.first_arrival(t)) is not None]
    return min(times, default=None)


def finish(cluster: Cluster, sender: Sender, downstream: Downstream, mix: dict[str, tuple[str, bytes]]) -> set[str]:
    """Wait until everything sent arrived or was held, and the queues are empty; returns held ids."""
    assert sender.join(300), "the sender did not finish"
    deliverable = {t for t in sender.accepted if mix[t][0] not in HELD}
    expected_held = {t for t in sender.accepted if mix[t][0] in HELD}
    assert wait_until(lambda: deliverable <= downstream.arrived(), timeout=180, interval=0.1), (
        f"never arrived: {sorted(deliverable - downstream.arrived())[:20]}"
    )
    assert wait_until(lambda: expected_held <= held_ids(cluster), timeout=60, interval=0.2)
    assert wait_until(cluster.idle, timeout=60, interval=0.2), cluster.depths()
    return held_ids(cluster)


def summary(name: str, outcome: Outcome, recovery: dict[str, float], extra: str = "") -> str:
    faults = " ".join(f"{k}={v:.1f}s" for k, v in recovery.items())
    return (
        f"SUMMARY {name}: sent={outcome.sent} delivered={outcome.delivered} "
        f"held={outcome.sent - outcome.delivered - len(outcome.lost)} lost={len(outcome.lost)} "
        f"duplicated={sum(outcome.duplicated.values())} resent_by_client={outcome.resent_by_client} "
        f"recovery: {faults} {extra}".rstrip()
    )


# ---------------------------------------------------------------- the runs


def test_distributed_run_survives_faults(cluster_factory: Callable[..., Cluster], clamd_address: str) -> None:
    mix = build_mix(MESSAGES)
    proxy = TcpProxy(free_port(), int(clamd_address.rsplit(":", 1)[1]))
    proxy.start()
    with downstream_server() as (downstream, port):
        cluster = cluster_factory(f"tcp://127.0.0.1:{proxy.listen_port}", port)
        cluster.start_all()
        cluster.publish_garbage()
        sender = Sender(cluster.gateway.smtp_port, mix)
        started = time.monotonic()
        sender.start()
        recovery: dict[str, float] = {}
        delivery_kill: tuple[float, float] = (0.0, 0.0)
        try:
            # 1. kill -9 a scanner holding jobs (clamd made to hang first, so that every scanner
            #    thread is mid-scan): its unacked jobs go to the other replicas at once.
            assert wait_until(lambda: sender.count() >= MESSAGES * 0.15, timeout=120)
            assert sender.count() < MESSAGES  # still sending: the fault hits a busy gateway
            proxy.pause()
            assert wait_until(lambda: proxy.held() >= SCANNERS * SCANNER_THREADS, timeout=30)
            killed = time.monotonic()
            cluster.replicas["scanner-1"].process.kill()
            proxy.resume()
            sender.stop.wait(DOWNTIME)
            cluster.restart("scanner-1")
            back = time.monotonic()
            cluster.wait_ready()
            recovery["scanner_rejoined"] = time.monotonic() - back
            # Measured from the kill: the replicas left take over at once, no restart needed.
            recovery["scanner_kill9"] = catch_up(sender, downstream, mix, killed)

            # 2. kill -9 the delivery process in the middle of its SMTP transactions: the deliver
            #    queue fills while it is down, then drains; nothing it held is lost.
            assert wait_until(lambda: sender.count() >= MESSAGES * 0.35, timeout=120)
            assert sender.count() < MESSAGES
            downstream.gate.clear()
            assert wait_until(lambda: downstream.waiting >= DELIVERY_THREADS, timeout=30)
            killed = time.monotonic()
            cluster.replicas["delivery"].process.kill()
            downstream.gate.set()
            sender.stop.wait(DOWNTIME)
            cluster.restart("delivery")
            back = time.monotonic()
            delivery_kill = (killed, back)
            recovery["delivery_kill9"] = catch_up(sender, downstream, mix, back)

            # 3. SIGTERM to a scanner and the delivery process while both hold work: each stops
            #    consuming, finishes and acks what it holds, and only then exits 0.
            assert wait_until(lambda: sender.count() >= MESSAGES * 0.55, timeout=120)
            assert sender.count() < MESSAGES
            downstream.gate.clear()
            assert wait_until(lambda: downstream.waiting >= 1, timeout=30)
            proxy.pause()
            assert wait_until(lambda: proxy.held() >= SCANNERS * SCANNER_THREADS, timeout=30)
            stopping = {name: cluster.replicas[name].process for name in ("scanner-2", "delivery")}
            for process in stopping.values():
                assert process.proc is not None
                process.proc.send_signal(signal.SIGTERM)
            sender.stop.wait(0.5)
            assert all(p.alive() for p in stopping.values())  # still finishing what they hold
            asked = time.monotonic()
            proxy.resume()
            downstream.gate.set()
            graceful = {name: p.proc.wait(45) for name, p in stopping.items() if p.proc is not None}
            recovery["sigterm_exit"] = time.monotonic() - asked
            assert graceful == {"scanner-2": 0, "delivery": 0}, graceful
            # A stop this slow leaves the threads' stacks in the log (services/runner.py): show them.
            assert recovery["sigterm_exit"] < STOP_TRACE_AFTER, "\n".join(
                f"===== {name} =====\n{p.log()[-8000:]}" for name, p in stopping.items()
            )
            for name, process in stopping.items():
                assert "unfinished" not in process.log(), name
                cluster.restart(name)
            back = time.monotonic()
            cluster.wait_ready()
            recovery["sigterm_restart"] = catch_up(sender, downstream, mix, back)

            # 4. clamd unreachable: nothing accepted meanwhile is delivered before it is back.
            assert wait_until(lambda: sender.count() >= MESSAGES * 0.7, timeout=120)
            assert sender.count() < MESSAGES
            down = time.monotonic()
            proxy.stop()
            sender.stop.wait(CLAMD_DOWNTIME)
            proxy.start()
            up = time.monotonic()
            recovery["clamd_down"] = catch_up(sender, downstream, mix, up)
            scanned_late = {t for t in sender.accepted if sender.accepted[t] >= down + 0.5 and mix[t][0] not in HELD}
            early = [t for t in scanned_late if (downstream.first_arrival(t) or up) < up]
            assert not early, f"delivered while clamd was unreachable: {early}"

            held = finish(cluster, sender, downstream, mix)
            elapsed = time.monotonic() - started
        finally:
            sender.stop.set()
            proxy.stop()
        codes = cluster.stop_all()

    outcome = check_run(mix, sender, downstream, held)
    jobs = cluster.scan_jobs()
    dead = [(c, r) for c, r, _ in cluster.quarantined() if c == "dead"]
    # A duplicate the design allows: kill -9 of delivery between the downstream server's 250 and
    # the ledger record (RFC 1047), so both copies straddle that kill; at most its threads' worth.
    excused = {
        t for t in outcome.duplicated
        if (times := [at for at, _ in downstream.arrivals[t]])[0] < delivery_kill[0] and times[-1] >= delivery_kill[1]
    }  # fmt: skip
    print()
    print(
        summary(
            f"distributed x{MESSAGES}",
            outcome,
            recovery,
            f"elapsed={elapsed:.1f}s tempfails={dict(sender.tempfails)} scan_jobs={jobs} dead={len(dead)} "
            f"ledger_skipped={cluster.ledger_skipped()}",
        )
    )
    assert sender.errors == []
    assert outcome.sent == MESSAGES
    assert outcome.lost == []
    assert outcome.dangerous_delivered == []
    assert outcome.changed == []
    assert set(outcome.duplicated) <= excused, f"duplicates outside the delivery kill: {outcome.duplicated}"
    assert sum(outcome.duplicated.values()) <= DELIVERY_THREADS
    # Load-balancing: every replica did part of the work (the broker spreads by prefetch).
    assert all(done > 0 for done in jobs.values()), jobs
    # The poison message: moved to dead by a scanner, filed in the quarantine with its reason.
    assert len(dead) == 1, dead
    assert dead[0][1].startswith("scan: "), dead
    # SIGTERM: each process finished its in-flight work and exited cleanly.
    assert codes == dict.fromkeys(codes, 0), codes


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def test_rabbitmq_restart_during_a_run(cluster_factory: Callable[..., Cluster], clamd_address: str) -> None:
    """Stops RabbitMQ's app, which every broker user on this machine notices: its own test."""
    if shutil.which("rabbitmqctl") is None:
        missing("rabbitmqctl")
    count = max(60, MESSAGES // 3)
    mix = build_mix(count, seed=5)
    late = build_message(99999, "text", random.Random(1))  # sent on the session that waited
    proxy = TcpProxy(free_port(), int(clamd_address.rsplit(":", 1)[1]))
    proxy.start()
    with downstream_server() as (downstream, port):
        cluster = cluster_factory(f"tcp://127.0.0.1:{proxy.listen_port}", port)
        cluster.start_all()
        # A session that is not in DATA when the broker goes away.
        idle = smtplib.SMTP("127.0.0.1", cluster.gateway.smtp_port, timeout=30)
        idle.ehlo("patient.example.org")
        sender = Sender(cluster.gateway.smtp_port, mix)
        sender.start()
        recovery: dict[str, float] = {}
        try:
            assert wait_until(lambda: sender.count() >= count * 0.3, timeout=120)
            stopped = time.monotonic()
            replies: list[tuple[int, bytes]] = []

            def deferred() -> bool:
                replies.append(idle.mail("late@example.org"))
                idle.rset()
                return replies[-1][0] != 250

            # The broker goes away while every worker holds a job: scans (clamd made to hang) and
            # SMTP transactions (the downstream server made to wait) are let go only once it is
            # down, so their outputs cannot be stored and their acks are lost. The broker hands
            # those jobs out again after the restart; the ledger keeps the deliveries that had
            # completed meanwhile from going out twice.
            downstream.gate.clear()
            assert wait_until(lambda: downstream.waiting >= 1, timeout=30)
            proxy.pause()
            assert wait_until(lambda: proxy.held() >= SCANNERS * SCANNER_THREADS, timeout=30)
            try:
                _rabbitmqctl("stop_app")
                proxy.resume()
                downstream.gate.set()
                # New transactions are deferred, at once, on the session that was waiting.
                asked = time.monotonic()
                assert wait_until(deferred, timeout=5, interval=0.1), replies
                recovery["receiver_defers"] = time.monotonic() - asked
                code, reply = replies[-1]
                assert code == 451, replies
                assert reply[:5] in (b"4.3.2", b"4.3.0"), replies
                sender.stop.wait(BROKER_DOWNTIME)
            finally:
                proxy.resume()
                downstream.gate.set()
                _rabbitmqctl("start_app")
            started = time.monotonic()
            outage = started - stopped

            # The same session gets its next transaction accepted once the broker is back.
            def accepted_again() -> bool:
                try:
                    idle.sendmail("late@example.org", ["user@example.test"], late)
                    return True
                except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError):
                    return False  # smtplib sent RSET: the session goes on

            assert wait_until(accepted_again, timeout=60, interval=0.2)
            recovery["receiver_accepts"] = time.monotonic() - started
            idle.quit()
            recovery["rabbitmq_restart"] = catch_up(sender, downstream, mix, started)
            # Service restored end to end: a message accepted after the restart has arrived.
            assert wait_until(lambda: first_new_arrival(sender, downstream, started) is not None, timeout=60)
            recovery["first_delivery"] = (first_new_arrival(sender, downstream, started) or started) - started
            held = finish(cluster, sender, downstream, mix)
        finally:
            sender.stop.set()
            proxy.stop()
        codes = cluster.stop_all()

    outcome = check_run(mix, sender, downstream, held)
    skipped = cluster.ledger_skipped()
    print()
    print(
        summary(
            f"rabbitmq-restart x{count}",
            outcome,
            recovery,
            f"outage={outage:.1f}s tempfails={dict(sender.tempfails)} scan_jobs={cluster.scan_jobs()} "
            f"ledger_skipped={skipped}",
        )
    )
    assert sender.errors == []
    assert outcome.sent == count
    assert outcome.lost == []
    assert outcome.dangerous_delivered == []
    assert outcome.changed == []
    # On failure, each copy's trace header says which window let it through: two queue ids
    # (the receiver accepted it twice) or one (delivery sent it twice).
    assert outcome.duplicated == {}, f"duplicates after a broker restart: {traces(downstream, outcome.duplicated)}"
    assert skipped >= 1  # the delivery finished during the outage came back and was not sent again
    assert len(downstream.arrivals["m99999"]) == 1  # the waiting session's message
    assert sum(sender.tempfails.values()) > 0  # the outage was seen by the senders
    assert codes == dict.fromkeys(codes, 0), codes


def test_back_pressure_when_the_scan_queue_is_over_its_bound(
    cluster_factory: Callable[..., Cluster], clamd_address: str
) -> None:
    """No scanner consuming: the scan queue grows past [broker].max_scan_queue and the receiver
    answers 451 4.3.2 to new transactions, until a scanner drains it again."""
    bound = 10
    mix = build_mix(80, seed=7)
    paced = threading.Event()  # never set: the client's pace between messages
    with downstream_server() as (downstream, port):
        cluster = cluster_factory(clamd_address, port, scanners=1, max_scan_queue=bound)
        cluster.start_all()
        assert cluster.stop("scanner-0") == 0
        cluster.wait_ready(scanners=0)
        accepted: list[str] = []
        refusal = None
        with smtplib.SMTP("127.0.0.1", cluster.gateway.smtp_port, timeout=30) as smtp:
            smtp.ehlo("mta.example.org")
            for test_id, (_kind, data) in mix.items():
                try:
                    smtp.sendmail("sender@example.org", ["user@example.test"], data)
                    accepted.append(test_id)
                except smtplib.SMTPSenderRefused as exc:
                    refusal = _reply_of(exc)
                    break
                paced.wait(0.05)  # about 20 messages a second
            assert refusal is not None, f"{len(accepted)} messages accepted with nothing scanning"
            assert refusal.startswith("451 4.3.2"), refusal
            # The receiver learns the depth about once a second: up to that second's worth more get in.
            assert bound < len(accepted) <= bound + 40, len(accepted)
            cluster.restart("scanner-0")
            started = time.monotonic()
            cluster.wait_ready()

            def accepted_again() -> bool:
                try:
                    smtp.sendmail("sender@example.org", ["user@example.test"], mix["m00079"][1])
                    return True
                except smtplib.SMTPSenderRefused:
                    return False

            assert wait_until(accepted_again, timeout=60, interval=0.2)
            recovered = time.monotonic() - started
        deliverable = {t for t in [*accepted, "m00079"] if mix[t][0] not in HELD}
        assert wait_until(lambda: deliverable <= downstream.arrived(), timeout=60, interval=0.1)
        assert wait_until(cluster.idle, timeout=60, interval=0.2), cluster.depths()
        codes = cluster.stop_all()
    with downstream.lock:
        copies = {t: len(downstream.arrivals[t]) for t in deliverable}
    print()
    print(
        f"SUMMARY back-pressure: accepted_before_451={len(accepted)} bound={bound} refusal={refusal!r} "
        f"accepting_again_after_scanner_restart={recovered:.1f}s"
    )
    assert copies == dict.fromkeys(deliverable, 1)
    assert codes == dict.fromkeys(codes, 0), codes

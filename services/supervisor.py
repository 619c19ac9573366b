"""`smtpgw run all --split`: every service in a process of its own, on one machine.

One `run all` process holds the GIL for receiving, scanning and delivering at
once, so it uses one core. Split, each service (`smtpgw run <role>`) runs in
its own child process over the same spool (or broker), and the machine's
cores work in parallel; the spool hands files between processes with its
notices, exactly as when an operator starts the services one by one.

The supervisor:
- starts one child per role with the same configuration file and environment;
- restarts a child that dies (kill -9, crash) after a backoff that doubles
  up to MAX_BACKOFF, but gives up when a child exits with 2 (a configuration
  or usage error: restarting cannot help);
- on SIGTERM/SIGINT sends SIGTERM to every child, waits for them to finish
  their in-flight work (STOP_TIMEOUT), and exits 0 only if they all did;
- serves the metrics of all children on `[metrics].listen`, aggregated with
  prometheus_client's multiprocess mode (each child writes its samples to
  files in a private directory), plus the queue depths it reads itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from shared.config import Config
from shared.health import Health
from shared.transport import Transport, open_transport

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
STOP_TIMEOUT = 60.0
USAGE_ERROR = 2  # smtpgw's exit code for configuration and usage errors


@dataclass
class _Child:
    role: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    backoff: float = 1.0
    restart_at: float = 0.0  # when a dead child is due to be started again; 0 while it runs
    started_at: float = 0.0

    def start(self) -> None:
        # Children share our stdout, so their JSON log lines arrive in one stream, each naming its service.
        self.proc = subprocess.Popen(self.argv, env=self.env)
        self.started_at = time.monotonic()
        self.restart_at = 0.0
        log.info("started %s (pid %d)", self.role, self.proc.pid)


def run_split(config: Config, config_path: str | None, roles: list[str], threads: int | None = None) -> int:
    """Supervise one child process per role until SIGTERM/SIGINT; returns the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="smtpgw-metrics-")
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        # Only the supervisor listens on [metrics].listen; the children write their samples to metrics_dir.
        "SMTPGW_METRICS__ENABLED": "false",
    }
    base = [sys.executable, "-m", "services.cli", "run"]
    tail = ["-c", config_path] if config_path else []
    children = [
        _Child(role, [*base, role, *tail, *(["--threads", str(threads)] if threads and role == "scanner" else [])], env)
        for role in roles
    ]
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    transport = open_transport(config)
    # The supervisor answers the probes for the group: ready while the broker answers and every
    # child runs (one being restarted makes it unready, not dead).
    health = Health()
    health.add_check("broker", transport.ready)
    health.add_check("services", lambda: _not_running(children))
    try:
        if config.metrics.enabled:
            _serve_metrics(config, transport, metrics_dir, roles, health)
        for child in children:
            child.start()
        code = _watch(children, stopping)
    finally:
        _stop_all(children)
        transport.stop(5)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    failed = [c.role for c in children if c.proc is not None and c.proc.returncode not in (0, None)]
    if failed:
        log.error("children that did not stop cleanly: %s", ", ".join(failed))
    return code or (1 if failed else 0)


def _watch(children: list[_Child], stopping: threading.Event) -> int:
    """Restart children that die, until asked to stop. Returns non-zero to give up."""
    while not stopping.wait(0.5):
        now = time.monotonic()
        for child in children:
            assert child.proc is not None
            code = child.proc.poll()
            if code is None:
                if now - child.started_at > 60:
                    child.backoff = 1.0  # a child that stays up for a minute earns a fresh backoff
                continue
            if code == USAGE_ERROR:
                log.error("%s exited with a configuration or usage error; stopping everything", child.role)
                return 1
            if child.restart_at == 0.0:
                log.error("%s exited with %s; restarting it in %.0fs", child.role, code, child.backoff)
                child.restart_at = now + child.backoff
                child.backoff = min(child.backoff * 2, MAX_BACKOFF)
            elif now >= child.restart_at:
                child.start()
    return 0


def _not_running(children: list[_Child]) -> str | None:
    down = [c.role for c in children if c.proc is None or c.proc.poll() is not None]
    return f"not running: {', '.join(down)}" if down else None


def _stop_all(children: list[_Child]) -> None:
    running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in running:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("pid %d did not stop within %.0fs; killing it", proc.pid, STOP_TIMEOUT)
            proc.kill()
            proc.wait(10)


def _serve_metrics(config: Config, transport: Transport, metrics_dir: str, roles: list[str], health: Health) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from services.runner import register_collectors
    from shared.metrics import serve

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    register_collectors(registry, config, transport, set(roles))
    serve(config.metrics.listen.host, config.metrics.listen.port, registry, health)

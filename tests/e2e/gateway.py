"""Runs the gateway as real processes for end-to-end tests, and dumps their logs on failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, sections: Mapping[str, Mapping[str, object]]) -> Path:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in keys.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Process:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, cwd=str(ROOT)
        )
        log.close()

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                return None
        return self.proc.returncode if self.proc else None

    def alive(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Gateway:
    """One gateway configuration and the processes running it."""

    def __init__(self, workdir: Path, sections: Mapping[str, Mapping[str, object]]) -> None:
        self.workdir = workdir
        self.smtp_port = free_port()
        self.metrics_port = free_port()
        base: dict[str, dict[str, object]] = {
            "receiver": {"listen": f"127.0.0.1:{self.smtp_port}", "internal_domains": ["example.test"]},
            "spool": {"dir": str(workdir / "spool")},
            "quarantine": {"dir": str(workdir / "quarantine")},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "logging": {"format": "json", "level": "info"},
        }
        for section, keys in sections.items():
            base.setdefault(section, {}).update(keys)
        self.config = write_config(workdir / "smtpgw.toml", base)
        self.processes: list[Process] = []

    def spawn(self, *args: str, name: str | None = None, env: Mapping[str, str] | None = None) -> Process:
        """Start `smtpgw <args> -c <config>`; `env` adds variables (e.g. SMTPGW_METRICS__LISTEN) for it alone."""
        name = name or "-".join(args)
        proc = Process(
            name,
            [sys.executable, "-m", "services.cli", *args, "-c", str(self.config)],
            self.workdir / f"{name}.log",
            env=dict(env or {}),
        )
        proc.start()
        self.processes.append(proc)
        return proc

    def run_all(self) -> Process:
        proc = self.spawn("run", "all", name="all")
        if not wait_until(lambda: port_open(self.smtp_port) or not proc.alive(), timeout=30):
            raise RuntimeError(f"gateway did not listen on {self.smtp_port}:\n{proc.log()}")
        if not proc.alive():
            raise RuntimeError(f"gateway exited:\n{proc.log()}")
        return proc

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args, "-c", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(ROOT),
        )

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.log()[-20000:]}" for p in self.processes)

    def stop(self) -> None:
        for proc in self.processes:
            proc.terminate(timeout=20)

    def spool_files(self) -> int:
        root = self.workdir / "spool"
        return (
            sum(
                1 for q in ("scan", "deliver", "deliver.deferred", "bounce", "quarantine") for n in os.listdir(root / q)
            )
            if root.exists()
            else 0
        )


def metrics_text(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def wait_quiet(gateway: Gateway, timeout: float = 60) -> bool:
    """Wait until the spool holds nothing still to be worked on."""
    return wait_until(lambda: gateway.spool_files() == 0, timeout=timeout, interval=0.1)


def now() -> float:
    return time.monotonic()

"""The container deployment: Dockerfile, docker-compose.yml, deploy/ (no Docker engine runs here).

docker-compose.yml is validated by Debian's docker-compose (`config` parses and checks it
against the Compose schema without an engine), and everything the files say about each other
and about smtpgw is checked against the real thing: the roles the CLI knows, the configuration
loader, the ports and paths in the configuration, promtool, and clamd itself, which the
container's entrypoint script starts here for real.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.runner import ROLES
from shared.clamd import ClamdClient
from shared.config import Config, load_config
from tests.support import EICAR, free_port, missing, wait_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CONFIG = ROOT / "deploy" / "smtpgw.toml"
CONFIG_IN_CONTAINER = "/etc/smtpgw/smtpgw.toml"
IMAGE_HOME = "/opt/smtpgw"  # the Dockerfile's WORKDIR, where it copies the checkout's files


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def smtpgw_services() -> dict[str, dict[str, Any]]:
    """The services that run `smtpgw run <role>` (clamd uses the image with another entrypoint)."""
    return {
        n: s for n, s in compose()["services"].items() if s.get("image") == "smtpgw:latest" and "entrypoint" not in s
    }


def config() -> Config:
    """deploy/smtpgw.toml with the environment compose gives the services (its default password)."""
    environment = next(iter(smtpgw_services().values()))["environment"]
    env = {k: v.replace("${RABBITMQ_PASSWORD:-change-me}", "change-me") for k, v in environment.items()}
    return load_config(CONFIG, env=env)


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a service's volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def under(path: str, service: dict[str, Any]) -> tuple[str, bool] | None:
    """The mount of `service` that holds `path`, if any."""
    for target, mount in mounts(service).items():
        if path == target or path.startswith(target + "/"):
            return mount
    return None


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_file_is_valid_for_docker_compose() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        missing("docker-compose (Debian package docker-compose)")
    result = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_every_role_runs_once_with_the_mounted_configuration() -> None:
    services = smtpgw_services()
    roles = []
    for name, service in services.items():
        command = service["command"]
        assert command[0] == "run", name
        assert command[2:] == ["-c", CONFIG_IN_CONTAINER], name
        roles.append(command[1])
        assert mounts(service)[CONFIG_IN_CONTAINER] == ("./deploy/smtpgw.toml", True), name
    assert sorted(roles) == sorted(ROLES)


def test_configuration_is_valid_and_names_the_compose_services() -> None:
    cfg = config()  # raises ConfigError, naming every bad key, as `smtpgw check-config` does
    services = compose()["services"]
    assert cfg.broker.url.startswith("amqp://")
    hosts = re.findall(
        r"//(?:[^@/]*@)?([a-z0-9-]+):",
        " ".join([cfg.broker.url, cfg.scanner.clamd, cfg.delivery.ledger, *cfg.updater.clamd]),
    )
    assert sorted(set(hosts)) == ["clamd", "rabbitmq", "redis"]
    assert set(hosts) <= set(services)
    # What the containers listen on is what the configuration says.
    receiver = services["receiver"]
    assert receiver["ports"] == [f"25:{cfg.receiver.listen.port}"]
    assert cfg.scanner.clamd.endswith(":3310")  # clamd-entrypoint.sh's CLAMD_PORT default


def test_each_directory_of_the_configuration_is_on_a_volume_of_the_service_that_writes_it() -> None:
    cfg, services = config(), compose()["services"]
    writes = {
        "updater": [cfg.updater.database_dir, cfg.scanner.rules_dir, cfg.updater.state_dir],
        "quarantine": [cfg.quarantine.dir],
    }
    reads = {"scanner": [cfg.scanner.rules_dir], "clamd": [cfg.updater.database_dir]}
    for name, paths in writes.items():
        for path in paths:
            mount = under(path, services[name])
            assert mount is not None, f"{name} has no volume for {path}"
            assert not mount[1], f"{name} cannot write {path}"
    for name, paths in reads.items():
        for path in paths:
            assert under(path, services[name]) == ("shared", True), f"{name} does not see {path}"
    # A switched directory (a symlink the updater renames) cannot be a mount point itself.
    for path in (cfg.updater.database_dir, cfg.scanner.rules_dir):
        assert all(path not in mounts(s) for s in services.values())
    declared = set(compose()["volumes"])
    used = {m[0] for s in services.values() for m in mounts(s).values() if not m[0].startswith(".")}
    assert used == declared


def test_clamd_entrypoint_loads_the_directory_the_updater_writes() -> None:
    script = (ROOT / "deploy" / "clamd-entrypoint.sh").read_text()
    default = re.search(r'DB="\$\{CLAMD_DATABASE:-([^}]+)\}"', script)
    assert default is not None
    assert default.group(1) == config().updater.database_dir
    assert compose()["services"]["clamd"]["entrypoint"] == [f"{IMAGE_HOME}/deploy/clamd-entrypoint.sh"]
    assert os.access(ROOT / "deploy" / "clamd-entrypoint.sh", os.X_OK)


def test_depends_on_names_services_that_have_a_health_check() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for other in service.get("depends_on", {}):
            assert "healthcheck" in services[other], f"{name} waits for {other}, which has no health check"


# ---------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_copies_what_the_install_needs_and_the_context_holds_it() -> None:
    steps = dockerfile()
    ignored = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    copied: list[str] = []
    for instruction, args in steps:
        if instruction == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not any(fnmatch.fnmatch(source.rstrip("/"), pattern) for pattern in ignored), source
                copied.append(source.rstrip("/"))
        if instruction == "RUN" and "pip install" in args:
            # pyproject.toml's packages and readme are in the image before it installs them.
            assert {"pyproject.toml", "README.md", "shared", "services"} <= set(copied)
    assert ("WORKDIR", IMAGE_HOME) in steps
    assert {"deploy", "etc"} <= set(copied)  # the entrypoint script and clamd.conf.in


def test_dockerfile_exposes_the_configured_ports_and_runs_as_the_volume_owner() -> None:
    steps = dockerfile()
    last = dict(steps)
    cfg = config()
    assert sorted(last["EXPOSE"].split()) == sorted([str(cfg.receiver.listen.port), str(cfg.metrics.listen.port)])
    assert last["USER"] == "10025:10025"
    assert any("useradd" in args and "--uid 10025" in args for step, args in steps if step == "RUN")
    assert last["ENTRYPOINT"] == '["smtpgw"]'
    # The health check asks the service itself, with a command the CLI has.
    check = json.loads(last["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert check == ["smtpgw", "health", "-c", CONFIG_IN_CONTAINER]
    assert build_parser().parse_args(check[1:]).func.__name__ == "_cmd_health"


# ---------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_every_service_on_the_metrics_port(tmp_path: Path, promtool: str) -> None:
    data = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = data["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert sorted(sd["names"]) == sorted(smtpgw_services())
    assert sd["port"] == config().metrics.listen.port
    mounted = mounts(compose()["services"]["prometheus"])
    assert all(rule in mounted for rule in data["rule_files"])
    # promtool reads the rule files too: point it at the repository's copy.
    data["rule_files"] = [str(ROOT / "etc" / "prometheus" / "smtpgw-alerts.yml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(data))
    result = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- clamd's entrypoint, run here


class Entrypoint:
    """deploy/clamd-entrypoint.sh run for real on loopback, as the container runs it."""

    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("clamd") is None:
            missing("clamd (Debian package clamav-daemon)")
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.database = tmp_path / "shared" / "clamav"
        self.database.parent.mkdir()
        (tmp_path / "tmp").mkdir()
        self.log = tmp_path / "clamd.out"
        self.env = {
            **os.environ,
            "SMTPGW_HOME": str(ROOT),
            "CLAMD_DATABASE": str(self.database),
            "CLAMD_PORT": str(self.port),
            "CLAMD_ADDR": "127.0.0.1",
            "CLAMD_CONF": str(tmp_path / "clamd.conf"),
            "CLAMD_TMP": str(tmp_path / "tmp"),
            "CLAMD_WAIT": "0.1",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, **env: str) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                [str(ROOT / "deploy" / "clamd-entrypoint.sh")], env={**self.env, **env}, stdout=out, stderr=out
            )
        self.procs.append(proc)
        return proc

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                s.sendall(b"zPING\0")
                return s.recv(8).startswith(b"PONG")
        except OSError:
            return False

    def wait_answering(self, proc: subprocess.Popen[bytes]) -> None:
        wait_until(lambda: proc.poll() is not None or self.answers(), timeout=60, interval=0.1)
        assert proc.poll() is None, self.log.read_text()
        assert self.answers()

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def entrypoint(tmp_path: Path) -> Iterator[Entrypoint]:
    runner = Entrypoint(tmp_path)
    try:
        yield runner
    finally:
        runner.stop()


def test_clamd_waits_for_the_updaters_first_signatures(entrypoint: Entrypoint) -> None:
    proc = entrypoint.start()
    assert wait_until(lambda: "waiting for the updater" in entrypoint.log.read_text(), timeout=10)
    assert not entrypoint.answers()
    assert proc.poll() is None
    # The updater's layout (services/updater/versions.py): a symlink switched to a complete version.
    version = entrypoint.database.parent / "clamav.versions" / "20261207T000000Z-first"
    version.mkdir(parents=True)
    for name in ("smtpgw.hsb", "smtpgw.ndb"):
        shutil.copy(ROOT / "etc" / "clamav" / name, version / name)
    entrypoint.database.symlink_to(Path("clamav.versions") / version.name)
    entrypoint.wait_answering(proc)
    client = ClamdClient(entrypoint.address, timeout=10)
    assert client.scan(EICAR).found
    assert client.scan(b"a clean message\r\n").clean


def test_clamd_seeds_an_empty_volume_when_asked_and_only_once(entrypoint: Entrypoint) -> None:
    first = entrypoint.start(CLAMD_SEED="yes")
    entrypoint.wait_answering(first)
    assert entrypoint.database.is_symlink()  # the layout the updater switches
    version = entrypoint.database.resolve()
    assert version.parent == entrypoint.database.parent / "clamav.versions"
    assert {p.name for p in version.iterdir()} >= {"smtpgw.hsb", "smtpgw.ndb"}
    assert ClamdClient(entrypoint.address, timeout=10).scan(EICAR).found
    first.terminate()
    first.wait(10)
    second = entrypoint.start(CLAMD_SEED="yes")
    entrypoint.wait_answering(second)
    assert entrypoint.log.read_text().count("seeded") == 1
    assert entrypoint.database.resolve() == version

"""The benchmark run: start the peers, measure every system, check what arrived, report.

Order of a full run (each phase bounded in count and time):
1. the corpus (seeded) and its DATA-phase bytes, written once for the load processes;
2. a clamd of our own on its own port, a sink (Postfix's smtp-sink, dumping each
   message to a file in /dev/shm so the arrival time and bytes can be checked);
3. baselines: loopback (load generator -> sink), clamd ceiling (INSTREAM, N clients),
   ClamSMTP in front of the same clamd and sink;
4. smtpgw embedded (one process), then smtpgw over RabbitMQ (receiver, 1/2/4 scanner
   processes, delivery, quarantine: separate processes);
5. memory: 1,000 idle connections and one 20 MiB message against the embedded gateway.

Every phase checks what reached the sink: each clean message arrived with its bytes
intact, no blocked attachment or EICAR arrived (stripped, with a finding header, or
not delivered at all).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import corpus, report
from bench.peers import Proc, Sampler, broker_pids, free_port, loadavg, machine_cpu, need, stop_all, wait_port
from bench.stats import Latency, cpu_delta, per_thousand, rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
_ID = re.compile(rb"^X-Bench-Id: (\S+)\.(\d+)\.(\d+)\r?$", re.MULTILINE)
FINDING = b"X-SMTPGW-Finding:"
# The peers whose CPU a phase's budget shows beside the gateway's (Sampler roles).
PEER_ROLES = ("clamd", "broker", "sink")


@dataclass
class Options:
    pool: int = 1000
    seed: int = 1
    messages: int = 3000  # per phase at concurrency >= 10
    duration: float = 30.0  # per phase, seconds
    concurrency: tuple[int, ...] = (1, 10, 50)
    per_connection: tuple[int, ...] = (1, 20)
    stall_concurrency: int = 200
    systems: tuple[str, ...] = ("loopback", "clamd", "clamsmtp", "embedded", "embedded-split", "rabbitmq", "memory")
    scanners: tuple[int, ...] = (1, 2, 4)
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    real_corpus: str = ""
    out: str = os.path.join(ROOT, "bench", "out")
    work: str = os.path.join(ROOT, "var", "bench")
    clamd_cache: bool = True  # clamd's default; False: DisableCache yes
    profile: str = "embedded"  # "embedded": a py-spy profile of the gateway at the top concurrency ("": none)


@dataclass
class Env:
    options: Options
    samples: list[corpus.Sample]
    pool_file: str
    sink_dir: str
    sink_port: int
    clamd_port: int
    sampler: Sampler
    procs: list[Proc] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    phase: int = 0


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


# ---------------------------------------------------------------- peers


def start_clamd(options: Options, port: int, tmp: str, *, cache: bool, label: str = "clamd") -> Proc:
    """A clamd of our own: the project's config and signatures, its own port and directory;
    `tmp` for its scratch files (a tmpfs, as scripts/clamd.sh chooses: see clamd.conf.in)."""
    var = os.path.join(options.work, label)
    for directory in (tmp, os.path.join(var, "clamd"), os.path.join(var, "clamav")):  # scratch; log and pid; database
        os.makedirs(directory, exist_ok=True)
    for name in os.listdir(os.path.join(ROOT, "etc", "clamav")):
        if not name.endswith(".in") and not name.startswith("README"):
            shutil.copy(os.path.join(ROOT, "etc", "clamav", name), os.path.join(var, "clamav", name))
    with open(os.path.join(ROOT, "etc", "clamav", "clamd.conf.in")) as fh:
        conf = fh.read().replace("@VAR@", var).replace("@TMP@", tmp).replace("@PORT@", str(port))
    conf = re.sub(r"(?m)^Foreground .*$", "Foreground yes", conf)
    conf = re.sub(r"(?m)^LocalSocket .*$", "", conf)
    if not cache:
        # clamd remembers the hashes of clean files (the attachments of a message that repeats);
        # without its cache a repeated message costs what a new one does.
        conf += "\nDisableCache yes\n"
    path = os.path.join(var, "clamd.conf")
    with open(path, "w") as fh:
        fh.write(conf)
    proc = Proc.start(label, [need("clamd"), f"--config-file={path}"], os.path.join(options.out, f"{label}.log"))
    wait_port(port, 120, proc)
    return proc


def start_sink(options: Options, directory: str, port: int) -> Proc:
    os.makedirs(directory, exist_ok=True)
    shutil.chown(directory, "nobody")
    argv = [need("smtp-sink"), "-u", "nobody", "-d", os.path.join(directory, "m."), "-m", "2000",
            f"127.0.0.1:{port}", "1024"]  # fmt: skip
    proc = Proc.start("sink", argv, os.path.join(options.out, "sink.log"))
    wait_port(port, 10, proc)
    return proc


def start_clamsmtp(options: Options, port: int, clamd_port: int, sink_port: int) -> Proc:
    tmp = os.path.join(options.work, "clamsmtp")
    os.makedirs(tmp, exist_ok=True)
    conf = os.path.join(options.work, "clamsmtpd.conf")
    with open(conf, "w") as fh:
        fh.write(
            f"OutAddress: 127.0.0.1:{sink_port}\nListen: 127.0.0.1:{port}\nClamAddress: 127.0.0.1:{clamd_port}\n"
            f"TempDirectory: {tmp}\nPidFile: {options.work}/clamsmtpd.pid\nMaxConnections: 512\nAction: drop\n"
            "TimeOut: 180\n"
        )
    proc = Proc.start(
        "clamsmtpd", [need("clamsmtpd"), "-d", "0", "-f", conf], os.path.join(options.out, "clamsmtpd.log")
    )
    wait_port(port, 10, proc)
    return proc


def gateway_config(options: Options, port: int, env: Env, *, broker: str, name: str) -> str:
    spool = os.path.join(options.work, f"spool-{name}")
    quarantine = os.path.join(options.work, f"quarantine-{name}")
    for d in (spool, quarantine):
        shutil.rmtree(d, ignore_errors=True)
    path = os.path.join(options.work, f"smtpgw-{name}.toml")
    with open(path, "w") as fh:
        fh.write(
            f"""# written by bench/run.py
[receiver]
listen = "127.0.0.1:{port}"
hostname = "mx.bench.test"
internal_domains = ["example.test"]
max_connections = 3000
max_connections_per_client = 3000
max_message_size = "25MiB"

[broker]
url = "{broker}"
namespace = "smtpgw-bench-{os.getpid()}-{name}"

[spool]
dir = "{spool}"

[scanner]
clamd = "tcp://127.0.0.1:{env.clamd_port}"

[delivery.routes]
"example.test" = "smtp://127.0.0.1:{env.sink_port}"

[quarantine]
dir = "{quarantine}"

[metrics]
enabled = false
"""
        )
    return path


def start_gateway(env: Env, config: str, roles: Sequence[str], name: str) -> list[Proc]:
    smtpgw = os.path.join(os.path.dirname(PY), "smtpgw")
    procs = []
    for n, role in enumerate(roles):
        log = os.path.join(env.options.out, f"gateway-{name}-{role}-{n}.log")
        proc = Proc.start(role, [smtpgw, "run", role, "-c", config], log)
        procs.append(proc)
        env.sampler.watch(proc.pid, role)
    return procs


def delete_broker_namespace(config: str) -> None:
    from shared.broker import BrokerTransport
    from shared.config import load_config

    cfg = load_config(config)
    transport = BrokerTransport(cfg.broker, retry_interval=cfg.delivery.retry_interval)
    try:
        transport.delete_topology(set())
    finally:
        transport.stop(5)


def rabbitmq_up(url: str) -> bool:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        wait_port(u.port or 5672, 2)
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------- the sink's side


def arrivals(env: Env, tag: str, seen: dict[str, tuple[str, int, int]]) -> int:
    """Look at new sink files; returns how many of `tag` arrived so far."""
    for entry in os.scandir(env.sink_dir):
        if entry.name in seen:
            continue
        with contextlib.suppress(OSError), open(entry.path, "rb") as fh:
            head = fh.read(8192)
            m = _ID.search(head)
            if m:
                seen[entry.name] = (m.group(1).decode(), int(m.group(2)), int(m.group(3)))
    return sum(1 for t, _, _ in seen.values() if t == tag)


def wait_arrivals(env: Env, tag: str, expected: int, *, idle: float = 20.0) -> dict[str, tuple[str, int, int]]:
    """Poll the sink until `expected` messages of `tag` arrived, or none came for `idle` seconds."""
    seen: dict[str, tuple[str, int, int]] = {}
    last_count, last_change = -1, time.monotonic()
    while True:
        count = arrivals(env, tag, seen)
        if count >= expected:
            time.sleep(0.3)  # let the last transactions finish writing
            arrivals(env, tag, seen)
            return seen
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > idle:
            return seen
        time.sleep(0.25)


def check_arrivals(
    env: Env, tag: str, seen: dict[str, tuple[str, int, int]], system: str
) -> tuple[dict[int, float], dict[int, bytes], list[str]]:
    """Arrival time per seq, and the problems: read every file of `tag`, then delete it."""
    times: dict[int, float] = {}
    problems: list[str] = []
    contents: dict[int, bytes] = {}
    for name, (t, seq, index) in seen.items():
        path = os.path.join(env.sink_dir, name)
        if t != tag:
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        try:
            st = os.stat(path)
            with open(path, "rb") as fh:
                data = fh.read()
            os.unlink(path)
        except OSError as exc:
            problems.append(f"unreadable sink file {name}: {exc}")
            continue
        if seq in times:
            problems.append(f"seq {seq} arrived twice")
        times[seq] = st.st_mtime_ns / 1e9
        contents[seq] = data
        sample = env.samples[index]
        # smtp-sink writes its dump with LF line ends.
        if sample.clean or sample.kind == "real":
            if sample.clean and not _intact(sample.data, data):
                problems.append(f"clean message seq {seq} ({sample.kind}/{sample.detail}) arrived changed")
        elif system == "loopback":
            continue
        elif sample.marker in data:
            if not (system == "ClamSMTP" and sample.kind == "blocked"):
                problems.append(f"{sample.kind} seq {seq} ({sample.detail}) arrived with its attachment")
        elif system.startswith("smtpgw") and FINDING not in data:
            problems.append(f"{sample.kind} seq {seq} arrived without a finding header")
    return times, contents, problems


def _intact(sent: bytes, dumped: bytes) -> bool:
    """Did the sink get `sent` unchanged? Headers may have been added (trace, ClamSMTP's
    X-Virus-Scanned after the others); smtp-sink writes LF line ends and a blank line after."""
    head, _, body = sent.replace(b"\r\n", b"\n").partition(b"\n\n")
    return head in dumped and dumped.rstrip(b"\n").endswith(body.rstrip(b"\n"))


# ---------------------------------------------------------------- one phase


def run_load(
    env: Env, port: int, concurrency: int, per_connection: int, total: int, duration: float, tag: str
) -> dict[str, Any]:
    spec_path = os.path.join(env.options.work, f"load-{tag}.json")
    out = os.path.join(env.options.work, f"load-{tag}.out.json")
    spec = {"host": "127.0.0.1", "port": port, "concurrency": concurrency, "per_connection": per_connection,
            "total": total, "duration": duration, "tag": tag, "pool": env.pool_file, "out": out}  # fmt: skip
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    subprocess.run([PY, "-m", "bench.loadgen", spec_path], check=True, cwd=ROOT, timeout=duration + 300)
    with open(out) as fh:
        result: dict[str, Any] = json.load(fh)
    return result


def phase_total(options: Options, concurrency: int) -> tuple[int, float]:
    if concurrency == 1:
        return max(50, options.messages // 10), min(options.duration, 15.0)
    return options.messages, options.duration


def measure(
    env: Env,
    system: str,
    port: int,
    concurrency: int,
    per_connection: int,
    *,
    roles: Sequence[str] = (),
    total: int | None = None,
) -> dict[str, Any]:
    env.phase += 1
    tag = f"p{os.getpid()}x{env.phase}"
    count, duration = phase_total(env.options, concurrency)
    total = total or count
    say(f"{system}: concurrency {concurrency}, {per_connection}/connection, up to {total} messages or {duration:.0f}s")
    env.sampler.reset_peaks()
    cpu_before = env.sampler.cpu(roles)
    peers_before = env.sampler.cpu(PEER_ROLES)
    machine_before = machine_cpu()
    children_before = _children_cpu()
    load = run_load(env, port, concurrency, per_connection, total, duration, tag)
    loadgen_cpu = _children_cpu() - children_before
    accepted = [s for s in load["sent"] if s[4] == 250]
    expected = len(accepted)
    if system == "ClamSMTP":  # it drops infected mail (Action: drop) and says 250
        expected -= sum(1 for s in accepted if env.samples[s[1]].kind == "eicar")
    seen = wait_arrivals(env, tag, expected)
    cpu_after = env.sampler.cpu(roles)
    peers_after = env.sampler.cpu(PEER_ROLES)
    machine_after = machine_cpu()
    busy, steal, elapsed = (after - before for after, before in zip(machine_after, machine_before, strict=True))
    peaks = {k: v for k, v in env.sampler.peaks().items() if k.split("#")[0] in roles}
    times, _, problems = check_arrivals(env, tag, seen, system)
    ends = {s[0]: s[2] for s in load["sent"]}
    accept_lat = [s[3] - s[2] for s in accepted]
    e2e_lat = [times[seq] - ends[seq] for seq in times if seq in ends]
    missing = [s for s in accepted if s[0] not in times]
    if system == "ClamSMTP":
        missing = [s for s in missing if env.samples[s[1]].kind != "eicar"]
    if missing:
        kinds = sorted({env.samples[s[1]].kind for s in missing})
        problems.insert(0, f"{len(missing)} accepted messages never arrived ({', '.join(kinds)})")
    if load["refused"]:
        problems.append(f"{load['refused']} refused")
    if load["error_count"]:
        problems.append(f"{load['error_count']} session errors (first: {load['errors'][0]})")
    last = max(times.values()) if times else load["finished"]
    gateway_cpu = cpu_delta(cpu_before, cpu_after)
    by_role = env.sampler.by_role(cpu_before, cpu_after)
    peers = env.sampler.by_role(peers_before, peers_after)
    row: dict[str, Any] = {
        "system": system,
        "concurrency": concurrency,
        "per_connection": per_connection,
        "sent": len(load["sent"]),
        "accepted": len(accepted),
        "arrived": len(times),
        "rate": rate(len(times), last - load["started"]),
        "accept_rate": rate(len(accepted), (max((s[3] for s in accepted), default=0) - load["started"])),
        "accept_p50": Latency.of(accept_lat).p50,
        "accept_p99": Latency.of(accept_lat).p99,
        "e2e_p50": Latency.of(e2e_lat).p50,
        "e2e_p99": Latency.of(e2e_lat).p99,
        "stalls": load["stalls"],
        "max_wait": load["max_wait"],
        "cpu_gateway": gateway_cpu,
        "cpu_per_1000": per_thousand(gateway_cpu, len(times)) if roles else math.nan,
        "cpu_per_1000_by_role": {r: per_thousand(c, len(times)) for r, c in sorted(by_role.items())},
        "cpu_budget": {
            "gateway": per_thousand(gateway_cpu, len(times)) if roles else math.nan,
            **{r: per_thousand(c, len(times)) for r, c in peers.items()},
            "load generator": per_thousand(loadgen_cpu, len(times)),
            "machine": per_thousand(busy, len(times)),
            "steal": per_thousand(steal, len(times)),
        },
        "machine_busy": busy / max(1e-9, elapsed),
        "machine_steal": steal / max(1e-9, elapsed),
        "peak_rss": peaks,
        "checks": "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""),
        "problems": len(problems),
    }
    say(
        f"  {row['rate']:.0f} msg/s end to end ({row['accept_rate']:.0f}/s accepted), "
        f"250 p50/p99 {row['accept_p50'] * 1000:.0f}/{row['accept_p99'] * 1000:.0f} ms, "
        f"machine {row['machine_busy'] * 100:.0f}% busy ({row['machine_steal'] * 100:.0f}% stolen), "
        f"{row['checks'] or 'checks ok'}"
    )
    env.rows.append(row)
    return row


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the load generator runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def clamd_load(env: Env, concurrency: int, count: int, duration: float, tag: str, port: int = 0) -> dict[str, Any]:
    spec_path = os.path.join(env.options.work, f"{tag}.json")
    out = os.path.join(env.options.work, f"{tag}.out.json")
    with open(spec_path, "w") as fh:
        json.dump({"host": "127.0.0.1", "port": port or env.clamd_port, "concurrency": concurrency, "total": count,
                   "duration": duration, "pool": env.pool_file, "out": out, "tag": tag}, fh)  # fmt: skip
    subprocess.run([PY, "-m", "bench.clamdload", spec_path], check=True, cwd=ROOT, timeout=duration + 300)
    with open(out) as fh:
        result: dict[str, Any] = json.load(fh)
    return result


def measure_clamd(env: Env, concurrency: int, system: str = "clamd", port: int = 0) -> dict[str, Any]:
    count, duration = phase_total(env.options, concurrency)
    say(f"{system}: INSTREAM, {concurrency} clients, up to {count} messages or {duration:.0f}s")
    role, tag = ("clamd", f"clamd{concurrency}") if not port else (system, f"clamd-nocache{concurrency}")
    clamd_before = env.sampler.cpu([role])
    result = clamd_load(env, concurrency, count, duration, tag, port)
    clamd_after = env.sampler.cpu([role])
    n = len(result["latencies"])
    expected_found = sum(1 for i in range(n) if env.samples[i % len(env.samples)].kind == "eicar")
    problems = []
    if result["error_count"]:
        problems.append(f"{result['error_count']} errors (first: {result['errors'][0]})")
    if result["found"] != expected_found:
        problems.append(f"{result['found']} found, {expected_found} EICAR expected")
    lat = Latency.of(result["latencies"])
    row = {
        "system": system,
        "concurrency": concurrency,
        "per_connection": 1,
        "sent": n,
        "rate": rate(n, result["finished"] - result["started"]),
        "accept_p50": lat.p50,
        "accept_p99": lat.p99,
        "cpu_per_1000": math.nan,
        "cpu_clamd_per_1000": per_thousand(cpu_delta(clamd_before, clamd_after), n),
        "checks": "; ".join(problems),
        "problems": len(problems),
    }
    say(f"  {row['rate']:.0f} scans/s, p50/p99 {lat.p50 * 1000:.0f}/{lat.p99 * 1000:.0f} ms")
    env.rows.append(row)
    return row


def measure_clamd_without_cache(env: Env, tmp: str) -> None:
    """The clamd ceiling for mail that never repeats: a second clamd with DisableCache yes.
    The phases above re-scan the same corpus, whose attachments clamd's cache of clean files
    then skips; real mail rarely repeats, so this is the ceiling a gateway meets in service."""
    port = free_port()
    try:
        proc = start_clamd(env.options, port, tmp, cache=False, label="clamd-nocache")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.sampler.watch(proc.pid, "clamd, no cache")
    try:
        for c in env.options.concurrency:
            measure_clamd(env, c, "clamd, no cache", port)
    finally:
        stop_all([proc])
        env.sampler.forget(proc.pid)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- systems


def matrix(options: Options) -> list[tuple[int, int]]:
    return [(c, k) for c in options.concurrency for k in options.per_connection]


def run_loopback(env: Env) -> None:
    for c, k in matrix(env.options):
        measure(env, "loopback", env.sink_port, c, k)


def run_clamsmtp(env: Env) -> None:
    port = free_port()
    proc = start_clamsmtp(env.options, port, env.clamd_port, env.sink_port)
    env.sampler.watch(proc.pid, "clamsmtpd")
    try:
        for c, k in matrix(env.options):
            measure(env, "ClamSMTP", port, c, k, roles=["clamsmtpd"])
    finally:
        proc.stop()
        env.sampler.forget(proc.pid)


def _warm(env: Env, port: int, roles: Sequence[str]) -> None:
    """A short unmeasured run: imports, pools and caches warm before the first phase."""
    tag = f"w{os.getpid()}x{env.phase}"
    load = run_load(env, port, 10, 5, 100, 20, tag)
    accepted = sum(1 for s in load["sent"] if s[4] == 250)
    seen = wait_arrivals(env, tag, accepted, idle=10)
    check_arrivals(env, tag, seen, "warm-up")


def run_embedded(env: Env) -> None:
    port = free_port()
    config = gateway_config(env.options, port, env, broker="embedded", name="embedded")
    procs = start_gateway(env, config, ["all"], "embedded")
    try:
        wait_port(port, 30, procs[0])
        _warm(env, port, ["all"])
        for c, k in matrix(env.options):
            if env.options.profile == "embedded" and c == max(env.options.concurrency) and k == 1:
                profile(env, procs[0], port, c, k)
            measure(env, "smtpgw embedded", port, c, k, roles=["all"])
        if env.options.stall_concurrency:
            measure(env, "smtpgw embedded", port, env.options.stall_concurrency, 1, roles=["all"])
        if "memory" in env.options.systems:
            memory(env, procs[0], port)
    finally:
        for proc in procs:
            proc.stop()
            env.sampler.forget(proc.pid)


def run_embedded_split(env: Env) -> None:
    """The embedded spool with each service in a process of its own (`smtpgw run receiver` etc.
    on one spool directory): no broker, and every core at work."""
    port = free_port()
    config = gateway_config(env.options, port, env, broker="embedded", name="embedded-split")
    roles = ["receiver", "scanner", "delivery", "quarantine"]
    procs = start_gateway(env, config, roles, "embedded-split")
    try:
        wait_port(port, 30, procs[0])
        _warm(env, port, roles)
        for c, k in [(c, k) for c, k in matrix(env.options) if c > 1]:
            measure(env, "smtpgw embedded, 4 processes", port, c, k, roles=roles)
    finally:
        for proc in procs:
            proc.stop()
            env.sampler.forget(proc.pid)


def run_rabbitmq(env: Env) -> None:
    if not rabbitmq_up(env.options.rabbitmq_url):
        env.notes.append("RabbitMQ mode not measured: no broker answers at " + env.options.rabbitmq_url)
        say(env.notes[-1])
        return
    broker = broker_pids()  # its CPU belongs in each phase's budget: it runs on the same cores
    for pid in broker:
        env.sampler.watch(pid, "broker")
    try:
        for scanners in env.options.scanners:
            _run_rabbitmq(env, scanners)
    finally:
        for pid in broker:
            env.sampler.forget(pid)


def _run_rabbitmq(env: Env, scanners: int) -> None:
    """One RabbitMQ-mode gateway (receiver, `scanners` scanner processes, delivery, quarantine)."""
    port = free_port()
    name = f"rabbitmq-{scanners}"
    config = gateway_config(env.options, port, env, broker=env.options.rabbitmq_url, name=name)
    roles = ["receiver", *["scanner"] * scanners, "delivery", "quarantine"]
    procs = start_gateway(env, config, roles, name)
    try:
        wait_port(port, 30, procs[0])
        _warm(env, port, roles)
        for c, k in [(c, k) for c, k in matrix(env.options) if c > 1]:
            measure(env, f"smtpgw RabbitMQ, {scanners} scanner{'s' if scanners > 1 else ''}", port, c, k,
                    roles=sorted(set(roles)))  # fmt: skip
    finally:
        for proc in procs:
            proc.stop()
            env.sampler.forget(proc.pid)
        try:
            delete_broker_namespace(config)
        except Exception as exc:  # the broker's leftovers are not worth failing the run for
            say(f"could not delete the bench's RabbitMQ queues: {exc}")


def profile(env: Env, proc: Proc, port: int, concurrency: int, per_connection: int) -> None:
    """A py-spy flame graph of the gateway under load (an extra, unmeasured run)."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(PY), "py-spy")
    if not os.path.exists(py_spy):
        env.notes.append("no profile: py-spy is not installed (pip install '.[bench]')")
        return
    count, duration = phase_total(env.options, concurrency)
    raw = os.path.join(env.options.out, "profile-embedded.txt")
    say(f"profiling the embedded gateway at concurrency {concurrency} -> {raw}")
    spy = subprocess.Popen([py_spy, "record", "--pid", str(proc.pid), "--threads", "--gil", "--rate", "250",
                            "--format", "raw", "-o", raw, "--duration", str(int(duration) + 30)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        tag = f"prof{os.getpid()}"
        load = run_load(env, port, concurrency, per_connection, count, duration, tag)
        seen = wait_arrivals(env, tag, sum(1 for s in load["sent"] if s[4] == 250))
        check_arrivals(env, tag, seen, "profile")
    finally:
        spy.send_signal(2)
        spy.wait(60)
    from bench.profile import summarise, table, top_functions

    with open(raw) as fh:
        lines = fh.readlines()
    total = max(1, sum(summarise(lines).values()))
    top = ", ".join(f"{f.split(' (')[0]} {100 * n / total:.0f}%" for f, n in top_functions(lines, 5))
    env.notes.append(
        f"Profile of the embedded gateway at concurrency {concurrency} (py-spy, samples holding the GIL; raw "
        f"stacks in {raw}, which flamegraph.pl and speedscope read). Busiest functions: {top}.\n\n"
        + table(summarise(lines))
    )


# ---------------------------------------------------------------- memory


def memory(env: Env, proc: Proc, port: int) -> None:
    """RSS of the embedded gateway with 1,000 idle connections, and with one 20 MiB message."""
    import socket

    from bench.peers import rss_bytes

    before = rss_bytes(proc.pid) or 0
    socks = []
    try:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
        for s in socks:
            s.recv(512)  # the greeting
            s.sendall(b"EHLO idle.sender.test\r\n")
        for s in socks:
            s.recv(4096)
        time.sleep(1.0)
        idle = rss_bytes(proc.pid) or 0
        refused = 0
    except OSError as exc:
        idle, refused = rss_bytes(proc.pid) or 0, 1
        env.notes.append(f"idle connections: {exc}")
    finally:
        for s in socks:
            s.close()
    env.notes.append(
        f"memory: embedded gateway RSS {before / 2**20:.0f} MiB before, {idle / 2**20:.0f} MiB with "
        f"{len(socks)} idle connections (EHLO done){' (some failed)' if refused else ''}"
    )
    # One 20 MiB message (a 15 MiB attachment, base64).
    import base64

    blob = os.urandom(15 * 2**20)
    message = (
        b"From: big@sender.test\r\nTo: user1@example.test\r\nSubject: 20 MiB\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nbig one\r\n'
        b'--b\r\nContent-Type: application/octet-stream; name="big.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + base64.encodebytes(blob).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )
    big = corpus.Sample(len(env.samples), "text", message, detail="20MiB")
    env.samples.append(big)
    pool_file = env.pool_file
    env.pool_file = os.path.join(env.options.work, "pool-big.pickle")
    with open(env.pool_file, "wb") as fh:
        pickle.dump([(big.index, corpus.wire(message), "user1@example.test")], fh)
    try:
        env.sampler.reset_peaks()
        env.sampler.interval = 0.05
        row = measure(env, "smtpgw embedded, one 20 MiB message", port, 1, 1, roles=["all"], total=1)
        env.rows.remove(row)
        peak = sum(row["peak_rss"].values())
        env.notes.append(
            f"memory: one {len(message) / 2**20:.1f} MiB message: peak RSS {peak / 2**20:.0f} MiB, "
            f"accepted in {row['accept_p50'] * 1000:.0f} ms, at the sink after {row['e2e_p50'] * 1000:.0f} ms "
            f"({row['checks'] or 'arrived intact'})"
        )
        after = rss_bytes(proc.pid) or 0
        env.notes.append(f"memory: RSS {after / 2**20:.0f} MiB after the 20 MiB message was delivered")
    finally:
        env.pool_file = pool_file
        env.sampler.interval = 0.2
        env.samples.pop()


# ---------------------------------------------------------------- main


def write_pool(samples: Sequence[corpus.Sample], path: str) -> str:
    """The load generator's pool: each sample in its DATA form, with a recipient; returns `path`."""
    with open(path, "wb") as fh:
        pickle.dump([(s.index, corpus.wire(s.data), f"user{1 + s.index % 50}@example.test") for s in samples], fh)
    return path


def run(options: Options) -> int:
    os.makedirs(options.out, exist_ok=True)
    os.makedirs(options.work, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    say(f"load average before: {loadavg()}; corpus of {options.pool} (seed {options.seed})")
    samples = corpus.build(options.pool, options.seed)
    if options.real_corpus:
        real = corpus.load_directory(options.real_corpus)
        samples += [corpus.Sample(len(samples) + s.index, s.kind, s.data, detail=s.detail) for s in real]
        say(f"added {len(real)} messages from {options.real_corpus}")
    pool_file = write_pool(samples, os.path.join(options.work, "pool.pickle"))
    sink_dir = f"/dev/shm/smtpgw-bench-{os.getpid()}"
    sampler = Sampler()
    env = Env(options, samples, pool_file, sink_dir, free_port(), free_port(), sampler)
    sampler.start()
    procs: list[Proc] = []
    load_start = loadavg()
    started = time.time()
    try:
        clamd = start_clamd(options, env.clamd_port, f"{sink_dir}-clamd", cache=options.clamd_cache)
        procs.append(clamd)
        sampler.watch(clamd.pid, "clamd")
        if options.clamd_cache:
            # clamd caches the hashes of clean files: let every phase find the same warm cache,
            # whatever ran before it (each message still differs as a whole: its headers).
            say("warming clamd's cache with the corpus (unmeasured)")
            clamd_load(env, 10, len(samples), 300.0, "clamd-warm")
        procs.append(start_sink(options, sink_dir, env.sink_port))
        sampler.watch(procs[-1].pid, "sink")
        systems = options.systems
        if "loopback" in systems:
            run_loopback(env)
        if "clamd" in systems:
            for c in options.concurrency:
                measure_clamd(env, c)
            if options.clamd_cache:
                measure_clamd_without_cache(env, f"{sink_dir}-clamd-nocache")
        if "clamsmtp" in systems:
            run_clamsmtp(env)
        if "embedded" in systems:
            run_embedded(env)
        if "embedded-split" in systems:
            run_embedded_split(env)
        if "rabbitmq" in systems:
            run_rabbitmq(env)
    finally:
        stop_all(reversed(procs))
        sampler.stop()
        shutil.rmtree(sink_dir, ignore_errors=True)
        shutil.rmtree(f"{sink_dir}-clamd", ignore_errors=True)
    kinds = corpus.kind_counts(options.pool)
    context = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} cores, {os.uname().release}, Python {sys.version.split()[0]}",
        "load average": f"{load_start} at the start, {loadavg()} at the end ({time.time() - started:.0f} s run)",
        "corpus": f"{len(samples)} messages, seed {options.seed}, mean {corpus.mean_size(samples) / 1024:.1f} KiB, "
        + ", ".join(f"{k} {v}" for k, v in kinds.items())
        + (f", plus real mail from {options.real_corpus}" if options.real_corpus else ""),
        "phases": f"up to {options.messages} messages or {options.duration:.0f} s each (concurrency 1: a tenth, 15 s)",
        "clamd": "one clamd (project config and signatures, scratch files in /dev/shm, "
        + ("clamd's default cache of clean files" if options.clamd_cache else "DisableCache yes")
        + ") for the clamd ceiling, ClamSMTP and smtpgw"
        + ("; a second one with DisableCache yes for the rows 'clamd, no cache'" if options.clamd_cache else ""),
        "sink": "Postfix smtp-sink, each message dumped to a file in /dev/shm and checked afterwards",
    }
    text = report.document(env.rows, context, env.notes, cores=os.cpu_count() or 1)
    path = os.path.join(options.out, f"report-{stamp}.md")
    with open(path, "w") as fh:
        fh.write(text)
    with open(os.path.join(options.out, f"results-{stamp}.json"), "w") as fh:
        json.dump({"options": asdict(options), "rows": env.rows, "notes": env.notes, "context": context}, fh,
                  indent=1, default=str)  # fmt: skip
    shutil.copy(path, os.path.join(options.out, "report.md"))
    print(text)
    say(f"report: {path}")
    # A baseline's troubles (ClamSMTP stalling) are findings; smtpgw's mean the run failed.
    return 1 if any(row.get("problems") for row in env.rows if row["system"].startswith("smtpgw")) else 0

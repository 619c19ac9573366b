"""Instructions a message costs the embedded gateway: a measure the host's noise cannot move.

`python -m bench.instructions [--messages N] [--concurrency C]`

The machine is shared: the same code ran at 172 and at 108 msg/s on two runs of
`make bench` hours apart (docs/benchmark.md, issue notes), so an A/B of a small
change by rate or CPU seconds needs many alternating rounds. This runs the
one-process gateway (`smtpgw run all`) under valgrind's callgrind, which counts
the instructions the process executes, whatever else the machine does, and
reports instructions per message:

- clamd and Postfix's smtp-sink are started as in `python -m bench` (outside
  valgrind: only the gateway is counted), and the seeded corpus is the same;
- after a warm-up, the counters are zeroed, the gateway sits idle for a while
  (its timers and polls: subtracted below), then zeroed again and N messages
  are sent by the load generator at concurrency C and checked at the sink as
  `python -m bench` checks them;
- per message = (instructions of the loaded window - the idle rate x its
  length) / N.

valgrind runs the gateway some 50 times slower and one thread at a time, so
this says nothing about rate or latency; it compares the work two versions of
the code do for the same mail, to about a percent.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

from bench import corpus
from bench.peers import Proc, Sampler, free_port, need, stop_all, wait_port
from bench.run import (
    PY,
    Env,
    Options,
    check_arrivals,
    gateway_config,
    run_load,
    say,
    start_clamd,
    start_sink,
    wait_arrivals,
    write_pool,
)

_TOTALS = re.compile(r"^(?:totals|summary):\s*(\d+)", re.MULTILINE)


def counted(pid: int, out: str) -> int:
    """Dump callgrind's counters of `pid` (instructions since the last zeroing) and read them."""
    before = set(os.listdir(out))
    subprocess.run([need("callgrind_control"), "--dump", str(pid)], check=True, capture_output=True, timeout=300)
    for _ in range(600):
        new = sorted(set(os.listdir(out)) - before)
        if new:
            with open(os.path.join(out, new[-1])) as fh:
                m = _TOTALS.search(fh.read())
            if m:
                return int(m.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"callgrind wrote no dump for {pid} in {out}")


def zero(pid: int) -> None:
    subprocess.run([need("callgrind_control"), "--zero", str(pid)], check=True, capture_output=True, timeout=300)


def _send(env: Env, port: int, concurrency: int, count: int, tag: str) -> None:
    """`count` messages through the gateway, every one checked at the sink; raises on a problem."""
    load = run_load(env, port, concurrency, 1, count, 3600.0, tag)
    accepted = sum(1 for s in load["sent"] if s[4] == 250)
    seen = wait_arrivals(env, tag, accepted, idle=120.0)
    times, _, problems = check_arrivals(env, tag, seen, "smtpgw embedded")
    # Every accepted message reaches the sink (infected and blocked parts replaced by a notice).
    if accepted != count or len(times) != accepted or problems:
        raise RuntimeError(f"{tag}: {count} sent, {accepted} accepted, {len(times)} arrived; {problems[:3]}")


def measure(options: Options, messages: int, concurrency: int, idle: float) -> dict[str, float]:
    os.makedirs(options.work, exist_ok=True)
    out = os.path.join(options.work, "callgrind")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    samples = corpus.build(options.pool, options.seed)
    pool_file = write_pool(samples, os.path.join(options.work, "pool-instructions.pickle"))
    sink_dir = f"/dev/shm/smtpgw-instructions-{os.getpid()}"
    env = Env(options, samples, pool_file, sink_dir, free_port(), free_port(), Sampler())
    procs: list[Proc] = []
    try:
        procs.append(start_clamd(options, env.clamd_port, f"{sink_dir}-clamd", cache=True))
        procs.append(start_sink(options, sink_dir, env.sink_port))
        port = free_port()
        config = gateway_config(options, port, env, broker="embedded", name="instructions")
        smtpgw = os.path.join(os.path.dirname(PY), "smtpgw")
        argv = [need("valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.%p",
                "--dump-instr=no", "--compress-strings=no", smtpgw, "run", "all", "-c", config]  # fmt: skip
        say("starting the gateway under callgrind (slow: a minute or two)")
        gateway = Proc.start("gateway", argv, os.path.join(options.out, "gateway-instructions.log"))
        procs.append(gateway)
        wait_port(port, 600, gateway)
        say("warming up (unmeasured)")
        _send(env, port, concurrency, max(20, messages // 5), f"iw{os.getpid()}")
        say(f"idle for {idle:.0f} s")
        zero(gateway.pid)
        started = time.monotonic()
        time.sleep(idle)
        idle_rate = counted(gateway.pid, out) / (time.monotonic() - started)
        say(f"{messages} messages at concurrency {concurrency}")
        zero(gateway.pid)
        started = time.monotonic()
        _send(env, port, concurrency, messages, f"im{os.getpid()}")
        window = time.monotonic() - started
        loaded = counted(gateway.pid, out)
    finally:
        stop_all(reversed(procs))
        shutil.rmtree(sink_dir, ignore_errors=True)
        shutil.rmtree(f"{sink_dir}-clamd", ignore_errors=True)
    per_message = (loaded - idle_rate * window) / messages
    return {"per_message": per_message, "idle_share": idle_rate * window / loaded, "window": window}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200, help="messages in the measured window")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--idle", type=float, default=20.0, help="seconds of idle counting (timers, polls)")
    p.add_argument("--pool", type=int, default=200, help="distinct corpus messages")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind is not installed (scripts/setup.sh installs it: make setup)")
    options = Options(pool=args.pool)
    os.makedirs(options.out, exist_ok=True)
    result = measure(options, args.messages, args.concurrency, args.idle)
    print(
        f"instructions per message: {result['per_message'] / 1e6:.2f} M "
        f"({args.messages} messages, concurrency {args.concurrency}, {result['window']:.0f} s under callgrind; "
        f"idle work subtracted: {100 * result['idle_share']:.1f}% of the window's)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

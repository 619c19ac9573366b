"""`python -m bench`: run the benchmark (see bench/run.py and the README's Benchmark section).

python -m bench                       everything: baselines, embedded, RabbitMQ, memory
python -m bench --quick               a smoke run: fewer messages, shorter phases
python -m bench --systems loopback,embedded --concurrency 50 --per-connection 1
python -m bench --real-corpus DIR     add a real-mail corpus (SpamAssassin layout)
"""

from __future__ import annotations

import argparse
import sys

from bench.run import Options, run


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    defaults = Options()
    p = argparse.ArgumentParser(prog="python -m bench", description="smtpgw benchmark")
    p.add_argument("--quick", action="store_true", help="600 messages or 10 s a phase")
    p.add_argument("--messages", type=int, default=defaults.messages, help="messages per phase (concurrency >= 10)")
    p.add_argument("--duration", type=float, default=defaults.duration, help="seconds per phase at most")
    p.add_argument("--pool", type=int, default=defaults.pool, help="distinct corpus messages")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--concurrency", type=_ints, default=defaults.concurrency)
    p.add_argument("--per-connection", type=_ints, default=defaults.per_connection)
    p.add_argument("--stall-concurrency", type=int, default=defaults.stall_concurrency, help="0: skip")
    p.add_argument("--systems", default=",".join(defaults.systems))
    p.add_argument("--scanners", type=_ints, default=defaults.scanners, help="RabbitMQ mode scanner processes")
    p.add_argument("--rabbitmq-url", default=defaults.rabbitmq_url)
    p.add_argument("--real-corpus", default="", help="directory of real messages, one per file")
    p.add_argument("--no-clamd-cache", action="store_true", help="clamd with DisableCache yes")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of the embedded gateway")
    p.add_argument("--out", default=defaults.out)
    args = p.parse_args(argv)
    options = Options(
        pool=args.pool,
        seed=args.seed,
        messages=600 if args.quick and args.messages == defaults.messages else args.messages,
        duration=10.0 if args.quick and args.duration == defaults.duration else args.duration,
        concurrency=args.concurrency,
        per_connection=args.per_connection,
        stall_concurrency=args.stall_concurrency,
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
        scanners=args.scanners,
        rabbitmq_url=args.rabbitmq_url,
        real_corpus=args.real_corpus,
        clamd_cache=not args.no_clamd_cache,
        profile="" if args.no_profile else "embedded",
        out=args.out,
    )
    return run(options)


if __name__ == "__main__":
    sys.exit(main())

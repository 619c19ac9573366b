"""`smtpgw`: the one command line of the gateway.

    smtpgw run all|receiver|scanner|delivery|quarantine|updater [-c FILE] [--threads N]
    smtpgw check-config -c FILE
    smtpgw quarantine list|show|release|delete|purge [ID] [-c FILE] [--json]
    smtpgw queue [-c FILE] [--json]
    smtpgw update now|status|rollback [-c FILE] [--json] [--component signatures|rules]
    smtpgw sink --listen HOST:PORT --dir DIR
    smtpgw --version

Exit codes: 0 success, 1 failure the message explains, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from services import runner
from shared import __version__
from shared.config import Config, load_config, parse_hostport
from shared.errors import ConfigError, GatewayError
from shared.logging import setup


def _config(path: str | None) -> Config:
    return load_config(path)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args.config)
    print(f"{config.source}: OK")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    config = _config(args.config)
    setup(config.logging.level, config.logging.format, service=args.role)
    if args.split:
        if args.role != "all":
            raise SystemExit("smtpgw run: --split only goes with 'all'")
        from services.supervisor import run_split

        return run_split(config, args.config, list(runner.ROLES), threads=args.threads)
    roles = set(runner.ROLES) if args.role == "all" else {args.role}
    return runner.run(config, roles, threads=args.threads)


def _cmd_quarantine(args: argparse.Namespace) -> int:
    from services.quarantine.app import release
    from services.quarantine.store import QuarantineStore

    config = _config(args.config)
    store = QuarantineStore(config.quarantine.dir)
    if args.action == "list":
        entries = list(store.entries(args.category))
        if args.json:
            rows = [
                {
                    "id": e.queue_id,
                    "category": e.category,
                    "quarantined_at": _iso(e.quarantined_at),
                    "from": e.envelope.mail_from,
                    "to": list(e.envelope.rcpt_to),
                    "size": e.envelope.size,
                    "reason": e.reason,
                }
                for e in entries
            ]
            print(json.dumps(rows, indent=2))
            return 0
        for e in entries:
            rcpts = ", ".join(e.envelope.rcpt_to)
            print(f"{e.queue_id}  {e.category:<11} {_iso(e.quarantined_at)}  <{e.envelope.mail_from}> -> {rcpts}")
            print(f"    {e.reason}")
        print(f"{len(entries)} message(s)")
        return 0
    if args.action == "purge":
        print(f"purged {store.purge(config.quarantine.retention)} message(s)")
        return 0
    if not args.id:
        raise SystemExit(f"smtpgw quarantine {args.action}: a message id is required")
    if args.action == "show":
        entry, body = store.read(args.id)
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(body)
        print(f"id:       {entry.queue_id}\ncategory: {entry.category}\nreason:   {entry.reason}")
        print(f"from:     <{entry.envelope.mail_from}>\nto:       {', '.join(entry.envelope.rcpt_to)}")
        print(f"size:     {entry.envelope.size}\nclient:   {entry.envelope.client.ip} ({entry.envelope.client.helo})")
        for name in ("From", "To", "Subject", "Date", "Message-ID"):
            if headers[name] is not None:
                print(f"{name}: {headers[name]}")
        return 0
    if args.action == "release":
        from shared.transport import open_transport

        transport = open_transport(config)
        try:
            entry = release(store, transport, args.id)
        finally:
            transport.stop(5)
        print(f"released {entry.queue_id} to <{'>, <'.join(entry.envelope.rcpt_to)}>")
        return 0
    entry = store.delete(args.id)
    print(f"deleted {entry.queue_id}")
    return 0


def _cmd_queue(args: argparse.Namespace) -> int:
    from shared.transport import Queue, open_transport

    config = _config(args.config)
    transport = open_transport(config)
    try:
        depths = {q.value: transport.depth(q) for q in Queue}
    finally:
        transport.stop(5)
    if args.json:
        print(json.dumps(depths))
    else:
        for name, depth in depths.items():
            print(f"{name:<18}{depth}")
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    from services.updater.command import update_command

    components = [args.component] if args.component else ["signatures", "rules"]
    return update_command(_config(args.config), args.action, as_json=args.json, components=components)


def _cmd_health(args: argparse.Namespace) -> int:
    """Ask this host's service for /healthz or /readyz on its metrics port: the image's
    HEALTHCHECK. Exit 0 when it answers 200, 1 otherwise, with what it said."""
    import urllib.error
    import urllib.request

    listen = _config(args.config).metrics.listen
    host = listen.host if listen.host not in ("0.0.0.0", "::") else "127.0.0.1"  # ":port" parses as 0.0.0.0
    url = f"http://{f'[{host}]' if ':' in host else host}:{listen.port}/{'readyz' if args.ready else 'healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as reply:
            print(reply.read().decode("utf-8", "replace").strip())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace").strip(), file=sys.stderr)
    except OSError as exc:
        print(f"smtpgw: no answer from {url}: {exc}", file=sys.stderr)
    return 1


def _cmd_sink(args: argparse.Namespace) -> int:
    from services.sink import run_sink

    return run_sink(parse_hostport(args.listen), args.dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgw", description="SMTP security gateway")
    parser.add_argument("--version", action="version", version=f"smtpgw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("-c", "--config", help="TOML configuration file (default: built-in defaults)")
        return p

    p = with_config(sub.add_parser("run", help="run one service, or all of them in one process"))
    p.add_argument("role", choices=["all", *runner.ROLES])
    p.add_argument("--threads", type=int, help="scanner worker threads (overrides [scanner].threads)")
    p.add_argument("--split", action="store_true", help="with 'all': each service in its own process (all cores)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_cmd_check_config)

    p = with_config(sub.add_parser("quarantine", help="list, show, release, delete or purge quarantined mail"))
    p.add_argument("action", choices=["list", "show", "release", "delete", "purge"])
    p.add_argument("id", nargs="?")
    p.add_argument("--category", help="only this category (list)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_quarantine)

    p = with_config(sub.add_parser("queue", help="show how many messages wait on each queue"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_queue)

    p = with_config(sub.add_parser("update", help="update signatures and rules now, show their status, roll back"))
    p.add_argument("action", choices=["now", "status", "rollback"])
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.add_argument("--component", choices=["signatures", "rules"], help="roll back only this one")
    p.set_defaults(func=_cmd_update)

    p = with_config(sub.add_parser("health", help="ask the service on this host whether it is live (or ready)"))
    p.add_argument("--ready", action="store_true", help="readiness (/readyz) instead of liveness (/healthz)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=_cmd_health)

    p = sub.add_parser("sink", help="a local capture MTA that writes each message it receives to a file")
    p.add_argument("--listen", default="127.0.0.1:2526")
    p.add_argument("--dir", default="var/mail")
    p.set_defaults(func=_cmd_sink)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"smtpgw: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

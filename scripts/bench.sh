#!/usr/bin/env bash
# The benchmark in one command (`make bench`), as root on Debian 12:
#
#   scripts/bench.sh [python -m bench options]     e.g. --quick, --systems loopback,embedded
#
# Idempotent like scripts/setup.sh, which it runs first (ClamAV, RabbitMQ, the venv). Then:
#   1. Debian packages the benchmark's peers come from: postfix (smtp-sink, the sink every
#      system delivers to) and clamsmtp (ClamSMTP, the peer smtpgw is compared with).
#      Installing them must not leave a Postfix master or a clamsmtpd running (they would
#      hold port 25 / 10025): policy-rc.d forbids starting services during the install, and
#      Postfix is preseeded to "No configuration".
#   2. The venv's [bench] extra (py-spy: the report profiles the embedded gateway).
#   3. `python -m bench "$@"`: it starts its own clamd (own port, project signatures), sink
#      and ClamSMTP, runs every phase, stops what it started, and writes
#      bench/out/report.md (plus the JSON results and the processes' logs in bench/out/).
set -euo pipefail
cd "$(dirname "$0")/.."

SCRIPT_NAME=bench
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

[ "$(id -u)" = 0 ] || die "run me as root (I install Debian packages and start clamd)"

scripts/setup.sh

missing=()
for pkg in postfix clamsmtp; do
    installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    install_packages "${missing[@]}"
fi
# Should a package's own daemon run anyway (a machine whose init starts it), stop it: the
# benchmark starts its own sink and ClamSMTP on free ports and needs nothing listening on 25.
for pidfile in /var/spool/postfix/pid/master.pid /run/clamsmtp/clamsmtpd.pid /var/run/clamsmtp/clamsmtpd.pid; do
    if [ -s "$pidfile" ]; then
        pid="$(tr -dc '0-9' <"$pidfile")"
        if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ]; then
            say "stopping $(cat "/proc/$pid/comm") (pid $pid) that the package started"
            kill "$pid" || true
        fi
    fi
done

if ! .venv/bin/python -c 'import shutil, sys; sys.exit(shutil.which("py-spy", path=".venv/bin") is None)'; then
    say "installing the [bench] extra into .venv (py-spy)"
    .venv/bin/python -m pip install --disable-pip-version-check --quiet --editable '.[test,bench]'
fi

exec .venv/bin/python -m bench "$@"

#!/usr/bin/env bash
# Install and start what smtpgw needs on a Debian 12 machine, as root; used by
# `make run`, `make test` and (through `make test`) .ci/run.
#
#   scripts/setup.sh                      everything the test suite needs
#   scripts/setup.sh --without-rabbitmq --without-redis
#                                         what `make run` needs (embedded spool, file ledger)
#
# Idempotent and cheap the second time: it installs only what is missing and
# starts only what is not running, so a second run does no network work.
#   1. Debian packages: ClamAV (clamd, the clamav-testfiles corpus the scanner
#      tests use), swaks (the README's test client), dnsmasq-base (a real DNS
#      server for the delivery tests' MX lookups), prometheus (promtool checks
#      and unit-tests the alert rules), valgrind (bench.instructions counts
#      with callgrind; a test checks it), docker-compose (its `config` checks
#      docker-compose.yml without a Docker engine), Python's venv module when
#      missing, rabbitmq-server when no broker answers on 127.0.0.1:5672, and
#      redis-server (the delivery ledger's shared store) when no Redis answers
#      on 127.0.0.1:6379. `apt-get update` runs only when something must be
#      installed.
#   2. The virtualenv .venv with the project installed editable with its
#      [test] extra; pip runs again only when pyproject.toml changed (the
#      stamp file .venv/.smtpgw-pyproject holds the hash it was installed from).
#   3. RabbitMQ (`rabbitmq-server -detached`) and Redis (state under var/redis)
#      when they do not answer, then clamd with the bundled signatures
#      (scripts/clamd.sh).
# It never stops or restarts anything that runs, and needs no systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_RABBITMQ=1
WITH_REDIS=1
for arg in "$@"; do
    case "$arg" in
        --without-rabbitmq) WITH_RABBITMQ=0 ;;
        --without-redis) WITH_REDIS=0 ;;
        -h | --help)
            sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "usage: $0 [--without-rabbitmq] [--without-redis]" >&2
            exit 2
            ;;
    esac
done

VENV=.venv
STAMP="$VENV/.smtpgw-pyproject"
RABBITMQ_PORT=5672
REDIS_PORT=6379
PACKAGES=(clamav-daemon clamav clamav-testfiles clamdscan swaks dnsmasq-base prometheus valgrind docker-compose)

SCRIPT_NAME=setup
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# The Python the venv is made from: 3.11 or newer with the venv module and pip
# (Debian ships ensurepip separately, in python3-venv).
python_ok() {
    command -v python3 >/dev/null &&
        python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# ---------------------------------------------------------------- 1. packages

[ "$(id -u)" = 0 ] || die "run me as root (I install Debian packages and start clamd)"

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if ! python_ok; then
    # A python3 that is not Debian's (pyenv, /usr/local) is the admin's business:
    # installing python3-venv would not give it a venv module.
    if command -v python3 >/dev/null && [ "$(command -v python3)" != /usr/bin/python3 ]; then
        die "$(command -v python3) is not Python >= 3.11 with the venv module; fix it or put Debian's python3 first in PATH"
    fi
    missing+=(python3 python3-venv)
fi
if [ "$WITH_RABBITMQ" = 1 ] && ! port_open 127.0.0.1 "$RABBITMQ_PORT" && ! installed rabbitmq-server; then
    missing+=(rabbitmq-server)
fi
if [ "$WITH_REDIS" = 1 ] && ! port_open 127.0.0.1 "$REDIS_PORT" && ! installed redis-server; then
    missing+=(redis-server)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    install_packages "${missing[@]}"
else
    say "Debian packages: all present"
fi
python_ok || die "python3 still lacks Python >= 3.11 with the venv module"

# ---------------------------------------------------------------- 2. virtualenv

if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    [ -e "$VENV" ] && say "$VENV is broken or too old; making it anew"
    rm -rf "$VENV"
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    say "installing the project into $VENV (pip install -e '.[test]')"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --editable '.[test]'
    echo "$want" >"$STAMP"
else
    say "$VENV: up to date with pyproject.toml"
fi

# ---------------------------------------------------------------- 3. services

if [ "$WITH_RABBITMQ" = 1 ]; then
    if port_open 127.0.0.1 "$RABBITMQ_PORT"; then
        say "RabbitMQ: already answering on 127.0.0.1:$RABBITMQ_PORT"
    else
        say "RabbitMQ: starting (rabbitmq-server -detached)"
        # As root, Debian's wrapper runs the broker as the rabbitmq user. If a
        # node is already booting, this start fails and we just wait for it.
        rabbitmq-server -detached || say "RabbitMQ: a node seems to be starting already; waiting for it"
        for _ in $(seq 1 180); do
            port_open 127.0.0.1 "$RABBITMQ_PORT" && break
            sleep 1
        done
        if ! port_open 127.0.0.1 "$RABBITMQ_PORT"; then
            tail -n 30 /var/log/rabbitmq/*.log >&2 2>/dev/null || true
            die "RabbitMQ did not answer on 127.0.0.1:$RABBITMQ_PORT within 180s (logs: /var/log/rabbitmq/)"
        fi
        say "RabbitMQ: answering on 127.0.0.1:$RABBITMQ_PORT"
    fi
fi

if [ "$WITH_REDIS" = 1 ]; then
    if port_open 127.0.0.1 "$REDIS_PORT"; then
        say "Redis: already answering on 127.0.0.1:$REDIS_PORT"
    else
        # The project's own Redis, its files under var/redis/ like clamd's under
        # var/clamd/. appendonly: the delivery ledger must survive a restart.
        redis_dir="$(pwd)/var/redis"
        mkdir -p "$redis_dir"
        say "Redis: starting (state and log in var/redis/)"
        redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$redis_dir" \
            --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log" --appendonly yes --save ""
        for _ in $(seq 1 60); do
            port_open 127.0.0.1 "$REDIS_PORT" && break
            sleep 0.5
        done
        if ! port_open 127.0.0.1 "$REDIS_PORT"; then
            tail -n 20 "$redis_dir/redis.log" >&2 || true
            die "Redis did not answer on 127.0.0.1:$REDIS_PORT within 30s (log: var/redis/redis.log)"
        fi
        say "Redis: answering on 127.0.0.1:$REDIS_PORT (pid $(cat "$redis_dir/redis.pid"))"
    fi
fi

scripts/clamd.sh

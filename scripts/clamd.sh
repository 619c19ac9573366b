#!/usr/bin/env bash
# Start the project's clamd (bundled config and test signatures) unless one
# already answers PING on 127.0.0.1:$CLAMD_PORT. Idempotent: never stops or
# restarts a clamd that runs. Used by scripts/setup.sh (so by `make run`,
# `make test` and .ci/run) and by the tests' `clamd_address` fixture.
#
# Everything clamd writes stays under var/: config, pid file, log, socket,
# temporary files, and the signature directory var/clamav/.
#
# The signature files in etc/clamav/ (smtpgw.hsb, smtpgw.ndb, ...) are the
# project's: each is copied to var/clamav/ when it is missing there or differs,
# and a running clamd is told to RELOAD, so a signature added to the project
# is active after the next `make test` without restarting anything. Other
# files in var/clamav/ (the updater's) are never touched.
#
# Stop it with: kill "$(cat var/clamd/clamd.pid)"
set -euo pipefail
cd "$(dirname "$0")/.."
VAR="$(pwd)/var"
PORT="${CLAMD_PORT:-3310}"
PID_FILE="$VAR/clamd/clamd.pid"

# Plain bash (/dev/tcp), so this works before Python is installed. clamd's
# z-prefixed commands end with NUL, and so do its replies.
clamd_says() {
    # shellcheck disable=SC2016 # the inner bash expands $1..$3, not this one
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "z%s\0" "$2" >&3
        IFS= read -r -d "" -t 2 reply <&3 || true
        [ "$reply" = "$3" ]
    ' _ "$PORT" "$1" "$2" 2>/dev/null
}
ping_clamd() { clamd_says PING PONG; }

mkdir -p "$VAR/clamd/tmp" "$VAR/clamav"
changed=()
for sig in etc/clamav/*; do
    case "$sig" in *.in | */README*) continue ;; esac
    dest="$VAR/clamav/$(basename "$sig")"
    if ! cmp -s "$sig" "$dest"; then
        # Copy, then rename: clamd never reads a half-written database.
        cp "$sig" "$dest.tmp"
        mv "$dest.tmp" "$dest"
        changed+=("$(basename "$sig")")
    fi
done

# The clamd this checkout started, if it still runs (its pid file names a live clamd).
our_pid=""
if [ -s "$PID_FILE" ]; then
    pid="$(cat "$PID_FILE")"
    if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = clamd ]; then
        our_pid="$pid"
    fi
fi

if ping_clamd; then
    if [ "${#changed[@]}" -gt 0 ] && [ -z "$our_pid" ]; then
        # Another checkout's clamd (or the system's): its databases are not ours to reload.
        echo "clamd: already answering on 127.0.0.1:$PORT (not started from here: it keeps its own signatures)"
    elif [ "${#changed[@]}" -gt 0 ]; then
        if clamd_says RELOAD RELOADING; then
            echo "clamd: already answering on 127.0.0.1:$PORT; reloading for ${changed[*]}"
        else
            echo "clamd: already answering on 127.0.0.1:$PORT, but refused RELOAD for ${changed[*]}" >&2
            exit 1
        fi
    else
        echo "clamd: already answering on 127.0.0.1:$PORT"
    fi
    exit 0
fi

# A clamd of ours that is alive but not answering yet is still loading its
# signatures: wait for it rather than start a second one that cannot bind.
if [ -n "$our_pid" ]; then
    echo "clamd: pid $our_pid is starting; waiting for it"
else
    command -v clamd >/dev/null || {
        echo "clamd is not installed (scripts/setup.sh installs it: apt-get install clamav-daemon)" >&2
        exit 1
    }
    sed -e "s|@VAR@|$VAR|g" -e "s|@PORT@|$PORT|g" etc/clamav/clamd.conf.in >"$VAR/clamd/clamd.conf"
    clamd --config-file="$VAR/clamd/clamd.conf"
fi

for _ in $(seq 1 120); do
    if ping_clamd; then
        echo "clamd: answering on 127.0.0.1:$PORT (pid $(cat "$PID_FILE" 2>/dev/null || echo '?'), log: $VAR/clamd/clamd.log)"
        exit 0
    fi
    sleep 0.5
done
echo "clamd did not answer within 60s; see $VAR/clamd/clamd.log" >&2
tail -20 "$VAR/clamd/clamd.log" >&2 || true
exit 1

#!/usr/bin/env bash
# Start the project's clamd (bundled config and test signatures) unless one
# already answers PING on 127.0.0.1:$CLAMD_PORT. Idempotent: never stops or
# restarts a clamd that runs. Used by scripts/setup.sh (so by `make run`,
# `make test` and .ci/run) and by the tests' `clamd_address` fixture.
#
# Everything clamd writes stays under var/: config, pid file, log, socket,
# temporary files, and the signature directory var/clamav.
#
# var/clamav is laid out the way smtpgw's updater keeps it
# (services/updater/versions.py): a symlink to one complete version,
# var/clamav -> clamav.versions/<UTC time>-<tag>/, switched by renaming a new
# symlink over it, so clamd never loads a half-written set. A plain directory
# found there (an older checkout) becomes the first version.
#
# The signature files in etc/clamav/ (smtpgw.hsb, smtpgw.ndb, ...) are the
# project's: when one is missing from the active version or differs, a new
# version "<time>-seed" is made of the active one's files (the updater's
# included, its version marker excepted) plus the project's, switched to, and
# a running clamd is told to RELOAD, so a signature added to the project is
# active after the next `make test` without restarting anything.
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

DB="$VAR/clamav"
VERSIONS="$VAR/clamav.versions"

# A version name: the UTC time, never sorting before the newest version there is.
new_version() {
    local name newest when
    name="$(date -u +%Y%m%dT%H%M%SZ)-$1"
    newest="$(find "$VERSIONS" -mindepth 1 -maxdepth 1 -type d -name '[0-9]*T[0-9]*Z-*' -printf '%f\n' | sort | tail -n 1)"
    if [ -n "$newest" ] && [[ ! "$name" > "$newest" ]]; then
        when="$(date -u -d "${newest:0:4}-${newest:4:2}-${newest:6:2} ${newest:9:2}:${newest:11:2}:${newest:13:2} UTC" +%s)"
        name="$(date -u -d "@$((when + 1))" +%Y%m%dT%H%M%SZ)-$1"
    fi
    echo "$name"
}

# Point var/clamav at a version: a new symlink renamed over the old one (atomic).
switch_to() {
    ln -sfn "clamav.versions/$1" "$DB.link-$$"
    mv -T "$DB.link-$$" "$DB"
}

# clamd's scratch files (see TemporaryDirectory in etc/clamav/clamd.conf.in): on the tmpfs
# /dev/shm when it is writable, one directory per checkout; else under var/.
TMP="$VAR/clamd/tmp"
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    TMP="/dev/shm/smtpgw-clamd-$(printf '%s' "$VAR" | sha256sum | cut -c1-12)"
fi
mkdir -p "$VAR/clamd" "$TMP" "$VERSIONS"
chmod 700 "$TMP"
if [ -d "$DB" ] && [ ! -L "$DB" ]; then
    name="$(new_version seed)"
    mv "$DB" "$VERSIONS/$name"
    switch_to "$name"
    echo "clamd: $DB is now a link to the version $name"
elif [ ! -e "$DB" ]; then
    name="$(new_version seed)"
    mkdir "$VERSIONS/.staging-seed-$$"
    for sig in etc/clamav/*; do
        case "$sig" in *.in | */README*) continue ;; esac
        cp "$sig" "$VERSIONS/.staging-seed-$$/"
    done
    mv "$VERSIONS/.staging-seed-$$" "$VERSIONS/$name"
    switch_to "$name"
fi

changed=()
for sig in etc/clamav/*; do
    case "$sig" in *.in | */README*) continue ;; esac
    cmp -s "$sig" "$DB/$(basename "$sig")" || changed+=("$(basename "$sig")")
done
if [ "${#changed[@]}" -gt 0 ]; then
    name="$(new_version seed)"
    staging="$VERSIONS/.staging-seed-$$"
    rm -rf "$staging"
    cp -a "$(readlink -f "$DB")" "$staging"
    rm -f "$staging"/smtpgw-version.*
    for sig in "${changed[@]}"; do cp "etc/clamav/$sig" "$staging/$sig"; done
    mv "$staging" "$VERSIONS/$name"
    switch_to "$name"
fi

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
    sed -e "s|@VAR@|$VAR|g" -e "s|@TMP@|$TMP|g" -e "s|@PORT@|$PORT|g" etc/clamav/clamd.conf.in >"$VAR/clamd/clamd.conf"
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

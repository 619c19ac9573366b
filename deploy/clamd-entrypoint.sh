#!/bin/sh
# clamd in a container of the smtpgw image (docker-compose.yml, k8s/clamd.yaml).
#
# The signature directory lives on a volume the smtpgw updater fills: a symlink to one
# complete version (services/updater/versions.py), which the updater switches atomically
# and then tells clamd to RELOAD. clamd cannot run without signatures, so on a first
# start (an empty volume) it waits until the updater has installed its first set: the
# updater keeps asking a clamd it cannot reach yet to confirm, for [updater]
# reload_timeout. Meanwhile mail waits on the scan queue; it is never scanned with less
# than the real signatures. CLAMD_SEED=yes seeds an empty volume with the signatures in
# the image instead (etc/clamav/: the project's test signatures, which detect the EICAR
# and ClamAV test files and nothing else), for trying the stack out without a network.
#
# clamd's settings are the project's (etc/clamav/clamd.conf.in, also used by
# scripts/clamd.sh), with what differs in a container: TCP on every interface, in the
# foreground, no pid file or local socket, and no LogFile: without one, clamd in the
# foreground logs to standard output (it refuses LogFile /dev/stdout, a symlink).
set -eu

HOME_DIR="${SMTPGW_HOME:-/opt/smtpgw}"
DB="${CLAMD_DATABASE:-/var/lib/smtpgw/shared/clamav}"
PORT="${CLAMD_PORT:-3310}"
ADDR="${CLAMD_ADDR:-0.0.0.0}"
CONF="${CLAMD_CONF:-/tmp/clamd.conf}"
TMP_DIR="${CLAMD_TMP:-/tmp}"

if [ ! -e "$DB" ] && [ "${CLAMD_SEED:-no}" = yes ]; then
    versions="$DB.versions"
    name="$(date -u +%Y%m%dT%H%M%SZ)-seed"
    mkdir -p "$versions"
    staging="$(mktemp -d "$versions/.staging-seed-XXXXXX")"
    for sig in "$HOME_DIR"/etc/clamav/*; do
        case "$sig" in *.in | */README*) continue ;; esac
        cp "$sig" "$staging/"
    done
    mv "$staging" "$versions/$name"
    link="$DB.link-${staging##*-}"  # beside $DB: the link's target is relative to it
    ln -sfn "$(basename "$versions")/$name" "$link"
    mv -T "$link" "$DB"
    echo "clamd: seeded $DB with the image's signatures (version $name)"
fi
if [ ! -e "$DB" ]; then
    echo "clamd: waiting for the updater to install the first signatures in $DB"
    while [ ! -e "$DB" ]; do sleep "${CLAMD_WAIT:-5}"; done
fi

sed -e "s|@PORT@|$PORT|" -e "s|@TMP@|$TMP_DIR|" \
    -e "s|^TCPAddr .*|TCPAddr $ADDR|" \
    -e "s|^Foreground .*|Foreground yes|" \
    -e "/^LogFile /d" -e "/^LogTime /d" \
    -e "s|^DatabaseDirectory .*|DatabaseDirectory $DB|" \
    -e "/^LocalSocket /d" -e "/^FixStaleSocket /d" -e "/^PidFile /d" \
    "$HOME_DIR/etc/clamav/clamd.conf.in" >"$CONF"
exec clamd --config-file="$CONF"

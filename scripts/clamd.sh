#!/usr/bin/env bash
# Start the project's clamd (bundled config and signatures) unless one already
# answers PING on 127.0.0.1:$CLAMD_PORT. Idempotent; used by `make run`,
# `make test` and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR="$(pwd)/var"
PORT="${CLAMD_PORT:-3310}"

ping_clamd() {
    python3 - "$PORT" <<'PY'
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
        s.sendall(b"zPING\0")
        sys.exit(0 if s.recv(16).startswith(b"PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

if ping_clamd; then
    echo "clamd: already answering on 127.0.0.1:$PORT"
    exit 0
fi
command -v clamd >/dev/null || { echo "clamd is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
mkdir -p "$VAR/clamd/tmp" "$VAR/clamav"
# The signature directory belongs to the updater once it has run; seed it only when empty.
if [ -z "$(ls -A "$VAR/clamav" 2>/dev/null)" ]; then
    cp etc/clamav/*.hsb "$VAR/clamav/"
fi
sed -e "s|@VAR@|$VAR|g" -e "s|@PORT@|$PORT|g" etc/clamav/clamd.conf.in > "$VAR/clamd/clamd.conf"
clamd --config-file="$VAR/clamd/clamd.conf"
for _ in $(seq 1 120); do
    if ping_clamd; then echo "clamd: started on 127.0.0.1:$PORT (log: $VAR/clamd/clamd.log)"; exit 0; fi
    sleep 0.5
done
echo "clamd did not answer within 60s; see $VAR/clamd/clamd.log" >&2
tail -20 "$VAR/clamd/clamd.log" >&2 || true
exit 1

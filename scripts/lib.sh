# shellcheck shell=bash
# Shell helpers shared by scripts/setup.sh and scripts/bench.sh (sourced, not run).
# The sourcing script sets SCRIPT_NAME first; messages are prefixed with it.

say() { printf '%s: %s\n' "$SCRIPT_NAME" "$*"; }
die() {
    printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
    exit 1
}

# shellcheck disable=SC2016 # the inner bash expands $1 and $2, not this one
port_open() { timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null; }

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# apt-get install the given packages without letting their maintainer scripts start services.
# They would start Debian's own clamav-daemon, clamav-freshclam (which would then try to
# download signatures forever), rabbitmq-server, redis-server, a Postfix master or clamsmtpd;
# smtpgw starts what it needs itself. With no init system running, invoke-rc.d already refuses
# ("No init system and policy-rc.d missing! Defaulting to block."); under sysvinit it would
# start them. So say "no" for the duration of the install in every case: exit 101 = action
# forbidden (/usr/share/doc/init-system-helpers/README.policy-rc.d). An existing policy-rc.d
# belongs to the machine and is left alone.
install_packages() {
    command -v apt-get >/dev/null || die "missing $*, and this is not a Debian system with apt-get"
    say "installing Debian packages: $*"
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# Temporary, from smtpgw %s: no service starts during apt-get install.\nexit 101\n' \
            "$SCRIPT_NAME" >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Another apt (an admin, unattended-upgrades) may hold the lock: wait for it.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@"
    if [ "$own_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
}

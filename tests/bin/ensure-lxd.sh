#!/usr/bin/env bash
# Make this machine an LXD host for vm-host's access tests: install Debian's lxd package when it
# is missing, start the daemon when it is not running, and give it a "dir" storage pool and a
# root disk in the default profile. `lxd init --auto` is not used: its network step fails on
# hosts without the kernel's bridge netfilter bits, and the tests need no LXD network.
# Idempotent: a second run changes nothing and only says what it found. Must run as root.
set -euo pipefail

pool="${VMHOST_TEST_LXD_POOL:-default}"
log="/var/log/vm-host-test-lxd.log"

say() { printf 'ensure-lxd: %s\n' "$*"; }
# Daemons started here must not keep this script's inherited descriptors: under
# `flock /tmp/vmhost-daemons.lock ...` the lock's descriptor would stay open in the daemon and hold
# the lock for as long as the daemon lives (every later `flock` then waits forever).
# The command starts in the background from this one subshell: `detached cmd &` would fork a
# second shell that waits for the command with the descriptors still open.
detached() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd="${fd##*/}"
            [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
        done
        exec "$@"
    ) &
}

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

status="$(dpkg-query -W -f='${db:Status-Status}' lxd 2>/dev/null || true)"
if [ "$status" != "installed" ]; then
    say "installing lxd"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends lxd lxd-client
else
    say "lxd already installed"
fi

lxd_bin="/usr/bin/lxd"
[ -x "$lxd_bin" ] || lxd_bin="/usr/sbin/lxd"
lxc_bin="/usr/bin/lxc"

if "$lxd_bin" waitready --timeout=1 >/dev/null 2>&1; then
    say "lxd already running"
else
    say "starting lxd (log: $log)"
    detached nohup "$lxd_bin" --group root >>"$log" 2>&1 </dev/null
    disown || true
fi

if ! "$lxd_bin" waitready --timeout=120; then
    say "lxd did not become ready within 120 s (see $log)" >&2
    exit 1
fi
say "lxd ready: $("$lxd_bin" --version)"

if "$lxc_bin" storage show "$pool" >/dev/null 2>&1; then
    say "storage pool $pool already exists"
else
    say "creating dir storage pool $pool"
    "$lxc_bin" storage create "$pool" dir
fi

if "$lxc_bin" profile device show default 2>/dev/null | grep -q '^root:'; then
    say "default profile already has a root disk"
else
    say "adding root disk on pool $pool to the default profile"
    "$lxc_bin" profile device add default root disk path=/ pool="$pool"
fi

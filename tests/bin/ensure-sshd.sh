#!/usr/bin/env bash
# Run an OpenSSH server on a loopback port for vm-host's libvirt access tests (qemu+ssh):
# install openssh-server when missing, generate the host keys when missing, and start sshd on
# 127.0.0.1:PORT when nothing listens there yet. The machine's own sshd configuration is used
# as it is, so the tests see what a charmed host sees. Idempotent: a second run changes nothing
# and only says what it found. Must run as root.
#
# Usage: ensure-sshd.sh [PORT]   (default: $VMHOST_TEST_SSHD_PORT or 2222)
set -euo pipefail

port="${1:-${VMHOST_TEST_SSHD_PORT:-2222}}"
address="127.0.0.1"

say() { printf 'ensure-sshd: %s\n' "$*"; }
# Daemons started here must not keep this script's inherited descriptors: under
# `flock /tmp/vmhost-daemons.lock ...` the lock's descriptor would stay open in the daemon and hold
# the lock for as long as the daemon lives (every later `flock` then waits forever).
detached() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd="${fd##*/}"
            [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
        done
        exec "$@"
    )
}

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi
case "$port" in
    '' | *[!0-9]*) say "port must be a number, got '$port'" >&2; exit 2 ;;
esac

status="$(dpkg-query -W -f='${db:Status-Status}' openssh-server 2>/dev/null || true)"
if [ "$status" != "installed" ]; then
    say "installing openssh-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends openssh-server openssh-client
else
    say "openssh-server already installed"
fi

if ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1; then
    say "host keys already present"
else
    say "generating host keys"
    /usr/bin/ssh-keygen -A
fi

# sshd refuses to start without its privilege separation directory (systemd makes it elsewhere).
if [ ! -d /run/sshd ]; then
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
fi

listening() {
    /usr/bin/ss -Hltn "sport = :$port" 2>/dev/null | grep -q "$address:$port"
}

if listening; then
    say "sshd already listening on $address:$port"
    exit 0
fi

/usr/sbin/sshd -t
say "starting sshd on $address:$port"
detached /usr/sbin/sshd -p "$port" -o ListenAddress="$address"
for _ in $(seq 1 50); do
    if listening; then
        say "sshd listening on $address:$port"
        exit 0
    fi
    sleep 0.1
done
say "sshd did not listen on $address:$port within 5 s" >&2
exit 1

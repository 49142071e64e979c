#!/usr/bin/env bash
# Make this machine a libvirt/KVM host for vm-host's tests and quick start: install the packages
# that are missing, make sure the libvirt group exists, and start virtlogd and libvirtd when they
# are not running (virtlogd first: libvirtd needs its socket to start guests). Idempotent: a
# second run changes nothing and only says what it found. Must run as root.
#
# libvirtd is started with the socket settings of templates/libvirtd.conf.j2 (group "libvirt",
# rw 0770, no auth for that group) so non-root libvirt clients behave as on a charmed host; the
# lines are taken from the template itself so the two cannot drift apart.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
uri="qemu:///system"
conf_dir="/run/vm-host-test"
conf="$conf_dir/libvirtd.conf"

say() { printf 'ensure-libvirt: %s\n' "$*"; }
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

case "$(uname -m)" in
    aarch64 | arm64) qemu_pkg="qemu-system-arm" ;;
    *) qemu_pkg="qemu-system-x86" ;;
esac
# libxml2-utils: xmllint, which virt-xml-validate needs to check rendered XML in the tests.
# gpg/gpgv: the test mirror signs its simplestreams index, vmhost.images verifies it.
# dnsmasq-base, iptables: DHCP and NAT of libvirt networks (the address tests' NAT network).
packages=(libvirt-daemon-system libvirt-clients "$qemu_pkg" qemu-utils libvirt-dev pkg-config
    genisoimage iproute2 procps libxml2-utils gpg gpgv dnsmasq-base iptables)

missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "packages already installed"
fi

if ! getent group libvirt >/dev/null; then
    say "creating group libvirt"
    groupadd --system libvirt
fi

# QEMU backs guest memory with huge pages through hugetlbfs; libvirtd looks for the mounts when
# it starts, so they must exist before it does (systemd mounts /dev/hugepages on a normal host).
mounted_now=0
ensure_hugetlbfs() {
    local dir="$1" opts="$2"
    if ! grep -qs " $dir hugetlbfs " /proc/mounts; then
        mkdir -p "$dir"
        mount -t hugetlbfs -o "$opts" hugetlbfs "$dir"
        say "mounted hugetlbfs ($opts) on $dir"
        mounted_now=1
    fi
}
# udev gives /dev/kvm group kvm, mode 0660 on a normal host (QEMU runs as libvirt-qemu, in group
# kvm); where no udev runs the node stays root-only and every type='kvm' domain fails to start.
if [ -c /dev/kvm ] && [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ] && getent group kvm >/dev/null; then
    say "giving /dev/kvm to group kvm, mode 0660, as udev does"
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
fi
if [ -d /sys/kernel/mm/hugepages/hugepages-2048kB ]; then
    ensure_hugetlbfs /dev/hugepages pagesize=2M
fi
if [ -d /sys/kernel/mm/hugepages/hugepages-1048576kB ]; then
    ensure_hugetlbfs /dev/hugepages1G pagesize=1G
fi

if pgrep -x virtlogd >/dev/null; then
    say "virtlogd already running"
else
    say "starting virtlogd"
    detached /usr/sbin/virtlogd -d
fi

if pgrep -x libvirtd >/dev/null && [ "$mounted_now" -eq 1 ] && [ -s /run/libvirtd.pid ]; then
    # A daemon started before the mounts cannot give guests huge pages: restart it.
    pid="$(cat /run/libvirtd.pid)"
    say "restarting libvirtd (pid $pid) so it sees the hugetlbfs mounts"
    kill "$pid"
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
fi

if pgrep -x libvirtd >/dev/null; then
    say "libvirtd already running (used as it is)"
else
    mkdir -p "$conf_dir"
    template="$repo/templates/libvirtd.conf.j2"
    if [ -f "$template" ]; then
        {
            echo "# Written by tests/bin/ensure-libvirt.sh from templates/libvirtd.conf.j2"
            grep -E '^(unix_sock_|auth_unix_)' "$template"
        } >"$conf"
        say "starting libvirtd with $conf"
        detached /usr/sbin/libvirtd -d -f "$conf"
    else
        say "starting libvirtd with its default configuration"
        detached /usr/sbin/libvirtd -d
    fi
fi

for _ in $(seq 1 60); do
    if version="$(/usr/bin/virsh -c "$uri" version 2>/dev/null)"; then
        say "libvirtd answers on $uri: $(echo "$version" | grep -m1 'Running hypervisor' || true)"
        exit 0
    fi
    sleep 0.5
done
say "libvirtd did not answer on $uri within 30 s" >&2
exit 1

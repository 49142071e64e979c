#!/usr/bin/env bash
# Install what the observability tests run for real: Debian's prometheus (with promtool) and
# chromium (headless). Idempotent; nothing is started here (each test starts its own Prometheus
# on a free loopback port and its own headless Chromium). Must run as root.
set -euo pipefail

say() { printf 'ensure-observe: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root (it installs packages)" >&2
    exit 1
fi

packages=(prometheus chromium fonts-dejavu-core)
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
# Debian's postinst may start its own prometheus (on :9090) where an init system runs; the tests
# never use it, so leave it as the package set it up.
/usr/bin/prometheus --version 2>&1 | head -1 | sed 's/^/ensure-observe: /'
/usr/bin/promtool --version 2>&1 | head -1 | sed 's/^/ensure-observe: /'

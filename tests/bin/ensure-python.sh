#!/usr/bin/env bash
# Make sure uv is available and the project's locked environment (.venv) is in place, using the
# machine's own python3 (>= 3.11). Installs python3/pip from apt and uv from PyPI only when
# missing. Idempotent. Must run as root on a fresh machine (it may install packages).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
say() { printf 'ensure-python: %s\n' "$*"; }
export UV_PYTHON_DOWNLOADS=never

if ! command -v python3 >/dev/null || ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    say "installing python3 (3.11 or newer is needed)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends python3 python3-venv python3-pip
fi

if ! command -v uv >/dev/null; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        say "installing pip"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends python3-pip python3-venv
    fi
    say "installing uv from PyPI"
    python3 -m pip install --quiet uv 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages uv
fi
command -v uv >/dev/null || export PATH="$HOME/.local/bin:$PATH"

# libvirt-python is built from source against the host's libvirt headers.
if ! dpkg-query -W -f='${db:Status-Status}' libvirt-dev 2>/dev/null | grep -qx installed \
    || ! command -v pkg-config >/dev/null || ! command -v gcc >/dev/null; then
    say "installing build dependencies for libvirt-python"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends libvirt-dev pkg-config gcc python3-dev
fi

cd "$repo"
say "syncing the locked environment ($(uv --version))"
uv sync --locked --all-groups --quiet

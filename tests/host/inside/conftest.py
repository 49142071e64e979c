"""Fixtures for the tests that run inside the multi-NUMA test host (tests/host/run_host.py).

They run only there (VMHOST_TEST_HOST=1, set by the runner; skipped anywhere else): a systemd
Debian 12 guest with 4 NUMA nodes of 1 CPU each, 128 2M pages and one 1G page per node, and its
own libvirtd. The charm runs in ops.testing on that real libvirtd, as tests/integration drive
it, composing nested guests from the tiny test image (tests/guest) as `local:tiny`.

- `ctx`, `config`: the charm's Context and config (reserved-cpus 0, so emulator threads have a
  home off the VMs' CPUs; NICs on a bridge vmhost-test-br0; virt-type from
  VMHOST_NESTED_VIRT_TYPE, default auto: kvm where nested SVM gives a usable /dev/kvm).
- `evidence`: `evidence(name, data)` writes results/<name>.json into VMHOST_RESULTS.
- host views: `free_pages()`, `host_view(name)` (numastat -p, numa_maps, vcpupin, emulatorpin,
  numatune, thread affinities of a running VM), `wait_reports(ctx, state, names)`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.host.inside.nested import (
    BRIDGE,
    HOST_SETUP,
    LOCAL_IMAGES,
    POOL,
    POOL_DIR,
    RESULTS,
    TINY,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run only inside the test host."""
    if os.environ.get("VMHOST_TEST_HOST") == "1":
        return
    skip = pytest.mark.skip(
        reason="runs inside the multi-NUMA test host (tests/bin/test-numa-host)"
    )
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def evidence() -> Callable[[str, dict[str, Any]], None]:
    RESULTS.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: dict[str, Any]) -> None:
        (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return write


@pytest.fixture(scope="session")
def nested_host() -> Iterator[dict[str, str]]:
    """Start libvirtd; make the pool, the bridge and local-image-dir with the tiny image."""
    from vmhost import host

    subprocess.run(["/usr/bin/systemctl", "start", "libvirtd"], check=True)
    # The charm's own host setup for huge pages: a hugetlbfs mount per size the kernel holds
    # (the 1G pages of the command line have none; systemd mounts only 2M), as mount units.
    made = host.ensure_hugetlbfs_mounts([])
    daemon = host.ensure_libvirtd(bool(made))
    mounts = [
        line for line in Path("/proc/mounts").read_text().splitlines() if " hugetlbfs " in line
    ]
    HOST_SETUP.update({"mounted": made, "libvirtd": daemon.message, "hugetlbfs": mounts})
    subprocess.run(["/usr/sbin/ip", "link", "del", BRIDGE], check=False, capture_output=True)
    subprocess.run(["/usr/sbin/ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["/usr/sbin/ip", "link", "set", BRIDGE, "up"], check=True)
    from vmhost.backends.libvirt import LibvirtBackend

    with LibvirtBackend() as backend:  # the charm's own pool code; install would make "vm-host"
        backend.ensure_pool(POOL, str(POOL_DIR))
    LOCAL_IMAGES.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TINY, LOCAL_IMAGES / "tiny.qcow2")
    (LOCAL_IMAGES / "tiny.qcow2").chmod(0o644)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "host-setup.json").write_text(json.dumps(HOST_SETUP, indent=2) + "\n")
    yield {
        "default-network": BRIDGE,
        "default-storage-pool": POOL,
        "local-image-dir": str(LOCAL_IMAGES),
        "default-image": "",
        "reserved-cpus": "0",
        "virt-type": os.environ.get("VMHOST_NESTED_VIRT_TYPE", "auto"),
    }
    subprocess.run(["/usr/sbin/ip", "link", "del", BRIDGE], check=False, capture_output=True)


@pytest.fixture(autouse=True)
def _relation_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The charm's relation journal in a temporary directory."""
    from vmhost.relation import journal

    monkeypatch.setattr(journal, "JOURNAL_DIR", tmp_path / "relations")

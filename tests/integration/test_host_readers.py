"""The sysfs and libvirt readers on this machine's own kernel and libvirtd (not fixtures)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmhost.networks import discover_nics
from vmhost.topology import (
    apply_free_hugepages,
    parse_capabilities,
    parse_cpu_list,
    read_free_hugepages,
    read_total_hugepages,
)

pytestmark = pytest.mark.integration
M2 = 2048


SYS_NODE = Path("/sys/devices/system/node")


@pytest.mark.skipif(not SYS_NODE.is_dir(), reason="this kernel exposes no NUMA nodes in sysfs")
def test_real_sysfs_matches_the_kernel():
    nodes = set(parse_cpu_list((SYS_NODE / "online").read_text()))
    free = read_free_hugepages()
    total = read_total_hugepages()
    assert set(free) == nodes
    assert set(total) == nodes
    for node in nodes:
        sizes = {
            int(m.group(1))
            for p in (SYS_NODE / f"node{node}" / "hugepages").iterdir()
            if (m := re.match(r"hugepages-(\d+)kB", p.name))
        }
        assert set(free[node]) == sizes
        assert M2 in sizes
        for size in sizes:
            assert 0 <= free[node][size] <= total[node][size]
    # The CPUs of all nodes together are exactly the online CPUs.
    node_cpus = [
        cpu
        for node in nodes
        for cpu in parse_cpu_list((SYS_NODE / f"node{node}/cpulist").read_text())
    ]
    online = parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())
    assert sorted(node_cpus) == list(online)


LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")


@pytest.mark.skipif(not LIBVIRT_SOCKET.exists(), reason="libvirtd is not running on this machine")
def test_real_libvirt_capabilities_match_sysfs():
    libvirt = pytest.importorskip("libvirt")
    try:
        conn = libvirt.openReadOnly("qemu:///system")
    except libvirt.libvirtError as exc:  # a stale socket from a stopped daemon
        pytest.skip(f"libvirtd is not answering: {exc}")
    try:
        xml = conn.getCapabilities()
    finally:
        conn.close()
    topology = apply_free_hugepages(
        parse_capabilities(xml), read_free_hugepages(), read_total_hugepages()
    )
    nodes = parse_cpu_list((SYS_NODE / "online").read_text())
    assert tuple(n.id for n in topology.nodes) == nodes
    online = parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())
    assert tuple(sorted(topology.cpus)) == online
    for node in topology.nodes:
        assert node.memory_kib > 0
        assert node.cpu_ids == parse_cpu_list((SYS_NODE / f"node{node.id}/cpulist").read_text())
        assert M2 in node.hugepages_total


def test_discover_real_sysfs_reads_this_host():
    nics = discover_nics()
    names = [n.name for n in nics]
    assert names == sorted(names)
    assert "lo" not in names
    assert names == sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name != "lo")

"""The records whose encoded forms tests/fixtures/codec pins (see test_codec_compat.py)."""

from __future__ import annotations

from dataclasses import replace

from tests.fixtures import LIBVIRT_CAPS

from vmhost.model import (
    CellPlacement,
    HostNic,
    HostTopology,
    NicKind,
    Placement,
    StoragePool,
    VfAssignment,
)
from vmhost.topology import parse_capabilities

PINNED = Placement(
    vcpus=4,
    memory_mib=4096,
    cells=(
        CellPlacement(0, 2, 2048, (2, 14), hugepage_size_kib=1048576, hugepages=2),
        CellPlacement(1, 2, 2048, (8, 20), hugepage_size_kib=2048, hugepages=1024),
    ),
    emulator_cpus=(0, 12),
    vfs=(VfAssignment("enp65s0f0", 2), VfAssignment("enp65s0f1")),
)
"""A pinned VM over two nodes with both page sizes, emulator CPUs and VFs."""

FLOATING = Placement(vcpus=2, memory_mib=512)
"""A shared-CPU VM: no cells."""

ONE_CELL = Placement(vcpus=1, memory_mib=256, cells=(CellPlacement(1, 1, 256, (7,)),))
"""A pinned VM on one node, no huge pages."""

PLACEMENTS = {"pinned": PINNED, "floating": FLOATING, "one-cell": ONE_CELL}


def two_node_host() -> HostTopology:
    """The 2-node SMT fixture with huge pages, every NIC kind and field, and two pools."""
    topo = parse_capabilities((LIBVIRT_CAPS / "x86-2node-smt-24cpu.xml").read_text())
    nodes = tuple(
        replace(n, hugepages_total={2048: 512, 1048576: 2}, hugepages_free={2048: 256})
        if n.id == 1
        else n
        for n in topo.nodes
    )
    nics = (
        HostNic(
            "eno1",
            kind=NicKind.PHYSICAL,
            numa_node=0,
            mac="3c:ec:ef:00:00:01",
            addresses=("10.0.1.5/24", "fd00::5/64"),
            master="br-oam",
            link="up",
            speed_mbps=10000,
        ),
        HostNic(
            "enp65s0f0",
            kind=NicKind.PHYSICAL,
            numa_node=1,
            sriov_total_vfs=8,
            sriov_enabled_vfs=4,
            mac="3c:ec:ef:00:00:02",
            link="up",
            speed_mbps=25000,
        ),
        HostNic("br-oam", kind=NicKind.BRIDGE, addresses=("10.0.1.5/24",)),
        HostNic("bond0.100", kind=NicKind.VLAN, vlan_id=100, parent="bond0"),
        HostNic("bond0", kind=NicKind.BOND, numa_node=None, link="down"),
    )
    pools = (
        StoragePool(
            "default",
            capacity_bytes=500 * 10**9,
            allocation_bytes=100 * 10**9,
            available_bytes=400 * 10**9,
            path="/var/lib/libvirt/images",
            committed_bytes=120 * 10**9,
        ),
        StoragePool("fast", driver="logical", active=False),
    )
    return replace(topo, nodes=nodes, nics=nics, pools=pools)


def four_node_host() -> HostTopology:
    """The 4-node fixture as libvirt reports it (no NICs, no pools)."""
    return parse_capabilities((LIBVIRT_CAPS / "x86-4node-nosmt-hugepages.xml").read_text())


TOPOLOGIES = {"x86-2node-smt-24cpu": two_node_host, "x86-4node-nosmt-hugepages": four_node_host}

"""show-resources' NUMA view and the status line.

The CPUs they call free are the ones a pinned request can take, checked against the allocator
itself on the repository's 1-, 2- and 4-node fixtures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
from fake_sysfs import FakeSys
from tests.fixtures import LIBVIRT_CAPS

from vmhost import pools, report
from vmhost.model import (
    CellPlacement,
    HostTopology,
    HugepageRequest,
    Placement,
    Policy,
    Rejection,
    VmRecord,
    VmSpec,
    VmState,
)
from vmhost.placement import plan, usage
from vmhost.topology import parse_capabilities

FIXTURES = {
    "1node": "x86-1node-4core-nosmt.xml",
    "2node": "x86-2node-smt-24cpu.xml",
    "4node": "x86-4node-nosmt-hugepages.xml",
}


def fixture(name: str) -> HostTopology:
    return parse_capabilities((LIBVIRT_CAPS / FIXTURES[name]).read_text())


def pinned(
    n: int, nodes: int = 1, mem: int = 64, hugepages: HugepageRequest | None = None
) -> VmSpec:
    return VmSpec(
        name="vm", vcpus=n, memory_mib=mem, pinned_count=n, numa_nodes=nodes, hugepages=hugepages
    )


def shared(n: int, mem: int = 64, hugepages: HugepageRequest | None = None) -> VmSpec:
    return VmSpec(name="vm", vcpus=n, memory_mib=mem, hugepages=hugepages)


def place_all(topo: HostTopology, specs: Sequence[VmSpec], policy: Policy) -> list[Placement]:
    allocs: list[Placement] = []
    for spec in specs:
        result = plan(topo, allocs, spec, policy)
        assert isinstance(result, Placement), result
        allocs.append(result)
    return allocs


def records(allocs: Sequence[Placement], state: VmState = VmState.RUNNING) -> list[VmRecord]:
    return [
        VmRecord(name=f"vm-{i}", uuid=f"u{i}", state=state, placement=p)
        for i, p in enumerate(allocs)
    ]


def largest(
    topo: HostTopology,
    allocs: Sequence[Placement],
    policy: Policy,
    nodes: int,
    hugepages: HugepageRequest | None,
) -> int:
    """The largest pinned request the allocator itself places (found by asking it)."""
    best = 0
    for n in range(1, len(topo.cpus) + 1):
        if isinstance(
            plan(topo, allocs, pinned(n, nodes, hugepages=hugepages), policy), Placement
        ):
            best = n
    return best


def test_full_shared_pool_is_not_free_for_pinning() -> None:
    # The host: 32 CPUs, 30 pinned, shared VMs filling the 2 left at ratio 1. The
    # status used to say "2/32 CPUs free", and then a 1-CPU pinned VM was refused.
    topo = parse_capabilities((LIBVIRT_CAPS / "x86-2node-smt-96cpu-sparse-cores.xml").read_text())
    policy = Policy()
    total = len(topo.cpus)
    allocs = place_all(topo, [pinned(total // 2 - 1), pinned(total // 2 - 1)], policy)
    allocs = [*allocs, Placement(vcpus=2, memory_mib=64)]
    assert usage(topo, allocs, policy).shared_pool_cpus == 2
    line = report.status_line("libvirt", "9.0.0", topo, allocs, policy, len(allocs))
    assert line == f"libvirt 9.0.0: 2 NUMA nodes, 0/{total} CPUs free, 3 VMs"
    assert isinstance(plan(topo, allocs, pinned(1), policy), Rejection)
    data = report.resources_json(topo, records(allocs), policy)
    assert [n["cpus"]["free"] for n in data["nodes"]] == [0, 0]
    assert [n["cpus"]["shared-pool"] for n in data["nodes"]] == [1, 1]
    assert data["shared"]["pinnable-cpus"] == 0


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize(
    "policy",
    [
        Policy(),
        Policy(cpu_overcommit_ratio=2.0, reserved_cpus=frozenset({0, 1})),
        Policy(smt_policy="isolate"),
        Policy(smt_policy="require", cpu_overcommit_ratio=1.5),
    ],
    ids=["prefer", "ratio2-reserved", "isolate", "require"],
)
def test_free_for_pinning_is_what_the_allocator_places(name: str, policy: Policy) -> None:
    topo = fixture(name)
    cpus = len(topo.cpus)
    even = 2 if policy.smt_policy == "require" else 1
    # The 4-node fixture's memory is all huge pages: its VMs take 2M pages.
    pages = HugepageRequest.P2M if name == "4node" else None
    # Some pinned VMs, and shared VMs that need part of the shared pool.
    allocs = place_all(
        topo, [pinned(even, hugepages=pages), pinned(even, hugepages=pages)], policy
    )
    allocs += place_all(topo, [shared(max(1, cpus // 4), hugepages=pages)], policy)
    data = report.resources_json(topo, records(allocs), policy)
    free = [n["cpus"]["free"] for n in data["nodes"]]
    # No node promises more than the allocator gives one node, and the roomiest node's
    # number is exactly the largest single-node pinned VM it places.
    assert max(free) == largest(topo, allocs, policy, 1, pages)
    # The host-wide number (the status line's) is what a VM spanning every node can take.
    spanning = largest(topo, allocs, policy, len(topo.nodes), pages)
    assert data["shared"]["pinnable-cpus"] >= spanning
    if policy.smt_policy != "isolate":
        assert data["shared"]["pinnable-cpus"] == spanning
    line = report.status_line("libvirt", "9.0.0", topo, allocs, policy, len(allocs))
    assert f", {data['shared']['pinnable-cpus']}/{cpus} CPUs free," in line


def test_per_vm_view_on_a_two_node_host() -> None:
    topo = fixture("2node")
    policy = Policy()
    span = Placement(
        vcpus=4,
        memory_mib=2048,
        cells=(
            CellPlacement(host_node=0, vcpus=2, memory_mib=1024, cpus=(2, 14)),
            CellPlacement(host_node=1, vcpus=2, memory_mib=1024, cpus=(8, 20)),
        ),
    )
    local = place_all(topo, [pinned(2, 1, 512)], policy)[0]
    floating = Placement(vcpus=2, memory_mib=256)
    vms = [
        VmRecord(name="db-span", uuid="a", state=VmState.RUNNING, placement=span),
        VmRecord(name="db-one", uuid="b", state=VmState.STOPPED, placement=local),
        VmRecord(name="web", uuid="c", state=VmState.RUNNING, placement=floating),
    ]
    data = report.resources_json(topo, vms, policy)
    node0, node1 = data["nodes"]
    by_name = {v["name"]: v for v in node0["vm-usage"]}
    assert by_name["db-span"] == {
        "name": "db-span",
        "state": "running",
        "vcpus": 2,
        "pinned-cpus": [2, 14],
        "memory-mib": 1024,
        "hugepages": [],
        "nodes": [0, 1],
        "spans": True,
    }
    assert [v["name"] for v in node1["vm-usage"]] == ["db-span"] + (
        ["db-one"] if local.host_nodes == (1,) else []
    )
    one = next(v for n in data["nodes"] for v in n["vm-usage"] if v["name"] == "db-one")
    assert (one["state"], one["spans"], one["vcpus"], one["memory-mib"]) == (
        "stopped",
        False,
        2,
        512,
    )
    assert data["shared"]["floating-vms"] == ["web"]
    table = report.resources_table(data)
    assert "SHARED-POOL" in table
    span_rows = [
        line for line in table.splitlines() if line.startswith("node") and "db-span" in line
    ]
    assert any("spans 0,1" in line and "2,14" in line for line in span_rows)
    assert any("stopped" in line and "db-one" in line for line in table.splitlines())
    assert "floating (shared, no NUMA binding): web" in table


def test_hugepages_per_vm_on_a_four_node_host() -> None:
    topo = fixture("4node")
    policy = Policy()
    allocs = place_all(topo, [pinned(2, 1, 2048, hugepages=HugepageRequest.P2M)], policy)
    data = report.resources_json(topo, records(allocs), policy)
    rows = [v for n in data["nodes"] for v in n["vm-usage"]]
    assert len(rows) == 1
    assert rows[0]["hugepages"] == [{"size": "2M", "pages": 1024}]
    node = next(n for n in data["nodes"] if n["vm-usage"])
    assert next(h for h in node["hugepages"] if h["size"] == "2M")["allocated"] == 1024


def test_the_status_line_names_the_virt_type_and_warns_about_tcg() -> None:
    topo = parse_capabilities((LIBVIRT_CAPS / "x86-2node-smt-96cpu-sparse-cores.xml").read_text())
    plain = report.status_line("libvirt", "9.0.0", topo, [], Policy(), 0)
    kvm = report.status_line("libvirt", "9.0.0", topo, [], Policy(), 0, "kvm")
    tcg = report.status_line("libvirt", "9.0.0", topo, [], Policy(), 0, "qemu")
    assert plain.startswith("libvirt 9.0.0: 2 NUMA nodes")
    assert kvm.startswith("libvirt 9.0.0 (kvm): 2 NUMA nodes")
    assert tcg.startswith("libvirt 9.0.0 (qemu: TCG emulation, no hardware virtualisation")
    assert tcg.endswith(", 0 VMs")


# ---------------------------------------------------------------------------------------------
# NICs: every physical NIC, bond and bridge port, read from a sysfs tree the test builds


def two_node_host(tmp_path: Path) -> HostTopology:
    """The 2-node fixture with NICs from a fake sysfs tree.

    br-data over bond0 (eno1 on node 0, eno2 on node 1), br-ext over eno3 (node 1), br-virt
    with a veth only, and an SR-IOV PF enp65s0f0 on node 1 with 4 of 8 VFs enabled.
    """
    sys = FakeSys(tmp_path)
    sys.nic("br-data", bridge=True, operstate="up")
    sys.nic("bond0", bonding=True, master="br-data", operstate="up", speed=50000)
    sys.nic("eno1", pci=True, numa=0, master="bond0", operstate="up", speed=25000)
    sys.nic("eno2", pci=True, numa=1, master="bond0", operstate="up", speed=25000)
    sys.nic("br-ext", bridge=True, operstate="up")
    sys.nic("eno3", pci=True, numa=1, master="br-ext", operstate="up", speed=10000)
    sys.nic("br-virt", bridge=True, operstate="unknown")
    sys.nic("veth0", master="br-virt", operstate="up")
    sys.nic("enp65s0f0", pci=True, numa=1, total_vfs=8, num_vfs=4, operstate="down", speed=-1)
    return dataclasses.replace(fixture("2node"), nics=sys.discover())


def test_nic_rows_are_physical_nics_bonds_and_bridge_ports(tmp_path: Path):
    data = report.resources_json(two_node_host(tmp_path), [], Policy())
    rows = {n["name"]: n for n in data["nics"]}
    assert list(rows) == ["bond0", "eno1", "eno2", "eno3", "enp65s0f0"]
    # A bridge port's node is its own device's; a bond is where its ports are.
    assert (rows["eno3"]["numa-nodes"], rows["eno3"]["master"]) == ([1], "br-ext")
    assert (rows["bond0"]["numa-node"], rows["bond0"]["numa-nodes"]) == (None, [0, 1])
    assert rows["bond0"]["ports"] == ["eno1", "eno2"]
    assert (rows["eno1"]["link"], rows["eno1"]["speed-mbps"]) == ("up", 25000)
    pf = rows["enp65s0f0"]
    assert (pf["link"], pf["speed-mbps"]) == ("down", None)
    assert (pf["vfs-enabled"], pf["vfs-free"], pf["vfs-total"], pf["vfs-used"]) == (4, 4, 8, 0)
    assert report.sriov_nics(data) == [pf]
    table = report.resources_table(data)
    assert "bond0      bond      0,1   up    50G    br-data  eno1,eno2" in table
    assert "eno3       physical  1     up    10G    br-ext   -          0" in table
    assert "br-virt" not in table
    assert "veth0" not in table


def cells(*nodes: int) -> Placement:
    return Placement(
        vcpus=2 * len(nodes),
        memory_mib=512 * len(nodes),
        cells=tuple(CellPlacement(host_node=n, vcpus=2, memory_mib=512) for n in nodes),
    )


def with_nics(name: str, placement: Placement, *attached: str) -> VmRecord:
    return VmRecord(
        name=name,
        uuid=name,
        state=VmState.RUNNING,
        placement=placement,
        interfaces=tuple(
            {"label": f"eth{i}", "mac": f"52:54:00:00:01:{i:02x}", "attached-to": a}
            for i, a in enumerate(attached)
        ),
    )


def test_vm_nic_off_node_mark(tmp_path: Path):
    host = two_node_host(tmp_path)
    vms = [
        with_nics("on-node", cells(1), "br-ext"),  # br-ext's eno3 is on node 1
        with_nics("off-node", cells(0), "br-ext"),
        with_nics("spanning", cells(0, 1), "br-ext", "br-data"),
        with_nics("floating", Placement(vcpus=1, memory_mib=256), "br-ext"),  # no cells
        with_nics("veths", cells(0), "br-virt"),  # no hardware, no node
        with_nics("half-bond", cells(1), "br-data"),  # bond0: eno1 node 0, eno2 node 1
        with_nics("vf", cells(0), "enp65s0f0/vf1 (0000:41:00.2)"),
    ]
    rows = {
        (n["vm"], n["label"]): n for n in report.resources_json(host, vms, Policy())["vm-nics"]
    }
    marks = {key: (n["host-device"], n["numa-nodes"], n["off-node"]) for key, n in rows.items()}
    assert marks == {
        ("on-node", "eth0"): ("br-ext", [1], False),
        ("off-node", "eth0"): ("br-ext", [1], True),
        ("spanning", "eth0"): ("br-ext", [1], False),
        ("spanning", "eth1"): ("br-data", [0, 1], False),
        ("floating", "eth0"): ("br-ext", [1], False),
        ("veths", "eth0"): ("br-virt", [], False),
        ("half-bond", "eth0"): ("br-data", [0, 1], True),
        ("vf", "eth0"): ("enp65s0f0", [1], True),
    }
    assert rows[("floating", "eth0")]["vm-nodes"] == []
    assert rows[("spanning", "eth0")]["vm-nodes"] == [0, 1]


def test_vm_nics_in_list_vms_and_show_resources_text(tmp_path: Path):
    host = two_node_host(tmp_path)
    vm = with_nics("db", cells(0), "br-ext", "br-virt")
    vm = dataclasses.replace(
        vm,
        interfaces=(
            {**vm.interfaces[0], "space": "data", "subnet": "10.0.5.0/24"},
            vm.interfaces[1],  # composed before space and subnet were recorded
        ),
    )
    listed = report.vm_json(vm, host.nics)["interfaces"]
    assert [(i["host-device"], i["numa-nodes"], i["off-node"]) for i in listed] == [
        ("br-ext", [1], True),
        ("br-virt", [], False),
    ]
    assert [(i["space"], i["subnet"]) for i in listed] == [("data", "10.0.5.0/24"), (None, None)]
    assert "eth0>br-ext(1,off-node) eth1>br-virt(-)" in report.vms_table([vm], host.nics)
    table = report.resources_table(report.resources_json(host, [vm], Policy()))
    assert "db  eth0  br-ext       1     0         10.0.5.0/24  data   off-node" in table
    assert "db  eth1  br-virt      -     0         -            -      -" in table


def test_two_node_view_with_pools_a_spanning_vm_and_an_off_node_nic(tmp_path: Path):
    """The whole operator view on the 2-node fixture, as show-resources and list-vms print it.

    Placements from the allocator itself, VMs in resource pools, one VM spanning both nodes,
    one NIC off its VM's node.
    """
    host = two_node_host(tmp_path)
    policy = Policy()
    # 16 pinned vCPUs cannot fit one 12-CPU node: the allocator spans both.
    span, small = place_all(host, [pinned(16, nodes=2, mem=4096), pinned(2, mem=1024)], policy)
    assert len(span.cells) == 2
    vms = [
        dataclasses.replace(with_nics("db-0", span, "br-data"), pool="db"),
        dataclasses.replace(with_nics("web-0", small, "br-ext"), pool="web"),
    ]
    config = pools.load("db: {pinned-cpus: 24, vms: 2}\nweb: {vcpus: 4}", "web", "")
    data = report.resources_json(host, vms, policy, resource_pools=config)
    nodes_of = {vm["name"]: vm for node in data["nodes"] for vm in node["vm-usage"]}
    assert nodes_of["db-0"]["spans"]
    assert not nodes_of["web-0"]["spans"]
    nic = {(n["vm"], n["label"]): n for n in data["vm-nics"]}
    web_nodes = [c.host_node for c in small.cells]
    # br-ext's only port, eno3, is on node 1: off-node exactly when web-0's CPUs are not.
    assert nic[("web-0", "eth0")]["off-node"] == (web_nodes != [1])
    assert not nic[("db-0", "eth0")]["off-node"]  # bond0 has ports on both nodes
    rows = {(p["name"], r["resource"]): r for p in data["resource-pools"] for r in p["resources"]}
    assert (rows[("db", "pinned-cpus")]["used"], rows[("db", "pinned-cpus")]["free"]) == (16, 8)
    assert (rows[("web", "vcpus")]["used"], rows[("web", "vcpus")]["free"]) == (2, 2)
    table = report.resources_table(data)
    listed = report.vms_table(vms, host.nics)
    assert "spans 0,1" in table
    assert ("off-node" in listed) == (web_nodes != [1])
    print(table, listed, sep="\n\n")

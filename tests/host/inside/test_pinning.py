"""Pinned VMs on the 4-node test host, composed through the charm on the real libvirtd.

Two tiny guests boot side by side (one boot wait for both):
- `vmhost-test-span`: the explicit CPU list 1,3 with numa-nodes=2: two guest cells, one on host
  node 1 and one on node 3, each with its planned CPU and half of the memory;
- `vmhost-test-node2`: a pinned count of 1 that the host places itself. CPU 0 is reserved and
  CPUs 1 and 3 are taken by the first VM, so the allocator's only choice is node 2.
The evidence is each guest's own report (CPUs and NUMA nodes it sees) and the host's view
while it ran: vcpupin and the vCPU threads' affinity (taskset -p), numatune and where its
memory lies (numastat -p, numa_maps), the emulator threads' affinity.

Both VMs also land in resource pools (`wide`: 2 pinned CPUs, 1 VM; `narrow`, the default
pool: 1 pinned CPU, 256 MiB) with their NIC on a bridge whose port is the test host's NIC on
node 3's PCIe expander bus: show-resources and list-vms, read while both run, are compared
with the host (taskset, numa_maps, sysfs): per node the rows of each VM, the span VM's
`spans 1,3`, the node-2 VM's NIC off its node, the pools' use, and a third VM the full pool
refuses without creating anything.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ops import testing
from tests.host.inside.nested import (
    NODES,
    action,
    compose,
    delete,
    vcpu_threads,
    virsh,
    wait_reports,
)
from tests.host.run_host import OFF_NODE_NIC_MAC, OFF_NODE_NIC_NODE

from vmhost.topology import parse_cpu_list

SPAN = "vmhost-test-span"
NODE2 = "vmhost-test-node2"
REFUSED = "vmhost-test-pool-full"
MEMORY_MIB = 256
NIC_BRIDGE = "vmhost-test-br3"
POOLS = "{wide: {pinned-cpus: 2, vms: 1}, narrow: {pinned-cpus: 1, memory: 256}}"
IP = "/usr/sbin/ip"


def _port() -> str:
    """The test host's NIC on node 3's expander bus, found by its MAC."""
    for path in Path("/sys/class/net").iterdir():
        if (path / "address").read_text().strip() == OFF_NODE_NIC_MAC:
            return path.name
    pytest.fail(f"no NIC with MAC {OFF_NODE_NIC_MAC}: tests/host/run_host.py gives the host one")


def _bridge(port: str, *, up: bool) -> None:
    """Make (or remove) the bridge NIC_BRIDGE with `port` as its only port."""
    subprocess.run([IP, "link", "set", port, "nomaster"], check=False, capture_output=True)
    subprocess.run([IP, "link", "del", NIC_BRIDGE], check=False, capture_output=True)
    if up:
        subprocess.run([IP, "link", "add", NIC_BRIDGE, "type", "bridge"], check=True)
        subprocess.run([IP, "link", "set", port, "master", NIC_BRIDGE], check=True)
        subprocess.run([IP, "link", "set", NIC_BRIDGE, "up"], check=True)


@pytest.fixture(scope="module")
def booted(nested_host: dict[str, str]) -> Any:
    """Compose both VMs in their pools, read the views, wait for both reports; clean up."""
    import charm

    ctx = testing.Context(charm.VmHostCharm)
    config = dict(nested_host) | {"resource-pools": POOLS, "default-pool": "narrow"}
    state = testing.State(config=config, leader=True)
    port = _port()
    names = (SPAN, NODE2, REFUSED)
    for name in names:
        delete(ctx, state, name)
    _bridge(port, up=True)
    nic = f"eth0:bridge={NIC_BRIDGE}"
    try:
        span = compose(
            ctx,
            state,
            SPAN,
            memory=MEMORY_MIB,
            pool="wide",
            interfaces=nic,
            **{"pinned-cores": "1,3", "numa-nodes": 2},
        )
        node2 = compose(
            ctx, state, NODE2, memory=MEMORY_MIB, interfaces=nic, **{"pinned-cores": "1"}
        )
        # Read while both run (the tiny guest powers off after its report).
        views: dict[str, Any] = {
            "show-resources": action(ctx, state, "show-resources"),
            "list-vms": action(ctx, state, "list-vms"),
            "list-vms-wide": action(ctx, state, "list-vms", pool="wide"),
        }
        views["states"] = {n: virsh("domstate", n).strip() for n in (SPAN, NODE2)}
        with pytest.raises(testing.ActionFailed) as refused:
            compose(ctx, state, REFUSED, memory=128, cores=1, pool="wide")
        views["refused"] = refused.value.message
        views["refused-defined"] = REFUSED in virsh("list", "--all", "--name").split()
        seen = wait_reports(ctx, state, [SPAN, NODE2])
        yield {
            SPAN: span | seen[SPAN],
            NODE2: node2 | seen[NODE2],
            "views": views,
            "port": port,
        }
    finally:
        for name in names:
            delete(ctx, state, name)
        _bridge(port, up=False)


def _share_on(view: dict[str, Any], nodes: set[int]) -> float:
    per_node = view["memory-mib-per-node"]
    total = sum(per_node.values())
    return sum(v for n, v in per_node.items() if n in nodes) / total if total else 0.0


def test_pinned_vm_is_placed_on_node_2_with_strict_memory_and_emulator_off_its_cpu(
    booted, evidence
):
    vm = booted[NODE2]
    placement, view, guest = vm["placement"], vm["host"], vm["report"]
    evidence(
        "pinned-node2",
        {"placement": placement, "host": view, "guest": guest, "after-s": vm["report-after-s"]},
    )
    (cell,) = placement["cells"]
    assert cell["host-node"] == 2
    assert cell["cpus"] == [2]
    assert 2 not in placement["emulator-cpus"]
    # The host: the vCPU thread runs only on CPU 2, the emulator threads never there.
    (vcpu,) = vcpu_threads(view)
    assert vcpu["cpus"] == [2], vcpu["taskset"]
    others = [t for t in view["threads"] if t not in vcpu_threads(view)]
    assert all(2 not in t["cpus"] for t in others if t["tid"] == view["pid"]), others
    assert "strict" in view["numatune"]
    assert "2" in view["numatune"].split("numa_nodeset")[1].split("\n")[0]
    assert _share_on(view, {2}) >= 0.95, view["numastat"]
    ram = [m for m in view["guest-ram"] if m["size-mib"] == MEMORY_MIB]
    assert ram, view["guest-ram"]
    assert set(ram[0]["touched-mib-per-node"]) == {2}, ram
    # The guest: one vCPU, one NUMA node, the memory asked for.
    assert guest["cpus"] == 1
    assert len(guest["nodes"]) == 1
    assert guest["nodes"][0]["memory_kib"] <= MEMORY_MIB * 1024


def test_explicit_cpus_on_nodes_1_and_3_make_two_guest_cells(booted, evidence):
    vm = booted[SPAN]
    placement, view, guest = vm["placement"], vm["host"], vm["report"]
    evidence(
        "pinned-span-1-3",
        {"placement": placement, "host": view, "guest": guest, "after-s": vm["report-after-s"]},
    )
    cells = {c["host-node"]: c for c in placement["cells"]}
    assert set(cells) == {1, 3}
    assert cells[1]["cpus"] == [1]
    assert cells[3]["cpus"] == [3]
    assert cells[1]["memory-mib"] + cells[3]["memory-mib"] == MEMORY_MIB
    # The host: vCPU 0 on CPU 1, vCPU 1 on CPU 3; the memory on nodes 1 and 3 only.
    by_vcpu = {int(t["name"].split()[1].split("/")[0]): t["cpus"] for t in vcpu_threads(view)}
    assert by_vcpu == {0: [1], 1: [3]}, view["vcpupin"]
    assert _share_on(view, {1, 3}) >= 0.95, view["numastat"]
    for mapping in view["guest-ram"]:
        assert set(mapping["touched-mib-per-node"]) <= {1, 3}, view["guest-ram"]
    cell_ram = sorted(
        tuple(m["touched-mib-per-node"]) for m in view["guest-ram"] if m["size-mib"] == 128
    )
    assert cell_ram == [(1,), (3,)], view["guest-ram"]
    # The guest: two vCPUs in two NUMA nodes of one CPU and half the memory each.
    assert guest["cpus"] == 2
    assert len(guest["nodes"]) == 2
    assert sorted(len(n["cpus"].split(",")) for n in guest["nodes"]) == [1, 1]
    for node in guest["nodes"]:
        assert node["memory_kib"] <= cells[1]["memory-mib"] * 1024


def _sysfs_cpus(node: int) -> set[int]:
    return set(parse_cpu_list((NODES / f"node{node}" / "cpulist").read_text()))


def _line(table: str, *cells: object) -> str:
    """The one table line whose whitespace-separated cells start with `cells`."""
    want = [str(c) for c in cells]
    found = [line for line in table.splitlines() if line.split()[: len(want)] == want]
    assert len(found) == 1, (want, table)
    return found[0]


def test_show_resources_and_list_vms_match_the_host_for_both_vms_and_their_pools(booted, evidence):
    views = booted["views"]
    data = json.loads(views["show-resources"]["json"])
    table = views["show-resources"]["table"]
    listed = {vm["name"]: vm for vm in json.loads(views["list-vms"]["json"])}
    wide = [vm["name"] for vm in json.loads(views["list-vms-wide"]["json"])]
    port = booted["port"]
    sysfs_nic_node = int(
        (Path("/sys/class/net") / port / "device" / ".." / "numa_node").read_text()
    )
    evidence(
        "numa-view",
        {
            "show-resources": data,
            "show-resources-table": table,
            "list-vms": listed,
            "list-vms-table": views["list-vms"]["table"],
            "list-vms-pool-wide": wide,
            "states-when-read": views["states"],
            "refused": views["refused"],
            "nic": {"name": port, "sysfs-numa-node": sysfs_nic_node},
        },
    )
    assert views["states"] == {SPAN: "running", NODE2: "running"}, views["states"]
    # Per node, each VM's row: its pinned CPUs are the CPUs its vCPU threads may run on (taskset,
    # within the node's sysfs cpulist), its MiB the size of its guest RAM there (numa_maps).
    expected_nodes = {SPAN: {1, 3}, NODE2: {2}}
    for name, nodes in expected_nodes.items():
        view = booted[name]["host"]
        threads_cpus = {cpu for t in vcpu_threads(view) for cpu in t["cpus"]}
        for node in data["nodes"]:
            rows = [r for r in node["vm-usage"] if r["name"] == name]
            if node["id"] not in nodes:
                assert not rows, (name, node)
                continue
            (row,) = rows
            assert set(row["pinned-cpus"]) == threads_cpus & _sysfs_cpus(node["id"]), (row, view)
            ram = [
                m["size-mib"]
                for m in view["guest-ram"]
                if set(m["touched-mib-per-node"]) == {node["id"]}
            ]
            assert row["memory-mib"] in ram, (row, view["guest-ram"])
            assert row["nodes"] == sorted(nodes)
            assert row["spans"] is (len(nodes) > 1)
    for node in data["nodes"]:
        pinned = set(node["cpus"]["pinned"])
        assert pinned == ({node["id"]} if node["id"] else set()), node
        assert node["cpus"]["free"] == 0, node  # node 0 reserved, 1-3 taken
    # The table says the same: per node the VM's CPUs, MiB and the span mark.
    assert _line(table, "node", 1, SPAN, "running", 1, 1, 128).split()[-2:] == ["spans", "1,3"]
    assert _line(table, "node", 3, SPAN, "running", 1, 3, 128).split()[-2:] == ["spans", "1,3"]
    assert _line(table, "node", 2, NODE2, "running", 1, 2, 256).split()[-1] == "-"
    # The NIC: the bridge's port is on node 3 (sysfs), shown so; the node-2 VM's NIC is off its
    # node, the span VM's (it has a cell on node 3) is not.
    assert sysfs_nic_node == OFF_NODE_NIC_NODE
    (nic_row,) = [n for n in data["nics"] if n["name"] == port]
    assert nic_row["numa-node"] == OFF_NODE_NIC_NODE
    assert nic_row["master"] == NIC_BRIDGE
    vm_nics = {n["vm"]: n for n in data["vm-nics"]}
    assert vm_nics[SPAN]["numa-nodes"] == [3]
    assert vm_nics[SPAN]["vm-nodes"] == [1, 3]
    assert vm_nics[SPAN]["off-node"] is False
    assert vm_nics[NODE2]["numa-nodes"] == [3]
    assert vm_nics[NODE2]["vm-nodes"] == [2]
    assert vm_nics[NODE2]["off-node"] is True
    assert _line(table, NODE2, "eth0").split()[2:5] == [NIC_BRIDGE, "3", "2"]
    assert _line(table, NODE2, "eth0").split()[-1] == "off-node"
    assert _line(table, SPAN, "eth0").split()[-1] == "-"
    for name in (SPAN, NODE2):
        (mac,) = booted[name]["report"]["nics"].values()  # the guest's own NIC
        assert vm_nics[name]["mac"] == mac
    # Pools: what each holds is what its VM was given; both are full.
    pools = {p["name"]: {r["resource"]: r for r in p["resources"]} for p in data["resource-pools"]}
    assert (pools["wide"]["pinned-cpus"]["used"], pools["wide"]["pinned-cpus"]["free"]) == (2, 0)
    assert (pools["wide"]["vms"]["used"], pools["wide"]["vms"]["free"]) == (1, 0)
    assert (pools["narrow"]["pinned-cpus"]["used"], pools["narrow"]["pinned-cpus"]["free"]) == (
        1,
        0,
    )
    assert (pools["narrow"]["memory-mib"]["used"], pools["narrow"]["memory-mib"]["free"]) == (
        256,
        0,
    )
    assert _line(table, "narrow", "(default)", "vms").split()[3:] == ["unlimited", "1", "-"]
    assert _line(table, "wide", "vms").split()[2:] == ["1", "1", "0"]
    # A shared VM fits the host, but the pool's one VM is used: refused, nothing created.
    assert "pool wide: 1 of 1 VMs used, this VM needs 1" in views["refused"], views["refused"]
    assert views["refused-defined"] is False
    # list-vms: nodes, CPUs and pool of each, the off-node mark, and the pool filter.
    assert listed[SPAN]["pool"] == "wide"
    assert listed[NODE2]["pool"] == "narrow"
    vms_table = views["list-vms"]["table"]
    assert _line(vms_table, SPAN).split()[5:7] == ["1,3", "1,3"]
    assert _line(vms_table, NODE2).split()[5:7] == ["2", "2"]
    assert "wide" in _line(vms_table, SPAN).split()
    assert "off-node" in _line(vms_table, NODE2)
    assert "off-node" not in _line(vms_table, SPAN)
    assert wide == [SPAN]

"""Pinned VMs on the 4-node test host, composed through the charm on the real libvirtd.

Two tiny guests boot side by side (one boot wait for both):
- `vmhost-test-span`: the explicit CPU list 1,3 with numa-nodes=2: two guest cells, one on host
  node 1 and one on node 3, each with its planned CPU and half of the memory;
- `vmhost-test-node2`: a pinned count of 1 that the host places itself. CPU 0 is reserved and
  CPUs 1 and 3 are taken by the first VM, so the allocator's only choice is node 2.
The evidence is each guest's own report (CPUs and NUMA nodes it sees) and the host's view
while it ran: vcpupin and the vCPU threads' affinity (taskset -p), numatune and where its
memory lies (numastat -p, numa_maps), the emulator threads' affinity.
"""

from __future__ import annotations

from typing import Any

import pytest
from ops import testing
from tests.host.inside.nested import compose, delete, vcpu_threads, wait_reports

SPAN = "vmhost-test-span"
NODE2 = "vmhost-test-node2"
MEMORY_MIB = 256


@pytest.fixture(scope="module")
def booted(nested_host: dict[str, str]) -> Any:
    """Compose both VMs, wait for both reports; delete them afterwards."""
    import charm

    ctx = testing.Context(charm.VmHostCharm)
    state = testing.State(config=dict(nested_host), leader=True)
    for name in (SPAN, NODE2):
        delete(ctx, state, name)
    try:
        span = compose(
            ctx, state, SPAN, memory=MEMORY_MIB, **{"pinned-cores": "1,3", "numa-nodes": 2}
        )
        node2 = compose(ctx, state, NODE2, memory=MEMORY_MIB, **{"pinned-cores": "1"})
        seen = wait_reports(ctx, state, [SPAN, NODE2])
        yield {SPAN: span | seen[SPAN], NODE2: node2 | seen[NODE2]}
    finally:
        for name in (SPAN, NODE2):
            delete(ctx, state, name)


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

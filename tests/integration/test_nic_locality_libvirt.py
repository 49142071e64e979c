"""NIC locality as list-vms and show-resources report it, through the charm on the real libvirtd.

A pinned VM is composed with one NIC on the test bridge through a mapped space; the bridge
carries an address, so the NIC's subnet is known. What the actions say about the NIC (its host
device, that device's NUMA nodes, the off-node mark) and about the host's NICs (node, link,
speed) is checked against this machine's sysfs, read here independently of vm-host.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from ops import testing

import charm
from vmhost.networks import find_ip_binary

pytestmark = pytest.mark.integration

VM = "vmhost-test-nicnode"
SPACE = "test-data"
ADDRESS = "10.231.88.1/24"
SUBNET = "10.231.88.0/24"
IP = find_ip_binary() or "/usr/sbin/ip"
NET = Path("/sys/class/net")


def sysfs_node(name: str) -> int | None:
    """The NUMA node sysfs gives a device (its PCI function's for virtio), None for none."""
    device = NET / name / "device"
    for path in (device / "numa_node", device / ".." / "numa_node"):
        try:
            node = int(path.read_text())
        except (OSError, ValueError):
            continue
        return node if node >= 0 else None
    return None


def sysfs_nodes_below(name: str) -> list[int]:
    """The nodes of the hardware below a device, sorted.

    Its own, else its lower devices' (bridge and bond ports, a VLAN's parent: the kernel links
    each as lower_NAME), recursively.
    """
    own = sysfs_node(name)
    if own is not None:
        return [own]
    nodes: set[int] = set()
    for lower in (NET / name).glob("lower_*"):
        nodes.update(sysfs_nodes_below(lower.name.removeprefix("lower_")))
    return sorted(nodes)


def sysfs_speed(name: str) -> int | None:
    try:
        speed = int((NET / name / "speed").read_text())
    except (OSError, ValueError):
        return None
    return speed if speed > 0 else None


@pytest.fixture
def addressed_bridge(test_bridge: str) -> str:
    """The test bridge with an address (it goes with the bridge, which test_bridge deletes)."""
    subprocess.run([IP, "addr", "add", ADDRESS, "dev", test_bridge], check=True)
    return test_bridge


@pytest.fixture
def state(test_pool: str, clean_host: None, addressed_bridge: str) -> testing.State:
    config = {
        "default-storage-pool": test_pool,
        "default-image": "",
        "networks": f"{SPACE}: {{bridge: {addressed_bridge}}}",
    }
    return testing.State(config=config, leader=True)


@pytest.fixture
def run(charm_type: type[charm.VmHostCharm]):
    """Run one action of the charm (with the tests' host layout) and return its results."""

    def action(state: testing.State, action: str, **params: object) -> dict[str, str]:
        ctx = testing.Context(charm_type)
        ctx.run(ctx.on.action(action, params=params), state)
        return ctx.action_results or {}

    return action


def test_vm_nic_attachment_and_node_as_sysfs_says(run, state, addressed_bridge):
    composed = run(
        state,
        "compose-vm",
        name=VM,
        memory=128,
        interfaces=f"eth0:space={SPACE}",
        **{"pinned-cores": "1", "storage": "root:1"},
    )
    vm_nodes = json.loads(composed["placement"])["numa-nodes"]
    assert len(vm_nodes) == 1
    nodes = sysfs_nodes_below(addressed_bridge)
    off_node = bool(nodes) and not set(nodes) <= set(vm_nodes)

    listed = json.loads(run(state, "list-vms")["json"])
    (eth0,) = next(vm for vm in listed if vm["name"] == VM)["interfaces"]
    assert eth0["attached-to"] == addressed_bridge
    assert eth0["host-device"] == addressed_bridge
    assert eth0["numa-nodes"] == nodes
    assert eth0["off-node"] is off_node
    assert (eth0["space"], eth0["subnet"]) == (SPACE, SUBNET)
    table = run(state, "list-vms")["table"]
    node_text = ",".join(map(str, nodes)) or "-"
    assert f"eth0>{addressed_bridge}({node_text}{',off-node' if off_node else ''})" in table

    resources = run(state, "show-resources")
    data = json.loads(resources["json"])
    (row,) = [n for n in data["vm-nics"] if n["vm"] == VM]
    assert (row["host-device"], row["numa-nodes"], row["vm-nodes"]) == (
        addressed_bridge,
        nodes,
        vm_nodes,
    )
    assert (row["off-node"], row["space"], row["subnet"]) == (off_node, SPACE, SUBNET)
    assert f"{VM}  eth0  {addressed_bridge}" in resources["table"]

    # Every PCI NIC of the host is a row, with sysfs's node, operstate and speed.
    hardware = sorted(p.name for p in NET.iterdir() if (p / "device").exists())
    rows = {n["name"]: n for n in data["nics"]}
    for name in hardware:
        if (NET / name / "device" / "physfn").exists():
            continue  # a VF is counted on its PF
        assert rows[name]["numa-node"] == sysfs_node(name), name
        assert rows[name]["link"] == (NET / name / "operstate").read_text().strip(), name
        assert rows[name]["speed-mbps"] == sysfs_speed(name), name

    run(state, "delete-vm", name=VM)

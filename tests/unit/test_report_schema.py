"""show-resources and list-vms JSON against the schemas in schemas/, which document them.

Real output is validated: report's functions on the repository's fixtures with VMs of every
shape (pinned and spanning, huge pages, shared with no cells, an off-node NIC, an SR-IOV VF,
a VM vm-host did not create), and the charm's own action results over the fake backend.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from fake_sysfs import FakeSys
from ops import testing
from tests.fixtures import LIBVIRT_CAPS

from vmhost import report
from vmhost.model import (
    PAGE_2M_KIB,
    CellPlacement,
    HostTopology,
    Placement,
    Policy,
    StoragePool,
    VfAssignment,
    VmRecord,
    VmState,
)
from vmhost.topology import parse_capabilities

POLICY = Policy()
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def schema(name: str) -> dict[str, Any]:
    document = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(document)
    return document


def validate(data: object, name: str) -> None:
    jsonschema.Draft202012Validator(schema(name)).validate(data)


def host(tmp_path: Path, fixture: str) -> HostTopology:
    """A fixture host whose NICs (a bridge over a bond, an SR-IOV PF) are on its last node."""
    topology = parse_capabilities((LIBVIRT_CAPS / fixture).read_text())
    nic_node = topology.nodes[-1].id
    sys = FakeSys(tmp_path)
    sys.nic("br-ext", bridge=True, operstate="up")
    sys.nic("eno1", pci=True, numa=nic_node, operstate="up", speed=10000, master="bond0")
    sys.nic("eno2", pci=True, numa=nic_node, operstate="down", master="bond0")
    sys.nic("bond0", bonding=True, master="br-ext", operstate="up", speed=10000)
    sys.nic(
        "enp65s0f0", pci=True, numa=nic_node, total_vfs=8, num_vfs=4, operstate="up", speed=25000
    )
    sys.nic("enp65s0f0v0", pci=True, numa=nic_node, physfn="enp65s0f0")
    sys.nic("eth9", pci=True, numa=-1)
    pool = StoragePool("default", capacity_bytes=10**11, allocation_bytes=10**9)
    return dataclasses.replace(topology, nics=sys.discover(), pools=(pool,))


def cell(topology: HostTopology, node: int, cpu: int) -> CellPlacement:
    """One pinned vCPU and 128 MiB on a node.

    The memory comes from 2M pages where the node has some (the 4-node fixture's memory is
    all huge pages).
    """
    pages = topology.node(node).hugepages_total.get(PAGE_2M_KIB, 0) > 0
    return CellPlacement(
        node,
        1,
        128,
        cpus=(cpu,),
        hugepage_size_kib=PAGE_2M_KIB if pages else None,
        hugepages=64 if pages else 0,
    )


def vms(topology: HostTopology) -> list[VmRecord]:
    """VMs of every shape, on the host's first and last nodes.

    One pinned on both (spanning, where they differ), one pinned on the first holding a VF of
    the PF on the last (off-node, likewise), a shared one without cells, and a VM vm-host did
    not create.
    """
    first, last = topology.nodes[0], topology.nodes[-1]
    spanning = (cell(topology, first.id, first.cpu_ids[-1]),)
    if last is not first:
        spanning += (cell(topology, last.id, last.cpu_ids[-1]),)
    off_node = (cell(topology, first.id, first.cpu_ids[-3]),)
    nic = {"label": "eth0", "mac": "52:54:00:00:00:01", "attached-to": "br-ext"}
    return [
        VmRecord(
            name="spanning",
            uuid="u1",
            state=VmState.RUNNING,
            placement=Placement(
                vcpus=len(spanning), memory_mib=128 * len(spanning), cells=spanning
            ),
            interfaces=({**nic, "space": "data", "subnet": "10.0.5.0/24", "ip": "10.0.5.9/24"},),
            tags=("db",),
            volumes=("default/spanning-root",),
            autostart=True,
        ),
        VmRecord(
            name="off-node",
            uuid="u2",
            state=VmState.STOPPED,
            placement=Placement(
                vcpus=1, memory_mib=128, cells=off_node, vfs=(VfAssignment("enp65s0f0"),)
            ),
            interfaces=(
                nic,
                {
                    "label": "fast",
                    "mac": "52:54:00:00:00:02",
                    "attached-to": "enp65s0f0/vf0 (0000:41:00.2)",
                },
            ),
        ),
        VmRecord(
            name="floating",
            uuid="u3",
            state=VmState.FAILED,
            placement=Placement(vcpus=1, memory_mib=128),  # shared, no cells
            interfaces=(nic,),
            state_reason="crashed",
        ),
        VmRecord(
            name="foreign",
            uuid="u4",
            state=VmState.RUNNING,
            placement=Placement(vcpus=1, memory_mib=128),
            owner="",
            managed=False,
            problem="its vm-host metadata is unreadable",
        ),
    ]


@pytest.mark.parametrize(
    "fixture",
    ["x86-1node-4core-nosmt.xml", "x86-2node-smt-24cpu.xml", "x86-4node-nosmt-hugepages.xml"],
)
def test_real_output_matches_the_schemas(tmp_path: Path, fixture: str):
    topology = host(tmp_path, fixture)
    records = vms(topology)
    data = report.resources_json(topology, records, POLICY)
    validate(data, "show-resources")
    validate(json.loads(json.dumps(data)), "show-resources")  # as the action sends it
    validate([report.vm_json(vm, topology.nics) for vm in records], "list-vms")
    # The cases the schema describes are really in the output validated.
    marks = {(n["vm"], n["label"]): n["off-node"] for n in data["vm-nics"]}
    assert marks[("floating", "eth0")] is False
    assert marks[("spanning", "eth0")] is False  # its cells include the NICs' node
    several = len(topology.nodes) > 1
    assert marks[("off-node", "eth0")] is several
    assert marks[("off-node", "fast")] is several
    spans = {v["name"]: v["spans"] for n in data["nodes"] for v in n["vm-usage"]}
    assert spans["spanning"] is several


def test_the_schemas_refuse_what_they_do_not_document(tmp_path: Path):
    topology = host(tmp_path, "x86-2node-smt-24cpu.xml")
    data = report.resources_json(topology, vms(topology), Policy())
    data["vm-nics"][0]["undocumented"] = 1
    with pytest.raises(jsonschema.ValidationError, match="undocumented"):
        validate(data, "show-resources")
    data = report.resources_json(topology, vms(topology), Policy())
    data["nics"][0]["numa-node"] = "0"
    with pytest.raises(jsonschema.ValidationError):
        validate(data, "show-resources")
    listed = [report.vm_json(vm, topology.nics) for vm in vms(topology)]
    del listed[0]["interfaces"][0]["off-node"]
    with pytest.raises(jsonschema.ValidationError, match="off-node"):
        validate(listed, "list-vms")


def test_the_charms_action_results_match_the_schemas(ctx, backend, fake_host):
    state = testing.State(leader=True)
    params = {"name": "db-0", "memory": 512, "pinned-cores": "2"}
    ctx.run(ctx.on.action("compose-vm", params=params), state)
    ctx.run(ctx.on.action("show-resources"), state)
    validate(json.loads((ctx.action_results or {})["json"]), "show-resources")
    ctx.run(ctx.on.action("list-vms"), state)
    listed = json.loads((ctx.action_results or {})["json"])
    assert [vm["name"] for vm in listed] == ["db-0"]
    validate(listed, "list-vms")

"""The wire shapes of topologies and placements, pinned: peer reports and the LXD ledger.

Every unit reads the other units' host reports, and the LXD backend reads back the placement
it wrote into each instance's config; units of different revisions share a relation, and an
upgraded charm reads instances an older one made. So the encoded forms never change by
accident: tests/fixtures/codec holds what codec.py wrote at the commit that added these tests
(placements, topologies, the exact LXD ledger value and peer report text) and documents older
writers produced (keys added since missing). Never regenerate the files to make a test pass:
a difference is a wire format change, which needs a version and a reader for the old form.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from codec_records import PLACEMENTS, TOPOLOGIES
from tests.fixtures import FIXTURES

from vmhost.backends import lxd
from vmhost.codec import (
    placement_from_dict,
    placement_to_dict,
    topology_from_dict,
    topology_to_dict,
)
from vmhost.model import (
    CellPlacement,
    Cpu,
    HostNic,
    HostTopology,
    NicKind,
    NumaNode,
    Placement,
    StoragePool,
    VfAssignment,
)
from vmhost.relation import fleet

GOLDEN = FIXTURES / "codec"


def _golden(name: str):
    return json.loads((GOLDEN / name).read_text())


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_a_placement_is_written_exactly_as_before_and_reads_back(name: str):
    golden = _golden(f"placement-{name}.json")
    assert placement_to_dict(PLACEMENTS[name]) == golden
    assert placement_from_dict(golden) == PLACEMENTS[name]


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_a_topology_is_written_exactly_as_before_and_reads_back(name: str):
    golden = _golden(f"topology-{name}.json")
    assert topology_to_dict(TOPOLOGIES[name]()) == golden
    assert topology_from_dict(golden) == TOPOLOGIES[name]()


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_the_lxd_ledger_value_is_the_same_text(name: str):
    """user.vm-host.placement as an LXD instance's config holds it."""
    text = _golden("lxd-ledger-placement.json")[name]
    assert lxd._json(placement_to_dict(PLACEMENTS[name])) == text
    assert placement_from_dict(json.loads(text), lxd.KEY_PLACEMENT) == PLACEMENTS[name]


def test_the_peer_report_is_the_same_text_and_reads_back():
    text = (GOLDEN / "peer-report-x86-2node-smt-24cpu.txt").read_text().rstrip("\n")
    topology = TOPOLOGIES["x86-2node-smt-24cpu"]()
    written = fleet.host_report(
        topology, list(PLACEMENTS.values()), hostname="host-a", macs={"52:54:00:00:00:01"}
    )
    assert written == text
    report, problem = fleet.parse_host_report(text)
    assert problem is None
    assert report is not None
    assert report.topology == topology
    assert sorted(report.allocations, key=repr) == sorted(PLACEMENTS.values(), key=repr)


OLD = {
    "placement-before-vfs-and-emulator": Placement(
        vcpus=2, memory_mib=1024, cells=(CellPlacement(1, 2, 1024, (3, 15)),)
    ),
    "placement-vf-without-count": Placement(
        vcpus=1, memory_mib=512, vfs=(VfAssignment("enp65s0f0", 1),)
    ),
    "placement-only-totals": Placement(vcpus=1, memory_mib=256),
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_placements_older_writers_left_still_read(name: str):
    assert placement_from_dict(_golden("old-writers.json")[name]) == OLD[name]


def test_topologies_older_writers_left_still_read():
    old = _golden("old-writers.json")
    assert topology_from_dict(old["topology-before-nics-and-pools"]) == HostTopology(
        nodes=(
            NumaNode(
                id=0,
                cpus=(Cpu(0, 0, 0, 0, (0, 2)), Cpu(2, 0, 0, 0, (0, 2))),
                memory_kib=8388608,
                hugepages_total={2048: 16},
                distances={0: 10, 1: 21},
            ),
            NumaNode(id=1, memory_kib=4194304),
        )
    )
    assert topology_from_dict(old["topology-old-nic-and-pool"]) == HostTopology(
        nodes=(NumaNode(id=0),),
        nics=(
            HostNic("eth0", numa_node=0, sriov_total_vfs=4, mac="aa:bb:cc:dd:ee:ff"),
            HostNic("br0", kind=NicKind.BRIDGE),
        ),
        pools=(StoragePool("default", capacity_bytes=1000, available_bytes=600),),
        arch="aarch64",
        hypervisor="lxd",
        hypervisor_version="5.0.2",
    )


def test_a_placement_read_from_the_ledger_is_the_records_own_types():
    """Read back, every field is the record's type (tuples, ints), not JSON's lists."""
    got = placement_from_dict(_golden("placement-pinned.json"))
    assert isinstance(got.cells, tuple)
    assert isinstance(got.cells[0].cpus, tuple)
    assert isinstance(got.emulator_cpus, tuple)
    assert isinstance(got.vfs[0], VfAssignment)
    assert hash(got) == hash(replace(got))

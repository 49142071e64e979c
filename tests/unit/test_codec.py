"""The JSON codec of topologies and placements: exact round trips and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmhost.codec import (
    CodecError,
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
from vmhost.topology import parse_capabilities

small = st.integers(min_value=0, max_value=1 << 20)
big = st.integers(min_value=0, max_value=1 << 62)
text = st.text(max_size=12)
page_sizes = st.sampled_from([4, 64, 2048, 32768, 1048576])


@st.composite
def placements(draw: st.DrawFn) -> Placement:
    cells = draw(
        st.lists(
            st.builds(
                CellPlacement,
                host_node=small,
                vcpus=small,
                memory_mib=small,
                cpus=st.lists(small, max_size=6).map(tuple),
                hugepage_size_kib=st.none() | page_sizes,
                hugepages=small,
            ),
            max_size=4,
        )
    )
    return Placement(
        vcpus=draw(small),
        memory_mib=draw(small),
        cells=tuple(cells),
        emulator_cpus=tuple(draw(st.lists(small, max_size=4))),
        vfs=tuple(draw(st.lists(st.builds(VfAssignment, nic=text, count=small), max_size=3))),
    )


@st.composite
def topologies(draw: st.DrawFn) -> HostTopology:
    node_ids = draw(st.lists(small, min_size=1, max_size=4, unique=True))
    cpu_ids = iter(draw(st.lists(small, min_size=0, max_size=24, unique=True)))
    nodes = []
    for node_id in node_ids:
        cpus = []
        for _ in range(draw(st.integers(0, 6))):
            cpu_id = next(cpu_ids, None)
            if cpu_id is None:
                break
            cpus.append(
                Cpu(
                    id=cpu_id,
                    socket_id=draw(small),
                    die_id=draw(small),
                    core_id=draw(small),
                    siblings=tuple(draw(st.lists(small, max_size=4))),
                )
            )
        nodes.append(
            NumaNode(
                id=node_id,
                cpus=tuple(cpus),
                memory_kib=draw(big),
                hugepages_total=draw(st.dictionaries(page_sizes, small, max_size=3)),
                hugepages_free=draw(st.dictionaries(page_sizes, small, max_size=3)),
                distances=draw(st.dictionaries(small, small, max_size=4)),
            )
        )
    nics = draw(
        st.lists(
            st.builds(
                HostNic,
                name=text,
                kind=st.sampled_from(list(NicKind)),
                numa_node=st.none() | small,
                sriov_total_vfs=small,
                sriov_enabled_vfs=small,
                mac=st.none() | text,
                addresses=st.lists(text, max_size=3).map(tuple),
                vlan_id=st.none() | small,
                parent=st.none() | text,
                master=st.none() | text,
            ),
            max_size=3,
        )
    )
    pools = draw(
        st.lists(
            st.builds(
                StoragePool,
                name=text,
                driver=text,
                capacity_bytes=big,
                allocation_bytes=big,
                available_bytes=big,
                path=st.none() | text,
                active=st.booleans(),
            ),
            max_size=3,
        )
    )
    return HostTopology(
        nodes=tuple(nodes),
        nics=tuple(nics),
        pools=tuple(pools),
        arch=draw(text),
        hypervisor=draw(text),
        hypervisor_version=draw(text),
    )


@given(placements())
def test_placement_round_trip_through_json_is_exact(placement: Placement):
    data = json.loads(json.dumps(placement_to_dict(placement)))
    assert placement_from_dict(data) == placement


@given(topologies())
def test_topology_round_trip_through_json_is_exact(topology: HostTopology):
    data = json.loads(json.dumps(topology_to_dict(topology)))
    assert topology_from_dict(data) == topology


@given(topologies())
def test_topology_encoding_is_deterministic(topology: HostTopology):
    assert json.dumps(topology_to_dict(topology)) == json.dumps(topology_to_dict(topology))


@pytest.mark.parametrize(
    "name",
    [
        "x86-2node-smt-24cpu.xml",
        "x86-2node-dies-smt-hugepages.xml",
        "x86-2node-memory-only-node.xml",
        "aarch64-2node-160cpu.xml",
    ],
)
def test_real_host_topologies_round_trip_and_stay_small(fixtures_dir: Path, name: str):
    topology = parse_capabilities((fixtures_dir / "libvirt-caps" / name).read_text())
    encoded = json.dumps(topology_to_dict(topology), separators=(",", ":"))
    assert topology_from_dict(json.loads(encoded)) == topology
    # Peer databags hold it: a 160-CPU host stays a few KiB.
    assert len(encoded) < 60 * len(topology.cpus) + 2000


def test_cpu_is_the_compact_five_item_form():
    topology = HostTopology(
        nodes=(
            NumaNode(id=0, cpus=(Cpu(id=3, socket_id=1, die_id=2, core_id=5, siblings=(3, 7)),)),
        )
    )
    assert topology_to_dict(topology)["nodes"][0]["cpus"] == [[3, 1, 2, 5, [3, 7]]]


def test_unknown_keys_are_ignored_for_newer_writers():
    placement = Placement(vcpus=2, memory_mib=512, cells=(CellPlacement(0, 2, 512, (1, 2)),))
    data = placement_to_dict(placement)
    data["future-field"] = {"x": 1}
    data["cells"][0]["future"] = True
    assert placement_from_dict(data) == placement


def _topology_data() -> dict[str, Any]:
    return topology_to_dict(
        HostTopology(
            nodes=(
                NumaNode(
                    id=0,
                    cpus=(Cpu(id=0), Cpu(id=1)),
                    memory_kib=1 << 20,
                    hugepages_total={2048: 4},
                    distances={0: 10},
                ),
            ),
            nics=(HostNic(name="eth0"),),
            pools=(StoragePool(name="default"),),
        )
    )


def _set(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        (("nodes",), "x", "topology.nodes"),
        (("nodes", 0, "id"), True, "topology.nodes[0].id"),
        (("nodes", 0, "id"), -1, "topology.nodes[0].id"),
        (("nodes", 0, "cpus", 0), [0, 0, 0], "topology.nodes[0].cpus[0]"),
        (("nodes", 0, "cpus", 1, 0), 0, "topology.nodes"),
        (("nodes", 0, "memory-kib"), 1.5, "topology.nodes[0].memory-kib"),
        (("nodes", 0, "hugepages-total"), {"2048": 4}, "topology.nodes[0].hugepages-total"),
        (("nodes", 0, "hugepages-total", 0), [2048], "topology.nodes[0].hugepages-total[0]"),
        (("nodes", 0, "hugepages-total", 0, 0), 0, "topology.nodes[0].hugepages-total[0][0]"),
        (("nics", 0, "kind"), "wifi", "topology.nics[0].kind"),
        (("nics", 0, "name"), None, "topology.nics[0].name"),
        (("pools", 0, "active"), "yes", "topology.pools[0].active"),
    ],
)
def test_bad_topology_is_refused_naming_the_path(path: tuple[Any, ...], value: Any, where: str):
    data = _set(_topology_data(), path, value)
    with pytest.raises(CodecError) as err:
        topology_from_dict(data)
    assert err.value.path == where


def test_duplicate_distance_keys_are_refused():
    data = _topology_data()
    data["nodes"][0]["distances"] = [[0, 10], [0, 20]]
    with pytest.raises(CodecError, match="appears twice"):
        topology_from_dict(data)


def test_duplicate_node_ids_are_refused():
    data = _topology_data()
    data["nodes"].append({**data["nodes"][0], "cpus": []})
    with pytest.raises(CodecError, match="two nodes share an id"):
        topology_from_dict(data)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ([], "placement"),
        ({"memory-mib": 1}, "placement.vcpus"),
        ({"vcpus": 1, "memory-mib": "1"}, "placement.memory-mib"),
        ({"vcpus": 1, "memory-mib": 1, "cells": [{"host-node": 0}]}, "placement.cells[0].vcpus"),
        (
            {
                "vcpus": 1,
                "memory-mib": 1,
                "cells": [{"host-node": 0, "vcpus": 1, "memory-mib": 1, "cpus": [True]}],
            },
            "placement.cells[0].cpus[0]",
        ),
        (
            {
                "vcpus": 1,
                "memory-mib": 1,
                "cells": [{"host-node": 0, "vcpus": 1, "memory-mib": 1, "hugepage-size-kib": 0}],
            },
            "placement.cells[0].hugepage-size-kib",
        ),
        ({"vcpus": 1, "memory-mib": 1, "vfs": [{"count": 1}]}, "placement.vfs[0].nic"),
    ],
)
def test_bad_placement_is_refused_naming_the_path(data: Any, where: str):
    with pytest.raises(CodecError) as err:
        placement_from_dict(data)
    assert err.value.path == where
    assert isinstance(err.value, ValueError)

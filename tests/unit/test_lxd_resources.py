"""LXD `GET /1.0/resources` parsing, on every fixture and on hand-made edge cases."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.fixtures import LXD_RESOURCES, extra

from vmhost.backends.lxd_resources import parse_network, parse_resources
from vmhost.model import NicKind

FIXTURES = LXD_RESOURCES
EXTRA = extra("lxd-resources", "*.json")
LENOVO = "aarch64-1node-sriov-dualport.json"
RPI4 = "aarch64-1node-no-numa.json"
SAMPLE = "x86-2node-smt-sriov.json"
IXGBE = "network-sriov-infiniband.fragment.json"
THUNDERX = "network-vfs.fragment.json"


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def test_every_fixture_is_covered() -> None:
    names = sorted(p.name for p in FIXTURES.glob("*.json"))
    assert names == sorted([LENOVO, RPI4, SAMPLE, IXGBE, THUNDERX])


@pytest.mark.parametrize("name", [LENOVO, RPI4, SAMPLE])
def test_whole_documents_parse_consistently(name: str) -> None:
    doc = load(name)
    topo = parse_resources(doc)
    assert topo.hypervisor == "lxd"
    assert topo.arch == doc["cpu"]["architecture"]
    assert len(topo.cpus) == doc["cpu"]["total"]
    for node in topo.nodes:
        for cpu in node.cpus:
            assert cpu.id in cpu.siblings
            assert all(topo.node_of_cpu(s) == node.id for s in cpu.siblings)
    assert sum(n.memory_kib for n in topo.nodes) <= doc["memory"]["total"] // 1024


def test_lenovo_aarch64_one_node_socket_36_sriov_on_first_port() -> None:
    topo = parse_resources(load(LENOVO))
    assert [n.id for n in topo.nodes] == [0]
    (cpu,) = topo.nodes[0].cpus
    assert (cpu.id, cpu.socket_id, cpu.core_id, cpu.siblings) == (0, 36, 0, (0,))
    assert topo.nodes[0].memory_kib == 269430067200 // 1024
    assert topo.nodes[0].hugepages_total == {2048: 0}
    assert topo.nodes[0].hugepages_free == {2048: 0}
    first, second = topo.nics
    assert (first.name, first.sriov_total_vfs, first.sriov_enabled_vfs) == ("enP3p1s0", 8, 0)
    # Both ports are one PCI function: its VFs are counted once.
    assert (second.name, second.sriov_total_vfs) == ("enP3p1s0d1", 0)
    assert first.mac == "50:6b:4b:7f:98:20"
    assert first.numa_node == second.numa_node == 0


def test_rpi4_without_memory_nodes_is_one_node_with_all_memory() -> None:
    doc = load(RPI4)
    topo = parse_resources(doc)
    (node,) = topo.nodes
    assert node.id == 0
    assert node.memory_kib == doc["memory"]["total"] // 1024 == 3882416
    assert node.hugepages_total == {}  # hugepages_size 0: no huge pages at all
    assert node.cpu_ids == (0, 1, 2, 3)
    assert all(c.siblings == (c.id,) for c in node.cpus)
    assert [n.name for n in topo.nics] == ["eth0", "wlan0"]
    assert all(n.sriov_total_vfs == 0 for n in topo.nics)


def test_two_node_sample_siblings_nodes_and_nics() -> None:
    topo = parse_resources(load(SAMPLE))
    assert [n.id for n in topo.nodes] == [0, 1]
    assert topo.nodes[0].cpu_ids == (0, 1, 2, 3)
    assert topo.nodes[1].cpu_ids == (4, 5, 6, 7)
    cpus = topo.cpus
    assert cpus[0].siblings == cpus[1].siblings == (0, 1)
    assert cpus[6].siblings == (6, 7)
    assert cpus[6].core_id == 3
    assert len({c.core_key for c in cpus.values()}) == 4
    assert all(n.memory_kib == 8345759744 // 1024 for n in topo.nodes)
    nics = {n.name: n for n in topo.nics}
    assert {k: (v.numa_node, v.sriov_total_vfs) for k, v in nics.items()} == {
        "eth0": (0, 8),
        "eth1": (1, 0),
        "eth2": (0, 0),
    }


def test_ixgbe_fragment_skips_infiniband_ports() -> None:
    nics = parse_network(load(IXGBE)["network"])
    assert [(n.name, n.sriov_total_vfs, n.sriov_enabled_vfs) for n in nics] == [
        ("eno1", 63, 0),
        ("eno2", 63, 0),
        ("idrac", 0, 0),
    ]
    assert all(n.kind is NicKind.PHYSICAL and n.numa_node == 0 for n in nics)


def test_thunderx_fragment_lists_the_vfs() -> None:
    doc = load(THUNDERX)
    nics = parse_network(doc["network"])
    vf_cards = [c for c in doc["network"]["cards"] if c.get("sriov")]
    listed = [p["id"] for c in vf_cards for vf in c["sriov"]["vfs"] for p in vf["ports"]]
    assert len(listed) == 5
    assert [n.name for n in nics] == sorted(listed)
    assert all(n.kind is NicKind.VF and n.numa_node == 0 for n in nics)
    # The PF has no netdev of its own in this sample, so the VFs name no parent.
    assert all(n.parent is None for n in nics)
    assert nics[0].mac == "1c:1b:0d:00:00:10"


def test_vf_parent_is_the_first_port_of_its_card() -> None:
    doc = load(SAMPLE)
    card = copy.deepcopy(doc["network"]["cards"][0])
    card["sriov"] = {
        "current_vfs": 1,
        "maximum_vfs": 8,
        "vfs": [{"numa_node": 0, "ports": [{"id": "eth0v0", "address": "02:00:00:00:00:09"}]}],
    }
    nics = {n.name: n for n in parse_network({"cards": [card]})}
    assert nics["eth0v0"].kind is NicKind.VF
    assert nics["eth0v0"].parent == "eth0"
    assert nics["eth0"].sriov_enabled_vfs == 1


def test_threads_without_numa_node_offline_threads_and_missing_core_ids() -> None:
    doc = {
        "cpu": {
            "architecture": "x86_64",
            "sockets": [
                {
                    "socket": 0,
                    "cores": [
                        {"core": 0, "threads": [{"id": 0}, {"id": 4, "online": False}]},
                        {"threads": [{"id": 1}, {"id": 5}]},
                    ],
                }
            ],
        },
        "memory": {
            "total": 4 << 30,
            "hugepages_size": 2 << 20,
            "hugepages_total": 10,
            "hugepages_used": 3,
        },
    }
    topo = parse_resources(doc)
    (node,) = topo.nodes
    assert node.cpu_ids == (0, 1, 5)
    cpus = topo.cpus
    assert cpus[0].siblings == (0,)  # the offline sibling cannot be pinned
    assert cpus[1].core_id == 1
    assert cpus[5].core_id == 1
    assert cpus[1].siblings == (1, 5)
    assert node.hugepages_total == {2048: 10}
    assert node.hugepages_free == {2048: 7}
    assert node.memory_kib == 4 << 20


def test_per_node_hugepages_and_memory_only_node() -> None:
    doc = {
        "cpu": {
            "sockets": [{"cores": [{"core": 0, "die": 2, "threads": [{"id": 0, "numa_node": 0}]}]}]
        },
        "memory": {
            "hugepages_size": 1 << 30,
            "nodes": [
                {"numa_node": 0, "total": 8 << 30, "hugepages_total": 2, "hugepages_used": 1},
                {"numa_node": 1, "total": 8 << 30, "hugepages_total": 4, "hugepages_used": 0},
            ],
        },
    }
    topo = parse_resources(doc)
    assert topo.cpus[0].die_id == 2
    assert [(n.id, n.cpu_ids, n.hugepages_total, n.hugepages_free) for n in topo.nodes] == [
        (0, (0,), {1048576: 2}, {1048576: 1}),
        (1, (), {1048576: 4}, {1048576: 4}),
    ]
    assert topo.arch == "x86_64"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "no cpu section"),
        ({"cpu": {"sockets": {}}}, "cpu.sockets is not a list"),
        ({"cpu": {"sockets": [{"cores": [{"threads": [{"numa_node": 0}]}]}]}}, "missing"),
        ({"cpu": {"sockets": [{"cores": [{"threads": [{"id": "0"}]}]}]}}, "not an integer"),
        (
            {
                "cpu": {
                    "sockets": [{"cores": [{"threads": [{"id": 0}]}, {"threads": [{"id": 0}]}]}]
                }
            },
            "appears twice",
        ),
    ],
)
def test_bad_documents_are_refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_resources(doc)


@st.composite
def resources_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Documents shaped like LXD's: sockets of cores of threads, some offline, some nodeless."""
    next_id = 0
    sockets = []
    for socket_id in range(draw(st.integers(1, 2))):
        cores = []
        for core_id in range(draw(st.integers(1, 4))):
            threads = []
            for _ in range(draw(st.integers(1, 2))):
                thread: dict[str, Any] = {"id": next_id, "online": draw(st.booleans())}
                if draw(st.booleans()):
                    thread["numa_node"] = draw(st.integers(0, 3))
                threads.append(thread)
                next_id += 1
            cores.append({"core": core_id, "threads": threads})
        sockets.append({"socket": socket_id, "cores": cores})
    nodes = [
        {
            "numa_node": n,
            "total": draw(st.integers(0, 1 << 40)),
            "hugepages_total": 4,
            "hugepages_used": draw(st.integers(0, 6)),
        }
        for n in sorted(draw(st.sets(st.integers(0, 3), max_size=4)))
    ]
    memory: dict[str, Any] = {"total": 1 << 34, "hugepages_size": 2 << 20}
    if nodes:
        memory["nodes"] = nodes
    return {"cpu": {"architecture": "x86_64", "sockets": sockets}, "memory": memory}


@given(resources_docs())
def test_property_every_online_thread_once_with_consistent_siblings(doc: dict[str, Any]) -> None:
    topo = parse_resources(doc)
    online = {
        t["id"]
        for s in doc["cpu"]["sockets"]
        for c in s["cores"]
        for t in c["threads"]
        if t["online"]
    }
    assert set(topo.cpus) == online
    assert sum(len(n.cpus) for n in topo.nodes) == len(online)
    for cpu in topo.cpus.values():
        assert all(topo.cpus[s].siblings == cpu.siblings for s in cpu.siblings)
        assert all(topo.cpus[s].core_key == cpu.core_key for s in cpu.siblings)
    ids = [n.id for n in topo.nodes]
    assert ids == sorted(set(ids))
    for node in topo.nodes:
        assert 0 <= node.hugepages_free.get(2048, 0) <= node.hugepages_total.get(2048, 0)


@pytest.mark.parametrize("path", EXTRA, ids=lambda p: p.name)
def test_extra_corpus_parses(path: Path) -> None:
    doc = json.loads(path.read_text())
    if "cpu" not in doc:  # a network-only fragment
        nics = parse_network(doc["network"])
        assert len({n.name for n in nics}) == len(nics)
        return
    topo = parse_resources(doc)
    assert len(topo.cpus) == doc["cpu"]["total"]
    assert sum(n.memory_kib for n in topo.nodes) <= doc["memory"]["total"] // 1024

"""Tests for the host topology parser and the sysfs huge page readers."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.fixtures import LIBVIRT_CAPS, extra

from vmhost.model import HostTopology, NumaNode
from vmhost.topology import (
    apply_free_hugepages,
    format_cpu_list,
    parse_capabilities,
    parse_cpu_list,
    read_free_hugepages,
    read_total_hugepages,
)

CAPS_DIR = LIBVIRT_CAPS
CAPS_FILES = sorted(CAPS_DIR.glob("*.xml"))
EXTRA_CAPS = extra("libvirt-caps", "*.xml")
"""The optional extra corpus: shape-independent checks run over it too."""
G1 = 1048576
M2 = 2048

# Facts per fixture, from fixtures/README.md and from reading each XML by hand.
# cpus: node id -> cpu-list; memory: node id -> KiB; huge: node id -> {size KiB: total};
# smt: threads per core (len(siblings)) of every CPU; sockets/dies: (socket, die) pairs per node;
# distances: node id -> {node: distance}, {} when the document has no <distances>.
EXPECTED: dict[str, dict[str, Any]] = {
    "x86-4node-nosmt-hugepages.xml": {
        "arch": "x86_64",
        "cpus": {0: "0-3", 1: "4-7", 2: "8-11", 3: "12-15"},
        "memory": {0: 1048576, 1: 2097152, 2: 3145728, 3: 4194304},
        "huge": {
            0: {M2: 4096, G1: 6144},
            1: {M2: 6144, G1: 8192},
            2: {M2: 8192, G1: 10240},
            3: {M2: 10240, G1: 12288},
        },
        "smt": 1,
        "dies": {0: {(0, 0)}, 1: {(1, 0)}, 2: {(2, 0)}, 3: {(3, 0)}},
        "distances": {0: {}, 1: {}, 2: {}, 3: {}},
    },
    "x86-2node-dies-smt-hugepages.xml": {
        "arch": "x86_64",
        "cpus": {0: "0-15,32-47", 1: "16-31,48-63"},
        "memory": {0: 1048576, 1: 2097152},
        "huge": {0: {M2: 4096, G1: 6144}, 1: {M2: 6144, G1: 8192}},
        "smt": 2,
        "sibling_offset": 32,
        "dies": {0: {(0, 0), (0, 1), (0, 2), (0, 3)}, 1: {(1, 4), (1, 5), (1, 6), (1, 7)}},
        "distances": {0: {}, 1: {}},
    },
    "x86-2node-memory-only-node.xml": {
        "arch": "x86_64",
        "cpus": {0: "0-23", 1: ""},
        "memory": {0: 1048576, 1: 2097152},
        "huge": {0: {M2: 4096, G1: 6144}, 1: {M2: 6144, G1: 8192}},
        "smt": 1,
        "dies": {0: {(s, 0) for s in range(24)}, 1: set()},
        "distances": {0: {}, 1: {}},
    },
    "x86-4node-2socket-cpu-pairs-no-memory.xml": {
        "arch": "x86_64",
        "cpus": {0: "0-7", 1: "8-15", 2: "16-23", 3: "24-31"},
        # No <memory>: pages x sizes. Cell 0: 2500 x 4 + 100 x 2048; cell 1: 2 x 4 + 1 x 2048.
        "memory": {0: 214800, 1: 2056, 2: 0, 3: 214800},
        "huge": {0: {M2: 100}, 1: {M2: 1}, 2: {M2: 0}, 3: {M2: 100}},
        "smt": 2,
        "sibling_pairs": True,
        "dies": {0: {(0, 0)}, 1: {(0, 0)}, 2: {(1, 0)}, 3: {(1, 0)}},
        "distances": {0: {}, 1: {}, 2: {}, 3: {}},
    },
    "x86-2node-smt-24cpu.xml": {
        "arch": "x86_64",
        "cpus": {0: "0-5,12-17", 1: "6-11,18-23"},
        "memory": {0: 33444704, 1: 33554432},
        "huge": {0: {M2: 0}, 1: {M2: 0}},
        "smt": 2,
        "sibling_offset": 12,
        "dies": {0: {(0, 0)}, 1: {(1, 0)}},
        "distances": {0: {0: 10, 1: 21}, 1: {0: 21, 1: 10}},
    },
    "x86-1node-4core-nosmt.xml": {
        "arch": "x86_64",
        "cpus": {0: "0-3"},
        "memory": {0: 12573660},
        "huge": {0: {M2: 0}},
        "smt": 1,
        "core_ids": {0: 0, 1: 1, 2: 9, 3: 10},
        "dies": {0: {(1, 0)}},
        "distances": {0: {0: 10}},
    },
    "aarch64-2node-160cpu.xml": {
        "arch": "aarch64",
        "cpus": {0: "0-79", 1: "80-159"},
        "memory": {0: 263763320, 1: 262082520},
        # 4K is the base page; 64K, 2M, 32M and 1G are huge page sizes, all with 0 pages.
        "huge": {0: {64: 0, M2: 0, 32768: 0, G1: 0}, 1: {64: 0, M2: 0, 32768: 0, G1: 0}},
        "smt": 1,
        "dies": {0: {(56, 0)}, 1: {(76, 0)}},
        "distances": {0: {0: 10, 1: 20}, 1: {0: 20, 1: 10}},
    },
    "x86-2node-smt-96cpu-sparse-cores.xml": {
        "arch": "x86_64",
        "cpus": {0: "0-23,48-71", 1: "24-47,72-95"},
        "memory": {0: 32646592, 1: 32982940},
        "huge": {0: {M2: 0, G1: 0}, 1: {M2: 0, G1: 0}},
        "smt": 2,
        "sibling_offset": 48,
        "noncontiguous_core_ids": True,
        "dies": {0: {(0, 0)}, 1: {(1, 0)}},
        "distances": {0: {0: 10, 1: 21}, 1: {0: 21, 1: 10}},
    },
}


def _parse(path: Path) -> HostTopology:
    return parse_capabilities(path.read_text())


def test_fixture_directory_is_found():
    assert len(CAPS_FILES) >= 8, f"libvirt-caps fixtures not found under {CAPS_DIR}"


@pytest.mark.parametrize("path", CAPS_FILES, ids=lambda p: p.name)
def test_every_fixture_has_expected_facts(path: Path):
    assert path.name in EXPECTED, f"add the facts of new fixture {path.name} to EXPECTED"


@pytest.mark.parametrize("path", CAPS_FILES + EXTRA_CAPS, ids=lambda p: p.name)
def test_fixture_invariants(path: Path):
    topology = _parse(path)
    assert topology.hypervisor == "libvirt"
    assert [n.id for n in topology.nodes] == sorted(n.id for n in topology.nodes)
    all_ids = [c.id for n in topology.nodes for c in n.cpus]
    assert len(all_ids) == len(set(all_ids))
    cpus = topology.cpus
    for node in topology.nodes:
        assert list(node.cpu_ids) == [c.id for c in node.cpus]
        assert node.memory_kib >= 0
        # The placeholder copies totals; real free pages come from apply_free_hugepages.
        assert dict(node.hugepages_free) == dict(node.hugepages_total)
        assert 4 not in node.hugepages_total
        for cpu in node.cpus:
            assert cpu.id in cpu.siblings
            assert list(cpu.siblings) == sorted(set(cpu.siblings))
            for sibling in cpu.siblings:
                assert cpus[sibling].siblings == cpu.siblings
                assert topology.node_of_cpu(sibling) == node.id


@pytest.mark.parametrize("path", CAPS_FILES, ids=lambda p: p.name)
def test_fixture_facts(path: Path):
    expected = EXPECTED.get(path.name)
    if expected is None:
        pytest.fail(f"no expected facts for {path.name}")
    topology = _parse(path)

    assert topology.arch == expected["arch"]
    assert [n.id for n in topology.nodes] == sorted(expected["cpus"])
    for node in topology.nodes:
        cpu_text = expected["cpus"][node.id]
        assert node.cpu_ids == (parse_cpu_list(cpu_text) if cpu_text else ())
        assert node.memory_kib == expected["memory"][node.id]
        assert dict(node.hugepages_total) == expected["huge"][node.id]
        assert dict(node.distances) == expected["distances"][node.id]
        assert {(c.socket_id, c.die_id) for c in node.cpus} == expected["dies"][node.id]
        for cpu in node.cpus:
            assert len(cpu.siblings) == expected["smt"]
            if "sibling_offset" in expected:
                low = cpu.siblings[0]
                assert cpu.siblings == (low, low + expected["sibling_offset"])
                assert cpu.id in cpu.siblings
            if expected.get("sibling_pairs"):
                assert cpu.siblings == (cpu.id - cpu.id % 2, cpu.id - cpu.id % 2 + 1)
    cpus = topology.cpus
    if "core_ids" in expected:
        assert {i: c.core_id for i, c in cpus.items()} == expected["core_ids"]
    if expected.get("noncontiguous_core_ids"):
        core_ids = sorted({c.core_id for c in topology.nodes[0].cpus})
        assert core_ids != list(range(len(core_ids)))


def test_counts_from_raw_xml_match():
    """Cross-check CPU counts against a plain regex count of <cpu id=...> in each file."""
    for path in CAPS_FILES + EXTRA_CAPS:
        text = path.read_text()
        raw = len(re.findall(r"<cpu id='\d+'", text))
        assert len(_parse(path).cpus) == raw, path.name


def test_readme_cell_memory_is_roughly_32_gib_for_sandybridge():
    topology = _parse(CAPS_DIR / "x86-2node-smt-24cpu.xml")
    for node in topology.nodes:
        assert 31 * 1024 * 1024 < node.memory_kib <= 32 * 1024 * 1024


def test_memory_only_node_has_memory_but_no_cpus():
    topology = _parse(CAPS_DIR / "x86-2node-memory-only-node.xml")
    node = topology.node(1)
    assert node.cpus == ()
    assert node.memory_kib == 2097152


def _strip_topology(text: str) -> str:
    return re.sub(r"<topology>\s*<cells.*?</topology>", "", text, count=1, flags=re.S)


def test_document_without_cells_gives_one_empty_node():
    text = _strip_topology((CAPS_DIR / "x86-1node-4core-nosmt.xml").read_text())
    assert "<cells" not in text
    topology = parse_capabilities(text)
    assert [n.id for n in topology.nodes] == [0]
    assert topology.nodes[0].cpus == ()
    assert topology.nodes[0].memory_kib == 0
    assert topology.arch == "x86_64"


MINIMAL = """<capabilities><host><cpu><arch>x86_64</arch></cpu><topology><cells num='1'>
<cell id='0'>{body}</cell></cells></topology></host></capabilities>"""


@pytest.mark.parametrize(
    ("body", "memory_kib", "huge"),
    [
        # memory in another unit
        ("<memory unit='MiB'>1024</memory><cpus num='0'/>", 1048576, {}),
        ("<memory unit='GiB'>2</memory><cpus num='0'/>", 2097152, {}),
        # memory without a unit is KiB
        ("<memory>5000</memory><cpus num='0'/>", 5000, {}),
        # pages in MiB units, after cpus, and an empty count
        (
            "<cpus num='0'/><pages size='4'>10</pages><pages unit='MiB' size='2'>3</pages>"
            "<pages unit='GiB' size='1'></pages>",
            10 * 4 + 3 * 2048,
            {M2: 3, G1: 0},
        ),
        # a cell whose smallest page is 64K (aarch64 with 64K base pages)
        (
            "<pages size='64'>100</pages><pages size='524288'>2</pages>",
            6400 + 2 * 524288,
            {524288: 2},
        ),
    ],
)
def test_cell_variants(body: str, memory_kib: int, huge: dict[int, int]):
    topology = parse_capabilities(MINIMAL.format(body=body))
    assert topology.nodes[0].memory_kib == memory_kib
    assert dict(topology.nodes[0].hugepages_total) == huge


def test_cpu_without_die_or_siblings():
    body = "<cpus num='2'><cpu id='7' socket_id='2' core_id='3'/><cpu id='5'/></cpus>"
    topology = parse_capabilities(MINIMAL.format(body=body))
    by_id = topology.cpus
    assert by_id[7].die_id == 0
    assert by_id[7].siblings == (7,)
    assert by_id[7].core_key == (2, 0, 3)
    # No core_id: the CPU is its own core, never merged with another.
    assert by_id[5].core_id == 5
    assert topology.nodes[0].cpu_ids == (5, 7)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not xml",
        "<domain/>",
        MINIMAL.format(body="<cpus num='2'><cpu id='1'/><cpu id='1'/></cpus>"),
        MINIMAL.format(body="<cpus num='1'><cpu socket_id='0'/></cpus>"),
        MINIMAL.format(body="<memory unit='parsecs'>1</memory>"),
    ],
)
def test_bad_documents_raise_value_error(text: str):
    with pytest.raises(ValueError):  # noqa: PT011 - every variant has its own message
        parse_capabilities(text)


def test_libvirt_test_driver_capabilities():
    """Parse what a real libvirt library produces (the test driver needs no daemon)."""
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        xml = conn.getCapabilities()
    finally:
        conn.close()
    topology = parse_capabilities(xml)
    assert [n.id for n in topology.nodes] == [0, 1]
    assert topology.nodes[0].cpu_ids == tuple(range(8))
    assert topology.nodes[1].cpu_ids == tuple(range(8, 16))
    # Cell 1's base page is 8K: it must not be counted as huge pages.
    assert dict(topology.nodes[1].hugepages_total) == {M2: 0, G1: 0}
    assert topology.nodes[1].general_memory_kib == topology.nodes[1].memory_kib == 4194304


# --------------------------------------------------------------------------------------------
# parse_cpu_list


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", (0,)),
        ("0-3,8,10-11", (0, 1, 2, 3, 8, 10, 11)),
        (" 3 , 1 ,2", (1, 2, 3)),
        ("5,5,4-6", (4, 5, 6)),
        ("0,12", (0, 12)),
        ("7-7", (7,)),
    ],
)
def test_parse_cpu_list(text: str, expected: tuple[int, ...]):
    assert parse_cpu_list(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "a", "1,", ",1", "3-1", "1-", "-1", "1--2", "1.5", "0x1", "\u0663", "1\n2"]
)
def test_parse_cpu_list_rejects(text: str):
    with pytest.raises(ValueError, match="CPU"):
        parse_cpu_list(text)


@given(st.sets(st.integers(min_value=0, max_value=4096), min_size=1))
def test_cpu_list_round_trip(ids: set[int]):
    text = format_cpu_list(ids)
    assert parse_cpu_list(text) == tuple(sorted(ids))
    assert len(text.split(",")) <= len(ids)


def test_format_cpu_list_is_compact():
    assert format_cpu_list([3, 1, 2, 8, 10, 11, 1]) == "1-3,8,10-11"
    assert format_cpu_list([]) == ""


# --------------------------------------------------------------------------------------------
# sysfs readers


def _write_node(root: Path, node: int, size_kib: int, nr: int, free: int) -> None:
    d = root / "devices/system/node" / f"node{node}" / "hugepages" / f"hugepages-{size_kib}kB"
    d.mkdir(parents=True, exist_ok=True)
    (d / "nr_hugepages").write_text(f"{nr}\n")
    (d / "free_hugepages").write_text(f"{free}\n")


def test_sysfs_readers_on_a_tree(tmp_path: Path):
    _write_node(tmp_path, 0, M2, 512, 500)
    _write_node(tmp_path, 0, G1, 4, 1)
    _write_node(tmp_path, 1, M2, 0, 0)
    _write_node(tmp_path, 10, G1, 2, 2)
    # Noise the readers must ignore.
    (tmp_path / "devices/system/node/possible").write_text("0-1\n")
    (tmp_path / "devices/system/node/node0/hugepages/readme").mkdir()
    (tmp_path / "devices/system/node/node1/hugepages/hugepages-1048576kB").mkdir()
    assert read_free_hugepages(tmp_path) == {0: {M2: 500, G1: 1}, 1: {M2: 0}, 10: {G1: 2}}
    assert read_total_hugepages(str(tmp_path)) == {0: {M2: 512, G1: 4}, 1: {M2: 0}, 10: {G1: 2}}


def test_sysfs_node_without_hugepages_dir(tmp_path: Path):
    (tmp_path / "devices/system/node/node3").mkdir(parents=True)
    assert read_free_hugepages(tmp_path) == {3: {}}


def test_sysfs_without_numa_uses_global_pool(tmp_path: Path):
    d = tmp_path / "kernel/mm/hugepages/hugepages-2048kB"
    d.mkdir(parents=True)
    (d / "free_hugepages").write_text("7\n")
    (d / "nr_hugepages").write_text("9\n")
    assert read_free_hugepages(tmp_path) == {0: {M2: 7}}
    assert read_total_hugepages(tmp_path) == {0: {M2: 9}}


def test_sysfs_missing_tree(tmp_path: Path):
    assert read_free_hugepages(tmp_path / "absent") == {}


def test_apply_free_hugepages():
    topology = _parse(CAPS_DIR / "x86-4node-nosmt-hugepages.xml")
    free = {0: {M2: 10, G1: 1}, 1: {M2: 6000}, 2: {}}
    total = {0: {M2: 20}, 3: {64: 5}}
    updated = apply_free_hugepages(topology, free, total)
    assert updated is not topology
    n0, n1, n2, n3 = updated.nodes
    assert dict(n0.hugepages_free) == {M2: 10, G1: 1}
    assert dict(n0.hugepages_total) == {M2: 20, G1: 6144}
    # Sizes nobody reports as free are not free.
    assert dict(n1.hugepages_free) == {M2: 6000, G1: 0}
    assert dict(n2.hugepages_free) == {M2: 0, G1: 0}
    # A size only sysfs knows is added.
    assert dict(n3.hugepages_total) == {64: 5, M2: 10240, G1: 12288}
    assert dict(n3.hugepages_free) == {64: 0, M2: 0, G1: 0}
    # The input is untouched and everything else is kept.
    assert dict(topology.nodes[0].hugepages_free) == {M2: 4096, G1: 6144}

    def without_pages(t: HostTopology) -> list[NumaNode]:
        return [dataclasses.replace(n, hugepages_free={}, hugepages_total={}) for n in t.nodes]

    assert without_pages(updated) == without_pages(topology)


def test_apply_free_hugepages_without_total_keeps_totals():
    topology = _parse(CAPS_DIR / "x86-4node-2socket-cpu-pairs-no-memory.xml")
    updated = apply_free_hugepages(topology, {0: {M2: 3}})
    assert [dict(n.hugepages_total) for n in updated.nodes] == [
        dict(n.hugepages_total) for n in topology.nodes
    ]
    assert [dict(n.hugepages_free) for n in updated.nodes] == [
        {M2: 3},
        {M2: 0},
        {M2: 0},
        {M2: 0},
    ]


@pytest.mark.parametrize("text", ["0-4294967295", "7-99999999999999999999", "65536"])
def test_cpu_ids_above_the_limit_are_refused_before_expanding(text: str):
    with pytest.raises(ValueError, match="out of range"):
        parse_cpu_list(text)

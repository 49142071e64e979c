"""Hypothesis properties of the allocator over random small hosts and plan/free sequences.

Each example builds a host (1-3 nodes x 1-4 cores x 1-2 threads, random huge pages, NICs with
VFs, a random policy) and replays random plan and free operations. After every step it checks
that nothing is handed out twice, that usage adds up, that planning is deterministic and that
freeing a VM gives back exactly what it took.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmhost.model import (
    KIB_PER_MIB,
    PAGE_1G_KIB,
    PAGE_2M_KIB,
    Cpu,
    HostNic,
    HostTopology,
    HugepageRequest,
    InterfaceMode,
    InterfaceSpec,
    NumaNode,
    Placement,
    Policy,
    Rejection,
    VmSpec,
)
from vmhost.placement import plan, usage

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class World:
    topology: HostTopology
    policy: Policy


@st.composite
def worlds(draw: st.DrawFn) -> World:
    n_nodes = draw(st.integers(1, 3))
    cores = draw(st.integers(1, 4))
    threads = draw(st.integers(1, 2))
    nodes = []
    for n in range(n_nodes):
        cpus = []
        for c in range(cores):
            ids = tuple(t * n_nodes * cores + n * cores + c for t in range(threads))
            sib = ids if threads > 1 else ()
            cpus += [Cpu(id=i, socket_id=n, core_id=c, siblings=sib) for i in ids]
        total = {
            PAGE_2M_KIB: draw(st.sampled_from([0, 512, 2048, 4096])),
            PAGE_1G_KIB: draw(st.integers(0, 4)),
        }
        free = {size: count - draw(st.integers(0, min(count, 2))) for size, count in total.items()}
        general_mib = draw(st.integers(1, 16)) * 512
        hp_kib = sum(s * k for s, k in total.items())
        nodes.append(
            NumaNode(
                id=n,
                cpus=tuple(sorted(cpus, key=lambda c: c.id)),
                memory_kib=general_mib * KIB_PER_MIB + hp_kib,
                hugepages_total=total,
                hugepages_free=free,
                distances={
                    m: 10 if m == n else draw(st.sampled_from([20, 21, 31]))
                    for m in range(n_nodes)
                },
            )
        )
    totals = [draw(st.integers(0, 4)) for _ in range(draw(st.integers(0, 2)))]
    nics = tuple(
        HostNic(
            name=f"ens{i}",
            numa_node=draw(st.one_of(st.none(), st.integers(0, n_nodes - 1))),
            sriov_total_vfs=total,
            sriov_enabled_vfs=draw(st.integers(0, total)),
        )
        for i, total in enumerate(totals)
    )
    all_cpus = [c.id for node in nodes for c in node.cpus]
    reserved = draw(st.sets(st.sampled_from(all_cpus), max_size=2))
    policy = Policy(
        cpu_overcommit_ratio=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
        memory_overcommit_ratio=draw(st.sampled_from([1.0, 1.5])),
        reserved_cpus=frozenset(reserved),
        reserved_memory_mib=draw(st.sampled_from([0, 256, 1000])),
        smt_policy=draw(st.sampled_from(["prefer", "isolate", "require"])),
    )
    return World(HostTopology(nodes=tuple(nodes), nics=nics), policy)


@st.composite
def specs(draw: st.DrawFn, world: World) -> VmSpec:
    topo = world.topology
    n_nodes = len(topo.nodes)
    is_pinned = draw(st.booleans())
    vcpus = draw(st.integers(1, 8))
    pages = draw(
        st.sampled_from(
            [None, None, HugepageRequest.P2M, HugepageRequest.P1G, HugepageRequest.ANY]
        )
    )
    if pages in (HugepageRequest.P1G, HugepageRequest.ANY):
        memory = draw(st.integers(1, 4)) * 1024
    elif pages == HugepageRequest.P2M:
        memory = draw(st.integers(1, 8)) * 256
    else:
        memory = draw(st.integers(1, 8)) * draw(st.sampled_from([1, 100, 256]))
    pinned_cpus = None
    if is_pinned and draw(st.integers(0, 3)) == 0:
        cpus = sorted(topo.cpus)
        pinned_cpus = tuple(
            draw(st.lists(st.sampled_from(cpus), min_size=1, max_size=6, unique=True))
        )
        vcpus = len(pinned_cpus)
    interfaces = tuple(
        InterfaceSpec(
            label=f"if{i}",
            mode=InterfaceMode.SRIOV,
            parent=nic.name,
            numa_strict=draw(st.booleans()),
        )
        for i, nic in enumerate(
            draw(st.lists(st.sampled_from(topo.nics), max_size=2)) if topo.nics else []
        )
    )
    return VmSpec(
        name="vm",
        vcpus=vcpus,
        memory_mib=memory,
        pinned_count=vcpus if is_pinned else 0,
        pinned_cpus=pinned_cpus,
        numa_nodes=draw(st.integers(1, n_nodes)),
        hugepages=pages,
        interfaces=interfaces,
    )


def check_cpus(world: World, allocs: list[Placement]) -> None:
    topo, policy = world.topology, world.policy
    pinned = [c for a in allocs for c in a.pinned_cpus]
    assert len(pinned) == len(set(pinned)), "a CPU pinned twice"
    assert not set(pinned) & policy.reserved_cpus, "a reserved CPU handed out"
    assert set(pinned) <= set(topo.cpus)
    if policy.smt_policy == "isolate":
        owner = {c: i for i, a in enumerate(allocs) for c in a.pinned_cpus}
        for cpu, i in owner.items():
            for sib in topo.cpus[cpu].siblings:
                assert owner.get(sib, i) == i, "two VMs share a core under isolate"


def check_pages_and_vfs(world: World, allocs: list[Placement]) -> Counter[tuple[int, int]]:
    topo = world.topology
    pages: Counter[tuple[int, int]] = Counter()
    for a in allocs:
        for cell in a.cells:
            if cell.hugepage_size_kib:
                pages[(cell.host_node, cell.hugepage_size_kib)] += cell.hugepages
    for (node, size), count in pages.items():
        assert count <= topo.node(node).hugepages_total.get(size, 0), "pages given twice"
    vfs: Counter[str] = Counter(vf.nic for a in allocs for vf in a.vfs for _ in range(vf.count))
    for nic in topo.nics:
        assert vfs[nic.name] <= nic.sriov_total_vfs, "a VF given twice"
        assert vfs[nic.name] <= nic.sriov_enabled_vfs, "a VF that is not enabled"
    return pages


def check_usage(world: World, allocs: list[Placement], pages: Counter[tuple[int, int]]) -> None:
    """Check allocated + free = total for every resource, allocated counted independently."""
    topo = world.topology
    u = usage(topo, allocs, world.policy)
    bound: Counter[int] = Counter()
    for a in allocs:
        for cell in a.cells:
            if cell.cpus and not cell.hugepages:
                bound[cell.host_node] += cell.memory_mib
    for node in u.nodes:
        assert node.cpus_total == (
            node.cpus_reserved + node.cpus_pinned + node.cpus_held + node.cpus_shared_pool
        )
        assert node.memory_bound_mib == bound[node.node]
        assert node.memory_total_mib == (
            node.memory_reserved_mib + node.memory_bound_mib + node.memory_free_mib
        )
        assert node.memory_free_mib >= 0
        for h in node.hugepages:
            assert h.allocated == pages[(node.node, h.size_kib)]
            assert h.allocated + h.unavailable + h.free == h.total
            assert min(h.allocated, h.unavailable, h.free) >= 0
    assert u.shared_vcpus_allocated == sum(a.shared_vcpus for a in allocs)
    assert u.shared_vcpus_allocated <= u.shared_vcpus_capacity
    assert u.memory_allocated_mib == sum(a.general_memory_mib for a in allocs)
    assert u.memory_allocated_mib <= u.memory_capacity_mib
    assert u.cpus_total == len(topo.cpus)
    assert sum(n.cpus_pinned for n in u.nodes) == sum(len(a.pinned_cpus) for a in allocs)
    for nic in u.nics:
        assert nic.vfs_used == sum(v.count for a in allocs for v in a.vfs if v.nic == nic.nic)
        # Free VFs are the enabled ones not in use (issue 11 item 14; was vfs_total).
        assert nic.vfs_used + nic.vfs_free == nic.vfs_enabled
        assert nic.vfs_free >= 0


def check_invariants(world: World, allocs: list[Placement]) -> None:
    check_cpus(world, allocs)
    check_usage(world, allocs, check_pages_and_vfs(world, allocs))


def check_cells(world: World, spec: VmSpec, p: Placement) -> None:
    topo = world.topology
    assert p.vcpus == spec.vcpus
    assert p.memory_mib == spec.memory_mib
    if p.cells:
        assert sum(c.vcpus for c in p.cells) == spec.vcpus
        assert sum(c.memory_mib for c in p.cells) == spec.memory_mib
        assert len(p.cells) <= spec.numa_nodes
        assert list(p.host_nodes) == sorted(set(p.host_nodes))
    for cell in p.cells:
        assert cell.vcpus >= 1
        assert cell.memory_mib >= 1
        assert all(topo.node_of_cpu(c) == cell.host_node for c in cell.cpus)
        if cell.hugepage_size_kib:
            assert cell.hugepages * cell.hugepage_size_kib == cell.memory_mib * KIB_PER_MIB
    if spec.hugepages is not None:
        assert p.hugepage_backed
        sizes = {c.hugepage_size_kib for c in p.cells}
        if spec.hugepages == HugepageRequest.P1G:
            assert sizes == {PAGE_1G_KIB}
        if spec.hugepages == HugepageRequest.P2M:
            assert sizes == {PAGE_2M_KIB}


def check_pinning(world: World, spec: VmSpec, p: Placement) -> None:
    topo = world.topology
    if not spec.pinned:
        assert not p.pinned_cpus
        return
    assert len(p.pinned_cpus) == spec.vcpus
    assert p.emulator_cpus
    if spec.pinned_cpus is not None:
        assert sorted(p.pinned_cpus) == sorted(spec.pinned_cpus)
    smt = any(len(c.siblings) > 1 for c in topo.cpus.values())
    if world.policy.smt_policy == "require" and smt:
        chosen = set(p.pinned_cpus)
        for c in chosen:
            assert sum(1 for s in topo.cpus[c].siblings if s in chosen) % 2 == 0


def check_placement(world: World, spec: VmSpec, p: Placement) -> None:
    check_cells(world, spec, p)
    check_pinning(world, spec, p)
    for iface in spec.interfaces:
        nic = next(n for n in world.topology.nics if n.name == iface.parent)
        if iface.numa_strict and nic.numa_node is not None:
            assert nic.numa_node in p.host_nodes


@SETTINGS
@given(data=st.data())
def test_plan_free_sequences_keep_the_books(data: st.DataObject) -> None:
    world = data.draw(worlds())
    allocs: list[Placement] = []
    for _step in range(data.draw(st.integers(1, 10))):
        if allocs and data.draw(st.integers(0, 3)) == 0:
            allocs.pop(data.draw(st.integers(0, len(allocs) - 1)))
            check_invariants(world, allocs)
            continue
        spec = data.draw(specs(world))
        before = usage(world.topology, allocs, world.policy)
        result = plan(world.topology, allocs, spec, world.policy)
        assert plan(world.topology, allocs, spec, world.policy) == result
        assert plan(world.topology, list(reversed(allocs)), spec, world.policy) == result
        if isinstance(result, Rejection):
            assert result.reason
            assert any(ch.isdigit() for ch in result.reason) or "NUMA" in result.reason
            continue
        check_placement(world, spec, result)
        allocs.append(result)
        check_invariants(world, allocs)
        assert usage(world.topology, allocs[:-1], world.policy) == before

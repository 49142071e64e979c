"""The allocator against an exhaustive search.

On hosts of up to 3 nodes x 4 cores x 2 threads with random pre-existing allocations (made
directly, so cores and nodes end up fragmented in ways the allocator itself would avoid), an
exhaustive search decides whether a single pinned request can be placed: every set of up to
`numa_nodes` nodes, every split of the vCPUs over them, every subset of free CPUs on each
node, under the same rules (SMT policy, shared-pool budget, memory split by vCPUs in whole
units, huge pages, general memory). The allocator must place every request the search can
place, and whatever it places must be something the search accepts too. A second property
does the same on hosts of 9-11 nodes, where spans are grown greedily instead of enumerated.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from functools import cache

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmhost.model import (
    KIB_PER_MIB,
    PAGE_1G_KIB,
    PAGE_2M_KIB,
    CellPlacement,
    Cpu,
    HostTopology,
    HugepageRequest,
    NumaNode,
    Placement,
    Policy,
    VmSpec,
)
from vmhost.placement import plan


class Brute:
    """An independent, exhaustive reading of the placement rules for one pinned request."""

    def __init__(self, topo: HostTopology, allocs: Sequence[Placement], policy: Policy) -> None:
        self.topo = topo
        self.policy = policy
        self.node_cpus = {n.id: [c.id for c in n.cpus] for n in topo.nodes}
        self.sib = {c.id: set(c.siblings) | {c.id} for n in topo.nodes for c in n.cpus}
        self.smt = any(len(s) > 1 for s in self.sib.values())
        pinned = {c for a in allocs for c in a.pinned_cpus}
        held: set[int] = set()
        if policy.smt_policy == "isolate":
            held = {s for c in pinned for s in self.sib[c]} - pinned - policy.reserved_cpus
        self.pool = set(self.sib) - pinned - held - policy.reserved_cpus
        self.shared = sum(a.shared_vcpus for a in allocs)
        self.general_alloc = sum(a.general_memory_mib for a in allocs)
        left = policy.reserved_memory_mib
        self.mem_free: dict[int, int] = {}
        general_total = 0
        for node in sorted(topo.nodes, key=lambda n: n.id):
            general = node.general_memory_kib // KIB_PER_MIB
            reserved = min(left, general)
            left -= reserved
            general_total += general - reserved
            bound = sum(
                c.memory_mib
                for a in allocs
                for c in a.cells
                if c.host_node == node.id and c.cpus and not c.hugepages
            )
            self.mem_free[node.id] = general - reserved - bound
        self.general_cap = math.floor(general_total * policy.memory_overcommit_ratio)
        self.pages_free: dict[tuple[int, int], int] = {}
        for node in topo.nodes:
            for size in (PAGE_2M_KIB, PAGE_1G_KIB):
                used = sum(
                    c.hugepages
                    for a in allocs
                    for c in a.cells
                    if c.host_node == node.id and c.hugepage_size_kib == size
                )
                total = node.hugepages_total.get(size, 0)
                kernel = node.hugepages_free.get(size, total)
                self.pages_free[(node.id, size)] = max(0, min(total - used, kernel))

    def subset_ok(self, chosen: set[int]) -> bool:
        if self.policy.smt_policy == "require" and self.smt:
            return all(len(self.sib[c] & chosen) % 2 == 0 for c in chosen)
        return True

    def waste(self, chosen: set[int]) -> int:
        if self.policy.smt_policy != "isolate":
            return 0
        return len({s for c in chosen for s in self.sib[c] if s in self.pool} - chosen)

    @cache  # noqa: B019 - one Brute per example, dropped with it
    def min_waste(self, node: int, count: int) -> int | None:
        """Least held-idle CPUs over every valid subset of `count` free CPUs on a node."""
        free = [c for c in self.node_cpus[node] if c in self.pool]
        best = None
        for subset in itertools.combinations(free, count):
            chosen = set(subset)
            if self.subset_ok(chosen):
                w = self.waste(chosen)
                best = w if best is None else min(best, w)
        return best

    def budget_ok(self, taking: int) -> bool:
        left = len(self.pool) - taking
        return self.shared <= math.floor(left * self.policy.cpu_overcommit_ratio)

    def memory_ok(self, spec: VmSpec, nodes: Sequence[int], counts: Sequence[int]) -> bool:
        sizes: list[int | None]
        if spec.hugepages is None:
            if self.general_alloc + spec.memory_mib > self.general_cap:
                return False
            sizes = [None]
        elif spec.hugepages == HugepageRequest.P2M:
            sizes = [PAGE_2M_KIB]
        elif spec.hugepages == HugepageRequest.P1G:
            sizes = [PAGE_1G_KIB]
        else:
            sizes = [PAGE_2M_KIB, PAGE_1G_KIB]
        for size in sizes:
            if size is None:
                total, free = spec.memory_mib, [self.mem_free[n] for n in nodes]
            else:
                if spec.memory_mib * KIB_PER_MIB % size:
                    continue
                total = spec.memory_mib * KIB_PER_MIB // size
                free = [self.pages_free[(n, size)] for n in nodes]
            shares = [total * c // spec.vcpus for c in counts]
            if sum(free) >= total and all(1 <= s <= f for s, f in zip(shares, free, strict=True)):
                return True
        return False

    def can_place(self, spec: VmSpec) -> bool:
        nodes_with_cpus = [n for n, cpus in sorted(self.node_cpus.items()) if cpus]
        if spec.numa_nodes > len(nodes_with_cpus):
            return False
        for k in range(1, spec.numa_nodes + 1):
            for nodes in itertools.combinations(nodes_with_cpus, k):
                for counts in splits(spec.vcpus, k):
                    if not self.memory_ok(spec, nodes, counts):
                        continue
                    wastes = [self.min_waste(n, c) for n, c in zip(nodes, counts, strict=True)]
                    if any(w is None for w in wastes):
                        continue
                    if self.budget_ok(spec.vcpus + sum(w or 0 for w in wastes)):
                        return True
        return False

    def accepts(self, spec: VmSpec, p: Placement) -> bool:
        """Whether a given placement obeys the rules the search applies."""
        chosen = set(p.pinned_cpus)
        if len(chosen) != spec.vcpus or not chosen <= self.pool or not self.subset_ok(chosen):
            return False
        if len(p.cells) > spec.numa_nodes:
            return False
        counts = [c.vcpus for c in p.cells]
        return self.memory_ok(spec, p.host_nodes, counts) and self.budget_ok(
            spec.vcpus + self.waste(chosen)
        )


def splits(n: int, k: int) -> Iterator[tuple[int, ...]]:
    """Every way to write n as k positive parts, in order."""
    if k == 1:
        yield (n,)
        return
    for first in range(1, n - k + 2):
        for rest in splits(n - first, k - 1):
            yield (first, *rest)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[HostTopology, list[Placement], Policy, VmSpec]:
    n_nodes = draw(st.integers(1, 3))
    cores = draw(st.integers(1, 4))
    threads = draw(st.integers(1, 2))
    nodes = []
    for n in range(n_nodes):
        cpus = []
        for c in range(cores):
            ids = tuple(t * n_nodes * cores + n * cores + c for t in range(threads))
            sib = ids if threads > 1 else ()
            cpus += [Cpu(id=i, core_id=c, socket_id=n, siblings=sib) for i in ids]
        pages = {
            PAGE_2M_KIB: draw(st.sampled_from([0, 1024])),
            PAGE_1G_KIB: draw(st.integers(0, 3)),
        }
        general = draw(st.integers(1, 8)) * 1024
        nodes.append(
            NumaNode(
                id=n,
                cpus=tuple(sorted(cpus, key=lambda c: c.id)),
                memory_kib=general * KIB_PER_MIB + sum(s * k for s, k in pages.items()),
                hugepages_total=pages,
                hugepages_free=pages,
                distances={m: 10 if m == n else 20 for m in range(n_nodes)},
            )
        )
    topo = HostTopology(nodes=tuple(nodes))
    all_cpus = sorted(topo.cpus)
    policy = Policy(
        cpu_overcommit_ratio=draw(st.sampled_from([1.0, 2.0])),
        reserved_cpus=frozenset(draw(st.sets(st.sampled_from(all_cpus), max_size=2))),
        reserved_memory_mib=draw(st.sampled_from([0, 512])),
        smt_policy=draw(st.sampled_from(["prefer", "isolate", "require"])),
    )
    # Pre-existing VMs made directly: random CPUs, random bound memory and pages.
    allocs: list[Placement] = []
    taken: set[int] = set(policy.reserved_cpus)
    for _ in range(draw(st.integers(0, 4))):
        node = draw(st.sampled_from(nodes))
        free = [c.id for c in node.cpus if c.id not in taken]
        if not free or draw(st.integers(0, 4)) == 0:
            allocs.append(Placement(vcpus=draw(st.integers(1, 8)), memory_mib=256))
            continue
        cpus = tuple(draw(st.lists(st.sampled_from(free), min_size=1, max_size=3, unique=True)))
        taken.update(cpus)
        use_pages = node.hugepages_total[PAGE_1G_KIB] > 0 and draw(st.booleans())
        cell = CellPlacement(
            host_node=node.id,
            vcpus=len(cpus),
            memory_mib=1024 if use_pages else draw(st.sampled_from([256, 1024, 3000])),
            cpus=cpus,
            hugepage_size_kib=PAGE_1G_KIB if use_pages else None,
            hugepages=1 if use_pages else 0,
        )
        allocs.append(Placement(vcpus=len(cpus), memory_mib=cell.memory_mib, cells=(cell,)))
    vcpus = draw(st.integers(1, min(6, len(all_cpus))))
    hp = draw(
        st.sampled_from(
            [None, None, HugepageRequest.P2M, HugepageRequest.P1G, HugepageRequest.ANY]
        )
    )
    memory = draw(st.sampled_from([512, 1024, 2048, 3072, 5000 if hp is None else 4096]))
    spec = VmSpec(
        name="vm",
        vcpus=vcpus,
        memory_mib=memory,
        pinned_count=vcpus,
        numa_nodes=draw(st.integers(1, n_nodes)),
        hugepages=hp,
    )
    return topo, allocs, policy, spec


def overlapping(allocs: Sequence[Placement], topo: HostTopology) -> bool:
    """Random pre-existing VMs may overbook a node's pages; such states are out of scope."""
    for node in topo.nodes:
        used = sum(c.hugepages for a in allocs for c in a.cells if c.host_node == node.id)
        if used > node.hugepages_total.get(PAGE_1G_KIB, 0):
            return True
    return False


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(scenario=scenarios())
def test_allocator_never_rejects_what_exhaustive_search_places(
    scenario: tuple[HostTopology, list[Placement], Policy, VmSpec],
) -> None:
    topo, allocs, policy, spec = scenario
    if overlapping(allocs, topo):
        return
    brute = Brute(topo, allocs, policy)
    possible = brute.can_place(spec)
    result = plan(topo, allocs, spec, policy)
    if possible:
        assert isinstance(result, Placement), (result, spec)
    if isinstance(result, Placement):
        assert brute.accepts(spec, result), (result, spec)
        assert possible


@st.composite
def wide_scenarios(draw: st.DrawFn) -> tuple[HostTopology, list[Placement], Policy, VmSpec]:
    """9-11 nodes of 2 cores x 2 threads: too many node sets to enumerate, so spans grow."""
    n_nodes = draw(st.integers(9, 11))
    nodes = []
    for n in range(n_nodes):
        cpus = []
        for c in range(2):
            ids = (n * 2 + c, n_nodes * 2 + n * 2 + c)
            cpus += [Cpu(id=i, core_id=c, socket_id=n, siblings=ids) for i in ids]
        pages = {PAGE_1G_KIB: draw(st.integers(0, 3))}
        general = draw(st.integers(1, 8)) * 512
        dist = {m: 10 if m == n else draw(st.sampled_from([20, 30])) for m in range(n_nodes)}
        nodes.append(
            NumaNode(
                id=n,
                cpus=tuple(sorted(cpus, key=lambda c: c.id)),
                memory_kib=general * KIB_PER_MIB + sum(s * k for s, k in pages.items()),
                hugepages_total=pages,
                hugepages_free=pages,
                distances=dist,
            )
        )
    allocs: list[Placement] = []
    taken: set[int] = set()
    for _ in range(draw(st.integers(0, 6))):
        node = draw(st.sampled_from(nodes))
        free = [c.id for c in node.cpus if c.id not in taken]
        if not free:
            continue
        cpus = tuple(draw(st.lists(st.sampled_from(free), min_size=1, max_size=3, unique=True)))
        taken.update(cpus)
        memory = draw(st.sampled_from([256, 1024]))
        cell = CellPlacement(host_node=node.id, vcpus=len(cpus), memory_mib=memory, cpus=cpus)
        allocs.append(Placement(vcpus=len(cpus), memory_mib=memory, cells=(cell,)))
    policy = Policy(smt_policy=draw(st.sampled_from(["prefer", "isolate", "require"])))
    vcpus = draw(st.integers(4, 10))
    spec = VmSpec(
        name="vm",
        vcpus=vcpus,
        memory_mib=draw(st.sampled_from([1024, 2048, 4096, 6144])),
        pinned_count=vcpus,
        numa_nodes=draw(st.integers(3, 5)),
        hugepages=draw(st.sampled_from([None, HugepageRequest.P1G])),
    )
    return HostTopology(nodes=tuple(nodes)), allocs, policy, spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=wide_scenarios())
def test_greedy_spans_on_wider_hosts_match_exhaustive_search(
    scenario: tuple[HostTopology, list[Placement], Policy, VmSpec],
) -> None:
    topo, allocs, policy, spec = scenario
    brute = Brute(topo, allocs, policy)
    result = plan(topo, allocs, spec, policy)
    if brute.can_place(spec):
        assert isinstance(result, Placement), (result, spec)
    if isinstance(result, Placement):
        assert brute.accepts(spec, result), (result, spec)


def test_uneven_split_when_the_even_one_does_not_fit() -> None:
    """An even 2 + 2 split needs 2048 MiB on node 0, which has 1024; 1 + 3 fits."""
    nodes = []
    for n, general in ((0, 1024), (1, 3500)):
        cpus = tuple(Cpu(id=n * 4 + c, core_id=c, socket_id=n) for c in range(4))
        nodes.append(
            NumaNode(id=n, cpus=cpus, memory_kib=general * KIB_PER_MIB, distances={0: 10, 1: 20})
        )
    topo = HostTopology(nodes=tuple(nodes))
    spec = VmSpec(name="vm", vcpus=4, memory_mib=4096, pinned_count=4, numa_nodes=2)
    assert Brute(topo, [], Policy()).can_place(spec)
    result = plan(topo, [], spec, Policy())
    assert isinstance(result, Placement), result
    assert [(c.host_node, c.vcpus, c.memory_mib) for c in result.cells] == [
        (0, 1, 1024),
        (1, 3, 3072),
    ]

"""Benchmark hosts and seeded request traces, shared by both allocators.

Everything here is plain data: a host is a `vmhost.model.HostTopology` (the single source of
truth; nova's view of it is derived by `nova_host_json`), and a trace is a list of arrival
and departure events over requests that both allocators receive in the same order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from tests.fixtures import FIXTURES

from vmhost.model import PAGE_1G_KIB, Cpu, HostTopology, NumaNode

KINDS = ("small", "medium", "whole-node", "two-node", "hugepage-1g")
"""Request kinds, in report order."""

KIND_WEIGHTS = {
    "small": 0.35,
    "medium": 0.30,
    "whole-node": 0.08,
    "two-node": 0.05,
    "hugepage-1g": 0.22,
}
"""Share of arrivals per kind (renormalised over the kinds a host can take at all)."""

MEMORY_MIB_PER_VCPU = 2048
"""General memory of a non-hugepage request, per vCPU."""

HUGEPAGE_MIB_PER_VCPU = 1024
"""Memory of a 1G-hugepage request, per vCPU: one 1G page per vCPU."""

FIXTURES_DIR = FIXTURES
"""The tests' own host documents (tests/fixtures)."""


# ---------------------------------------------------------------------------------------------
# Hosts


@dataclass(frozen=True)
class BenchHost:
    """A host both allocators are run against."""

    name: str
    topology: HostTopology
    source: str
    """"synthetic", or the fixture file name the CPUs and nodes come from."""

    @property
    def cpu_nodes(self) -> tuple[NumaNode, ...]:
        """Nodes that have CPUs (memory-only nodes cannot take a pinned cell)."""
        return tuple(n for n in self.topology.nodes if n.cpus)

    @property
    def node_cpus(self) -> int:
        """CPUs of the smallest node with CPUs: the size of a whole-node request."""
        return min(len(n.cpus) for n in self.cpu_nodes)

    @property
    def total_cpus(self) -> int:
        """All host CPUs (none are reserved in the benchmark)."""
        return sum(len(n.cpus) for n in self.topology.nodes)

    @property
    def smt(self) -> bool:
        """Whether any core has more than one thread."""
        return any(len(c.siblings) > 1 for n in self.topology.nodes for c in n.cpus)


def pages_1g_per_node(cpus_per_node: int) -> int:
    """Return the 1G pages every benchmark node with CPUs gets: "a few", scaled to its size."""
    return max(4, cpus_per_node // 4)


def node_memory_kib(cpus: int, pages_1g: int) -> int:
    """Return node memory that never limits CPU-bound placement.

    Every CPU can carry a non-hugepage vCPU with `MEMORY_MIB_PER_VCPU`, plus the huge pages,
    plus 8 GiB: memory is ample on purpose, so the comparison is about CPUs, cores and pages.
    """
    return (cpus * MEMORY_MIB_PER_VCPU + 8 * 1024) * 1024 + pages_1g * PAGE_1G_KIB


def synthetic_host(nodes: int, cores: int = 12, threads: int = 2) -> BenchHost:
    """Build an SMT host of `nodes` nodes x `cores` cores x `threads` threads, one socket each.

    CPU ids follow Linux's usual numbering: the first threads of all cores come first, node
    by node, then the second threads (so siblings are n and n + nodes x cores).
    """
    total_cores = nodes * cores
    pages = pages_1g_per_node(cores * threads)
    topo_nodes = []
    for node in range(nodes):
        cpus = []
        for core in range(cores):
            first = node * cores + core
            sibs = tuple(first + t * total_cores for t in range(threads))
            cpus.extend(Cpu(id=cpu, socket_id=node, core_id=core, siblings=sibs) for cpu in sibs)
        topo_nodes.append(
            NumaNode(
                id=node,
                cpus=tuple(sorted(cpus, key=lambda c: c.id)),
                memory_kib=node_memory_kib(cores * threads, pages),
                hugepages_total={PAGE_1G_KIB: pages},
                hugepages_free={PAGE_1G_KIB: pages},
                distances={other: 10 if other == node else 21 for other in range(nodes)},
            )
        )
    name = f"synthetic-{nodes}n-{cores}c{threads}t"
    return BenchHost(name=name, topology=HostTopology(nodes=tuple(topo_nodes)), source="synthetic")


def normalise_fixture(name: str, topology: HostTopology) -> BenchHost:
    """Keep a fixture's nodes, CPUs, siblings and distances; set memory and pages for the bench.

    Fixture page counts are unusable as they stand: most hosts have no huge pages at all, and
    the libvirt unit-test documents report mocked counts (thousands of 1G pages on a node).
    Every node with CPUs therefore gets `pages_1g_per_node` 1G pages and ample memory; 2M
    pages are dropped (no benchmark request asks for them). Memory-only nodes keep their
    memory and get no pages.
    """
    nodes = []
    for node in topology.nodes:
        if node.cpus:
            pages = pages_1g_per_node(len(node.cpus))
            nodes.append(
                replace(
                    node,
                    memory_kib=node_memory_kib(len(node.cpus), pages),
                    hugepages_total={PAGE_1G_KIB: pages},
                    hugepages_free={PAGE_1G_KIB: pages},
                )
            )
        else:
            nodes.append(replace(node, hugepages_total={}, hugepages_free={}))
    return BenchHost(
        name=name, topology=replace(topology, nodes=tuple(nodes)), source=f"{name}.xml"
    )


def fixture_hosts(fixtures_dir: Path = FIXTURES_DIR) -> list[BenchHost]:
    """Parse every libvirt capabilities fixture into a benchmark host (sorted by file name)."""
    from vmhost.topology import parse_capabilities

    hosts = []
    for path in sorted((fixtures_dir / "libvirt-caps").glob("*.xml")):
        topology = parse_capabilities(path.read_text())
        host = normalise_fixture(path.stem, topology)
        if host.cpu_nodes:
            hosts.append(host)
    return hosts


# ---------------------------------------------------------------------------------------------
# Requests and traces


@dataclass(frozen=True)
class Request:
    """One VM request, as both allocators see it (each translates it into its own terms)."""

    id: int
    kind: str
    vcpus: int
    memory_mib: int
    numa_nodes: int = 1
    """Host nodes the request spans: 1, or 2 for two-node requests (an even split for nova)."""
    hugepages_1g: bool = False
    arrival: float = 0.0

    def to_json(self) -> dict[str, object]:
        """The request as the nova worker receives it."""
        return {
            "id": self.id,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "numa_nodes": self.numa_nodes,
            "hugepages_1g": self.hugepages_1g,
        }


def kind_sizes(host: BenchHost, odd: bool = False) -> dict[str, tuple[int, ...]]:
    """Return the vCPU sizes (drawn uniformly) of every kind this host can take at all.

    Sizes follow the host's node size C (CPUs of its smallest node with CPUs): small is 2;
    medium is 4, 6 or 8 when smaller than C; whole-node is exactly C; two-node is 2 x h with
    h = round(0.625 C) or round(0.75 C), always more than one node holds, so both allocators
    must span exactly two nodes; hugepage-1g is 2 or 4 vCPUs with one 1G page per vCPU.

    With `odd`, small, medium and hugepage-1g sizes are one less (1, 3, 5, 7, 3): half-used
    cores then appear, which is what the SMT policies are about.
    """
    c = host.node_cpus
    less = 1 if odd else 0
    sizes: dict[str, tuple[int, ...]] = {}
    if c >= 2:
        sizes["small"] = (2 - less,)
    medium = tuple(s - less for s in (4, 6, 8) if s < c)
    if medium:
        sizes["medium"] = medium
    sizes["whole-node"] = (c,)
    if len(host.cpu_nodes) >= 2:
        halves = sorted({max(1, round(0.625 * c)), max(1, round(0.75 * c))})
        sizes["two-node"] = tuple(2 * h for h in halves if 2 * h > c)
    min_pages = min(n.hugepages_total.get(PAGE_1G_KIB, 0) for n in host.cpu_nodes)
    huge = tuple(s - less for s in (2, 4) if s <= c and s <= min_pages)
    if huge:
        sizes["hugepage-1g"] = huge
    return {k: v for k, v in sizes.items() if v}


def mean_request_cpus(sizes: dict[str, tuple[int, ...]]) -> float:
    """Expected vCPUs of one arrival under the kind mix."""
    total_weight = sum(KIND_WEIGHTS[k] for k in sizes)
    return sum(KIND_WEIGHTS[k] / total_weight * (sum(v) / len(v)) for k, v in sizes.items())


def make_request(rid: int, kind: str, vcpus: int, arrival: float) -> Request:
    """Build one request of a kind and size."""
    if kind == "hugepage-1g":
        return Request(rid, kind, vcpus, vcpus * HUGEPAGE_MIB_PER_VCPU, 1, True, arrival)
    nodes = 2 if kind == "two-node" else 1
    return Request(rid, kind, vcpus, vcpus * MEMORY_MIB_PER_VCPU, nodes, False, arrival)


@dataclass(frozen=True)
class Trace:
    """Arrivals and departures in time order, plus what is needed to read the results."""

    host: str
    load: float
    seed: int
    part: int
    requests: tuple[Request, ...]
    events: tuple[tuple[str, int], ...]
    """("arrive", request id) or ("depart", request id), in time order."""
    mean_lifetime: float
    warmup_arrivals: int
    """Arrivals before the host reaches steady state; replayed but not counted in rates."""


def make_trace(
    host: BenchHost, load: float, arrivals: int, seed: int, odd: bool = False, part: int = 0
) -> Trace:
    """Draw a seeded trace whose offered load is `load` on `host`.

    Arrivals are Poisson with rate 1 and lifetimes exponential with mean T, so the mean
    demanded CPUs are T x mean request size (Little's law); T is chosen to make that equal
    to `load` x host CPUs. The first 3 T time units (at most 40% of the arrivals) are the
    warm-up from an empty host. `odd` draws the odd sizes of `kind_sizes`. `part` numbers
    the independent traces drawn from one seed for the same host and load (part 0 is the
    trace earlier versions drew from that seed).
    """
    key = f"vmhost-bench:{seed}:{host.name}:{load}" + (":odd" if odd else "")
    rng = random.Random(key + (f":{part}" if part else ""))
    sizes = kind_sizes(host, odd)
    kinds = list(sizes)
    weights = [KIND_WEIGHTS[k] for k in kinds]
    mean_size = mean_request_cpus(sizes)
    mean_lifetime = load * host.total_cpus / mean_size
    timed: list[tuple[float, int, str, int]] = []
    requests = []
    now = 0.0
    for rid in range(arrivals):
        now += rng.expovariate(1.0)
        kind = rng.choices(kinds, weights)[0]
        request = make_request(rid, kind, rng.choice(sizes[kind]), now)
        requests.append(request)
        lifetime = rng.expovariate(1.0 / mean_lifetime)
        # Departures sort before arrivals at equal times (tie order 0 < 1).
        timed.append((now, 1, "arrive", rid))
        timed.append((now + lifetime, 0, "depart", rid))
    timed.sort()
    warmup_time = 3 * mean_lifetime
    warmup = min(sum(1 for r in requests if r.arrival < warmup_time), math.floor(0.4 * arrivals))
    return Trace(
        host=host.name,
        load=load,
        seed=seed,
        part=part,
        requests=tuple(requests),
        events=tuple((what, rid) for _, _, what, rid in timed),
        mean_lifetime=mean_lifetime,
        warmup_arrivals=warmup,
    )


# ---------------------------------------------------------------------------------------------
# nova's view of a host


def nova_host_json(topology: HostTopology) -> dict[str, object]:
    """Describe a host the way nova's libvirt driver builds its `NUMATopology`.

    Every CPU is in `[compute] cpu_dedicated_set` (pcpuset), none shared; siblings are the
    de-duplicated thread sets; memory is the node total in MiB; mempages list 4K pages (the
    general memory) and the node's huge pages.
    """
    nodes = []
    for node in topology.nodes:
        sib_sets = sorted({c.siblings or (c.id,) for c in node.cpus})
        sockets = {c.socket_id for c in node.cpus}
        pages = {4: node.general_memory_kib // 4}
        pages.update({int(k): int(v) for k, v in node.hugepages_total.items()})
        nodes.append(
            {
                "id": node.id,
                "cpus": list(node.cpu_ids),
                "siblings": [list(s) for s in sib_sets],
                "memory_mib": node.memory_kib // 1024,
                "pages": {str(k): v for k, v in sorted(pages.items())},
                "socket": sockets.pop() if len(sockets) == 1 else None,
            }
        )
    return {"nodes": nodes}

"""The allocator: which host CPUs, NUMA nodes, huge pages and VFs a VM gets.

Pure functions over the shared records of `vmhost.model`: no I/O, no logging, no clock. The
host's current allocations are passed in (rebuilt from the hypervisor's own metadata), so the
same inputs always give the same answer, and freeing a VM is simply dropping its Placement
from the list.

Rules, and why they are what they are:

* CPU pools. Every host CPU is exactly one of: reserved (``Policy.reserved_cpus``, never
  handed out), pinned (dedicated to one vCPU of one VM), held (``smt-policy=isolate`` only:
  a free thread on a core one of whose threads is pinned; it stays idle so no two VMs share
  a core, and it counts as used) or in the shared pool. Shared vCPUs float over the shared
  pool and are limited to ``cpu_overcommit_ratio`` x its size. A pinned request may not
  shrink the pool below what shared VMs already use.
* General memory (node memory minus huge pages, minus ``reserved_memory_mib`` which is taken
  from the lowest-numbered nodes first) is limited host-wide to
  ``memory_overcommit_ratio`` x its size. Cells of pinned VMs are bound to their node
  (libvirt ``numatune`` strict), so their memory must also fit the node physically, without
  overcommit: per node, the memory of all NUMA-bound cells stays within the node's general
  memory. Floating (shared, non-hugepage) VMs only count host-wide.
* Huge pages, per size and node, are never overcommitted. Free pages on a node are
  min(pages configured - pages of the allocations, pages the kernel reports free): the
  kernel count already excludes running VMs and pages used outside vm-host, the ledger also
  covers stopped VMs. Hugepage-backed VMs take no general memory. ``any`` takes 2M pages when
  they fit and 1G pages only otherwise, so the scarce 1G pages stay for requests that need
  them.
* Guest cells mirror host nodes: a pinned or hugepage-backed VM gets one cell per host node
  used, in ascending host node order. Only nodes with CPUs hold cells (a memory-only node
  never gets vCPUs). A VM may use up to ``VmSpec.numa_nodes`` nodes; which node set, and how
  many nodes, is decided by the placement cost below (on one node when one node costs no
  more). An explicit CPU list decides the nodes itself; within each cell its CPUs keep the
  requester's order.
* Split rule. vCPUs are split over the cells as evenly as the free capacity allows (the
  largest cell is as small as possible; ties give the extra vCPUs to the lower nodes).
  Memory follows the vCPUs: in whole units (MiB, or pages for hugepage-backed VMs) each cell
  gets floor(total x cell vCPUs / vCPUs), and the few leftover units go to the cells whose
  node still has room, lowest node first. Every cell gets at least one unit.
* SMT policy. ``prefer``: fill both threads of a core with one VM before opening another
  core, and put an odd vCPU on a half-used core. ``isolate``: a VM takes whole cores; the
  unused thread of its last core is held. ``require``: vCPUs come in sibling pairs, so odd
  counts are rejected on SMT hosts; a host without SMT behaves as ``prefer``.
* Emulator threads of pinned VMs go to the reserved CPUs on the VM's nodes, else all
  reserved CPUs, else the shared pool of the VM's nodes, else the host-wide shared pool,
  else (nothing left) the VM's own pinned CPUs.
* SR-IOV. Each SR-IOV NIC takes one VF of its PF, counted against the VFs the PF has
  enabled (``sriov_numvfs``: only enabled VFs exist to be passed through, so counting
  ``sriov_totalvfs`` would approve what compose then refuses). Which NICs are SR-IOV comes
  from the resolved attachments when the caller has them (`plan`'s ``nics``: an interface
  mapped through the `networks` option, ``fast: {sriov-pf: enp65s0f0}``, is as much SR-IOV as
  one that names mode sriov and a parent), else from the request's own mode sriov and
  ``parent``. The VM prefers the PF's NUMA node; ``numa_strict`` makes it a must (the node
  must be one of the VM's nodes), which only a NUMA-bound VM (pinned or hugepage-backed) can
  honour: a floating VM asking for it is rejected. A NIC whose NUMA node the kernel does not
  report constrains nothing.
* Placement cost. Every node set that fits is priced in vCPUs: the vCPUs of future requests
  the placement is expected to make unplaceable, plus what a span or a missed NIC costs the
  VM itself. The cheapest wins; ties go to the best fit (fewest free CPUs left on the chosen
  nodes), then the fewest free 1G pages left there (a 1G VM takes the tightest pages, other
  VMs stay off nodes whose pages 1G VMs will need), then the least memory left, then the
  lowest node ids. The terms:

  - node kept from being whole: a node the VM takes some but not all of the free CPUs of
    costs its CPUs / (k + 1), k the VMs already pinned there. With VMs leaving independently
    of one another and of their age, a node holding k VMs is whole again when the last one
    leaves, H(k) = 1 + 1/2 + ... + 1/k mean lifetimes from now; one more VM puts that off by
    H(k + 1) - H(k) = 1/(k + 1) lifetime. Breaking an empty node (k = 0) puts it off a whole
    lifetime and costs all its CPUs (a VM of the node's size can go nowhere else), so a
    lifetime of a node is priced at its CPUs, and a VM joins the nodes it delays least: the
    busiest, leaving nodes that are nearly empty to empty. A VM that fills a node's last free
    CPUs costs nothing here: the node is full, no CPU of it idles while it waits;
  - whole core split: 0.5 per free core the VM takes one thread of (the other thread then
    serves only an odd vCPU count);
  - 1G pages stranded: each 1G page the placement leaves on a node with fewer free CPUs than
    free pages (only pages this placement newly strands) costs the share of vCPUs that ask
    for 1G pages on this host, learned from the VMs it holds and this request, starting from
    a prior: share = (prior x W + 1G vCPUs seen) / (W + vCPUs seen), where the prior is
    host 1G pages / host CPUs (capped at 1: the share the pages could back at one page per
    vCPU) and W is the CPUs of the largest node (the prior weighs one node's worth of VMs);
  - distance: a span over several nodes costs vCPUs x (mean pairwise NUMA distance / 10 - 1),
    1.1 per vCPU at the usual remote distance 21; one node costs 0;
  - NIC alignment: missing every preferred SR-IOV NIC node costs the host's CPU count, more
    than all other terms together, so the preference holds whenever it can.

  Spans on more nodes are compared with fewer ones: a VM allowed two nodes that would break
  an empty node on one spans two partly used nodes instead when its distance term and what
  it costs those nodes come to less than the empty node's CPUs. Wider spans are tried only
  while their least possible distance term is below the best cost found.

  Worked example. Two nodes of 4 cores x 2 threads (8 CPUs each, distance 21); node 0 has 4
  1G pages and 4 of its CPUs (two whole cores) pinned by one 4-vCPU VM without pages, node 1
  is empty and has no pages. A 2-vCPU VM with numa-nodes 2 arrives. The 1G share is
  (4/16 x 8 + 0) / (8 + 4 + 2) = 2/14 = 0.14.
  node 0 (k = 1): kept from being whole 8/2 = 4, a whole core taken (no split), 2 CPUs left
  for 4 pages: 2 pages stranded x 0.14 = 0.29; 4.29 in all. node 1 (k = 0): 8/1 = 8.
  nodes 0 and 1 (1 + 1): node 1 8 + node 0 4 + one core split on each (0.5 + 0.5) +
  distance 2 x 1.1 (2.2) + 1 page stranded on node 0 (0.14) = 15.34. The VM goes on node 0.
  Had node 1 held two 2-vCPU VMs (two whole cores, 4 CPUs free) instead of being empty, the
  share would be 2 / (8 + 8 + 2) = 0.11, node 0 would cost 4 + 2 x 0.11 = 4.22 and node 1
  (k = 2) 8/3 = 2.67: the VM would join the two VMs on node 1, and node 0, with one VM, is
  the likelier to be whole again soon.
* Speed. Node sets are never permuted: single nodes are scored one by one; spans enumerate
  combinations only while there are few of them, and otherwise grow sets greedily from every
  seed node by NUMA distance. Capacity bounds reject impossible requests before any search.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vmhost.model import (
    KIB_PER_MIB,
    PAGE_1G_KIB,
    PAGE_2M_KIB,
    AttachmentKind,
    CellPlacement,
    HostTopology,
    HugepageRequest,
    InterfaceMode,
    InvalidRequestError,
    NicAttachment,
    Placement,
    Policy,
    Rejection,
    VfAssignment,
    VmSpec,
    page_label,
)

SMT_POLICIES = ("prefer", "isolate", "require")
_MAX_COMBINATIONS = 64
"""Above this many node sets of one size, grow sets greedily instead of enumerating them."""

# ---------------------------------------------------------------------------------------------
# Usage report


@dataclass(frozen=True)
class HugepageUsage:
    """Huge pages of one size on one node.

    ``allocated + unavailable + free == total``: ``unavailable`` are pages the kernel reports
    in use beyond what the allocations account for (used outside vm-host).
    """

    size_kib: int
    total: int
    allocated: int
    unavailable: int
    free: int

    @property
    def label(self) -> str:
        """The page size as people write it ("2M", "1G")."""
        return page_label(self.size_kib)


@dataclass(frozen=True)
class NodeUsage:
    """One NUMA node's CPUs, general memory and huge pages.

    ``cpus_total == cpus_reserved + cpus_pinned + cpus_held + cpus_shared_pool``.
    ``memory_total_mib == memory_reserved_mib + memory_bound_mib + memory_free_mib`` where
    bound memory is that of NUMA-bound (pinned) cells; floating VMs count host-wide only.
    """

    node: int
    cpus_total: int
    cpus_reserved: int
    cpus_pinned: int
    cpus_held: int
    """Idle siblings of pinned threads under smt-policy isolate (count as used)."""
    cpus_shared_pool: int
    cpus_free_for_pinning: int
    """The most pinned vCPUs one request could take on this node now, by the allocator's own
    rules: shared-pool CPUs of the node (under smt-policy require on an SMT host only the
    threads that still form sibling pairs), no more than may leave the shared pool without
    overbooking the shared VMs (`HostUsage.pinnable_cpus`), counting under isolate the
    sibling a pick leaves idle."""
    memory_total_mib: int
    """General memory (node memory minus huge pages)."""
    memory_reserved_mib: int
    memory_bound_mib: int
    memory_free_mib: int
    hugepages: tuple[HugepageUsage, ...] = ()
    cpu_states: Mapping[int, str] = field(default_factory=dict)
    """Host CPU -> "pinned", "reserved", "held-idle", "free" (free for pinning) or "shared-pool"
    (in the shared pool but not pinnable, for example a lone thread under smt-policy require);
    the per-CPU view of the counts above, for the NUMA map."""


@dataclass(frozen=True)
class NicUsage:
    """SR-IOV VFs of one host NIC."""

    nic: str
    numa_node: int | None
    vfs_total: int
    vfs_enabled: int
    vfs_used: int
    vfs_free: int


@dataclass(frozen=True)
class HostUsage:
    """What the host has and what the allocations take, for show-resources and status."""

    nodes: tuple[NodeUsage, ...]
    nics: tuple[NicUsage, ...]
    cpu_overcommit_ratio: float
    memory_overcommit_ratio: float
    shared_pool_cpus: int
    pinnable_cpus: int
    """CPUs that may still leave the shared pool for pinning without overbooking shared VMs."""
    cpus_pinnable: int
    """Pinned vCPUs the host can still give out in all (a request spanning every node), by
    the allocator's rules: the per-node pinnable CPUs before the shared-VM budget, no more
    than `pinnable_cpus`. What the status line calls free."""
    shared_vcpus_allocated: int
    shared_vcpus_capacity: int
    """floor(shared pool x cpu ratio)."""
    memory_general_mib: int
    """General memory of all nodes minus the reserved memory."""
    memory_allocated_mib: int
    """General memory of all VMs that are not hugepage-backed."""
    memory_capacity_mib: int
    """floor(general memory x memory ratio)."""
    vms: int

    @property
    def cpus_total(self) -> int:
        """Every host CPU."""
        return sum(n.cpus_total for n in self.nodes)

    @property
    def cpus_free(self) -> int:
        """CPUs neither reserved nor pinned (nor held idle by smt-policy isolate)."""
        return sum(n.cpus_shared_pool for n in self.nodes)

    @property
    def numa_nodes(self) -> int:
        """Number of host NUMA nodes."""
        return len(self.nodes)

    def summary(self) -> str:
        """One line for the status: "2 NUMA nodes, 40/48 CPUs free"."""
        plural = "node" if self.numa_nodes == 1 else "nodes"
        return f"{self.numa_nodes} NUMA {plural}, {self.cpus_free}/{self.cpus_total} CPUs free"

    def status_summary(self) -> str:
        """One line for the status, counting the CPUs pinned VMs can really still take.

        `summary` counts the shared pool, which shared VMs may already fill; this one counts
        `cpus_pinnable`, so "2/32 CPUs free" is never followed by a refused 1-CPU pinned VM.
        """
        plural = "node" if self.numa_nodes == 1 else "nodes"
        free = self.cpus_pinnable
        return f"{self.numa_nodes} NUMA {plural}, {free}/{self.cpus_total} CPUs free"


# ---------------------------------------------------------------------------------------------
# The host state every decision starts from


def _check_policy(policy: Policy) -> None:
    if policy.smt_policy not in SMT_POLICIES:
        raise InvalidRequestError(
            "smt-policy", f"{policy.smt_policy!r} is not one of {', '.join(SMT_POLICIES)}"
        )


class _Index:
    """What a topology says about nodes, cores and CPUs, independent of any allocation."""

    def __init__(self, topology: HostTopology) -> None:
        self.nodes = tuple(sorted(topology.nodes, key=lambda n: n.id))
        self.node_ids = tuple(n.id for n in self.nodes)
        self.node_by_id = {n.id: n for n in self.nodes}
        self.node_of: dict[int, int] = {}
        self.node_cpus: dict[int, tuple[int, ...]] = {}
        for node in self.nodes:
            self.node_cpus[node.id] = node.cpu_ids
            self.node_of.update(dict.fromkeys(node.cpu_ids, node.id))
        # Cores are sibling threads on one node; a CPU without sibling data is its own core
        # (never guess cores from ids that a parser may have left at their defaults).
        self.core_of: dict[int, tuple[int, ...]] = {}
        self.node_cores: dict[int, tuple[tuple[int, ...], ...]] = {}
        for node in self.nodes:
            cores: set[tuple[int, ...]] = set()
            for cpu in node.cpus:
                threads = {s for s in cpu.siblings if self.node_of.get(s) == node.id}
                core = tuple(sorted(threads | {cpu.id}))
                cores.add(core)
                self.core_of[cpu.id] = core
            self.node_cores[node.id] = tuple(sorted(cores))
        self.smt = any(len(c) > 1 for cores in self.node_cores.values() for c in cores)
        self.dist = {a: {b: self._distance(a, b) for b in self.node_ids} for a in self.node_ids}

    def _distance(self, a: int, b: int) -> int:
        """NUMA distance between two nodes (10 local, 20 remote when the host does not say)."""
        if a == b:
            return 10
        dist = self.node_by_id[a].distances.get(b)
        if dist is None:
            dist = self.node_by_id[b].distances.get(a)
        return int(dist) if dist is not None else 20


_INDEX_CACHE: dict[int, tuple[weakref.ref[HostTopology], _Index]] = {}
_INDEX_CACHE_SIZE = 8


def _index(topology: HostTopology) -> _Index:
    """Index a topology once; callers plan many VMs against the same host object.

    Records are frozen, so an index stays valid while its topology object lives; entries are
    keyed by identity and checked through a weak reference, so a reused id never matches.
    """
    entry = _INDEX_CACHE.get(id(topology))
    if entry is not None and entry[0]() is topology:
        return entry[1]
    index = _Index(topology)
    if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
    _INDEX_CACHE[id(topology)] = (weakref.ref(topology), index)
    return index


class _Host:
    """Indexes of a topology and the resources its allocations take."""

    def __init__(
        self, topology: HostTopology, allocations: Sequence[Placement], policy: Policy
    ) -> None:
        _check_policy(policy)
        self.policy = policy
        self.topology = topology
        index = _index(topology)
        self.nodes = index.nodes
        self.node_ids = index.node_ids
        self.node_by_id = index.node_by_id
        self.node_of = index.node_of
        self.node_cpus = index.node_cpus
        self.core_of = index.core_of
        self.node_cores = index.node_cores
        self.smt = index.smt
        self.dist = index.dist
        self.isolate = policy.smt_policy == "isolate"
        self.require = policy.smt_policy == "require" and self.smt
        self.reserved = frozenset(c for c in policy.reserved_cpus if c in self.node_of)
        self._account(allocations)
        self._pools()
        self._memory()

    def _account(self, allocations: Sequence[Placement]) -> None:
        self.pinned: set[int] = set()
        self.shared_vcpus = 0
        self.general_allocated = 0
        self.bound_mib = dict.fromkeys(self.node_ids, 0)
        self.pages_used: dict[tuple[int, int], int] = {}
        self.vfs_used: dict[str, int] = {}
        self.vcpus_held = 0
        self.vcpus_held_1g = 0
        self.pinned_vms = dict.fromkeys(self.node_ids, 0)
        for alloc in allocations:
            for nd in {c.host_node for c in alloc.cells if c.cpus}:
                if nd in self.pinned_vms:
                    self.pinned_vms[nd] += 1
            self.vcpus_held += alloc.vcpus
            if any(c.hugepage_size_kib == PAGE_1G_KIB and c.hugepages for c in alloc.cells):
                self.vcpus_held_1g += alloc.vcpus
            self.pinned.update(alloc.pinned_cpus)
            self.shared_vcpus += alloc.shared_vcpus
            self.general_allocated += alloc.general_memory_mib
            for cell in alloc.cells:
                if cell.hugepages and cell.hugepage_size_kib:
                    key = (cell.host_node, cell.hugepage_size_kib)
                    self.pages_used[key] = self.pages_used.get(key, 0) + cell.hugepages
                elif cell.cpus and cell.host_node in self.bound_mib:
                    self.bound_mib[cell.host_node] += cell.memory_mib
            for vf in alloc.vfs:
                self.vfs_used[vf.nic] = self.vfs_used.get(vf.nic, 0) + vf.count

    def _pools(self) -> None:
        self.held: set[int] = set()
        if self.isolate:
            for cpu in self.pinned:
                core = self.core_of.get(cpu, (cpu,))
                self.held.update(t for t in core if t not in self.pinned)
            self.held -= self.reserved
        busy = self.pinned | self.held | self.reserved
        self.pool = frozenset(c for c in self.node_of if c not in busy)
        self.node_pool = {
            nd: tuple(c for c in cpus if c in self.pool) for nd, cpus in self.node_cpus.items()
        }
        self.node_usable = {
            nd: sum(1 for c in cpus if c not in self.reserved)
            for nd, cpus in self.node_cpus.items()
        }

    def _memory(self) -> None:
        # reserved_memory_mib comes out of the lowest-numbered nodes first.
        self.general_mib: dict[int, int] = {}
        self.reserved_mib: dict[int, int] = {}
        left = max(0, self.policy.reserved_memory_mib)
        for node in self.nodes:
            general = node.general_memory_kib // KIB_PER_MIB
            taken = min(left, general)
            left -= taken
            self.general_mib[node.id] = general
            self.reserved_mib[node.id] = taken
        self.general_total = sum(self.general_mib.values()) - sum(self.reserved_mib.values())
        ratio = self.policy.memory_overcommit_ratio
        self.general_capacity = math.floor(self.general_total * ratio)

    # -- derived views ------------------------------------------------------------------------

    def pool_on(self, node: int) -> tuple[int, ...]:
        """Shared-pool CPUs of a node, sorted."""
        return self.node_pool[node]

    def bound_free_mib(self, node: int) -> int:
        """General memory of a node still free for NUMA-bound cells."""
        return self.general_mib[node] - self.reserved_mib[node] - self.bound_mib[node]

    def pages_total(self, node: int, size_kib: int) -> int:
        """Pages of a size configured on a node."""
        return int(self.node_by_id[node].hugepages_total.get(size_kib, 0))

    def pages_free(self, node: int, size_kib: int) -> int:
        """Pages of a size a new VM can take on a node."""
        n = self.node_by_id[node]
        ledger = self.pages_total(node, size_kib) - self.pages_used.get((node, size_kib), 0)
        kernel = int(n.hugepages_free.get(size_kib, n.hugepages_total.get(size_kib, 0)))
        return max(0, min(ledger, kernel))

    def shared_capacity(self, pool_size: int) -> int:
        """Shared vCPUs a pool of this many CPUs can carry."""
        return math.floor(pool_size * self.policy.cpu_overcommit_ratio)

    def distance_sum(self, nodes: Sequence[int]) -> int:
        """Sum of pairwise NUMA distances of a node set."""
        return sum(self.dist[a][b] for a, b in itertools.combinations(nodes, 2))

    def pool_budget(self) -> int:
        """How many CPUs may leave the shared pool without overbooking shared VMs."""
        if self.shared_vcpus == 0:
            return len(self.pool)
        ratio = self.policy.cpu_overcommit_ratio
        if ratio <= 0:
            return 0
        # Smallest pool whose floor(pool x ratio) still covers the shared vCPUs.
        needed = math.ceil(self.shared_vcpus / ratio)
        while needed > 0 and self.shared_capacity(needed - 1) >= self.shared_vcpus:
            needed -= 1
        while self.shared_capacity(needed) < self.shared_vcpus:
            needed += 1
        return max(0, len(self.pool) - needed)

    def pool_reason(self, taking: int) -> str:
        """Explain why taking CPUs out of the shared pool would overbook shared VMs."""
        ratio = _fmt_ratio(self.policy.cpu_overcommit_ratio)
        left = len(self.pool) - taking
        return (
            f"taking {taking} CPUs out of the shared pool of {len(self.pool)} would leave "
            f"{left} CPUs x cpu ratio {ratio} = {self.shared_capacity(left)} vCPUs for shared "
            f"VMs that already use {self.shared_vcpus}"
        )


# ---------------------------------------------------------------------------------------------
# Usage


def _pairable(host: _Host, node: int) -> int:
    """Free threads of a node that still form sibling pairs."""
    return sum(sum(1 for t in core if t in host.pool) // 2 * 2 for core in host.node_cores[node])


def _cpu_states(host: _Host, node: int) -> dict[int, str]:
    states: dict[int, str] = {}
    for core in host.node_cores[node]:
        free = [t for t in core if t in host.pool]
        pinnable = set(free[: len(free) // 2 * 2]) if host.require else set(free)
        for cpu in core:
            if cpu in host.pinned:
                states[cpu] = "pinned"
            elif cpu in host.reserved:
                states[cpu] = "reserved"
            elif cpu in host.held:
                states[cpu] = "held-idle"
            else:
                states[cpu] = "free" if cpu in pinnable else "shared-pool"
    return states


def usage(topology: HostTopology, allocations: Sequence[Placement], policy: Policy) -> HostUsage:
    """Report what the host has and what the allocations take.

    The numbers are the allocator's own view (the same pools and rules `plan` uses), so what
    show-resources prints is exactly what the next plan will see.

    Args:
        topology: the host.
        allocations: placements of every VM on the host (running or not).
        policy: the host-wide placement rules.

    Returns:
        Per-node and host-wide usage.
    """
    host = _Host(topology, allocations, policy)
    budget = host.pool_budget()
    nodes: list[NodeUsage] = []
    for node in host.nodes:
        cpus = host.node_cpus[node.id]
        pages: list[HugepageUsage] = []
        for size in sorted(set(node.hugepages_total) | set(node.hugepages_free)):
            total = host.pages_total(node.id, size)
            allocated = host.pages_used.get((node.id, size), 0)
            free = host.pages_free(node.id, size)
            pages.append(
                HugepageUsage(
                    size_kib=size,
                    total=total,
                    allocated=allocated,
                    unavailable=total - allocated - free,
                    free=free,
                )
            )
        pool = len(host.pool_on(node.id))
        nodes.append(
            NodeUsage(
                node=node.id,
                cpus_total=len(cpus),
                # A reserved CPU that a VM still uses (the reservation came later) counts as
                # pinned, so every CPU is counted exactly once.
                cpus_reserved=sum(1 for c in cpus if c in host.reserved and c not in host.pinned),
                cpus_pinned=sum(1 for c in cpus if c in host.pinned),
                cpus_held=sum(1 for c in cpus if c in host.held),
                cpus_shared_pool=pool,
                cpus_free_for_pinning=_pinnable_on(host, node.id, budget),
                memory_total_mib=host.general_mib[node.id],
                memory_reserved_mib=host.reserved_mib[node.id],
                memory_bound_mib=host.bound_mib[node.id],
                memory_free_mib=host.bound_free_mib(node.id),
                hugepages=tuple(pages),
                cpu_states=_cpu_states(host, node.id),
            )
        )
    nics: list[NicUsage] = []
    for nic in sorted(topology.nics, key=lambda n: n.name):
        if nic.sriov_total_vfs <= 0 and nic.name not in host.vfs_used:
            continue
        used = host.vfs_used.get(nic.name, 0)
        nics.append(
            NicUsage(
                nic=nic.name,
                numa_node=nic.numa_node,
                vfs_total=nic.sriov_total_vfs,
                vfs_enabled=nic.sriov_enabled_vfs,
                vfs_used=used,
                vfs_free=max(0, nic.sriov_enabled_vfs - used),
            )
        )
    return HostUsage(
        nodes=tuple(nodes),
        nics=tuple(nics),
        cpu_overcommit_ratio=policy.cpu_overcommit_ratio,
        memory_overcommit_ratio=policy.memory_overcommit_ratio,
        shared_pool_cpus=len(host.pool),
        pinnable_cpus=budget,
        cpus_pinnable=min(budget, sum(_node_cap(host, n.id) for n in host.nodes))
        // (2 if host.require else 1)
        * (2 if host.require else 1),
        shared_vcpus_allocated=host.shared_vcpus,
        shared_vcpus_capacity=host.shared_capacity(len(host.pool)),
        memory_general_mib=host.general_total,
        memory_allocated_mib=host.general_allocated,
        memory_capacity_mib=host.general_capacity,
        vms=len(allocations),
    )


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Planning


class _Reject(Exception):  # noqa: N818 - internal control flow, never escapes plan()
    """Carries a rejection reason out of nested helpers."""


def _fmt_cpus(cpus: Iterable[int]) -> str:
    return ", ".join(str(c) for c in sorted(cpus))


def _fmt_nodes(nodes: Sequence[int]) -> str:
    word = "node" if len(nodes) == 1 else "nodes"
    return f"{word} {', '.join(str(n) for n in nodes)}"


def _pinned(n: int) -> str:
    return "1 pinned CPU" if n == 1 else f"{n} pinned CPUs"


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio:g}"


@dataclass(frozen=True)
class _Units:
    """How a request's memory is counted: MiB of general memory, or pages of one size."""

    page_kib: int | None
    total: int

    @property
    def mib_per_unit(self) -> int:
        return 1 if self.page_kib is None else self.page_kib // KIB_PER_MIB

    @property
    def kind(self) -> str:
        return "memory" if self.page_kib is None else f"{page_label(self.page_kib)} huge pages"

    def describe(self, units: int) -> str:
        if self.page_kib is None:
            return f"{units} MiB"
        return f"{units} pages ({units * self.mib_per_unit} MiB)"


@dataclass(frozen=True)
class _Candidate:
    nodes: tuple[int, ...]
    counts: tuple[int, ...]
    units: tuple[int, ...]
    cpus: tuple[tuple[int, ...], ...]
    score: tuple[object, ...] = ()
    cost: float = 0.0
    """The placement cost in vCPUs (the first element of the score)."""


@dataclass(frozen=True)
class _Sriov:
    """What the request's SR-IOV interfaces ask of the host."""

    vfs: tuple[VfAssignment, ...]
    prefer_nodes: tuple[int, ...]
    strict_nodes: tuple[int, ...]


def _split_units(
    total: int, n: int, counts: Sequence[int], free: Sequence[int]
) -> tuple[int, ...] | None:
    """Split memory units over cells in proportion to their vCPUs (the module's split rule)."""
    base = [total * c // n for c in counts]
    if any(b < 1 or b > f for b, f in zip(base, free, strict=True)):
        return None
    left = total - sum(base)
    for i in range(len(base)):
        give = min(left, free[i] - base[i])
        base[i] += give
        left -= give
    return tuple(base) if left == 0 else None


def _unit_cap(total: int, n: int, free: int) -> int:
    """Largest vCPU count whose share floor(total x c / n) fits in `free` units."""
    return ((free + 1) * n - 1) // total


def _even_counts(n: int, step: int, lo: int, his: Sequence[int]) -> tuple[int, ...] | None:
    """Most even split of n vCPUs with each cell in [lo, hi] and a multiple of step.

    Water-filling: the smallest level L such that min(hi, max(lo, L)) covers n, then the
    surplus is taken back from cells at level L, highest node first.
    """
    k = len(his)
    if n % step or lo * k > n or any(h < lo for h in his):
        return None
    units, lo_u = n // step, lo // step
    his_u = [h // step for h in his]
    if sum(his_u) < units:
        return None
    low, high = lo_u, max(his_u)
    while low < high:
        mid = (low + high) // 2
        if sum(min(h, max(lo_u, mid)) for h in his_u) >= units:
            high = mid
        else:
            low = mid + 1
    counts = [min(h, max(lo_u, low)) for h in his_u]
    excess = sum(counts) - units
    for i in reversed(range(k)):
        if excess and counts[i] == low and counts[i] > lo_u:
            counts[i] -= 1
            excess -= 1
    return tuple(c * step for c in counts) if excess == 0 else None


class _Planner:
    """Per-request view of the host, with the per-node work cached."""

    def __init__(self, host: _Host, spec: VmSpec) -> None:
        self.host = host
        self.spec = spec
        self._avail: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        self._picks: dict[tuple[int, int], tuple[tuple[int, ...], int]] = {}
        self._caps: dict[int, int] = {}

    def avail(self, node: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """(core, its free threads) for the node's cores with any free thread."""
        if node not in self._avail:
            self._avail[node] = _free_threads(self.host, node)
        return self._avail[node]

    def cpu_cap(self, node: int) -> int:
        """Pinned vCPUs the node can take under the SMT policy."""
        if node not in self._caps:
            self._caps[node] = _node_cap(self.host, node)
        return self._caps[node]

    def pick(self, node: int, count: int) -> tuple[tuple[int, ...], int]:
        """Choose `count` CPUs on a node; also return how many whole free cores it breaks."""
        key = (node, count)
        if key not in self._picks:
            avail = self.avail(node)
            chosen = _choose(self.host, avail, count)
            taken = set(chosen)
            broken = sum(
                1
                for core, free in avail
                if len(free) == len(core) and 0 < len(taken.intersection(free)) < len(core)
            )
            order = sorted(chosen, key=lambda c: (self.host.core_of[c], c))
            self._picks[key] = (tuple(order), broken)
        return self._picks[key]

    def held_after(self, cpus: Iterable[int]) -> int:
        """CPUs an isolate placement leaves idle on its cores (they count as used)."""
        return _held_after(self.host, cpus)


def _free_threads(host: _Host, node: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(core, its free threads) for the node's cores with any free thread."""
    pairs = [(core, tuple(t for t in core if t in host.pool)) for core in host.node_cores[node]]
    return [(core, free) for core, free in pairs if free]


def _choose(
    host: _Host, avail: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], count: int
) -> list[int]:
    """The CPUs a pinned cell of `count` vCPUs takes from these free threads."""
    return _pick_pairs(avail, count) if host.require else _pick_fill(avail, count)


def _held_after(host: _Host, cpus: Iterable[int]) -> int:
    """CPUs an isolate placement leaves idle on its cores (they count as used)."""
    if not host.isolate:
        return 0
    taken = set(cpus)
    held = {t for c in taken for t in host.core_of[c] if t in host.pool}
    return len(held - taken)


def _node_cap(host: _Host, node: int) -> int:
    """Pinned vCPUs the node's free threads can carry under the SMT policy."""
    return _pairable(host, node) if host.require else len(host.pool_on(node))


def _pinnable_on(host: _Host, node: int, budget: int) -> int:
    """The most pinned vCPUs one request can take on a node.

    The planner's own pick and budget check (`_Search._best_of`), for each count from the
    node's cap down.
    """
    step = 2 if host.require else 1
    avail = _free_threads(host, node)
    count = min(_node_cap(host, node), budget) // step * step
    while count > 0:
        chosen = _choose(host, avail, count)
        if len(chosen) == count and count + _held_after(host, chosen) <= budget:
            return count
        count -= step
    return 0


def _pick_pairs(avail: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], count: int) -> list[int]:
    """Sibling pairs, whole cores first so cores that are already split stay for others."""
    ordered = sorted(avail, key=lambda cf: (len(cf[1]) != len(cf[0]), -len(cf[1]), cf[0]))
    chosen: list[int] = []
    for _core, free in ordered:
        for i in range(0, len(free) - 1, 2):
            if len(chosen) < count:
                chosen += [free[i], free[i + 1]]
    return chosen


def _pick_fill(avail: Sequence[tuple[tuple[int, ...], tuple[int, ...]]], count: int) -> list[int]:
    """Fill whole cores first; the remainder goes to the core that fits it best.

    Takes the largest chunk of free threads that does not overshoot (whole cores for whole
    multiples, a half-used core before a whole one of the same size), and when every core has
    more free threads than still needed, the one with the fewest. Under isolate the threads
    left on the last core are held by the caller's accounting.
    """
    # One pass over the cores by (most free threads, half-used first, core): a core is taken
    # when its free threads do not overshoot; need only shrinks, so a core skipped once never
    # fits later. Whatever is left comes from the core with the fewest free threads.
    order = sorted(avail, key=lambda cf: (-len(cf[1]), len(cf[1]) == len(cf[0]), cf[0]))
    need = count
    chosen: list[int] = []
    skipped = []
    for core_free in order:
        free = core_free[1]
        if len(free) <= need:
            chosen += free
            need -= len(free)
        else:
            skipped.append(core_free)
        if need == 0:
            return chosen
    if skipped:
        last = min(skipped, key=lambda cf: (len(cf[1]), len(cf[1]) == len(cf[0]), cf[0]))
        chosen += last[1][:need]
    return chosen


def plan(
    topology: HostTopology,
    allocations: Sequence[Placement],
    spec: VmSpec,
    policy: Policy,
    nics: Sequence[NicAttachment] | None = None,
) -> Placement | Rejection:
    """Choose where a VM's resources come from, or say why it cannot be placed.

    Args:
        topology: the host.
        allocations: placements of every VM on the host (running or not).
        spec: the validated request.
        policy: the host-wide placement rules.
        nics: the request's NICs as resolved on this host (networks.resolve), when known:
            their SR-IOV (hostdev) attachments are the VFs counted and aligned. None reads
            SR-IOV from the request's own mode and parent.

    Returns:
        A Placement, or a Rejection whose reason carries the numbers an operator needs.

    Raises:
        InvalidRequestError: when the policy itself is invalid (an unknown smt-policy).
    """
    host = _Host(topology, allocations, policy)
    try:
        return _plan(host, spec, nics)
    except _Reject as exc:
        return Rejection(str(exc))


def _plan(host: _Host, spec: VmSpec, nics: Sequence[NicAttachment] | None = None) -> Placement:
    cpu_nodes = _check_shape(host, spec)
    sriov = _check_sriov(host, spec, nics)
    sizes = _page_sizes(spec)
    if spec.hugepages is None:
        _check_general_memory(host, spec)
    if not spec.pinned:
        _check_shared_vcpus(host, spec)
        if spec.hugepages is None:
            if sriov.strict_nodes:
                raise _Reject(
                    "an SR-IOV interface asks for strict NUMA alignment, which needs pinned "
                    "CPUs or huge pages; this request has neither"
                )
            return Placement(vcpus=spec.vcpus, memory_mib=spec.memory_mib, vfs=sriov.vfs)
    planner = _Planner(host, spec)
    if spec.pinned_cpus is not None:
        return _plan_explicit(planner, spec, sizes, sriov)
    if spec.pinned and host.require and spec.vcpus % 2:
        raise _Reject(
            f"smt-policy require gives vCPUs in sibling pairs; {spec.vcpus} pinned vCPUs is "
            "an odd count: ask for an even one"
        )
    errors: list[str] = []
    for size in sizes:
        units = _units_for(spec, size)
        found = _Search(planner, units, cpu_nodes, sriov).run()
        if isinstance(found, _Candidate):
            return _build(planner, units, found, sriov.vfs)
        errors.append(found)
    raise _Reject("; ".join(errors))


def _check_shape(host: _Host, spec: VmSpec) -> list[int]:
    """Check what does not depend on free resources; return the nodes that have CPUs."""
    if spec.vcpus < 1:
        raise _Reject(f"needs at least 1 vCPU; the request asks for {spec.vcpus}")
    if spec.memory_mib < 1:
        raise _Reject(f"needs memory; the request asks for {spec.memory_mib} MiB")
    if spec.numa_nodes < 1:
        raise _Reject(f"numa-nodes must be at least 1; the request asks for {spec.numa_nodes}")
    cpu_nodes = [n for n in host.node_ids if host.node_cpus[n]]
    if not cpu_nodes:
        raise _Reject("no NUMA node of this host has CPUs")
    if spec.numa_nodes > len(cpu_nodes):
        raise _Reject(
            f"asks to span up to {spec.numa_nodes} NUMA nodes; this host has "
            f"{len(cpu_nodes)} with CPUs"
        )
    if spec.pinned and spec.pinned_count != spec.vcpus:
        raise _Reject(
            f"pins {spec.pinned_count} host CPUs for {spec.vcpus} vCPUs; a pinned VM needs "
            "exactly one host CPU per vCPU"
        )
    if spec.pinned_cpus is not None and not spec.pinned:
        raise _Reject("lists host CPUs to pin but pinned-cores is 0")
    return cpu_nodes


def _page_sizes(spec: VmSpec) -> list[int | None]:
    """Page sizes to try in order: 2M before 1G for `any`, keeping 1G pages for 1G asks."""
    if spec.hugepages is None:
        return [None]
    if spec.hugepages == HugepageRequest.P2M:
        sizes = [PAGE_2M_KIB]
    elif spec.hugepages == HugepageRequest.P1G:
        sizes = [PAGE_1G_KIB]
    else:
        sizes = [PAGE_2M_KIB, PAGE_1G_KIB]
    usable: list[int | None] = [s for s in sizes if spec.memory_mib * KIB_PER_MIB % s == 0]
    if not usable:
        label = " or ".join(page_label(s) for s in sizes)
        raise _Reject(f"memory {spec.memory_mib} MiB is not a whole number of {label} huge pages")
    return usable


def _units_for(spec: VmSpec, size: int | None) -> _Units:
    if size is None:
        return _Units(None, spec.memory_mib)
    return _Units(size, spec.memory_mib * KIB_PER_MIB // size)


def _unit_free(host: _Host, units: _Units, node: int) -> int:
    if units.page_kib is None:
        return max(0, host.bound_free_mib(node))
    return host.pages_free(node, units.page_kib)


def _check_general_memory(host: _Host, spec: VmSpec) -> None:
    if host.general_allocated + spec.memory_mib > host.general_capacity:
        ratio = _fmt_ratio(host.policy.memory_overcommit_ratio)
        left = max(0, host.general_capacity - host.general_allocated)
        raise _Reject(
            f"needs {spec.memory_mib} MiB of general memory; {host.general_allocated} of "
            f"{host.general_capacity} MiB are allocated ({host.general_total} MiB x memory "
            f"ratio {ratio}), {left} MiB left"
        )


def _check_shared_vcpus(host: _Host, spec: VmSpec) -> None:
    capacity = host.shared_capacity(len(host.pool))
    if host.shared_vcpus + spec.vcpus > capacity:
        ratio = _fmt_ratio(host.policy.cpu_overcommit_ratio)
        raise _Reject(
            f"needs {spec.vcpus} shared vCPUs; {host.shared_vcpus} of {capacity} are "
            f"allocated ({len(host.pool)} shared-pool CPUs x cpu ratio {ratio}), "
            f"{max(0, capacity - host.shared_vcpus)} left"
        )


def _sriov_nics(spec: VmSpec, nics: Sequence[NicAttachment] | None) -> list[tuple[str, str, bool]]:
    """(label, PF, numa_strict) of every SR-IOV NIC of the request."""
    if nics is None:
        return [
            (i.label, i.parent, i.numa_strict)
            for i in spec.interfaces
            if i.mode == InterfaceMode.SRIOV and i.parent
        ]
    strict = {i.label: i.numa_strict for i in spec.interfaces}
    return [
        (n.label, n.source, strict.get(n.label, False))
        for n in nics
        if n.kind == AttachmentKind.HOSTDEV
    ]


def _check_sriov(host: _Host, spec: VmSpec, resolved: Sequence[NicAttachment] | None) -> _Sriov:
    nics = {n.name: n for n in host.topology.nics}
    counts: dict[str, int] = {}
    prefer: list[int] = []
    strict: list[int] = []
    for label, pf, numa_strict in _sriov_nics(spec, resolved):
        nic = nics.get(pf)
        if nic is None:
            raise _Reject(
                f"SR-IOV interface {label} asks for host NIC {pf!r}, which does not exist"
            )
        counts[nic.name] = counts.get(nic.name, 0) + 1
        if nic.numa_node is None or nic.numa_node not in host.node_by_id:
            continue
        if nic.numa_node not in prefer:
            prefer.append(nic.numa_node)
        if numa_strict and nic.numa_node not in strict:
            strict.append(nic.numa_node)
    vfs = []
    for name in sorted(counts):
        enabled = nics[name].sriov_enabled_vfs
        total = nics[name].sriov_total_vfs
        used = host.vfs_used.get(name, 0)
        if used + counts[name] > enabled:
            more = (
                f"; {total - enabled} more can be enabled (sriov_numvfs {enabled} of "
                f"sriov_totalvfs {total})"
                if total > enabled
                else ""
            )
            raise _Reject(
                f"needs {counts[name]} SR-IOV VFs on {name}; {used} of its {enabled} enabled "
                f"VFs are in use, {max(0, enabled - used)} free{more}"
            )
        vfs.append(VfAssignment(nic=name, count=counts[name]))
    return _Sriov(tuple(vfs), tuple(sorted(prefer)), tuple(sorted(strict)))


@dataclass(frozen=True)
class _Weights:
    """The prices of the placement cost, in vCPUs (see the top of the module)."""

    vcpus: int
    core: float
    page_1g: float
    nic: float
    dist: dict[int, dict[int, int]]
    min_excess: float
    """Smallest (distance / 10 - 1) between two nodes of the host."""
    page_credit: float
    """The most a 1G request can lower the page term (pages it takes that were stranded)."""

    def distance(self, nodes: Sequence[int]) -> float:
        """The distance term: vCPUs x (mean pairwise NUMA distance / 10 - 1), 0 on one node."""
        if len(nodes) < 2:
            return 0.0
        pairs = list(itertools.combinations(nodes, 2))
        mean = sum(self.dist[a][b] for a, b in pairs) / len(pairs)
        return self.vcpus * (mean / 10 - 1)

    def span_floor(self, k: int) -> float:
        """The least a span over k nodes can cost.

        That is the distance term at the closest pair, less the page term's largest credit (a
        1G VM taking pages that were stranded); the other terms are never negative.
        """
        return 0.0 if k < 2 else self.vcpus * self.min_excess - self.page_credit


CORE_SPLIT_VCPUS = 0.5
"""A split core's free thread serves only an odd vCPU count: priced at half a vCPU."""


def _weights(host: _Host, spec: VmSpec, units: _Units) -> _Weights:
    """Price the cost terms for one request on one host (pure: from the host and the request)."""
    cpu_nodes = [nd for nd in host.node_ids if host.node_cpus[nd]]
    cpus = sum(host.node_usable[nd] for nd in cpu_nodes)
    pages = sum(host.pages_total(nd, PAGE_1G_KIB) for nd in cpu_nodes)
    # How often 1G pages are asked for: the share of vCPUs backed by 1G pages among the VMs
    # the host holds and this request, starting from a prior of the share of the host's CPUs
    # its 1G pages could back (one page per vCPU), worth one node's CPUs of evidence.
    prior = min(1.0, pages / cpus) if cpus else 0.0
    weight = max((host.node_usable[nd] for nd in cpu_nodes), default=0)
    seen = host.vcpus_held + spec.vcpus
    seen_1g = host.vcpus_held_1g + (spec.vcpus if units.page_kib == PAGE_1G_KIB else 0)
    share_1g = (prior * weight + seen_1g) / (weight + seen) if weight + seen else 0.0
    excess = [host.dist[a][b] / 10 - 1 for a, b in itertools.combinations(cpu_nodes, 2)]
    return _Weights(
        vcpus=spec.vcpus,
        core=CORE_SPLIT_VCPUS,
        page_1g=share_1g,
        nic=float(cpus),
        dist=host.dist,
        min_excess=max(0.0, min(excess, default=0.0)),
        page_credit=share_1g * units.total if units.page_kib == PAGE_1G_KIB else 0.0,
    )


class _Search:
    """Find the best node set and CPUs for a request counted in one kind of memory unit."""

    def __init__(
        self, planner: _Planner, units: _Units, cpu_nodes: Sequence[int], sriov: _Sriov
    ) -> None:
        self.planner = planner
        self.host = planner.host
        self.spec = planner.spec
        self.units = units
        self.sriov = sriov
        n = self.spec.vcpus
        self.pinned = self.spec.pinned
        self.step = 2 if (self.pinned and self.host.require) else 1
        lo = max(1, -(-n // units.total))
        self.lo = -(-lo // self.step) * self.step
        self.cpu_nodes = tuple(cpu_nodes)
        self.cpu_cap = {nd: planner.cpu_cap(nd) if self.pinned else n for nd in cpu_nodes}
        self.free = {nd: _unit_free(self.host, units, nd) for nd in cpu_nodes}
        self.hi = {
            nd: min(self.cpu_cap[nd], n, _unit_cap(units.total, n, self.free[nd]))
            // self.step
            * self.step
            for nd in cpu_nodes
        }
        self.max_k = max(1, min(self.spec.numa_nodes, len(cpu_nodes), n // self.lo))
        self.usable = [nd for nd in cpu_nodes if self.hi[nd] >= self.lo]
        self.budget = self.host.pool_budget() if self.pinned else None
        self.over_budget = False
        self._orders: list[list[int]] | None = None
        self.weights = _weights(self.host, self.spec, units)

    def run(self) -> _Candidate | str:
        """Return the best candidate, or the reason there is none."""
        n = self.spec.vcpus
        if self.budget is not None and self.budget < n <= len(self.host.pool):
            return f"needs {_pinned(n)}; " + self.host.pool_reason(n)
        strict = self.sriov.strict_nodes
        if len(strict) > self.max_k:
            return (
                f"strict SR-IOV interfaces need NUMA {_fmt_nodes(strict)} but the VM may "
                f"span only {self.max_k}"
            )
        if any(nd not in self.usable for nd in strict):
            return (
                self.explain(list(strict), len(strict))
                + f" (strict SR-IOV alignment to NUMA {_fmt_nodes(strict)})"
            )
        best: _Candidate | None = None
        for k in range(max(1, len(strict)), self.max_k + 1):
            # A span over k nodes costs at least the distance term of its closest pair; once
            # the best candidate so far costs no more than that, wider spans cannot win.
            if best is not None and best.cost <= self.weights.span_floor(k):
                break
            found = self._best_of(k) if self._may_fit(k) else None
            if found is not None and (best is None or found.score < best.score):
                best = found
        if best is not None:
            return best
        if self.over_budget:
            return f"needs {_pinned(n)} on whole cores; " + self.host.pool_reason(n + 1)
        return self.explain(list(self.cpu_nodes), self.max_k)

    def _best_of(self, k: int) -> _Candidate | None:
        """The best-scoring candidate over k nodes, if any fits."""
        best: _Candidate | None = None
        for nodes in self._node_sets(k):
            cand = self._evaluate(nodes)
            if cand is None:
                continue
            if self.budget is not None:
                held = self.planner.held_after(c for cs in cand.cpus for c in cs)
                if self.spec.vcpus + held > self.budget:
                    self.over_budget = True
                    continue
            if best is None or cand.score < best.score:
                best = cand
        return best

    def _may_fit(self, k: int) -> bool:
        """Cheap bound: do the k roomiest usable nodes have enough CPUs and memory at all?"""
        if k > len(self.usable) or k * self.lo > self.spec.vcpus:
            return False
        his = sorted((self.hi[nd] for nd in self.usable), reverse=True)
        frees = sorted((self.free[nd] for nd in self.usable), reverse=True)
        return sum(his[:k]) >= self.spec.vcpus and sum(frees[:k]) >= self.units.total

    def _node_sets(self, k: int) -> list[tuple[int, ...]]:
        strict = self.sriov.strict_nodes
        usable = self.usable
        if k == 1:
            return [(nd,) for nd in usable if not strict or nd in strict]
        if math.comb(len(usable), k) <= _MAX_COMBINATIONS:
            combos = itertools.combinations(usable, k)
            return [s for s in combos if all(nd in s for nd in strict)]
        # Too many to enumerate: grow a set from every seed by NUMA distance, on ties the node
        # that completes the request most tightly (else the roomiest), and add the k roomiest
        # nodes by CPUs and by memory. Growth does not depend on k: each seed's order is
        # computed once and every k takes a prefix of it.
        sets = {tuple(sorted(order[:k])) for order in self._growth() if len(order) >= k}
        rest = [nd for nd in usable if nd not in strict]
        for key in (
            lambda nd: (-self.hi[nd], -self.free[nd], nd),
            lambda nd: (-self.free[nd], -self.hi[nd], nd),
        ):
            top = list(strict) + sorted(rest, key=key)[: k - len(strict)]
            sets.add(tuple(sorted(top)))
        return sorted(sets)

    def _growth(self) -> list[list[int]]:
        """Per seed, the usable nodes in the order a span grows from it (up to max_k)."""
        if self._orders is not None:
            return self._orders
        strict = self.sriov.strict_nodes
        usable = self.usable
        dist_of = self.host.dist
        orders = []
        for seed in strict[:1] or usable:
            chosen = [seed, *(nd for nd in strict if nd != seed)]
            dist = {nd: sum(dist_of[nd][c] for c in chosen) for nd in usable}
            need = self.spec.vcpus - sum(self.hi[c] for c in chosen)
            while len(chosen) < min(self.max_k, len(usable)):
                nxt = min(
                    (nd for nd in usable if nd not in chosen),
                    key=lambda nd: (
                        dist[nd],
                        self.hi[nd] < need,  # nodes that complete the request first,
                        self.hi[nd] if self.hi[nd] >= need else -self.hi[nd],  # best fit
                        -self.free[nd],
                        nd,
                    ),
                )
                chosen.append(nxt)
                need -= self.hi[nxt]
                for nd in usable:
                    dist[nd] += dist_of[nd][nxt]
            orders.append(chosen)
        self._orders = orders
        return orders

    def _evaluate(self, nodes: tuple[int, ...]) -> _Candidate | None:
        n = self.spec.vcpus
        frees = [self.free[nd] for nd in nodes]
        if sum(frees) < self.units.total:
            return None
        counts = _even_counts(n, self.step, self.lo, [self.hi[nd] for nd in nodes])
        if counts is None:
            return None
        split = _split_units(self.units.total, n, counts, frees)
        if split is None:
            return None
        cpus: list[tuple[int, ...]] = []
        broken = 0
        for nd, count in zip(nodes, counts, strict=True):
            if self.pinned:
                picked, b = self.planner.pick(nd, count)
                if len(picked) != count:
                    return None
                cpus.append(picked)
                broken += b
            else:
                cpus.append(())
        score = self._score(nodes, counts, split, broken)
        return _Candidate(nodes, counts, split, tuple(cpus), score, score[0])

    def _score(
        self,
        nodes: tuple[int, ...],
        counts: Sequence[int],
        split: Sequence[int],
        broken: int,
    ) -> tuple[float, int, int, int, tuple[int, ...]]:
        """The module's placement cost (see the top of the module), then the tie-breaks."""
        host, w = self.host, self.weights
        is_1g = self.units.page_kib == PAGE_1G_KIB
        kept = 0.0
        left_cpus = 0
        stranded = 0
        one_g = 0
        for nd, count, got in zip(nodes, counts, split, strict=True):
            pool = len(host.pool_on(nd))
            used = count if self.pinned else 0
            if 0 < used < pool:
                # Kept from being whole: the node's CPUs per lifetime its return is put off.
                kept += host.node_usable[nd] / (host.pinned_vms[nd] + 1)
            left_cpus += pool - used
            pages_before = host.pages_free(nd, PAGE_1G_KIB)
            pages_left = pages_before - (got if is_1g else 0)
            # Pages left on a node with fewer free CPUs than pages cannot all be used even by
            # the densest 1G VM (one page per vCPU). Only the pages this placement strands
            # count: those a node had stranded already are lost whichever node is chosen.
            stranded += max(0, pages_left - (pool - used)) - max(0, pages_before - pool)
            one_g += pages_left
        left_units = sum(self.free[nd] - got for nd, got in zip(nodes, split, strict=True))
        prefer = self.sriov.prefer_nodes
        nic_miss = 0 if not prefer or any(nd in nodes for nd in prefer) else 1
        cost = kept + w.core * broken + w.page_1g * stranded + w.distance(nodes) + w.nic * nic_miss
        return (
            round(cost, 6),
            left_cpus,
            one_g,
            left_units * self.units.mib_per_unit,
            nodes,
        )

    def explain(self, nodes: list[int], max_k: int) -> str:
        """Say in operator words which resource is short, with the numbers."""
        spec, units = self.spec, self.units
        n = spec.vcpus
        where = "on one NUMA node" if max_k == 1 else f"on up to {max_k} NUMA nodes"
        note = ""
        if self.pinned and self.host.require:
            note = " in sibling pairs (smt-policy require)"
        elif self.pinned and self.host.isolate:
            note = " on cores no other VM uses (smt-policy isolate)"
        by_cpu = sorted(nodes, key=lambda nd: (-self.cpu_cap[nd], nd))[:max_k]
        cpu_best = sum(self.cpu_cap[nd] for nd in by_cpu)
        if self.pinned and cpu_best < n:
            if max_k == 1:
                nd = by_cpu[0]
                return (
                    f"needs {_pinned(n)}{note} {where}; the most free on any node is "
                    f"{self.cpu_cap[nd]} (node {nd})"
                )
            return (
                f"needs {_pinned(n)}{note} {where}; the {max_k} nodes with the most free "
                f"CPUs have {cpu_best} ({_fmt_nodes(sorted(by_cpu))})"
            )
        by_mem = sorted(nodes, key=lambda nd: (-self.free[nd], nd))[:max_k]
        mem_best = sum(self.free[nd] for nd in by_mem)
        need = units.total * units.mib_per_unit
        if mem_best < units.total:
            if max_k == 1:
                nd = by_mem[0]
                return (
                    f"needs {need} MiB of {units.kind} {where}; the most free is "
                    f"{units.describe(self.free[nd])} on node {nd}"
                )
            return (
                f"needs {need} MiB of {units.kind} {where}; the {max_k} nodes with the most "
                f"free have {units.describe(mem_best)} ({_fmt_nodes(sorted(by_mem))})"
            )
        detail = "; ".join(
            f"node {nd}: {self.cpu_cap[nd] if self.pinned else 'any'} CPUs, "
            f"{units.describe(self.free[nd])}"
            for nd in nodes[:8]
        )
        what = f"{_pinned(n)}{note}" if self.pinned else f"{n} vCPUs"
        return (
            f"needs {what} and {need} MiB of {units.kind} {where}, memory split by vCPUs; "
            f"no set of nodes has both ({detail})"
        )


def _emulator_cpus(host: _Host, nodes: Sequence[int], taken: set[int]) -> tuple[int, ...]:
    """Reserved CPUs (local ones first), else the shared pool (local first), else own CPUs."""
    local_reserved = [c for c in sorted(host.reserved) if host.node_of[c] in nodes]
    if local_reserved:
        return tuple(local_reserved)
    if host.reserved:
        return tuple(sorted(host.reserved))
    blocked = set(taken)
    if host.isolate:
        blocked.update(t for c in taken for t in host.core_of[c])
    local_pool = [c for nd in nodes for c in host.pool_on(nd) if c not in blocked]
    if local_pool:
        return tuple(sorted(local_pool))
    pool = [c for c in sorted(host.pool) if c not in blocked]
    return tuple(pool) if pool else tuple(sorted(taken))


def _build(
    planner: _Planner, units: _Units, cand: _Candidate, vfs: tuple[VfAssignment, ...]
) -> Placement:
    spec = planner.spec
    cells = tuple(
        CellPlacement(
            host_node=nd,
            vcpus=count,
            memory_mib=got * units.mib_per_unit,
            cpus=cpus,
            hugepage_size_kib=units.page_kib,
            hugepages=got if units.page_kib is not None else 0,
        )
        for nd, count, got, cpus in zip(
            cand.nodes, cand.counts, cand.units, cand.cpus, strict=True
        )
    )
    taken = {c for cs in cand.cpus for c in cs}
    emulator = _emulator_cpus(planner.host, cand.nodes, taken) if spec.pinned else ()
    return Placement(
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        cells=cells,
        emulator_cpus=emulator,
        vfs=vfs,
    )


def _check_explicit_cpus(host: _Host, spec: VmSpec, wanted: tuple[int, ...]) -> None:
    """Each listed CPU must exist, be free, not reserved, and respect the SMT policy."""
    if len(wanted) != spec.vcpus:
        raise _Reject(
            f"lists {len(wanted)} host CPUs for {spec.vcpus} vCPUs; a pinned VM needs "
            "exactly one host CPU per vCPU"
        )
    dupes = sorted(c for c, n in Counter(wanted).items() if n > 1)
    if dupes:
        raise _Reject(f"lists host CPUs {_fmt_cpus(dupes)} more than once")
    missing = [c for c in wanted if c not in host.node_of]
    if missing:
        ids = sorted(host.node_of)
        raise _Reject(
            f"host CPUs {_fmt_cpus(missing)} do not exist on this host (its CPUs are "
            f"{ids[0]}-{ids[-1]}, {len(ids)} in all)"
        )
    checks = (
        (host.reserved, "are reserved for the host (reserved-cpus)"),
        (host.pinned, "are already pinned by another VM"),
        (host.held, "share a core with CPUs pinned by another VM (smt-policy isolate)"),
    )
    for busy, why in checks:
        bad = [c for c in wanted if c in busy]
        if bad:
            raise _Reject(f"host CPUs {_fmt_cpus(bad)} {why}")
    if host.require:
        chosen = set(wanted)
        lonely = [c for c in wanted if sum(1 for t in host.core_of[c] if t in chosen) % 2]
        if lonely:
            raise _Reject(
                f"smt-policy require gives vCPUs in sibling pairs; host CPUs "
                f"{_fmt_cpus(lonely)} are listed without a sibling thread"
            )


def _plan_explicit(
    planner: _Planner, spec: VmSpec, sizes: Sequence[int | None], sriov: _Sriov
) -> Placement:
    """Place a VM on the host CPUs it lists; cells follow the nodes those CPUs lie on."""
    host = planner.host
    wanted = tuple(spec.pinned_cpus or ())
    _check_explicit_cpus(host, spec, wanted)
    nodes = sorted({host.node_of[c] for c in wanted})
    if len(nodes) > spec.numa_nodes:
        raise _Reject(
            f"the listed host CPUs lie on {len(nodes)} NUMA nodes ({_fmt_nodes(nodes)}) but "
            f"numa-nodes is {spec.numa_nodes}"
        )
    off = [nd for nd in sriov.strict_nodes if nd not in nodes]
    if off:
        raise _Reject(
            f"strict SR-IOV interfaces need NUMA {_fmt_nodes(off)} but the listed host CPUs "
            f"lie on {_fmt_nodes(nodes)}"
        )
    taking = len(wanted) + planner.held_after(wanted)
    if taking > host.pool_budget():
        raise _Reject(f"needs {_pinned(len(wanted))}; " + host.pool_reason(taking))
    counts = [sum(1 for c in wanted if host.node_of[c] == nd) for nd in nodes]
    cpus = tuple(tuple(c for c in wanted if host.node_of[c] == nd) for nd in nodes)
    errors = []
    for size in sizes:
        units = _units_for(spec, size)
        free = [_unit_free(host, units, nd) for nd in nodes]
        split = _split_units(units.total, spec.vcpus, counts, free)
        if split is not None:
            cand = _Candidate(tuple(nodes), tuple(counts), split, cpus)
            return _build(planner, units, cand, sriov.vfs)
        detail = "; ".join(
            f"node {nd}: {c} CPUs, {units.describe(f)} free"
            for nd, c, f in zip(nodes, counts, free, strict=True)
        )
        errors.append(
            f"needs {units.total * units.mib_per_unit} MiB of {units.kind} split by vCPUs over "
            f"the nodes of the listed CPUs ({detail})"
        )
    raise _Reject("; ".join(errors))

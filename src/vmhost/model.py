"""Plain typed records shared by every layer of vm-host.

One vocabulary for the parsers, the allocator, the backends and the charm. Records are frozen
dataclasses so they can be hashed, compared and shared between layers without copies; they
carry no behaviour beyond small derived views. Sizes carry their unit in the field name.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

KIB_PER_MIB = 1024
PAGE_2M_KIB = 2048
PAGE_1G_KIB = 1048576
HUGEPAGE_SIZES_KIB = (PAGE_2M_KIB, PAGE_1G_KIB)
HUGEPAGE_LABELS = {"2M": PAGE_2M_KIB, "1G": PAGE_1G_KIB}


def page_label(size_kib: int) -> str:
    """Return the human label of a page size ("2M", "1G", "64K")."""
    if size_kib % PAGE_1G_KIB == 0:
        return f"{size_kib // PAGE_1G_KIB}G"
    if size_kib % KIB_PER_MIB == 0:
        return f"{size_kib // KIB_PER_MIB}M"
    return f"{size_kib}K"


# ---------------------------------------------------------------------------------------------
# Host


@dataclass(frozen=True)
class Cpu:
    """One logical host CPU (a hardware thread)."""

    id: int
    socket_id: int = 0
    die_id: int = 0
    core_id: int = 0
    siblings: tuple[int, ...] = ()
    """All threads of this CPU's physical core, itself included, sorted."""

    @property
    def core_key(self) -> tuple[int, int, int]:
        """Identify the physical core; core ids repeat across sockets and dies."""
        return (self.socket_id, self.die_id, self.core_id)


@dataclass(frozen=True)
class NumaNode:
    """One host NUMA node: its CPUs, memory and huge pages.

    A node may have no CPUs (memory-only nodes exist on HMAT/CXL hosts).
    """

    id: int
    cpus: tuple[Cpu, ...] = ()
    memory_kib: int = 0
    """Total memory of the node, huge pages included (as libvirt reports it)."""
    hugepages_total: Mapping[int, int] = field(default_factory=dict)
    """Huge page size in KiB -> pages configured on this node (base 4K pages excluded)."""
    hugepages_free: Mapping[int, int] = field(default_factory=dict)
    """Huge page size in KiB -> pages free on this node right now."""
    distances: Mapping[int, int] = field(default_factory=dict)
    """Other node id -> relative distance (10 = local)."""

    @property
    def cpu_ids(self) -> tuple[int, ...]:
        """The ids of this node's CPUs, sorted."""
        return tuple(sorted(c.id for c in self.cpus))

    @property
    def hugepage_memory_kib(self) -> int:
        """Memory set aside as huge pages on this node (not usable as general memory)."""
        return sum(size * count for size, count in self.hugepages_total.items())

    @property
    def general_memory_kib(self) -> int:
        """Memory of this node that is not huge pages."""
        return max(0, self.memory_kib - self.hugepage_memory_kib)


class NicKind(enum.StrEnum):
    """What a host network interface is."""

    PHYSICAL = "physical"
    BRIDGE = "bridge"
    BOND = "bond"
    VLAN = "vlan"
    VF = "vf"
    VIRTUAL = "virtual"


@dataclass(frozen=True)
class HostNic:
    """A host network interface, with what placement needs to know about it."""

    name: str
    kind: NicKind = NicKind.PHYSICAL
    numa_node: int | None = None
    """NUMA node of the PCI device; None when the kernel does not say (-1 in sysfs)."""
    sriov_total_vfs: int = 0
    """VFs the device can provide (sriov_totalvfs)."""
    sriov_enabled_vfs: int = 0
    """VFs currently enabled (sriov_numvfs); VM assignments come from allocations."""
    mac: str | None = None
    addresses: tuple[str, ...] = ()
    """Addresses with prefix, for example "10.0.5.2/24"."""
    vlan_id: int | None = None
    parent: str | None = None
    """Lower device of a VLAN or VF, or master bridge/bond of a port."""
    master: str | None = None
    """Bridge or bond this interface is a port of; kept apart from `parent` because a VLAN
    sub-interface can have both a lower device and a master bridge."""
    link: str | None = None
    """The kernel's operstate ("up", "down", "lowerlayerdown", "unknown"); None when unread."""
    speed_mbps: int | None = None
    """Link speed in Mbit/s; None when the driver does not say (no link, virtual devices)."""


@dataclass(frozen=True)
class StoragePool:
    """A hypervisor storage pool."""

    name: str
    driver: str = "dir"
    capacity_bytes: int = 0
    allocation_bytes: int = 0
    available_bytes: int = 0
    path: str | None = None
    active: bool = True
    committed_bytes: int = 0
    """How much the thin volumes already in the pool may still grow (capacity minus
    allocation, summed), so free space is not promised twice."""


@dataclass(frozen=True)
class HostTopology:
    """Everything placement needs to know about a host."""

    nodes: tuple[NumaNode, ...]
    nics: tuple[HostNic, ...] = ()
    pools: tuple[StoragePool, ...] = ()
    arch: str = "x86_64"
    hypervisor: str = "libvirt"
    hypervisor_version: str = ""

    @property
    def cpus(self) -> dict[int, Cpu]:
        """Every host CPU by id."""
        return {c.id: c for n in self.nodes for c in n.cpus}

    def node_of_cpu(self, cpu_id: int) -> int | None:
        """Return the NUMA node holding a CPU, or None when the CPU does not exist."""
        for node in self.nodes:
            if any(c.id == cpu_id for c in node.cpus):
                return node.id
        return None

    def node(self, node_id: int) -> NumaNode:
        """Return a node by id (KeyError when absent)."""
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)


# ---------------------------------------------------------------------------------------------
# Requests


class HugepageRequest(enum.StrEnum):
    """Huge page backing a request asks for."""

    P2M = "2M"
    P1G = "1G"
    ANY = "any"


class InterfaceMode(enum.StrEnum):
    """How a guest NIC is attached to the host."""

    BRIDGE = "bridge"
    MACVTAP = "macvtap"
    SRIOV = "sriov"


@dataclass(frozen=True)
class DiskSpec:
    """A disk to create for a VM; the first disk of a spec is the root disk."""

    label: str
    size_gb: int
    """Size in GB (10**9 bytes), as MAAS counted."""
    pool: str | None = None
    """Storage pool name; None means the configured default pool."""


@dataclass(frozen=True)
class InterfaceSpec:
    """A NIC a VM asks for, with the constraints that choose where it attaches."""

    label: str
    space: str | None = None
    subnet: str | None = None
    """Subnet as CIDR."""
    vlan: int | None = None
    ip: str | None = None
    mode: InterfaceMode | None = None
    bridge: str | None = None
    """Explicit host bridge to attach to."""
    parent: str | None = None
    """Explicit host interface for macvtap or SR-IOV."""
    numa_strict: bool = False
    """For an SR-IOV interface: place the VM only on the parent NIC's NUMA node (when the
    kernel reports one), instead of merely preferring it."""


@dataclass(frozen=True)
class VmSpec:
    """A validated request for one VM.

    A VM is either pinned (each vCPU gets a host CPU of its own: `pinned_count` set, and
    `pinned_cpus` when the requester chose the host CPUs) or shared (its vCPUs float over the
    unpinned CPUs and count against the CPU overcommit ratio).
    """

    name: str
    vcpus: int
    memory_mib: int
    pinned_count: int = 0
    pinned_cpus: tuple[int, ...] | None = None
    numa_nodes: int = 1
    """How many host NUMA nodes the VM may span."""
    hugepages: HugepageRequest | None = None
    disks: tuple[DiskSpec, ...] = ()
    interfaces: tuple[InterfaceSpec, ...] = ()
    image: str | None = None
    image_from_default: bool = False
    """The request named no image and got the host's default-image (which spec_hash leaves
    out: changing that option, or upgrading to a charm that has one, changes no request)."""
    user_data: str | None = None
    ssh_public_keys: tuple[str, ...] = ()
    hostname: str | None = None
    """The guest's hostname (a name or an FQDN); None means the VM's name."""
    tags: tuple[str, ...] = ()
    """The requester's labels for the VM (list-vms filters on them)."""
    pool: str = ""
    """The resource pool it counts in (vmhost.pools); "" before the request's pool is known."""
    owner: str = "action"
    """Who asked: "action", or "relation:<id>:<app>"."""
    request_id: str = ""

    @property
    def pinned(self) -> bool:
        """Whether every vCPU gets a dedicated host CPU."""
        return self.pinned_count > 0


@dataclass(frozen=True)
class Policy:
    """Host-wide placement rules, from the charm config."""

    cpu_overcommit_ratio: float = 1.0
    memory_overcommit_ratio: float = 1.0
    reserved_cpus: frozenset[int] = frozenset()
    reserved_memory_mib: int = 0
    """General memory kept for the host itself, taken from the lowest-numbered nodes' share."""
    smt_policy: str = "prefer"
    """One of "prefer", "isolate", "require"."""


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class CellPlacement:
    """The share of one host NUMA node a VM gets; it becomes one guest NUMA cell."""

    host_node: int
    vcpus: int
    memory_mib: int
    cpus: tuple[int, ...] = ()
    """Host CPUs pinned to this cell's vCPUs, in vCPU order; empty for shared vCPUs."""
    hugepage_size_kib: int | None = None
    hugepages: int = 0
    """Pages of hugepage_size_kib taken on host_node."""


@dataclass(frozen=True)
class VfAssignment:
    """SR-IOV VFs taken from one host NIC."""

    nic: str
    count: int = 1


@dataclass(frozen=True)
class Placement:
    """Where a VM's resources come from.

    Pinned or hugepage-backed VMs have one cell per host node used; a shared VM without huge
    pages has no cells (its memory and vCPUs are counted host-wide).
    """

    vcpus: int
    memory_mib: int
    cells: tuple[CellPlacement, ...] = ()
    emulator_cpus: tuple[int, ...] = ()
    """Host CPUs for QEMU's own threads of a pinned VM (shared or reserved CPUs)."""
    vfs: tuple[VfAssignment, ...] = ()

    @property
    def pinned(self) -> bool:
        """Whether vCPUs are pinned to dedicated host CPUs."""
        return any(c.cpus for c in self.cells)

    @property
    def pinned_cpus(self) -> tuple[int, ...]:
        """All dedicated host CPUs, in vCPU order."""
        return tuple(cpu for c in self.cells for cpu in c.cpus)

    @property
    def host_nodes(self) -> tuple[int, ...]:
        """Host nodes used, in guest cell order."""
        return tuple(c.host_node for c in self.cells)

    @property
    def hugepage_backed(self) -> bool:
        """Whether memory comes from huge pages."""
        return any(c.hugepages for c in self.cells)

    @property
    def shared_vcpus(self) -> int:
        """Number of vCPUs that float over the shared CPU pool."""
        return 0 if self.pinned else self.vcpus

    @property
    def general_memory_mib(self) -> int:
        """Memory taken from general (non-hugepage) memory."""
        return 0 if self.hugepage_backed else self.memory_mib


@dataclass(frozen=True)
class Rejection:
    """Why a request cannot be placed, in words for an operator, with numbers."""

    reason: str

    def __str__(self) -> str:
        return self.reason


class VmState(enum.StrEnum):
    """Lifecycle state of a VM as reported to requesters."""

    PENDING = "pending"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class VmRecord:
    """A VM that exists on the hypervisor, rebuilt from the hypervisor's own metadata."""

    name: str
    uuid: str
    state: VmState
    placement: Placement
    owner: str = "action"
    request_id: str = ""
    spec_hash: str = ""
    volumes: tuple[str, ...] = ()
    """Volumes the charm created for it, as "pool/volume"."""
    tags: tuple[str, ...] = ()
    """The requester's labels, as recorded when the VM was composed."""
    pool: str = ""
    """The resource pool recorded with it; "" for VMs composed before pools (they count in
    the default pool)."""
    interfaces: tuple[Mapping[str, str], ...] = ()
    """Per NIC: label, mac, attached-to, and if known ip (a static address with its prefix),
    space and subnet (as resolved at compose time; VMs composed before vm-host recorded them
    have none)."""
    addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict[str, tuple[str, ...]])
    """MAC -> the addresses the guest is known to have on that NIC, without prefix: static
    ones from the request, then those libvirt or LXD learnt (DHCP lease, ARP, guest agent).
    Filled by vmhost.addresses.refresh, empty in list_vms."""
    managed: bool = True
    """False for domains vm-host did not create (they still use host resources)."""
    autostart: bool = False
    """The VM should run: the hypervisor starts it at host boot, and update-status restarts it
    after a crash. stop-vm clears it, start-vm sets it, so an operator's stop is kept."""
    state_reason: str = ""
    """Why a failed VM is failed (paused on an I/O error, crashed), as the hypervisor says."""
    problem: str = ""
    """Why vm-host cannot read this VM's record (it is then unmanaged, never touched)."""


class VmHostError(Exception):
    """A failure a person can act on; the message says what and how to fix it."""


class InvalidRequestError(VmHostError):
    """A request that breaks a rule; the message names the field and the rule."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class AttachmentKind(enum.StrEnum):
    """How libvirt/LXD wires a guest NIC to the host."""

    BRIDGE = "bridge"
    """A tap on a host bridge (libvirt interface type='bridge', LXD nictype bridged)."""
    DIRECT = "direct"
    """macvtap on a host NIC (libvirt type='direct' mode='bridge', LXD nictype macvlan)."""
    HOSTDEV = "hostdev"
    """An SR-IOV VF passed through (libvirt type='hostdev', LXD nictype sriov)."""


@dataclass(frozen=True)
class NicAttachment:
    """A resolved guest NIC: which host device it attaches to, and how."""

    label: str
    kind: AttachmentKind
    source: str
    """Bridge name, macvtap parent, or SR-IOV PF name."""
    mac: str | None = None
    vlan: int | None = None
    ip: str | None = None
    """Static address with prefix ("10.0.5.9/24") to hand the guest through cloud-init."""
    guest_name: str | None = None
    """Interface name inside the guest (numeric labels become ethN, as MAAS named them)."""
    space: str | None = None
    """The Juju space the NIC is on: the one requested, else the one the `networks` option
    maps to its host device; None when vm-host cannot tell."""
    subnet: str | None = None
    """The subnet (CIDR) the NIC is on: the one requested or its ip's, else the host device's
    only IPv4 subnet (its only subnet when it has no IPv4 one); None when vm-host cannot tell."""


@dataclass(frozen=True)
class VmStats:
    """What a running VM has used, as the hypervisor counts it (counters since it started)."""

    name: str
    cpu_seconds: float = 0.0
    memory_used_bytes: int = 0
    """Resident memory of the guest (libvirt balloon.rss; LXD's RSS)."""
    block_read_bytes: int = 0
    block_write_bytes: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    paused: bool = False
    """Paused by the hypervisor (an I/O error, a full disk, an operator); its state still
    reads running, since it holds its resources."""

"""The one path from a spec to a VM: name check, NICs, placement, backend.compose.

The compose-vm action and the relation round both come through `compose`, so a VM is checked
and placed the same way whoever asked for it; a dry run stops after placement. Nothing here
raises for a bad request: the outcome says which step refused it and why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vmhost import networks, placement, pools, refusals
from vmhost.backends import MAC_PREFIXES, Backend, stable_mac
from vmhost.model import (
    HUGEPAGE_LABELS,
    KIB_PER_MIB,
    HostTopology,
    InterfaceMode,
    InterfaceSpec,
    InvalidRequestError,
    NicAttachment,
    Placement,
    Policy,
    Rejection,
    VmHostError,
    VmRecord,
    VmSpec,
)
from vmhost.relation.keys import ACTION_OWNER

__all__ = [
    "DEFAULT_NIC_LABEL",
    "HostState",
    "Outcome",
    "assign_macs",
    "book_disks",
    "compose",
    "default_interfaces",
    "deletable",
    "ip_in_use",
    "macs_in_use",
    "name_taken",
    "pool_problem",
    "reach_problem",
    "storage_problem",
    "storage_summary",
]

DEFAULT_NIC_LABEL = "eth0"
GB = 10**9


@dataclass(frozen=True)
class HostState:
    """What composing needs to know about the host, as read in this hook."""

    topology: HostTopology
    vms: Sequence[VmRecord]
    """Every VM on the host (all owners): their names are taken, their placements used."""
    policy: Policy
    networks: Mapping[str, networks.NetworkMapping]
    default_pool: str
    default_network: str = ""
    """Config `default-network`: a space in `networks` or a host bridge ("" when unset)."""
    disk_overcommit_ratio: float = 1.0
    """Requested disk bytes a pool may promise per free byte (config disk-overcommit-ratio)."""
    mac_salt: str = ""
    """What new MACs derive from besides the VM and NIC names (the model UUID and unit)."""
    peer_macs: frozenset[str] = frozenset()
    """MACs the VMs of the other vm-host units have (their peer reports), lower case."""
    allowed_interfaces: frozenset[str] = frozenset()
    """Host interfaces a relation request may name or reach besides the mapped spaces
    (config allowed-host-interfaces)."""
    pools: pools.Pools | None = None
    """The resource pools (config resource-pools, default-pool); None checks no quota."""
    peer_pool_use: Mapping[str, pools.Use] = dataclasses.field(default_factory=dict)
    """The other units' reported use per resource pool ("" = VMs recorded without one).
    compose-vm counts it, so an action cannot take a pool past its quota across the fleet;
    the relation round leaves it empty, the leader having counted the fleet already."""

    def mapped_devices(self) -> frozenset[str]:
        """Where relation VMs may attach: mapped spaces, default network, allowed list."""
        devices = {m.device for m in self.networks.values()} | set(self.allowed_interfaces)
        if self.default_network and self.default_network not in self.networks:
            devices.add(self.default_network)
        return frozenset(devices)

    @property
    def allocations(self) -> list[Placement]:
        """The placements of every VM on the host."""
        return [vm.placement for vm in self.vms]


@dataclass(frozen=True)
class Outcome:
    """What happened to one spec; exactly one of vm, a dry-run placement or an error."""

    spec: VmSpec
    placement: Placement | None = None
    vm: VmRecord | None = None
    refused: str = ""
    """The request cannot be served as written (name taken, interfaces that resolve to
    nothing on this host)."""
    rejected: str = ""
    """It does not fit on this host (the allocator's reason)."""
    failed: str = ""
    """The hypervisor failed; what it made was rolled back."""
    waiting: str = ""
    """Placed, but its image is not cached yet (what it waits for: a background download)."""
    unavailable: str = ""
    """Its image could not be fetched (the check that failed); nothing was created."""
    checks: tuple[tuple[str, str], ...] = ()
    """A dry run's findings, (what, result): the pool, the storage, the image."""

    @property
    def error(self) -> str | None:
        """The reason for the requester, or None when it succeeded."""
        if self.failed:
            return f"compose failed and was rolled back: {self.failed}"
        return self.refused or self.rejected or self.unavailable or self.waiting or None


def name_taken(spec: VmSpec, vms: Sequence[VmRecord]) -> str | None:
    """Why the spec's name cannot be used on this host, or None when it is free.

    The one place that checks names: an action and a relation request alike are refused,
    never matched to a VM by its name.
    """
    if not any(vm.name == spec.name for vm in vms):
        return None
    fix = "request it under another id" if spec.request_id else "choose another name"
    return f"VM name {spec.name!r} is already taken: a VM of that name already exists; {fix}"


def default_interfaces(
    mapping: Mapping[str, networks.NetworkMapping], default_network: str
) -> tuple[InterfaceSpec, ...]:
    """The NIC a request without `interfaces` gets: one eth0 on the host's default network.

    Config `default-network` names a space of `networks` or a host bridge; when it is empty
    and `networks` maps exactly one space, that space is the default. The request's spec keeps
    no interfaces (its hash, and so a composed VM's identity, does not depend on host config).

    Raises:
        InvalidRequestError: there is no default network; the message gives the fix.
    """
    if default_network:
        if default_network in mapping:
            return (InterfaceSpec(DEFAULT_NIC_LABEL, space=default_network),)
        return (
            InterfaceSpec(DEFAULT_NIC_LABEL, bridge=default_network, mode=InterfaceMode.BRIDGE),
        )
    if len(mapping) == 1:
        (space,) = mapping
        return (InterfaceSpec(DEFAULT_NIC_LABEL, space=space),)
    spaces = (
        f"networks maps {len(mapping)} spaces ({', '.join(sorted(mapping))})"
        if mapping
        else "networks maps no space"
    )
    raise InvalidRequestError(
        "interfaces",
        f"none requested and this host has no default network ({spaces}); give interfaces "
        "(for example eth0:space=oam or eth0:bridge=br0), or set one with juju config "
        "vm-host default-network=<space or bridge>",
    )


def _resolve_nics(spec: VmSpec, host: HostState) -> tuple[NicAttachment, ...]:
    """The request's NICs on this host, or its default NIC when it asks for none."""
    if spec.interfaces:
        return networks.resolve(spec.interfaces, host.topology.nics, host.networks)
    wanted = default_interfaces(host.networks, host.default_network)
    try:
        return networks.resolve(wanted, host.topology.nics, host.networks)
    except InvalidRequestError as exc:
        which = host.default_network or next(iter(host.networks))
        raise InvalidRequestError(
            "default-network",
            f"the default NIC on {which!r} cannot be attached here: {exc}; fix with juju "
            "config vm-host default-network=<space or bridge>, or give interfaces",
        ) from exc


def reach_problem(
    spec: VmSpec, nics: Sequence[NicAttachment], host: HostState
) -> InvalidRequestError | None:
    """Why a related application's request reaches further than the operator mapped, or None.

    The compose-vm action may attach anywhere: the operator asks. A relation request may name
    a host interface (bridge=, parent=) only when allowed-host-interfaces lists it, and each
    of its NICs must land on a device of a mapped space, the default network or that list:
    a subnet, VLAN or address that resolves to another host interface is refused too.
    """
    if spec.owner == ACTION_OWNER:
        return None
    allowed = host.allowed_interfaces
    fix = (
        "vm-host attaches a related application's VMs only to the spaces of its networks "
        "option; ask for a space, or have the operator list the interface with juju config "
        "vm-host allowed-host-interfaces="
    )
    for wanted in spec.interfaces:
        for key, name in (("bridge", wanted.bridge), ("parent", wanted.parent)):
            if name and name not in allowed:
                return InvalidRequestError(
                    f"interfaces.{wanted.label}",
                    f"{key}={name} names a host interface; {fix}{name}",
                )
    mapped = host.mapped_devices()
    for nic in nics:
        if nic.source not in mapped:
            return InvalidRequestError(
                f"interfaces.{nic.label}",
                f"resolves to host interface {nic.source}, which no space of networks maps; "
                f"{fix}{nic.source}",
            )
    return None


def ip_in_use(
    nics: Sequence[NicAttachment], vms: Sequence[VmRecord]
) -> InvalidRequestError | None:
    """A static address another VM on this host already has (recorded in its metadata)."""
    owners = {
        str(nic.get("ip", "")).split("/", 1)[0]: vm.name
        for vm in vms
        for nic in vm.interfaces
        if nic.get("ip")
    }
    for nic in nics:
        address = (nic.ip or "").split("/", 1)[0]
        if address and address in owners:
            return InvalidRequestError(
                f"interfaces.{nic.label}",
                f"ip {address} is already the address of VM {owners[address]}; choose another "
                "address or leave ip out for DHCP",
            )
    return None


def macs_in_use(vms: Sequence[VmRecord]) -> frozenset[str]:
    """The MACs of these VMs' NICs, lower case (as their metadata records them)."""
    return frozenset(str(n.get("mac", "")).lower() for vm in vms for n in vm.interfaces) - {""}


def assign_macs(
    spec: VmSpec, nics: Sequence[NicAttachment], host: HostState, prefix: str
) -> tuple[NicAttachment, ...]:
    """Give each NIC its MAC: derived from the salt, VM and label, never one already in use.

    Stable for the VM's life: it is written into the VM's definition once, and a compose
    re-run for the same request on the same host derives the same MAC again.
    """
    taken = set(macs_in_use(host.vms) | host.peer_macs)
    out: list[NicAttachment] = []
    for nic in nics:
        mac = (nic.mac or stable_mac(prefix, spec.name, nic.label, host.mac_salt, taken)).lower()
        taken.add(mac)
        out.append(dataclasses.replace(nic, mac=mac))
    return tuple(out)


def _checked_nics(spec: VmSpec, host: HostState) -> tuple[NicAttachment, ...] | Outcome:
    """The spec's NICs when its name, NICs, disks and pool quota allow it here, else why not."""
    taken = name_taken(spec, host.vms)
    if taken:
        return Outcome(spec, refused=taken)
    try:
        nics = _resolve_nics(spec, host)
    except InvalidRequestError as exc:
        return Outcome(spec, refused=str(exc))
    problem = reach_problem(spec, nics, host) or ip_in_use(nics, host.vms)
    if problem is not None:
        return Outcome(spec, refused=str(problem))
    missing, full = storage_problem(spec, host)
    if missing:
        return Outcome(spec, refused=missing)
    if full:
        return Outcome(spec, rejected=full)
    over = pool_problem(spec, host)
    if over:
        return Outcome(spec, rejected=over)
    return nics


def compose(
    backend: Backend,
    spec: VmSpec,
    host: HostState,
    *,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
    prepare_image: Callable[[str], str | None] | None = None,
    probe_image: Callable[[str], str] | None = None,
) -> Outcome:
    """Check the name, resolve the NICs, the pool quota, plan, get the image ready, compose.

    `progress` hears one line before the slow part (volumes, define, boot) starts.
    `prepare_image(name)` runs only once the VM fits (nothing is downloaded for a request
    that cannot be placed): it returns None when the image is cached, or what the request
    waits for (answered pending); it raises VmHostError when the image cannot be had.
    A dry run stops before the image is fetched: `probe_image(name)` says where the image
    would come from (cached, or the source that has it), or raises VmHostError as the fetch
    would fail, without downloading anything.
    """
    nics = _checked_nics(spec, host)
    if isinstance(nics, Outcome):
        return nics
    # The resolved NICs go into the plan: an SR-IOV NIC mapped through `networks` is counted
    # and NUMA-aligned like one the request names itself.
    result = placement.plan(host.topology, host.allocations, spec, host.policy, nics)
    if isinstance(result, Rejection):
        if not dry_run:
            # A relation request is retried every hook: count it once per distinct reason.
            retried = f"{spec.owner}/{spec.request_id}" if spec.request_id else None
            refusals.record(result.reason, request=retried)
        return Outcome(spec, rejected=result.reason)
    over = pool_problem(spec, host, result)
    if over:
        return Outcome(spec, placement=result, rejected=over)
    if dry_run:
        return _dry_run(spec, result, host, probe_image)
    if spec.image and prepare_image is not None:
        blocked = _prepare(spec, result, prepare_image)
        if blocked is not None:
            return blocked
    if progress is not None:
        progress(f"composing {spec.name} on host nodes {list(result.host_nodes) or 'any'}")
    nics = assign_macs(spec, nics, host, MAC_PREFIXES.get(backend.name, MAC_PREFIXES["libvirt"]))
    try:
        vm = backend.compose(spec, result, nics, host.default_pool)
    except VmHostError as exc:
        return Outcome(spec, placement=result, failed=str(exc))
    return Outcome(spec, placement=result, vm=vm)


def _spec_use(spec: VmSpec) -> pools.Use:
    """What the spec takes from its pool, as far as the request alone tells.

    Huge pages "any" take pages of a size only the placement chooses: counted after it.
    """
    pages: dict[int, int] = {}
    size = HUGEPAGE_LABELS.get(spec.hugepages.value) if spec.hugepages is not None else None
    if size:
        pages[size] = spec.memory_mib * KIB_PER_MIB // size
    return pools.Use(spec.vcpus, spec.pinned_count, spec.memory_mib, pages, 1)


def _pool_of(spec: VmSpec, host: HostState) -> tuple[pools.Pools, str, pools.Use] | None:
    if host.pools is None:
        return None
    name = spec.pool or host.pools.default
    here = pools.use_by_pool(host.vms, host.pools.default)
    used = pools.total_by_pool(here, host.peer_pool_use, default=host.pools.default)
    return host.pools, name, used.get(name, pools.Use())


def pool_problem(spec: VmSpec, host: HostState, placed: Placement | None = None) -> str | None:
    """Why the VM would take its pool past a quota, or None.

    Counted: this host's VMs, and the other units' reported use when the host state has it.
    Before placement the request's own numbers are checked (so a full pool is said first);
    with the placement, the huge pages it really takes too. The leader checks the same quota
    against the whole fleet's use (vmhost.relation.fleet).
    """
    found = _pool_of(spec, host)
    if found is None:
        return None
    config, name, used = found
    need = _spec_use(spec) if placed is None else pools.use_of(placed)
    return config.refusal(name, used, need)


def _pool_summary(spec: VmSpec, host: HostState, placed: Placement) -> str:
    """The pool a dry run would put the VM in, and each quota with this VM added."""
    found = _pool_of(spec, host)
    if found is None:
        return "no resource pools checked"
    config, name, used = found
    checks = config.checks(name, used, pools.use_of(placed))
    limited = [
        f"{what} {have}+{wanted} of {limit}"
        for what, limit, have, wanted in checks
        if limit is not None
    ]
    counted = "this host's VMs" + (" and the other units' reports" if host.peer_pool_use else "")
    return f"pool {name}: fits ({', '.join(limited) or 'no quota'}; {counted} counted)"


def storage_summary(spec: VmSpec, host: HostState) -> str:
    """What a spec's disks ask of each storage pool and the room there (dry runs)."""
    pools_by_name = {pool.name: pool for pool in host.topology.pools}
    wanted: dict[str, int] = {}
    for disk in spec.disks:
        name = disk.pool or host.default_pool
        wanted[name] = wanted.get(name, 0) + disk.size_gb * GB
    parts = []
    for name, need in sorted(wanted.items()):
        pool = pools_by_name[name]
        if pool.capacity_bytes <= 0:
            parts.append(f"pool {name}: {_gb(need)} (the hypervisor gives no space figures)")
            continue
        room = int(pool.available_bytes * host.disk_overcommit_ratio) - pool.committed_bytes
        parts.append(f"pool {name}: {_gb(need)} of {_gb(max(0, room))} room")
    return "; ".join(parts) or "no disks"


def _dry_run(
    spec: VmSpec, placed: Placement, host: HostState, probe_image: Callable[[str], str] | None
) -> Outcome:
    """Everything the real compose would check, said; an image that cannot be had refuses."""
    checks = [
        ("pool", _pool_summary(spec, host, placed)),
        ("storage", storage_summary(spec, host)),
    ]
    if not spec.image:
        checks.append(("image", "none: the VM boots from the network"))
    elif probe_image is not None:
        try:
            checks.append(("image", probe_image(spec.image)))
        except InvalidRequestError as exc:
            return Outcome(spec, placement=placed, refused=str(exc))
        except VmHostError as exc:
            return Outcome(spec, placement=placed, unavailable=str(exc))
    return Outcome(spec, placement=placed, checks=tuple(checks))


def storage_problem(spec: VmSpec, host: HostState) -> tuple[str | None, str | None]:
    """Why the spec's disks cannot go where they ask: (pool missing, pool too full).

    Disks are thin (qcow2 or sparse) and grow as the guest writes, so each pool must be able
    to hold every disk it is asked for in full, on top of what its volumes may still grow
    (StoragePool.committed_bytes), times `disk_overcommit_ratio`: at 1.0 no disk can ever
    fill its pool, and QEMU never pauses a guest on a full disk for vm-host's promise.
    """
    pools = {pool.name: pool for pool in host.topology.pools}
    wanted: dict[str, int] = {}
    for disk in spec.disks:
        name = disk.pool or host.default_pool
        pool = pools.get(name)
        field = f"storage[{disk.label}].pool"
        if pool is None:
            known = ", ".join(sorted(pools)) or "none"
            return (
                f"{field}: storage pool {name!r} does not exist on this host (pools: {known}); "
                "create it or choose another pool",
                None,
            )
        if not pool.active:
            return (f"{field}: storage pool {name!r} is not active; start it", None)
        wanted[name] = wanted.get(name, 0) + disk.size_gb * GB
    ratio = host.disk_overcommit_ratio
    for name, need in sorted(wanted.items()):
        pool = pools[name]
        if pool.capacity_bytes <= 0:
            continue  # the hypervisor gives no space figures for it: nothing to check against
        room = int(pool.available_bytes * ratio) - pool.committed_bytes
        if need > room:
            return (
                None,
                f"storage: pool {name!r} cannot hold {_gb(need)} more: it has "
                f"{_gb(pool.available_bytes)} free and its disks may still grow by "
                f"{_gb(pool.committed_bytes)} (disk-overcommit-ratio {ratio:g}); free space, "
                "choose another pool or raise disk-overcommit-ratio",
            )
    return None, None


def book_disks(host: HostState, spec: VmSpec) -> HostState:
    """The host after composing `spec`: its disks count as growth still to come."""
    added: dict[str, int] = {}
    for disk in spec.disks:
        name = disk.pool or host.default_pool
        added[name] = added.get(name, 0) + disk.size_gb * GB
    pools = tuple(
        dataclasses.replace(p, committed_bytes=p.committed_bytes + added.get(p.name, 0))
        for p in host.topology.pools
    )
    return dataclasses.replace(host, topology=dataclasses.replace(host.topology, pools=pools))


def _gb(size: int) -> str:
    return f"{size / GB:.1f} GB" if size < 100 * GB else f"{size // GB} GB"


def _prepare(
    spec: VmSpec, placed: Placement, prepare_image: Callable[[str], str | None]
) -> Outcome | None:
    """Get the spec's image ready: None when it is, else the outcome that stops here."""
    assert spec.image
    try:
        waiting = prepare_image(spec.image)
    except InvalidRequestError as exc:
        return Outcome(spec, placement=placed, refused=str(exc))
    except VmHostError as exc:
        return Outcome(spec, placement=placed, unavailable=str(exc))
    return Outcome(spec, placement=placed, waiting=waiting) if waiting else None


def deletable(
    vms: Sequence[VmRecord],
    name: str,
    *,
    owner: str,
    released: Callable[[str], bool] | None = None,
) -> VmRecord | str:
    """The VM an operator may delete by name, or why not (the fix included).

    Only VMs vm-host composed for `owner` (the compose-vm action), or whose owner `released`
    accepts (VMs this vm-host application released under release-policy keep): a relation's
    VMs go when their request or relation does, and domains vm-host did not create are left
    alone.
    """
    vm = next((v for v in vms if v.name == name), None)
    if vm is None:
        known = ", ".join(sorted(v.name for v in vms if v.managed)) or "none"
        return f"no VM named {name!r}; VMs composed by vm-host: {known}"
    if not vm.managed:
        return f"{name} was not composed by vm-host; it is left alone"
    if vm.owner != owner and not (released is not None and released(vm.owner)):
        return (
            f"{name} belongs to {vm.owner}; withdraw the request or remove that relation instead"
        )
    return vm

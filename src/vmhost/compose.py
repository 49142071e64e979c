"""The one path from a spec to a VM: name check, NICs, placement, backend.compose.

The compose-vm action and the relation round both come through `compose`, so a VM is checked
and placed the same way whoever asked for it; a dry run stops after placement. Nothing here
raises for a bad request: the outcome says which step refused it and why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vmhost import networks, placement, refusals
from vmhost.backends import Backend
from vmhost.model import (
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

__all__ = [
    "DEFAULT_NIC_LABEL",
    "HostState",
    "Outcome",
    "compose",
    "default_interfaces",
    "deletable",
    "name_taken",
]

DEFAULT_NIC_LABEL = "eth0"


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

    @property
    def error(self) -> str | None:
        """The reason for the requester, or None when it succeeded."""
        if self.failed:
            return f"compose failed and was rolled back: {self.failed}"
        return self.refused or self.rejected or None


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


def compose(
    backend: Backend,
    spec: VmSpec,
    host: HostState,
    *,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Outcome:
    """Check the name, resolve the NICs, plan, then compose (unless a dry run).

    `progress` hears one line before the slow part (volumes, define, boot) starts.
    """
    taken = name_taken(spec, host.vms)
    if taken:
        return Outcome(spec, refused=taken)
    try:
        nics = _resolve_nics(spec, host)
    except InvalidRequestError as exc:
        return Outcome(spec, refused=str(exc))
    result = placement.plan(host.topology, host.allocations, spec, host.policy)
    if isinstance(result, Rejection):
        if not dry_run:
            # A relation request is retried every hook: count it once per distinct reason.
            retried = f"{spec.owner}/{spec.request_id}" if spec.request_id else None
            refusals.record(result.reason, request=retried)
        return Outcome(spec, rejected=result.reason)
    if dry_run:
        return Outcome(spec, placement=result)
    if progress is not None:
        progress(f"composing {spec.name} on host nodes {list(result.host_nodes) or 'any'}")
    try:
        vm = backend.compose(spec, result, nics, host.default_pool)
    except VmHostError as exc:
        return Outcome(spec, placement=result, failed=str(exc))
    return Outcome(spec, placement=result, vm=vm)


def deletable(vms: Sequence[VmRecord], name: str, *, owner: str) -> VmRecord | str:
    """The VM an operator may delete by name, or why not (the fix included).

    Only VMs vm-host composed for `owner` (the compose-vm action): a relation's VMs go when
    their request or relation does, and domains vm-host did not create are left alone.
    """
    vm = next((v for v in vms if v.name == name), None)
    if vm is None:
        known = ", ".join(sorted(v.name for v in vms if v.managed)) or "none"
        return f"no VM named {name!r}; VMs composed by vm-host: {known}"
    if not vm.managed:
        return f"{name} was not composed by vm-host; it is left alone"
    if vm.owner != owner:
        return (
            f"{name} belongs to {vm.owner}; withdraw the request or remove that relation instead"
        )
    return vm

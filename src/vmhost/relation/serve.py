"""One unit's round of serving the VMs other charms request over the `vms` relation.

The charm hands over what it read (the requests the library parsed, the leader's decision,
the hypervisor's VMs); `serve` deletes what is no longer wanted (only VMs owned by that
relation), composes what is missing through `vmhost.compose` (the same path as the
compose-vm action), and builds the answers. A request that is invalid or cannot be placed is
answered `failed` with its reason; the other requests go on and nothing here raises for
remote data. The deciding steps (`plan_changes`, `answers_by_relation`) are pure.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from vmhost import addresses, compose, constraints, pools
from vmhost.backends import Backend
from vmhost.constraints import spec_hash
from vmhost.model import InvalidRequestError, VmHostError, VmRecord, VmSpec, page_label
from vmhost.relation.keys import (
    RequestKey,
    Scope,
    read_owner,
    released_owner,
    request_key_of,
    vm_name,
)

__all__ = [
    "CHANGED_ERROR",
    "RELEASE_POLICIES",
    "Changes",
    "Desired",
    "Power",
    "RelationRequest",
    "Round",
    "answer_for",
    "answers_by_relation",
    "build_request",
    "gather",
    "plan_changes",
    "serve",
]

logger = logging.getLogger(__name__)

RELEASE_POLICIES = ("delete", "keep")
CHANGED_ERROR = (
    "request changed after the VM was composed; withdraw it and request again under a new id"
)

Desired = Mapping[RequestKey, VmSpec]
"""The valid requests a unit should host, each with its built VmSpec."""

_WIRE_TO_SPEC = {
    "cores": "cores",
    "memory": "memory_mib",
    "pinned-cores": "pinned_cores",
    "numa-nodes": "numa_nodes",
    "hugepages": "hugepages",
    "storage": "storage",
    "interfaces": "interfaces",
    "image": "image",
    "user-data": "user_data",
    "ssh-public-keys": "ssh_public_keys",
    "hostname": "hostname",
    "tags": "tags",
    "pool": "pool",
}


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class RelationRequest:
    """One request of one related application, built into a spec or refused with a reason."""

    key: RequestKey
    spec: VmSpec | None = None
    host: str | None = None
    """Unit name or hostname the requester pinned the VM to."""
    error: str | None = None


def build_request(
    relation_id: int,
    app: str,
    wire: Mapping[str, Any],
    *,
    default_root_gb: int,
    scope: Scope | None = None,
    default_image: str = "",
    resource_pools: pools.Pools | None = None,
) -> RelationRequest | None:
    """Turn one request in wire form (hyphenated keys) into a spec, or a refusal.

    The spec's owner carries `scope` (the vm-host application and model composing it), its
    pool the resource pool it lands in (`resource_pools.pool_for`: the one it names, if the
    app may use it, else the app's default). Returns None when the request has no usable id:
    it cannot be answered, only logged.
    """
    try:
        key = RequestKey(relation_id, app, str(wire.get("id", "")))
    except ValueError as exc:
        logger.warning("ignoring a request of %s without a usable id: %s", app, exc)
        return None
    if wire.get("memory") is None:
        return RelationRequest(key, error="memory: required; give the VM's memory in MiB")
    kwargs = {_WIRE_TO_SPEC[k]: v for k, v in wire.items() if k in _WIRE_TO_SPEC and v is not None}
    try:
        spec = constraints.build_spec(
            name=vm_name(key),
            owner=key.owner_in(scope),
            request_id=key.request_id,
            default_root_gb=default_root_gb,
            default_image=default_image,
            **kwargs,
        )
        if resource_pools is not None:
            spec = dataclasses.replace(spec, pool=resource_pools.pool_for(spec.pool, app))
    except InvalidRequestError as exc:
        return RelationRequest(key, error=str(exc))
    host = wire.get("host")
    return RelationRequest(key, spec, host=host if isinstance(host, str) else None)


def gather(
    relation_id: int,
    app: str,
    valid: Iterable[Mapping[str, Any]],
    invalid: Iterable[tuple[str | None, str]],
    *,
    default_root_gb: int,
    scope: Scope | None = None,
    default_image: str = "",
    resource_pools: pools.Pools | None = None,
) -> list[RelationRequest]:
    """Every request of one related app: built into a spec, or refused with a reason.

    Args:
        relation_id: the relation.
        app: the requiring application.
        valid: the requests the library accepted, in wire form (hyphenated keys).
        invalid: (id or None, reason) for those it refused; one without a usable id cannot
            be answered and is only logged.
        default_root_gb: the root disk size of requests that name none.
        scope: the vm-host application and model (the owner of the specs carries it).
        default_image: the image of requests that name none ("" boots them from the network).
        resource_pools: the configured pools (see build_request); None records no pool.
    """
    requests: list[RelationRequest] = []
    for bad_id, reason in invalid:
        if bad_id is None:
            logger.warning("%s sent unusable requests: %s", app, reason)
            continue
        try:
            key = RequestKey(relation_id, app, bad_id)
        except ValueError:
            continue
        requests.append(RelationRequest(key, error=reason))
    for wire in valid:
        built = build_request(
            relation_id,
            app,
            wire,
            default_root_gb=default_root_gb,
            scope=scope,
            default_image=default_image,
            resource_pools=resource_pools,
        )
        if built is not None:
            requests.append(built)
    return requests


# ---------------------------------------------------------------------------------------------
# What to compose and delete on this unit


@dataclass(frozen=True)
class Changes:
    """What `plan_changes` decided; every collection in a stable order."""

    to_compose: tuple[tuple[RequestKey, VmSpec], ...] = ()
    """Requested here and not on the host yet, by key."""
    to_delete: tuple[VmRecord, ...] = ()
    """VMs of live relations whose request is gone, and (release-policy delete) VMs of
    relations seen broken; by name."""
    released: tuple[VmRecord, ...] = ()
    """VMs of relations seen broken, left on the host by release-policy keep (the round
    re-owns them `released:<app>`); by name."""
    orphaned: tuple[VmRecord, ...] = ()
    """VMs of this scope whose relation is neither live nor seen broken: they only look
    orphaned (a relation this hook did not list), so they are reported, never touched; by
    name."""
    changed: tuple[tuple[RequestKey, VmRecord], ...] = ()
    """Requests whose VM exists but whose spec changed since: the VM is left as it is and
    the request is answered with CHANGED_ERROR; by key."""
    unchanged: tuple[tuple[RequestKey, VmRecord], ...] = ()
    """Requests whose VM exists as requested; by key."""
    retained: tuple[tuple[RequestKey, VmRecord], ...] = ()
    """VMs of requests still present but not desired here (invalid now, or assigned to
    another unit): left alone; by key."""
    duplicates: tuple[VmRecord, ...] = ()
    """Further VMs carrying the same request as the one matched: left alone; by name."""

    @property
    def errors(self) -> dict[RequestKey, str]:
        """The error to answer for each request that has one (changed since composed)."""
        return {key: CHANGED_ERROR for key, _ in sorted(self.changed)}

    @property
    def existing(self) -> dict[RequestKey, VmRecord]:
        """Every request that has a VM on this host (changed, unchanged or retained)."""
        return dict(sorted([*self.changed, *self.unchanged, *self.retained], key=lambda kv: kv[0]))


def _check_desired(desired: Mapping[RequestKey, VmSpec], scope: Scope | None) -> None:
    for key, spec in desired.items():
        if spec.owner != key.owner_in(scope) or spec.request_id != key.request_id:
            raise ValueError(
                f"spec {spec.name!r} carries owner {spec.owner!r} and request id "
                f"{spec.request_id!r}, not those of {key}; build it with "
                "owner=key.owner_in(scope)"
            )


def plan_changes(
    desired: Desired,
    existing: Sequence[VmRecord],
    *,
    release_policy: str,
    live_relation_ids: AbstractSet[int],
    retain: AbstractSet[RequestKey] = frozenset(),
    broken_relation_ids: AbstractSet[int] | None = None,
    scope: Scope | None = None,
    live_apps: Mapping[int, str] | None = None,
) -> Changes:
    """Decide what to compose and delete so the host matches the relation requests.

    Only VMs whose owner is a relation owner of this scope (or a legacy owner, which names
    none) are considered; everything else on the host (action VMs, released VMs, VMs of
    another vm-host application or model, foreign domains) is never in any result.

    Args:
        desired: the valid requests this unit should host, each with the VmSpec built by
            constraints.build_spec (owner=key.owner, request_id=key.request_id,
            name=vm_name(key)).
        existing: every VM on this host (backend.list_vms()).
        release_policy: "delete" or "keep": what happens to VMs of relations that are gone.
        live_relation_ids: ids of the relations of the provider endpoint that still exist
            (during relation-broken, without the broken one).
        retain: requests still present on a live relation but not in `desired` (invalid
            now, or assigned to another unit); their VMs are kept, never deleted.
        broken_relation_ids: relations whose relation-broken this unit saw (the host's
            journal): only their VMs are released; VMs of other relations that are not
            live are `orphaned`. None treats every relation that is not live as broken
            (for callers that know every relation there is).
        scope: this vm-host application and model; None accepts every scope.
        live_apps: relation id -> requiring app of the live relations and of those seen
            broken; a legacy owner (no scope) naming one of those ids with another app is
            not this application's (another model's relation of the same id): orphaned.

    Returns:
        The Changes; a changed spec is never deleted or recreated, only reported.

    Raises:
        ValueError: an unknown release policy, or a spec whose owner or request id does not
            match its key (bugs in the caller).
    """
    if release_policy not in RELEASE_POLICIES:
        raise ValueError(f"release policy {release_policy!r} is not one of delete, keep")
    _check_desired(desired, scope)
    sorted_vms = _SortedVms(
        desired,
        retain,
        live_relation_ids,
        release_policy == "delete",
        broken_relation_ids,
        scope,
        live_apps,
    )
    for vm in sorted(existing, key=lambda v: v.name):
        sorted_vms.add(vm)

    changed: list[tuple[RequestKey, VmRecord]] = []
    unchanged: list[tuple[RequestKey, VmRecord]] = []
    for key in sorted(sorted_vms.matched):
        vm = sorted_vms.matched[key]
        # The name is vm-host's choice, not the requester's: compare what the VM is.
        wanted = spec_hash(dataclasses.replace(desired[key], name=vm.name))
        (unchanged if wanted == vm.spec_hash else changed).append((key, vm))

    # Whether a name is free is compose's question (vmhost.compose.name_taken), asked as
    # each VM is composed, so a clash with any VM, or with a request composed earlier in
    # this round, is refused in one place.
    to_compose = tuple((k, desired[k]) for k in sorted(desired) if k not in sorted_vms.matched)
    return Changes(
        to_compose=to_compose,
        to_delete=tuple(sorted_vms.to_delete),
        released=tuple(sorted_vms.released),
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        retained=tuple(sorted(sorted_vms.retained.items())),
        duplicates=tuple(sorted_vms.duplicates),
        orphaned=tuple(sorted_vms.orphaned),
    )


@dataclass
class _SortedVms:
    """Sorts the host's relation VMs into what plan_changes does with each."""

    desired: Mapping[RequestKey, VmSpec]
    retain: AbstractSet[RequestKey]
    live: AbstractSet[int]
    release_deletes: bool
    broken: AbstractSet[int] | None
    scope: Scope | None
    live_apps: Mapping[int, str] | None
    matched: dict[RequestKey, VmRecord] = field(default_factory=dict[RequestKey, VmRecord])
    to_delete: list[VmRecord] = field(default_factory=list[VmRecord])
    released: list[VmRecord] = field(default_factory=list[VmRecord])
    retained: dict[RequestKey, VmRecord] = field(default_factory=dict[RequestKey, VmRecord])
    duplicates: list[VmRecord] = field(default_factory=list[VmRecord])
    orphaned: list[VmRecord] = field(default_factory=list[VmRecord])

    def add(self, vm: VmRecord) -> None:
        owner = read_owner(vm.owner) if vm.managed else None
        if owner is None or owner.relation_id is None:
            return  # an action, released or foreign VM: never touched here
        if self.scope is not None and owner.scope not in (None, self.scope):
            return  # another vm-host application's or model's VM
        key = request_key_of(vm)
        live_app = (self.live_apps or {}).get(owner.relation_id)
        if owner.scope is None and live_app not in (None, owner.app):
            self.orphaned.append(vm)  # a legacy owner of another model's relation
        elif owner.relation_id not in self.live:
            if self.broken is not None and owner.relation_id not in self.broken:
                self.orphaned.append(vm)  # looks orphaned: report it, never release it
            else:
                (self.to_delete if self.release_deletes else self.released).append(vm)
        elif key is None:
            self.to_delete.append(vm)  # a relation's VM without a usable request id
        elif key in self.desired or key in self.retain:
            found = self.matched if key in self.desired else self.retained
            if key in found:
                self.duplicates.append(vm)
            else:
                found[key] = vm
        else:
            self.to_delete.append(vm)


# ---------------------------------------------------------------------------------------------
# Answers


def answer_for(
    key: RequestKey,
    vm: VmRecord | None,
    error: str | None = None,
    *,
    spec: VmSpec | None = None,
    power_type: str = "virsh",
    power_address: str | None = None,
    waiting: bool = False,
) -> dict[str, Any]:
    """Return one answer in the wire shape of the vm_host interface (DESIGN.md).

    No VM and no error: "pending" (assigned here, not composed yet). No VM and an error:
    "failed", unless `waiting` (the error says what it waits for): "pending". A VM keeps
    its real state even with an error (a changed request): the VM still runs, only the
    change is refused. Keys whose value would be null are left out, as the library writes
    them.

    Args:
        key: the request.
        vm: its VM on this host, if any.
        error: why the request failed or was refused, for the requester to read.
        spec: the request's spec, when there is one: gives the name before the VM exists and
            the static address of each interface.
        power_type: "virsh" (libvirt) or "lxd".
        power_address: the libvirt URI or LXD URL managers use (the caller knows it).
        waiting: the error only says what the request waits for (answered pending).
    """
    answer: dict[str, Any] = {"id": key.request_id}
    name = vm.name if vm is not None else (spec.name if spec is not None else None)
    if name is not None:
        answer["name"] = name
    if vm is None:
        answer["state"] = "failed" if error and not waiting else "pending"
    else:
        answer["state"] = vm.state.value
        error = error or vm.state_reason or None
    if error:
        answer["error"] = error
    if vm is not None:
        answer.update(_vm_details(vm, spec, power_type, power_address))
    return answer


def answers_by_relation(
    keys: Iterable[RequestKey],
    vms: Mapping[RequestKey, VmRecord],
    *,
    specs: Mapping[RequestKey, VmSpec] | None = None,
    errors: Mapping[RequestKey, str] | None = None,
    power_type: str = "virsh",
    power_address: str | None = None,
    waiting: AbstractSet[RequestKey] = frozenset(),
) -> dict[int, list[dict[str, Any]]]:
    """Build every answer this unit publishes, grouped by relation id, each list by id.

    Args:
        keys: the requests to answer: those assigned to this unit, plus (leader) those with an
            error that no unit hosts (unplaced or invalid).
        vms: request -> its VM on this host (Changes.existing after composing, or
            `request_key_of` over the refreshed VM list).
        specs: request -> its spec, for names of pending requests and static addresses.
        errors: request -> error text (Changes.errors, compose failures, assignment reasons).
        power_type: "virsh" or "lxd".
        power_address: the libvirt URI or LXD URL managers use.
        waiting: requests whose error only says what they wait for (answered pending).
    """
    specs = specs or {}
    errors = errors or {}
    out: dict[int, list[dict[str, Any]]] = {}
    for key in sorted(set(keys)):
        out.setdefault(key.relation_id, []).append(
            answer_for(
                key,
                vms.get(key),
                errors.get(key),
                spec=specs.get(key),
                power_type=power_type,
                power_address=power_address,
                waiting=key in waiting,
            )
        )
    return out


def _vm_details(
    vm: VmRecord, spec: VmSpec | None, power_type: str, power_address: str | None
) -> dict[str, Any]:
    details: dict[str, Any] = {"uuid": vm.uuid} if vm.uuid else {}
    ips = {i.label: i.ip for i in spec.interfaces} if spec is not None else {}
    interfaces: list[dict[str, Any]] = []
    for nic in vm.interfaces:
        item: dict[str, Any] = {k: nic[k] for k in ("label", "mac", "attached-to") if nic.get(k)}
        known = addresses.nic_addresses(vm, nic.get("mac", ""))
        # `ip` (LIBPATCH 0) stays the static address, else the first one learnt.
        ip = ips.get(nic.get("label", "")) or (known[0] if known else None)
        if ip:
            item["ip"] = ip
        if known:
            item["addresses"] = known
        if "label" in item:
            interfaces.append(item)
    details["interfaces"] = interfaces
    placement: dict[str, Any] = {
        "numa-nodes": list(vm.placement.host_nodes),
        "cpus": list(vm.placement.pinned_cpus),
    }
    sizes = sorted(
        {c.hugepage_size_kib for c in vm.placement.cells if c.hugepages and c.hugepage_size_kib}
    )
    if sizes:
        placement["hugepages"] = page_label(sizes[0])
    details["placement"] = placement
    if vm.tags:
        details["tags"] = list(vm.tags)
    if vm.pool:
        details["pool"] = vm.pool
    power = {"type": power_type, "id": vm.name}
    if power_address:
        power["address"] = power_address
    details["power"] = power
    return details


# ---------------------------------------------------------------------------------------------
# The round


@dataclass(frozen=True)
class Power:
    """How managers reach this hypervisor, for the answers' power parameters."""

    type: str = "virsh"
    address: str | None = None


@dataclass
class Round:
    """What one round did and what this unit answers."""

    answers: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    composed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    """Kept under release-policy keep and re-owned `released:<app>` (operator-deletable)."""
    orphaned: list[str] = field(default_factory=list)
    """Relation VMs whose relation is neither live nor seen broken: reported only."""
    failures: dict[RequestKey, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether the round changed the host (its report is then stale)."""
        return bool(self.composed or self.deleted or self.released)

    def log(self) -> None:
        """Say in the unit's log what the round changed, and what it left alone."""
        for name in self.composed:
            logger.info("composed %s for a related application", name)
        for name in self.deleted:
            logger.info("deleted %s: its request or relation is gone", name)
        for name in self.released:
            logger.info(
                "kept %s after its relation left (release-policy keep); it is now "
                "released and delete-vm may delete it",
                name,
            )
        if self.orphaned:
            logger.warning(
                "relation VMs whose relation this unit did not see removed, left alone: %s",
                ", ".join(self.orphaned),
            )


def serve(
    backend: Backend,
    host: compose.HostState,
    requests: Sequence[RelationRequest],
    mine: AbstractSet[RequestKey],
    *,
    release_policy: str,
    live_relation_ids: AbstractSet[int],
    power: Power,
    answer_errors: Mapping[RequestKey, str] | None = None,
    waiting: AbstractSet[RequestKey] = frozenset(),
    broken_relation_ids: AbstractSet[int] | None = None,
    scope: Scope | None = None,
    live_apps: Mapping[int, str] | None = None,
    prepare_image: Callable[[str], str | None] | None = None,
) -> Round:
    """Make this host match the requests assigned to it, then answer them.

    Args:
        backend: the hypervisor.
        host: the host as read at the start of the hook (topology, every VM, policy,
            networks, default pool).
        requests: every request of every live relation (valid or refused).
        mine: the requests assigned to this unit.
        release_policy: what happens to VMs of relations that are gone.
        live_relation_ids: relations of the endpoint that still exist.
        power: the power type and address answers carry.
        answer_errors: refusals this unit answers besides its own (the leader answers
            invalid and unplaceable requests, so each is answered exactly once).
        waiting: those of answer_errors that only wait (answered pending with the reason).
        broken_relation_ids: relations this unit saw broken (see `plan_changes`).
        scope: this vm-host application and model (see `plan_changes`). With a scope, VMs
            kept by release-policy keep are re-owned ``released:<app>:<scope>`` (no
            relation touches them again; delete-vm may).
        live_apps: see `plan_changes`.
        prepare_image: gets a request's image ready without waiting for it (see
            compose.compose): a request whose image is still downloading is answered pending
            with the progress, and composed by a later hook.
    """
    specs = {r.key: r.spec for r in requests if r.spec is not None}
    desired = {k: specs[k] for k in sorted(mine) if k in specs}
    changes = plan_changes(
        desired,
        host.vms,
        release_policy=release_policy,
        live_relation_ids=live_relation_ids,
        retain={r.key for r in requests} - set(desired),
        broken_relation_ids=broken_relation_ids,
        scope=scope,
        live_apps=live_apps,
    )
    result = Round(failures=dict(changes.errors))
    result.orphaned = [vm.name for vm in changes.orphaned]
    gone: set[str] = set()
    for vm in changes.to_delete:
        try:
            backend.delete(vm.name)
        except VmHostError as exc:
            logger.error("could not delete %s (owner %s): %s", vm.name, vm.owner, exc)
            continue
        gone.add(vm.name)
        result.deleted.append(vm.name)
    reowned: dict[str, str] = {}
    for vm in changes.released:
        owner = read_owner(vm.owner)
        if scope is not None and owner is not None:
            new_owner = released_owner(owner.app, scope)
            try:
                backend.set_owner(vm.name, new_owner)
            except VmHostError as exc:
                logger.error("could not release %s (owner %s): %s", vm.name, vm.owner, exc)
                continue
            reowned[vm.name] = new_owner
        result.released.append(vm.name)
    now = [
        dataclasses.replace(vm, owner=reowned[vm.name]) if vm.name in reowned else vm
        for vm in host.vms
        if vm.name not in gone
    ]
    booked = host
    waits = set(waiting)
    for key, spec in changes.to_compose:
        outcome = compose.compose(
            backend, spec, dataclasses.replace(booked, vms=now), prepare_image=prepare_image
        )
        if outcome.vm is None:
            result.failures[key] = outcome.error or "not composed"
            if outcome.waiting:
                waits.add(key)
            continue
        now.append(outcome.vm)
        booked = compose.book_disks(booked, spec)  # its disks may grow: the next ones see it
        result.composed.append(outcome.vm.name)
    wanted = set(desired)
    answered = [vm for vm in now if request_key_of(vm, scope) in wanted]
    learnt = {vm.name: vm for vm in addresses.refresh(backend, answered)}
    now = [learnt.get(vm.name, vm) for vm in now]
    by_key = {k: vm for vm in now if (k := request_key_of(vm, scope)) is not None}
    errors = {**(answer_errors or {}), **result.failures}
    keys = set(desired) | set(answer_errors or {})
    result.answers = answers_by_relation(
        keys,
        {k: vm for k, vm in by_key.items() if k in keys},
        specs=specs,
        errors=errors,
        power_type=power.type,
        power_address=power.address,
        waiting=waits,
    )
    return result

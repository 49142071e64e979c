"""One unit's round of serving VMs that other charms request over the `vms` relation.

The charm hands over what it read (requests in wire form, the assignment, the hypervisor's
VMs); this module composes what is missing, deletes what is no longer wanted (only VMs owned
by that relation), and builds the answers. A request that is invalid or cannot be placed is
answered `failed` with its reason; the other requests go on and nothing here raises for
remote data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from vmhost import constraints, fleet, networks, placement
from vmhost.backends import Backend
from vmhost.fleet import RequestKey
from vmhost.model import (
    HostTopology,
    InvalidRequestError,
    Policy,
    Rejection,
    VmHostError,
    VmRecord,
    VmSpec,
)

logger = logging.getLogger(__name__)

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
}


@dataclass(frozen=True)
class RelationRequest:
    """One request of one related application, built into a spec or refused with a reason."""

    key: RequestKey
    spec: VmSpec | None = None
    host: str | None = None
    """Unit name or hostname the requester pinned the VM to."""
    error: str | None = None


def build_request(
    relation_id: int, app: str, wire: Mapping[str, Any], *, default_root_gb: int
) -> RelationRequest | None:
    """Turn one request in wire form (hyphenated keys) into a spec, or a refusal.

    Returns None when the request has no usable id: it cannot be answered, only logged.
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
            name=fleet.vm_name(key),
            owner=key.owner,
            request_id=key.request_id,
            default_root_gb=default_root_gb,
            **kwargs,
        )
    except InvalidRequestError as exc:
        return RelationRequest(key, error=str(exc))
    host = wire.get("host")
    return RelationRequest(key, spec, host=host if isinstance(host, str) else None)


@dataclass
class Round:
    """What one round did and what this unit answers."""

    answers: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    composed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    failures: dict[RequestKey, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HostSettings:
    """The operator's settings a round needs."""

    policy: Policy
    release_policy: str
    default_pool: str
    networks: Mapping[str, networks.NetworkMapping]
    power_type: str = "virsh"
    power_address: str | None = None


def serve(
    backend: Backend,
    topology: HostTopology,
    vms: Sequence[VmRecord],
    requests: Sequence[RelationRequest],
    mine: AbstractSet[RequestKey],
    settings: HostSettings,
    *,
    live_relation_ids: AbstractSet[int],
    answer_errors: Mapping[RequestKey, str] | None = None,
) -> Round:
    """Make this host match the requests assigned to it, then answer them.

    Args:
        backend: the hypervisor.
        topology: the host as read at the start of the hook.
        vms: every VM on the host, as read at the start of the hook.
        requests: every request of every live relation (valid or refused).
        mine: the requests assigned to this unit.
        settings: placement policy, release policy, default pool, networks, power details.
        live_relation_ids: relations of the endpoint that still exist.
        answer_errors: refusals this unit answers besides its own (the leader answers
            invalid and unplaceable requests, so each is answered exactly once).
    """
    specs = {r.key: r.spec for r in requests if r.spec is not None}
    desired = {k: specs[k] for k in sorted(mine) if k in specs}
    changes = fleet.plan_changes(
        desired,
        vms,
        release_policy=settings.release_policy,
        live_relation_ids=live_relation_ids,
        retain={r.key for r in requests} - set(desired),
    )
    result = Round(failures=dict(changes.errors))
    gone: set[str] = set()
    for vm in changes.to_delete:
        try:
            backend.delete(vm.name)
        except VmHostError as exc:
            logger.error("could not delete %s (owner %s): %s", vm.name, vm.owner, exc)
            continue
        gone.add(vm.name)
        result.deleted.append(vm.name)
    result.released = [vm.name for vm in changes.released]
    now = [vm for vm in vms if vm.name not in gone]
    allocations = [vm.placement for vm in now]
    for key, spec in changes.to_compose:
        try:
            nics = networks.resolve(spec.interfaces, topology.nics, settings.networks)
        except InvalidRequestError as exc:
            result.failures[key] = str(exc)
            continue
        plan = placement.plan(topology, allocations, spec, settings.policy)
        if isinstance(plan, Rejection):
            result.failures[key] = plan.reason
            continue
        try:
            vm = backend.compose(spec, plan, nics, settings.default_pool)
        except VmHostError as exc:
            result.failures[key] = f"compose failed and was rolled back: {exc}"
            continue
        now.append(vm)
        allocations.append(vm.placement)
        result.composed.append(vm.name)
    by_key = {k: vm for vm in now if (k := fleet.request_key_of(vm)) is not None}
    errors = {**(answer_errors or {}), **result.failures}
    keys = set(desired) | set(answer_errors or {})
    result.answers = fleet.answers_by_relation(
        keys,
        {k: vm for k, vm in by_key.items() if k in keys},
        specs=specs,
        errors=errors,
        power_type=settings.power_type,
        power_address=settings.power_address,
    )
    return result

"""What each `juju run` action does: typed parameters in, results or ActionError out.

The charm loads the parameters (the models in vmhost.config), reads the host once, and hands
both over in a Context; every decision an action makes is here, none in the charm. Results
are flat mappings of strings as `juju run` prints them (tables and JSON as text).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from vmhost import (
    access,
    addresses,
    compose,
    constraints,
    imagecache,
    lifecycle,
    pools,
    report,
    settings,
)
from vmhost.config import (
    CharmConfig,
    ComposeParams,
    ConsoleLogParams,
    KeyParams,
    ListVmsParams,
    NameParams,
    PowerParams,
    ReassignParams,
    RevokeParams,
    StopParams,
    SyncImagesParams,
    TrustParams,
)
from vmhost.images import ImageFetchError
from vmhost.model import HostTopology, InvalidRequestError, Placement, VmHostError, VmRecord
from vmhost.relation import fleet, keys

if TYPE_CHECKING:
    from vmhost.backends import Backend
    from vmhost.lxd_trust import LxdTrust

__all__ = [
    "ACCESS_ACTIONS",
    "HOST_ACTIONS",
    "AccessContext",
    "ActionError",
    "Context",
    "Snapshot",
    "add_trusted_client",
    "authorize_ssh_key",
    "compose_vm",
    "console_log",
    "delete_vm",
    "get_trust_token",
    "left_request",
    "list_access",
    "list_images",
    "list_vms",
    "power",
    "reassigned",
    "remove_trusted_client",
    "revoke_ssh_key",
    "show_resources",
    "sync_images",
    "trust_for",
]

Results = dict[str, Any]

logger = logging.getLogger(__name__)


class ActionError(Exception):
    """The action fails with this message; it says whether anything was done."""


class Snapshot:
    """What the hypervisor says right now; read once per hook, again after a change."""

    def __init__(self, backend: Backend):
        self.version = backend.version()
        self.topology: HostTopology = backend.topology()
        self.vms: list[VmRecord] = backend.list_vms()

    @property
    def allocations(self) -> list[Placement]:
        """The placement of every VM on the host."""
        return [vm.placement for vm in self.vms]


@dataclass
class Context:
    """What an action that works on the hypervisor needs, as the charm read it this hook."""

    config: CharmConfig
    backend: Backend
    snapshot: Snapshot
    refresh: Callable[[], Snapshot | None]
    """Read the host again (after a change); None when it cannot be reached now."""
    host_state: Callable[[Snapshot], compose.HostState]
    scope: keys.Scope
    log: Callable[[str], None]
    """Progress for the operator (the action log)."""
    image_settings: imagecache.Settings
    """The image-* options, with this host's image pool and fetch state (its HostLayout)."""
    read_request: Callable[[Mapping[str, object]], Mapping[str, object]]
    """A VM request read as the vm_host library reads relation requests, in wire form
    (ValueError naming the field when it is refused): compose-vm's grammar and limits."""
    peer_pool_use: Callable[[], Mapping[str, pools.Use] | None] = lambda: None
    """The other units' reported use per resource pool (fleet.peer_pool_use); None without
    a peer relation."""


# ---------------------------------------------------------------------------------------------
# VMs


def _recover(ctx: Context) -> list[str]:
    """Remove what killed composes left, telling the operator; the snapshot follows."""
    recovered = ctx.backend.recover()
    for message in recovered:
        ctx.log(message)
    if recovered:
        ctx.snapshot = ctx.refresh() or ctx.snapshot
    return recovered


def compose_vm(ctx: Context, params: ComposeParams) -> Results:
    """Compose one VM (or, with dry-run, only place it); an image not cached is fetched."""
    config = ctx.config
    try:
        params = params.read_by(ctx.read_request)
        spec = constraints.build_spec(
            name=params.name,
            cores=params.cores,
            memory_mib=params.memory,
            pinned_cores=params.pinned_cores,
            numa_nodes=params.numa_nodes,
            hugepages=params.hugepages,
            storage=params.storage,
            interfaces=params.interfaces,
            image=params.image,
            user_data=params.user_data,
            ssh_public_keys=params.ssh_public_keys,
            hostname=params.hostname,
            tags=params.tags,
            pool=params.pool,
            owner=keys.ACTION_OWNER,
            default_root_gb=config.default_root_disk_size,
            default_image=config.default_image,
        )
        spec = dataclasses.replace(spec, pool=config.pool_config.pool_for(spec.pool))
    except (ValueError, InvalidRequestError) as exc:
        raise ActionError(f"bad request, nothing done: {exc}") from exc
    recovered = [] if params.dry_run else _recover(ctx)

    def fetch(name: str) -> None:
        # The action may wait: it fetches in the foreground, its progress in the log.
        try:
            ctx.backend.prepare_image(name, ctx.image_settings, wait=True, log=ctx.log)
        except ImageFetchError as exc:
            raise VmHostError(imagecache.failure_text(name, exc)) from exc

    def probe(name: str) -> str:
        return ctx.backend.probe_image(name, ctx.image_settings)

    # The fleet's use counts too: the leader holds relation requests to it, actions the same.
    host = dataclasses.replace(
        ctx.host_state(ctx.snapshot), peer_pool_use=ctx.peer_pool_use() or {}
    )
    outcome = compose.compose(
        ctx.backend,
        spec,
        host,
        dry_run=params.dry_run,
        progress=ctx.log,
        prepare_image=fetch,
        probe_image=probe,
    )
    if outcome.vm is not None or outcome.failed:
        ctx.refresh()
    return _compose_results(ctx, outcome, recovered)


def _compose_results(ctx: Context, outcome: compose.Outcome, recovered: list[str]) -> Results:
    """compose-vm's results, or the failure that says which step refused and why."""
    spec = outcome.spec
    if outcome.refused:
        raise ActionError(f"bad request, nothing done: {outcome.refused}")
    if outcome.rejected:
        raise ActionError(f"cannot place {spec.name}, nothing done: {outcome.rejected}")
    if outcome.failed:
        raise ActionError(outcome.error or "compose failed")
    if outcome.unavailable:
        raise ActionError(f"image not available, nothing done: {outcome.unavailable}")
    if outcome.vm is None:
        assert outcome.placement is not None  # a dry run
        return {
            "dry-run": True,
            "placement": report.placement_json(outcome.placement),
            **dict(outcome.checks),
        }
    logger.info("composed %s (%s)", outcome.vm.name, outcome.vm.uuid)
    (vm,) = addresses.refresh(ctx.backend, [outcome.vm])
    results: Results = dict(report.vm_result(vm))
    if recovered:
        results["recovered"] = "; ".join(recovered)
    return results


def _name(value: str, prefix: str) -> str:
    try:
        return constraints.validate_name(value)
    except InvalidRequestError as exc:
        raise ActionError(f"{prefix}: {exc}") from exc


def delete_vm(ctx: Context, params: NameParams) -> Results:
    """Delete an action-owned VM, or one this application released, with its volumes."""
    name = _name(params.name, "bad parameters, nothing done")
    scope = ctx.scope

    def released_here(owner: str) -> bool:
        parsed = keys.read_owner(owner)
        return parsed is not None and parsed.released and parsed.scope == scope

    vm = compose.deletable(ctx.snapshot.vms, name, owner=keys.ACTION_OWNER, released=released_here)
    if isinstance(vm, str):
        raise ActionError(vm)
    try:
        deleted = ctx.backend.delete(name)
    except VmHostError as exc:
        raise ActionError(f"delete failed: {exc}") from exc
    finally:
        ctx.refresh()
    logger.info("deleted %s", name)
    results = {"deleted": name, "volumes": ", ".join(deleted)}
    kept = [ref for ref in vm.volumes if ref not in deleted]
    if kept:
        results["kept-volumes"] = ", ".join(kept)
    return results


def list_vms(ctx: Context, params: ListVmsParams) -> Results:
    """The VMs matching the filters, with the addresses known for them now."""
    chosen = report.select_vms(
        pools.with_default(ctx.snapshot.vms, ctx.config.pool_config.default),
        owner=params.owner,
        tag=params.tag,
        state=params.state,
        pool=params.pool,
    )
    vms = addresses.refresh(ctx.backend, chosen)
    nics = ctx.snapshot.topology.nics
    return {
        "table": report.vms_table(vms, nics),
        "json": json.dumps([report.vm_json(vm, nics) for vm in vms], sort_keys=True),
    }


def show_resources(ctx: Context, _params: object = None) -> Results:
    """Per NUMA node what is free, pinned and reserved, and what each VM takes there."""
    data = report.resources_json(
        ctx.snapshot.topology,
        ctx.snapshot.vms,
        ctx.config.policy,
        ctx.config.pool_config,
        ctx.peer_pool_use(),
    )
    return {"table": report.resources_table(data), "json": json.dumps(data, sort_keys=True)}


def console_log(ctx: Context, params: ConsoleLogParams) -> Results:
    """The tail of a VM's serial console log (kept by the host: 0600, rotated)."""
    name = _name(params.name, "bad parameters, nothing done")
    try:
        text = ctx.backend.console_log(name, params.lines)
    except VmHostError as exc:
        raise ActionError(f"no console log: {exc}") from exc
    return {"name": name, "lines": len(text.splitlines()), "log": text or "(no output yet)"}


def power(ctx: Context, params: PowerParams, verb: Literal["start", "stop", "restart"]) -> Results:
    """Start, stop (gracefully, or forced) or restart one VM, and say its state after."""
    try:
        vm = lifecycle.find_vm(ctx.snapshot.vms, params.name, params.owner)
    except InvalidRequestError as exc:
        raise ActionError(f"nothing done: {exc}") from exc
    done = True
    try:
        if not isinstance(params, StopParams):
            lifecycle.start(ctx.backend, vm, progress=ctx.log)
        else:
            act = lifecycle.stop if verb == "stop" else lifecycle.restart
            done = act(
                ctx.backend, vm, timeout_s=params.timeout, force=params.force, progress=ctx.log
            )
    except VmHostError as exc:
        raise ActionError(f"{vm.name}: {exc}") from exc
    finally:
        snapshot = ctx.refresh()
    if not done and isinstance(params, StopParams):
        raise ActionError(
            f"{vm.name} did not shut down within {params.timeout} s and is still running; "
            "give a longer timeout, or force=true to power it off"
        )
    now = next((v for v in snapshot.vms if v.name == vm.name), vm) if snapshot else vm
    logger.info("%s: %s done, now %s", vm.name, verb, now.state.value)
    return {"name": vm.name, "state": now.state.value}


def left_request(
    assignment_text: str | None, params: ReassignParams, *, leader: bool
) -> keys.RequestKey:
    """The one request of reassign-vm's app and id whose VM went with a unit that left.

    Only the leader assigns requests to units, so only the leader reassigns one.
    """
    if not leader:
        raise ActionError(
            "run reassign-vm on the vm-host leader unit (juju run vm-host/leader ...)"
        )
    current, _ = fleet.assignment_from_json(assignment_text)
    matches = sorted(
        k
        for k in current.left
        if k.app == params.app
        and k.request_id == params.id
        and params.relation_id in (None, k.relation_id)
    )
    if not matches:
        lost = ", ".join(f"app={k.app} id={k.request_id}" for k in sorted(current.left))
        raise ActionError(
            f"no request of {params.app} with id {params.id!r} lost its host; requests "
            f"whose host left: {lost or 'none'}"
        )
    if len(matches) > 1:
        ids = ", ".join(str(k.relation_id) for k in matches)
        raise ActionError(f"{params.app} has {params.id!r} on relations {ids}; give relation-id")
    return matches[0]


def reassigned(key: keys.RequestKey, decision: fleet.Decision | None) -> Results:
    """What reassign-vm says after the round that placed `key` anew (None: this unit left)."""
    if decision is None:
        raise ActionError("this unit is leaving; run reassign-vm on the new leader")
    unit = decision.assignment.units.get(key)
    if unit is None:
        reason = decision.assignment.unplaced.get(key, "not placed")
        raise ActionError(f"{key} could not be placed anew: {reason}")
    logger.info("reassigned %s to %s after its host left", key, unit)
    return {"app": key.app, "id": key.request_id, "unit": unit}


# ---------------------------------------------------------------------------------------------
# Images


def sync_images(ctx: Context, params: SyncImagesParams) -> Results:
    """Fetch or refresh images now: the named ones, else default-image and images."""
    config = ctx.config
    store = ctx.backend.image_store()
    wanted = settings.split_names(params.names) or [
        n for n in (config.default_image, *config.kept_images) if n
    ]
    if store is None:  # LXD: its own store, filled by LXD's pull
        failed = imagecache.sync_elsewhere(ctx.backend, ctx.image_settings, wanted, ctx.log)
        if failed:
            raise ActionError("; ".join(failed))
        return {"synced": ", ".join(wanted) or "nothing"}
    synced, failed = imagecache.sync(store, ctx.image_settings, wanted, log=ctx.log)
    if failed:
        raise ActionError("; ".join(failed))
    return {
        "synced": ", ".join(f"{b.name} {b.version}" for b in synced) or "nothing",
        "table": imagecache.listing_table(imagecache.listing(store)),
    }


def list_images(ctx: Context, _params: object = None) -> Results:
    """The cached base images (libvirt; LXD keeps its own store)."""
    store = ctx.backend.image_store()
    listed = imagecache.listing(store) if store is not None else []
    return {"table": imagecache.listing_table(listed), "json": json.dumps(listed, sort_keys=True)}


# ---------------------------------------------------------------------------------------------
# Access (no hypervisor snapshot needed)


def list_access(
    config: CharmConfig,
    make_trust: Callable[[], LxdTrust],
    where: access.AccessLayout = access.SYSTEM,
) -> Results:
    """The SSH keys (libvirt) or trusted clients (LXD) that reach the hypervisor."""
    try:
        if config.backend == "libvirt":
            entries = access.describe_keys(access.current_keys(config.libvirt_user, where))
        else:
            entries = make_trust().describe()
    except VmHostError as exc:
        raise ActionError(f"cannot read access: {exc}") from exc
    return {
        "backend": config.backend,
        "table": report.access_table(entries),
        "json": json.dumps(entries, sort_keys=True),
    }


def authorize_ssh_key(
    config: CharmConfig,
    params: KeyParams,
    address: str | None,
    where: access.AccessLayout = access.SYSTEM,
) -> Results:
    """Authorize one key for libvirt over SSH; the URI managers use comes back."""
    try:
        user = access.ensure_user(
            config.libvirt_user, adopt=config.libvirt_user_adopt, layout=where
        )
        key = access.authorize_key(user, params.key, params.name, where)
    except (InvalidRequestError, VmHostError) as exc:
        raise ActionError(f"key not authorized, nothing changed: {exc}") from exc
    return {
        "name": params.name,
        "fingerprint": key.fingerprint,
        "uri": access.libvirt_uri(config.libvirt_user, address or "<address>"),
    }


def revoke_ssh_key(
    config: CharmConfig, params: RevokeParams, where: access.AccessLayout = access.SYSTEM
) -> Results:
    """Remove the keys of one name or fingerprint."""
    try:
        removed = access.revoke_key(config.libvirt_user, params.key, where)
    except (InvalidRequestError, VmHostError) as exc:
        raise ActionError(f"nothing revoked: {exc}") from exc
    return {"revoked": ", ".join(k.fingerprint for k in removed)}


def trust_for(config: CharmConfig, make_trust: Callable[[], LxdTrust]) -> LxdTrust:
    """LXD's trust store, for the trust actions (backend=lxd only)."""
    if config.backend != "lxd":
        raise ActionError("LXD trust needs backend=lxd; with libvirt use authorize-ssh-key")
    try:
        return make_trust()
    except VmHostError as exc:
        raise ActionError(f"LXD not reachable: {exc}") from exc


def add_trusted_client(config: CharmConfig, trust: LxdTrust, params: TrustParams) -> Results:
    """Trust a client certificate, restricted to the charm's project."""
    try:
        name = trust.trust_action_client(params.name, params.certificate, [config.lxd_project])
    except (InvalidRequestError, VmHostError) as exc:
        raise ActionError(f"certificate not trusted, nothing changed: {exc}") from exc
    return {"name": name, "project": config.lxd_project}


def remove_trusted_client(trust: LxdTrust, params: NameParams) -> Results:
    """Stop trusting a client an action added."""
    try:
        name = trust.untrust_action_client(params.name)
    except (InvalidRequestError, VmHostError) as exc:
        raise ActionError(f"nothing removed: {exc}") from exc
    if name is None:
        raise ActionError(f"no trusted client named {params.name!r}")
    return {"removed": name}


def get_trust_token(config: CharmConfig, trust: LxdTrust, params: NameParams) -> Results:
    """Issue a one-time trust token (a secret: for the operator who asked, never the log)."""
    try:
        token = trust.issue_trust_token(params.name, [config.lxd_project])
    except (InvalidRequestError, VmHostError) as exc:
        raise ActionError(f"no token issued: {exc}") from exc
    return {"token": token, "project": config.lxd_project}


@dataclass(frozen=True)
class AccessContext:
    """What the access actions need: the config, LXD's trust store on demand, the address."""

    config: CharmConfig
    make_trust: Callable[[], LxdTrust]
    address: str | None
    """The access endpoint's address (for the libvirt URI), None when Juju gives none."""
    where: access.AccessLayout = access.SYSTEM
    """Where the access user and its keys live (the host layout's)."""

    def trust(self) -> LxdTrust:
        """LXD's trust store, for the trust actions."""
        return trust_for(self.config, self.make_trust)


ACCESS_ACTIONS: Mapping[str, tuple[type | None, Callable[[AccessContext, Any], Results]]] = {
    "list-access": (None, lambda ctx, _: list_access(ctx.config, ctx.make_trust, ctx.where)),
    "authorize-ssh-key": (
        KeyParams,
        lambda ctx, p: authorize_ssh_key(ctx.config, p, ctx.address, ctx.where),
    ),
    "revoke-ssh-key": (RevokeParams, lambda ctx, p: revoke_ssh_key(ctx.config, p, ctx.where)),
    "add-trusted-client": (
        TrustParams,
        lambda ctx, p: add_trusted_client(ctx.config, ctx.trust(), p),
    ),
    "remove-trusted-client": (NameParams, lambda ctx, p: remove_trusted_client(ctx.trust(), p)),
    "get-trust-token": (NameParams, lambda ctx, p: get_trust_token(ctx.config, ctx.trust(), p)),
}
"""Actions on hypervisor access: name -> (parameter model or None, function)."""

HOST_ACTIONS: Mapping[str, tuple[type | None, Callable[[Context, Any], Results]]] = {
    "compose-vm": (ComposeParams, compose_vm),
    "delete-vm": (NameParams, delete_vm),
    "list-vms": (ListVmsParams, list_vms),
    "show-resources": (None, show_resources),
    "console-log": (ConsoleLogParams, console_log),
    "start-vm": (PowerParams, lambda ctx, p: power(ctx, p, "start")),
    "stop-vm": (StopParams, lambda ctx, p: power(ctx, p, "stop")),
    "restart-vm": (StopParams, lambda ctx, p: power(ctx, p, "restart")),
    "sync-images": (SyncImagesParams, sync_images),
    "list-images": (None, list_images),
}
"""Actions that work on the hypervisor: name -> (parameter model or None, function)."""

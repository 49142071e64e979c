"""One hook's work on the host: the reconcile sequence, the hypervisor as read this hook, removal.

The charm hands in its config and, for the steps that read or write relation data, its own
callables (`Steps`); everything else that a hook does to the host, and in which order, is
decided here, so the sequence is testable without ops. Nothing is kept between hooks: the
hypervisor is read afresh by every hook (`HostReader`).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmhost import access, compose, exporter, health, host, imagecache, lifecycle, settings
from vmhost.actions import Snapshot
from vmhost.backends import Backend, BackendUnavailableError
from vmhost.config import CharmConfig, parse_networks
from vmhost.model import VmHostError
from vmhost.relation import fleet, serve

if TYPE_CHECKING:
    from vmhost.lxd_trust import LxdTrust
    from vmhost.relation import journal, keys

__all__ = [
    "HostReader",
    "Served",
    "Steps",
    "backend_choice_problem",
    "host_state",
    "libvirt_access",
    "lxd_access",
    "reconcile",
    "relation_round",
    "remove",
]

logger = logging.getLogger(__name__)


class HostReader:
    """The hypervisor as read this hook: once, and again only after something changed it."""

    def __init__(self, open_backend: Callable[[], Backend]):
        self._open = open_backend
        self._backend: Backend | None = None
        self._snapshot: Snapshot | None = None
        self.error = ""
        """Why the hypervisor could not be read at the last attempt ("" when it could)."""

    @property
    def backend(self) -> Backend:
        """The backend the config names (opened on first use; nothing is contacted yet)."""
        if self._backend is None:
            self._backend = self._open()
        return self._backend

    def read(self, *, refresh: bool = False) -> Snapshot | None:
        """The host as read this hook; None (and `error` says why) when it cannot be reached."""
        if self._snapshot is None or refresh:
            try:
                self._snapshot = Snapshot(self.backend)
                self.error = ""
            except BackendUnavailableError as exc:
                self._snapshot = None
                self.error = str(exc)
        return self._snapshot


@dataclass(frozen=True)
class Steps:
    """The charm's own steps of a reconcile: what reads or writes relation data."""

    libvirt_access: Callable[[], None]
    """Authorize the SSH keys of config and related managers; publish the URI (libvirt)."""
    lxd_access: Callable[[], None]
    """Serve HTTPS, trust the related managers' certificates, publish the URL (LXD)."""
    cos_agent: Callable[[], None]
    """Publish what COS reads over cos-agent."""
    vms: Callable[[Snapshot], object]
    """Serve the vms relation against the host as read now."""


def backend_choice_problem(config: CharmConfig) -> str | None:
    """Record the backend on first use; why this config cannot run here, if it cannot."""
    return health.backend_choice_problem(config.backend, host.check_backend_choice(config.backend))


def reconcile(
    config: CharmConfig,
    reader: HostReader,
    steps: Steps,
    *,
    templates_dir: Path,
    image_settings: imagecache.Settings,
    first_time: bool,
    update_status: bool,
    progress: Callable[[str], None],
) -> None:
    """Make the host match the config and the relations, in this order.

    The daemon and its access, the exporter and cos-agent; then, once the hypervisor can be
    read and the config does not contradict the host, huge pages, pools, the project, what
    killed composes left, the relation's VMs, and (update-status) crashed VMs and kept images.

    Args:
        config: the charm's options.
        reader: the hypervisor as read this hook.
        steps: the charm's relation steps.
        templates_dir: the charm's templates (libvirtd.conf).
        image_settings: the image-* options with this host's locations.
        first_time: install or upgrade-charm: install packages (or LXD) too.
        update_status: run the periodic steps as well.
        progress: shows what a long first step is doing (maintenance status).
    """
    choice = backend_choice_problem(config)
    if choice:
        logger.warning("not reconciling: %s", choice)
        return
    if config.backend == "libvirt":
        host.setup_libvirt(
            (s.size_kib for s in settings.parse_hugepages_setting(config.hugepages)),
            templates_dir,
            install=first_time,
            progress=progress,
        )
        steps.libvirt_access()
    else:
        if first_time:
            progress("installing LXD")
        daemon = host.ensure_lxd(config.lxd_snap_channel, install=first_time)
        if not daemon.running:
            logger.warning("%s", daemon.message)
    _ensure_exporter(config)
    steps.cos_agent()
    snapshot = reader.read()
    if snapshot is None:
        logger.info("hypervisor not reachable yet: %s", reader.error)
        return
    contradictions = health.config_host_problems(
        policy=config.policy,
        hugepages=config.hugepages,
        default_storage_pool=config.default_storage_pool,
        topology=snapshot.topology,
    )
    for problem in contradictions:
        logger.warning("not reconciling VMs or huge pages: %s", problem)
    if contradictions:
        return
    reservations = settings.parse_hugepages_setting(config.hugepages)
    if reservations:
        host.reserve_hugepages(reservations)
        snapshot = reader.read(refresh=True) or snapshot
    _reconcile_hypervisor(config, reader, snapshot, steps, update_status, image_settings)


def _ensure_exporter(config: CharmConfig) -> None:
    """Keep the exporter running with the current options (a failure is logged, not raised)."""
    try:
        logger.info("metrics exporter: %s", exporter.ensure_running(config.exporter_settings))
    except Exception as exc:
        logger.warning("metrics exporter not started: %s: %s", type(exc).__name__, exc)


def _reconcile_hypervisor(
    config: CharmConfig,
    reader: HostReader,
    snapshot: Snapshot,
    steps: Steps,
    update_status: bool,
    image_settings: imagecache.Settings,
) -> None:
    """Pools, project, what killed composes left, the relation's VMs, crashed VMs."""
    backend = reader.backend
    if not config.default_storage_pool:
        names = {pool.name for pool in snapshot.topology.pools}
        if host.DEFAULT_POOL_NAME not in names:
            backend.ensure_pool(host.DEFAULT_POOL_NAME, host.DEFAULT_POOL_PATH)
            snapshot = reader.read(refresh=True) or snapshot
    backend.ensure_project(config.lxd_project, config.storage_pool)
    if config.backend == "lxd":
        steps.lxd_access()
    if backend.recover():
        snapshot = reader.read(refresh=True) or snapshot
    steps.vms(snapshot)
    if update_status:
        snapshot = reader.read() or snapshot
        if lifecycle.revive_crashed(backend, snapshot.vms):
            reader.read(refresh=True)
        imagecache.keep_fresh(backend, image_settings, config.kept_images)


def host_state(
    config: CharmConfig, snapshot: Snapshot, *, mac_salt: str, peer_macs: frozenset[str]
) -> compose.HostState:
    """What composing needs: the host as read now, the config, the fleet's MACs."""
    return compose.HostState(
        topology=snapshot.topology,
        vms=snapshot.vms,
        policy=config.policy,
        networks=parse_networks(config.networks),
        default_pool=config.storage_pool,
        default_network=config.default_network,
        disk_overcommit_ratio=config.disk_overcommit_ratio,
        allowed_interfaces=config.allowed_interfaces,
        mac_salt=mac_salt,
        pools=config.pool_config,
        peer_macs=peer_macs,
    )


def image_in_background(
    backend: Backend, image_settings: imagecache.Settings
) -> Callable[[str], str | None]:
    """prepare_image for hooks: never waits; a missing image is fetched apart."""

    def prepare(name: str) -> str | None:
        return backend.prepare_image(name, image_settings, wait=False)

    return prepare


@dataclass(frozen=True)
class Served:
    """One unit's relation round: what it decided and answered, and its report to its peers."""

    decision: fleet.Decision
    answers: dict[int, list[dict[str, Any]]]
    """Relation id -> the answers to publish there."""
    report: str
    """This unit's host report for its peer databag (read again when the round changed it:
    the leader learns sooner that a request is composed here, and never places it elsewhere)."""


def relation_round(
    config: CharmConfig,
    reader: HostReader,
    snapshot: Snapshot,
    requests: list[serve.RelationRequest],
    *,
    unit: str,
    leader: bool,
    peers: fleet.Peers | None,
    scope: keys.Scope,
    mac_salt: str,
    live_apps: Mapping[int, str],
    seen: journal.Journal,
    manager_address: str | None,
    image_settings: imagecache.Settings,
    reassign: frozenset[keys.RequestKey] = frozenset(),
) -> Served | None:
    """Which requests this unit hosts (`fleet.lead`), then compose, delete, release, answer.

    A unit that is leaving (remove-unit, in `seen.departing`) does none of it and returns
    None: its relation-broken hooks are the unit going, not the relations, so it composes,
    deletes and releases nothing.

    Args:
        config: the charm's options (policy, networks, release policy, backend).
        reader: the hypervisor as read this hook.
        snapshot: the host as read now.
        requests: every request of every live relation.
        unit: this unit's name.
        leader: whether this unit is the leader (it assigns).
        peers: what the peer relation holds (None without one).
        scope: this vm-host application and model.
        mac_salt: what new MACs derive from besides the names (model UUID and unit).
        live_apps: relation id -> related application, for every live relation.
        seen: what this unit's journal says (relations seen broken).
        manager_address: how managers reach this hypervisor (answers' power address).
        image_settings: the image-* options with this host's locations.
        reassign: requests the operator asked to place anew (reassign-vm, leader).
    """
    if unit in seen.departing:
        logger.info("this unit is leaving: relation VMs are left as they are")
        return None
    decision = fleet.lead(
        unit,
        leader=leader,
        requests=requests,
        topology=snapshot.topology,
        vms=snapshot.vms,
        hostname=socket.gethostname(),
        peers=peers,
        policy=config.policy,
        mapping=parse_networks(config.networks),
        scope=scope,
        reassign=reassign,
        resource_pools=config.pool_config,
    )
    for problem in decision.problems:
        logger.warning("%s", problem)
    result = serve.serve(
        reader.backend,
        host_state(config, snapshot, mac_salt=mac_salt, peer_macs=decision.peer_macs),
        requests,
        decision.mine,
        release_policy=config.release_policy,
        live_relation_ids=set(live_apps),
        power=serve.Power("virsh" if config.backend == "libvirt" else "lxd", manager_address),
        answer_errors=decision.answer_errors,
        waiting=decision.assignment.waiting,
        broken_relation_ids=frozenset(seen.broken_apps),
        scope=scope,
        live_apps={**{i: app for i, app in seen.broken_apps.items() if app}, **live_apps},
        prepare_image=image_in_background(reader.backend, image_settings),
    )
    result.log()
    report = decision.report
    if result.changed:
        fresh = reader.read(refresh=True)
        if fresh is not None:
            report = fleet.unit_report(
                fresh.topology, fresh.vms, hostname=socket.gethostname(), scope=scope
            )
    return Served(decision, result.answers, report)


def libvirt_access(
    config: CharmConfig,
    where: access.AccessLayout,
    address: str | None,
    clients: Iterable[access.Client],
) -> str | None:
    """Authorize exactly the SSH keys of config, related managers and actions.

    Returns the URI managers use (None when the access user cannot be had, or there is no
    address to give).
    """
    if not access.reconcile(
        config.libvirt_user,
        adopt=config.libvirt_user_adopt,
        config_keys=config.ssh_authorized_keys,
        clients=clients,
        layout=where,
    ):
        return None
    return access.manager_address(
        "libvirt", address, user=config.libvirt_user, https_port=config.https_port
    )


@dataclass(frozen=True)
class LxdAccess:
    """What managers are told about LXD access (the access relation's provider data)."""

    url: str
    server_certificate: str
    project: str


def lxd_access(
    config: CharmConfig,
    open_trust: Callable[[], LxdTrust],
    address: str | None,
    clients: Iterable[access.Client],
    *,
    open_port: Callable[[int], None],
    publish: bool,
) -> LxdAccess | None:
    """Serve HTTPS on the access address; trust exactly the related managers' certificates.

    Returns what to publish when `publish` (a manager is related) and there is an address to
    publish, else None; LXD's refusals are logged.
    """
    try:
        trust = open_trust()
        if address is not None:
            trust.ensure_https(address, config.https_port)
            open_port(config.https_port)
        wanted = access.wanted_certificates(clients, config.lxd_project)
        for unit, reason in trust.sync_relation_certificates(wanted).items():
            logger.warning("certificate of %s refused: %s", unit, reason)
        url = access.manager_address(
            "lxd", address, user=config.libvirt_user, https_port=config.https_port
        )
        if url is None or not publish:
            return None
        return LxdAccess(url, trust.server_certificate(), config.lxd_project)
    except VmHostError as exc:
        logger.warning("LXD trust: %s", exc)
        return None


def remove(
    config: CharmConfig,
    reader: HostReader,
    where: access.AccessLayout,
    open_trust: Callable[[], LxdTrust],
) -> None:
    """On unit removal: access goes, VMs stay (listed in the log for the operator to decide).

    Deleting guests on unit removal would lose data nobody asked to lose, as MAAS did not when
    a VM host was removed without decompose.
    """
    if config.backend == "libvirt":
        access.remove_all(config.libvirt_user, where)
    else:
        try:
            removed = open_trust().remove_managed()
        except VmHostError as exc:
            logger.warning("could not remove trusted certificates: %s", exc)
        else:
            logger.info("untrusted %d vm-host certificates", len(removed))
    snapshot = reader.read()
    if snapshot is None:
        return
    names = sorted(vm.name for vm in snapshot.vms if vm.managed)
    if names:
        logger.warning("vm-host removed; these VMs stay on the host: %s", ", ".join(names))

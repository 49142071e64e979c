#!/usr/bin/env python3
"""vm-host: a machine charm that turns its machine into a VM host and composes VMs.

The charm translates; it does not decide. Events lead to one idempotent reconcile, actions to
the workload in src/vmhost, and status is computed only in collect-status. The hypervisor is
the ledger: allocations are read back from it on every hook, nothing is kept in unit state.
"""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import ops
import pydantic

from charms.vm_host.v0.vm_host import VmHostProvider
from charms.vm_host.v0.vm_host_access import AccessInfo, VmHostAccessProvider
from vmhost import (
    access,
    actions,
    compose,
    cos_agent,
    exporter,
    health,
    host,
    imagecache,
    lifecycle,
    networks,
    settings,
)
from vmhost.actions import Snapshot
from vmhost.backends import Backend, BackendUnavailableError, factory
from vmhost.config import (
    CharmConfig,
    ReassignParams,
    parse_networks,
    pydantic_message,
)
from vmhost.layout import HostLayout
from vmhost.model import InvalidRequestError, VmHostError
from vmhost.relation import fleet, journal, keys, serve

if TYPE_CHECKING:
    from vmhost.lxd_trust import LxdTrust

logger = logging.getLogger(__name__)

_P = TypeVar("_P", bound=pydantic.BaseModel)

CHARM_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = CHARM_DIR / "templates"


def _action_name(event: ops.ActionEvent) -> str:
    """The action's name as actions.yaml spells it ("compose-vm")."""
    return event.handle.kind.removesuffix("_action").replace("_", "-")


def make_backend(config: CharmConfig, layout: HostLayout | None = None) -> Backend:
    """Build the backend the config names, its state where `layout` says (faked in unit tests)."""
    return factory.make_backend(
        config.backend,
        project=config.lxd_project,
        templates_dir=TEMPLATES_DIR,
        virt_type=config.virt_type,
        layout=layout,
    )


class VmHostCharm(ops.CharmBase):
    """Turn this machine into a VM host and compose VMs on request."""

    layout: ClassVar[HostLayout | None] = None
    """Where this charm keeps its state on the host; None is the deployed charm's, HostLayout().

    Tests on the real daemons run a subclass with their own (`with_layout`).
    """

    @classmethod
    def with_layout(cls, layout: HostLayout) -> type[VmHostCharm]:
        """This charm keeping its state where `layout` says (same module, same metadata)."""
        return type(cls.__name__, (cls,), {"layout": layout, "__module__": cls.__module__})

    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self._layout = type(self).layout or HostLayout()
        self._config: CharmConfig | None = None
        self._config_error = ""
        self._backend_error = ""
        self._snapshot_cache: Snapshot | None = None
        self._backend_cache: Backend | None = None
        self.access = VmHostAccessProvider(self, relation_name="access")
        self.vms = VmHostProvider(self, relation_name="vms")

        for event in (
            self.on.install,
            self.on.start,
            self.on.config_changed,
            self.on.upgrade_charm,
            self.on.update_status,
            self.on.leader_elected,
            self.on.secret_changed,
            self.on.vms_relation_changed,
            self.on.access_relation_changed,
            self.on.access_relation_broken,
            self.on.hosts_relation_changed,
            self.on["cos-agent"].relation_joined,
            self.on["cos-agent"].relation_changed,
        ):
            framework.observe(event, self._reconcile)
        framework.observe(self.on.vms_relation_broken, self._on_vms_broken)
        framework.observe(self.on.vms_relation_departed, self._on_departed)
        framework.observe(self.on.hosts_relation_departed, self._on_departed)
        framework.observe(self.on.collect_unit_status, self._on_collect_status)
        framework.observe(self.on.remove, self._on_remove)
        for name in actions.HOST_ACTIONS:
            framework.observe(self.on[name].action, self._on_host_action)
        for name in actions.ACCESS_ACTIONS:
            framework.observe(self.on[name].action, self._on_access_action)
        framework.observe(self.on.reassign_vm_action, self._on_reassign_vm)

    # ----------------------------------------------------------------------------------------
    # Inputs

    def _load_config(self) -> CharmConfig | None:
        if self._config is None and not self._config_error:
            try:
                self._config = self.load_config(CharmConfig).for_host(
                    self.unit.name, socket.gethostname()
                )
            except pydantic.ValidationError as exc:
                self._config_error = pydantic_message(exc)
            except InvalidRequestError as exc:
                self._config_error = str(exc)
        return self._config

    @property
    def _scope(self) -> keys.Scope:
        """This vm-host application and model: what every VM it composes is owned by."""
        return keys.Scope(self.app.name, self.model.uuid)

    def _departing(self) -> bool:
        """Whether this unit is leaving (remove-unit), as recorded on the host."""
        return self.unit.name in journal.read(self._scope, self._layout.journal_dir).departing

    def _mapping(self, config: CharmConfig) -> Mapping[str, networks.NetworkMapping]:
        return parse_networks(config.networks)

    def _image_settings(self, config: CharmConfig) -> imagecache.Settings:
        """The image-* options, with this host's image pool and fetch state."""
        return self._layout.image_settings(config.image_settings)

    def _trust(self) -> LxdTrust:
        """LXD's trust store at this host's socket."""
        return factory.make_trust(self._layout)

    def _backend(self, config: CharmConfig) -> Backend:
        if self._backend_cache is None:
            self._backend_cache = make_backend(config, self._layout)
        return self._backend_cache

    def _snapshot(self, config: CharmConfig, *, refresh: bool = False) -> Snapshot | None:
        """Read the hypervisor, once per hook unless something changed it."""
        if self._snapshot_cache is None or refresh:
            try:
                self._snapshot_cache = Snapshot(self._backend(config))
                self._backend_error = ""
            except BackendUnavailableError as exc:
                self._snapshot_cache = None
                self._backend_error = str(exc)
        return self._snapshot_cache

    def _peer_macs(self) -> frozenset[str]:
        """The MACs the other units' readable host reports list."""
        peer = self.model.get_relation("hosts")
        if peer is None:
            return frozenset()
        return fleet.peer_macs({u.name: peer.data[u].get("report") for u in peer.units})

    def _host_state(
        self,
        config: CharmConfig,
        snapshot: Snapshot,
        peer_macs: frozenset[str] | None = None,
    ) -> compose.HostState:
        """What composing needs: the host as read now, the config, the fleet's MACs."""
        return compose.HostState(
            topology=snapshot.topology,
            vms=snapshot.vms,
            policy=config.policy,
            networks=self._mapping(config),
            default_pool=config.storage_pool,
            default_network=config.default_network,
            disk_overcommit_ratio=config.disk_overcommit_ratio,
            allowed_interfaces=config.allowed_interfaces,
            mac_salt=f"{self.model.uuid}/{self.unit.name}",
            pools=config.pool_config,
            peer_macs=self._peer_macs() if peer_macs is None else peer_macs,
        )

    def _access_address(self) -> str | None:
        binding = self.model.get_binding("access")
        address = binding.network.ingress_address if binding is not None else None
        return str(address) if address is not None else None

    def _manager_address(self, config: CharmConfig) -> str | None:
        return access.manager_address(
            config.backend,
            self._access_address(),
            user=config.libvirt_user,
            https_port=config.https_port,
        )

    # ----------------------------------------------------------------------------------------
    # Reconcile

    def _reconcile(self, event: ops.EventBase) -> None:
        config = self._load_config()
        if config is None:
            logger.warning("not reconciling: invalid config: %s", self._config_error)
            return
        choice = self._backend_choice_problem(config)
        if choice:
            logger.warning("not reconciling: %s", choice)
            return
        first_time = isinstance(event, (ops.InstallEvent, ops.UpgradeCharmEvent))
        if config.backend == "libvirt":
            host.setup_libvirt(
                (s.size_kib for s in settings.parse_hugepages_setting(config.hugepages)),
                TEMPLATES_DIR,
                install=first_time,
                progress=lambda what: setattr(self.unit, "status", ops.MaintenanceStatus(what)),
            )
            self._reconcile_access(config)
        else:
            if first_time:
                self.unit.status = ops.MaintenanceStatus("installing LXD")
            daemon = host.ensure_lxd(config.lxd_snap_channel, install=first_time)
            if not daemon.running:
                logger.warning("%s", daemon.message)
        self._reconcile_observability(config)
        snapshot = self._snapshot(config)
        if snapshot is None:
            logger.info("hypervisor not reachable yet: %s", self._backend_error)
            return
        contradictions = self._contradictions(config, snapshot)
        for problem in contradictions:
            logger.warning("not reconciling VMs or huge pages: %s", problem)
        if contradictions:
            return
        reservations = settings.parse_hugepages_setting(config.hugepages)
        if reservations:
            host.reserve_hugepages(reservations)
            snapshot = self._snapshot(config, refresh=True) or snapshot
        self._reconcile_hypervisor(
            config, snapshot, update_status=isinstance(event, ops.UpdateStatusEvent)
        )

    @staticmethod
    def _contradictions(config: CharmConfig, snapshot: Snapshot) -> list[str]:
        """Options this host contradicts (nothing they drive is written while one stands)."""
        return health.config_host_problems(
            policy=config.policy,
            hugepages=config.hugepages,
            default_storage_pool=config.default_storage_pool,
            topology=snapshot.topology,
        )

    def _reconcile_hypervisor(
        self, config: CharmConfig, snapshot: Snapshot, *, update_status: bool
    ) -> None:
        """Pools, project, what killed composes left, the relation's VMs, crashed VMs."""
        backend = self._backend(config)
        if not config.default_storage_pool:
            names = {pool.name for pool in snapshot.topology.pools}
            if host.DEFAULT_POOL_NAME not in names:
                backend.ensure_pool(host.DEFAULT_POOL_NAME, host.DEFAULT_POOL_PATH)
                snapshot = self._snapshot(config, refresh=True) or snapshot
        backend.ensure_project(config.lxd_project, config.storage_pool)
        if config.backend == "lxd":
            self._reconcile_lxd_access(config)
        if backend.recover():
            snapshot = self._snapshot(config, refresh=True) or snapshot
        self._reconcile_vms(config, snapshot)
        if update_status:
            snapshot = self._snapshot(config) or snapshot
            if lifecycle.revive_crashed(backend, snapshot.vms):
                self._snapshot(config, refresh=True)
            imagecache.keep_fresh(backend, self._image_settings(config), config.kept_images)

    # ----------------------------------------------------------------------------------------
    # Images

    def _image_in_background(self, config: CharmConfig):
        """prepare_image for hooks: never waits; a missing image is fetched apart."""
        backend = self._backend(config)
        image_settings = self._image_settings(config)

        def prepare(name: str) -> str | None:
            return backend.prepare_image(name, image_settings, wait=False)

        return prepare

    def _reconcile_observability(self, config: CharmConfig) -> None:
        """Keep the exporter running with the current options; publish what COS reads."""
        try:
            logger.info("metrics exporter: %s", exporter.ensure_running(config.exporter_settings))
        except Exception as exc:
            logger.warning("metrics exporter not started: %s: %s", type(exc).__name__, exc)
        relation = self.model.get_relation("cos-agent")
        if relation is None:
            return
        topology = cos_agent.Topology(
            model=self.model.name,
            model_uuid=self.model.uuid,
            application=self.app.name,
            unit=self.unit.name,
            charm_name=self.meta.name,
        )
        data = cos_agent.build(topology, config.metrics_listen)
        relation.data[self.unit].update(cos_agent.databag(data))

    def _backend_choice_problem(self, config: CharmConfig) -> str | None:
        """Record the backend on first use; why this config cannot run here, if it cannot."""
        return health.backend_choice_problem(
            config.backend, host.check_backend_choice(config.backend)
        )

    # ----------------------------------------------------------------------------------------
    # VMs requested over the `vms` relation

    def _on_departed(self, event: ops.RelationDepartedEvent) -> None:
        """Record on the host that this unit is leaving, before any relation-broken."""
        if event.departing_unit is not None and event.departing_unit.name == self.unit.name:
            journal.record_departing(self._scope, self.unit.name, self._layout.journal_dir)
            logger.info("this unit is leaving: its VMs stay on the host, nothing is deleted")
            return
        self._reconcile(event)

    def _on_vms_broken(self, event: ops.RelationBrokenEvent) -> None:
        """A relation seen broken by a unit that stays: its VMs may be released."""
        if not self._departing():
            app = event.relation.app.name if event.relation.app is not None else ""
            journal.record_broken(self._scope, event.relation.id, app, self._layout.journal_dir)
        self._reconcile(event)

    def _requests(self, config: CharmConfig) -> list[serve.RelationRequest]:
        return [
            request
            for batch in self.vms.requests
            for request in serve.gather(
                batch.relation_id,
                batch.app_name,
                [r.model_dump(mode="json", by_alias=True, exclude_none=True) for r in batch.valid],
                [(bad.id, bad.reason) for bad in batch.invalid],
                default_root_gb=config.default_root_disk_size,
                scope=self._scope,
                default_image=config.default_image,
                resource_pools=config.pool_config,
            )
        ]

    def _reconcile_vms(
        self,
        config: CharmConfig,
        snapshot: Snapshot,
        reassign: frozenset[keys.RequestKey] = frozenset(),
    ) -> fleet.Decision | None:
        """Compose what related apps request here, delete what they withdrew, answer all.

        A unit that is leaving (remove-unit) does none of it: its relation-broken hooks are
        the unit going, not the relations, so it composes, deletes and releases nothing.
        """
        if self._departing():
            logger.info("this unit is leaving: relation VMs are left as they are")
            return None
        batches = self.vms.requests
        requests = self._requests(config)
        decision = self._lead(config, snapshot, requests, reassign)
        scope = self._scope
        seen = journal.read(scope, self._layout.journal_dir)
        result = serve.serve(
            self._backend(config),
            self._host_state(config, snapshot, decision.peer_macs),
            requests,
            decision.mine,
            release_policy=config.release_policy,
            live_relation_ids={b.relation_id for b in batches},
            power=serve.Power(
                "virsh" if config.backend == "libvirt" else "lxd", self._manager_address(config)
            ),
            answer_errors=decision.answer_errors,
            waiting=decision.assignment.waiting,
            broken_relation_ids=frozenset(seen.broken_apps),
            scope=scope,
            live_apps={
                **{i: app for i, app in seen.broken_apps.items() if app},
                **{b.relation_id: b.app_name for b in batches},
            },
            prepare_image=self._image_in_background(config),
        )
        result.log()
        for batch in batches:
            if batch.relation is not None:
                self.vms.publish(batch.relation, result.answers.get(batch.relation_id, []))
        if result.changed:
            fresh = self._snapshot(config, refresh=True)
            peer = self.model.get_relation("hosts")
            if fresh is not None and peer is not None:
                # Report what changed now, not at this unit's next hook: the leader learns
                # sooner that a request is composed here (and never places it elsewhere).
                peer.data[self.unit]["report"] = fleet.unit_report(
                    fresh.topology, fresh.vms, hostname=socket.gethostname(), scope=scope
                )
        return decision

    def _lead(
        self,
        config: CharmConfig,
        snapshot: Snapshot,
        requests: list[serve.RelationRequest],
        reassign: frozenset[keys.RequestKey] = frozenset(),
    ) -> fleet.Decision:
        """Which requests this unit hosts: read the peer relation, decide, write it back."""
        peer = self.model.get_relation("hosts")
        peers = None
        if peer is not None:
            peers = fleet.Peers(
                reports={u.name: peer.data[u].get("report") for u in peer.units},
                assignment=peer.data[self.app].get("assignment"),
                composed=peer.data[self.app].get("composed"),
            )
        decision = fleet.lead(
            self.unit.name,
            leader=self.unit.is_leader(),
            requests=requests,
            topology=snapshot.topology,
            vms=snapshot.vms,
            hostname=socket.gethostname(),
            peers=peers,
            policy=config.policy,
            mapping=self._mapping(config),
            scope=self._scope,
            reassign=reassign,
            resource_pools=config.pool_config,
        )
        for problem in decision.problems:
            logger.warning("%s", problem)
        if peer is not None:
            peer.data[self.unit]["report"] = decision.report
            if decision.assignment_text is not None:
                peer.data[self.app]["assignment"] = decision.assignment_text
            if decision.composed_text is not None:
                peer.data[self.app]["composed"] = decision.composed_text
        return decision

    def _reconcile_access(self, config: CharmConfig) -> None:
        """Authorize exactly the SSH keys of config and related managers; publish the URI."""
        if not access.reconcile(
            config.libvirt_user,
            adopt=config.libvirt_user_adopt,
            config_keys=config.ssh_authorized_keys,
            clients=self.access.clients,
            layout=self._layout.access,
        ):
            return
        uri = self._manager_address(config)
        if uri is not None and self.access.relations:
            self.access.sync(
                AccessInfo(
                    backend="libvirt",
                    uri=uri,
                    ssh_host_keys=access.ssh_host_public_keys(self._layout.access.ssh_dir),
                )
            )

    def _reconcile_lxd_access(self, config: CharmConfig) -> None:
        """Serve HTTPS on the access address; trust exactly the related managers' certificates."""
        try:
            trust = self._trust()
            address = self._access_address()
            if address is not None:
                trust.ensure_https(address, config.https_port)
                self.unit.set_ports(config.https_port)
            wanted = access.wanted_certificates(self.access.clients, config.lxd_project)
            for unit, reason in trust.sync_relation_certificates(wanted).items():
                logger.warning("certificate of %s refused: %s", unit, reason)
            url = self._manager_address(config)
            if url is not None and self.access.relations:
                self.access.sync(
                    AccessInfo(
                        backend="lxd",
                        url=url,
                        server_certificate=trust.server_certificate(),
                        project=config.lxd_project,
                    )
                )
        except VmHostError as exc:
            logger.warning("LXD trust: %s", exc)

    # ----------------------------------------------------------------------------------------
    # Status

    def _on_collect_status(self, event: ops.CollectStatusEvent) -> None:
        """Ask the config and the host what is wrong, afresh: nothing a handler set is read."""
        config = self._load_config()
        if config is None:
            event.add_status(
                ops.BlockedStatus(f"invalid config: {self._config_error}; fix with juju config")
            )
            return
        kinds = {"blocked": ops.BlockedStatus, "waiting": ops.WaitingStatus}
        for kind, message in health.unit_status(
            config,
            lambda: self._snapshot(config),
            self._backend(config),
            self._mapping(config),
            backend_error=self._backend_error,
            make_trust=self._trust,
            where=self._layout.access,
        ):
            event.add_status(kinds.get(kind, ops.ActiveStatus)(message))

    # ----------------------------------------------------------------------------------------
    # Actions: parameters and inputs in, vmhost.actions decides, results or a failure out

    def _action_inputs(self, event: ops.ActionEvent) -> tuple[CharmConfig, Snapshot] | None:
        config = self._load_config()
        if config is None:
            event.fail(f"invalid config, nothing done: {self._config_error}")
            return None
        choice = self._backend_choice_problem(config)
        if choice:
            event.fail(choice)
            return None
        snapshot = self._snapshot(config)
        if snapshot is None:
            event.fail(f"hypervisor not reachable: {self._backend_error}")
            return None
        return config, snapshot

    def _params(self, event: ops.ActionEvent, model: type[_P]) -> _P | None:
        try:
            return event.load_params(model)
        except pydantic.ValidationError as exc:
            event.fail(f"bad parameters, nothing done: {pydantic_message(exc)}")
            return None

    def _context(
        self, event: ops.ActionEvent, config: CharmConfig, snapshot: Snapshot
    ) -> actions.Context:
        return actions.Context(
            config=config,
            backend=self._backend(config),
            snapshot=snapshot,
            refresh=lambda: self._snapshot(config, refresh=True),
            host_state=lambda now: self._host_state(config, now),
            scope=self._scope,
            log=event.log,
            image_settings=self._image_settings(config),
        )

    def _on_host_action(self, event: ops.ActionEvent) -> None:
        """An action on the hypervisor (vmhost.actions.HOST_ACTIONS)."""
        model, run = actions.HOST_ACTIONS[_action_name(event)]
        params = None if model is None else self._params(event, model)
        if model is not None and params is None:
            return
        inputs = self._action_inputs(event)
        if inputs is None:
            return
        self._finish(event, lambda: run(self._context(event, *inputs), params))

    @staticmethod
    def _finish(event: ops.ActionEvent, run: Callable[[], actions.Results]) -> None:
        try:
            event.set_results(run())
        except actions.ActionError as exc:
            event.fail(str(exc))

    def _on_reassign_vm(self, event: ops.ActionEvent) -> None:
        """Place anew a request whose VM went with a unit that left (leader only)."""
        params = self._params(event, ReassignParams)
        if params is None:
            return
        if not self.unit.is_leader():
            event.fail("run reassign-vm on the vm-host leader unit (juju run vm-host/leader ...)")
            return
        inputs = self._action_inputs(event)
        if inputs is None:
            return
        peer = self.model.get_relation("hosts")
        text = peer.data[self.app].get("assignment") if peer is not None else None
        try:
            key = actions.left_request(text, params)
        except actions.ActionError as exc:
            event.fail(str(exc))
            return
        decision = self._reconcile_vms(*inputs, reassign=frozenset({key}))
        if decision is None:
            event.fail("this unit is leaving; run reassign-vm on the new leader")
            return
        unit = decision.assignment.units.get(key)
        if unit is None:
            reason = decision.assignment.unplaced.get(key, "not placed")
            event.fail(f"{key} could not be placed anew: {reason}")
            return
        logger.info("reassigned %s to %s after its host left", key, unit)
        event.set_results({"app": key.app, "id": key.request_id, "unit": unit})

    def _on_access_action(self, event: ops.ActionEvent) -> None:
        """The access actions: SSH keys (libvirt), trusted clients and tokens (LXD)."""
        config = self._load_config()
        if config is None:
            event.fail(f"invalid config, nothing done: {self._config_error}")
            return
        model, run = actions.ACCESS_ACTIONS[_action_name(event)]
        params = None if model is None else self._params(event, model)
        if model is not None and params is None:
            return
        context = actions.AccessContext(
            config, self._trust, self._access_address(), self._layout.access
        )
        self._finish(event, lambda: run(context, params))

    # ----------------------------------------------------------------------------------------
    # Removal

    def _on_remove(self, _event: ops.RemoveEvent) -> None:
        """Leave VMs running, as MAAS did when a VM host was removed without decompose.

        Deleting guests on unit removal would lose data nobody asked to lose; they stay
        defined in libvirt and are listed in the log so the operator can decide.
        """
        exporter.stop()
        config = self._load_config()
        if config is None:
            return
        if config.backend == "libvirt":
            access.remove_all(config.libvirt_user, self._layout.access)
        else:
            try:
                removed = self._trust().remove_managed()
            except VmHostError as exc:
                logger.warning("could not remove trusted certificates: %s", exc)
            else:
                logger.info("untrusted %d vm-host certificates", len(removed))
        snapshot = self._snapshot(config)
        if snapshot is None:
            return
        names = sorted(vm.name for vm in snapshot.vms if vm.managed)
        if names:
            logger.warning("vm-host removed; these VMs stay on the host: %s", ", ".join(names))


if __name__ == "__main__":  # pragma: nocover
    # Everything the imports built lives for the whole hook: move it out of the collector's
    # sight, so no collection pass walks it again while the event runs.
    gc.freeze()
    ops.main(VmHostCharm)

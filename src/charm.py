#!/usr/bin/env python3
"""vm-host: a machine charm that turns its machine into a VM host and composes VMs.

The charm translates; it does not decide. Events lead to one idempotent reconcile, actions to
the workload in src/vmhost, and status is computed only in collect-status. The hypervisor is
the ledger: allocations are read back from it on every hook, nothing is kept in unit state.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import ops
import pydantic

from charms.vm_host.v0.vm_host import VmHostProvider, read_request
from charms.vm_host.v0.vm_host_access import AccessInfo, VmHostAccessProvider
from vmhost import (
    access,
    actions,
    cos_agent,
    exporter,
    health,
    hook,
)
from vmhost.actions import Snapshot
from vmhost.backends import factory
from vmhost.config import (
    CharmConfig,
    ReassignParams,
    load_for_host,
    parse_networks,
    pydantic_message,
)
from vmhost.layout import HostLayout
from vmhost.relation import fleet, journal, keys, serve

if TYPE_CHECKING:
    from vmhost import compose, imagecache
    from vmhost.backends import Backend
    from vmhost.lxd_trust import LxdTrust

logger = logging.getLogger(__name__)

_P = TypeVar("_P", bound=pydantic.BaseModel)

CHARM_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = CHARM_DIR / "templates"


def wire_request(item: Mapping[str, object]) -> dict[str, object]:
    """One VM request read by the vm_host library, in wire form.

    compose-vm's parameters and relation requests both reach the workload this way: one
    grammar (the MAAS strings) and one set of limits. Raises ValueError naming the field.
    """
    return read_request(item).model_dump(mode="json", by_alias=True, exclude_none=True)


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
        self._reader_cache: hook.HostReader | None = None
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
            self._config, self._config_error = load_for_host(
                lambda: self.load_config(CharmConfig), self.unit.name, socket.gethostname()
            )
        return self._config

    @property
    def _scope(self) -> keys.Scope:
        """This vm-host application and model: what every VM it composes is owned by."""
        return keys.Scope(self.app.name, self.model.uuid)

    def _image_settings(self, config: CharmConfig) -> imagecache.Settings:
        """The image-* options, with this host's image pool and fetch state."""
        return self._layout.image_settings(config.image_settings)

    def _trust(self) -> LxdTrust:
        """LXD's trust store at this host's socket."""
        return factory.make_trust(self._layout)

    def _reader(self, config: CharmConfig) -> hook.HostReader:
        """The hypervisor the config names, as read this hook."""
        if self._reader_cache is None:
            self._reader_cache = hook.HostReader(lambda: make_backend(config, self._layout))
        return self._reader_cache

    def _peers(self) -> fleet.Peers | None:
        """What the peer relation holds: the other units' reports, the leader's assignment."""
        peer = self.model.get_relation("hosts")
        if peer is None:
            return None
        return fleet.Peers(
            reports={u.name: peer.data[u].get("report") for u in peer.units},
            assignment=peer.data[self.app].get("assignment"),
            composed=peer.data[self.app].get("composed"),
        )

    def _host_state(self, config: CharmConfig, snapshot: Snapshot) -> compose.HostState:
        macs = fleet.peer_macs(p.reports) if (p := self._peers()) is not None else frozenset()
        return hook.host_state(
            config, snapshot, mac_salt=f"{self.model.uuid}/{self.unit.name}", peer_macs=macs
        )

    def _access_address(self) -> str | None:
        binding = self.model.get_binding("access")
        address = binding.network.ingress_address if binding is not None else None
        return str(address) if address is not None else None

    def _manager_address(self, config: CharmConfig) -> str | None:
        address, user, port = self._access_address(), config.libvirt_user, config.https_port
        return access.manager_address(config.backend, address, user=user, https_port=port)

    # ----------------------------------------------------------------------------------------
    # Reconcile

    def _reconcile(self, event: ops.EventBase) -> None:
        config = self._load_config()
        if config is None:
            logger.warning("not reconciling: invalid config: %s", self._config_error)
            return
        hook.reconcile(
            config,
            self._reader(config),
            hook.Steps(
                libvirt_access=lambda: self._reconcile_access(config),
                lxd_access=lambda: self._reconcile_lxd_access(config),
                cos_agent=lambda: self._publish_cos_agent(config),
                vms=lambda snapshot: self._reconcile_vms(config, snapshot),
            ),
            templates_dir=TEMPLATES_DIR,
            image_settings=self._image_settings(config),
            first_time=isinstance(event, (ops.InstallEvent, ops.UpgradeCharmEvent)),
            update_status=isinstance(event, ops.UpdateStatusEvent),
            progress=lambda what: setattr(self.unit, "status", ops.MaintenanceStatus(what)),
        )

    def _publish_cos_agent(self, config: CharmConfig) -> None:
        """Publish what COS reads (the scrape job, rules and dashboards)."""
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
        app = event.relation.app.name if event.relation.app is not None else ""
        where, unit = self._layout.journal_dir, self.unit.name
        journal.record_broken(self._scope, event.relation.id, app, where, unit=unit)
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

        None when this unit is leaving: it does none of it (hook.relation_round).
        """
        batches = self.vms.requests
        served = hook.relation_round(
            config,
            self._reader(config),
            snapshot,
            self._requests(config),
            unit=self.unit.name,
            leader=self.unit.is_leader(),
            peers=self._peers(),
            scope=self._scope,
            mac_salt=f"{self.model.uuid}/{self.unit.name}",
            live_apps={b.relation_id: b.app_name for b in batches},
            seen=journal.read(self._scope, self._layout.journal_dir),
            manager_address=self._manager_address(config),
            image_settings=self._image_settings(config),
            reassign=reassign,
        )
        if served is None:
            return None
        decision = served.decision
        peer = self.model.get_relation("hosts")
        if peer is not None:
            peer.data[self.unit]["report"] = served.report
            if decision.assignment_text is not None:
                peer.data[self.app]["assignment"] = decision.assignment_text
            if decision.composed_text is not None:
                peer.data[self.app]["composed"] = decision.composed_text
        for batch in batches:
            if batch.relation is not None:
                self.vms.publish(batch.relation, served.answers.get(batch.relation_id, []))
        return decision

    def _reconcile_access(self, config: CharmConfig) -> None:
        """Authorize exactly the SSH keys of config and related managers; publish the URI."""
        uri = hook.libvirt_access(
            config, self._layout.access, self._access_address(), self.access.clients
        )
        if uri is not None and self.access.relations:
            host_keys = access.ssh_host_public_keys(self._layout.access.ssh_dir)
            self.access.sync(AccessInfo(backend="libvirt", uri=uri, ssh_host_keys=host_keys))

    def _reconcile_lxd_access(self, config: CharmConfig) -> None:
        """Serve HTTPS on the access address; trust exactly the related managers' certificates."""
        found = hook.lxd_access(
            config,
            self._trust,
            self._access_address(),
            self.access.clients,
            open_port=self.unit.set_ports,
            publish=bool(self.access.relations),
        )
        if found is not None:
            self.access.sync(AccessInfo(backend="lxd", **dataclasses.asdict(found)))

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
        reader = self._reader(config)
        for kind, message in health.unit_status(
            config,
            reader.read,
            reader.backend,
            parse_networks(config.networks),
            backend_error=reader.error,
            make_trust=self._trust,
            where=self._layout.access,
        ):
            event.add_status(kinds.get(kind, ops.ActiveStatus)(message))

    # ----------------------------------------------------------------------------------------
    # Actions: parameters and inputs in, vmhost.actions decides, results or a failure out

    def _action_config(self) -> CharmConfig:
        config = self._load_config()
        if config is None:
            raise actions.ActionError(f"invalid config, nothing done: {self._config_error}")
        return config

    def _action_inputs(self) -> tuple[CharmConfig, Snapshot]:
        config = self._action_config()
        choice = hook.backend_choice_problem(config)
        if choice:
            raise actions.ActionError(choice)
        snapshot = self._reader(config).read()
        if snapshot is None:
            raise actions.ActionError(f"hypervisor not reachable: {self._reader(config).error}")
        return config, snapshot

    @staticmethod
    def _params(event: ops.ActionEvent, model: type[_P]) -> _P:
        try:
            return event.load_params(model)
        except pydantic.ValidationError as exc:
            message = f"bad parameters, nothing done: {pydantic_message(exc)}"
            raise actions.ActionError(message) from None

    def _context(
        self, event: ops.ActionEvent, config: CharmConfig, snapshot: Snapshot
    ) -> actions.Context:
        return actions.Context(
            config=config,
            backend=self._reader(config).backend,
            snapshot=snapshot,
            refresh=lambda: self._reader(config).read(refresh=True),
            host_state=lambda now: self._host_state(config, now),
            scope=self._scope,
            log=event.log,
            image_settings=self._image_settings(config),
            read_request=wire_request,
            peer_pool_use=lambda: fleet.peer_pool_use(p.reports) if (p := self._peers()) else None,
        )

    @staticmethod
    def _finish(event: ops.ActionEvent, run: Callable[[], actions.Results]) -> None:
        """Run an action: its results, or its failure (bad inputs included) for the operator."""
        try:
            event.set_results(run())
        except actions.ActionError as exc:
            event.fail(str(exc))

    def _on_host_action(self, event: ops.ActionEvent) -> None:
        """An action on the hypervisor (vmhost.actions.HOST_ACTIONS)."""
        model, run = actions.HOST_ACTIONS[_action_name(event)]

        def act() -> actions.Results:
            params = None if model is None else self._params(event, model)
            return run(self._context(event, *self._action_inputs()), params)

        self._finish(event, act)

    def _on_reassign_vm(self, event: ops.ActionEvent) -> None:
        """Place anew a request whose VM went with a unit that left (leader only)."""

        def act() -> actions.Results:
            params, peers = self._params(event, ReassignParams), self._peers()
            assignment = peers.assignment if peers else None
            key = actions.left_request(assignment, params, leader=self.unit.is_leader())
            inputs = self._action_inputs()
            return actions.reassigned(key, self._reconcile_vms(*inputs, reassign=frozenset({key})))

        self._finish(event, act)

    def _on_access_action(self, event: ops.ActionEvent) -> None:
        """The access actions: SSH keys (libvirt), trusted clients and tokens (LXD)."""
        model, run = actions.ACCESS_ACTIONS[_action_name(event)]

        def act() -> actions.Results:
            config = self._action_config()
            params = None if model is None else self._params(event, model)
            where, address = self._layout.access, self._access_address()
            return run(actions.AccessContext(config, self._trust, address, where), params)

        self._finish(event, act)

    # ----------------------------------------------------------------------------------------
    # Removal

    def _on_remove(self, _event: ops.RemoveEvent) -> None:
        """Access goes, VMs stay (vmhost.hook.remove says why)."""
        exporter.stop()
        config = self._load_config()
        if config is not None:
            hook.remove(config, self._reader(config), self._layout.access, self._trust)


if __name__ == "__main__":  # pragma: nocover
    # Everything the imports built lives for the whole hook: move it out of the collector's
    # sight, so no collection pass walks it again while the event runs.
    gc.freeze()
    ops.main(VmHostCharm)

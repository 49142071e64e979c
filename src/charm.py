#!/usr/bin/env python3
"""vm-host: a machine charm that turns its machine into a VM host and composes VMs.

The charm translates; it does not decide. Events lead to one idempotent reconcile, actions to
the workload in src/vmhost, and status is computed only in collect-status. The hypervisor is
the ledger: allocations are read back from it on every hook, nothing is kept in unit state.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any, Literal

import ops
import pydantic

from charms.vm_host.v0.vm_host import RelationRequests, VmHostProvider
from charms.vm_host.v0.vm_host_access import AccessInfo, VmHostAccessProvider
from vmhost import access, constraints, fleet, host, networks, placement, report, serve, settings
from vmhost.backends import Backend, BackendUnavailableError
from vmhost.model import (
    HostTopology,
    InvalidRequestError,
    Placement,
    Policy,
    Rejection,
    VmHostError,
    VmRecord,
    VmSpec,
)

logger = logging.getLogger(__name__)

CHARM_DIR = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = CHARM_DIR / "templates"


def _pydantic_message(exc: pydantic.ValidationError) -> str:
    """Turn a pydantic error into "option: what is wrong (got X)" with hyphenated names."""
    parts = []
    for error in exc.errors():
        name = "-".join(str(p) for p in error["loc"]).replace("_", "-") or "input"
        message = error["msg"].removeprefix("Value error, ")
        given = error.get("input")
        if isinstance(given, (str, int, float, bool)) and not isinstance(given, dict):
            message = f"{message} (got {given!r})"
        parts.append(f"{name}: {message}")
    return "; ".join(parts)


class CharmConfig(pydantic.BaseModel):
    """The charm's options (config.yaml), validated before anything on the host changes."""

    model_config = pydantic.ConfigDict(frozen=True, extra="ignore")

    backend: Literal["libvirt", "lxd"] = "libvirt"
    cpu_overcommit_ratio: float = 1.0
    memory_overcommit_ratio: float = 1.0
    reserved_cpus: str = ""
    reserved_memory: int = pydantic.Field(1024, ge=0)
    hugepages: str = ""
    smt_policy: Literal["prefer", "isolate", "require"] = "prefer"
    default_storage_pool: str = ""
    default_root_disk_size: int = pydantic.Field(20, ge=1, le=65536)
    networks: str = ""
    release_policy: Literal["delete", "keep"] = "delete"
    libvirt_user: str = "virsh"
    ssh_authorized_keys: str = ""
    lxd_project: str = "vm-host"
    lxd_snap_channel: str = "5.21/stable"
    https_port: int = pydantic.Field(8443, ge=1, le=65535)

    @pydantic.field_validator("cpu_overcommit_ratio", "memory_overcommit_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0 < value <= 10:
            raise ValueError("must be greater than 0 and at most 10; 1.0 means no overcommit")
        return value

    @pydantic.field_validator("reserved_cpus")
    @classmethod
    def _reserved_cpus(cls, value: str) -> str:
        settings.parse_reserved_cpus(value)
        return value

    @pydantic.field_validator("hugepages")
    @classmethod
    def _hugepages(cls, value: str) -> str:
        settings.parse_hugepages_setting(value)
        return value

    @pydantic.field_validator("default_storage_pool")
    @classmethod
    def _pool(cls, value: str) -> str:
        if value:
            constraints.validate_name(value, "default-storage-pool")
        return value

    @pydantic.field_validator("networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        networks.parse_networks_config(value)
        return value

    @pydantic.field_validator("libvirt_user")
    @classmethod
    def _user(cls, value: str) -> str:
        return access.validate_user_name(value)

    @pydantic.field_validator("lxd_project")
    @classmethod
    def _project(cls, value: str) -> str:
        from vmhost.lxd_trust import validate_project

        return validate_project(value)

    @property
    def policy(self) -> Policy:
        """The placement rules these options describe."""
        return settings.make_policy(
            cpu_overcommit_ratio=self.cpu_overcommit_ratio,
            memory_overcommit_ratio=self.memory_overcommit_ratio,
            reserved_cpus=self.reserved_cpus,
            reserved_memory_mib=self.reserved_memory,
            smt_policy=self.smt_policy,
        )

    @property
    def storage_pool(self) -> str:
        """The pool for disks that name none."""
        return self.default_storage_pool or host.DEFAULT_POOL_NAME


class ComposeParams(pydantic.BaseModel):
    """Parameters of the compose-vm action (actions.yaml)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    name: str
    memory: int
    cores: int | None = None
    pinned_cores: str | None = None
    numa_nodes: int | None = None
    hugepages: str | None = None
    storage: str | None = None
    interfaces: str | None = None
    image: str | None = None
    dry_run: bool = False


class NameParams(pydantic.BaseModel):
    """Parameters of actions that take only a name (delete-vm, remove-trusted-client, ...)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    name: str


class KeyParams(pydantic.BaseModel):
    """Parameters of authorize-ssh-key."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    name: str
    key: str


class RevokeParams(pydantic.BaseModel):
    """Parameters of revoke-ssh-key."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    key: str


class TrustParams(pydantic.BaseModel):
    """Parameters of add-trusted-client."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    name: str
    certificate: str


class _Snapshot:
    """What the hypervisor says right now; read once per hook, refreshed after changes."""

    def __init__(self, backend: Backend):
        self.version = backend.version()
        self.topology: HostTopology = backend.topology()
        self.vms: list[VmRecord] = backend.list_vms()

    @property
    def allocations(self) -> list[Placement]:
        return [vm.placement for vm in self.vms]


def make_backend(config: CharmConfig) -> Backend:
    """Build the backend the config names (replaced by a fake in unit tests).

    Imported lazily: an LXD host has no libvirt library for libvirt-python to load.
    """
    if config.backend == "lxd":
        from vmhost.backends.lxd import LxdBackend

        return LxdBackend(project=config.lxd_project)
    from vmhost.backends.libvirt import LibvirtBackend

    return LibvirtBackend(templates_dir=TEMPLATES_DIR)


class VmHostCharm(ops.CharmBase):
    """Turn this machine into a VM host and compose VMs on request."""

    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self._config: CharmConfig | None = None
        self._config_error = ""
        self._setup_problem = ""
        self._choice_problem = ""
        self._backend_error = ""
        self._snapshot_cache: _Snapshot | None = None
        self._backend_cache: Backend | None = None
        self._access_problems: list[str] = []
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
            self.on.vms_relation_broken,
            self.on.access_relation_changed,
            self.on.access_relation_broken,
            self.on.hosts_relation_changed,
            self.on.hosts_relation_departed,
        ):
            framework.observe(event, self._reconcile)
        framework.observe(self.on.collect_unit_status, self._on_collect_status)
        framework.observe(self.on.remove, self._on_remove)
        framework.observe(self.on.compose_vm_action, self._on_compose_vm)
        framework.observe(self.on.delete_vm_action, self._on_delete_vm)
        framework.observe(self.on.list_vms_action, self._on_list_vms)
        framework.observe(self.on.show_resources_action, self._on_show_resources)
        framework.observe(self.on.authorize_ssh_key_action, self._on_authorize_ssh_key)
        framework.observe(self.on.revoke_ssh_key_action, self._on_revoke_ssh_key)
        framework.observe(self.on.add_trusted_client_action, self._on_add_trusted_client)
        framework.observe(self.on.remove_trusted_client_action, self._on_remove_trusted_client)
        framework.observe(self.on.get_trust_token_action, self._on_get_trust_token)

    # ----------------------------------------------------------------------------------------
    # Inputs

    def _load_config(self) -> CharmConfig | None:
        if self._config is None and not self._config_error:
            try:
                self._config = self.load_config(CharmConfig)
            except pydantic.ValidationError as exc:
                self._config_error = _pydantic_message(exc)
            except InvalidRequestError as exc:
                self._config_error = str(exc)
        return self._config

    def _backend(self, config: CharmConfig) -> Backend:
        if self._backend_cache is None:
            self._backend_cache = make_backend(config)
        return self._backend_cache

    def _snapshot(self, config: CharmConfig, *, refresh: bool = False) -> _Snapshot | None:
        """Read the hypervisor, once per hook unless something changed it."""
        if self._snapshot_cache is None or refresh:
            try:
                self._snapshot_cache = _Snapshot(self._backend(config))
                self._backend_error = ""
            except BackendUnavailableError as exc:
                self._snapshot_cache = None
                self._backend_error = str(exc)
        return self._snapshot_cache

    # ----------------------------------------------------------------------------------------
    # Reconcile

    def _reconcile(self, event: ops.EventBase) -> None:
        config = self._load_config()
        if config is None:
            logger.warning("not reconciling: invalid config: %s", self._config_error)
            return
        if not self._backend_choice_ok(config):
            return
        first_time = isinstance(event, (ops.InstallEvent, ops.UpgradeCharmEvent))
        if config.backend == "libvirt":
            self._setup_libvirt(install=first_time)
            self._reconcile_access(config)
        else:
            self._setup_lxd(config, install=first_time)
        self._apply_hugepages(config)
        snapshot = self._snapshot(config)
        if snapshot is None:
            logger.info("hypervisor not reachable yet: %s", self._backend_error)
            return
        backend = self._backend(config)
        if not config.default_storage_pool:
            names = {pool.name for pool in snapshot.topology.pools}
            if host.DEFAULT_POOL_NAME not in names:
                backend.ensure_pool(host.DEFAULT_POOL_NAME, host.DEFAULT_POOL_PATH)
                snapshot = self._snapshot(config, refresh=True) or snapshot
        if config.backend == "lxd":
            from vmhost.backends.lxd import LxdBackend

            if isinstance(backend, LxdBackend):
                backend.ensure_project(config.lxd_project, config.storage_pool)
            self._reconcile_lxd_access(config)
        self._reconcile_vms(config, snapshot)

    def _backend_choice_ok(self, config: CharmConfig) -> bool:
        recorded = host.check_backend_choice(config.backend)
        self._choice_problem = (
            ""
            if recorded is None
            else f"backend is fixed after install (this host uses {recorded}); "
            f"set backend={recorded}"
        )
        return recorded is None

    # ----------------------------------------------------------------------------------------
    # VMs requested over the `vms` relation

    def _relation_requests(
        self, config: CharmConfig, batches: list[RelationRequests]
    ) -> list[serve.RelationRequest]:
        """Every request of every related app: built into a spec, or refused with a reason."""
        requests: list[serve.RelationRequest] = []
        for batch in batches:
            for bad in batch.invalid:
                if bad.id is None:
                    logger.warning("%s sent unusable requests: %s", batch.app_name, bad.reason)
                    continue
                try:
                    key = fleet.RequestKey(batch.relation_id, batch.app_name, bad.id)
                except ValueError:
                    continue
                requests.append(serve.RelationRequest(key, error=bad.reason))
            for request in batch.valid:
                built = serve.build_request(
                    batch.relation_id,
                    batch.app_name,
                    request.model_dump(mode="json", by_alias=True, exclude_none=True),
                    default_root_gb=config.default_root_disk_size,
                )
                if built is not None:
                    requests.append(built)
        return requests

    def _assignment(
        self,
        config: CharmConfig,
        requests: list[serve.RelationRequest],
        own_report: str,
    ) -> fleet.Assignment:
        """Which unit hosts each request: decided by the leader, kept in peer app data."""
        valid = [(r.key, r.spec, r.host) for r in requests if r.spec is not None]
        peer = self.model.get_relation("hosts")
        if peer is None:  # before the peer relation exists this unit is the whole fleet
            return fleet.Assignment(units={key: self.unit.name for key, _, _ in valid})
        peer.data[self.unit]["report"] = own_report
        current, problem = fleet.assignment_from_json(peer.data[self.app].get("assignment"))
        if problem:
            logger.warning("peer assignment unreadable: %s", problem)
        if not self.unit.is_leader():
            return current
        texts: dict[str, str | None] = {u.name: peer.data[u].get("report") for u in peer.units}
        texts[self.unit.name] = own_report
        reports, problems = fleet.collect_reports(texts)
        for unit, reason in problems.items():
            logger.warning("host report of %s ignored: %s", unit, reason)
        mapping = networks.parse_networks_config(config.networks)

        def eligible(_unit: str, host_report: fleet.HostReport, spec: VmSpec) -> str | None:
            try:
                networks.resolve(spec.interfaces, host_report.topology.nics, mapping)
            except InvalidRequestError as exc:
                return str(exc)
            return None

        assignment = fleet.assign(
            valid,
            reports,
            current.units,
            frozenset(),
            config.policy,
            eligible=eligible,
            present=set(texts),
        )
        peer.data[self.app]["assignment"] = fleet.assignment_to_json(assignment)
        return assignment

    @staticmethod
    def _power_address(config: CharmConfig, address: str | None) -> str | None:
        """How managers reach this hypervisor: the libvirt URI or the LXD HTTPS URL."""
        if address is None:
            return None
        if config.backend == "libvirt":
            return access.libvirt_uri(config.libvirt_user, address)
        url_host = f"[{address}]" if ":" in address else address
        return f"https://{url_host}:{config.https_port}"

    def _reconcile_vms(self, config: CharmConfig, snapshot: _Snapshot) -> None:
        """Compose what related apps request here, delete what they withdrew, answer all."""
        batches = self.vms.requests
        requests = self._relation_requests(config, batches)
        own_report = fleet.host_report(
            snapshot.topology,
            snapshot.allocations,
            hostname=socket.gethostname(),
            composed=fleet.composed_keys(snapshot.vms),
        )
        assignment = self._assignment(config, requests, own_report)
        answer_errors: dict[fleet.RequestKey, str] = {}
        if self.unit.is_leader():
            answer_errors = {r.key: r.error for r in requests if r.error is not None}
            answer_errors.update(assignment.unplaced)
        address = self._access_address()
        result = serve.serve(
            self._backend(config),
            snapshot.topology,
            snapshot.vms,
            requests,
            assignment.for_unit(self.unit.name),
            serve.HostSettings(
                policy=config.policy,
                release_policy=config.release_policy,
                default_pool=config.storage_pool,
                networks=networks.parse_networks_config(config.networks),
                power_type="virsh" if config.backend == "libvirt" else "lxd",
                power_address=self._power_address(config, address),
            ),
            live_relation_ids={b.relation_id for b in batches},
            answer_errors=answer_errors,
        )
        for name in result.composed:
            logger.info("composed %s for a related application", name)
        for name in result.deleted:
            logger.info("deleted %s: its request or relation is gone", name)
        for name in result.released:
            logger.info("kept %s after its relation left (release-policy keep)", name)
        for batch in batches:
            if batch.relation is not None:
                self.vms.publish(batch.relation, result.answers.get(batch.relation_id, []))
        if result.composed or result.deleted:
            self._snapshot(config, refresh=True)

    def _setup_libvirt(self, *, install: bool) -> None:
        """Install and configure libvirt; restart it only when its config really changed."""
        if install:
            self.unit.status = ops.MaintenanceStatus("installing libvirt and QEMU")
            host.install_packages()
        changed = host.write_if_changed(
            host.LIBVIRTD_CONF_PATH, host.render_libvirtd_conf(TEMPLATES_DIR), 0o644
        )
        daemon = host.ensure_libvirtd(changed)
        if not daemon.running:
            self._backend_error = daemon.message

    def _setup_lxd(self, config: CharmConfig, *, install: bool) -> None:
        """Install LXD from the snap where snapd exists, else adopt the running LXD."""
        if install:
            self.unit.status = ops.MaintenanceStatus("installing LXD")
        daemon = host.ensure_lxd(config.lxd_snap_channel, install=install)
        if not daemon.running:
            self._backend_error = daemon.message

    def _apply_hugepages(self, config: CharmConfig) -> None:
        """Reserve the configured huge pages; report what the kernel did not grant."""
        problems = []
        for setting in settings.parse_hugepages_setting(config.hugepages):
            try:
                granted = host.set_hugepages(setting.size_kib, setting.count, setting.node)
            except VmHostError as exc:
                problems.append(str(exc))
                continue
            if granted < setting.count:
                where = "host-wide" if setting.node is None else f"on node {setting.node}"
                problems.append(
                    f"kernel granted {granted} of {setting.count} huge pages of "
                    f"{setting.size_kib // 1024} MiB {where}"
                )
        self._setup_problem = "; ".join(problems)

    def _access_address(self) -> str | None:
        binding = self.model.get_binding("access")
        address = binding.network.ingress_address if binding is not None else None
        return str(address) if address is not None else None

    def _reconcile_access(self, config: CharmConfig) -> None:
        """Authorize exactly the SSH keys of config and related managers; publish the URI.

        Keys added by the authorize-ssh-key action live in the managed block itself (tagged
        with their source), so they survive every reconcile without unit state.
        """
        problems: list[str] = []
        try:
            user = access.ensure_user(config.libvirt_user)
        except (VmHostError, InvalidRequestError) as exc:
            self._access_problems = [f"libvirt-user: {exc}"]
            return
        if access.ensure_sshd_drop_in(config.libvirt_user):
            host.reload_sshd()
        try:
            keys = access.parse_public_keys(config.ssh_authorized_keys, "config")
        except InvalidRequestError as exc:
            problems.append(str(exc))
            keys = [k for k in access.current_keys(user) if k.source == "config"]
        for client in self.access.clients:
            if not client.ssh_public_key:
                continue
            try:
                keys.append(access.parse_public_key(client.ssh_public_key, client.source))
            except InvalidRequestError as exc:
                logger.warning("not authorizing the key of %s: %s", client.unit, exc)
        access.sync_keys(user, keys)
        address = self._access_address()
        if address is not None and self.access.relations:
            self.access.sync(
                AccessInfo(
                    backend="libvirt",
                    uri=access.libvirt_uri(config.libvirt_user, address),
                    ssh_host_keys=access.ssh_host_public_keys(),
                )
            )
        self._access_problems = problems

    def _reconcile_lxd_access(self, config: CharmConfig) -> None:
        """Serve HTTPS on the access address; trust exactly the related managers' certificates.

        Certificates are restricted to lxd-project whatever projects a manager asks for: a
        manager never gains access to projects vm-host does not own.
        """
        from vmhost.lxd_trust import LxdError, LxdTrust

        try:
            self._sync_lxd_trust(config, LxdTrust())
        except LxdError as exc:
            self._access_problems = [f"LXD trust: {exc}"]

    def _sync_lxd_trust(self, config: CharmConfig, trust: Any) -> None:
        address = self._access_address()
        if address is not None:
            trust.ensure_https(address, config.https_port)
            self.unit.set_ports(config.https_port)
        wanted: dict[str, tuple[str, list[str]]] = {}
        for client in self.access.clients:
            if not client.certificate:
                continue
            if client.projects and set(client.projects) != {config.lxd_project}:
                logger.warning(
                    "%s asked for projects %s; trusted for %s only",
                    client.unit,
                    ", ".join(client.projects),
                    config.lxd_project,
                )
            wanted[client.unit] = (client.certificate, [config.lxd_project])
        for unit, reason in trust.sync_relation_certificates(wanted).items():
            logger.warning("certificate of %s refused: %s", unit, reason)
        if address is not None and self.access.relations:
            self.access.sync(
                AccessInfo(
                    backend="lxd",
                    url=self._power_address(config, address),
                    server_certificate=trust.server_certificate(),
                    project=config.lxd_project,
                )
            )

    # ----------------------------------------------------------------------------------------
    # Status

    def _on_collect_status(self, event: ops.CollectStatusEvent) -> None:
        config = self._load_config()
        if config is None:
            event.add_status(
                ops.BlockedStatus(f"invalid config: {self._config_error}; fix with juju config")
            )
            return
        if self._choice_problem:
            event.add_status(ops.BlockedStatus(self._choice_problem))
            return
        snapshot = self._snapshot(config)
        if snapshot is None:
            daemon = "libvirtd" if config.backend == "libvirt" else "LXD"
            event.add_status(ops.WaitingStatus(f"waiting for {daemon}: {self._backend_error}"))
            return
        if self._setup_problem:
            event.add_status(ops.BlockedStatus(f"{self._setup_problem}; lower `hugepages`"))
        for problem in self._access_problems:
            event.add_status(ops.BlockedStatus(f"{problem}; fix with juju config"))
        mapping = networks.parse_networks_config(config.networks)
        for problem in networks.check_networks_on_host(mapping, snapshot.topology.nics):
            event.add_status(ops.BlockedStatus(f"networks: {problem}"))
        event.add_status(
            ops.ActiveStatus(
                report.status_line(
                    config.backend,
                    snapshot.version,
                    snapshot.topology,
                    snapshot.allocations,
                    config.policy,
                    len(snapshot.vms),
                )
            )
        )

    # ----------------------------------------------------------------------------------------
    # Actions

    def _action_inputs(self, event: ops.ActionEvent) -> tuple[CharmConfig, _Snapshot] | None:
        config = self._load_config()
        if config is None:
            event.fail(f"invalid config, nothing done: {self._config_error}")
            return None
        if not self._backend_choice_ok(config):
            event.fail(self._choice_problem)
            return None
        snapshot = self._snapshot(config)
        if snapshot is None:
            event.fail(f"hypervisor not reachable: {self._backend_error}")
            return None
        return config, snapshot

    def _on_compose_vm(self, event: ops.ActionEvent) -> None:
        try:
            params = event.load_params(ComposeParams)
        except pydantic.ValidationError as exc:
            event.fail(f"bad parameters, nothing done: {_pydantic_message(exc)}")
            return
        inputs = self._action_inputs(event)
        if inputs is None:
            return
        config, snapshot = inputs
        try:
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
                owner=fleet.ACTION_OWNER,
                default_root_gb=config.default_root_disk_size,
            )
            if any(vm.name == spec.name for vm in snapshot.vms):
                raise InvalidRequestError(
                    "name", f"a VM named {spec.name!r} already exists; choose another name"
                )
            nics = networks.resolve(
                spec.interfaces,
                snapshot.topology.nics,
                networks.parse_networks_config(config.networks),
            )
        except InvalidRequestError as exc:
            event.fail(f"bad request, nothing done: {exc}")
            return
        result = placement.plan(snapshot.topology, snapshot.allocations, spec, config.policy)
        if isinstance(result, Rejection):
            event.fail(f"cannot place {spec.name}, nothing done: {result.reason}")
            return
        if params.dry_run:
            event.set_results({"dry-run": True, "placement": report.placement_json(result)})
            return
        event.log(f"composing {spec.name} on host nodes {list(result.host_nodes) or 'any'}")
        try:
            vm = self._backend(config).compose(spec, result, nics, config.storage_pool)
        except VmHostError as exc:
            event.fail(f"compose failed and was rolled back: {exc}")
            return
        finally:
            self._snapshot(config, refresh=True)
        logger.info("composed %s (%s)", vm.name, vm.uuid)
        event.set_results(report.vm_result(vm))

    def _on_delete_vm(self, event: ops.ActionEvent) -> None:
        try:
            params = event.load_params(NameParams)
            name = constraints.validate_name(params.name)
        except (pydantic.ValidationError, InvalidRequestError) as exc:
            message = (
                _pydantic_message(exc) if isinstance(exc, pydantic.ValidationError) else str(exc)
            )
            event.fail(f"bad parameters, nothing done: {message}")
            return
        inputs = self._action_inputs(event)
        if inputs is None:
            return
        config, snapshot = inputs
        vm = next((v for v in snapshot.vms if v.name == name), None)
        if vm is None:
            known = ", ".join(sorted(v.name for v in snapshot.vms if v.managed)) or "none"
            event.fail(f"no VM named {name!r}; VMs composed by vm-host: {known}")
            return
        if not vm.managed:
            event.fail(f"{name} was not composed by vm-host; it is left alone")
            return
        if vm.owner != fleet.ACTION_OWNER:
            event.fail(
                f"{name} belongs to {vm.owner}; withdraw the request or remove that "
                "relation instead"
            )
            return
        try:
            self._backend(config).delete(name)
        except VmHostError as exc:
            event.fail(f"delete failed: {exc}")
            return
        finally:
            self._snapshot(config, refresh=True)
        logger.info("deleted %s", name)
        event.set_results({"deleted": name, "volumes": ", ".join(vm.volumes)})

    def _on_list_vms(self, event: ops.ActionEvent) -> None:
        inputs = self._action_inputs(event)
        if inputs is None:
            return
        _, snapshot = inputs
        event.set_results(
            {
                "table": report.vms_table(snapshot.vms),
                "json": json.dumps([report.vm_json(vm) for vm in snapshot.vms], sort_keys=True),
            }
        )

    def _on_show_resources(self, event: ops.ActionEvent) -> None:
        inputs = self._action_inputs(event)
        if inputs is None:
            return
        config, snapshot = inputs
        data = report.resources_json(snapshot.topology, snapshot.vms, config.policy)
        event.set_results(
            {
                "table": report.resources_table(data),
                "json": json.dumps(data, sort_keys=True),
            }
        )

    def _on_authorize_ssh_key(self, event: ops.ActionEvent) -> None:
        config = self._load_config()
        if config is None:
            event.fail(f"invalid config, nothing done: {self._config_error}")
            return
        params = event.load_params(KeyParams, errors="fail")
        try:
            user = access.ensure_user(config.libvirt_user)
            key = access.authorize_key(user, params.key, params.name)
        except (InvalidRequestError, VmHostError) as exc:
            event.fail(f"key not authorized, nothing changed: {exc}")
            return
        address = self._access_address() or "<address>"
        event.set_results(
            {
                "name": params.name,
                "fingerprint": key.fingerprint,
                "uri": access.libvirt_uri(config.libvirt_user, address),
            }
        )

    def _on_revoke_ssh_key(self, event: ops.ActionEvent) -> None:
        config = self._load_config()
        if config is None:
            event.fail(f"invalid config, nothing done: {self._config_error}")
            return
        params = event.load_params(RevokeParams, errors="fail")
        try:
            removed = access.revoke_key(config.libvirt_user, params.key)
        except (InvalidRequestError, VmHostError) as exc:
            event.fail(f"nothing revoked: {exc}")
            return
        event.set_results({"revoked": ", ".join(k.fingerprint for k in removed)})

    def _lxd_trust_inputs(self, event: ops.ActionEvent) -> tuple[CharmConfig, Any] | None:
        config = self._load_config()
        if config is None:
            event.fail(f"invalid config, nothing done: {self._config_error}")
            return None
        if config.backend != "lxd":
            event.fail("LXD trust needs backend=lxd; with libvirt use authorize-ssh-key")
            return None
        from vmhost.lxd_trust import LxdError, LxdTrust

        try:
            return config, LxdTrust()
        except LxdError as exc:
            event.fail(f"LXD not reachable: {exc}")
            return None

    def _on_add_trusted_client(self, event: ops.ActionEvent) -> None:
        params = event.load_params(TrustParams, errors="fail")
        inputs = self._lxd_trust_inputs(event)
        if inputs is None:
            return
        config, trust = inputs
        from vmhost.lxd_trust import action_certificate_name

        try:
            name = action_certificate_name(params.name)
            trust.trust_certificate(params.certificate, name, [config.lxd_project])
        except (InvalidRequestError, VmHostError) as exc:
            event.fail(f"certificate not trusted, nothing changed: {exc}")
            return
        event.set_results({"name": name, "project": config.lxd_project})

    def _on_remove_trusted_client(self, event: ops.ActionEvent) -> None:
        params = event.load_params(NameParams, errors="fail")
        inputs = self._lxd_trust_inputs(event)
        if inputs is None:
            return
        _, trust = inputs
        from vmhost.lxd_trust import action_certificate_name

        try:
            name = action_certificate_name(params.name)
            removed = trust.untrust(name)
        except (InvalidRequestError, VmHostError) as exc:
            event.fail(f"nothing removed: {exc}")
            return
        if not removed:
            event.fail(f"no trusted client named {params.name!r}")
            return
        event.set_results({"removed": name})

    def _on_get_trust_token(self, event: ops.ActionEvent) -> None:
        params = event.load_params(NameParams, errors="fail")
        inputs = self._lxd_trust_inputs(event)
        if inputs is None:
            return
        config, trust = inputs
        try:
            token = trust.issue_trust_token(params.name, [config.lxd_project])
        except (InvalidRequestError, VmHostError) as exc:
            event.fail(f"no token issued: {exc}")
            return
        # The token is a secret: it goes to the operator who asked, never to the log.
        event.set_results({"token": token, "project": config.lxd_project})

    # ----------------------------------------------------------------------------------------
    # Removal

    def _on_remove(self, _event: ops.RemoveEvent) -> None:
        """Leave VMs running, as MAAS did when a VM host was removed without decompose.

        Deleting guests on unit removal would lose data nobody asked to lose; they stay
        defined in libvirt and are listed in the log so the operator can decide.
        """
        config = self._load_config()
        if config is None:
            return
        if config.backend == "libvirt":
            access.remove_access(config.libvirt_user)
            if access.remove_sshd_drop_in():
                host.reload_sshd()
        else:
            from vmhost.lxd_trust import LxdError, LxdTrust

            try:
                removed = LxdTrust().remove_managed()
            except LxdError as exc:
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
    ops.main(VmHostCharm)

"""Hypervisor access from a vm-host: libvirt over SSH keys, LXD over HTTPS trust.

Interface `vm_host_access`, version 0. A manager (MAAS, a Terraform runner, any charm that drives
the hypervisor itself) relates to vm-host and gets access to its hypervisor:

- libvirt hosts authorize the manager's SSH public key for a dedicated user, restricted to the
  libvirt socket (no shell, no forwarding), and publish the `qemu+ssh://` URI and the host's SSH
  host keys, so the manager pins them instead of trusting on first use;
- LXD hosts trust the manager's client certificate restricted to a project, and publish the
  HTTPS URL, the server certificate (to pin) and the project.

Removing the relation removes exactly that access.

## Requirer (the manager)

metadata.yaml:

```yaml
requires:
  vm-host-access:
    interface: vm_host_access
    optional: true
```

charm.py:

```python
from charms.vm_host.v0.vm_host_access import VmHostAccessRequirer

class ManagerCharm(ops.CharmBase):
    def __init__(self, framework):
        super().__init__(framework)
        self.vm_hosts = VmHostAccessRequirer(self, relation_name="vm-host-access")
        framework.observe(self.vm_hosts.on.access_changed, self._reconcile)
        framework.observe(self.on["vm-host-access"].relation_joined, self._reconcile)

    def _reconcile(self, _event):
        self.vm_hosts.set_ssh_public_key(my_public_key)          # libvirt hosts
        self.vm_hosts.set_certificate(my_client_cert_pem, ["maas"])  # LXD hosts
        for host in self.vm_hosts.access:
            if host.backend == "libvirt":
                connect(host.uri, known_hosts=host.ssh_host_keys)
            elif host.backend == "lxd":
                connect(host.url, verify=host.server_certificate, project=host.project)
```

`set_ssh_public_key` and `set_certificate` write this unit's databag on every relation of the
endpoint that exists now: call them from your reconcile so new relations get them too. Only
public material is sent; private keys stay with the manager.

## Provider (vm-host)

```python
from charms.vm_host.v0.vm_host_access import AccessInfo, VmHostAccessProvider

self.access = VmHostAccessProvider(self, relation_name="access")
for client in self.access.clients:        # valid requests, one per remote unit
    ...authorize client.ssh_public_key / trust client.certificate...
for bad in self.access.invalid_clients:   # never raised: log and report
    logger.warning("%s: %s", bad.unit, bad.reason)
self.access.sync(AccessInfo(backend="libvirt", uri=..., ssh_host_keys=[...]))
```

`clients` skips a relation that is being broken, so a holistic reconcile drops its access.

## Databags (unit databags, each value JSON-encoded)

Requirer: `ssh-public-key` (one OpenSSH public key line), `certificate` (one PEM X.509
certificate), `projects` (LXD projects asked for; the host may restrict further).
Provider: `version` ("0"), `backend` ("libvirt" | "lxd"); libvirt: `uri`, `ssh-host-keys`;
LXD: `url`, `server-certificate`, `project`. Unknown fields are ignored; a bad value makes that
unit's request invalid, never the hook fail.

## Testing

`requirer_relation(...)` builds the relation a vm-host charm test needs (manager units with
their keys and certificates), `provider_relation(...)` the one a manager charm test needs
(vm-host units with what they published); `published_from(...)` and `requested_from(...)` read
an output state's databag back into the models.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import ops
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from ops import testing

LIBID = "5a83801c93844f3ba3e416ce70321a88"
LIBAPI = 0
LIBPATCH = 2
PYDEPS = ["pydantic>=2,<3"]

logger = logging.getLogger(__name__)

INTERFACE = "vm_host_access"
VERSION = "0"
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_PEM_RE = re.compile(
    r"^-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=\r\n]+)-----END CERTIFICATE-----\s*$"
)
_OPTION_WORDS = frozenset(
    {
        "agent-forwarding",
        "cert-authority",
        "no-agent-forwarding",
        "no-port-forwarding",
        "no-pty",
        "no-touch-required",
        "no-user-rc",
        "no-x11-forwarding",
        "port-forwarding",
        "pty",
        "restrict",
        "user-rc",
        "verify-required",
        "x11-forwarding",
    }
)
_MAX_KEY = 16384
_MAX_CERT = 65536
_MAX_VALUE_CHARS = 1 << 20
"""The longest databag value decoded: a remote unit cannot make a hook parse more."""


# ---------------------------------------------------------------------------------------------
# Schema


def check_ssh_public_key(text: str) -> str:
    """Return "<type> <base64>" for one OpenSSH public key line; ValueError says what is wrong.

    The comment is dropped. The host validates again (key sizes, curve points); this check keeps
    obviously wrong data off the wire and explains it to the sender.
    """
    if not isinstance(text, str):
        raise ValueError("must be a string")
    text = text.strip()
    if len(text) > _MAX_KEY:
        raise ValueError("is too long to be an SSH public key")
    if any(c in text for c in "\r\n\x00"):
        raise ValueError("must be one line holding one key")
    parts = text.split()
    if not parts:
        raise ValueError("is empty")
    if parts[0] not in KEY_TYPES:
        if "=" in parts[0] or "," in parts[0] or '"' in text or parts[0] in _OPTION_WORDS:
            raise ValueError("must not carry authorized_keys options; send '<type> <base64>'")
        raise ValueError(
            f"has unknown key type {parts[0][:40]!r}; use one of {', '.join(KEY_TYPES)}"
        )
    if len(parts) < 2:
        raise ValueError("has no base64 key body")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("has a key body that is not valid base64") from None
    length = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4 : 4 + length] != parts[0].encode():
        raise ValueError(f"has a key body that is not a {parts[0]} key")
    return f"{parts[0]} {parts[1]}"


def check_certificate(text: str) -> str:
    """Return one PEM certificate, stripped; ValueError says what is wrong.

    Only the PEM armour and base64 are checked here (the library depends on ops and pydantic
    only); the host parses the X.509 and checks its validity dates.
    """
    if not isinstance(text, str):
        raise ValueError("must be a string")
    text = text.strip()
    if len(text) > _MAX_CERT:
        raise ValueError("is too long to be a client certificate")
    if "PRIVATE KEY" in text:
        raise ValueError("contains a private key; send only the certificate")
    if text.count("-----BEGIN CERTIFICATE-----") != 1:
        raise ValueError("must hold exactly one PEM certificate ('-----BEGIN CERTIFICATE-----')")
    match = _PEM_RE.match(text + "\n")
    if not match:
        raise ValueError("is not a PEM certificate")
    try:
        base64.b64decode("".join(match.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("has a PEM body that is not valid base64") from None
    return text + "\n"


def check_project(name: str) -> str:
    """Return an LXD project name; ValueError when LXD would refuse it."""
    if not isinstance(name, str) or not _PROJECT_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid LXD project name (a-z, 0-9, '-'; 1-63)")
    return name


def _wire(key: str, name: str) -> Any:
    """A field stored under a hyphenated databag key, settable by its Python name too."""
    return Field(default=None, validation_alias=AliasChoices(key, name), serialization_alias=key)


class RequirerUnitData(BaseModel):
    """What a manager unit asks for."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True, defer_build=True)

    ssh_public_key: str | None = _wire("ssh-public-key", "ssh_public_key")
    certificate: str | None = None
    projects: list[str] | None = None

    @field_validator("ssh_public_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        return None if value is None else check_ssh_public_key(value)

    @field_validator("certificate")
    @classmethod
    def _cert(cls, value: str | None) -> str | None:
        return None if value is None else check_certificate(value)

    @field_validator("projects")
    @classmethod
    def _projects(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if len(value) > 32:
            raise ValueError("at most 32 projects")
        return sorted({check_project(p) for p in value})


class ProviderUnitData(BaseModel):
    """What a vm-host unit publishes."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True, defer_build=True)

    version: str = VERSION
    backend: Literal["libvirt", "lxd"] | None = None
    uri: str | None = None
    ssh_host_keys: list[str] | None = _wire("ssh-host-keys", "ssh_host_keys")
    url: str | None = None
    server_certificate: str | None = _wire("server-certificate", "server_certificate")
    project: str | None = None

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("qemu+ssh://"):
            raise ValueError("must be a qemu+ssh:// URI")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("https://"):
            raise ValueError("must be an https:// URL")
        return value


AccessInfo = ProviderUnitData
"""What the provider publishes; build it with field names or the databag keys."""


def _load(model: type[BaseModel], data: Mapping[str, str]) -> Any:
    """Decode JSON values of the known keys and validate; ValueError with a short reason."""
    fields = {f.serialization_alias or name for name, f in model.model_fields.items()}
    decoded: dict[str, Any] = {}
    for key in sorted(fields & set(data)):
        raw = data[key]
        if raw == "":
            continue
        if len(raw) > _MAX_VALUE_CHARS:
            raise ValueError(f"{key}: longer than {_MAX_VALUE_CHARS} characters")
        try:
            decoded[key] = json.loads(raw)
        except ValueError:
            raise ValueError(f"{key}: not JSON-encoded") from None
        except RecursionError:
            raise ValueError(f"{key}: nested too deeply") from None
    try:
        return model.model_validate(decoded)
    except RecursionError:
        raise ValueError("data: nested too deeply") from None
    except ValidationError as exc:
        reasons = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "data"
            reasons.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        text = "; ".join(reasons)
        raise ValueError(text if len(text) <= 1024 else text[:1021] + "...") from None


def _dump(obj: BaseModel) -> dict[str, str]:
    """Encode set fields as JSON; unset ones become "" (which Juju deletes)."""
    values = obj.model_dump(mode="json", by_alias=True)
    return {k: ("" if v is None else json.dumps(v)) for k, v in sorted(values.items())}


# ---------------------------------------------------------------------------------------------
# Provider


@dataclass(frozen=True)
class AccessClient:
    """One remote unit's valid access request."""

    relation_id: int
    unit: str
    app: str
    ssh_public_key: str | None
    """"<type> <base64>", comment dropped."""
    certificate: str | None
    projects: tuple[str, ...] | None

    @property
    def source(self) -> str:
        """A tag naming this request exactly: "relation:<id>:<unit>"."""
        return f"relation:{self.relation_id}:{self.unit}"


@dataclass(frozen=True)
class InvalidClient:
    """A remote unit whose data was refused, and why."""

    relation_id: int
    unit: str
    reason: str


class ClientsChangedEvent(ops.EventBase):
    """A manager's request appeared, changed or went away."""


class ProviderEvents(ops.ObjectEvents):
    """Events of `VmHostAccessProvider`."""

    clients_changed = ops.EventSource(ClientsChangedEvent)


class VmHostAccessProvider(ops.Object):
    """vm-host's side: read managers' keys and certificates, publish how to connect."""

    on = ProviderEvents()  # pyright: ignore[reportAssignmentType]

    def __init__(self, charm: ops.CharmBase, relation_name: str = "access"):
        super().__init__(charm, relation_name)
        self.charm = charm
        self.relation_name = relation_name
        events = charm.on[relation_name]
        for event in (events.relation_changed, events.relation_departed, events.relation_broken):
            self.framework.observe(event, self._on_changed)

    def _on_changed(self, _event: ops.RelationEvent) -> None:
        self.on.clients_changed.emit()

    @property
    def relations(self) -> list[ops.Relation]:
        """The live relations of the endpoint (a relation being broken is not among them)."""
        return [r for r in self.charm.model.relations.get(self.relation_name, []) if r.active]

    def _read(self) -> tuple[list[AccessClient], list[InvalidClient]]:
        valid: list[AccessClient] = []
        invalid: list[InvalidClient] = []
        for relation in self.relations:
            for unit in sorted(relation.units, key=lambda u: u.name):
                try:
                    data = _load(RequirerUnitData, relation.data[unit])
                except ValueError as exc:
                    invalid.append(InvalidClient(relation.id, unit.name, str(exc)))
                    continue
                except ops.ModelError as exc:  # data not readable in this hook
                    logger.debug("cannot read %s on relation %d: %s", unit.name, relation.id, exc)
                    continue
                if data.ssh_public_key is None and data.certificate is None:
                    continue
                valid.append(
                    AccessClient(
                        relation_id=relation.id,
                        unit=unit.name,
                        app=unit.app.name,
                        ssh_public_key=data.ssh_public_key,
                        certificate=data.certificate,
                        projects=tuple(data.projects) if data.projects is not None else None,
                    )
                )
        for bad in invalid:
            logger.warning(
                "ignoring vm_host_access request of %s (relation %d): %s",
                bad.unit,
                bad.relation_id,
                bad.reason,
            )
        return valid, invalid

    @property
    def clients(self) -> list[AccessClient]:
        """Valid requests, one per remote unit that sent a key or certificate, stable order."""
        return self._read()[0]

    @property
    def invalid_clients(self) -> list[InvalidClient]:
        """Remote units whose data was refused, with the reason (never raised)."""
        return self._read()[1]

    def publish(self, relation: ops.Relation, info: ProviderUnitData) -> None:
        """Write this unit's access details on one relation."""
        relation.data[self.charm.unit].update(_dump(info))

    def sync(self, info: ProviderUnitData) -> None:
        """Publish `info` on every live relation of the endpoint."""
        for relation in self.relations:
            self.publish(relation, info)


# ---------------------------------------------------------------------------------------------
# Requirer


@dataclass(frozen=True)
class HostAccess:
    """How to reach one vm-host unit's hypervisor."""

    relation_id: int
    unit: str
    backend: str | None
    uri: str | None = None
    ssh_host_keys: tuple[str, ...] = ()
    url: str | None = None
    server_certificate: str | None = None
    project: str | None = None


class AccessChangedEvent(ops.EventBase):
    """A vm-host published, changed or withdrew access details."""


class RequirerEvents(ops.ObjectEvents):
    """Events of `VmHostAccessRequirer`."""

    access_changed = ops.EventSource(AccessChangedEvent)


class VmHostAccessRequirer(ops.Object):
    """A manager's side: send a key or certificate, read how to reach each host."""

    on = RequirerEvents()  # pyright: ignore[reportAssignmentType]

    def __init__(self, charm: ops.CharmBase, relation_name: str = "vm-host-access"):
        super().__init__(charm, relation_name)
        self.charm = charm
        self.relation_name = relation_name
        events = charm.on[relation_name]
        for event in (events.relation_changed, events.relation_departed, events.relation_broken):
            self.framework.observe(event, self._on_changed)

    def _on_changed(self, _event: ops.RelationEvent) -> None:
        self.on.access_changed.emit()

    @property
    def relations(self) -> list[ops.Relation]:
        """The live relations of the endpoint."""
        return [r for r in self.charm.model.relations.get(self.relation_name, []) if r.active]

    def _update(self, values: Mapping[str, str]) -> None:
        for relation in self.relations:
            relation.data[self.charm.unit].update(values)

    def set_ssh_public_key(self, key: str | None) -> None:
        """Ask libvirt hosts to authorize this public key (None withdraws it).

        Raises:
            ValueError: the key is not one valid OpenSSH public key line.
        """
        value = "" if key is None else json.dumps(check_ssh_public_key(key))
        self._update({"ssh-public-key": value})

    def set_certificate(self, pem: str | None, projects: Sequence[str] | None = None) -> None:
        """Ask LXD hosts to trust this client certificate for `projects` (None withdraws it).

        Raises:
            ValueError: the certificate is not one PEM certificate, or a project name is bad.
        """
        if pem is None:
            self._update({"certificate": "", "projects": ""})
            return
        cert = check_certificate(pem)
        names = sorted({check_project(p) for p in projects or ()})
        self._update(
            {"certificate": json.dumps(cert), "projects": json.dumps(names) if names else ""}
        )

    @property
    def access(self) -> list[HostAccess]:
        """What each vm-host unit published; units with bad data are logged and skipped."""
        found: list[HostAccess] = []
        for relation in self.relations:
            for unit in sorted(relation.units, key=lambda u: u.name):
                try:
                    data = _load(ProviderUnitData, relation.data[unit])
                except ValueError as exc:
                    logger.warning("ignoring vm_host_access data of %s: %s", unit.name, exc)
                    continue
                except ops.ModelError:
                    continue
                if data.backend is None:
                    continue
                found.append(
                    HostAccess(
                        relation_id=relation.id,
                        unit=unit.name,
                        backend=data.backend,
                        uri=data.uri,
                        ssh_host_keys=tuple(data.ssh_host_keys or ()),
                        url=data.url,
                        server_certificate=data.server_certificate,
                        project=data.project,
                    )
                )
        return found


# ---------------------------------------------------------------------------------------------
# Testing helpers


def requirer_databag(
    ssh_public_key: str | None = None,
    certificate: str | None = None,
    projects: Iterable[str] | None = None,
) -> dict[str, str]:
    """Return a manager unit's databag as Juju would hold it (values JSON-encoded)."""
    data: dict[str, str] = {}
    if ssh_public_key is not None:
        data["ssh-public-key"] = json.dumps(ssh_public_key)
    if certificate is not None:
        data["certificate"] = json.dumps(certificate)
    if projects is not None:
        data["projects"] = json.dumps(list(projects))
    return data


def provider_databag(info: BaseModel) -> dict[str, str]:
    """Return a unit's databag as Juju would hold it (unset fields left out).

    Works for either side's model (`ProviderUnitData` or `RequirerUnitData`).
    """
    return {k: v for k, v in _dump(info).items() if v}


def requirer_relation(
    clients: Mapping[int, RequirerUnitData | Mapping[str, str]] | None = None,
    *,
    endpoint: str = "access",
    remote_app_name: str = "manager",
    relation_id: int | None = None,
) -> testing.Relation:
    """Build a relation to manager units, for testing a vm-host (provider) charm.

    Args:
        clients: remote unit number -> its data: a `RequirerUnitData`, or a raw databag (see
            `requirer_databag`; raw databags are written as given, so tests can send bad data).
            Default: one unit (0) that sent nothing yet.
        endpoint: vm-host's endpoint name.
        remote_app_name: the manager application.
        relation_id: a fixed relation id (default: a fresh one).
    """
    from ops import testing

    units = {0: {}} if clients is None else clients
    units_data = {
        unit: provider_databag(data) if isinstance(data, BaseModel) else dict(data)
        for unit, data in units.items()
    }
    kwargs: dict[str, Any] = {} if relation_id is None else {"id": relation_id}
    return testing.Relation(
        endpoint,
        interface=INTERFACE,
        remote_app_name=remote_app_name,
        remote_units_data=units_data,
        **kwargs,
    )


def provider_relation(
    hosts: Mapping[int, ProviderUnitData] | None = None,
    *,
    endpoint: str = "vm-host-access",
    remote_app_name: str = "vm-host",
    relation_id: int | None = None,
    local_unit_data: Mapping[str, str] | None = None,
) -> testing.Relation:
    """Build a relation to vm-host units, for testing a manager (requirer) charm.

    Args:
        hosts: remote unit number -> what that unit publishes. Default: one unit (0) that
            published nothing yet.
        endpoint: the manager charm's endpoint name.
        remote_app_name: the vm-host application.
        relation_id: a fixed relation id (default: a fresh one).
        local_unit_data: the manager unit's own databag.
    """
    from ops import testing

    units = {0: ProviderUnitData()} if hosts is None else hosts
    units_data = {unit: provider_databag(info) for unit, info in units.items()}
    kwargs: dict[str, Any] = {} if relation_id is None else {"id": relation_id}
    if local_unit_data is not None:
        kwargs["local_unit_data"] = dict(local_unit_data)
    return testing.Relation(
        endpoint,
        interface=INTERFACE,
        remote_app_name=remote_app_name,
        remote_units_data=units_data,
        **kwargs,
    )


def published_from(relation: testing.RelationBase) -> ProviderUnitData:
    """Read what a vm-host charm published (its unit databag in an output state)."""
    return _load(ProviderUnitData, relation.local_unit_data)


def requested_from(relation: testing.RelationBase) -> RequirerUnitData:
    """Read what a manager charm asked for (its unit databag in an output state)."""
    return _load(RequirerUnitData, relation.local_unit_data)

"""Request virtual machines from a vm-host charm over the `vm_host` interface.

A charm that needs VMs (a database cluster, a load generator, a MAAS region that used to compose
"pods") asks the vm-host charm for them through a relation. Each request names a VM by an `id`
and says what it needs: cores (optionally pinned to host CPUs), memory, NUMA span, huge pages,
disks and network interfaces. Every vm-host unit answers, in its own unit databag, for the VMs
it hosts: state, MAC addresses, placement and power parameters.

## Getting started (requirer)

Fetch the library into your charm:

    charmcraft fetch-lib charms.vm_host.v0.vm_host

Add the endpoint to `metadata.yaml`:

    requires:
      vm-host:
        interface: vm_host
        limit: 1

and `pydantic>=2` to your charm's dependencies (PYDEPS declares it for charmcraft).

Then, in `src/charm.py`:

    from charms.vm_host.v0.vm_host import VmHostRequirer, VmRequest

    class MyCharm(ops.CharmBase):
        def __init__(self, framework: ops.Framework):
            super().__init__(framework)
            self.vm_host = VmHostRequirer(self, relation_name="vm-host")
            framework.observe(self.on.leader_elected, self._request)
            framework.observe(self.on["vm-host"].relation_created, self._request)
            framework.observe(self.vm_host.on.vm_ready, self._on_vm_ready)
            framework.observe(self.vm_host.on.vm_failed, self._on_vm_failed)
            framework.observe(self.vm_host.on.vm_removed, self._on_vm_removed)

        def _request(self, _: ops.EventBase):
            if not self.unit.is_leader():
                return
            self.vm_host.request_vms([
                {"id": "db-0", "cores": 4, "memory": 8192, "pinned-cores": 4,
                 "hugepages": "1G", "storage": "root:40(ssd),data:200",
                 "interfaces": "eth0:space=oam;data:vid=100"},
                VmRequest(id="web-0", cores=2, memory=2048),
            ])

        def _on_vm_ready(self, event):
            vm = event.vm  # a HostedVm: the answer plus the vm-host unit that hosts it
            logger.info("%s is running on %s, MACs %s", vm.id, vm.unit,
                        [nic.mac for nic in vm.interfaces])

        def _on_vm_failed(self, event):
            logger.warning("%s failed: %s", event.vm.id, event.vm.error)

        def _on_vm_removed(self, event):
            logger.info("%s is gone", event.vm_id)

`request_vms` replaces the whole set of requests on every relation of the endpoint: requesting
a smaller set releases the VMs that are no longer listed (`withdraw(id)` drops one). Only the
leader may call them (others get `NotLeaderError`). Calling them again with the same set changes
nothing, so call them from a reconcile method on every event if you like. A relation created
later gets the requests only when you call `request_vms` again (hence `relation_created` above).

Read the answers at any time with `self.vm_host.vms` (a list of `HostedVm`, sorted by id then
unit), or `self.vm_host.vm("db-0")` for the best answer for one id (running wins over stopped,
pending and failed, in that order, when a VM moves between hosts).

## Requests

`request_vms` takes `VmRequest`s or mappings with the wire names shown here (`VmRequest(...)`
takes the Python names: `pinned_cores`, `numa_nodes`, `user_data`, `ssh_public_keys`, and
typed lists for storage and interfaces; a mapping also takes the MAAS strings). A request in
the structured form:

    {"id": "db-0", "cores": 4, "memory": 8192, "pinned-cores": 4, "numa-nodes": 1,
     "hugepages": "1G",
     "storage": [{"label": "root", "size-gb": 40, "pool": "ssd"},
                 {"label": "data", "size-gb": 200}],
     "interfaces": [{"label": "eth0", "space": "oam"},
                    {"label": "data", "vlan": 100, "mode": "sriov"},
                    {"label": "pub", "ip": "10.0.5.20", "subnet": "10.0.5.0/24"}],
     "image": "ubuntu@24.04", "user-data": "#cloud-config ...",
     "ssh-public-keys": ["ssh-ed25519 AAAA... me@example"], "hostname": "db-0.example.com",
     "tags": ["db"], "pool": "db", "host": "vm-host/1"}

The same request with MAAS compose strings:

    {"id": "db-0", "cores": 4, "memory": 8192, "pinned-cores": 4, "hugepages": "1G",
     "storage": "root:40(ssd),data:200",
     "interfaces": "eth0:space=oam;data:vid=100,mode=sriov;pub:ip=10.0.5.20"}

- `id` (required): `[a-z0-9-]{1,40}`, unique among this application's requests.
- `cores`: vCPUs. `memory`: MiB.
- `pinned-cores`: a count (the host chooses the CPUs) or a list of host CPU ids; either must
  match `cores` when both are given: a VM is pinned whole or not at all.
- `numa-nodes`: how many host NUMA nodes the VM may span (the host defaults to 1 when pinned).
- `hugepages`: "2M", "1G", "any" or null (no huge pages).
- `storage`: disks, the first is the root disk; `size-gb` in GB (10^9 bytes); `pool` names a
  host storage pool. MAAS string: `label:size(pool),...` with whole GB; a missing label
  becomes `root` for the first disk, `diskN` after (in both forms).
- `interfaces`: NICs; each may name a Juju `space`, a `subnet` (CIDR), a `vlan` (0-4094), an
  `ip` (a static address the VM gets; one VM's per host) and a `mode` (bridge, macvtap or
  sriov), and `numa-strict` (SR-IOV: only on the NIC's NUMA node). A NIC attaches only where
  the vm-host operator lets related applications go: a space of its `networks` option (or
  its default network); a host `bridge` or `parent` named by the request, or a subnet or
  address found on another host interface, is answered failed unless the operator listed
  that interface in `allowed-host-interfaces`. MAAS string: `label:key=value[,key=value];...`
  with the keys space, subnet, subnet_cidr, vlan (`N` or `vid:N`), vid, ip, mode, bridge,
  parent and numa_strict (in any case); `label:` alone asks for a NIC on the host's default
  network (LIBPATCH 8; earlier patches refuse it). Other MAAS keys (fabric, fabric_class,
  type, tag, not_*) are not supported: such a request is answered failed with the reason.
- `image`: an image name, never a path: `ubuntu@24.04` (the Juju base syntax; `24.04` and
  `noble` too) or `local:NAME` (a file the vm-host operator put in its local-image-dir); none:
  network boot. `host`: pin the VM to a vm-host unit such as "vm-host/1" or a hostname.
- `tags`: labels for the VM (at most 64, each `[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}`): recorded
  with it, echoed in its answer (LIBPATCH 6) and filtered on by the operator's list-vms.
  They do not change the VM: a changed set applies to VMs composed later.
- `pool` (LIBPATCH 7): the vm-host operator's resource pool the VM counts in
  (`[a-z0-9][a-z0-9-]*`, at most 40 characters); none: the host's default pool (or the
  first pool the operator's `app-pools` gives your application). A pool that does not exist,
  one your application may not use, or one whose quota the VM would exceed is answered
  failed with the reason and the numbers. Recorded with the VM and echoed in its answer; like
  `tags` it does not change the VM. Providers older than LIBPATCH 7 ignore it (every VM is
  then in their one pool); requirers older than it never send it.
- `hostname`: the guest's hostname or FQDN (default: the VM's name); `ssh-public-keys`:
  OpenSSH public key lines authorized for the image's default user (ubuntu on Ubuntu).
  vm-host writes both into its own #cloud-config.
- `user-data` (at most 64 KiB): anything cloud-init acts on (#cloud-config, a #! script,
  #include, #cloud-boothook, #cloud-config-archive, or MIME multipart of such parts). It is
  never dropped: vm-host sends it to the guest as MIME multipart, your parts first and its
  own #cloud-config last, merged by cloud-init so that your values win and lists such as
  ssh_authorized_keys are appended. User data cloud-init would ignore (no known first line)
  is answered failed with the reason.

This library checks the syntax; the vm-host charm checks the rest against the host (does the
pool exist, does the memory split into whole huge pages) and answers failed with the reason.

Each request is validated on its own: a bad request is answered `failed` with the reason and
never affects the others.

## Answers

Each vm-host unit publishes, per VM it hosts:

    {"id": "db-0", "name": "vmhost-consumer-db-0", "state": "running", "uuid": "...",
     "interfaces": [{"label": "eth0", "mac": "52:54:00:12:34:56", "attached-to": "br-oam",
                     "ip": "10.0.0.17", "addresses": ["10.0.0.17"]}],
     "placement": {"numa-nodes": [0], "cpus": [2, 3, 14, 15], "hugepages": "1G"},
     "tags": ["db"], "pool": "db",
     "power": {"type": "virsh", "address": "qemu+ssh://virsh@10.0.0.5/system",
               "id": "vmhost-consumer-db-0"}}

`state` is one of pending, running, stopped, failed; `error` says why when failed.
Each NIC's `addresses` lists what the guest has on it: a static `ip` of the request at once, a
DHCP address as soon as the hypervisor knows it (lease, ARP or guest agent; every provider hook
refreshes it, update-status included, so a `vm_ready` may come before the address does: read
`self.vm_host.vm(id)` again on later events). `ip` is the static address, else the first
address learnt.

## Events (requirer)

- `vm_ready` (`event.vm`: HostedVm): a VM reached state running.
- `vm_failed` (`event.vm`: HostedVm): a VM (or its request) reached state failed.
- `vm_removed` (`event.vm_id`: str): a VM the provider published before is no longer published
  (withdrawn, released, its host left, or the relation is gone).

They are edge-triggered, on every unit of the requirer: the library compares what the vm-host
units publish now with what this unit last saw. That snapshot is kept in this unit's own
databag of the relation under the key `seen-vms` (a JSON object of id -> state), not in
StoredState: it lives exactly as long as the relation, survives the loss of the unit's local
state, and needs no extra hook. The provider ignores that key. Do not defer these events.

## Provider (the vm-host charm)

    metadata.yaml:
      provides:
        vms:
          interface: vm_host

    self.vms = VmHostProvider(self, relation_name="vms")
    for batch in self.vms.requests:        # one RelationRequests per related application
        batch.valid                        # list[VmRequest], normalised (MAAS strings parsed)
        batch.invalid                      # list[InvalidRequest]: answer these "failed"
    self.vms.publish(batch.relation, [VmAnswer(id="db-0", state="pending"), ...])

`read_request(mapping)` (LIBPATCH 8) validates one request as the provider does, raising
ValueError with the reason; vm-host reads its compose-vm action with it, so a request means the
same whichever way it arrives.

A holistic charm needs no event from this library: read `requests` (or `sync()`) in its
reconcile and `publish` the answers. `requests_changed` is emitted for charms that prefer events
(relation joined, changed, departed and broken on the requirer side; during relation-broken the
broken relation is no longer listed in `requests`). Remote data never raises: bad data is
logged (never its values) and reported in `invalid`. The library never sets status.

## Testing your charm with ops.testing

`provider_relation(answers_by_unit={0: [VmAnswer(...)]})` builds a ready `testing.Relation` for
a requirer charm; `requirer_relation(requests=[...])` one for a provider charm.
`requests_from(relation)` and `answers_from(relation)` read back what the charm wrote.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import ops
import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

if TYPE_CHECKING:
    from ops import testing

# The unique Charmhub library identifier, never change it
LIBID = "98db5c0f288b4a859cbb73fdd0cdb13c"

# Increment this major API version when introducing breaking changes
LIBAPI = 0

# Increment this PATCH version before using `charmcraft publish-lib` or reset
# to 0 if you are raising the major API version
LIBPATCH = 8

PYDEPS = ["pydantic>=2"]

logger = logging.getLogger(__name__)

VERSION = "0"
"""The wire schema version this library writes and understands."""

SEEN_KEY = "seen-vms"
"""Requirer unit databag key holding the id -> state snapshot behind the requirer events."""

_ID_RE = r"^[a-z0-9-]{1,40}$"
_ID_FULL = re.compile(r"[a-z0-9-]{1,40}")
_MAX_VALUE_CHARS = 4 << 20
"""The longest databag value decoded (4 MiB): a remote app cannot make a hook parse more."""
MAX_REQUESTS = 1024
"""The most VM requests one relation may make; those beyond are answered failed."""
_MAX_ECHO = 40
"""The most characters of a remote value quoted back in a reason or a log line."""
_MAX_REASON = 1024
_LABEL_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$")
_NAME_RE = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$"
_POOL_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_RESOURCE_POOL_RE = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
_SPACE_RE = r"^[a-z0-9]+(?:-[a-z0-9]+)*$"
_DEVICE_RE = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,14}$"
_MAX_DISK_GB = 65536
MAX_CORES = 1024
"""The most vCPUs (and pinned host CPUs) one VM may have."""
MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1 << 24
"""Memory bounds of one VM in MiB (16 TiB at most)."""
MAX_NUMA_NODES = 64
MAX_SSH_KEYS = 100
MAX_DISKS = 64
MAX_INTERFACES = 32
MAX_TAGS = 64
_HOST_RE = r"^[a-zA-Z0-9][a-zA-Z0-9_./-]{0,252}$"
_SSH_KEY_RE = r"^[a-z0-9@.-]+ [A-Za-z0-9+/]+={0,3}( [^\r\n]*)?$"
_HOSTNAME_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_HOSTNAME_RE = rf"^{_HOSTNAME_LABEL}(?:\.{_HOSTNAME_LABEL})*\.?$"
_STATE_ORDER = {"running": 0, "stopped": 1, "pending": 2, "failed": 3}


class NotLeaderError(RuntimeError):
    """A non-leader unit tried to change its application's VM requests.

    Only the leader may write the application databag; guard the call with
    `self.unit.is_leader()`.
    """


def _clip(value: object) -> str:
    """Quote a remote value for a reason or log line: repr, at most _MAX_ECHO characters."""
    text = repr(value)
    return text if len(text) <= _MAX_ECHO else text[: _MAX_ECHO - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Wire models


class _Model(BaseModel):
    """Wire model base: unknown fields are ignored so newer peers can add fields safely."""

    # defer_build: a model's validator is built on its first use, not at import, so a hook
    # that never reads or writes the relation pays nothing for it.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True, defer_build=True)


class StorageRequest(_Model):
    """One disk of a VM request."""

    label: Annotated[StrictStr, Field(pattern=_LABEL_RE.pattern)]
    size_gb: Annotated[
        StrictInt,
        Field(validation_alias="size-gb", serialization_alias="size-gb", ge=1, le=_MAX_DISK_GB),
    ]
    """Size in GB (10**9 bytes), as MAAS counted."""
    pool: Annotated[StrictStr, Field(pattern=_POOL_RE)] | None = None
    """Host storage pool; None means the host's default pool."""


class InterfaceRequest(_Model):
    """One network interface of a VM request, with the constraints that choose where it goes."""

    label: Annotated[StrictStr, Field(pattern=_LABEL_RE.pattern)]
    space: Annotated[StrictStr, Field(pattern=_SPACE_RE)] | None = None
    subnet: StrictStr | None = None
    """CIDR, such as 10.0.5.0/24."""
    vlan: Annotated[StrictInt, Field(ge=0, le=4094)] | None = None
    ip: StrictStr | None = None
    """A static address the VM gets (it implies the subnet and VLAN that carry it)."""
    mode: Literal["bridge", "macvtap", "sriov"] | None = None
    bridge: Annotated[StrictStr, Field(pattern=_DEVICE_RE)] | None = None
    """A named host bridge (vm-host extension)."""
    parent: Annotated[StrictStr, Field(pattern=_DEVICE_RE)] | None = None
    """A named host interface for macvtap or SR-IOV (vm-host extension)."""
    numa_strict: StrictBool | None = Field(
        default=None, validation_alias="numa-strict", serialization_alias="numa-strict"
    )
    """SR-IOV only: place the VM on the NIC's NUMA node, not merely prefer it."""

    @pydantic.field_validator("subnet")
    @classmethod
    def _check_subnet(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError:
            try:
                hint = f"; did you mean {ipaddress.ip_network(value, strict=False)}?"
            except ValueError:
                hint = ""
            raise ValueError("must be a subnet in CIDR form such as 10.0.5.0/24" + hint) from None
        if "/" not in value:
            raise ValueError("needs a prefix length, such as 10.0.5.0/24")
        return str(network)

    @pydantic.field_validator("ip")
    @classmethod
    def _check_ip(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError("must be an IPv4 or IPv6 address such as 10.0.5.20") from None

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> InterfaceRequest:
        if self.bridge and self.parent:
            raise ValueError("give bridge (a bridged NIC) or parent (macvtap/SR-IOV), not both")
        if self.bridge and self.mode not in (None, "bridge"):
            raise ValueError("bridge attaches with mode bridge; drop mode or use parent")
        if self.parent and self.mode == "bridge":
            raise ValueError("parent is for mode macvtap or sriov; use bridge for a bridged NIC")
        if self.numa_strict and self.mode != "sriov":
            raise ValueError("numa-strict applies only to mode sriov")
        if (
            self.ip is not None
            and self.subnet is not None
            and ipaddress.ip_address(self.ip) not in ipaddress.ip_network(self.subnet)
        ):
            raise ValueError(f"ip is not inside subnet {self.subnet}")
        return self


def parse_maas_storage(value: str) -> list[StorageRequest]:
    """Parse a MAAS storage constraint such as "root:20(ssd),data:100".

    Sizes are whole GB (as the compose-vm action takes them). MAAS tags name storage pools
    here, and a disk lives in one pool, so more than one tag is refused. A missing label
    becomes "root" for the first disk and "diskN" after it.

    Raises:
        ValueError: the string is malformed; the message names the bad entry.
    """
    if not value.strip():
        return []
    return [
        _parse_storage_entry(i, entry.strip()) for i, entry in enumerate(_split_storage(value))
    ]


def _parse_storage_entry(index: int, entry: str) -> StorageRequest:
    match = _STORAGE_ENTRY_RE.match(entry)
    if match is None:
        raise ValueError(f"storage entry {_clip(entry)} is not 'label:size(pool)'")
    label = None if match["label"] is None else match["label"].strip()
    if label is None:
        label = "root" if index == 0 else f"disk{index}"
    if not _LABEL_RE.match(label):
        raise ValueError(f"storage label {_clip(label)} must match [a-zA-Z0-9][a-zA-Z0-9_-]*")
    size_text = match["size"].strip()
    if not re.fullmatch(r"[0-9]{1,12}", size_text):
        raise ValueError(f"storage size of {label!r} must be a whole number of GB such as 20")
    size = int(size_text)
    pool = None
    if match["tags"] is not None:
        tags = [t.strip() for t in match["tags"].split(",")]
        if len(tags) != 1 or not tags[0]:
            raise ValueError(f"storage {label!r} must name exactly one pool, as in root:20(ssd)")
        pool = tags[0]
    try:
        return StorageRequest.model_validate({"label": label, "size-gb": size, "pool": pool})
    except pydantic.ValidationError as err:
        raise ValueError(f"storage {label!r}: {_describe(err)}") from None


_STORAGE_ENTRY_RE = re.compile(
    r"^(?:(?P<label>[^:(),]*):)?(?P<size>[^:(),]*)(?:\((?P<tags>[^()]*)\))?$"
)


def _split_storage(value: str) -> list[str]:
    """Split a storage string on the commas that are not inside a pool list."""
    entries: list[str] = []
    depth = 0
    current = ""
    for char in value:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError("storage has an unbalanced ')'")
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError("storage has an unbalanced '('")
    entries.append(current)
    return entries


_MAAS_INTERFACE_KEYS = {
    "space": "space",
    "subnet": "subnet",
    "subnet_cidr": "subnet",
    "vlan": "vlan",
    "vid": "vlan",
    "ip": "ip",
    "mode": "mode",
    "bridge": "bridge",
    "parent": "parent",
    "numa_strict": "numa-strict",
}
_MAAS_ONLY_KEYS = ("fabric", "fabric_class", "type", "tag", "tags")
"""MAAS interface keys vm-host does not take (with every not_* key)."""
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


def parse_maas_interfaces(value: str) -> list[InterfaceRequest]:
    """Parse a MAAS interfaces constraint such as "eth0:space=oam;data:vid=100".

    Raises:
        ValueError: the string is malformed or uses a MAAS key vm-host does not support; the
            message names the label and key.
    """
    if not value.strip():
        return []
    return [_parse_interface_entry(entry.strip()) for entry in value.split(";")]


def _parse_interface_entry(entry: str) -> InterfaceRequest:
    label, sep, rest = entry.partition(":")
    label = label.strip()
    if not sep:
        raise ValueError(f"interface entry {_clip(entry)} is not 'label:key=value[,key=value]'")
    if not _LABEL_RE.match(label):
        raise ValueError(f"interface label {_clip(label)} must match [a-zA-Z0-9][a-zA-Z0-9_-]*")
    fields: dict[str, Any] = {"label": label}
    for pair in rest.split(",") if rest.strip() else []:
        key, eq, val = (part.strip() for part in pair.partition("="))
        key = key.lower()
        if not eq or not key or not val:
            raise ValueError(f"interface {label!r}: {_clip(pair)} is not key=value")
        if key not in _MAAS_INTERFACE_KEYS:
            supported = ", ".join(sorted(_MAAS_INTERFACE_KEYS))
            maas = key in _MAAS_ONLY_KEYS or key.startswith("not_")
            raise ValueError(
                f"interface {label!r}: {'the MAAS key' if maas else 'key'} {_clip(key)} is not "
                f"supported by vm-host (supported: {supported})"
            )
        name = _MAAS_INTERFACE_KEYS[key]
        if name in fields:
            raise ValueError(f"interface {label!r}: {name} is given more than once")
        fields[name] = _maas_value(label, key, val)
    try:
        return InterfaceRequest.model_validate(fields)
    except pydantic.ValidationError as err:
        raise ValueError(f"interface {label!r}: {_describe(err)}") from None


def _maas_value(label: str, key: str, value: str) -> str | int | bool:
    """Type one MAAS value: VLANs are ids ("N" or "vid:N"), numa_strict is a boolean."""
    name = _MAAS_INTERFACE_KEYS[key]
    if name == "mode":
        return value.lower()
    if name == "vlan":
        vid = value.removeprefix("vid:")
        if not re.fullmatch(r"[0-9]{1,4}", vid):
            raise ValueError(f"interface {label!r}: {key} must be a VLAN id (0-4094) or vid:N")
        return int(vid)
    if name == "numa-strict":
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(f"interface {label!r}: numa_strict must be true or false")
        return value.lower() in _TRUE
    return value


def _unique_labels(items: Sequence[StorageRequest | InterfaceRequest], what: str) -> None:
    counts = Counter(item.label for item in items)
    duplicates = sorted(label for label, n in counts.items() if n > 1)
    if duplicates:
        raise ValueError(f"{what} labels must be unique; repeated: {', '.join(duplicates)}")


class VmRequest(_Model):
    """One VM a requirer asks for; see the module docstring for every field."""

    id: Annotated[StrictStr, Field(pattern=_ID_RE)]
    cores: Annotated[StrictInt, Field(ge=1, le=MAX_CORES)] | None = None
    memory: Annotated[StrictInt, Field(ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)] | None = None
    """Memory in MiB."""
    pinned_cores: (
        Annotated[StrictInt, Field(ge=1, le=MAX_CORES)]
        | Annotated[
            list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1, max_length=MAX_CORES)
        ]
        | None
    ) = Field(default=None, validation_alias="pinned-cores", serialization_alias="pinned-cores")
    numa_nodes: Annotated[StrictInt, Field(ge=1, le=MAX_NUMA_NODES)] | None = Field(
        default=None, validation_alias="numa-nodes", serialization_alias="numa-nodes"
    )
    hugepages: Literal["2M", "1G", "any"] | None = None
    storage: Annotated[list[StorageRequest], Field(max_length=MAX_DISKS)] | None = None
    interfaces: Annotated[list[InterfaceRequest], Field(max_length=MAX_INTERFACES)] | None = None
    image: Annotated[StrictStr, Field(pattern=r"^\S{1,1024}$")] | None = None
    user_data: StrictStr | None = Field(
        default=None, validation_alias="user-data", serialization_alias="user-data"
    )
    """cloud-init user data, at most 64 KiB of UTF-8."""
    ssh_public_keys: Annotated[
        list[Annotated[StrictStr, Field(pattern=_SSH_KEY_RE, max_length=16384)]],
        Field(max_length=MAX_SSH_KEYS),
    ] = Field(
        default_factory=list,
        validation_alias="ssh-public-keys",
        serialization_alias="ssh-public-keys",
    )
    tags: Annotated[
        list[Annotated[StrictStr, Field(pattern=_NAME_RE)]], Field(max_length=MAX_TAGS)
    ] = Field(default_factory=list)
    host: Annotated[StrictStr, Field(pattern=_HOST_RE)] | None = None
    pool: Annotated[StrictStr, Field(pattern=_RESOURCE_POOL_RE)] | None = None
    """The vm-host resource pool the VM counts in (LIBPATCH 7); None: the default pool."""
    hostname: Annotated[StrictStr, Field(pattern=_HOSTNAME_RE, max_length=253)] | None = None
    """The guest's hostname or FQDN (LIBPATCH 3); without it, the VM's name."""

    @pydantic.field_validator("storage", mode="before")
    @classmethod
    def _storage_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_maas_storage(value) or None
        if isinstance(value, list):
            # Labels are optional in the structured form too, named as in the MAAS string.
            return [
                {**disk, "label": "root" if i == 0 else f"disk{i}"}
                if isinstance(disk, dict) and disk.get("label") is None
                else disk
                for i, disk in enumerate(value)  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
            ] or None
        return value or None

    @pydantic.field_validator("interfaces", mode="before")
    @classmethod
    def _interfaces_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_maas_interfaces(value) or None
        return value or None

    @pydantic.field_validator("user_data")
    @classmethod
    def _user_data_size(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode("utf-8", errors="surrogatepass")) > 65536:
            raise ValueError("must be at most 64 KiB; move large content to a URL")
        return value

    @pydantic.field_validator("ssh_public_keys", "tags", mode="before")
    @classmethod
    def _null_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> VmRequest:
        if isinstance(self.pinned_cores, list):
            if len(set(self.pinned_cores)) != len(self.pinned_cores):
                raise ValueError("pinned-cores lists a host CPU more than once")
            count = len(self.pinned_cores)
        else:
            count = self.pinned_cores
        if count is not None and self.cores is not None and count != self.cores:
            raise ValueError(
                f"pinned-cores pins {count} CPUs but cores is {self.cores}; "
                "a VM is pinned whole, so make them equal or omit cores"
            )
        return self

    @pydantic.field_validator("storage", "interfaces")
    @classmethod
    def _unique(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        _unique_labels(value or [], "disk" if info.field_name == "storage" else "interface")
        return value

    @property
    def pinned_count(self) -> int:
        """How many vCPUs are pinned (0 when the VM floats over shared CPUs)."""
        if isinstance(self.pinned_cores, list):
            return len(self.pinned_cores)
        return self.pinned_cores or 0


class RequirerAppData(_Model):
    """The requirer application databag: its whole set of VM requests."""

    version: Literal["0"] = VERSION
    requests: list[VmRequest] = Field(default_factory=list)

    @pydantic.field_validator("requests", mode="before")
    @classmethod
    def _null_requests(cls, value: Any) -> Any:
        return [] if value is None else value

    @pydantic.field_validator("requests", mode="after")
    @classmethod
    def _sorted_unique(cls, value: list[VmRequest]) -> list[VmRequest]:
        counts = Counter(r.id for r in value)
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        if duplicates:
            raise ValueError(f"request ids must be unique; repeated: {', '.join(duplicates)}")
        return sorted(value, key=lambda r: r.id)


class VmInterfaceInfo(_Model):
    """A NIC of a composed VM."""

    label: StrictStr
    mac: StrictStr | None = None
    attached_to: StrictStr | None = Field(
        default=None, validation_alias="attached-to", serialization_alias="attached-to"
    )
    """The host bridge, parent NIC or VF the NIC sits on."""
    ip: StrictStr | None = None
    """The static address the request gave, else the first address learnt (DHCP)."""
    addresses: list[StrictStr] = Field(default_factory=list)
    """Every address known on this NIC, static first, then learnt from the DHCP lease, ARP
    or the guest agent once the guest has one (LIBPATCH 5; absent from older providers)."""

    @pydantic.field_validator("addresses", mode="before")
    @classmethod
    def _null_addresses(cls, value: Any) -> Any:
        return [] if value is None else value


class VmPlacementInfo(_Model):
    """Where a VM landed on its host."""

    numa_nodes: list[StrictInt] = Field(
        default_factory=list, validation_alias="numa-nodes", serialization_alias="numa-nodes"
    )
    cpus: list[StrictInt] = Field(default_factory=list)
    """Pinned host CPUs; empty when the VM floats over shared CPUs."""
    hugepages: StrictStr | None = None


class VmPowerInfo(_Model):
    """How a manager reaches the VM's power control (MAAS power parameters)."""

    type: StrictStr | None = None
    address: StrictStr | None = None
    id: StrictStr | None = None


class VmAnswer(_Model):
    """A provider unit's answer for one request."""

    id: Annotated[StrictStr, Field(pattern=_ID_RE)]
    name: StrictStr | None = None
    state: Literal["pending", "running", "stopped", "failed"]
    error: StrictStr | None = None
    uuid: StrictStr | None = None
    interfaces: list[VmInterfaceInfo] = Field(default_factory=list)
    placement: VmPlacementInfo | None = None
    tags: list[StrictStr] = Field(default_factory=list)
    """The tags recorded with the VM (LIBPATCH 6; absent from older providers)."""
    pool: StrictStr | None = None
    """The resource pool recorded with the VM (LIBPATCH 7; absent from older providers)."""
    power: VmPowerInfo | None = None

    @pydantic.field_validator("interfaces", "tags", mode="before")
    @classmethod
    def _null_list(cls, value: Any) -> Any:
        return [] if value is None else value


class ProviderUnitData(_Model):
    """A provider unit databag: the answers for the VMs that unit hosts."""

    version: Literal["0"] = VERSION
    vms: list[VmAnswer] = Field(default_factory=list)

    @pydantic.field_validator("vms", mode="before")
    @classmethod
    def _null_vms(cls, value: Any) -> Any:
        return [] if value is None else value

    @pydantic.field_validator("vms", mode="after")
    @classmethod
    def _sorted_unique(cls, value: list[VmAnswer]) -> list[VmAnswer]:
        counts = Counter(a.id for a in value)
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        if duplicates:
            raise ValueError(f"answer ids must be unique; repeated: {', '.join(duplicates)}")
        return sorted(value, key=lambda a: a.id)


class HostedVm(VmAnswer):
    """An answer as the requirer sees it: with the vm-host unit and relation it came from."""

    unit: StrictStr
    relation_id: StrictInt


@dataclass(frozen=True)
class InvalidRequest:
    """A request the provider cannot act on, and why (safe to show the requirer)."""

    index: int | None
    """Position in the `requests` array; None when the whole databag is unusable."""
    id: str | None
    """The request's id when it had a usable one."""
    reason: str


@dataclass(frozen=True)
class RelationRequests:
    """Everything one related application asks for on one relation."""

    relation_id: int
    app_name: str
    valid: list[VmRequest] = field(default_factory=list[VmRequest])
    """Sorted by id, ids unique."""
    invalid: list[InvalidRequest] = field(default_factory=list[InvalidRequest])
    """Sorted by position."""
    relation: ops.Relation | None = field(default=None, compare=False, repr=False)

    @property
    def invalid_ids(self) -> set[str]:
        """Ids of invalid requests that had an id (their VMs should be kept, not deleted)."""
        return {bad.id for bad in self.invalid if bad.id is not None}


# ---------------------------------------------------------------------------------------------
# Reading and writing databags


_DEVICE_RULE = (
    "must be a host interface name: 1-15 letters, digits, '_', '.' or '-' (no '/' or ':'), "
    "such as br0 or enp1s0f0"
)
_PATTERN_RULES = {
    "space": "must be a Juju space name: lower-case letters, digits and single hyphens, "
    "such as oam or storage-1",
    "bridge": _DEVICE_RULE,
    "parent": _DEVICE_RULE,
    "label": "must be 1-63 letters, digits, '_' or '-', starting with a letter or digit",
    "id": "must be 1-40 lower-case letters, digits and hyphens, such as db-0",
    "pool": "must be lower-case letters, digits and hyphens, such as ssd",
    "host": "must be a vm-host unit such as vm-host/1 or a hostname",
    "hostname": "must be a hostname or FQDN such as web-0 or web-0.example.com",
    "image": "must be an image name without spaces, such as ubuntu@24.04",
    "tags": "must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
    "ssh-public-keys": "must be one OpenSSH public key line: type, base64 key, optional "
    "comment (no options), such as ssh-ed25519 AAAA... me@laptop",
}
"""What a pattern means, for the reason a refused request gets (pydantic would print it)."""


def _rule(item: Any) -> str:
    """One validation error as a rule: a pattern by its meaning, a bound by its number."""
    kind, ctx, loc = item["type"], item.get("ctx") or {}, item["loc"]
    if kind == "string_pattern_mismatch":
        named = [str(p) for p in loc if str(p) in _PATTERN_RULES]
        if named:
            return _PATTERN_RULES[named[-1]]
    if kind in ("greater_than_equal", "less_than_equal") and ctx:
        bound = ctx.get("ge", ctx.get("le"))
        return f"must be at {'least' if 'ge' in ctx else 'most'} {bound}"
    return item["msg"].removeprefix("Value error, ")


def _describe(err: pydantic.ValidationError) -> str:
    """Describe a validation error by field and problem only, never echoing the input."""
    parts: list[str] = []
    for item in err.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in item["loc"])
        msg = _rule(item)
        parts.append(f"{loc}: {msg}" if loc else msg)
    text = "; ".join(parts)
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}  # type: ignore[reportUnknownVariableType]
    if isinstance(value, list):
        return [_strip_none(v) for v in value]  # type: ignore[reportUnknownVariableType]
    return value


def _encode(value: Any) -> str:
    """Encode one databag value: compact, keys sorted, nulls left out (absent means null)."""
    return json.dumps(_strip_none(value), sort_keys=True, separators=(",", ":"))


def _encoded(obj: BaseModel) -> dict[str, str]:
    return {k: _encode(v) for k, v in obj.model_dump(mode="json", by_alias=True).items()}


def _save(relation: ops.Relation, obj: BaseModel, dst: ops.Unit | ops.Application) -> None:
    """Write a model into a databag through `Relation.save`, only when something changed."""
    bag = relation.data[dst]
    if any(bag.get(k) != v for k, v in _encoded(obj).items()):
        relation.save(obj, dst, encoder=_encode)


def _decode(raw: str, key: str) -> tuple[Any, str | None]:
    """Decode one remote JSON value; never raises (size capped, deep nesting refused)."""
    if len(raw) > _MAX_VALUE_CHARS:
        return None, f"{key} is longer than {_MAX_VALUE_CHARS} characters"
    try:
        return json.loads(raw), None
    except ValueError:
        return None, f"{key} is not JSON"
    except RecursionError:
        return None, f"{key} is nested too deeply"


def _check_version(databag: Mapping[str, str]) -> str | None:
    """Return why the databag's version is unusable, or None when it is fine."""
    raw = databag.get("version")
    if not raw:
        return None
    version, problem = _decode(raw, "version")
    if problem is not None:
        return problem
    if version != VERSION:
        return f"unsupported version; this library speaks {VERSION!r}"
    return None


def _load_array(databag: Mapping[str, str], key: str) -> tuple[list[Any], str | None]:
    raw = databag.get(key)
    if not raw:
        return [], None
    items, problem = _decode(raw, key)
    if problem is not None:
        return [], problem
    if items is None:
        return [], None
    if not isinstance(items, list):
        return [], f"{key} must be a JSON array"
    return items, None  # type: ignore[reportUnknownVariableType]


def read_request(item: Mapping[str, Any]) -> VmRequest:
    """Validate one request as the provider does (LIBPATCH 8).

    Raises:
        ValueError: why it is invalid, by field and rule, never echoing the value.
    """
    try:
        return VmRequest.model_validate(item)
    except pydantic.ValidationError as err:
        raise ValueError(_describe(err)) from None


def parse_requests(databag: Mapping[str, str]) -> tuple[list[VmRequest], list[InvalidRequest]]:
    """Validate a requirer application databag request by request.

    `Relation.load` would validate the databag as a whole, so one bad request would hide all
    the others; this reads the same JSON values but validates each request on its own.

    Returns:
        The valid requests sorted by id, and the invalid ones sorted by position. Requests that
        share an id are all invalid: the provider cannot tell which one is meant.
    """
    problem = _check_version(databag)
    items: list[Any] = []
    if problem is None:
        items, problem = _load_array(databag, "requests")
    if problem is not None:
        return [], [InvalidRequest(index=None, id=None, reason=problem)]
    valid: list[tuple[int, VmRequest]] = []
    invalid: list[InvalidRequest] = []
    for index, item in enumerate(items):
        raw_id = item.get("id") if isinstance(item, dict) else None  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        usable_id = raw_id if isinstance(raw_id, str) and _ID_FULL.fullmatch(raw_id) else None
        if index >= MAX_REQUESTS:
            reason = f"a relation may make at most {MAX_REQUESTS} requests; this is one more"
            invalid.append(InvalidRequest(index=index, id=usable_id, reason=reason))
            continue
        try:
            valid.append((index, VmRequest.model_validate(item)))
        except (pydantic.ValidationError, RecursionError) as err:
            reason = _describe(err) if isinstance(err, pydantic.ValidationError) else "too deep"
            invalid.append(InvalidRequest(index=index, id=usable_id, reason=reason))
    counts = Counter([request.id for _, request in valid] + [bad.id for bad in invalid if bad.id])
    repeated = {i for i, n in counts.items() if n > 1}
    for index, request in valid:
        if request.id in repeated:
            reason = f"id {request.id!r} is used by more than one request"
            invalid.append(InvalidRequest(index=index, id=request.id, reason=reason))
    return (
        sorted((r for _, r in valid if r.id not in repeated), key=lambda r: r.id),
        sorted(invalid, key=lambda bad: -1 if bad.index is None else bad.index),
    )


def parse_answers(databag: Mapping[str, str]) -> tuple[list[VmAnswer], list[str]]:
    """Validate a provider unit databag answer by answer.

    Returns:
        The valid answers sorted by id (for a repeated id, the first one), and a description of
        each problem found.
    """
    problem = _check_version(databag)
    items: list[Any] = []
    if problem is None:
        items, problem = _load_array(databag, "vms")
    if problem is not None:
        return [], [problem]
    answers: dict[str, VmAnswer] = {}
    problems: list[str] = []
    for index, item in enumerate(items):
        if index >= MAX_REQUESTS:
            problems.append(f"vms[{index}]: beyond the {MAX_REQUESTS} answers read")
            break
        try:
            answer = VmAnswer.model_validate(item)
        except (pydantic.ValidationError, RecursionError) as err:
            reason = _describe(err) if isinstance(err, pydantic.ValidationError) else "too deep"
            problems.append(f"vms[{index}]: {reason}")
            continue
        if answer.id in answers:
            problems.append(f"vms[{index}]: id {answer.id!r} repeated")
            continue
        answers[answer.id] = answer
    return sorted(answers.values(), key=lambda a: a.id), problems


def _relation_requests(relation: ops.Relation) -> RelationRequests | None:
    app = relation.app
    if app is None:  # pyright: ignore[reportUnnecessaryComparison]
        return None
    try:
        databag = dict(relation.data[app])
    except ops.ModelError as err:
        logger.warning(
            "cannot read %s application data on relation %d: %s", app.name, relation.id, err
        )
        return RelationRequests(relation.id, app.name, [], [], relation)
    valid, invalid = parse_requests(databag)
    for bad in invalid:
        where = "databag" if bad.index is None else f"requests[{bad.index}]"
        logger.warning(
            "vm request from %s on relation %d, %s (id %r) is invalid: %s",
            app.name,
            relation.id,
            where,
            bad.id,
            bad.reason,
        )
    return RelationRequests(relation.id, app.name, valid, invalid, relation)


# ---------------------------------------------------------------------------------------------
# Events


class _VmEvent(ops.RelationEvent):
    """A relation event carrying a JSON payload, so it survives a snapshot."""

    def __init__(
        self,
        handle: ops.Handle,
        relation: ops.Relation,
        app: ops.Application | None = None,
        unit: ops.Unit | None = None,
        payload: str = "",
    ):
        super().__init__(handle, relation, app, unit)
        self._payload = payload

    def snapshot(self) -> dict[str, Any]:
        """Serialise the event (used by the framework)."""
        data = super().snapshot()
        data["payload"] = self._payload
        return data

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Deserialise the event (used by the framework)."""
        super().restore(snapshot)
        self._payload = snapshot["payload"]


class VmReadyEvent(_VmEvent):
    """A requested VM reached state running."""

    @property
    def vm(self) -> HostedVm:
        """The answer, with the vm-host unit that hosts the VM."""
        return HostedVm.model_validate_json(self._payload)


class VmFailedEvent(_VmEvent):
    """A requested VM, or its request, failed; `vm.error` says why."""

    @property
    def vm(self) -> HostedVm:
        """The answer, with the vm-host unit that reported it."""
        return HostedVm.model_validate_json(self._payload)


class VmRemovedEvent(_VmEvent):
    """A VM that was published before is published no more."""

    @property
    def vm_id(self) -> str:
        """The request id of the removed VM."""
        return self._payload


class RequestsChangedEvent(ops.RelationEvent):
    """The requirer side of a relation changed; its requests may have changed."""

    @property
    def requests(self) -> RelationRequests:
        """The requests of this relation's application (empty once the relation is broken)."""
        found = _relation_requests(self.relation)
        if found is None or self.relation.active is False:
            return RelationRequests(self.relation.id, self.app.name if self.app else "")
        return found


class VmHostRequirerEvents(ops.ObjectEvents):
    """Events of `VmHostRequirer`."""

    vm_ready = ops.EventSource(VmReadyEvent)
    vm_failed = ops.EventSource(VmFailedEvent)
    vm_removed = ops.EventSource(VmRemovedEvent)


class VmHostProviderEvents(ops.ObjectEvents):
    """Events of `VmHostProvider`."""

    requests_changed = ops.EventSource(RequestsChangedEvent)


# ---------------------------------------------------------------------------------------------
# Requirer


class VmHostRequirer(ops.Object):
    """The side of a charm that asks a vm-host charm for VMs."""

    on = VmHostRequirerEvents()  # pyright: ignore[reportAssignmentType]

    def __init__(self, charm: ops.CharmBase, relation_name: str = "vm-host"):
        super().__init__(charm, relation_name)
        self._charm = charm
        self._relation_name = relation_name
        events = charm.on[relation_name]
        self.framework.observe(events.relation_changed, self._on_changed)
        self.framework.observe(events.relation_departed, self._on_changed)
        self.framework.observe(events.relation_broken, self._on_broken)

    @property
    def relations(self) -> list[ops.Relation]:
        """The relations of this endpoint, by id."""
        return sorted(self.model.relations[self._relation_name], key=lambda r: r.id)

    def _require_leader(self, what: str) -> None:
        if not self.model.unit.is_leader():
            raise NotLeaderError(
                f"{what} uses this application's databag, which only the leader may read "
                "and write; call it only when self.unit.is_leader()"
            )

    def request_vms(self, requests: Iterable[VmRequest | Mapping[str, Any]]) -> None:
        """Replace this application's VM requests on every relation of the endpoint.

        Requests missing from the new set are released by the provider. Writes only when the
        set changed, so calling it on every event is cheap.

        Raises:
            NotLeaderError: this unit is not the leader.
            pydantic.ValidationError: a request is invalid, or two share an id (a ValueError
                naming the field; nothing is written).
        """
        self._require_leader("request_vms")
        items = [
            r if isinstance(r, VmRequest) else VmRequest.model_validate(dict(r)) for r in requests
        ]
        data = RequirerAppData(requests=items)
        for relation in self.relations:
            _save(relation, data, self.model.app)

    @property
    def requests(self) -> list[VmRequest]:
        """The requests this application has published (leader only).

        Raises:
            NotLeaderError: this unit is not the leader.
        """
        self._require_leader("requests")
        for relation in self.relations:
            valid, _ = parse_requests(dict(relation.data[self.model.app]))
            return valid
        return []

    def withdraw(self, request_id: str) -> None:
        """Drop one request on every relation; the provider then releases that VM.

        Raises:
            NotLeaderError: this unit is not the leader.
        """
        self._require_leader("withdraw")
        for relation in self.relations:
            valid, _ = parse_requests(dict(relation.data[self.model.app]))
            kept = [r for r in valid if r.id != request_id]
            _save(relation, RequirerAppData(requests=kept), self.model.app)

    def _relation_vms(self, relation: ops.Relation) -> list[HostedVm]:
        hosted: list[HostedVm] = []
        for unit in sorted(relation.units, key=lambda u: u.name):
            if unit.app is self.model.app:
                continue
            try:
                databag = dict(relation.data[unit])
            except ops.ModelError as err:
                logger.warning(
                    "cannot read %s data on relation %d: %s", unit.name, relation.id, err
                )
                continue
            answers, problems = parse_answers(databag)
            for problem in problems:
                logger.warning("ignoring bad vm answer from %s: %s", unit.name, problem)
            hosted.extend(
                HostedVm(**a.model_dump(), unit=unit.name, relation_id=relation.id)
                for a in answers
            )
        return hosted

    @property
    def vms(self) -> list[HostedVm]:
        """Every answer from every vm-host unit, sorted by id then unit."""
        hosted = [vm for relation in self.relations for vm in self._relation_vms(relation)]
        return sorted(hosted, key=lambda vm: (vm.id, vm.unit))

    def vm(self, request_id: str) -> HostedVm | None:
        """The best answer for one request id, or None when no unit answers for it."""
        return _best({request_id: [vm for vm in self.vms if vm.id == request_id]}).get(request_id)

    def _on_changed(self, event: ops.RelationEvent) -> None:
        self._compare(event.relation, self._relation_vms(event.relation), write=True)

    def _on_broken(self, event: ops.RelationBrokenEvent) -> None:
        self._compare(event.relation, [], write=False)

    def _compare(self, relation: ops.Relation, hosted: list[HostedVm], *, write: bool) -> None:
        """Emit the events for what changed since this unit last looked, then remember it."""
        bag = relation.data[self.model.unit]
        seen = _load_seen(bag.get(SEEN_KEY), relation.id)
        now = _best(_group(hosted))
        app = relation.app
        for vm_id, vm in sorted(now.items()):
            if vm.state == seen.get(vm_id):
                continue
            if vm.state == "running":
                self.on.vm_ready.emit(relation, app, None, vm.model_dump_json())
            elif vm.state == "failed":
                self.on.vm_failed.emit(relation, app, None, vm.model_dump_json())
        for vm_id in sorted(set(seen) - set(now)):
            self.on.vm_removed.emit(relation, app, None, vm_id)
        if write:
            snapshot = json.dumps(
                {vm_id: vm.state for vm_id, vm in sorted(now.items())}, separators=(",", ":")
            )
            if bag.get(SEEN_KEY, "{}") != snapshot:
                bag[SEEN_KEY] = snapshot


def _load_seen(raw: str | None, relation_id: int) -> dict[str, str]:
    """Read this unit's id -> state snapshot; an unreadable one counts as empty."""
    loaded, _ = _decode(raw or "{}", SEEN_KEY)
    if not isinstance(loaded, dict):
        logger.warning("resetting unreadable %s snapshot on relation %d", SEEN_KEY, relation_id)
        return {}
    return {str(k): str(v) for k, v in loaded.items()}  # pyright: ignore[reportUnknownVariableType]


def _group(hosted: Iterable[HostedVm]) -> dict[str, list[HostedVm]]:
    grouped: dict[str, list[HostedVm]] = {}
    for vm in hosted:
        grouped.setdefault(vm.id, []).append(vm)
    return grouped


def _best(grouped: Mapping[str, list[HostedVm]]) -> dict[str, HostedVm]:
    """Pick one answer per id when several units report it (a VM moving between hosts)."""
    return {
        vm_id: min(vms, key=lambda vm: (_STATE_ORDER[vm.state], vm.unit))
        for vm_id, vms in grouped.items()
        if vms
    }


# ---------------------------------------------------------------------------------------------
# Provider


class VmHostProvider(ops.Object):
    """The vm-host side: reads VM requests and publishes this unit's answers."""

    on = VmHostProviderEvents()  # pyright: ignore[reportAssignmentType]

    def __init__(self, charm: ops.CharmBase, relation_name: str = "vms"):
        super().__init__(charm, relation_name)
        self._relation_name = relation_name
        events = charm.on[relation_name]
        for source in (
            events.relation_joined,
            events.relation_changed,
            events.relation_departed,
            events.relation_broken,
        ):
            self.framework.observe(source, self._on_relation_event)

    @property
    def relations(self) -> list[ops.Relation]:
        """The relations of this endpoint, by id."""
        return sorted(self.model.relations[self._relation_name], key=lambda r: r.id)

    @property
    def requests(self) -> list[RelationRequests]:
        """Every related application's requests, validated one by one, sorted by relation id.

        Never raises on remote data: bad requests are logged and listed in `invalid`.
        """
        found = (_relation_requests(relation) for relation in self.relations)
        return [r for r in found if r is not None]

    def sync(self) -> list[RelationRequests]:
        """Re-read the requests now; for charms that reconcile on every event."""
        return self.requests

    def publish(
        self, relation: ops.Relation, answers: Sequence[VmAnswer | Mapping[str, Any]]
    ) -> None:
        """Publish this unit's answers on one relation, replacing the previous ones.

        Raises:
            pydantic.ValidationError: an answer is invalid or two share an id (a bug in the
                caller; nothing is written).
        """
        # A HostedVm (a subclass) is narrowed to the wire fields by validating its dump.
        items = [
            a if type(a) is VmAnswer else VmAnswer.model_validate(_as_mapping(a)) for a in answers
        ]
        _save(relation, ProviderUnitData(vms=items), self.model.unit)

    def clear(self, relation: ops.Relation) -> None:
        """Remove everything this library wrote in this unit's databag of the relation."""
        bag = relation.data[self.model.unit]
        for key in ("version", "vms"):
            if key in bag:
                del bag[key]

    def _on_relation_event(self, event: ops.RelationEvent) -> None:
        self.on.requests_changed.emit(event.relation, event.app, event.unit)


def _as_mapping(item: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    return item.model_dump() if isinstance(item, BaseModel) else dict(item)


# ---------------------------------------------------------------------------------------------
# Testing helpers (ops.testing is imported only when they are called)


def _answers_json(answers: Iterable[VmAnswer | Mapping[str, Any]]) -> str:
    raw = [
        a.model_dump(mode="json", by_alias=True) if isinstance(a, VmAnswer) else a for a in answers
    ]
    return _encode(raw)


def requirer_relation(
    requests: Iterable[VmRequest | Mapping[str, Any]] = (),
    *,
    endpoint: str = "vms",
    remote_app_name: str = "consumer",
    relation_id: int | None = None,
    remote_units: Iterable[int] = (0,),
) -> testing.Relation:
    """Build a relation to a requirer application, for testing a provider charm.

    `VmRequest`s are written as the requirer library writes them; mappings are written as given
    (with wire names), so tests can send invalid requests too.
    """
    from ops import testing

    raw = [
        r.model_dump(mode="json", by_alias=True) if isinstance(r, VmRequest) else r
        for r in requests
    ]
    app_data = {"version": _encode(VERSION), "requests": _encode(raw)}
    kwargs: dict[str, Any] = {} if relation_id is None else {"id": relation_id}
    return testing.Relation(
        endpoint,
        interface="vm_host",
        remote_app_name=remote_app_name,
        remote_app_data=app_data,
        remote_units_data={unit: {} for unit in remote_units},
        **kwargs,
    )


def provider_relation(
    answers_by_unit: Mapping[int, Iterable[VmAnswer | Mapping[str, Any]]] | None = None,
    *,
    endpoint: str = "vm-host",
    remote_app_name: str = "vm-host",
    relation_id: int | None = None,
    local_unit_data: Mapping[str, str] | None = None,
) -> testing.Relation:
    """Build a relation to vm-host units publishing answers, for testing a requirer charm.

    Args:
        answers_by_unit: remote unit number -> the answers that unit publishes; mappings are
            written as given (with wire names). Default: one unit (0) publishing nothing.
        endpoint: the requirer charm's endpoint name.
        remote_app_name: the provider application's name.
        relation_id: a fixed relation id (default: a fresh one).
        local_unit_data: this unit's databag, for example the `seen-vms` snapshot a previous
            run left (use the output state's relation to chain runs instead where you can).
    """
    from ops import testing

    units = {0: []} if answers_by_unit is None else answers_by_unit
    units_data = {
        unit: {"version": _encode(VERSION), "vms": _answers_json(answers)}
        for unit, answers in units.items()
    }
    kwargs: dict[str, Any] = {} if relation_id is None else {"id": relation_id}
    if local_unit_data is not None:
        kwargs["local_unit_data"] = dict(local_unit_data)
    return testing.Relation(
        endpoint,
        interface="vm_host",
        remote_app_name=remote_app_name,
        remote_units_data=units_data,
        **kwargs,
    )


def requests_from(relation: testing.RelationBase) -> list[VmRequest]:
    """Read the requests a requirer charm wrote (its app databag in an output state).

    Raises:
        ValueError: the charm wrote something invalid.
    """
    valid, invalid = parse_requests(relation.local_app_data)
    if invalid:
        raise ValueError("; ".join(bad.reason for bad in invalid))
    return valid


def answers_from(relation: testing.RelationBase) -> list[VmAnswer]:
    """Read the answers a provider charm published (its unit databag in an output state).

    Raises:
        ValueError: the charm wrote something invalid.
    """
    answers, problems = parse_answers(relation.local_unit_data)
    if problems:
        raise ValueError("; ".join(problems))
    return answers

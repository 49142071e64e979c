"""LXD backend: host topology, VM composition and the hypervisor-side ledger, over LXD's API.

The same contract as the libvirt backend, on LXD virtual machines in one project:

- The hypervisor is the ledger. Every instance vm-host creates carries `user.vm-host.*` config
  keys (owner, request id, spec hash, placement, the custom volumes it created, its NICs), and
  `list_vms` rebuilds every allocation from them. Instances without them (in any project) are
  reported unmanaged, with what their `limits.*` keys take from the host.
- The instance definition is built by one pure function, `instance_definition`, from the
  request and the allocator's placement: `limits.cpu` is the pinned set the allocator chose
  ("2,3,6,7"; a single CPU is written "5-5" because "5" would mean five CPUs) or a vCPU count,
  `limits.cpu.nodes` the host nodes of the placement, `limits.memory.hugepages` for
  hugepage-backed VMs, NICs as bridged/macvlan/sriov devices with a MAC chosen up front, a root
  disk of the requested size and extra disks as custom block volumes.
- Every name that reaches LXD is validated first, and everything that can be checked (name
  free, pools present, volumes free, image present) is checked before the first volume exists.
  A failure after that deletes the instance and every volume this call created.

The daemon is reached through the unix-socket client of `vmhost.lxd_trust` (one client for the
project). LXD has no key for guest NUMA cells or emulator threads: it lays the guest out
itself from the pinned CPUs. The ledger still records the allocator's whole placement (cells,
pages, emulator CPUs, VFs), so the allocator's books stay exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vmhost import cloudinit, imagecache, images
from vmhost.backends import BackendUnavailableError, stable_mac
from vmhost.backends.lxd_resources import parse_resources
from vmhost.codec import CodecError, placement_from_dict, placement_to_dict
from vmhost.constraints import (
    disk_name,
    guest_interface_name,
    spec_hash,
    validate_host_device,
    validate_name,
    volume_name,
)
from vmhost.lxd_trust import LxdError, LxdTrust, validate_project
from vmhost.model import (
    AttachmentKind,
    CellPlacement,
    HostTopology,
    InvalidRequestError,
    NicAttachment,
    Placement,
    StoragePool,
    VmHostError,
    VmRecord,
    VmSpec,
    VmState,
    VmStats,
)
from vmhost.networks import discover_nics
from vmhost.topology import (
    apply_free_hugepages,
    format_cpu_list,
    parse_cpu_list,
    read_free_hugepages,
    read_total_hugepages,
)

logger = logging.getLogger(__name__)

MAX_CONSOLE_LINES = 100_000

__all__ = [
    "KEY_INTERFACES",
    "KEY_OWNER",
    "KEY_PLACEMENT",
    "KEY_REQUEST_ID",
    "KEY_SPEC_HASH",
    "KEY_VOLUMES",
    "PROJECT_CONFIG",
    "LxdBackend",
    "LxdVmUnsupportedError",
    "generate_mac",
    "instance_definition",
    "ledger_config",
    "limits_cpu",
    "placement_from_limits",
    "record_from_instance",
    "vm_support_problem",
    "volume_name",
]

KEY_PREFIX = "user.vm-host."
KEY_OWNER = KEY_PREFIX + "owner"
KEY_REQUEST_ID = KEY_PREFIX + "request-id"
KEY_TAGS = KEY_PREFIX + "tags"
KEY_POOL = KEY_PREFIX + "pool"
KEY_SPEC_HASH = KEY_PREFIX + "spec-hash"
KEY_PLACEMENT = KEY_PREFIX + "placement"
KEY_VOLUMES = KEY_PREFIX + "volumes"
KEY_INTERFACES = KEY_PREFIX + "interfaces"

PROJECT_CONFIG = {
    "features.images": "false",
    "features.profiles": "true",
    "features.storage.volumes": "true",
}
"""vm-host's project keeps its own profiles and volumes; images stay shared with the default
project, so an image imported once serves every project."""

CPU_NODES_EXTENSION = "numa_cpu_placement"
"""The API extension that brings `limits.cpu.nodes` (LXD 5.x after 5.0; not in 5.0.2)."""

MAC_PREFIX = "00:16:3e"
"""The OUI LXD uses for the MACs it generates."""
ROOT_DEVICE = "root"
GB = 10**9
MIB = 1024 * 1024
STOP_TIMEOUT_S = 30
NIC_BOOT_PRIORITY = 10
"""LXD boots the device with the highest boot.priority first; disks default to 0."""

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{12,64}$")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")
_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
    "eb": 1000**6,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
    "eib": 1024**6,
}
_UNSUPPORTED_VM_MARKERS = ("vhost_vsock", 'instance type "virtual-machine" is not supported')
_NICTYPE = {
    AttachmentKind.BRIDGE: "bridged",
    AttachmentKind.DIRECT: "macvlan",
    AttachmentKind.HOSTDEV: "sriov",
}


class LxdVmUnsupportedError(VmHostError):
    """LXD on this host cannot create or run virtual machines (its qemu driver is not usable).

    The message carries the daemon's own reason, for example "vhost_vsock kernel module not
    loaded", so the operator sees what to fix on the host.
    """


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit tested without LXD)


def generate_mac(vm: str, label: str) -> str:
    """Return a stable MAC in LXD's 00:16:3e range for a VM's NIC (see backends.stable_mac)."""
    return stable_mac(MAC_PREFIX, vm, label)


def limits_cpu(placement: Placement) -> str:
    """Return `limits.cpu`: the pinned host CPUs, or the vCPU count for a shared VM.

    LXD reads a bare number as a count, so one pinned CPU is written as the range "5-5".
    """
    cpus = placement.pinned_cpus
    if not cpus:
        return str(placement.vcpus)
    if len(cpus) == 1:
        return f"{cpus[0]}-{cpus[0]}"
    return ",".join(str(c) for c in cpus)


def cpu_nodes(placement: Placement) -> str | None:
    """Return `limits.cpu.nodes` when the placement restricts the VM to host nodes."""
    if not placement.cells:
        return None
    return format_cpu_list(placement.host_nodes)


def ledger_config(
    spec: VmSpec,
    placement: Placement,
    nics: Sequence[NicAttachment],
    volumes: Sequence[str],
) -> dict[str, str]:
    """Return the `user.vm-host.*` keys that make the instance its own ledger entry.

    Args:
        spec: the request (owner, request id and hash come from it).
        placement: what the allocator gave the VM (JSON in the vm-host codec's shape).
        nics: the VM's NICs, each with its MAC.
        volumes: custom volumes created for the VM, as "pool/volume".
    """
    interfaces = [
        {
            "label": n.label,
            "mac": n.mac or "",
            "attached-to": n.source,
            **({"ip": n.ip} if n.ip else {}),
            **({"space": n.space} if n.space else {}),
            **({"subnet": n.subnet} if n.subnet else {}),
        }
        for n in nics
    ]
    return {
        KEY_OWNER: spec.owner,
        KEY_REQUEST_ID: spec.request_id,
        KEY_SPEC_HASH: spec_hash(spec),
        **({KEY_TAGS: _json(list(spec.tags))} if spec.tags else {}),
        **({KEY_POOL: spec.pool} if spec.pool else {}),
        KEY_PLACEMENT: _json(placement_to_dict(placement)),
        KEY_VOLUMES: _json(list(volumes)),
        KEY_INTERFACES: _json(interfaces),
    }


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def cloud_init_config(spec: VmSpec, nics: Sequence[NicAttachment]) -> dict[str, str]:
    """Return the cloud-init.* keys, or {} when the VM needs no cloud-init data.

    Network config (version 2) matches each NIC by MAC, so it does not depend on the names the
    guest kernel gives LXD's virtio NICs; NICs without a static address use DHCP. SSH keys
    are merged into #cloud-config user data.
    """
    if not cloudinit.needs_cloud_init(spec, nics):
        return {}
    result = {"cloud-init.user-data": cloudinit.user_data(spec)}
    if nics:
        result["cloud-init.network-config"] = cloudinit.network_config(nics)
    return result


def image_source(image: str | None) -> dict[str, str]:
    """Return the instance source: an empty VM, or an image of LXD's local image store.

    `local:NAME` is the image LXD's store knows by the alias NAME (`lxc image import FILE
    --alias NAME`); an LXD alias or fingerprint is passed on as it is. A stream name
    (`ubuntu@24.04`) names no image here: the backend resolves it against LXD's store
    (`LxdBackend.image_source`).

    Raises:
        InvalidRequestError: the image is a host path (LXD boots images from its own store) or
            not a valid alias/fingerprint.
    """
    if not image:
        return {"type": "none"}
    if image.startswith("/"):
        raise InvalidRequestError(
            "image",
            f"{image!r} is a host path; the LXD backend boots images from LXD's image store: "
            "import the file with `lxc image import FILE --alias NAME` and give local:NAME",
        )
    if image.lower().startswith("local:"):
        local = images.parse_name(image)
        assert isinstance(local, images.LocalImage)
        return {"type": "image", "alias": local.local_name}
    if _FINGERPRINT_RE.fullmatch(image):
        return {"type": "image", "fingerprint": image}
    if not _ALIAS_RE.fullmatch(image):
        raise InvalidRequestError(
            "image",
            f"{image!r} is not an image name or an LXD image alias or fingerprint; use "
            "ubuntu@<release>, local:NAME, or letters, digits, '.', '_', '/', ':' and '-' "
            "(for example 'jammy-vm')",
        )
    return {"type": "image", "alias": image}


def stream_image(image: str | None) -> images.StreamImage | None:
    """Return the stream image a name means (`ubuntu@24.04`, `24.04`, `noble`), else None."""
    if not image or image.lower().startswith("local:"):
        return None
    try:
        parsed = images.parse_name(image)
    except InvalidRequestError:
        return None  # an LXD alias or fingerprint
    return parsed if isinstance(parsed, images.StreamImage) else None


def newest_stream_image(
    listed: Sequence[Mapping[str, Any]], image: images.StreamImage, arch: str
) -> str | None:
    """The fingerprint of the newest VM image of LXD's store that is `image` for `arch`.

    LXD records a simplestreams image's product in its properties (os, version,
    architecture, serial), so the store itself says what is cached: nothing else is kept.
    """
    arches = {arch, images.ARCHES.get(arch, arch)}
    found: list[tuple[tuple[tuple[int, int | str], ...], str]] = []
    for entry in listed:
        props = entry.get("properties") or {}
        if (
            entry.get("type") == "virtual-machine"
            and str(props.get("os", "")).lower() == image.os
            and str(props.get("version", "")) == image.release
            and str(props.get("architecture", "")) in arches
        ):
            serial = str(props.get("serial", ""))
            found.append((images.version_key(serial), str(entry.get("fingerprint", ""))))
    return max(found)[1] if found else None


def _resolve_nics(spec: VmSpec, nics: Sequence[NicAttachment]) -> list[NicAttachment]:
    """Validate every NIC name that reaches LXD and give each its MAC."""
    resolved: list[NicAttachment] = []
    for nic in nics:
        what = "bridge" if nic.kind == AttachmentKind.BRIDGE else "parent interface"
        validate_host_device(nic.source, f"interfaces[{nic.label}].source", what)
        if nic.vlan is not None and not 1 <= nic.vlan <= 4094:
            raise InvalidRequestError(
                f"interfaces[{nic.label}].vlan", f"{nic.vlan} is not a VLAN id (1-4094)"
            )
        mac = (nic.mac or generate_mac(spec.name, nic.label)).lower()
        if not _MAC_RE.match(mac):
            raise InvalidRequestError(f"interfaces[{nic.label}].mac", f"{mac!r} is not a MAC")
        guest = nic.guest_name or guest_interface_name(nic.label)
        validate_host_device(guest, f"interfaces[{nic.label}].label", "guest interface name")
        resolved.append(dataclasses.replace(nic, mac=mac, guest_name=guest))
    return resolved


def extra_volumes(spec: VmSpec, default_pool: str) -> list[tuple[str, str, int]]:
    """Return (pool, volume, size in GB) of the custom volumes a VM's extra disks need."""
    return [
        (d.pool or default_pool, volume_name(spec.name, d.label), d.size_gb)
        for d in spec.disks[1:]
    ]


def instance_definition(
    spec: VmSpec,
    placement: Placement,
    nics: Sequence[NicAttachment],
    default_pool: str,
) -> dict[str, Any]:
    """Build the body of `POST /1.0/instances` for a VM, validating every name in it.

    No profile is applied: the definition says everything the VM gets, so a change to a
    project profile can never change what a VM takes from the host behind the ledger's back.

    Args:
        spec: the validated request; its first disk is the root disk.
        placement: what the allocator chose.
        nics: resolved NICs (MACs are generated for those without one).
        default_pool: the pool of disks that name none.

    Raises:
        InvalidRequestError: a name, MAC, VLAN, image or disk is not acceptable; the message
            names the field.
    """
    validate_name(spec.name, "name")
    validate_name(default_pool, "default-storage-pool")
    if not spec.disks:
        raise InvalidRequestError("storage", "at least a root disk is needed")
    root = spec.disks[0]
    validate_name(root.pool or default_pool, f"storage[{root.label}].pool")
    resolved = _resolve_nics(spec, nics)
    source = (
        {"type": "image", "fingerprint": "0" * 64}  # resolved against the store by compose
        if stream_image(spec.image)
        else image_source(spec.image)
    )

    devices: dict[str, dict[str, str]] = {
        ROOT_DEVICE: {
            "type": "disk",
            "path": "/",
            "pool": root.pool or default_pool,
            "size": f"{root.size_gb}GB",
        }
    }
    volumes = []
    for disk, (pool, volume, _) in zip(
        spec.disks[1:], extra_volumes(spec, default_pool), strict=True
    ):
        validate_name(pool, f"storage[{disk.label}].pool")
        validate_name(volume, f"storage[{disk.label}].label")
        device = disk_name(disk.label)
        if device in devices:
            raise InvalidRequestError(
                "storage", f"disk {disk.label!r} would be device {device!r}, which is taken"
            )
        devices[device] = {"type": "disk", "pool": pool, "source": volume}
        volumes.append(f"{pool}/{volume}")

    config: dict[str, str] = {
        "limits.cpu": limits_cpu(placement),
        "limits.memory": f"{placement.memory_mib}MiB",
        "security.secureboot": "false",
        "boot.autostart": "true",
    }
    nodes = cpu_nodes(placement)
    if nodes is not None:
        config["limits.cpu.nodes"] = nodes
    if placement.hugepage_backed:
        config["limits.memory.hugepages"] = "true"
    config |= cloud_init_config(spec, resolved)

    for index, nic in enumerate(resolved):
        name = nic.guest_name or guest_interface_name(nic.label)
        if name in devices:
            raise InvalidRequestError(
                f"interfaces[{nic.label}]", f"device name {name!r} is taken by a disk; rename"
            )
        device = {
            "type": "nic",
            "nictype": _NICTYPE[nic.kind],
            "parent": nic.source,
            "hwaddr": nic.mac or "",
        }
        if nic.vlan is not None:
            device["vlan"] = str(nic.vlan)
        if source["type"] == "none":
            device["boot.priority"] = str(NIC_BOOT_PRIORITY + len(resolved) - index)
        devices[name] = device
        config[f"volatile.{name}.hwaddr"] = nic.mac or ""

    config |= ledger_config(spec, placement, resolved, volumes)
    return {
        "name": spec.name,
        "type": "virtual-machine",
        "description": f"vm-host VM {spec.name} for {spec.owner}",
        "profiles": [],
        "source": source,
        "config": config,
        "devices": devices,
    }


def check_hugepage_size(placement: Placement, default_size_kib: int) -> None:
    """Refuse a hugepage placement in a page size LXD will not use.

    LXD backs VM memory with the host's default huge page size only; a placement in another
    size would book pages the VM never takes.
    """
    sizes = {c.hugepage_size_kib for c in placement.cells if c.hugepages}
    wrong = sorted(s for s in sizes if s is not None and s != default_size_kib)
    if wrong:
        raise VmHostError(
            f"LXD backs VMs with the host's default huge page size ({default_size_kib} KiB) "
            f"only, the placement uses {', '.join(f'{s} KiB' for s in wrong)}; ask for "
            "hugepages=any or the default size, or change the kernel's default_hugepagesz"
        )


def vm_support_problem(server_info: Mapping[str, Any]) -> str | None:
    """Return why LXD cannot run virtual machines (from GET /1.0), or None when it can.

    LXD lists only operational drivers: `environment.driver` is "lxc | qemu" on a VM-capable
    host and "lxc" where QEMU cannot work (no /dev/kvm, no vhost_vsock). Newer LXD also lists
    `environment.instance_types`.
    """
    env = server_info.get("environment") or {}
    types = env.get("instance_types")
    if isinstance(types, list) and "virtual-machine" not in types:
        return f"LXD lists instance types {types} without virtual-machine"
    drivers = [d.strip() for d in str(env.get("driver", "")).split("|") if d.strip()]
    if "qemu" not in drivers:
        return (
            f"LXD's qemu driver is not operational (drivers: {', '.join(drivers) or 'none'}); "
            "its log says why (for example: vhost_vsock kernel module not loaded)"
        )
    return None


def _says_vm_unsupported(message: str) -> bool:
    lowered = message.lower()
    return any(marker.lower() in lowered for marker in _UNSUPPORTED_VM_MARKERS)


# ---------------------------------------------------------------------------------------------
# Reading instances back


def parse_memory_mib(value: str | None, host_total_mib: Callable[[], int]) -> int | None:
    """Parse `limits.memory` ("512MiB", "2GB", "1073741824", "50%") into MiB; None if unset."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            return None
        return int(host_total_mib() * percent / 100)
    match = _MEMORY_RE.fullmatch(text)
    if match is None:
        return None
    factor = _MEMORY_UNITS.get(match.group(2).lower())
    if factor is None:
        return None
    return int(float(match.group(1)) * factor // MIB)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _cpu_limit(value: str | None, default: int) -> tuple[tuple[int, ...], int]:
    """Return (pinned CPUs, vCPUs) from `limits.cpu`: a set is pinned, a number is a count."""
    text = (value or "").strip()
    if not text:
        return (), default
    if "," in text or "-" in text:
        try:
            cpus = parse_cpu_list(text)
        except ValueError:
            logger.warning("limits.cpu %r is not a CPU set; counted as 1 vCPU", text)
            return (), 1
        return cpus, len(cpus)
    return (), int(text) if text.isdigit() else default


def _node_limit(value: str | None) -> tuple[int, ...]:
    text = (value or "").strip()
    if not text:
        return ()
    try:
        return parse_cpu_list(text)
    except ValueError:
        return ()


def placement_from_limits(
    config: Mapping[str, str],
    instance_type: str,
    topology: Callable[[], HostTopology],
) -> Placement:
    """Reconstruct what an instance vm-host did not create takes from the host.

    `limits.cpu` as a set ("2,3", "0-3", "5-5") is pinned and split into cells by the nodes
    of its CPUs; as a number it is shared. `limits.cpu.nodes` or hugepage backing without
    pinning gives one cell per named node (node 0 when none is named). Defaults follow LXD: a
    VM without limits has 1 vCPU and 1 GiB; a container without limits reserves nothing.

    Args:
        config: the instance's expanded config.
        instance_type: "virtual-machine" or "container".
        topology: called only when the host map is needed (pinned CPUs, "%" memory).
    """
    vm = instance_type == "virtual-machine"
    pinned, vcpus = _cpu_limit(config.get("limits.cpu"), default=1 if vm else 0)

    def host_mib() -> int:
        return sum(n.memory_kib for n in topology().nodes) // 1024

    memory = parse_memory_mib(config.get("limits.memory"), host_mib)
    memory_mib = memory if memory is not None else (1024 if vm else 0)
    hugepages = (config.get("limits.memory.hugepages") or "").lower() == "true"
    page_kib: int | None = None
    if hugepages:
        sizes = [s for n in topology().nodes for s in n.hugepages_total]
        page_kib = min(sizes) if sizes else 2048
    nodes = _node_limit(config.get("limits.cpu.nodes"))

    def cell(node: int, cell_vcpus: int, mib: int, cpus: tuple[int, ...]) -> CellPlacement:
        return CellPlacement(
            host_node=node,
            vcpus=cell_vcpus,
            memory_mib=mib,
            cpus=cpus,
            hugepage_size_kib=page_kib,
            hugepages=(mib * 1024 // page_kib) if page_kib else 0,
        )

    if pinned:
        host = topology()
        groups: dict[int, list[int]] = {}
        for cpu in pinned:
            node = host.node_of_cpu(cpu)
            groups.setdefault(node if node is not None else 0, []).append(cpu)
        order = sorted(groups)
        shares = [memory_mib * len(groups[n]) // len(pinned) for n in order]
        shares[0] += memory_mib - sum(shares)
        cells = tuple(
            cell(n, len(groups[n]), share, tuple(groups[n]))
            for n, share in zip(order, shares, strict=True)
        )
        return Placement(vcpus=vcpus, memory_mib=memory_mib, cells=cells)
    if hugepages or nodes:
        order = list(nodes or (0,))
        vcpu_shares = _split(vcpus, len(order))
        mem_shares = _split(memory_mib, len(order))
        cells = tuple(
            cell(n, v, m, ()) for n, v, m in zip(order, vcpu_shares, mem_shares, strict=True)
        )
        return Placement(vcpus=vcpus, memory_mib=memory_mib, cells=cells)
    return Placement(vcpus=vcpus, memory_mib=memory_mib)


def _autostart(config: Mapping[str, str]) -> bool:
    return str(config.get("boot.autostart", "")).lower() in ("true", "1", "yes", "on")


def _state(status: str) -> VmState:
    status = status.lower()
    if status in ("running", "frozen", "freezing", "stopping"):
        return VmState.RUNNING
    if status == "stopped":
        return VmState.STOPPED
    if status == "error":
        return VmState.FAILED
    return VmState.PENDING


def _ledger_list(config: Mapping[str, str], key: str) -> list[Any]:
    raw = config.get(key)
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        logger.error("instance key %s is not JSON; ignored", key)
        return []
    return value if isinstance(value, list) else []  # type: ignore[return-value]


def record_from_instance(
    instance: Mapping[str, Any],
    topology: Callable[[], HostTopology],
    project: str | None = None,
) -> VmRecord:
    """Build a VmRecord from one instance of `GET /1.0/instances?recursion=1`.

    Instances carrying `user.vm-host.owner` in the backend's project are vm-host's: their
    placement and volumes are read back exactly as written. Any other instance is unmanaged,
    reconstructed from its limits; instances of other projects are named "<project>/<name>".

    Args:
        instance: the instance object.
        topology: the host map, called only for unmanaged pinned instances.
        project: the backend's project; None treats the instance as in it.
    """
    name = str(instance.get("name", ""))
    config: Mapping[str, str] = instance.get("config") or {}
    expanded: Mapping[str, str] = instance.get("expanded_config") or config
    where = instance.get("project")
    own = project is None or where in (None, project)
    uuid = str(config.get("volatile.uuid", ""))
    state = _state(str(instance.get("status", "")))
    if own and KEY_OWNER in config:
        placement: Placement | None = None
        raw = config.get(KEY_PLACEMENT, "")
        try:
            placement = placement_from_dict(json.loads(raw), KEY_PLACEMENT)
        except (ValueError, CodecError, RecursionError) as e:
            logger.error(
                "instance %r: %s unreadable (%s); using its limits", name, KEY_PLACEMENT, e
            )
        if placement is None:
            placement = placement_from_limits(expanded, str(instance.get("type", "")), topology)
        interfaces = tuple(
            {
                "label": str(i.get("label", "")),
                "mac": str(i.get("mac", "")),
                "attached-to": str(i.get("attached-to", "")),
                **{k: str(i[k]) for k in ("ip", "space", "subnet") if i.get(k)},
            }
            for i in _ledger_list(config, KEY_INTERFACES)
            if isinstance(i, dict)
        )
        return VmRecord(
            name=name,
            uuid=uuid,
            state=state,
            placement=placement,
            owner=config.get(KEY_OWNER, ""),
            request_id=config.get(KEY_REQUEST_ID, ""),
            spec_hash=config.get(KEY_SPEC_HASH, ""),
            volumes=tuple(str(v) for v in _ledger_list(config, KEY_VOLUMES)),
            tags=tuple(str(t) for t in _ledger_list(config, KEY_TAGS) if isinstance(t, str)),
            pool=str(config.get(KEY_POOL, "")),
            interfaces=interfaces,
            managed=True,
            autostart=_autostart(expanded),
        )
    devices: Mapping[str, Mapping[str, str]] = (
        instance.get("expanded_devices") or instance.get("devices") or {}
    )
    interfaces = tuple(
        {
            "label": dev_name,
            "mac": device.get("hwaddr") or expanded.get(f"volatile.{dev_name}.hwaddr", ""),
            "attached-to": device.get("parent") or device.get("network") or "",
        }
        for dev_name, device in sorted(devices.items())
        if device.get("type") == "nic"
    )
    return VmRecord(
        name=name if own else f"{where}/{name}",
        uuid=uuid,
        state=state,
        placement=placement_from_limits(expanded, str(instance.get("type", "")), topology),
        owner="",
        interfaces=interfaces,
        managed=False,
        autostart=_autostart(expanded),
    )


# ---------------------------------------------------------------------------------------------
# The backend


_LXD_STAT_FIELDS = {
    "lxd_memory_RSS_bytes": "memory_used_bytes",
    "lxd_disk_read_bytes_total": "block_read_bytes",
    "lxd_disk_written_bytes_total": "block_write_bytes",
    "lxd_network_receive_bytes_total": "net_rx_bytes",
    "lxd_network_transmit_bytes_total": "net_tx_bytes",
}


def stats_from_lxd_metrics(text: str) -> list[VmStats]:
    """Sum LXD's per-instance series (per CPU, mode, device) into one VmStats per instance.

    CPU time counts every mode but idle and steal (time the guest did not run); the loopback
    device is not network traffic.
    """
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.labels.get("name")
            if not name:
                continue
            fields = found.setdefault(name, {})
            if sample.name == "lxd_cpu_seconds_total":
                if sample.labels.get("mode") not in ("idle", "steal"):
                    fields["cpu_seconds"] = fields.get("cpu_seconds", 0.0) + sample.value
            elif sample.name in _LXD_STAT_FIELDS:
                if sample.name.startswith("lxd_network") and sample.labels.get("device") == "lo":
                    continue
                key = _LXD_STAT_FIELDS[sample.name]
                fields[key] = fields.get(key, 0.0) + sample.value
    return [
        VmStats(
            name=name,
            cpu_seconds=fields.get("cpu_seconds", 0.0),
            memory_used_bytes=int(fields.get("memory_used_bytes", 0)),
            block_read_bytes=int(fields.get("block_read_bytes", 0)),
            block_write_bytes=int(fields.get("block_write_bytes", 0)),
            net_rx_bytes=int(fields.get("net_rx_bytes", 0)),
            net_tx_bytes=int(fields.get("net_tx_bytes", 0)),
        )
        for name, fields in sorted(found.items())
    ]


class LxdBackend:
    """The Backend protocol on LXD virtual machines in one project, over the local socket."""

    name = "lxd"
    virt_type: str | None = None

    def __init__(
        self,
        project: str = "vm-host",
        socket_path: str | None = None,
        templates_dir: Path | None = None,
        *,
        sysfs_root: str = "/sys",
    ):
        """Prepare a backend; nothing is contacted until the first call.

        Args:
            project: the LXD project vm-host's VMs live in (config `lxd-project`).
            socket_path: LXD's unix socket; None finds the snap's or Debian's.
            templates_dir: unused (LXD takes JSON, not templates); accepted so both backends
                are built alike.
            sysfs_root: where sysfs is mounted, for host NICs and huge pages of every size
                (LXD reports only the default size).
        """
        self.project = validate_project(project)
        self.socket_path = socket_path
        self.templates_dir = templates_dir
        self.sysfs_root = sysfs_root
        self._client: LxdTrust | None = None

    # -- transport

    @property
    def client(self) -> LxdTrust:
        """Return the unix-socket client, finding the socket on first use."""
        if self._client is None:
            try:
                self._client = LxdTrust(self.socket_path)
            except LxdError as e:
                raise BackendUnavailableError(str(e)) from e
        return self._client

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """Call LXD; an unreachable daemon is BackendUnavailableError, a refusal LxdError."""
        try:
            return self.client.request(method, path, body)
        except LxdError as e:
            if isinstance(e.__cause__, OSError):
                raise BackendUnavailableError(f"{e}; is LXD running?") from e
            raise

    def _p(self, path: str, **query: str) -> str:
        """Return an API path in the backend's project."""
        params = {"project": self.project, **query}
        return f"{path}?{urllib.parse.urlencode(params)}"

    # -- host

    def server_info(self) -> dict[str, Any]:
        """Return GET /1.0 (environment, API extensions)."""
        return self._call("GET", "/1.0")

    def version(self) -> str:
        """Return LXD's version ("5.0.2")."""
        return str(self.server_info()["environment"]["server_version"])

    def vm_support(self) -> str | None:
        """Return why LXD cannot run VMs on this host, or None when it can."""
        return vm_support_problem(self.server_info())

    def resources(self) -> dict[str, Any]:
        """Return GET /1.0/resources."""
        return self._call("GET", "/1.0/resources")

    def topology(self) -> HostTopology:
        """Return NUMA nodes and huge pages, host NICs and storage pools.

        Huge pages of sizes LXD does not report come from sysfs, and host NICs from sysfs
        (bridges, VLANs and addresses are not in LXD's resources); NICs only LXD knows are
        kept too.
        """
        topology = parse_resources(self.resources())
        topology = apply_free_hugepages(
            topology,
            read_free_hugepages(self.sysfs_root),
            read_total_hugepages(self.sysfs_root),
        )
        nics = list(discover_nics(self.sysfs_root))
        known = {n.name for n in nics}
        nics += [n for n in topology.nics if n.name not in known]
        return dataclasses.replace(
            topology,
            nics=tuple(sorted(nics, key=lambda n: n.name)),
            pools=tuple(self._pools()),
            hypervisor_version=self.version(),
        )

    def _pools(self) -> Iterator[StoragePool]:
        for pool in self._call("GET", "/1.0/storage-pools?recursion=1"):
            name = pool["name"]
            space: Mapping[str, int] = {}
            try:
                space = self._call("GET", f"/1.0/storage-pools/{_q(name)}/resources")["space"]
            except (LxdError, KeyError, TypeError) as e:
                logger.warning("storage pool %s: no space figures: %s", name, e)
            total = int(space.get("total", 0))
            used = int(space.get("used", 0))
            yield StoragePool(
                name=name,
                driver=pool.get("driver", "dir"),
                capacity_bytes=total,
                allocation_bytes=used,
                available_bytes=max(0, total - used),
                path=(pool.get("config") or {}).get("source") or None,
                active=pool.get("status", "Created") == "Created",
            )

    def _pool_names(self) -> set[str]:
        return {url.rsplit("/", 1)[1] for url in self._call("GET", "/1.0/storage-pools")}

    def ensure_pool(self, name: str, path: str) -> None:
        """Create a `dir` storage pool at `path` (made when missing) unless the pool exists."""
        validate_name(name, "default-storage-pool")
        if not path.startswith("/"):
            raise InvalidRequestError("storage pool path", f"{path!r} must be an absolute path")
        if name in self._pool_names():
            return
        try:
            # LXD wants the directory of a dir pool to exist (and be empty).
            Path(path).mkdir(mode=0o711, parents=True, exist_ok=True)
            self._call(
                "POST",
                "/1.0/storage-pools",
                {"name": name, "driver": "dir", "config": {"source": path}},
            )
        except (LxdError, OSError) as e:
            raise VmHostError(f"storage pool {name}: create at {path} failed: {e}") from e
        logger.info("created LXD storage pool %s at %s", name, path)

    def ensure_project(self, project: str | None = None, storage_pool: str = "default") -> bool:
        """Create the project when missing, and give its default profile a root disk.

        A new project gets its own profiles and storage volumes and shares images with the
        default project (PROJECT_CONFIG). An existing project's features are left as they are
        (LXD refuses to change them once the project holds anything).

        Returns:
            Whether the project was created.
        """
        name = validate_project(project or self.project)
        validate_name(storage_pool, "default-storage-pool")
        created = False
        if name not in self.client.projects():
            try:
                self._call(
                    "POST",
                    "/1.0/projects",
                    {"name": name, "description": "vm-host VMs", "config": PROJECT_CONFIG},
                )
            except LxdError as e:
                raise VmHostError(f"LXD project {name}: create failed: {e}") from e
            created = True
            logger.info("created LXD project %s", name)
        try:
            self.client.ensure_root_disk(name, storage_pool)
        except LxdError as e:
            raise VmHostError(f"LXD project {name}: root disk on {storage_pool}: {e}") from e
        return created

    # -- reading VMs

    def _instances(self) -> list[dict[str, Any]]:
        return self._call("GET", "/1.0/instances?recursion=1&all-projects=true") or []

    def _instance_names(self) -> set[str]:
        return {
            url.rsplit("/", 1)[1].split("?")[0]
            for url in self._call("GET", self._p("/1.0/instances"))
        }

    def vm_stats(self) -> list[VmStats]:
        """Return CPU, memory, disk and network counters of the project's running instances.

        One GET of LXD's /1.0/metrics (Prometheus text, every instance at once).
        """
        try:
            text = self.client.request_text(self._p("/1.0/metrics"))
        except LxdError as e:
            raise BackendUnavailableError(f"LXD metrics: {e}") from e
        return stats_from_lxd_metrics(text)

    def console_log(self, name: str, lines: int = 100) -> str:
        """Return the tail of an instance's console log, as LXD keeps it."""
        if isinstance(lines, bool) or not 1 <= lines <= MAX_CONSOLE_LINES:
            raise InvalidRequestError("lines", f"{lines!r}: give 1 to {MAX_CONSOLE_LINES} lines")
        self._get_instance(name)
        try:
            text = self.client.request_text(self._p(f"/1.0/instances/{name}/console"))
        except LxdError as e:
            raise VmHostError(f"console log of {name}: {e}") from e
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def guest_addresses(self, names: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        """Return VM name -> MAC -> addresses, from each running instance's state.

        LXD reads them from its agent in the guest (or from the host side of the NIC).
        """
        found: dict[str, dict[str, list[str]]] = {}
        for name in names:
            validate_name(name, "name")
            try:
                state = self._call("GET", self._p(f"/1.0/instances/{name}/state")) or {}
            except (LxdError, VmHostError) as e:
                logger.debug("addresses of %s: %s", name, e)
                continue
            known: dict[str, list[str]] = {}
            for info in (state.get("network") or {}).values():
                mac = str(info.get("hwaddr") or "").lower()
                addrs = [
                    str(a["address"])
                    for a in info.get("addresses") or []
                    if a.get("address") and a.get("scope") == "global"
                ]
                if mac and addrs:
                    known.setdefault(mac, []).extend(addrs)
            if known:
                found[name] = known
        return found

    def list_vms(self) -> list[VmRecord]:
        """Return every instance on the host, vm-host's from their ledger keys."""
        cache: list[HostTopology] = []

        def topology() -> HostTopology:
            if not cache:
                cache.append(parse_resources(self.resources()))
            return cache[0]

        records = [record_from_instance(i, topology, self.project) for i in self._instances()]
        return sorted(records, key=lambda r: r.name)

    def _get_instance(self, name: str) -> dict[str, Any]:
        validate_name(name, "name")
        if name not in self._instance_names():
            raise VmHostError(f"VM {name!r} does not exist in LXD project {self.project!r}")
        return self._call("GET", self._p(f"/1.0/instances/{name}"))

    def _volume_names(self, pool: str) -> set[str]:
        urls = self._call("GET", self._p(f"/1.0/storage-pools/{_q(pool)}/volumes/custom"))
        return {u.rsplit("/", 1)[1].split("?")[0] for u in urls or []}

    # -- composing

    def compose(
        self,
        spec: VmSpec,
        placement: Placement,
        nics: Sequence[NicAttachment],
        default_pool: str,
        *,
        start: bool = True,
    ) -> VmRecord:
        """Create the volumes and the instance of a VM and start it; on failure undo it all.

        Args:
            spec: the validated request.
            placement: what the allocator chose.
            nics: resolved NICs.
            default_pool: pool of the disks that name none.
            start: start the VM once created (False creates it stopped).

        Raises:
            InvalidRequestError: a name, image or NIC is not acceptable (nothing was touched).
            LxdVmUnsupportedError: LXD here cannot create or run VMs (everything this call
                created was removed again).
            VmHostError: the name is taken, a pool, volume or image is missing or taken, or a
                step failed (everything this call created was removed again).
        """
        definition = instance_definition(spec, placement, nics, default_pool)
        info = self.server_info()
        if "limits.cpu.nodes" in definition["config"] and CPU_NODES_EXTENSION not in info.get(
            "api_extensions", []
        ):
            # LXD 5.0 refuses the key ("Unknown configuration key"); the pinned set (or the
            # ledger, for shared VMs) still says which nodes the VM was given.
            definition["config"].pop("limits.cpu.nodes")
            logger.warning(
                "LXD %s lacks %s: limits.cpu.nodes left out for %s",
                info.get("environment", {}).get("server_version"),
                CPU_NODES_EXTENSION,
                spec.name,
            )
        if placement.hugepage_backed:
            memory = self.resources().get("memory") or {}
            check_hugepage_size(placement, int(memory.get("hugepages_size", 0)) // 1024)
        if spec.name in self._instance_names():
            raise VmHostError(
                f"name: a VM named {spec.name!r} already exists in LXD project {self.project!r}"
            )
        planned = extra_volumes(spec, default_pool)
        self._check_storage(definition, planned)
        if spec.image:
            definition["source"] = self.image_source(spec.image)

        created: list[tuple[str, str]] = []
        attempted_instance = False
        step = "creating volumes"
        try:
            for pool, volume, size_gb in planned:
                step = f"creating volume {pool}/{volume}"
                self._call(
                    "POST",
                    self._p(f"/1.0/storage-pools/{_q(pool)}/volumes/custom"),
                    {
                        "name": volume,
                        "type": "custom",
                        "content_type": "block",
                        "config": {"size": f"{size_gb}GB"},
                    },
                )
                created.append((pool, volume))
            step = "creating the instance"
            attempted_instance = True
            self._call("POST", self._p("/1.0/instances"), definition)
            if start:
                step = "starting the instance"
                self.start(spec.name)
            step = "reading the instance back"
            record = record_from_instance(
                self._call("GET", self._p(f"/1.0/instances/{spec.name}")),
                lambda: parse_resources(self.resources()),
                self.project,
            )
        except (LxdError, VmHostError) as e:
            self._rollback(spec.name if attempted_instance else None, created)
            message = f"compose {spec.name}: {step} failed: {e}; nothing was left behind"
            if isinstance(e, LxdVmUnsupportedError) or _says_vm_unsupported(str(e)):
                raise LxdVmUnsupportedError(message) from e
            raise VmHostError(message) from e
        logger.info("composed VM %s in LXD project %s", spec.name, self.project)
        return record

    def _check_storage(
        self, definition: Mapping[str, Any], planned: Sequence[tuple[str, str, int]]
    ) -> None:
        pools = self._pool_names()
        wanted = {definition["devices"][ROOT_DEVICE]["pool"]} | {p for p, _, _ in planned}
        missing = sorted(wanted - pools)
        if missing:
            raise VmHostError(
                f"storage pool {', '.join(missing)} does not exist in LXD; create it or choose "
                f"another pool (LXD has {', '.join(sorted(pools)) or 'none'})"
            )
        taken: dict[str, set[str]] = {}
        for pool, volume, _ in planned:
            if pool not in taken:
                taken[pool] = self._volume_names(pool)
            if volume in taken[pool]:
                raise VmHostError(
                    f"volume {volume!r} already exists in pool {pool!r} (project "
                    f"{self.project!r}); delete it or choose another VM name"
                )

    def _store_images(self) -> list[dict[str, Any]]:
        return self._call("GET", self._p("/1.0/images", recursion="1")) or []

    def image_source(self, image: str) -> dict[str, str]:
        """Return the instance source of an image in LXD's store (VmHostError when absent)."""
        stream = stream_image(image)
        listed = self._store_images()
        if stream is not None:
            fingerprint = newest_stream_image(listed, stream, images.host_arch())
            if fingerprint is None:
                raise VmHostError(
                    f"image: {stream.name} is not in LXD's image store yet; fetch it first "
                    "(the sync-images action, or compose-vm, fetches it from image-source)"
                )
            return {"type": "image", "fingerprint": fingerprint}
        source = image_source(image)
        if "fingerprint" in source:
            wanted = source["fingerprint"]
            if any(str(i.get("fingerprint", "")).startswith(wanted) for i in listed):
                return source
        else:
            wanted = source["alias"]
            if any(a.get("name") == wanted for i in listed for a in i.get("aliases") or []):
                return source
        raise VmHostError(
            f"image: {wanted!r} is not in LXD's image store; import it with `lxc image import "
            f"FILE --alias {wanted}` (then name it local:{wanted})"
        )

    def prepare_image(
        self,
        name: str,
        settings: imagecache.Settings,
        *,
        wait: bool,
        log: Callable[[str], None] | None = None,
    ) -> str | None:
        """Get a stream image into LXD's store; None when it is there, else what to wait for.

        vm-host reads the source's index itself (signature checked with gpgv unless
        image-source-unsigned) and asks LXD to pull exactly the fingerprint it names; LXD
        checks the download against that fingerprint. `wait=False` (hooks) starts the pull as
        an LXD background operation and returns at once: later calls see it in LXD's image
        store or its operation list. Other names (local:NAME, LXD aliases) must be in the
        store already (VmHostError naming the fix).

        Raises:
            ImageFetchError: the index could not be had or verified, or the pull failed.
            VmHostError: a local image is not in LXD's store.
        """
        stream = stream_image(name)
        if stream is None:
            self.image_source(name)
            return None
        arch = images.host_arch()
        if newest_stream_image(self._store_images(), stream, arch) is not None:
            return None
        source = settings.source
        wanted = images.resolve_lxd(source, stream, arch)
        running = self._image_pull(wanted.fingerprint)
        if running is None:
            body = {
                "source": {
                    "type": "image",
                    "mode": "pull",
                    "server": source.url,
                    "protocol": "simplestreams",
                    "fingerprint": wanted.fingerprint,
                    "image_type": "virtual-machine",
                },
                "auto_update": False,
            }
            try:
                running = self.client.request("POST", self._p("/1.0/images"), body, wait=False)[
                    "id"
                ]
            except LxdError as e:
                raise images.ImageFetchError(
                    "unreachable", f"{stream.name}: LXD refused the pull: {e}"
                ) from e
            if log is not None:
                log(f"LXD is pulling {stream.name} {wanted.version} ({wanted.fingerprint[:12]})")
        if not wait:
            return f"downloading {stream.name} {wanted.version} into LXD's image store"
        try:
            done = self._call("GET", f"/1.0/operations/{_q(running)}/wait?timeout=3600") or {}
        except LxdError as e:
            done = {"status": "Failure", "err": str(e)}
        if done.get("status") != "Success":
            raise images.ImageFetchError(
                "unreachable",
                f"{stream.name}: LXD's pull failed: {done.get('err') or done.get('status')}",
            )
        if newest_stream_image(self._store_images(), stream, arch) is None:
            raise images.ImageFetchError(
                "not-found",
                f"{stream.name}: LXD pulled {wanted.fingerprint[:12]} but its store has no "
                f"virtual-machine image of {stream.product_id(arch)}",
            )
        return None

    def probe_image(self, name: str, settings: imagecache.Settings) -> str:
        """Where a compose would get an image from, nothing pulled.

        LXD's store, else the source's verified index (a local image must be in the store).
        """
        stream = stream_image(name)
        if stream is None:
            self.image_source(name)
            return f"{name}: in LXD's image store"
        if newest_stream_image(self._store_images(), stream, images.host_arch()) is not None:
            return f"{stream.name}: in LXD's image store"
        return imagecache.probe(None, name, settings)

    def _image_pull(self, fingerprint: str) -> str | None:
        """The id of LXD's running operation pulling that image, if any."""
        ops = self._call("GET", self._p("/1.0/operations", recursion="1")) or {}
        for op in ops.get("running") or []:
            if fingerprint in json.dumps(op.get("metadata") or {}) + json.dumps(
                op.get("resources") or {}
            ):
                return str(op["id"])
        return None

    def _rollback(self, instance: str | None, volumes: Sequence[tuple[str, str]]) -> None:
        """Remove what a failed compose created; keep going past errors and log them."""
        if instance is not None and instance in self._safe_instance_names():
            try:
                state = self._call("GET", self._p(f"/1.0/instances/{instance}/state"))
                if (state or {}).get("status") != "Stopped":
                    self._call(
                        "PUT",
                        self._p(f"/1.0/instances/{instance}/state"),
                        {"action": "stop", "force": True, "timeout": STOP_TIMEOUT_S},
                    )
                self._call("DELETE", self._p(f"/1.0/instances/{instance}"))
            except (LxdError, BackendUnavailableError) as e:
                logger.error("rollback: deleting instance %s failed: %s", instance, e)
        for pool, volume in volumes:
            try:
                self._call(
                    "DELETE", self._p(f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{volume}")
                )
            except (LxdError, BackendUnavailableError) as e:
                logger.error("rollback: deleting volume %s/%s failed: %s", pool, volume, e)

    def _safe_instance_names(self) -> set[str]:
        try:
            return self._instance_names()
        except (LxdError, BackendUnavailableError) as e:
            logger.error("rollback: cannot list instances: %s", e)
            return set()

    # -- lifecycle

    def image_store(self) -> None:
        """LXD keeps images in its own store: vm-host caches nothing here."""
        return None

    def delete(self, name: str) -> list[str]:
        """Stop and delete a vm-host VM and exactly the custom volumes its ledger names.

        Raises:
            VmHostError: the VM does not exist, was not created by vm-host (those are never
                touched), or a volume could not be deleted (the others still are).
        """
        instance = self._get_instance(name)
        config = instance.get("config") or {}
        if KEY_OWNER not in config:
            raise VmHostError(
                f"VM {name!r} was not created by vm-host; it is left alone (delete it with lxc)"
            )
        volumes = [str(v) for v in _ledger_list(config, KEY_VOLUMES)]
        try:
            if instance.get("status") != "Stopped":
                self._call(
                    "PUT",
                    self._p(f"/1.0/instances/{name}/state"),
                    {"action": "stop", "force": True, "timeout": STOP_TIMEOUT_S},
                )
            self._call("DELETE", self._p(f"/1.0/instances/{name}"))
        except LxdError as e:
            raise VmHostError(f"delete {name}: {e}") from e
        failed = []
        deleted = []
        present: dict[str, set[str]] = {}
        for ref in volumes:
            pool, _, volume = ref.partition("/")
            try:
                validate_name(pool, "pool")
                validate_name(volume, "volume")
                if pool not in present:
                    present[pool] = (
                        self._volume_names(pool) if pool in self._pool_names() else set()
                    )
                if volume not in present[pool]:
                    logger.warning("delete %s: volume %s was already gone", name, ref)
                    continue
                self._call(
                    "DELETE", self._p(f"/1.0/storage-pools/{_q(pool)}/volumes/custom/{volume}")
                )
            except (LxdError, InvalidRequestError) as e:
                failed.append(f"{ref} ({e})")
                continue
            deleted.append(ref)
        if failed:
            raise VmHostError(f"delete {name}: volumes not deleted: {', '.join(failed)}")
        logger.info("deleted VM %s from LXD project %s", name, self.project)
        return deleted

    def recover(self) -> list[str]:
        """Nothing to do yet: LXD composes write no intent record (libvirt's do)."""
        return []

    def recent_recoveries(self) -> list[str]:
        """LXD composes write no intent record, so no recovery has run."""
        return []

    def set_owner(self, name: str, owner: str) -> None:
        """Rewrite `user.vm-host.owner` of a vm-host VM (PATCH: other keys stay).

        Raises:
            VmHostError: the VM does not exist, was not created by vm-host, or LXD refused.
        """
        config = self._get_instance(name).get("config") or {}
        if KEY_OWNER not in config:
            raise VmHostError(f"VM {name!r} was not created by vm-host; it is left alone")
        try:
            self._call("PATCH", self._p(f"/1.0/instances/{name}"), {"config": {KEY_OWNER: owner}})
        except LxdError as e:
            raise VmHostError(f"set owner of {name}: {e}") from e

    def start(self, name: str) -> None:
        """Start a VM (a running one is left as it is).

        Raises:
            LxdVmUnsupportedError: LXD here cannot run VMs; the message says why.
            VmHostError: the VM does not exist or LXD refused to start it.
        """
        instance = self._get_instance(name)
        if instance.get("status") == "Running":
            return
        if instance.get("type") == "virtual-machine":
            problem = self.vm_support()
            if problem is not None:
                raise LxdVmUnsupportedError(
                    f"start {name}: LXD on this host cannot run virtual machines: {problem}"
                )
        try:
            self._call(
                "PUT",
                self._p(f"/1.0/instances/{name}/state"),
                {"action": "start", "timeout": STOP_TIMEOUT_S},
            )
        except LxdError as e:
            if _says_vm_unsupported(str(e)):
                raise LxdVmUnsupportedError(f"start {name}: {e}") from e
            raise VmHostError(f"start {name}: {e}") from e

    def stop(
        self, name: str, timeout_s: float = STOP_TIMEOUT_S, *, then_destroy: bool = True
    ) -> bool:
        """Ask the guest to shut down; after `timeout_s` force it off if `then_destroy`.

        Returns whether the instance is off.
        """
        instance = self._get_instance(name)
        if instance.get("status") == "Stopped":
            return True
        path = self._p(f"/1.0/instances/{name}/state")
        if timeout_s > 0:
            try:
                self._call("PUT", path, {"action": "stop", "timeout": max(1, int(timeout_s))})
                return True
            except LxdError as e:
                logger.info("stop %s: clean shutdown did not finish (%s)", name, e)
            if not then_destroy:
                status = (self._call("GET", path) or {}).get("status")
                return status == "Stopped"
        try:
            self._call("PUT", path, {"action": "stop", "force": True})
        except LxdError as e2:
            raise VmHostError(f"stop {name}: {e2}") from e2
        return True

    def set_autostart(self, name: str, enabled: bool) -> None:
        """Set `boot.autostart`: LXD starts the instance when the daemon (re)starts."""
        self._get_instance(name)
        try:
            self._call(
                "PATCH",
                self._p(f"/1.0/instances/{name}"),
                {"config": {"boot.autostart": "true" if enabled else "false"}},
            )
        except LxdError as e:
            raise VmHostError(f"autostart {name}: {e}") from e


def _q(name: str) -> str:
    """Quote a path segment (names are validated, this only guards the URL)."""
    return urllib.parse.quote(name, safe="")

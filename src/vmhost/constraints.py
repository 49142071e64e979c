"""Parse and validate VM requests into VmSpec records.

The charm actions and the vm_host relation provider both call `build_spec`, so a request means
the same thing whichever way it arrives. Values may come from remote JSON, so every function
accepts any type and raises only `InvalidRequestError(field, message)`, whose message states
the rule and the fix. Checks against the host (does CPU 99 exist, is pool "ssd" defined) belong
to placement; here only syntax and ranges are checked.

Storage and interfaces arrive in the structured form (lists of disks and NICs). The MAAS
compose strings ("root:20(ssd)", "eth0:space=oam") are read by one grammar, the vm_host
library's (parse_maas_storage, parse_maas_interfaces): the library parses relation requests
with it and the charm parses compose-vm's parameters with it, then hands the lists here. Its
differences from MAAS (one tag per disk, the storage pool; no fabric, type, tag or not_* keys;
vm-host's bridge=, parent= and numa_strict=) are refused there with a message. The structured
keys are checked again here, because the workload takes any value.

Interface labels stay as given in InterfaceSpec.label (the requester's handle, echoed back in
answers); `guest_interface_name()` gives the name the guest sees (numeric labels become ethN,
as in MAAS).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from vmhost import images, pools, sshkeys, userdata
from vmhost.model import (
    DiskSpec,
    HugepageRequest,
    InterfaceMode,
    InterfaceSpec,
    InvalidRequestError,
    VmSpec,
)
from vmhost.topology import MAX_CPU_ID, parse_cpu_list

__all__ = [
    "HOST_DEVICE_PATTERN",
    "MAX_CORES",
    "MAX_DISK_GB",
    "MAX_MEMORY_MIB",
    "MIN_MEMORY_MIB",
    "NAME_PATTERN",
    "SUPPORTED_INTERFACE_KEYS",
    "build_spec",
    "disk_name",
    "format_interfaces",
    "format_storage",
    "guest_interface_name",
    "parse_cpu_list",
    "parse_hugepages",
    "parse_interfaces",
    "parse_pinned_cores",
    "parse_storage",
    "spec_hash",
    "split_items",
    "validate_host_device",
    "validate_hostname",
    "validate_name",
    "validate_request_id",
    "validate_ssh_public_key",
    "validate_tags",
    "volume_name",
]

NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
REQUEST_ID_PATTERN = re.compile(r"^[a-z0-9-]{1,40}$")
LABEL_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,62}$")
HOST_DEVICE_PATTERN = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,14}$")
"""A conservative subset of what the kernel accepts (it refuses ':', '/' and whitespace)."""
PROJECT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TAG_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
"""A VM tag: what the vm_host library accepts (MAAS tag names)."""
SPACE_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
"""Juju space names: lower-case words joined by single hyphens (as the networks option)."""

MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1 << 24
MAX_CORES = 1024
MAX_NUMA_NODES = 64
MAX_DISK_GB = 65536
MAX_DISKS = 64
MAX_INTERFACES = 32
MAX_USER_DATA_BYTES = 64 * 1024
MAX_SSH_KEYS = 100
MAX_TAGS = 64
MAX_VLAN = 4094
IFNAMSIZ_CHARS = 15

SUPPORTED_INTERFACE_KEYS = (
    "space",
    "subnet",
    "subnet_cidr",
    "vlan",
    "vid",
    "ip",
    "mode",
    "bridge",
    "parent",
    "numa_strict",
)
_MAAS_UNSUPPORTED_KEYS = ("fabric", "fabric_class", "type", "tag", "tags")
_STORAGE_KEYS = ("label", "size-gb", "pool")
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


def _describe(value: object) -> str:
    """Show a bad value in a message without flooding it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int_value(value: object, field: str, what: str, low: int, high: int) -> int:
    """Accept an int or a decimal string within [low, high]; bools and fractions are refused."""
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,12}\s*", value):
        number = int(value)
    if number is None:
        raise InvalidRequestError(
            field, f"{what} must be a whole number from {low} to {high}, got {_describe(value)}"
        )
    if not low <= number <= high:
        raise InvalidRequestError(
            field, f"{what} must be from {low} to {high}, got {number}; give a value in range"
        )
    return number


def _str_value(value: object, field: str, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(field, f"{what} must be a string, got {_describe(value)}")
    return value


def _bool_value(value: object, field: str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidRequestError(field, f"{what} must be true or false, got {_describe(value)}")


# ---------------------------------------------------------------------------------------------
# Names


def validate_name(value: object, field: str = "name") -> str:
    """Check a VM, volume or pool name is safe for every hypervisor and for file names.

    Returns:
        The name, unchanged.

    Raises:
        InvalidRequestError: the name is not 1-63 lower-case letters, digits and hyphens with a
            letter or digit at both ends.
    """
    name = _str_value(value, field, "the name")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidRequestError(
            field,
            f"{_describe(name)} is not a valid name; use 1-63 lower-case letters, digits and "
            "hyphens, starting and ending with a letter or digit (for example 'web-1')",
        )
    return name


def validate_project(name: object, field: str = "lxd-project") -> str:
    """Refuse LXD project names LXD would reject or that could escape a URL path."""
    if not isinstance(name, str) or not PROJECT_PATTERN.fullmatch(name):
        raise InvalidRequestError(
            field,
            f"{name!r} is not a valid project name: use 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit",
        )
    return name


def validate_request_id(value: object, field: str = "id") -> str:
    """Check a relation request id: 1-40 lower-case letters, digits and hyphens."""
    request_id = _str_value(value, field, "the request id")
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidRequestError(
            field,
            f"{_describe(request_id)} is not a valid request id; use 1-40 lower-case letters, "
            "digits and hyphens (for example 'db-0')",
        )
    return request_id


def validate_host_device(value: object, field: str, what: str) -> str:
    """Check a host bridge or interface name fits Linux rules (IFNAMSIZ, no slashes)."""
    name = _str_value(value, field, what)
    if not HOST_DEVICE_PATTERN.fullmatch(name):
        raise InvalidRequestError(
            field,
            f"{what} {_describe(name)} is not a valid host interface name; use 1-15 letters, "
            "digits, '_', '.' or '-', starting with a letter or digit (for example 'br0')",
        )
    return name


def _validate_label(value: object, field: str) -> str:
    label = _str_value(value, field, "the label").strip()
    if not LABEL_PATTERN.fullmatch(label):
        raise InvalidRequestError(
            field,
            f"label {_describe(label)} is not valid; use 1-63 letters, digits, '_' or '-', "
            "starting with a letter or digit",
        )
    return label


# ---------------------------------------------------------------------------------------------
# Storage


def _disk(label: object, size: object, pool: object, field: str) -> DiskSpec:
    checked_label = _validate_label(label, field)
    size_gb = _int_value(size, field, f"the size of disk {checked_label!r} (GB)", 1, MAX_DISK_GB)
    checked_pool = None if pool is None else validate_name(pool, field)
    return DiskSpec(label=checked_label, size_gb=size_gb, pool=checked_pool)


def _storage_item(item: object, index: int, field: str) -> DiskSpec:
    if not isinstance(item, dict):
        raise InvalidRequestError(
            field, f"disk {index} must be an object with label, size-gb and pool"
        )
    unknown = sorted(str(k) for k in item if k not in _STORAGE_KEYS)
    if unknown:
        raise InvalidRequestError(
            field,
            f"disk {index} has unsupported keys {', '.join(unknown)}; "
            f"use only {', '.join(_STORAGE_KEYS)}",
        )
    if "size-gb" not in item:
        raise InvalidRequestError(field, f"disk {index} needs size-gb (whole GB)")
    label = item.get("label") or ("root" if index == 0 else f"disk{index}")
    return _disk(label, item["size-gb"], item.get("pool"), field)


def parse_storage(value: object, field: str = "storage") -> tuple[DiskSpec, ...]:
    """Parse disks in the structured form (the vm_host library's grammar reads MAAS strings).

    Args:
        value: a list of {"label", "size-gb", "pool"} objects (a missing label becomes "root"
            for the first disk and "disk<N>" after it), or None/""/[] for no disks. A MAAS
            string ("root:20(ssd),data:100") is refused: the charm parses it with the
            library's parse_maas_storage first, so one grammar reads it on every path.
        field: the request field named in errors.

    Returns:
        The disks in order; the first is the root disk. () when none were asked for, so that
        build_spec adds the default root disk.
    """
    if value is None or value == "" or value == []:
        return ()
    if not isinstance(value, list):
        raise InvalidRequestError(
            field,
            "expected a list of disks such as [{'label': 'root', 'size-gb': 20}] (the vm_host "
            f"library's parse_maas_storage reads 'root:20,data:100'), got {_describe(value)}",
        )
    disks = [_storage_item(item, index, field) for index, item in enumerate(value)]
    if len(disks) > MAX_DISKS:
        raise InvalidRequestError(field, f"at most {MAX_DISKS} disks; got {len(disks)}")
    seen: set[str] = set()
    for disk in disks:
        if disk.label in seen:
            raise InvalidRequestError(
                field, f"disk label {disk.label!r} is used twice; give each disk its own label"
            )
        seen.add(disk.label)
    return tuple(disks)


def format_storage(disks: Iterable[DiskSpec]) -> str:
    """Write disks as a MAAS storage string.

    The vm_host library's parse_maas_storage reads it back into the structured form
    parse_storage takes, unchanged.
    """
    return ",".join(f"{d.label}:{d.size_gb}" + (f"({d.pool})" if d.pool else "") for d in disks)


# ---------------------------------------------------------------------------------------------
# Interfaces


def guest_interface_name(label: str) -> str:
    """Return the interface name the guest sees: numeric labels become ethN, as MAAS did."""
    return f"eth{int(label)}" if re.fullmatch(r"[0-9]+", label) else label


@dataclasses.dataclass
class _InterfaceDraft:
    label: str
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


def _unsupported_key_message(key: str) -> str:
    supported = ", ".join(SUPPORTED_INTERFACE_KEYS)
    if key in _MAAS_UNSUPPORTED_KEYS or key.startswith("not_"):
        return f"the MAAS key {key!r} is not supported by vm-host; supported keys: {supported}"
    return f"unknown key {key!r}; supported keys: {supported}"


def _set_once(draft: _InterfaceDraft, key: str, value: object, field: str) -> None:
    previous = draft.values.get(key)
    if previous is not None and previous != value:
        raise InvalidRequestError(
            field,
            f"interface {draft.label!r} gives {key} twice ({previous} and {value}); keep one",
        )
    draft.values[key] = value


def _space(raw: object, field: str, what: str) -> str:
    space = _str_value(raw, field, what).strip()
    if not SPACE_PATTERN.fullmatch(space):
        raise InvalidRequestError(
            field,
            f"{what} {_describe(space)} is not a valid space name; use lower-case letters, "
            "digits and single hyphens (for example 'oam' or 'storage-1')",
        )
    return space


def _subnet(raw: object, field: str, what: str) -> str:
    text = _str_value(raw, field, what).strip()
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
        except ValueError:
            hint = ""
        raise InvalidRequestError(
            field,
            f"{what} {_describe(text)} is not a subnet in CIDR form such as 10.0.5.0/24" + hint,
        ) from None
    if "/" not in text:
        raise InvalidRequestError(
            field, f"{what} {_describe(text)} needs a prefix length, e.g. 10.0.5.0/24"
        )
    return str(network)


def _vlan(raw: object, field: str, what: str) -> int:
    return _int_value(raw, field, what, 0, MAX_VLAN)


def _ip(raw: object, field: str, what: str) -> str:
    text = _str_value(raw, field, what).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InvalidRequestError(
            field, f"{what} {_describe(text)} is not an IPv4 or IPv6 address"
        ) from None


def _mode(raw: object, field: str, what: str) -> InterfaceMode:
    text = _str_value(raw, field, what).strip().lower()
    try:
        return InterfaceMode(text)
    except ValueError:
        choices = ", ".join(m.value for m in InterfaceMode)
        raise InvalidRequestError(
            field, f"{what} {_describe(text)} is not one of {choices}"
        ) from None


# Request key -> (canonical key, validator).
_INTERFACE_KEYS: dict[str, tuple[str, Any]] = {
    "space": ("space", _space),
    "subnet": ("subnet", _subnet),
    "subnet_cidr": ("subnet", _subnet),
    "vlan": ("vlan", _vlan),
    "vid": ("vlan", _vlan),
    "ip": ("ip", _ip),
    "mode": ("mode", _mode),
    "bridge": ("bridge", validate_host_device),
    "parent": ("parent", validate_host_device),
    "numa_strict": ("numa_strict", _bool_value),
}


def _apply_interface_key(draft: _InterfaceDraft, key: str, raw: object, field: str) -> None:
    """Validate one key=value of an interface and record it under its canonical key."""
    if key not in _INTERFACE_KEYS:
        raise InvalidRequestError(
            field, f"interface {draft.label!r}: " + _unsupported_key_message(key)
        )
    canonical, validator = _INTERFACE_KEYS[key]
    value = validator(raw, field, f"{key} of interface {draft.label!r}")
    _set_once(draft, canonical, value, field)


def _finish_interface(draft: _InterfaceDraft, field: str) -> InterfaceSpec:
    values = draft.values
    mode: InterfaceMode | None = values.get("mode")
    label = draft.label
    if values.get("bridge") and values.get("parent"):
        raise InvalidRequestError(
            field,
            f"interface {label!r} gives both bridge and parent; use bridge=<host bridge> for a "
            "bridged NIC or parent=<host interface> for macvtap/SR-IOV, not both",
        )
    if values.get("bridge") and mode not in (None, InterfaceMode.BRIDGE):
        raise InvalidRequestError(
            field,
            f"interface {label!r} has bridge= with mode={mode.value if mode else ''}; a bridge "
            "attachment is mode=bridge: drop the mode or use parent= instead",
        )
    if values.get("parent") and mode is InterfaceMode.BRIDGE:
        raise InvalidRequestError(
            field,
            f"interface {label!r} has parent= with mode=bridge; use bridge=<host bridge> for "
            "a bridged NIC, or mode=macvtap/sriov with parent=",
        )
    if values.get("numa_strict") and mode is not InterfaceMode.SRIOV:
        raise InvalidRequestError(
            field,
            f"interface {label!r}: numa_strict applies only to SR-IOV NICs; add "
            "mode=sriov or drop numa_strict",
        )
    subnet, ip = values.get("subnet"), values.get("ip")
    if subnet and ip and ipaddress.ip_address(ip) not in ipaddress.ip_network(subnet):
        raise InvalidRequestError(
            field, f"interface {label!r}: ip {ip} is not inside subnet {subnet}; fix one of them"
        )
    return InterfaceSpec(
        label=label,
        space=values.get("space"),
        subnet=subnet,
        vlan=values.get("vlan"),
        ip=ip,
        mode=mode,
        bridge=values.get("bridge"),
        parent=values.get("parent"),
        numa_strict=bool(values.get("numa_strict", False)),
    )


def _new_draft(raw_label: object, field: str) -> _InterfaceDraft:
    label = _validate_label(raw_label, field)
    name = guest_interface_name(label)
    if len(name) > IFNAMSIZ_CHARS:
        raise InvalidRequestError(
            field,
            f"interface label {label!r} is longer than the {IFNAMSIZ_CHARS} characters a "
            "Linux interface name may have; use a shorter label",
        )
    return _InterfaceDraft(label=label)


def _parse_interface_list(items: list[Any], field: str) -> list[InterfaceSpec]:
    specs: list[InterfaceSpec] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "label" not in item:
            raise InvalidRequestError(
                field,
                f"interface {index} must be an object with a label, e.g. {{'label': 'eth0'}}",
            )
        draft = _new_draft(item["label"], field)
        for raw_key, raw in item.items():
            key = str(raw_key).replace("-", "_").lower()
            if key == "label" or raw is None:
                continue
            _apply_interface_key(draft, key, raw, field)
        specs.append(_finish_interface(draft, field))
    return specs


def parse_interfaces(value: object, field: str = "interfaces") -> tuple[InterfaceSpec, ...]:
    """Parse NICs in the structured form (the vm_host library's grammar reads MAAS strings).

    Args:
        value: a list of objects with "label" and any of the keys (hyphens or underscores)
            space, subnet/subnet_cidr (CIDR), vlan/vid (0-4094), ip, mode
            (bridge|macvtap|sriov), bridge, parent, numa_strict, or None/""/[] for none; a
            label alone asks for a NIC on the default network. A MAAS string
            ("eth0:space=oam;data:vid=100") is refused: the charm parses it with the library's
            parse_maas_interfaces first, so one grammar reads it on every path.
        field: the request field named in errors.

    Returns:
        The interfaces in order, labels as given (see guest_interface_name()).
    """
    if value is None or value == "" or value == []:
        return ()
    if not isinstance(value, list):
        raise InvalidRequestError(
            field,
            "expected a list of interfaces such as [{'label': 'eth0', 'space': 'oam'}] (the "
            "vm_host library's parse_maas_interfaces reads 'eth0:space=oam;data:vid=100'), "
            f"got {_describe(value)}",
        )
    specs = _parse_interface_list(value, field)
    if len(specs) > MAX_INTERFACES:
        raise InvalidRequestError(field, f"at most {MAX_INTERFACES} interfaces; got {len(specs)}")
    seen: dict[str, str] = {}
    for spec in specs:
        name = guest_interface_name(spec.label)
        if name in seen:
            raise InvalidRequestError(
                field,
                f"interface labels {seen[name]!r} and {spec.label!r} both name guest interface "
                f"{name!r}; give each interface its own label",
            )
        seen[name] = spec.label
    return tuple(specs)


def format_interfaces(interfaces: Iterable[InterfaceSpec]) -> str:
    """Write interfaces as a MAAS string.

    The vm_host library's parse_maas_interfaces reads it back into the structured form
    parse_interfaces takes, unchanged.
    """
    entries: list[str] = []
    for spec in interfaces:
        pairs = [
            f"{key}={value}"
            for key, value in (
                ("space", spec.space),
                ("subnet", spec.subnet),
                ("vlan", spec.vlan),
                ("ip", spec.ip),
                ("mode", spec.mode.value if spec.mode else None),
                ("bridge", spec.bridge),
                ("parent", spec.parent),
                ("numa_strict", "true" if spec.numa_strict else None),
            )
            if value is not None
        ]
        entries.append(f"{spec.label}:{','.join(pairs)}")
    return ";".join(entries)


# ---------------------------------------------------------------------------------------------
# CPUs and memory


def _pinned_error(detail: str) -> InvalidRequestError:
    return InvalidRequestError(
        "pinned-cores",
        f"{detail}; give a count of dedicated host CPUs (for example 4, the host picks them) "
        "or a list of host CPU ids (for example '2,3,6-7')",
    )


def _pinned_list(ids: list[int]) -> tuple[int, tuple[int, ...]]:
    if len(ids) > MAX_CORES:
        raise _pinned_error(f"{len(ids)} CPUs is more than the {MAX_CORES} a VM may have")
    high = [i for i in ids if i > MAX_CPU_ID]
    if high:
        raise _pinned_error(f"CPU id {high[0]} is out of range 0-{MAX_CPU_ID}")
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise _pinned_error(f"CPU {duplicates[0]} is listed more than once")
    cpus = tuple(sorted(ids))
    return len(cpus), cpus


def _expand_cpu_items(text: str) -> list[int]:
    """Expand a cpu-list item by item, keeping duplicates so "2,2" can be refused."""
    ids: list[int] = []
    for item in text.split(","):
        try:
            ids.extend(parse_cpu_list(item))
        except ValueError as exc:
            raise _pinned_error(f"{_describe(text.strip())}: {exc}") from None
        if len(ids) > MAX_CORES:
            break  # _pinned_list refuses it; expanding further only costs memory
    return ids


def parse_pinned_cores(value: object) -> tuple[int, tuple[int, ...] | None]:
    """Parse `pinned-cores`: a count (the host picks the CPUs) or an explicit host CPU list.

    A string of digits alone is a count ("4"); a single explicit CPU is written as a list
    ([4]) or a range ("4-4"). None or "" means not pinned.

    Returns:
        (count, None) for a count, (count, sorted CPU ids) for a list, (0, None) when unpinned.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0, None
    if isinstance(value, bool):
        raise _pinned_error(f"{value!r} is not a count or a CPU list")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        count = int(value)
        if not 1 <= count <= MAX_CORES:
            raise _pinned_error(f"the count must be from 1 to {MAX_CORES}, got {count}")
        return count, None
    if isinstance(value, str):
        return _pinned_list(_expand_cpu_items(value))
    if isinstance(value, list):
        if not value:
            raise _pinned_error("the CPU list is empty")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise _pinned_error(f"{_describe(value)} must hold only CPU ids 0 or above")
        return _pinned_list(list(value))
    raise _pinned_error(f"{_describe(value)} is not a count or a CPU list")


def parse_hugepages(value: object) -> HugepageRequest | None:
    """Parse `hugepages`: "2M", "1G", "any" (case-insensitive), or a MAAS hugepages_backed bool.

    None, "", false and "false" mean no huge pages; true means any size the host has.
    """
    if value is None or value is False:
        return None
    if value is True:
        return HugepageRequest.ANY
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "false", "no"):
            return None
        if text in ("true", "yes"):
            return HugepageRequest.ANY
        for choice in HugepageRequest:
            if text == choice.value.lower():
                return choice
    raise InvalidRequestError(
        "hugepages",
        f"{_describe(value)} is not a huge page size; use 2M, 1G or any (or leave it empty "
        "for normal memory)",
    )


def _check_hugepage_memory(memory_mib: int, hugepages: HugepageRequest, cells: int) -> None:
    page_mib = 1024 if hugepages is HugepageRequest.P1G else 2
    unit = page_mib * cells
    if memory_mib % unit == 0:
        return
    lower = memory_mib - memory_mib % unit
    upper = lower + unit
    nearest = f"{lower} or {upper}" if lower >= MIN_MEMORY_MIB else f"{upper}"
    per = f" (a {page_mib} MiB page per guest cell, {cells} cells)" if cells > 1 else ""
    size = "any" if hugepages is HugepageRequest.ANY else hugepages.value
    raise InvalidRequestError(
        "memory",
        f"{memory_mib} MiB cannot be split into whole {page_mib} MiB huge pages for "
        f"hugepages={size}{per}: memory must be a multiple of {unit} MiB; use {nearest}",
    )


# ---------------------------------------------------------------------------------------------
# Image, user data, SSH keys


_STORE_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""An image alias or fingerprint of LXD's own image store (no '/', no ':')."""


def _validate_image(value: object) -> str | None:
    """An image name: `ubuntu@24.04` (or 24.04, noble), `local:NAME`, or an LXD store alias.

    Never a host path: a request that could name a file would have any readable file on the
    host (/etc/shadow, another tenant's disk) copied into its disk. Ubuntu names come back in
    their canonical form (`noble` -> `ubuntu@24.04`) so equal requests hash equally.
    """
    if value is None or value == "":
        return None
    image = _str_value(value, "image", "the image")
    if "/" in image or "\\" in image or image.startswith("~"):
        raise InvalidRequestError(
            "image",
            f"{_describe(image)} is a host path; vm-host never reads a file a request names: "
            "give an image name (ubuntu@24.04, 24.04 or noble), or local:NAME for a file the "
            "operator put in the charm's local-image-dir",
        )
    try:
        return images.parse_name(image).name
    except InvalidRequestError:
        if _STORE_ALIAS.fullmatch(image):
            return image
        raise


def _validate_user_data(value: object) -> str | None:
    if value is None or value == "":
        return None
    text = _str_value(value, "user-data", "user data")
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_USER_DATA_BYTES:
        raise InvalidRequestError(
            "user-data",
            f"user data is {size} bytes; the limit is {MAX_USER_DATA_BYTES} (64 KiB), move "
            "large content to a URL the guest fetches",
        )
    return userdata.check(text)


HOSTNAME_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_HOSTNAME_CHARS = 253


def validate_tags(value: object, field: str = "tags") -> tuple[str, ...]:
    """Check VM tags: a list, or one comma-separated string; each a MAAS-style tag name.

    Tags label a VM for its requester and operator (list-vms filters on them); they do not
    change the VM, so repeats are dropped and the order is kept.
    """
    if value is None or value == "":
        return ()
    items: list[object]
    if isinstance(value, str):
        items = [t.strip() for t in value.split(",") if t.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)  # pyright: ignore[reportUnknownArgumentType]
    else:
        raise InvalidRequestError(field, f"{_describe(value)} is not a list of tags")
    if len(items) > MAX_TAGS:
        raise InvalidRequestError(field, f"{len(items)} tags; give at most {MAX_TAGS}")
    tags: list[str] = []
    for item in items:
        if not isinstance(item, str) or not TAG_PATTERN.fullmatch(item):
            raise InvalidRequestError(
                field,
                f"{_describe(item)} is not a tag; use 1-64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit",
            )
        if item not in tags:
            tags.append(item)
    return tuple(tags)


def validate_hostname(value: object, field: str = "hostname") -> str:
    """Check a guest hostname: RFC 1123 labels of lower-case letters, digits and hyphens.

    A dotted name is an FQDN (the guest's hostname is its first label). Upper case is folded,
    as DNS does; a trailing dot is dropped.
    """
    text = _str_value(value, field, "the hostname").strip().lower().removesuffix(".")
    labels = text.split(".")
    if (
        not text
        or len(text) > MAX_HOSTNAME_CHARS
        or not all(HOSTNAME_LABEL.fullmatch(label) for label in labels)
    ):
        raise InvalidRequestError(
            field,
            f"{_describe(value)} is not a hostname: give dot-separated labels of 1-63 "
            f"letters, digits and hyphens (not at either end), {MAX_HOSTNAME_CHARS} "
            "characters at most, for example web-0 or web-0.example.com",
        )
    return text


def validate_ssh_public_key(value: object, field: str = "ssh-public-keys") -> str:
    """Check one OpenSSH public key line and return it normalised ("type base64 [comment]").

    The key is checked down to its wire format (sshkeys), so a truncated or pasted-in wrong
    key is caught here instead of at the guest's first login.
    """
    text = _str_value(value, field, "an SSH public key")
    key_type, blob, comment = sshkeys.parse_key_line(text, field)
    return " ".join(part for part in (key_type, blob, comment) if part)


def split_items(text: str) -> list[str]:
    """A list given as one string (compose-vm's keys and tags): one per line or comma-separated."""
    return [item.strip() for line in text.splitlines() for item in line.split(",") if item.strip()]


def _validate_ssh_keys(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items: list[object] = list(split_items(value))
    elif isinstance(value, list | tuple):
        items = list(value)  # type: ignore[arg-type]
    else:
        raise InvalidRequestError(
            "ssh-public-keys", f"expected a list of public key lines, got {_describe(value)}"
        )
    if len(items) > MAX_SSH_KEYS:
        raise InvalidRequestError(
            "ssh-public-keys", f"at most {MAX_SSH_KEYS} keys; got {len(items)}"
        )
    keys = [validate_ssh_public_key(item) for item in items]
    return tuple(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------------
# The entry point


def _check_numa(numa_nodes: int, vcpus: int, memory_mib: int) -> None:
    if numa_nodes > vcpus:
        raise InvalidRequestError(
            "numa-nodes",
            f"{numa_nodes} NUMA nodes need at least {numa_nodes} vCPUs (one per guest cell), "
            f"the VM has {vcpus}; lower numa-nodes or raise cores",
        )
    if memory_mib // numa_nodes < MIN_MEMORY_MIB:
        raise InvalidRequestError(
            "numa-nodes",
            f"{memory_mib} MiB over {numa_nodes} NUMA nodes leaves less than {MIN_MEMORY_MIB} "
            f"MiB per guest cell; lower numa-nodes or raise memory to at least "
            f"{MIN_MEMORY_MIB * numa_nodes} MiB",
        )


def disk_name(label: str) -> str:
    """Fold a disk label to name rules: lower-case, '_' as '-' (MAAS labels allowed both)."""
    return label.lower().replace("_", "-")


def volume_name(vm: str, label: str) -> str:
    """Return the storage volume name of a VM's disk, `<vm>-<label>`, on every backend.

    Volume names are file names in directory pools; this one rule is what the clash check
    below and both backends use.
    """
    return f"{vm}-{disk_name(label)}"


def _check_volume_names(name: str, disks: tuple[DiskSpec, ...]) -> None:
    """Refuse disks whose volume names (`<vm>-<label>` folded to name rules) would be bad.

    Backends name each volume after the VM and the disk label, lower-cased with '_' as '-'
    (volume names are file names); catching a clash or an overlong name here keeps compose from
    failing half-way.
    """
    seen: dict[str, str] = {}
    for disk in disks:
        folded = disk_name(disk.label)
        volume = volume_name(name, disk.label)
        if folded in seen:
            raise InvalidRequestError(
                "storage",
                f"disk labels {seen[folded]!r} and {disk.label!r} give the same volume name "
                f"{volume!r} (labels are lower-cased, '_' becomes '-'); rename one",
            )
        seen[folded] = disk.label
        if not NAME_PATTERN.fullmatch(volume):
            raise InvalidRequestError(
                "storage",
                f"disk {disk.label!r} of VM {name!r} gets volume name {volume!r}, which is not "
                "1-63 lower-case letters, digits and hyphens ending in a letter or digit; "
                "shorten the VM name or the label",
            )


def build_spec(
    *,
    name: object,
    cores: object = None,
    memory_mib: object,
    pinned_cores: object = None,
    numa_nodes: object = None,
    hugepages: object = None,
    storage: object = None,
    interfaces: object = None,
    image: object = None,
    user_data: object = None,
    ssh_public_keys: object = (),
    hostname: object = None,
    tags: object = None,
    pool: object = None,
    owner: str = "action",
    request_id: object = "",
    default_root_gb: int = 20,
    default_interface_bridge: str | None = None,
    default_image: str = "",
) -> VmSpec:
    """Validate one VM request and return its VmSpec.

    The single entry point for actions and relation requests. Values may be of any type (they
    may come from remote JSON); the only exception raised is InvalidRequestError, naming the
    request field ("name", "cores", "memory", "pinned-cores", "numa-nodes", "hugepages",
    "storage", "interfaces", "image", "user-data", "ssh-public-keys", "hostname", "tags",
    "pool", "id").

    Args:
        name: VM name, see validate_name.
        cores: vCPUs, 1-1024; defaults to the pinned count when pinned, else 1 (as MAAS did).
            When pinned it must equal the pinned count.
        memory_mib: memory in MiB, 64 to 2**24.
        pinned_cores: see parse_pinned_cores.
        numa_nodes: host NUMA nodes the VM may span, 1-64, default 1; each guest cell needs a
            vCPU and 64 MiB.
        hugepages: see parse_hugepages; memory must then split into whole pages per cell.
        storage: see parse_storage; none gives one root disk of default_root_gb.
        interfaces: see parse_interfaces; none gives one "eth0" on default_interface_bridge
            when that is set, else no NIC.
        image: an image name (see _validate_image), or None to boot from the network.
        user_data: cloud-init user data, at most 64 KiB.
        ssh_public_keys: OpenSSH public key lines (a list, or one string with the keys one per
            line or comma-separated).
        hostname: the guest's hostname (see validate_hostname); None means the VM's name.
        tags: labels for the VM (see validate_tags); recorded with it, not part of its hash.
        pool: the resource pool it names (see vmhost.pools), None for none; recorded with
            it, not part of its hash. Whether the pool exists is the caller's check.
        owner: "action" or "relation:<id>:<app>"; set by the charm, not the requester.
        request_id: the relation request id ("" for actions).
        default_root_gb: root disk size when no storage is requested (charm config).
        default_interface_bridge: host bridge of the default NIC (charm config).
        default_image: the image of a request that names none (charm config default-image;
            "" boots it from the network).
    """
    checked_name = validate_name(name)
    checked_id = validate_request_id(request_id) if request_id not in ("", None) else ""
    memory = _int_value(memory_mib, "memory", "memory (MiB)", MIN_MEMORY_MIB, MAX_MEMORY_MIB)

    pinned_count, pinned_cpus = parse_pinned_cores(pinned_cores)
    if cores is None or cores == "":
        vcpus = pinned_count or 1
    else:
        vcpus = _int_value(cores, "cores", "cores", 1, MAX_CORES)
        if pinned_count and vcpus != pinned_count:
            raise InvalidRequestError(
                "cores",
                f"cores is {vcpus} but pinned-cores gives {pinned_count} host CPUs; every vCPU "
                "of a pinned VM gets a host CPU of its own, so make them equal or leave cores "
                "out",
            )

    cells = (
        1
        if numa_nodes is None or numa_nodes == ""
        else _int_value(numa_nodes, "numa-nodes", "numa-nodes", 1, MAX_NUMA_NODES)
    )
    _check_numa(cells, vcpus, memory)

    page_request = parse_hugepages(hugepages)
    if page_request is not None:
        _check_hugepage_memory(memory, page_request, cells)

    disks = parse_storage(storage)
    if not disks:
        disks = (DiskSpec(label="root", size_gb=default_root_gb),)
    _check_volume_names(checked_name, disks)

    chosen_image = _validate_image(image)
    nics = parse_interfaces(interfaces)
    if not nics and default_interface_bridge:
        bridge = validate_host_device(default_interface_bridge, "interfaces", "default bridge")
        nics = (InterfaceSpec(label="eth0", bridge=bridge, mode=InterfaceMode.BRIDGE),)

    checked_user_data = _validate_user_data(user_data)
    checked_hostname = None if hostname in (None, "") else validate_hostname(hostname)
    if (
        checked_hostname
        and checked_user_data
        and userdata.sets_hostname(userdata.parts(checked_user_data))
    ):
        raise InvalidRequestError(
            "hostname",
            "the user-data sets hostname or fqdn too; give the hostname in one place",
        )

    return VmSpec(
        name=checked_name,
        vcpus=vcpus,
        memory_mib=memory,
        pinned_count=pinned_count,
        pinned_cpus=pinned_cpus,
        numa_nodes=cells,
        hugepages=page_request,
        disks=disks,
        interfaces=nics,
        image=chosen_image or _validate_image(default_image),
        image_from_default=chosen_image is None and bool(default_image),
        user_data=checked_user_data,
        ssh_public_keys=_validate_ssh_keys(ssh_public_keys),
        hostname=checked_hostname,
        tags=validate_tags(tags),
        pool="" if pool in (None, "") else pools.validate_pool_name(pool),
        owner=owner,
        request_id=checked_id,
    )


def _canonical(value: object) -> object:
    """Turn records into JSON values, leaving out fields still at their default.

    Leaving defaults out keeps hashes of existing VMs stable when a field with a default is
    added to a record later (a new field would otherwise make every relation request look
    changed after a charm upgrade).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, object] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            default = f.default
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if default is not dataclasses.MISSING and item == default:
                continue
            out[f.name] = _canonical(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_canonical(v) for v in value]  # type: ignore[misc]
    return value


def spec_hash(spec: VmSpec) -> str:
    """Return a stable 16-hex-digit digest of what defines the VM.

    The owner, request id, tags and pool are left out: they say who asked, how they label it
    and whose quota it counts against, not what the VM is, so a request is "changed" only
    when the VM it describes changes.
    """
    if spec.image_from_default:
        spec = dataclasses.replace(spec, image=None, image_from_default=False)
    data = _canonical(dataclasses.replace(spec, owner="action", request_id="", tags=(), pool=""))
    encoded = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]

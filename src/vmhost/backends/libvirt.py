"""libvirt/KVM backend: host topology, VM composition and the hypervisor-side ledger.

The hypervisor is the ledger: every domain vm-host defines carries a `<metadata>` element in
vm-host's own XML namespace (owner, request id, spec hash, placement, the volumes it created),
and `list_vms` rebuilds every allocation from it. Domains without that element are reported as
unmanaged, with the resources their XML pins, so the allocator never hands those out again.

Disks are qcow2 volumes in libvirt storage pools. Images are cached once per host as base
volumes of the `vm-host-images` pool (vmhost.imagecache fills it; a request names an image,
never a path); a root disk from an image is a qcow2 overlay on its base (`<backingStore>`) of
the requested size, so composing copies nothing. Cloud-init gets a NoCloud
seed ISO built with genisoimage and uploaded the same way.

SR-IOV NICs pass one VF of the requested PF through (`<interface type='hostdev'>`). The VF is
the lowest-index one (sysfs `virtfn<N>`) that no defined domain passes through, chosen before
anything is created; the ledger records it as "<pf>/vf<N> (<PCI address>)".

Every XML document (domain, pool, volume) comes from templates/ with autoescape on, and every
name is validated before it reaches libvirt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import libvirt
import yaml

from vmhost import cloudinit, imagecache, images, intents
from vmhost.backends import BackendUnavailableError, stable_mac
from vmhost.constraints import (
    spec_hash,
    validate_host_device,
    validate_name,
    volume_name,
)
from vmhost.model import (
    AttachmentKind,
    CellPlacement,
    HostTopology,
    InvalidRequestError,
    NicAttachment,
    Placement,
    StoragePool,
    VfAssignment,
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
    parse_capabilities,
    parse_cpu_list,
    read_free_hugepages,
    read_total_hugepages,
)

logger = logging.getLogger(__name__)

METADATA_NS = "https://charmhub.io/vm-host/metadata/1"
METADATA_PREFIX = "vmhost"
TEMPLATES_DIR = Path(__file__).resolve().parents[3] / "templates"
"""templates/ at the top of the repository (the charm's dump part stages it there too)."""

GENISOIMAGE = "/usr/bin/genisoimage"
QEMU_IMG = "/usr/bin/qemu-img"
MAC_PREFIX = "52:54:00"
SEED_LABEL = "seed"
"""Volume `<vm>-seed` holds the cloud-init NoCloud seed."""
GB = 10**9
STOP_TIMEOUT_S = 30.0
AGENT_TIMEOUT_S = 2
"""Seconds a guest agent may take to list its addresses."""

_NS = {"v": METADATA_NS}
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit tested without libvirt)


@dataclasses.dataclass(frozen=True)
class Volume:
    """A volume vm-host created for a VM."""

    pool: str
    name: str
    path: str = ""
    format: str = "qcow2"

    @property
    def ref(self) -> str:
        """Return "pool/volume", the form VmRecord.volumes uses."""
        return f"{self.pool}/{self.name}"


def generate_mac(vm: str, label: str) -> str:
    """Return a stable MAC in QEMU's 52:54:00 range for a VM's NIC (see backends.stable_mac)."""
    return stable_mac(MAC_PREFIX, vm, label)


VIRT_TYPES = ("auto", "kvm", "qemu")
CONSOLE_LOG_DIR = "/var/log/vm-host/console"
"""Each VM's serial console is logged (by virtlogd: 0600, rotated) to <dir>/<name>.log."""


def resolve_virt_type(
    virt_type: str, dev_kvm: Path = Path("/dev/kvm"), flags: frozenset[str] | None = None
) -> str:
    """Return "kvm" or "qemu" (TCG) for config `virt-type`.

    "auto" is kvm only where /dev/kvm exists and the CPU offers hardware virtualisation (vmx or
    svm): a /dev/kvm without them (PVM, some nested hosts) starts domains that boot nothing.
    """
    if virt_type not in VIRT_TYPES:
        raise InvalidRequestError("virt-type", f"{virt_type!r} is not one of {VIRT_TYPES}")
    if virt_type != "auto":
        return virt_type
    flags = host_cpu_flags() if flags is None else flags
    return "kvm" if dev_kvm.exists() and flags & {"vmx", "svm"} else "qemu"


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """Return the CPU flags the host kernel reports (empty when it does not say)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def disabled_cpu_features(arch: str, flags: frozenset[str]) -> list[str]:
    """Return guest CPU features to hide although host-passthrough would offer them.

    KVM advertises the IA32_ARCH_CAPABILITIES MSR even where the hardware has none (AMD hosts,
    nested hosts), and QEMU then aborts at start ("failed to set MSR 0x10a"). Hiding it only
    where the host kernel does not list `arch_capabilities` keeps it on hosts that have it.
    """
    if arch == "x86_64" and "arch_capabilities" not in flags:
        return ["arch-capabilities"]
    return []


def _machine(arch: str) -> str:
    return "virt" if arch == "aarch64" else "q35"


def domain_context(
    spec: VmSpec,
    placement: Placement,
    nics: Sequence[NicAttachment],
    disks: Sequence[Volume],
    seed: Volume | None,
    *,
    uuid: str,
    domain_type: str = "kvm",
    arch: str = "x86_64",
    cpu_disabled_features: Sequence[str] = (),
    vfs: Mapping[str, VirtualFunction] | None = None,
    console_log: str | None = None,
) -> dict[str, Any]:
    """Build the template context of a domain from a spec, its placement and its devices.

    Guest NUMA cells mirror the host nodes of the placement one to one (cell i runs on
    placement.cells[i].host_node), so the guest kernel sees the real locality. The guest CPU
    topology is one socket of `vcpus` single-thread cores: always valid for any cell split.

    Args:
        spec: the validated request.
        placement: where its resources come from.
        nics: resolved NICs, each with its MAC set.
        disks: the VM's disk volumes, root first.
        seed: the cloud-init seed volume, if any.
        uuid: the domain UUID.
        domain_type: "kvm", or "qemu" (TCG: the guest CPU is QEMU's `maximum` model, since
            TCG cannot pass the host CPU through).
        arch: guest architecture (the host's).
        cpu_disabled_features: CPU features to hide from the guest (disabled_cpu_features()).
        vfs: NIC label -> the VF each SR-IOV (hostdev) NIC passes through (choose_vfs()).
        console_log: the host file the serial console is logged to, if any.
    """
    cells = []
    vcpupins = []
    memnodes = []
    vcpu = 0
    for i, cell in enumerate(placement.cells):
        first = vcpu
        for cpu in cell.cpus:
            vcpupins.append({"vcpu": vcpu, "cpuset": str(cpu)})
            vcpu += 1
        if not cell.cpus:
            vcpu += cell.vcpus
        ids = range(first, first + cell.vcpus)
        cells.append({"id": i, "cpus": format_cpu_list(ids), "memory_mib": cell.memory_mib})
        memnodes.append({"cellid": i, "nodeset": str(cell.host_node)})
    hugepage_cells = [i for i, c in enumerate(placement.cells) if c.hugepages]
    hugepages = None
    if hugepage_cells:
        sizes = {placement.cells[i].hugepage_size_kib for i in hugepage_cells}
        if len(sizes) != 1 or None in sizes:
            raise VmHostError(f"placement of {spec.name}: hugepage cells need one page size")
        hugepages = {"size_kib": sizes.pop(), "nodeset": format_cpu_list(hugepage_cells)}
    numatune = None
    if placement.cells:
        numatune = {
            "nodeset": format_cpu_list(placement.host_nodes),
            "memnodes": memnodes,
        }
    interfaces = [_interface_context(nic, vfs or {}) for nic in nics]
    volumes = [*disks, *([seed] if seed else [])]
    metadata = {
        "owner": spec.owner,
        "request_id": spec.request_id,
        "spec_hash": spec_hash(spec),
        "tags": list(spec.tags),
        "pool": spec.pool,
        "vcpus": placement.vcpus,
        "memory_mib": placement.memory_mib,
        "emulator_cpus": ",".join(str(c) for c in placement.emulator_cpus),
        "cells": [
            {
                "host_node": c.host_node,
                "vcpus": c.vcpus,
                "memory_mib": c.memory_mib,
                # vCPU order matters, so this is a plain list, not a compact range.
                "cpus": ",".join(str(cpu) for cpu in c.cpus),
                "hugepage_size_kib": c.hugepage_size_kib or 0,
                "hugepages": c.hugepages,
            }
            for c in placement.cells
        ],
        "vfs": [{"nic": nic, "count": count} for nic, count in _vf_counts(placement, nics)],
        "volumes": [{"pool": v.pool, "name": v.name} for v in volumes],
        "interfaces": interfaces,
    }
    seed_ctx = None
    if seed is not None:
        bus = "scsi" if arch == "aarch64" else "sata"
        seed_ctx = {"path": seed.path, "target": "sda", "bus": bus}
    return {
        "domain_type": domain_type,
        "name": spec.name,
        "uuid": uuid,
        "title": f"vm-host VM {spec.name} for {spec.owner}",
        "metadata_ns": METADATA_NS,
        "metadata": metadata,
        "memory_kib": placement.memory_mib * 1024,
        "hugepages": hugepages,
        "vcpus": placement.vcpus,
        "vcpupins": vcpupins,
        "emulatorpin": format_cpu_list(placement.emulator_cpus)
        if placement.emulator_cpus
        else None,
        "numatune": numatune,
        "arch": arch,
        "machine": _machine(arch),
        "boot": ["hd"] if spec.image else ["network", "hd"],
        "topology": {"sockets": 1, "cores": placement.vcpus, "threads": 1},
        "cpu_mode": "maximum" if domain_type == "qemu" else "host-passthrough",
        "cpu_disabled_features": list(cpu_disabled_features) if domain_type == "kvm" else [],
        "console_log": console_log,
        "cells": cells,
        "disks": [
            {
                "path": d.path,
                "format": d.format,
                "target": f"vd{chr(ord('a') + i)}",
                "serial": d.name[-20:],
            }
            for i, d in enumerate(disks)
        ],
        "seed": seed_ctx,
        "interfaces": interfaces,
    }


def _interface_context(nic: NicAttachment, vfs: Mapping[str, VirtualFunction]) -> dict[str, Any]:
    """Return one NIC's template context; an SR-IOV NIC carries its VF's PCI address."""
    item: dict[str, Any] = {
        "kind": nic.kind.value,
        "source": nic.source,
        "mac": nic.mac,
        "label": nic.label,
        "ip": nic.ip or "",
        "space": nic.space or "",
        "subnet": nic.subnet or "",
    }
    if nic.kind == AttachmentKind.HOSTDEV:
        vf = vfs.get(nic.label)
        if vf is None or vf.pf != nic.source:
            raise VmHostError(
                f"interface {nic.label}: no VF of {nic.source} was chosen for this SR-IOV NIC "
                "(choose_vfs gives each one its VF)"
            )
        item |= {
            "source": vf.description,
            "address": pci_address_attrs(vf.address),
            "vlan": nic.vlan,
        }
    return item


def _vf_counts(placement: Placement, nics: Sequence[NicAttachment]) -> list[tuple[str, int]]:
    """Return the VFs per PF the ledger records: the placement's, and at least the NICs'.

    The placement engine counts the VFs a request takes; the hostdev NICs are what the domain
    really holds, so a placement that counted fewer never lets the ledger undercount.
    """
    counts = {vf.nic: vf.count for vf in placement.vfs}
    held: dict[str, int] = {}
    for nic in nics:
        if nic.kind == AttachmentKind.HOSTDEV:
            held[nic.source] = held.get(nic.source, 0) + 1
    for pf, count in held.items():
        counts[pf] = max(counts.get(pf, 0), count)
    return list(counts.items())


@functools.lru_cache(maxsize=4)
def _environment(templates_dir: Path) -> jinja2.Environment:
    """One environment per templates directory: each template is compiled once per process."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir)),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("xml", "xml.j2", "j2"), default_for_string=True, default=True
        ),
        undefined=jinja2.StrictUndefined,
    )


def render_template(templates_dir: Path, name: str, context: Mapping[str, Any]) -> str:
    """Render one XML template with autoescape on (names and metadata are escaped)."""
    return _environment(templates_dir).get_template(name).render(**context)


# ---------------------------------------------------------------------------------------------
# SR-IOV VFs (pure: sysfs paths and domain XML strings in, addresses out)

_PCI_RE = re.compile(r"^([0-9a-f]{4,8}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
_VIRTFN_RE = re.compile(r"^virtfn(\d+)$")


def pci_address_attrs(address: str) -> dict[str, str]:
    """Split "0000:3b:02.1" into the hex attributes libvirt's `<address type='pci'>` takes.

    Raises:
        VmHostError: the text is not a PCI address in domain:bus:slot.function form.
    """
    match = _PCI_RE.match(address.lower())
    if match is None:
        raise VmHostError(f"{address!r} is not a PCI address (domain:bus:slot.function)")
    domain, bus, slot, function = match.groups()
    return {
        "domain": f"0x{domain}",
        "bus": f"0x{bus}",
        "slot": f"0x{slot}",
        "function": f"0x{function}",
    }


def _pci_from_element(address: ET.Element) -> str | None:
    """Return "dddd:bb:ss.f" from a libvirt `<address>` element, None when it is no PCI one."""
    if address.get("type", "pci") != "pci":
        return None
    try:
        domain, bus, slot, function = (
            int(address.get(key, "0"), 0) for key in ("domain", "bus", "slot", "function")
        )
    except ValueError:
        return None
    return f"{domain:04x}:{bus:02x}:{slot:02x}.{function:x}"


@dataclasses.dataclass(frozen=True)
class VirtualFunction:
    """One SR-IOV VF of a PF: its index under the PF and its PCI address."""

    pf: str
    index: int
    address: str
    """domain:bus:slot.function, for example "0000:3b:02.1"."""

    @property
    def description(self) -> str:
        """Return how the VF is shown as a NIC's attached-to: "enp59s0f0/vf3 (0000:3b:02.1)"."""
        return f"{self.pf}/vf{self.index} ({self.address})"


def virtual_functions(sysfs_root: str | Path, pf: str) -> list[VirtualFunction]:
    """Return a PF's VFs in VF index order (virtfn0, virtfn1, ...).

    The kernel names each VF by a `virtfn<N>` symlink in the PF's device directory pointing at
    the VF's PCI device directory, whose name is its address. A NIC without VFs (or without
    a PCI device) has none.
    """
    device = Path(sysfs_root) / "class" / "net" / pf / "device"
    found: list[VirtualFunction] = []
    try:
        entries = list(device.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _VIRTFN_RE.match(entry.name)
        if match is None:
            continue
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        address = Path(target).name.lower()
        if _PCI_RE.match(address):
            found.append(VirtualFunction(pf, int(match.group(1)), address))
    return sorted(found, key=lambda vf: vf.index)


def list_vfs(sysfs_root: str | Path, pf: str) -> list[str]:
    """Return the PCI addresses of a PF's VFs in VF index order."""
    return [vf.address for vf in virtual_functions(sysfs_root, pf)]


def vf_parent(sysfs_root: str | Path, address: str) -> str | None:
    """Return the network interface name of the PF a VF belongs to, None when unknown.

    The VF's PCI device has a `physfn` link to its PF's device, and the PF's interface name is
    the entry under that device's `net/`. A VF of a PF without a network interface (or a PCI
    device that is no VF) has no PF name.
    """
    net = Path(sysfs_root) / "bus" / "pci" / "devices" / address / "physfn" / "net"
    try:
        names = sorted(p.name for p in net.iterdir())
    except OSError:
        return None
    return names[0] if names else None


def hostdev_addresses(xml: str) -> set[str]:
    """Return the host PCI addresses a domain's XML passes through.

    Both forms count: `<hostdev type='pci'>` and `<interface type='hostdev'>`. Only the
    `<source>` address is the host device; the `<address>` directly under a device is where
    it sits inside the guest.
    """
    return _hostdev_addresses(ET.fromstring(xml))  # noqa: S314 - libvirtd's own output or ours


def _hostdev_addresses(root: ET.Element) -> set[str]:
    found: set[str] = set()
    devices = [
        *root.findall("devices/hostdev"),
        *(i for i in root.findall("devices/interface") if i.get("type") == "hostdev"),
    ]
    for device in devices:
        if device.tag == "hostdev" and device.get("type", "pci") != "pci":
            continue  # USB, SCSI and mediated devices are not VFs
        address = device.find("source/address")
        if address is not None and (pci := _pci_from_element(address)) is not None:
            found.add(pci)
    return found


def choose_vfs(
    sysfs_root: str | Path,
    nics: Sequence[NicAttachment],
    domain_xmls: Sequence[str],
) -> dict[str, VirtualFunction]:
    """Give each hostdev NIC the lowest-index VF of its PF that no domain uses.

    A VF counts as used when any defined domain (running or not, vm-host's or not) passes it
    through, so a VF reserved by a stopped VM is never handed out twice. Several NICs of one
    request on the same PF get different VFs.

    Args:
        sysfs_root: where sysfs is mounted; a fake tree in tests.
        nics: the request's NICs; only those of kind HOSTDEV get a VF.
        domain_xmls: the XML of every existing domain.

    Returns:
        NIC label -> its VF.

    Raises:
        VmHostError: a PF has no free VF (naming the PF and how many VFs it has).
    """
    used: set[str] = set()
    for xml in domain_xmls:
        used |= hostdev_addresses(xml)
    chosen: dict[str, VirtualFunction] = {}
    for nic in nics:
        if nic.kind != AttachmentKind.HOSTDEV:
            continue
        vfs = virtual_functions(sysfs_root, nic.source)
        free = [vf for vf in vfs if vf.address not in used]
        if not free:
            if not vfs:
                raise VmHostError(
                    f"interface {nic.label}: {nic.source} has no SR-IOV VFs enabled; enable "
                    f"VFs on it (sriov_numvfs) or use another network mode"
                )
            raise VmHostError(
                f"interface {nic.label}: all {len(vfs)} SR-IOV VFs of {nic.source} are in use "
                "by other domains; enable more VFs or free one"
            )
        chosen[nic.label] = free[0]
        used.add(free[0].address)
    return chosen


def known_vfs(sysfs_root: str | Path, addresses: set[str]) -> dict[str, VirtualFunction]:
    """Map PCI addresses that are VFs of a PF with a network interface to those VFs.

    Used for domains vm-host did not create: their passed-through VFs count against the PF
    (Placement.vfs) only when sysfs says which PF that is (`physfn`). Other addresses (plain
    PCI devices, VFs of PFs without an interface) are left out.
    """
    found: dict[str, VirtualFunction] = {}
    by_pf: dict[str, list[VirtualFunction]] = {}
    for address in sorted(addresses):
        pf = vf_parent(sysfs_root, address)
        if pf is None:
            continue
        if pf not in by_pf:
            by_pf[pf] = virtual_functions(sysfs_root, pf)
        for vf in by_pf[pf]:
            if vf.address == address:
                found[address] = vf
    return found


# ---------------------------------------------------------------------------------------------
# Reading domains back


_PAUSED_WHY = {
    libvirt.VIR_DOMAIN_PAUSED_UNKNOWN: "paused for an unknown reason",
    libvirt.VIR_DOMAIN_PAUSED_USER: "paused by a user (virsh suspend); run virsh resume",
    libvirt.VIR_DOMAIN_PAUSED_IOERROR: (
        "paused on a disk I/O error (often a full storage pool); free space, then virsh resume"
    ),
    libvirt.VIR_DOMAIN_PAUSED_WATCHDOG: "paused by its watchdog",
    libvirt.VIR_DOMAIN_PAUSED_CRASHED: "paused after a guest crash",
    libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: "paused after a failed migration",
    14: "paused after a hypervisor error",  # VIR_DOMAIN_PAUSED_API_ERROR, libvirt >= 8.6
}
"""Paused states that last until someone acts; the others (migration, snapshot, start-up)
pass by themselves and still count as running."""


def _state(code: int, reason: int = 0) -> tuple[VmState, str]:
    """The requester-facing state of a domain, and why it is failed (empty otherwise)."""
    if code == libvirt.VIR_DOMAIN_PAUSED:
        why = _PAUSED_WHY.get(reason)
        return (VmState.FAILED, why) if why else (VmState.RUNNING, "")
    if code in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return VmState.RUNNING, ""
    if code == libvirt.VIR_DOMAIN_CRASHED:
        return VmState.FAILED, "crashed"
    if code == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return VmState.FAILED, "crashed (its QEMU process died)"
    if code == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_FAILED:
        return VmState.FAILED, "failed to start"
    if code in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTDOWN):
        return VmState.STOPPED, ""
    return VmState.PENDING, ""


def _domain_state(dom: libvirt.virDomain) -> tuple[VmState, str]:
    code, reason = dom.state()[:2]
    return _state(int(code), int(reason))


def stats_from_record(name: str, record: Mapping[str, Any]) -> VmStats:
    """Turn one getAllDomainStats record into VmStats (fields a domain lacks count as 0)."""

    def total(kind: str, field: str) -> int:
        return sum(
            int(record.get(f"{kind}.{i}.{field}", 0))
            for i in range(int(record.get(f"{kind}.count", 0)))
        )

    return VmStats(
        name=name,
        cpu_seconds=int(record.get("cpu.time", 0)) / 1e9,
        memory_used_bytes=int(record.get("balloon.rss", 0)) * 1024,
        block_read_bytes=total("block", "rd.bytes"),
        block_write_bytes=total("block", "wr.bytes"),
        net_rx_bytes=total("net", "rx.bytes"),
        net_tx_bytes=total("net", "tx.bytes"),
        paused=int(record.get("state.state", 0)) == libvirt.VIR_DOMAIN_PAUSED,
    )


def _ints(text: str | None) -> tuple[int, ...]:
    """Parse a plain comma list in its own order ("3,2" stays (3, 2))."""
    return tuple(int(x) for x in (text or "").split(",") if x.strip())


def _to_mib(element: ET.Element | None) -> int:
    if element is None or not (element.text or "").strip():
        return 0
    value = int((element.text or "0").strip())
    unit = (element.get("unit") or "KiB").lower()
    factor_kib = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "m": 1024, "mib": 1024}
    factor_kib |= {"g": 1024**2, "gib": 1024**2, "kb": 1000 / 1024, "mb": 1000**2 / 1024}
    return int(value * factor_kib.get(unit, 1) // 1024)


def _page_kib(page: ET.Element) -> int:
    size = int(page.get("size", "0"))
    unit = (page.get("unit") or "KiB").lower()
    return size * {"kib": 1, "k": 1, "mib": 1024, "m": 1024, "gib": 1024**2, "g": 1024**2}.get(
        unit, 1
    )


def parse_metadata(vm: ET.Element) -> tuple[Placement, dict[str, Any]]:
    """Rebuild a placement and the ledger fields from vm-host's metadata element."""
    p = vm.find("v:placement", _NS)
    if p is None:
        raise ValueError("vm-host metadata without placement")
    cells = []
    for c in p.findall("v:cell", _NS):
        size = int(c.get("hugepage-size-kib", "0"))
        cells.append(
            CellPlacement(
                host_node=int(c.get("host-node", "0")),
                vcpus=int(c.get("vcpus", "0")),
                memory_mib=int(c.get("memory-mib", "0")),
                cpus=_ints(c.get("cpus")),
                hugepage_size_kib=size or None,
                hugepages=int(c.get("hugepages", "0")),
            )
        )
    placement = Placement(
        vcpus=int(p.get("vcpus", "0")),
        memory_mib=int(p.get("memory-mib", "0")),
        cells=tuple(cells),
        emulator_cpus=_ints(p.get("emulator-cpus")),
        vfs=tuple(
            VfAssignment(nic=vf.get("nic", ""), count=int(vf.get("count", "1")))
            for vf in p.findall("v:vf", _NS)
        ),
    )
    fields = {
        "owner": (vm.findtext("v:owner", "", _NS) or "").strip(),
        "request_id": (vm.findtext("v:request-id", "", _NS) or "").strip(),
        "spec_hash": (vm.findtext("v:spec-hash", "", _NS) or "").strip(),
        "tags": tuple((t.text or "").strip() for t in vm.findall("v:tag", _NS) if t.text),
        "pool": (vm.findtext("v:pool", "", _NS) or "").strip(),
        "volumes": tuple(f"{v.get('pool')}/{v.get('name')}" for v in vm.findall("v:volume", _NS)),
        "interfaces": tuple(
            {
                "label": i.get("label", ""),
                "mac": i.get("mac", ""),
                "attached-to": i.get("attached-to", ""),
                **{k: i.get(k, "") for k in ("ip", "space", "subnet") if i.get(k)},
            }
            for i in vm.findall("v:interface", _NS)
        ),
    }
    return placement, fields


def copy_problem(vm: ET.Element, domain_uuid: str) -> str:
    """Why a domain carrying vm-host metadata is not the domain vm-host composed, or "".

    vm-host writes the UUID of the domain it defines into the metadata. virt-clone, and a
    dumpxml + define under another name, copy `<metadata>` but get a new UUID: such a copy
    (or metadata written by hand without the UUID) is never treated as vm-host's, so deleting
    it can never take the original's disks.
    """
    recorded = (vm.findtext("v:domain-uuid", "", _NS) or "").strip().lower()
    if not recorded:
        return (
            "its vm-host metadata names no domain UUID (written by hand, not by vm-host), so "
            "vm-host leaves it be"
        )
    if recorded != domain_uuid.strip().lower():
        return (
            f"its vm-host metadata belongs to domain {recorded}: it is a copy (virt-clone or "
            "dumpxml + define keep the metadata), so vm-host leaves it be"
        )
    return ""


def disk_sources(root: ET.Element) -> set[str]:
    """Return what a domain's disks point at: file or device paths, and "pool/volume" refs."""
    found: set[str] = set()
    for source in root.findall("devices/disk/source"):
        for attr in ("file", "dev"):
            if source.get(attr):
                found.add(os.path.normpath(source.get(attr, "")))
        if source.get("pool") and source.get("volume"):
            found.add(f"{source.get('pool')}/{source.get('volume')}")
    return found


def placement_from_domain_xml(
    root: ET.Element,
    topology: HostTopology | None,
    vfs: Mapping[str, VirtualFunction] | None = None,
) -> Placement:
    """Reconstruct what a domain vm-host did not create takes from the host.

    vCPUs pinned one-to-one to single host CPUs count as pinned; anything looser floats over
    the shared pool. Guest NUMA cells map to host nodes through `<memnode>`; without them the
    whole domain is one cell on the `<numatune>` node, or on the node of its pinned CPUs.
    Passed-through PCI devices found in `vfs` (PCI address -> VF, see known_vfs()) count as
    VFs taken from their PF.
    """
    taken = _foreign_vfs(root, vfs or {})
    vcpus = int((root.findtext("vcpu") or "1").strip())
    memory_mib = _to_mib(root.find("currentMemory")) or _to_mib(root.find("memory"))
    pins: dict[int, tuple[int, ...]] = {}
    for pin in root.findall("cputune/vcpupin"):
        with contextlib.suppress(ValueError):
            pins[int(pin.get("vcpu", "-1"))] = parse_cpu_list(pin.get("cpuset", ""))
    pinned = len(pins) == vcpus and all(len(cpus) == 1 for cpus in pins.values())
    emulator: tuple[int, ...] = ()
    emulatorpin = root.find("cputune/emulatorpin")
    if emulatorpin is not None:
        with contextlib.suppress(ValueError):
            emulator = parse_cpu_list(emulatorpin.get("cpuset", ""))
    page = root.find("memoryBacking/hugepages/page")
    page_kib = _page_kib(page) if page is not None else None
    if page_kib is None and root.find("memoryBacking/hugepages") is not None:
        page_kib = 2048  # libvirt's default: the host's default huge page size
    memnodes = {
        int(m.get("cellid", "0")): parse_cpu_list(m.get("nodeset", "0"))[0]
        for m in root.findall("numatune/memnode")
    }
    numa_nodeset = root.find("numatune/memory")
    default_node: int | None = None
    if numa_nodeset is not None and numa_nodeset.get("nodeset"):
        default_node = parse_cpu_list(numa_nodeset.get("nodeset", "0"))[0]
    if default_node is None and pinned and topology is not None:
        default_node = topology.node_of_cpu(pins[0][0])
    if not pinned and page_kib is None and default_node is None:
        return Placement(vcpus=vcpus, memory_mib=memory_mib, vfs=taken)

    guest_cells = root.findall("cpu/numa/cell")
    specs: list[tuple[int, tuple[int, ...], int]] = []  # host node, vcpu ids, memory MiB
    if guest_cells:
        for cell in guest_cells:
            cell_id = int(cell.get("id", "0"))
            ids = parse_cpu_list(cell.get("cpus", "0"))
            node = memnodes.get(cell_id, default_node if default_node is not None else 0)
            specs.append((node, ids, _to_mib(_as_memory(cell))))
    else:
        node = default_node if default_node is not None else 0
        specs.append((node, tuple(range(vcpus)), memory_mib))
    cells = []
    for node, ids, mem in specs:
        cells.append(
            CellPlacement(
                host_node=node,
                vcpus=len(ids),
                memory_mib=mem,
                cpus=tuple(pins[i][0] for i in ids if i in pins) if pinned else (),
                hugepage_size_kib=page_kib,
                hugepages=(mem * 1024 // page_kib) if page_kib else 0,
            )
        )
    return Placement(
        vcpus=vcpus, memory_mib=memory_mib, cells=tuple(cells), emulator_cpus=emulator, vfs=taken
    )


def _foreign_vfs(root: ET.Element, vfs: Mapping[str, VirtualFunction]) -> tuple[VfAssignment, ...]:
    """Count a domain's passed-through VFs per PF (those whose PF sysfs could name)."""
    counts: dict[str, int] = {}
    for address in _hostdev_addresses(root):
        vf = vfs.get(address)
        if vf is not None:
            counts[vf.pf] = counts.get(vf.pf, 0) + 1
    return tuple(VfAssignment(nic=pf, count=n) for pf, n in sorted(counts.items()))


def _as_memory(cell: ET.Element) -> ET.Element:
    """Turn a guest `<cell memory=... unit=...>` into a `<memory unit>` element for _to_mib."""
    element = ET.Element("memory", unit=cell.get("unit", "KiB"))
    element.text = cell.get("memory", "0")
    return element


def _without_namespace(root: ET.Element) -> ET.Element:
    """Drop the namespace from `root` and its children's tags (vm-host's attributes have none)."""
    for element in root.iter():
        element.tag = element.tag.rpartition("}")[2]
    return root


def record_from_metadata(name: str, domain_uuid: str, metadata: str, state: VmState) -> VmRecord:
    """Build the VmRecord of a vm-host domain from its name, UUID and metadata element alone.

    Raises:
        ValueError: unreadable metadata, or metadata of another domain (copy_problem).
    """
    vm = ET.fromstring(metadata)  # noqa: S314 - libvirtd's own output
    for element in vm.iter():  # libvirtd hands the element back without its namespace
        if not element.tag.startswith("{"):
            element.tag = f"{{{METADATA_NS}}}{element.tag}"
    placement, fields = parse_metadata(vm)
    if copy_problem(vm, domain_uuid):
        raise ValueError("not this domain's metadata")  # the whole XML says why
    return VmRecord(
        name=name, uuid=domain_uuid, state=state, placement=placement, managed=True, **fields
    )


def record_from_domain_xml(
    xml: str,
    state: VmState,
    topology: HostTopology | None = None,
    vfs: Mapping[str, VirtualFunction] | None = None,
) -> VmRecord:
    """Build a VmRecord from a domain's XML: from vm-host's metadata, else from its devices.

    `vfs` (PCI address -> VF, see known_vfs()) names the PF of a foreign domain's
    passed-through VFs, in its placement and its interfaces' attached-to.
    """
    root = ET.fromstring(xml)  # noqa: S314 - libvirtd's own output
    name = (root.findtext("name") or "").strip()
    domain_uuid = (root.findtext("uuid") or "").strip()
    vm = root.find(f"metadata/{{{METADATA_NS}}}vm")
    problem = ""
    if vm is not None:
        try:
            placement, fields = parse_metadata(vm)
        except (ValueError, TypeError, KeyError) as exc:
            problem = (
                f"its vm-host metadata is unreadable ({_short(exc)}), so vm-host leaves it be"
            )
        else:
            problem = copy_problem(vm, domain_uuid)
            if not problem:
                return VmRecord(
                    name=name,
                    uuid=domain_uuid,
                    state=state,
                    placement=placement,
                    managed=True,
                    **fields,
                )
    try:
        placement = placement_from_domain_xml(root, topology, vfs)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        placement = Placement(vcpus=0, memory_mib=0)
        problem = problem or f"its domain XML is unreadable ({_short(exc)})"
    interfaces = []
    for i, iface in enumerate(root.findall("devices/interface")):
        source = iface.find("source")
        attached = ""
        if source is not None:
            attached = source.get("bridge") or source.get("dev") or source.get("network") or ""
            address = source.find("address")
            pci = _pci_from_element(address) if address is not None else None
            if iface.get("type") == "hostdev" and pci is not None:
                vf = (vfs or {}).get(pci)
                attached = vf.description if vf is not None else pci
        mac = iface.find("mac")
        interfaces.append(
            {
                "label": f"net{i}",
                "mac": mac.get("address", "") if mac is not None else "",
                "attached-to": attached,
            }
        )
    return VmRecord(
        name=name,
        uuid=domain_uuid,
        state=state,
        placement=placement,
        owner="",
        interfaces=tuple(interfaces),
        managed=False,
        problem=problem,
    )


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------------------------------
# cloud-init seed


def seed_documents(
    spec: VmSpec, nics: Sequence[NicAttachment], instance_id: str
) -> dict[str, str] | None:
    """Return the NoCloud seed files, or None when the VM needs no seed.

    A VM booting an image always gets one (its hostname comes from meta-data); a network-booted
    VM only when it has user data, keys or a static address.

    Network config (version 2) matches each NIC by MAC so it does not depend on the guest's
    device naming; NICs without a static address use DHCP.
    """
    if not spec.image and not cloudinit.needs_cloud_init(spec, nics):
        return None
    user_data = cloudinit.user_data(spec)
    network = cloudinit.network_config(nics)
    meta = yaml.safe_dump({"instance-id": instance_id, "local-hostname": cloudinit.hostname(spec)})
    return {"user-data": user_data, "meta-data": meta, "network-config": network}


def build_seed_iso(files: Mapping[str, str], directory: Path) -> Path:
    """Write the seed files and pack them into a NoCloud ISO (volume id "cidata")."""
    for name, content in files.items():
        (directory / name).write_text(content)
    iso = directory / "seed.iso"
    subprocess.run(
        [
            GENISOIMAGE,
            "-quiet",
            "-output",
            str(iso),
            "-volid",
            "cidata",
            "-joliet",
            "-rock",
            *(str(directory / name) for name in files),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return iso


def _validate_request(
    spec: VmSpec, nics: Sequence[NicAttachment], default_pool: str
) -> list[NicAttachment]:
    """Check every name that will reach libvirt and give each NIC its MAC.

    Returns:
        The NICs with their MACs (generated when the attachment has none).

    Raises:
        InvalidRequestError: naming the field and the rule.
    """
    validate_name(spec.name, "name")
    if not spec.disks:
        raise InvalidRequestError("storage", "at least a root disk is needed")
    volumes = [volume_name(spec.name, d.label) for d in spec.disks]
    if len(set(volumes)) != len(volumes):
        raise InvalidRequestError(
            "storage", f"disk labels must differ (after folding to volume names {volumes})"
        )
    if volume_name(spec.name, SEED_LABEL) in volumes:
        raise InvalidRequestError(
            "storage", f"the disk label {SEED_LABEL!r} is kept for the cloud-init seed"
        )
    for disk in spec.disks:
        validate_name(volume_name(spec.name, disk.label), f"storage[{disk.label}].label")
        validate_name(disk.pool or default_pool, f"storage[{disk.label}].pool")
    validate_name(default_pool, "default-storage-pool")
    resolved: list[NicAttachment] = []
    for nic in nics:
        what = "bridge" if nic.kind == AttachmentKind.BRIDGE else "parent interface"
        if nic.kind == AttachmentKind.HOSTDEV:
            what = "SR-IOV PF"
        validate_host_device(nic.source, f"interfaces[{nic.label}].source", what)
        if (
            nic.kind == AttachmentKind.HOSTDEV
            and nic.vlan is not None
            and (isinstance(nic.vlan, bool) or not 1 <= nic.vlan <= 4094)
        ):
            raise InvalidRequestError(
                f"interfaces[{nic.label}].vlan",
                f"{nic.vlan!r} is not a VLAN id; use 1-4094, or none for an untagged VF",
            )
        mac = (nic.mac or generate_mac(spec.name, nic.label)).lower()
        if not _MAC_RE.match(mac):
            raise InvalidRequestError(f"interfaces[{nic.label}].mac", f"{mac!r} is not a MAC")
        resolved.append(dataclasses.replace(nic, mac=mac))
    return resolved


def parse_proc_arp(text: str) -> dict[str, list[str]]:
    """MAC -> IPv4 addresses of the complete entries of /proc/net/arp (flag 0x2 set)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        ip, _, flags, mac = fields[:4]
        try:
            complete = int(flags, 16) & 0x2
        except ValueError:
            continue
        if complete and _MAC_RE.match(mac.lower()) and mac != "00:00:00:00:00:00":
            found.setdefault(mac.lower(), []).append(ip)
    return found


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _address_sources(root: ET.Element) -> list[int]:
    """Libvirt's address sources to ask after the leases: ARP, and the agent when connected.

    The agent is asked only when libvirt says the guest has its channel open, so a guest
    without one costs no timeout.
    """
    sources = [libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP]
    for channel in root.findall("devices/channel/target"):
        if channel.get("name") == "org.qemu.guest_agent.0" and channel.get("state") == "connected":
            sources.append(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT)
    return sources


def _detail(error: BaseException) -> str:
    """Return the useful part of an error for a person."""
    if isinstance(error, libvirt.libvirtError):
        return error.get_error_message() or str(error)
    if isinstance(error, subprocess.CalledProcessError):
        stderr = error.stderr or b""
        if isinstance(stderr, bytes):
            stderr = stderr.decode(errors="replace")
        return f"{error}: {stderr.strip()}"
    return str(error)


def _domain_xmls(domains: Sequence[libvirt.virDomain]) -> Iterator[str]:
    """Yield the XML of every domain, and its next-boot XML too when that differs.

    A running domain's persistent definition can name other devices than it runs with; both
    hold their VFs (the running one now, the stored one at its next start).
    """
    for dom in domains:
        try:
            yield dom.XMLDesc(0)
            if dom.isActive() and dom.isPersistent():
                yield dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        except libvirt.libvirtError:
            continue  # undefined while we looked


def _growth(pool: libvirt.virStoragePool) -> int:
    """How much the pool's volumes may still grow: capacity minus allocation, summed."""
    total = 0
    for vol in pool.listAllVolumes(0):
        with contextlib.suppress(libvirt.libvirtError):  # deleted while we looked
            _, capacity, allocation = vol.info()
            total += max(0, int(capacity) - int(allocation))
    return total


def _directories(pools: Iterable[libvirt.virStoragePool]) -> dict[str, str]:
    """Pool name -> its directory, for pools whose volumes are files named after them."""
    found: dict[str, str] = {}
    for pool in pools:
        try:
            root = ET.fromstring(pool.XMLDesc(0))  # noqa: S314 - libvirtd's own output
        except libvirt.libvirtError:
            continue
        path = (root.findtext("target/path") or "").strip()
        if root.get("type") in ("dir", "fs", "netfs") and os.path.isabs(path):
            found[pool.name()] = path
    return found


def _ledger_volumes(name: str, root: ET.Element) -> tuple[str, ...]:
    """The volumes a domain's vm-host metadata lists, refusing domains that are not vm-host's.

    Raises:
        VmHostError: no vm-host metadata, unreadable metadata, or a copy (copy_problem).
    """
    vm = root.find(f"metadata/{{{METADATA_NS}}}vm")
    if vm is None:
        raise VmHostError(
            f"VM {name!r} was not created by vm-host; it is left alone (delete it with virsh)"
        )
    try:
        _, fields = parse_metadata(vm)
    except (ValueError, TypeError, KeyError) as exc:
        raise VmHostError(
            f"VM {name!r} has unreadable vm-host metadata ({_short(exc)}); it is left alone "
            "(delete it with virsh once you know whose disks it uses)"
        ) from exc
    problem = copy_problem(vm, (root.findtext("uuid") or "").strip())
    if problem:
        raise VmHostError(
            f"VM {name!r}: {problem} (delete it with virsh once you know whose disks it uses)"
        )
    return fields["volumes"]


def host_arch() -> str:
    """Return the host architecture in libvirt's spelling."""
    machine = platform.machine()
    return "aarch64" if machine in ("aarch64", "arm64") else machine


# ---------------------------------------------------------------------------------------------
# The backend


class _Created:
    """The intent record of one compose, kept up to date as its volumes appear.

    It is written before the first volume exists, with the path each volume will have in a
    directory pool, so a hook killed at any point after, or a pool undefined mid-way, leaves
    a record that says where every file is.
    """

    def __init__(
        self,
        store: intents.IntentStore,
        name: str,
        domain_uuid: str,
        planned: Sequence[tuple[str, str, int]],
        pool_dirs: Mapping[str, str],
    ):
        self.store = store
        self.intent = store.begin(name, domain_uuid, [(p, v) for p, v, _ in planned])
        for pool, volume, _ in planned:
            if pool_dirs.get(pool):
                path = os.path.join(pool_dirs[pool], volume)
                self.intent = store.created(self.intent, pool, volume, path)

    def add(self, pool: str, vol: libvirt.virStorageVol) -> None:
        """Record the path libvirt gives a volume just created (when it still can)."""
        try:
            path = vol.path()
        except libvirt.libvirtError:
            return  # its pool went meanwhile: the planned path stays recorded
        self.intent = self.store.created(self.intent, pool, vol.name(), path)

    def done(self) -> None:
        self.store.done(self.intent.name)


class LibvirtBackend:
    """The Backend protocol on libvirt; short-lived (one per hook), one connection each."""

    name = "libvirt"

    def __init__(
        self,
        uri: str = "qemu:///system",
        templates_dir: Path | None = None,
        sysfs_root: str = "/sys",
        virt_type: str = "auto",
        console_log_dir: str = CONSOLE_LOG_DIR,
        intent_dir: str | Path = intents.INTENT_DIR,
        image_pool: str = images.IMAGE_POOL,
        image_pool_path: str = images.IMAGE_POOL_PATH,
    ):
        self.uri = uri
        self.intents = intents.IntentStore(intent_dir)
        self.image_pool = image_pool
        self.image_pool_path = image_pool_path
        self.virt_type = resolve_virt_type(virt_type)
        self.console_log_dir = console_log_dir
        self.templates_dir = templates_dir or TEMPLATES_DIR
        self.sysfs_root = sysfs_root
        self.proc_arp = "/proc/net/arp"
        self._arp_cache: dict[str, list[str]] | None = None
        self._conn: libvirt.virConnect | None = None

    # -- connection

    @property
    def conn(self) -> libvirt.virConnect:
        """Return the connection, opening it on first use."""
        if self._conn is None or not self._conn.isAlive():
            # libvirt prints every error to stderr by default; errors come back as exceptions.
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise BackendUnavailableError(
                    f"cannot connect to libvirt at {self.uri}: {e.get_error_message()}; "
                    "is libvirtd running?"
                ) from e
        return self._conn

    def close(self) -> None:
        """Close the connection (safe to call twice)."""
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def __enter__(self) -> LibvirtBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- host

    def version(self) -> str:
        """Return libvirt's version ("9.0.0")."""
        v = self.conn.getLibVersion()
        return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"

    def topology(self) -> HostTopology:
        """Return NUMA nodes (with free huge pages from sysfs), host NICs and storage pools."""
        topology = parse_capabilities(self.conn.getCapabilities())
        topology = apply_free_hugepages(
            topology,
            read_free_hugepages(self.sysfs_root),
            read_total_hugepages(self.sysfs_root),
        )
        return dataclasses.replace(
            topology,
            nics=discover_nics(self.sysfs_root),
            pools=tuple(self._pools()),
            hypervisor="libvirt",
            hypervisor_version=self.version(),
        )

    def _pools(self) -> Iterator[StoragePool]:
        for pool in self.conn.listAllStoragePools(0):
            try:
                root = ET.fromstring(pool.XMLDesc(0))  # noqa: S314 - libvirtd's own output
                active = bool(pool.isActive())
                capacity = allocation = available = committed = 0
                if active:
                    _, capacity, allocation, available = (int(x) for x in pool.info())
                    committed = _growth(pool)
            except libvirt.libvirtError as e:
                logger.warning("storage pool %s cannot be read: %s", pool.name(), e)
                continue  # undefined while we looked, or its backing store is gone
            yield StoragePool(
                name=pool.name(),
                driver=root.get("type", "dir"),
                capacity_bytes=capacity,
                allocation_bytes=allocation,
                available_bytes=available,
                path=(root.findtext("target/path") or "").strip() or None,
                active=active,
                committed_bytes=committed,
            )

    def ensure_pool(self, name: str, path: str) -> None:
        """Define, build, start and autostart a directory pool; start it when inactive."""
        validate_name(name, "default-storage-pool")
        if not os.path.isabs(path):
            raise InvalidRequestError("storage pool path", f"{path!r} must be an absolute path")
        try:
            pool = self.conn.storagePoolLookupByName(name)
        except libvirt.libvirtError:
            xml = render_template(
                self.templates_dir, "storage-pool.xml.j2", {"name": name, "path": path}
            )
            try:
                pool = self.conn.storagePoolDefineXML(xml, 0)
                pool.build(0)
            except libvirt.libvirtError as e:
                raise VmHostError(f"storage pool {name}: define at {path} failed: {e}") from e
        try:
            if not pool.isActive():
                pool.create(0)
            if not pool.autostart():
                pool.setAutostart(1)
        except libvirt.libvirtError as e:
            raise VmHostError(f"storage pool {name}: start failed: {e}") from e

    def ensure_project(self, project: str | None = None, storage_pool: str = "default") -> bool:
        """Libvirt has no projects: nothing to create."""
        return False

    # -- reading VMs

    def list_vms(self) -> list[VmRecord]:
        """Return every domain; vm-host's from their metadata, others reconstructed.

        One bulk call reads every domain's state; a vm-host domain then costs two small
        calls (its metadata element, its autostart flag), and only a foreign domain, or one
        whose metadata does not parse, is read and parsed whole.
        """
        records: list[VmRecord] = []
        foreign: list[tuple[str, tuple[VmState, str], bool]] = []
        for dom, stats in self.conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0):
            state, why = _state(
                int(stats.get("state.state", libvirt.VIR_DOMAIN_NOSTATE)),
                int(stats.get("state.reason", 0)),
            )
            autostart = False
            try:
                autostart = bool(dom.autostart())
                metadata = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
                record = record_from_metadata(dom.name(), dom.UUIDString(), metadata, state)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    continue  # undefined while we looked
                record = None
            except (ValueError, TypeError, KeyError, ET.ParseError):
                record = None  # the whole XML says why it is unmanaged
            if record is None:
                try:
                    foreign.append((dom.XMLDesc(0), (state, why), autostart))
                except libvirt.libvirtError:
                    continue
                continue
            records.append(dataclasses.replace(record, state_reason=why, autostart=autostart))
        topology: HostTopology | None = None
        vfs: dict[str, VirtualFunction] = {}
        if foreign:
            # Only foreign domains need the host map (to find the node of pinned CPUs) and
            # the PF of each VF they pass through (vm-host's own record theirs).
            topology = parse_capabilities(self.conn.getCapabilities())
            addresses = set().union(*(hostdev_addresses(xml) for xml, _, _ in foreign))
            vfs = known_vfs(self.sysfs_root, addresses)
            records += [
                dataclasses.replace(
                    record_from_domain_xml(xml, state, topology, vfs),
                    state_reason=why,
                    autostart=autostart,
                )
                for xml, (state, why), autostart in foreign
            ]
        return sorted(records, key=lambda r: r.name)

    def _lookup(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise VmHostError(f"VM {name!r} does not exist on this host") from e
            raise

    # -- composing

    def compose(
        self,
        spec: VmSpec,
        placement: Placement,
        nics: Sequence[NicAttachment],
        default_pool: str,
    ) -> VmRecord:
        """Create the volumes, seed and domain of a VM and start it; on failure undo it all.

        Everything that can be checked is checked before the first volume exists; after that,
        a failing step (volume, image copy, seed, define, start) removes the domain and every
        volume this call created before the error is raised.

        Raises:
            InvalidRequestError: a name, image or NIC is not acceptable (nothing was touched).
            VmHostError: the name is taken, a pool or volume is missing or taken, or a step
                failed (everything this call created was removed again).
        """
        resolved = _validate_request(spec, nics, default_pool)
        base = self._base_for(spec.image) if spec.image else None
        conn = self.conn
        domains = conn.listAllDomains(0)
        if spec.name in {d.name() for d in domains}:
            raise VmHostError(f"name: a VM named {spec.name!r} already exists on this host")
        vfs: dict[str, VirtualFunction] = {}
        if any(nic.kind == AttachmentKind.HOSTDEV for nic in resolved):
            vfs = choose_vfs(self.sysfs_root, resolved, list(_domain_xmls(domains)))
        domain_uuid = str(uuid_module.uuid4())
        seed_files = seed_documents(spec, resolved, domain_uuid)
        planned = [
            (d.pool or default_pool, volume_name(spec.name, d.label), d.size_gb * GB)
            for d in spec.disks
        ]
        if seed_files is not None:
            planned.append((default_pool, volume_name(spec.name, SEED_LABEL), 0))
        pools = self._check_volumes_free(planned)

        created = _Created(
            self.intents, spec.name, domain_uuid, planned, _directories(pools.values())
        )
        dom: libvirt.virDomain | None = None
        step = "creating volumes"
        try:
            disks: list[Volume] = []
            for i, (pool_name, vol_name, size) in enumerate(planned[: len(spec.disks)]):
                step = f"creating volume {pool_name}/{vol_name}"
                pool = pools[pool_name]
                fmt = "qcow2"
                if i == 0 and base is not None:
                    step = f"creating {pool_name}/{vol_name} as an overlay on {base.volume}"
                    vol = self._overlay_volume(pool, vol_name, base, size)
                    created.add(pool_name, vol)
                else:
                    vol = self._create_volume(pool, vol_name, size, fmt)
                    created.add(pool_name, vol)
                disks.append(Volume(pool_name, vol_name, vol.path(), fmt))
            seed = None
            if seed_files is not None:
                pool_name, vol_name, _ = planned[-1]
                step = f"building the cloud-init seed {pool_name}/{vol_name}"
                seed = self._seed_volume(pools[pool_name], vol_name, seed_files, created)
            step = "preparing the console log"
            console_log = self._fresh_console_log(spec.name)
            step = "rendering the domain XML"
            arch = host_arch()
            context = domain_context(
                spec,
                placement,
                resolved,
                disks,
                seed,
                uuid=domain_uuid,
                domain_type=self.virt_type,
                arch=arch,
                cpu_disabled_features=disabled_cpu_features(arch, host_cpu_flags()),
                vfs=vfs,
                console_log=str(console_log),
            )
            xml = render_template(self.templates_dir, "domain.xml.j2", context)
            step = "defining the domain"
            dom = conn.defineXML(xml)
            step = "setting autostart"
            dom.setAutostart(1)
            step = "starting the domain"
            dom.create()
            step = "reading the domain back"
            state, why = _domain_state(dom)
            record = dataclasses.replace(
                record_from_domain_xml(dom.XMLDesc(0), state), state_reason=why, autostart=True
            )
        except (libvirt.libvirtError, OSError, subprocess.SubprocessError, VmHostError) as e:
            error = self._undo(spec.name, step, e, dom, created)
            if error is e:
                raise
            raise error from e
        created.done()
        logger.info("composed VM %s (%s)", spec.name, domain_uuid)
        return record

    def _undo(
        self,
        name: str,
        step: str,
        error: BaseException,
        dom: libvirt.virDomain | None,
        created: _Created,
    ) -> VmHostError:
        """Roll a failed compose back; return the error to raise, saying exactly what stayed.

        The intent record goes only when nothing stayed: otherwise the next hook retries.
        """
        stayed = self._rollback(dom, created.intent)
        if not stayed:
            created.done()
            if isinstance(error, InvalidRequestError):
                return error
        left = (
            f"left behind: {', '.join(stayed)}; remove them by hand"
            if stayed
            else "nothing was left behind"
        )
        return VmHostError(f"compose {name}: {step} failed: {_detail(error)}; {left}")

    def _fresh_console_log(self, name: str) -> Path:
        """The VM's console log path, its directory made, and no earlier VM's log left in it."""
        path = self._console_log_path(name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in (path, *path.parent.glob(f"{path.name}.[0-9]*")):
            stale.unlink(missing_ok=True)
        return path

    def _console_log_path(self, name: str) -> Path:
        validate_name(name, "name")
        return Path(self.console_log_dir) / f"{name}.log"

    def console_log(self, name: str, lines: int = 100) -> str:
        """Return the last `lines` lines of a VM's serial console log ("" before any output).

        Raises:
            InvalidRequestError: a bad name or line count.
            VmHostError: the VM does not exist.
        """
        if isinstance(lines, bool) or not 1 <= lines <= 100_000:
            raise InvalidRequestError("lines", f"{lines!r}: give 1 to 100000 lines")
        path = self._console_log_path(name)
        self._lookup(name)
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 4 * 1024 * 1024))
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.replace("\r", "").splitlines()[-lines:])

    def _check_volumes_free(
        self, planned: Sequence[tuple[str, str, int]]
    ) -> dict[str, libvirt.virStoragePool]:
        """Return the pools of the planned volumes, refusing missing pools and taken names."""
        pools: dict[str, libvirt.virStoragePool] = {}
        names: dict[str, list[str]] = {}
        for pool_name, vol_name, _ in planned:
            if pool_name not in pools:
                try:
                    pool = self.conn.storagePoolLookupByName(pool_name)
                except libvirt.libvirtError as e:
                    raise VmHostError(
                        f"storage pool {pool_name!r} does not exist on this host; create it or "
                        "choose another pool"
                    ) from e
                names[pool_name] = self._pool_volumes(pool_name, pool)
                pools[pool_name] = pool
            if vol_name in names[pool_name]:
                raise VmHostError(
                    f"volume {vol_name!r} already exists in pool {pool_name!r}; delete it or "
                    "choose another VM name"
                )
        return pools

    @staticmethod
    def _pool_volumes(name: str, pool: libvirt.virStoragePool) -> list[str]:
        """Refresh a pool and list its volumes; a pool that cannot be read is a VmHostError."""
        try:
            if not pool.isActive():
                raise VmHostError(
                    f"storage pool {name!r} is not active; start it (virsh pool-start)"
                )
            pool.refresh(0)
            return list(pool.listVolumes())
        except libvirt.libvirtError as e:
            raise VmHostError(
                f"storage pool {name!r} cannot be read ({e.get_error_message()}); if its "
                "directory is gone, recreate it and start the pool (virsh pool-start), or "
                "choose another pool"
            ) from e

    def _base_for(self, name: str) -> images.CachedImage:
        """Return the newest cached base of an image name (never a path).

        Raises:
            InvalidRequestError: not an image name.
            VmHostError: the image is not cached on this host (fetch it first).
        """
        parsed = images.parse_name(name)
        base = images.newest(self.cached_images(), parsed.name)
        if base is None:
            raise VmHostError(
                f"image: {parsed.name} is not in this host's image cache ({self.image_pool}); "
                "fetch it first (the sync-images action, or compose-vm, fetches it)"
            )
        return base

    def _overlay_volume(
        self, pool: libvirt.virStoragePool, name: str, base: images.CachedImage, size: int
    ) -> libvirt.virStorageVol:
        """Create a root volume as a qcow2 overlay on a base, of the requested size.

        Nothing is copied: the overlay starts empty and reads the base through
        `<backingStore>`; the guest sees a disk of `size` bytes.
        """
        virtual = int(
            self.conn.storagePoolLookupByName(self.image_pool)
            .storageVolLookupByName(base.volume)
            .info()[1]
        )
        if virtual > size:
            raise InvalidRequestError(
                "image",
                f"{base.name} needs {virtual} bytes, more than the {size} of the root disk; "
                "ask for a larger root disk",
            )
        # libvirt hands qemu-img the size in KiB, rounded up: ask for whole KiB, then grow.
        xml = render_template(
            self.templates_dir,
            "storage-volume.xml.j2",
            {
                "name": name,
                "capacity_bytes": size - size % 1024,
                "format": "qcow2",
                "backing_path": base.path,
            },
        )
        vol = pool.createXML(xml, 0)
        if size % 1024:
            try:
                vol.resize(size, 0)
            except libvirt.libvirtError:
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
                raise
        return vol

    # -- the image cache (vmhost.imagecache.ImageStore)

    def image_store(self) -> LibvirtBackend:
        """This backend keeps its own image cache (the `vm-host-images` pool)."""
        return self

    def prepare_image(
        self,
        name: str,
        settings: imagecache.Settings,
        *,
        wait: bool,
        log: Callable[[str], None] | None = None,
    ) -> str | None:
        """Get an image into the cache pool (see Backend.prepare_image and vmhost.imagecache)."""
        if wait:
            imagecache.ensure(self, name, settings, log=log)
            return None
        return imagecache.background(self, settings, name)

    def probe_image(self, name: str, settings: imagecache.Settings) -> str:
        """Where a compose would get an image from, nothing fetched (imagecache.probe)."""
        return imagecache.probe(self, name, settings)

    def _images_pool(self, *, create: bool) -> libvirt.virStoragePool | None:
        try:
            pool = self.conn.storagePoolLookupByName(self.image_pool)
        except libvirt.libvirtError:
            if not create:
                return None
            self.ensure_pool(self.image_pool, self.image_pool_path)
            return self.conn.storagePoolLookupByName(self.image_pool)
        if not pool.isActive():
            if not create:
                return None
            self.ensure_pool(self.image_pool, self.image_pool_path)
        return pool

    def cached_images(self) -> list[images.CachedImage]:
        """Return every base volume of the image pool, oldest version first."""
        pool = self._images_pool(create=False)
        if pool is None:
            return []
        pool.refresh(0)
        found: list[images.CachedImage] = []
        for vol in pool.listAllVolumes(0):
            try:
                base = images.parse_base_volume(vol.name(), vol.path(), int(vol.info()[2]))
            except libvirt.libvirtError:
                continue  # deleted while we looked
            if base is not None:
                found.append(base)
        return sorted(found, key=lambda b: (b.name, images.version_key(b.version)))

    def _pool_dir(self, pool: libvirt.virStoragePool) -> Path:
        root = ET.fromstring(pool.XMLDesc(0))  # noqa: S314 - libvirtd's own output
        if root.get("type") != "dir":
            raise VmHostError(f"storage pool {self.image_pool} must be a directory pool")
        return Path((root.findtext("target/path") or "").strip())

    def staging_dir(self) -> Path:
        """A private directory next to the image pool's (same filesystem: moves are renames)."""
        pool = self._images_pool(create=True)
        assert pool is not None
        path = self._pool_dir(pool).parent / "image-staging"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def add_image(self, file: Path, volume: str) -> images.CachedImage:
        """Move a verified qcow2 into the image pool as base `volume` (whole or not at all)."""
        pool = self._images_pool(create=True)
        assert pool is not None
        target = self._pool_dir(pool) / volume
        file.chmod(0o644)  # QEMU reads bases as libvirt-qemu; they hold no secrets
        try:
            os.replace(file, target)
        except OSError:
            part = target.with_name(f".{volume}.part")
            try:
                shutil.copyfile(file, part)
                part.chmod(0o644)
                os.replace(part, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()
        pool.refresh(0)
        vol = pool.storageVolLookupByName(volume)
        base = images.parse_base_volume(volume, vol.path(), int(vol.info()[2]))
        if base is None:  # a name images.base_volume_name did not make: a bug
            raise VmHostError(f"{volume} is not a base volume name")
        return base

    def remove_image(self, volume: str) -> None:
        """Delete a base volume of the image pool."""
        pool = self._images_pool(create=False)
        if pool is None or images.parse_base_volume(volume) is None:
            raise VmHostError(f"{volume} is not a base of {self.image_pool}")
        try:
            pool.storageVolLookupByName(volume).delete(0)
        except libvirt.libvirtError as e:
            raise VmHostError(f"removing {volume}: {e.get_error_message()}") from e

    def _backing_paths(self) -> dict[str, str]:
        """Return volume path -> its backing file, for every volume of every active pool."""
        backing: dict[str, str] = {}
        for pool in self.conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
            for vol in pool.listAllVolumes(0):
                try:
                    root = ET.fromstring(vol.XMLDesc(0))  # noqa: S314 - libvirtd's own output
                    path = vol.path()
                except libvirt.libvirtError:
                    continue
                parent = (root.findtext("backingStore/path") or "").strip()
                if parent:
                    backing[path] = parent
        return backing

    def image_users(self) -> dict[str, list[str]]:
        """Return base volume -> the VMs (or orphan volumes) whose disks are overlays on it."""
        bases = {b.path: b.volume for b in self.cached_images()}
        backing = {p: b for p, b in self._backing_paths().items() if b in bases}
        users: dict[str, list[str]] = {}
        attached: set[str] = set()
        for xml in _domain_xmls(self.conn.listAllDomains(0)):
            root = ET.fromstring(xml)  # noqa: S314 - libvirtd's own output
            name = root.findtext("name") or "?"
            for source in root.iterfind("devices/disk/source"):
                path = source.get("file") or ""
                base = bases.get(backing.get(path, path))
                if base is not None:
                    attached.add(path)
                    if name not in users.setdefault(base, []):
                        users[base].append(name)
        for path, parent in backing.items():
            if path not in attached:
                users.setdefault(bases[parent], []).append(f"volume {path}")
        return users

    def _seed_volume(
        self,
        pool: libvirt.virStoragePool,
        name: str,
        files: Mapping[str, str],
        created: _Created,
    ) -> Volume:
        """Build the NoCloud ISO in a private temporary directory and upload it as a volume."""
        with tempfile.TemporaryDirectory(prefix="vm-host-seed-") as tmp:
            iso = build_seed_iso(files, Path(tmp))
            vol = self._create_volume(pool, name, iso.stat().st_size, "raw")
            created.add(pool.name(), vol)
            self._upload(vol, iso)
        return Volume(pool.name(), name, vol.path(), "raw")

    def _create_volume(
        self, pool: libvirt.virStoragePool, name: str, capacity: int, fmt: str
    ) -> libvirt.virStorageVol:
        xml = render_template(
            self.templates_dir,
            "storage-volume.xml.j2",
            {"name": name, "capacity_bytes": capacity, "format": fmt},
        )
        return pool.createXML(xml, 0)

    def _upload(self, vol: libvirt.virStorageVol, path: Path) -> None:
        """Stream a local file into a volume through libvirt (works for every pool type)."""
        size = path.stat().st_size
        stream = self.conn.newStream(0)
        try:
            vol.upload(stream, 0, size, 0)
            with path.open("rb") as f:

                def read(_stream: object, nbytes: int, _opaque: object) -> bytes:
                    return f.read(nbytes)

                stream.sendAll(read, None)
            stream.finish()
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise

    def _rollback(self, dom: libvirt.virDomain | None, intent: intents.Intent) -> list[str]:
        """Remove what a failed compose created, past errors; return what stayed, exactly.

        Every volume the compose planned is looked up by name (none of them existed before:
        compose refuses taken names). A volume whose pool was undefined or stopped meanwhile
        cannot be deleted through libvirt; its file is then unlinked by its recorded path.
        """
        stayed: list[str] = []
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            try:
                dom.undefineFlags(_UNDEFINE_FLAGS)
            except libvirt.libvirtError as e:
                logger.error("rollback: undefining %s failed: %s", dom.name(), e)
                stayed.append(f"domain {dom.name()} ({e.get_error_message()})")
        for volume in intent.volumes:
            outcome = self._remove_orphan(volume, {})
            if outcome not in ("removed", ""):
                logger.error("rollback: volume %s stayed: %s", volume.ref, outcome)
                where = f" at {volume.path}" if volume.path else ""
                stayed.append(f"volume {volume.ref}{where} ({outcome})")
        return stayed

    def _pool_usable(self, name: str) -> bool:
        try:
            return bool(self.conn.storagePoolLookupByName(name).isActive())
        except libvirt.libvirtError:
            return False

    # -- recovering from interrupted composes

    def recover(self) -> list[str]:
        """Remove the volumes composes that were killed left behind; say what was done.

        A compose's intent record names the domain UUID it was going to define and the
        volumes it was creating. When no domain with that UUID exists, each of those volumes
        that no domain uses (as a disk, or in its vm-host metadata) is deleted, or unlinked by
        its path when its pool is gone; a volume some domain uses is kept.

        Returns:
            One sentence per interrupted compose that left something, as it is also logged
            and kept for the status line.
        """
        pending = self.intents.pending()
        if not pending:
            return []
        uuids, used = self._domains_and_disks()
        messages = []
        for intent in pending:
            if uuids.get(intent.name, "").lower() == intent.uuid.lower():
                self.intents.done(intent.name)  # it got as far as defining its domain
                continue
            removed: list[str] = []
            kept: list[str] = []
            for volume in intent.volumes:
                outcome = self._remove_orphan(volume, used)
                if outcome == "removed":
                    removed.append(volume.ref)
                elif outcome:
                    kept.append(f"{volume.ref} ({outcome})")
            if not kept:
                self.intents.done(intent.name)
            if not removed and not kept:
                continue
            message = f"an interrupted compose of {intent.name} left volumes: " + "; ".join(
                part
                for part in (
                    f"removed {', '.join(removed)}" if removed else "",
                    f"kept {', '.join(kept)}" if kept else "",
                )
                if part
            )
            logger.warning("%s", message)
            self.intents.note(message)
            messages.append(message)
        return messages

    def recent_recoveries(self) -> list[str]:
        """What `recover` did in the last day, oldest first."""
        return self.intents.notes()

    def _domains_and_disks(self) -> tuple[dict[str, str], dict[str, str]]:
        """Every domain's UUID by name, and what each disk or listed volume is used by."""
        uuids: dict[str, str] = {}
        used: dict[str, str] = {}
        for dom in self.conn.listAllDomains(0):
            try:
                uuids[dom.name()] = dom.UUIDString()
                for xml in _domain_xmls([dom]):
                    root = ET.fromstring(xml)  # noqa: S314 - libvirtd's own output
                    for source in disk_sources(root):
                        used.setdefault(source, dom.name())
                    for volume in root.findall(f"metadata/{{{METADATA_NS}}}vm/v:volume", _NS):
                        ref = f"{volume.get('pool')}/{volume.get('name')}"
                        used.setdefault(ref, dom.name())
            except libvirt.libvirtError:
                continue  # undefined while we looked
        return uuids, used

    def _remove_orphan(self, volume: intents.IntentVolume, used: Mapping[str, str]) -> str:
        """Delete one volume of an interrupted compose: "removed", "" (absent) or why kept."""
        try:
            pool = self.conn.storagePoolLookupByName(volume.pool)
            active = bool(pool.isActive())
        except libvirt.libvirtError:
            pool, active = None, False
        if pool is not None and active:
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)
            try:
                vol = pool.storageVolLookupByName(volume.name)
                path = os.path.normpath(vol.path())
            except libvirt.libvirtError:
                return ""  # never created, or already removed
            user = used.get(path) or used.get(volume.ref)
            if user is not None:
                return f"domain {user} uses it"
            try:
                vol.delete(0)
            except libvirt.libvirtError as e:
                return f"deleting it failed: {e.get_error_message()}"
            return "removed"
        # The pool is gone or stopped: the file itself, at the path libvirt gave.
        if not volume.path or not os.path.isfile(volume.path):
            return ""
        user = used.get(os.path.normpath(volume.path)) or used.get(volume.ref)
        if user is not None:
            return f"domain {user} uses it"
        try:
            os.unlink(volume.path)
        except OSError as e:
            return f"unlinking {volume.path} failed: {e.strerror}"
        return "removed"

    # -- lifecycle

    def delete(self, name: str) -> list[str]:
        """Destroy and undefine a vm-host VM and delete the volumes that are really its own.

        A volume is deleted only when the metadata lists it, this very domain has it as a
        disk, and no other domain does: forged or copied metadata cannot take another VM's
        disks. Listed volumes that fail those tests are kept and logged.

        Returns:
            The volumes deleted, as "pool/volume".

        Raises:
            VmHostError: the VM does not exist, was not created by vm-host, is a copy of a
                vm-host VM (those are never touched), or a volume could not be deleted (the
                others still are).
        """
        dom = self._lookup(name)
        root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirtd's own output
        own, kept = self._own_volumes(dom, root, _ledger_volumes(name, root))
        for ref, why in kept:
            logger.warning("delete %s: volume %s is kept: %s", name, ref, why)
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(_UNDEFINE_FLAGS)
        except libvirt.libvirtError as e:
            raise VmHostError(f"delete {name}: {e.get_error_message()}") from e
        self._remove_console_log(name)
        failed = []
        deleted = []
        for ref, vol in own:
            try:
                vol.delete(0)
            except libvirt.libvirtError as e:
                if e.get_error_code() in (
                    libvirt.VIR_ERR_NO_STORAGE_VOL,
                    libvirt.VIR_ERR_NO_STORAGE_POOL,
                ):
                    logger.warning("delete %s: volume %s was already gone", name, ref)
                    continue
                failed.append(f"{ref} ({e.get_error_message()})")
                continue
            deleted.append(ref)
        if failed:
            raise VmHostError(f"delete {name}: volumes not deleted: {', '.join(failed)}")
        logger.info("deleted VM %s", name)
        return deleted

    def _remove_console_log(self, name: str) -> None:
        log = self._console_log_path(name)
        for path in (log, *log.parent.glob(f"{log.name}.[0-9]*")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _own_volumes(
        self, dom: libvirt.virDomain, root: ET.Element, refs: Sequence[str]
    ) -> tuple[list[tuple[str, libvirt.virStorageVol]], list[tuple[str, str]]]:
        """Split a VM's listed volumes into those to delete and those to keep (with why).

        Its own: listed, a disk of this domain, and a disk of no other domain (a copy made by
        dumpxml + define shares the original's disk files).
        """
        attached = disk_sources(root)
        others: dict[str, str] = {}
        me = dom.UUIDString()
        for other in self.conn.listAllDomains(0):
            try:
                if other.UUIDString() == me:
                    continue
                for xml in _domain_xmls([other]):
                    for source in disk_sources(ET.fromstring(xml)):  # noqa: S314
                        others.setdefault(source, other.name())
            except libvirt.libvirtError:
                continue  # undefined while we looked
        own: list[tuple[str, libvirt.virStorageVol]] = []
        kept: list[tuple[str, str]] = []
        for ref in refs:
            pool_name, _, vol_name = ref.partition("/")
            try:
                vol = self.conn.storagePoolLookupByName(pool_name).storageVolLookupByName(vol_name)
                path = os.path.normpath(vol.path())
            except libvirt.libvirtError:
                logger.warning("volume %s of %s was already gone", ref, dom.name())
                continue
            if path not in attached and ref not in attached:
                kept.append((ref, f"{dom.name()} does not use it as a disk"))
            elif (user := others.get(path) or others.get(ref)) is not None:
                kept.append((ref, f"domain {user} uses it too"))
            else:
                own.append((ref, vol))
        return own, kept

    def set_owner(self, name: str, owner: str) -> None:
        """Rewrite the owner in a vm-host domain's metadata, live and in its definition.

        libvirt hands vm-host's metadata element back without its namespace and, on
        setMetadata, puts the element and all its children in the namespace given with the
        key: so only the `<owner>` text changes, the rest goes back as libvirt returned it.
        The owner is read back from the stored definition to be sure it took.

        Raises:
            VmHostError: the domain does not exist, is not vm-host's, or libvirt refused.
        """
        dom = self._lookup(name)
        config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, config)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                raise VmHostError(f"set owner of {name}: {e.get_error_message()}") from e
            raise VmHostError(f"VM {name!r} was not created by vm-host; it is left alone") from e
        root = _without_namespace(ET.fromstring(text))  # noqa: S314 - libvirtd's own output
        element = root.find("owner")
        if element is None:
            element = ET.SubElement(root, "owner")
        element.text = owner
        xml = ET.tostring(root, encoding="unicode")
        flags = config
        try:
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, METADATA_PREFIX, METADATA_NS, flags
            )
            after = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, config)
        except libvirt.libvirtError as e:
            raise VmHostError(f"set owner of {name}: {e.get_error_message()}") from e
        written = (_without_namespace(ET.fromstring(after)).findtext("owner") or "").strip()  # noqa: S314
        if written != owner:
            raise VmHostError(f"set owner of {name}: libvirt kept owner {written!r}")
        logger.info("VM %s re-owned %s", name, owner)

    def start(self, name: str) -> None:
        """Start a defined VM (a running VM is left as it is; a crashed one is reset first)."""
        dom = self._lookup(name)
        if dom.state()[0] == libvirt.VIR_DOMAIN_CRASHED:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        if not dom.isActive():
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise VmHostError(f"start {name}: {e.get_error_message()}") from e

    def stop(
        self, name: str, timeout_s: float = STOP_TIMEOUT_S, *, then_destroy: bool = True
    ) -> bool:
        """Ask the guest to shut down (ACPI); after `timeout_s` pull the plug if `then_destroy`.

        Returns whether the domain is off.
        """
        dom = self._lookup(name)
        if not dom.isActive():
            return True
        if timeout_s > 0:
            with contextlib.suppress(libvirt.libvirtError):
                dom.shutdown()
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if not dom.isActive():
                    return True
                time.sleep(0.5)
        if not then_destroy:
            return not dom.isActive()
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if dom.isActive():
                raise VmHostError(f"stop {name}: {e.get_error_message()}") from e
        return True

    def set_autostart(self, name: str, enabled: bool) -> None:
        """Set libvirt's autostart flag: libvirtd starts the domain when it (re)starts."""
        dom = self._lookup(name)
        try:
            dom.setAutostart(1 if enabled else 0)
        except libvirt.libvirtError as e:
            raise VmHostError(f"autostart {name}: {e.get_error_message()}") from e

    # -- guest addresses

    def guest_addresses(self, names: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        """Return VM name -> MAC -> addresses, from the DHCP lease, then ARP, then the agent.

        Leases come from every active libvirt network at once (a bridge NIC on a libvirt
        network's bridge is leased by that network's dnsmasq); a NIC no lease names is looked
        up in the host's ARP table, and, when the guest agent is connected, asked of the guest.
        """
        wanted = set(names)
        self._arp_cache = None
        try:
            domains = [
                d
                for d in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                if d.name() in wanted
            ]
            leases = self._dhcp_leases()
        except libvirt.libvirtError as e:
            raise BackendUnavailableError(f"libvirt addresses: {e.get_error_message()}") from e
        found: dict[str, dict[str, list[str]]] = {}
        for dom in domains:
            known = self._addresses_of(dom, leases)
            if known:
                found[dom.name()] = known
        return found

    def _addresses_of(
        self, dom: libvirt.virDomain, leases: Mapping[str, list[str]]
    ) -> dict[str, list[str]]:
        """One domain's MAC -> addresses: its leases, then ARP, then its agent."""
        try:
            root = ET.fromstring(dom.XMLDesc(0))  # noqa: S314 - libvirtd's own output
        except libvirt.libvirtError:
            return {}  # gone while we looked
        macs = [(m.get("address") or "").lower() for m in root.findall("devices/interface/mac")]
        known = {mac: list(leases[mac]) for mac in macs if mac in leases}
        for source in _address_sources(root):
            if all(mac in known for mac in macs):
                break
            for mac, addrs in self._domain_addresses(dom, source).items():
                if mac in macs and mac not in known:
                    known[mac] = addrs
            if source == libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP:
                # libvirt reads ARP over netlink, which some kernels refuse ("wrong nlmsg
                # len"); the kernel's own table says the same.
                arp = self._host_arp()
                known |= {mac: arp[mac] for mac in macs if mac not in known and mac in arp}
        return known

    def _host_arp(self) -> dict[str, list[str]]:
        """MAC -> IPv4 addresses in the host's ARP table (/proc/net/arp), read once per call."""
        if self._arp_cache is None:
            self._arp_cache = parse_proc_arp(_read_text(self.proc_arp))
        return self._arp_cache

    def _dhcp_leases(self) -> dict[str, list[str]]:
        leases: dict[str, list[str]] = {}
        for net in self.conn.listAllNetworks(libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE):
            try:
                entries: list[dict[str, Any]] = net.DHCPLeases()  # pyright: ignore[reportAssignmentType]
            except libvirt.libvirtError as e:
                logger.info("DHCP leases of network %s not read: %s", net.name(), e)
                continue
            for lease in entries:
                mac = str(lease.get("mac") or "").lower()
                if mac and lease.get("ipaddr"):
                    leases.setdefault(mac, []).append(str(lease["ipaddr"]))
        return leases

    def _domain_addresses(self, dom: libvirt.virDomain, source: int) -> dict[str, list[str]]:
        """MAC -> addresses from one of libvirt's sources; {} when it cannot say."""
        try:
            if source == libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT:
                # A connected agent that hangs must not hold the hook.
                dom.agentSetResponseTimeout(AGENT_TIMEOUT_S, 0)
            interfaces: dict[str, Any] = dom.interfaceAddresses(source, 0) or {}  # pyright: ignore[reportAssignmentType]
        except libvirt.libvirtError as e:
            logger.debug("addresses of %s from source %d: %s", dom.name(), source, e)
            return {}
        out: dict[str, list[str]] = {}
        for info in interfaces.values():
            mac = str(info.get("hwaddr") or "").lower()
            addrs = [str(a.get("addr")) for a in info.get("addrs") or [] if a.get("addr")]
            if mac and addrs:
                out.setdefault(mac, []).extend(addrs)
        return out

    # -- usage counters

    def vm_stats(self) -> list[VmStats]:
        """Return CPU, memory, block and network counters of every running domain.

        One getAllDomainStats call (libvirt's bulk stats), so a scrape costs one round trip
        whatever the number of VMs.
        """
        wanted = (
            libvirt.VIR_DOMAIN_STATS_STATE
            | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_BALLOON
            | libvirt.VIR_DOMAIN_STATS_BLOCK
            | libvirt.VIR_DOMAIN_STATS_INTERFACE
        )
        try:
            found = self.conn.getAllDomainStats(
                wanted, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
            )
        except libvirt.libvirtError as e:
            raise BackendUnavailableError(f"libvirt domain stats: {e.get_error_message()}") from e
        return sorted(
            (stats_from_record(dom.name(), rec) for dom, rec in found), key=lambda s: s.name
        )


_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)

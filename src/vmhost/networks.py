"""Host networking for vm-host: what the host's interfaces are, and where a guest NIC attaches.

Discovery reads kernel facts only (sysfs, /proc/net/vlan, iproute2 JSON) and changes nothing,
so it is safe on every hook. Matching (`resolve`) is pure: it turns a request's InterfaceSpecs
into NicAttachment records against a list of HostNics, so the charm, the backends and the tests
share one set of rules, the ones MAAS users know (bridge first, then macvtap on a bond or
physical NIC, then an SR-IOV VF when asked for).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from vmhost.constraints import guest_interface_name
from vmhost.model import (
    AttachmentKind,
    HostNic,
    InterfaceMode,
    InterfaceSpec,
    InvalidRequestError,
    NicAttachment,
    NicKind,
    VmHostError,
)
from vmhost.settings import split_names

IP_BINARY_CANDIDATES = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")
"""Where iproute2's `ip` lives on Debian and Ubuntu (usr-merged or not)."""

IFNAMSIZ = 16
"""Kernel limit on interface names, terminating NUL included (so 15 usable characters)."""

_IP_TIMEOUT_S = 30

# Scopes that can never be a guest's network: link-local addresses exist on every interface and
# host-scope ones only on loopback, so keeping them would make every IPv6 subnet match ambiguous.
_SKIPPED_SCOPES = frozenset({"link", "host"})


# ---------------------------------------------------------------------------------------------
# iproute2


def find_ip_binary() -> str | None:
    """Return the absolute path of iproute2's `ip`, or None on a host without it."""
    for candidate in IP_BINARY_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _run_ip(args: Sequence[str]) -> str:
    binary = find_ip_binary()
    if binary is None:
        raise VmHostError(
            "iproute2 is not installed (no ip binary in "
            f"{', '.join(IP_BINARY_CANDIDATES)}); install the iproute2 package"
        )
    try:
        done = subprocess.run(
            [binary, *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT_S,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        raise VmHostError(f"'{binary} {' '.join(args)}' failed: {exc}") from exc
    return done.stdout


def _load_json_list(text: str, what: str) -> list[dict[str, object]]:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise VmHostError(f"cannot parse the JSON output of {what}: {exc}") from exc
    if not isinstance(data, list):
        raise VmHostError(f"the JSON output of {what} is not a list")
    return [entry for entry in data if isinstance(entry, dict)]


def parse_ip_addr_json(text: str) -> dict[str, tuple[str, ...]]:
    """Parse `ip -j addr show` into interface name -> addresses with prefix.

    Link-local and host-scope addresses are left out: they say nothing about which network an
    interface is on. Interfaces without an address still appear, with an empty tuple, so a
    caller can tell "no address" from "not seen".

    Args:
        text: the command's standard output.

    Returns:
        For example {"br0": ("10.0.5.2/24", "fd00::2/64"), "eth0": ()}.

    Raises:
        VmHostError: the text is not the JSON list iproute2 prints.
    """
    result: dict[str, tuple[str, ...]] = {}
    for link in _load_json_list(text, "ip -j addr show"):
        name = link.get("ifname")
        if not isinstance(name, str):
            continue
        addresses: list[str] = []
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else []:
            if not isinstance(info, dict) or info.get("scope") in _SKIPPED_SCOPES:
                continue
            local, prefix = info.get("local"), info.get("prefixlen")
            if info.get("family") not in ("inet", "inet6") or not isinstance(local, str):
                continue
            if not isinstance(prefix, int):
                continue
            try:
                addresses.append(str(ipaddress.ip_interface(f"{local}/{prefix}")))
            except ValueError:
                continue
        result[name] = tuple(addresses)
    return result


def parse_ip_link_json(text: str) -> dict[str, tuple[int, str | None]]:
    """Parse `ip -j -d link show` into VLAN interface name -> (VLAN id, lower device).

    Used when /proc/net/vlan is not readable (it is absent in unprivileged containers and
    when the 8021q module exposes no proc entries). Links of other kinds are left out.

    Args:
        text: the command's standard output (the -d flag is needed for linkinfo).

    Returns:
        For example {"eth0.100": (100, "eth0")}; the lower device is None when iproute2
        could not name it (a lower device in another namespace).

    Raises:
        VmHostError: the text is not the JSON list iproute2 prints.
    """
    result: dict[str, tuple[int, str | None]] = {}
    for link in _load_json_list(text, "ip -j -d link show"):
        name = link.get("ifname")
        info = link.get("linkinfo")
        if not isinstance(name, str) or not isinstance(info, dict):
            continue
        if info.get("info_kind") != "vlan":
            continue
        data = info.get("info_data")
        vlan_id = data.get("id") if isinstance(data, dict) else None
        if not isinstance(vlan_id, int):
            continue
        lower = link.get("link")
        result[name] = (vlan_id, lower if isinstance(lower, str) else None)
    return result


def read_addresses() -> dict[str, tuple[str, ...]]:
    """Run `ip -j addr show` and return interface name -> addresses with prefix.

    Raises:
        VmHostError: iproute2 is missing or the command failed.
    """
    return parse_ip_addr_json(_run_ip(["-j", "addr", "show"]))


def read_vlan_links() -> dict[str, tuple[int, str | None]]:
    """Run `ip -j -d link show` and return VLAN interface name -> (VLAN id, lower device).

    Raises:
        VmHostError: iproute2 is missing or the command failed.
    """
    return parse_ip_link_json(_run_ip(["-j", "-d", "link", "show"]))


# ---------------------------------------------------------------------------------------------
# sysfs / procfs


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        # Interfaces come and go while we read; a vanished file is "unknown", not an error.
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _uevent(path: Path) -> dict[str, str]:
    text = _read_text(path / "uevent") or ""
    pairs = (line.partition("=") for line in text.splitlines())
    return {key: value for key, sep, value in pairs if sep}


def _numa_node(device: Path) -> int | None:
    node = _read_int(device / "numa_node")
    if node is None:
        # virtio NICs hang below their PCI function; the NUMA node is on the PCI device.
        node = _read_int(device / ".." / "numa_node")
    return None if node is None or node < 0 else node


_PROC_VID = re.compile(r"\bVID:\s*(\d+)")
_PROC_DEVICE = re.compile(r"^Device:\s*(\S+)", re.MULTILINE)


def _proc_vlan(proc_root: Path, name: str) -> tuple[int | None, str | None]:
    text = _read_text(proc_root / "net" / "vlan" / name)
    if not text:
        return None, None
    vid = _PROC_VID.search(text)
    device = _PROC_DEVICE.search(text)
    return (int(vid.group(1)) if vid else None, device.group(1) if device else None)


def _speed_mbps(path: Path) -> int | None:
    # Reading `speed` fails with EINVAL on a link that is down or has no PHY; -1 means unknown.
    speed = _read_int(path / "speed")
    return speed if speed is not None and speed > 0 else None


def _lower_from_sysfs(path: Path) -> str | None:
    lowers = sorted(p.name[len("lower_") :] for p in path.glob("lower_*"))
    return lowers[0] if len(lowers) == 1 else None


def _physfn_name(device: Path) -> str | None:
    names = sorted(p.name for p in (device / "physfn" / "net").glob("*"))
    return names[0] if names else None


def _kind(path: Path, uevent: Mapping[str, str]) -> NicKind:
    if (path / "bridge").is_dir():
        return NicKind.BRIDGE
    if (path / "bonding").is_dir():
        return NicKind.BOND
    if uevent.get("DEVTYPE") == "vlan":
        return NicKind.VLAN
    device = path / "device"
    if (device / "physfn").exists():
        return NicKind.VF
    if device.exists():
        return NicKind.PHYSICAL
    return NicKind.VIRTUAL


def discover_nics(
    sysfs_root: str | Path = "/sys",
    addresses: Mapping[str, tuple[str, ...]] | None = None,
    *,
    proc_root: str | Path = "/proc",
    vlan_links: Mapping[str, tuple[int, str | None]] | None = None,
) -> tuple[HostNic, ...]:
    """Describe the host's network interfaces from the kernel, sorted by name.

    Reads `<sysfs_root>/class/net/*` (kind, MAC, NUMA node, SR-IOV counts, master, PF,
    operstate, speed) and
    `<proc_root>/net/vlan/*` (VLAN id and lower device). Loopback is skipped. Nothing is
    changed on the host.

    Args:
        sysfs_root: where sysfs is mounted; a fake tree in tests.
        addresses: interface name -> addresses with prefix; None reads them with
            `ip -j addr show` when iproute2 is installed (and leaves them empty otherwise).
        proc_root: where procfs is mounted.
        vlan_links: VLAN name -> (id, lower device) to use when procfs does not say; None
            runs `ip -j -d link show` if (and only if) some VLAN is still unknown.

    Returns:
        One HostNic per interface, in name order.
    """
    net = Path(sysfs_root) / "class" / "net"
    proc = Path(proc_root)
    if addresses is None:
        addresses = read_addresses() if find_ip_binary() else {}
    try:
        entries = sorted(net.iterdir(), key=lambda p: p.name)
    except OSError:
        return ()

    nics: list[HostNic] = []
    for path in entries:
        # class/net also holds plain files (bonding_masters); interfaces are directories.
        if path.name == "lo" or not path.is_dir():
            continue
        uevent = _uevent(path)
        kind = _kind(path, uevent)
        device = path / "device"
        master = _link_name(path / "master")
        vlan_id: int | None = None
        parent: str | None = None
        if kind is NicKind.VLAN:
            vlan_id, parent = _proc_vlan(proc, path.name)
            parent = parent or _lower_from_sysfs(path)
            if vlan_id is None or parent is None:
                if vlan_links is None:
                    vlan_links = read_vlan_links() if find_ip_binary() else {}
                known_id, known_lower = vlan_links.get(path.name, (None, None))
                vlan_id = vlan_id if vlan_id is not None else known_id
                parent = parent or known_lower
        elif kind is NicKind.VF:
            parent = _physfn_name(device)
        if parent is None:
            parent = master
        has_device = device.exists()
        nics.append(
            HostNic(
                name=path.name,
                kind=kind,
                numa_node=_numa_node(device) if has_device else None,
                sriov_total_vfs=(_read_int(device / "sriov_totalvfs") or 0) if has_device else 0,
                sriov_enabled_vfs=(_read_int(device / "sriov_numvfs") or 0) if has_device else 0,
                mac=_read_text(path / "address") or None,
                addresses=tuple(addresses.get(path.name, ())),
                vlan_id=vlan_id,
                parent=parent,
                master=master,
                link=_read_text(path / "operstate") or None,
                speed_mbps=_speed_mbps(path),
            )
        )
    return tuple(nics)


# ---------------------------------------------------------------------------------------------
# Names


def validate_ifname(name: object, field_name: str, what: str = "interface name") -> str:
    """Check a Linux interface name the way the kernel does (dev_valid_name) before it is used.

    Args:
        name: the candidate name.
        field_name: the field to blame in the error.
        what: how the message calls the value ("bridge", "parent", ...).

    Returns:
        The name, unchanged.

    Raises:
        InvalidRequestError: the kernel would refuse the name.
    """
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(
            field_name, f"{what} must be a non-empty interface name such as 'br0', got {name!r}"
        )
    if len(name) >= IFNAMSIZ:
        raise InvalidRequestError(
            field_name,
            f"{what} {name!r} is {len(name)} characters; Linux interface names have at most "
            f"{IFNAMSIZ - 1}",
        )
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise InvalidRequestError(
            field_name,
            f"{what} {name!r} is not a valid interface name: it must not be '.' or '..' nor "
            "contain '/', ':' or whitespace",
        )
    return name


# ---------------------------------------------------------------------------------------------
# The `networks` config option


_SPACE_NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_NETWORKS_EXAMPLE = (
    "for example 'oam: {bridge: br-oam}', 'data: {parent: bond0, mode: macvtap}' or "
    "'fast: {sriov-pf: enp1s0f0, vlan: 100}'"
)
_DEVICE_KEYS = ("bridge", "parent", "sriov-pf")
_ALLOWED_KEYS = {
    "bridge": {"bridge"},
    "parent": {"parent", "mode"},
    "sriov-pf": {"sriov-pf", "vlan"},
}


def parse_allowed_interfaces(text: str) -> frozenset[str]:
    """The `allowed-host-interfaces` option: host interfaces relation requests may name.

    Comma- or space-separated interface names ("br-data, eno2"); empty allows none.

    Raises:
        InvalidRequestError: field "allowed-host-interfaces", a name the kernel would refuse.
    """
    names = split_names(text)
    for name in names:
        validate_ifname(name, "allowed-host-interfaces")
    return frozenset(names)


@dataclass(frozen=True)
class NetworkMapping:
    """Where guests asking for one Juju space attach on this host (one `networks` entry)."""

    space: str
    kind: AttachmentKind
    """BRIDGE for {bridge}, DIRECT for {parent, mode: macvtap}, HOSTDEV for {sriov-pf}."""
    device: str
    """The host bridge, macvtap parent or SR-IOV PF."""
    vlan: int | None = None
    """VLAN tag set on the VF (sriov-pf entries only)."""

    @property
    def mode(self) -> InterfaceMode:
        """The interface mode this entry implies."""
        return _MODE_OF_KIND[self.kind]

    def describe(self) -> str:
        """Say where the space goes, for messages ("bridge br-oam")."""
        words = {
            AttachmentKind.BRIDGE: "bridge",
            AttachmentKind.DIRECT: "macvtap on",
            AttachmentKind.HOSTDEV: "SR-IOV VF of",
        }[self.kind]
        vlan = f" vlan {self.vlan}" if self.vlan is not None else ""
        return f"{words} {self.device}{vlan}"


_MODE_OF_KIND = {
    AttachmentKind.BRIDGE: InterfaceMode.BRIDGE,
    AttachmentKind.DIRECT: InterfaceMode.MACVTAP,
    AttachmentKind.HOSTDEV: InterfaceMode.SRIOV,
}


def _parse_vlan(value: object, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4094:
        raise InvalidRequestError(
            field_name, f"vlan must be a whole number from 1 to 4094, got {value!r}"
        )
    return value


def _parse_network_entry(space: str, entry: object) -> NetworkMapping:
    field_name = "networks"
    where = f"space {space!r}"
    if not isinstance(entry, dict):
        raise InvalidRequestError(
            field_name, f"{where} must map to a mapping, not {entry!r}; {_NETWORKS_EXAMPLE}"
        )
    keys = [k for k in _DEVICE_KEYS if k in entry]
    if len(keys) != 1:
        raise InvalidRequestError(
            field_name,
            f"{where} must have exactly one of bridge, parent or sriov-pf (it has "
            f"{', '.join(map(str, entry)) or 'none'}); {_NETWORKS_EXAMPLE}",
        )
    key = keys[0]
    unknown = sorted(str(k) for k in entry if k not in _ALLOWED_KEYS[key])
    if unknown:
        allowed = ", ".join(sorted(_ALLOWED_KEYS[key]))
        raise InvalidRequestError(
            field_name,
            f"{where}: unknown key(s) {', '.join(unknown)} next to {key} (allowed: {allowed}); "
            f"{_NETWORKS_EXAMPLE}",
        )
    device = validate_ifname(entry[key], field_name, f"{where}: {key}")
    if key == "bridge":
        return NetworkMapping(space, AttachmentKind.BRIDGE, device)
    if key == "parent":
        mode = entry.get("mode", InterfaceMode.MACVTAP.value)
        if mode != InterfaceMode.MACVTAP.value:
            raise InvalidRequestError(
                field_name,
                f"{where}: mode {mode!r} is not supported with parent; use 'mode: macvtap', "
                "'bridge: <name>' for a bridge or 'sriov-pf: <name>' for SR-IOV",
            )
        return NetworkMapping(space, AttachmentKind.DIRECT, device)
    vlan = entry.get("vlan")
    if vlan is not None:
        vlan = _parse_vlan(vlan, field_name)
    return NetworkMapping(space, AttachmentKind.HOSTDEV, device, vlan)


def parse_networks_config(text: str | None) -> dict[str, NetworkMapping]:
    """Parse the `networks` config option: YAML mapping Juju space -> host attachment.

    Accepted entries: `{bridge: NAME}`, `{parent: NAME, mode: macvtap}` (mode may be left out)
    and `{sriov-pf: NAME, vlan: N}` (vlan optional). An empty option maps nothing.

    Args:
        text: the option's value.

    Returns:
        Space name -> NetworkMapping, in space name order.

    Raises:
        InvalidRequestError: with field "networks" and the exact fix.
    """
    if text is None or not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InvalidRequestError(
            "networks", f"is not valid YAML{where}; give a mapping, {_NETWORKS_EXAMPLE}"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidRequestError(
            "networks",
            f"must be a YAML mapping of space name to attachment, not a {type(data).__name__}; "
            f"{_NETWORKS_EXAMPLE}",
        )
    result: dict[str, NetworkMapping] = {}
    for space in sorted(data, key=str):
        if not isinstance(space, str) or not _SPACE_NAME.match(space):
            raise InvalidRequestError(
                "networks",
                f"{space!r} is not a Juju space name (lower-case letters, digits and single "
                "hyphens, such as 'oam' or 'storage-data')",
            )
        result[space] = _parse_network_entry(space, data[space])
    return result


def check_networks_on_host(
    networks: Mapping[str, NetworkMapping], nics: Sequence[HostNic]
) -> list[str]:
    """Return what is wrong with a `networks` mapping on this host, one sentence per problem.

    The charm shows these as Blocked status (the operator must create the device or change the
    option); an empty list means every mapped space can be served.
    """
    host = _Host(nics)
    problems: list[str] = []
    for mapping in networks.values():
        try:
            host.check_mapping(mapping, "networks")
        except InvalidRequestError as exc:
            problems.append(str(exc))
    return problems


def default_network_problem(
    default_network: str, networks: Mapping[str, NetworkMapping], nics: Sequence[HostNic]
) -> str | None:
    """Why config `default-network` cannot be used on this host, or None when it can.

    It names a space of `networks` (checked there) or a bridge that must exist here.
    """
    if not default_network or default_network in networks:
        return None
    nic = next((n for n in nics if n.name == default_network), None)
    if nic is not None and nic.kind is NicKind.BRIDGE:
        return None
    what = "no interface" if nic is None else f"a {nic.kind.value} interface, not a bridge"
    spaces = ", ".join(sorted(networks)) or "none"
    return (
        f"default-network {default_network!r} is not a space in networks (spaces: {spaces}) "
        f"and this host has {what} of that name; create the bridge or fix with juju config "
        "vm-host default-network=<space or bridge>"
    )


# ---------------------------------------------------------------------------------------------
# Matching requests to host interfaces

_KIND_RANK = {
    NicKind.BRIDGE: 0,
    NicKind.BOND: 1,
    NicKind.PHYSICAL: 2,
    NicKind.VLAN: 3,
    NicKind.VF: 4,
    NicKind.VIRTUAL: 5,
}
_MAX_DEPTH = 8
"""Bound on master/lower chains, so a corrupt or cyclic description cannot loop forever."""


class _Host:
    """An index over HostNics answering the questions matching asks."""

    def __init__(self, nics: Sequence[HostNic]):
        self.nics = {n.name: n for n in nics}

    def get(self, name: str) -> HostNic | None:
        return self.nics.get(name)

    def master_of(self, name: str) -> str | None:
        nic = self.nics.get(name)
        if nic is None:
            return None
        if nic.master:
            return nic.master
        # HostNics built without `master` (older callers) carry a port's master in `parent`.
        if nic.parent and nic.kind not in (NicKind.VLAN, NicKind.VF):
            upper = self.nics.get(nic.parent)
            if upper is not None and upper.kind in (NicKind.BRIDGE, NicKind.BOND):
                return upper.name
        return None

    def uppers(self, name: str) -> list[str]:
        """The chain of masters above an interface, nearest first."""
        chain: list[str] = []
        current = self.master_of(name)
        while current is not None and current not in chain and len(chain) < _MAX_DEPTH:
            chain.append(current)
            current = self.master_of(current)
        return chain

    def top(self, name: str) -> str:
        chain = self.uppers(name)
        return chain[-1] if chain else name

    def bridge_above(self, name: str) -> str | None:
        """The bridge a guest tap should join for this interface: itself, or a master above."""
        for candidate in (name, *self.uppers(name)):
            nic = self.nics.get(candidate)
            if nic is not None and nic.kind is NicKind.BRIDGE:
                return candidate
        return None

    def ports(self, name: str) -> list[str]:
        return sorted(n for n in self.nics if self.master_of(n) == name)

    def pf_below(self, name: str) -> HostNic | None:
        """The SR-IOV physical function carrying this interface's traffic, if any."""
        queue, seen = [name], set()
        while queue and len(seen) < 64:
            current = queue.pop(0)
            if current in seen:
                continue
            seen.add(current)
            nic = self.nics.get(current)
            if nic is None:
                continue
            if nic.sriov_total_vfs > 0:
                return nic
            if nic.kind in (NicKind.VF, NicKind.VLAN) and nic.parent:
                queue.append(nic.parent)
            elif nic.kind in (NicKind.BRIDGE, NicKind.BOND):
                queue.extend(self.ports(current))
        return None

    def vlan_of(self, name: str) -> int | None:
        nic = self.nics.get(name)
        return nic.vlan_id if nic is not None and nic.kind is NicKind.VLAN else None

    def carrying(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str]:
        """Interfaces with an address inside the given network."""
        found = []
        for nic in self.nics.values():
            for text in nic.addresses:
                iface = _interface(text)
                if iface is not None and iface.ip in network:
                    found.append(nic.name)
                    break
        return found

    def subnets(self) -> list[tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, str]]:
        """(address with prefix, interface) for every host address, in a stable order."""
        found = []
        for nic in self.nics.values():
            for text in nic.addresses:
                iface = _interface(text)
                if iface is not None:
                    found.append((iface, nic.name))
        return sorted(found, key=lambda pair: (pair[0].version, pair[0].network, pair[1]))

    def pick(self, names: Sequence[str]) -> str:
        """Choose among interfaces matching one constraint: MAAS's preference, then name."""
        return min(names, key=lambda n: (_KIND_RANK.get(self.nics[n].kind, 9), n))

    def check_mapping(self, mapping: NetworkMapping, field_name: str) -> None:
        nic = self.nics.get(mapping.device)
        where = f"the networks option maps space {mapping.space!r} to {mapping.describe()}"
        if nic is None:
            raise InvalidRequestError(
                field_name,
                f"{where}, but this host has no interface {mapping.device!r}; create it or fix "
                "the networks option",
            )
        if mapping.kind is AttachmentKind.BRIDGE and nic.kind is not NicKind.BRIDGE:
            raise InvalidRequestError(
                field_name,
                f"{where}, but {mapping.device} is a {nic.kind.value} interface, not a bridge; "
                f"use 'parent: {mapping.device}' for macvtap or name a bridge",
            )
        if mapping.kind is AttachmentKind.HOSTDEV and nic.sriov_total_vfs <= 0:
            raise InvalidRequestError(
                field_name,
                f"{where}, but {mapping.device} has no SR-IOV virtual functions "
                "(sriov_totalvfs is 0); name an SR-IOV capable NIC",
            )

    def offers(self, networks: Mapping[str, NetworkMapping], bindings: Mapping[str, str]) -> str:
        """Everything a request could name on this host, for error messages."""
        spaces = [f"{s} ({m.describe()})" for s, m in sorted(networks.items())]
        spaces += [
            f"{s} (interface {dev})" for s, dev in sorted(bindings.items()) if s not in networks
        ]
        subnets = [f"{iface.network} on {name}" for iface, name in self.subnets()]
        vlans = []
        for nic in sorted(self.nics.values(), key=lambda n: (n.vlan_id or 0, n.name)):
            if nic.kind is NicKind.VLAN and nic.vlan_id is not None:
                bridge = self.bridge_above(nic.name)
                vlans.append(
                    f"{nic.vlan_id} on {nic.name}" + (f" (bridge {bridge})" if bridge else "")
                )
        bridges = sorted(n.name for n in self.nics.values() if n.kind is NicKind.BRIDGE)
        pfs = sorted(
            f"{n.name} ({n.sriov_total_vfs} VFs)"
            for n in self.nics.values()
            if n.sriov_total_vfs > 0
        )
        parts = [
            ("spaces", spaces),
            ("subnets", subnets),
            ("VLANs", vlans),
            ("bridges", bridges),
            ("SR-IOV PFs", pfs),
        ]
        return "this host offers " + "; ".join(
            f"{title}: {', '.join(items) if items else 'none'}" for title, items in parts
        )


def _interface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# NUMA locality of host devices (show-resources, list-vms)

_LISTED_KINDS = (NicKind.PHYSICAL, NicKind.BOND)


def listed_nics(nics: Sequence[HostNic]) -> list[HostNic]:
    """The host NICs show-resources lists: physical NICs, bonds and the ports of bridges.

    VFs are counted on their PF, and virtual links (guest taps, veths) have no hardware and
    no NUMA node, so neither gets a row of its own; a VLAN that is a bridge's port does.
    """
    host = _Host(nics)
    shown = []
    for nic in sorted(nics, key=lambda n: n.name):
        master = host.get(host.master_of(nic.name) or "")
        bridge_port = master is not None and master.kind is NicKind.BRIDGE
        if nic.kind in _LISTED_KINDS or (bridge_port and nic.kind is NicKind.VLAN):
            shown.append(nic)
    return shown


def device_nodes(nics: Sequence[HostNic], name: str) -> tuple[int, ...]:
    """The NUMA nodes of the hardware carrying a host device's traffic, sorted.

    A PCI NIC or VF has its own node; a bridge or bond is where its ports' hardware is, a VLAN
    where its lower device is. A device with no hardware below it (a bridge of veths, a tap)
    or whose firmware names no node has none: an empty tuple.
    """
    host = _Host(nics)
    nodes: set[int] = set()
    queue, seen = [name], set[str]()
    while queue and len(seen) < 64:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        nic = host.get(current)
        if nic is None:
            continue
        if nic.numa_node is not None:
            nodes.add(nic.numa_node)
        elif nic.kind is NicKind.VLAN and nic.parent:
            queue.append(nic.parent)
        elif nic.kind in (NicKind.BRIDGE, NicKind.BOND):
            queue.extend(host.ports(current))
    return tuple(sorted(nodes))


def ports_of(nics: Sequence[HostNic], name: str) -> list[str]:
    """The ports of a bridge or bond (every interface whose master it is), sorted."""
    return _Host(nics).ports(name)


def host_device(attached_to: str) -> str:
    """The host interface a VM NIC's recorded attached-to names.

    A bridge, macvtap parent or LXD parent is recorded by name; an SR-IOV VF as
    "enp59s0f0/vf3 (0000:3b:02.1)", whose device is the PF. Interface names hold neither '/'
    nor spaces, so the name is what precedes the first of them.
    """
    return attached_to.split(" ", 1)[0].split("/", 1)[0]


@dataclass
class _Claim:
    """One constraint of a request and the host interface it points at."""

    constraint: str
    device: str


@dataclass
class _Matcher:
    """Resolves one InterfaceSpec; holds the context every rule needs."""

    spec: InterfaceSpec
    host: _Host
    networks: Mapping[str, NetworkMapping]
    bindings: Mapping[str, str]
    default_bridge: str | None

    @property
    def field(self) -> str:
        return f"interfaces.{self.spec.label}"

    def fail(self, message: str, *, offers: bool = False) -> InvalidRequestError:
        if offers:
            message = f"{message}; {self.host.offers(self.networks, self.bindings)}"
        return InvalidRequestError(self.field, message)

    def existing(self, name: str, what: str) -> HostNic:
        validate_ifname(name, self.field, what)
        nic = self.host.get(name)
        if nic is None:
            raise self.fail(f"{what} {name!r} does not exist on this host", offers=True)
        return nic

    # -- constraints -> claims

    def claims(self) -> tuple[list[_Claim], NetworkMapping | None, str | None]:
        spec = self.spec
        claims: list[_Claim] = []
        mapping: NetworkMapping | None = None
        ip_text: str | None = None
        if spec.bridge and spec.parent:
            raise self.fail("give bridge or parent, not both")
        if spec.bridge:
            claims.append(self.bridge_claim(spec.bridge))
        if spec.parent:
            self.existing(spec.parent, "parent")
            claims.append(_Claim(f"parent={spec.parent}", spec.parent))
        if spec.space:
            claim, mapping = self.space_claim(spec.space)
            claims.append(claim)
        if spec.subnet:
            claims.append(self.subnet_claim(spec.subnet))
        if spec.vlan is not None:
            claim = self.vlan_claim(spec.vlan, mapping)
            if claim is not None:
                claims.append(claim)
        if spec.ip:
            claim, ip_text = self.ip_claim(spec.ip)
            claims.append(claim)
        return claims, mapping, ip_text

    def bridge_claim(self, bridge: str) -> _Claim:
        nic = self.existing(bridge, "bridge")
        if nic.kind is not NicKind.BRIDGE:
            raise self.fail(
                f"bridge {bridge!r} is a {nic.kind.value} interface, not a bridge; "
                f"use parent={bridge} for macvtap or name a bridge",
                offers=True,
            )
        return _Claim(f"bridge={bridge}", bridge)

    def space_claim(self, space: str) -> tuple[_Claim, NetworkMapping | None]:
        mapping = self.networks.get(space)
        if mapping is not None:
            self.host.check_mapping(mapping, self.field)
            return _Claim(f"space={space}", mapping.device), mapping
        if space in self.bindings:
            device = self.bindings[space]
            if self.host.get(device) is None:
                raise self.fail(
                    f"space {space!r} is bound to host interface {device!r}, which "
                    "does not exist; map the space in the networks option",
                    offers=True,
                )
            return _Claim(f"space={space}", device), None
        raise self.fail(
            f"this host cannot reach space {space!r} (not in the networks option "
            "and the vms endpoint is not bound to it)",
            offers=True,
        )

    def subnet_claim(self, subnet: str) -> _Claim:
        try:
            network = ipaddress.ip_network(subnet, strict=False)
        except ValueError as exc:
            raise self.fail(f"subnet {subnet!r} is not a CIDR such as 10.0.5.0/24") from exc
        found = self.host.carrying(network)
        if not found:
            raise self.fail(f"no host interface has an address in subnet {network}", offers=True)
        return _Claim(f"subnet={network}", self.host.pick(found))

    def vlan_claim(self, vlan: int, mapping: NetworkMapping | None) -> _Claim | None:
        if isinstance(vlan, bool) or not isinstance(vlan, int) or not 0 <= vlan <= 4094:
            raise self.fail(f"vlan must be a whole number from 0 to 4094, got {vlan!r}")
        found = [n.name for n in self.host.nics.values() if self.host.vlan_of(n.name) == vlan]
        if found:
            # Prefer the VLAN interface that sits in a bridge: the guest can join that bridge.
            bridged = [n for n in found if self.host.bridge_above(n)]
            return _Claim(f"vlan={vlan}", min(bridged or found))
        # SR-IOV can tag the VF itself, so a VLAN needs no host sub-interface there.
        if mapping is not None and mapping.kind is AttachmentKind.HOSTDEV:
            if mapping.vlan not in (None, vlan):
                raise self.fail(
                    f"vlan {vlan} disagrees with space {mapping.space!r}, which the networks "
                    f"option maps to {mapping.describe()}"
                )
            return None
        if self.spec.mode is InterfaceMode.SRIOV and self.spec.parent:
            return None
        raise self.fail(f"this host has no interface on VLAN {vlan}", offers=True)

    def ip_claim(self, ip: str) -> tuple[_Claim, str]:
        try:
            address = ipaddress.ip_address(ip.split("/", 1)[0] if "/" in ip else ip)
        except ValueError as exc:
            raise self.fail(f"ip {ip!r} is not an IPv4 or IPv6 address") from exc
        matches = [
            (iface, name)
            for iface, name in self.host.subnets()
            if address in iface.network and iface.network.prefixlen < iface.max_prefixlen
        ]
        if not matches:
            raise self.fail(f"no host interface is on a subnet containing {address}", offers=True)
        for iface, name in matches:
            if iface.ip == address:
                raise self.fail(f"ip {address} is the host's own address on {name}")
        # The most specific subnet wins, as routing would choose it.
        network = max((iface.network for iface, _ in matches), key=lambda n: n.prefixlen)
        if (
            isinstance(network, ipaddress.IPv4Network)
            and network.prefixlen <= 30
            and address in (network.network_address, network.broadcast_address)
        ):
            raise self.fail(
                f"ip {address} is the network or broadcast address of {network}; pick a host "
                "address inside it"
            )
        if self.spec.subnet:
            requested = ipaddress.ip_network(self.spec.subnet, strict=False)
            if address not in requested:
                raise self.fail(f"ip {address} is not inside the requested subnet {requested}")
        device = self.host.pick([name for iface, name in matches if iface.network == network])
        return _Claim(f"ip={address}", device), f"{address}/{network.prefixlen}"

    # -- claims -> attachment

    def resolve(self) -> NicAttachment:
        spec = self.spec
        guest = validate_ifname(
            guest_interface_name(spec.label), self.field, "guest interface name"
        )
        claims, mapping, ip_text = self.claims()
        if not claims and mapping is None:
            if self.default_bridge is None:
                raise self.fail(
                    "has no constraint; give one of space, subnet, vlan, ip, bridge or parent",
                    offers=True,
                )
            nic = self.existing(self.default_bridge, "default bridge")
            if nic.kind is not NicKind.BRIDGE:
                raise self.fail(f"default bridge {self.default_bridge!r} is not a bridge")
            claims = [_Claim(f"default bridge {self.default_bridge}", self.default_bridge)]
        kind, source, vlan = self.attachment(claims, mapping)
        self.check_agreement(claims, kind)
        return NicAttachment(
            label=spec.label,
            kind=kind,
            source=source,
            vlan=vlan,
            ip=ip_text,
            guest_name=guest,
            space=self.space_of(kind, source),
            subnet=self.subnet_of(kind, source, ip_text),
        )

    def space_of(self, kind: AttachmentKind, source: str) -> str | None:
        if self.spec.space:
            return self.spec.space
        spaces = [m.space for m in self.networks.values() if (m.kind, m.device) == (kind, source)]
        return spaces[0] if len(spaces) == 1 else None

    def subnet_of(self, kind: AttachmentKind, source: str, ip_text: str | None) -> str | None:
        if self.spec.subnet:
            return str(ipaddress.ip_network(self.spec.subnet, strict=False))
        if ip_text:
            return str(ipaddress.ip_interface(ip_text).network)
        if kind is AttachmentKind.HOSTDEV:
            return None  # a VF (tagged or not) need not be on the PF's own subnets
        nic = self.host.get(source)
        found = {iface.network for iface in map(_interface, nic.addresses if nic else ()) if iface}
        v4 = [n for n in found if n.version == 4]
        pick = v4 if v4 else list(found)
        return str(pick[0]) if len(pick) == 1 else None

    def attachment(
        self, claims: list[_Claim], mapping: NetworkMapping | None
    ) -> tuple[AttachmentKind, str, int | None]:
        spec = self.spec
        mode = spec.mode
        if mapping is not None:
            if mode is not None and mode is not mapping.mode:
                raise self.fail(
                    f"mode {mode.value} disagrees with space {mapping.space!r}, which the "
                    f"networks option maps to {mapping.describe()}"
                )
            if mapping.kind is AttachmentKind.HOSTDEV:
                vlan = mapping.vlan if mapping.vlan is not None else spec.vlan
                return mapping.kind, mapping.device, vlan
            return mapping.kind, mapping.device, None
        if spec.bridge:
            if mode not in (None, InterfaceMode.BRIDGE):
                raise self.fail(
                    f"mode {mode.value} cannot attach to bridge {spec.bridge}; drop the mode "
                    "or use parent instead of bridge"
                )
            return AttachmentKind.BRIDGE, spec.bridge, None
        if mode is None and spec.parent:
            mode = InterfaceMode.MACVTAP
        return self.device_attachment(claims[0].device, mode)

    def device_attachment(
        self, device: str, mode: InterfaceMode | None
    ) -> tuple[AttachmentKind, str, int | None]:
        if mode is InterfaceMode.SRIOV:
            return self.sriov(device)
        bridge = self.host.bridge_above(device)
        if mode is InterfaceMode.BRIDGE and bridge is None:
            raise self.fail(
                f"mode bridge needs a bridge, but {device} is not a bridge nor a port of "
                f"one; create a bridge over {device} or use mode macvtap",
                offers=True,
            )
        if mode is InterfaceMode.MACVTAP or bridge is None:
            return AttachmentKind.DIRECT, self.macvtap_parent(device), None
        return AttachmentKind.BRIDGE, bridge, None

    def macvtap_parent(self, device: str) -> str:
        # The kernel refuses a macvlan on a bridge or bond port (the port's receive handler is
        # taken), so macvtap goes on the topmost master instead.
        top = self.host.top(device)
        if self.spec.parent and top != device:
            raise self.fail(
                f"parent {device} is a port of {self.host.master_of(device)}; macvtap cannot "
                f"sit on a port, use parent={top}"
            )
        return top

    def sriov(self, device: str) -> tuple[AttachmentKind, str, int | None]:
        pf = self.host.pf_below(device)
        if pf is None:
            raise self.fail(
                f"mode sriov needs an SR-IOV capable NIC, and none carries {device}",
                offers=True,
            )
        vlan = self.spec.vlan if self.spec.vlan is not None else self.host.vlan_of(device)
        return AttachmentKind.HOSTDEV, pf.name, vlan

    def check_agreement(self, claims: list[_Claim], kind: AttachmentKind) -> None:
        if len(claims) < 2:
            return
        if kind is AttachmentKind.HOSTDEV:
            keys = {}
            for c in claims:
                pf = self.host.pf_below(c.device)
                keys[c.constraint] = pf.name if pf else c.device
        else:
            keys = {c.constraint: self.host.top(c.device) for c in claims}
        if len(set(keys.values())) > 1:
            detail = ", ".join(
                f"{c.constraint} -> {c.device}"
                + (f" (in {keys[c.constraint]})" if keys[c.constraint] != c.device else "")
                for c in claims
            )
            raise self.fail(
                f"constraints point at different host networks ({detail}); give constraints "
                "that meet on one host interface, or fewer of them"
            )


def resolve(
    interfaces: Sequence[InterfaceSpec],
    nics: Sequence[HostNic],
    networks: Mapping[str, NetworkMapping] | None = None,
    space_bindings: Mapping[str, str] | None = None,
    default_bridge: str | None = None,
) -> tuple[NicAttachment, ...]:
    """Decide where each requested guest NIC attaches on this host.

    Explicit `bridge`/`parent` win; a `space` goes through the `networks` option, else through
    the host interface the `vms` endpoint is bound on for that space; `subnet`, `vlan` and
    `ip` find the host interface carrying them. Every constraint given must land on the same
    host network. Without a mode the attachment follows MAAS: the bridge the interface is (or
    is a port of), else macvtap on it (on its bond when it is a bond port); SR-IOV only when
    asked. The request is all or nothing: one bad interface fails the whole call.

    Args:
        interfaces: the request's interfaces, in guest order.
        nics: the host's interfaces (discover_nics()).
        networks: the parsed `networks` option (parse_networks_config()).
        space_bindings: Juju space -> host interface the `vms` endpoint is bound on there.
        default_bridge: where an interface with no constraint goes; None makes that an error.

    Returns:
        One NicAttachment per interface, in request order; `ip` is "<address>/<prefix>" for
        an `ip` constraint, `guest_name` the in-guest name (numeric labels become ethN).

    Raises:
        InvalidRequestError: field "interfaces.<label>" and a message that says why, and for
            unreachable networks what this host offers.
    """
    host = _Host(nics)
    networks = networks or {}
    bindings = space_bindings or {}
    seen_labels: set[str] = set()
    seen_guest: dict[str, str] = {}
    seen_ips: dict[str, str] = {}
    result: list[NicAttachment] = []
    for spec in interfaces:
        field_name = f"interfaces.{spec.label}"
        if spec.label in seen_labels:
            raise InvalidRequestError(field_name, "label is used twice; labels must be unique")
        seen_labels.add(spec.label)
        attachment = _Matcher(spec, host, networks, bindings, default_bridge).resolve()
        guest = attachment.guest_name or spec.label
        if guest in seen_guest:
            raise InvalidRequestError(
                field_name,
                f"guest name {guest} is also the name of interface {seen_guest[guest]!r} "
                "(numeric labels become ethN); rename one of them",
            )
        seen_guest[guest] = spec.label
        if attachment.ip:
            address = attachment.ip.split("/", 1)[0]
            if address in seen_ips:
                raise InvalidRequestError(
                    field_name, f"ip {address} is also requested by {seen_ips[address]!r}"
                )
            seen_ips[address] = spec.label
        result.append(attachment)
    return tuple(result)

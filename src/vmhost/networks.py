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
from pathlib import Path

from vmhost.model import HostNic, NicKind, VmHostError

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

    Reads `<sysfs_root>/class/net/*` (kind, MAC, NUMA node, SR-IOV counts, master, PF) and
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
            )
        )
    return tuple(nics)

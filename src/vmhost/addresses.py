"""Each VM NIC's addresses: static ones from the request at once, learnt ones when known.

A static address (an interface's `ip`) is in the VM's ledger from the moment it is composed.
A DHCP address is known only once the guest has asked for one: the backend asks the
hypervisor (libvirt: the network's DHCP lease, then the host's ARP table, then the guest
agent; LXD: the instance state) for running VMs, and every hook that answers (update-status
included) asks again, so answers fill in as soon as the hypervisor knows.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence

from vmhost.backends import Backend, BackendUnavailableError
from vmhost.model import VmRecord, VmState

__all__ = ["clean", "nic_addresses", "refresh", "static_addresses"]

logger = logging.getLogger(__name__)

MAX_PER_NIC = 16
"""The most addresses reported per NIC (a guest with hundreds of aliases stays readable)."""


def clean(addresses: Iterable[str]) -> tuple[str, ...]:
    """Addresses without prefix, usable ones only (no loopback, link-local), first seen first."""
    out: list[str] = []
    for text in addresses:
        try:
            address = ipaddress.ip_address(str(text).split("/", 1)[0].strip())
        except ValueError:
            continue
        if address.is_loopback or address.is_link_local or address.is_unspecified:
            continue
        if str(address) not in out:
            out.append(str(address))
    return tuple(out[:MAX_PER_NIC])


def static_addresses(vm: VmRecord) -> dict[str, tuple[str, ...]]:
    """MAC -> the static address the request gave that NIC (from the VM's ledger)."""
    found: dict[str, tuple[str, ...]] = {}
    for nic in vm.interfaces:
        mac = nic.get("mac", "").lower()
        ip = nic.get("ip", "")
        if mac and ip:
            found[mac] = clean([ip])
    return found


def nic_addresses(vm: VmRecord, mac: str) -> list[str]:
    """The addresses known for one NIC of a VM (after refresh), static first."""
    return list(vm.addresses.get(mac.lower(), ()))


def refresh(backend: Backend, vms: Sequence[VmRecord]) -> list[VmRecord]:
    """The VMs with their addresses: static ones always, learnt ones for running VMs.

    One backend call for all running vm-host VMs; a hypervisor that cannot say (down, or an
    error) leaves the learnt addresses out and the hook goes on.
    """
    running = [vm.name for vm in vms if vm.managed and vm.state is VmState.RUNNING]
    learnt: Mapping[str, Mapping[str, Sequence[str]]] = {}
    if running:
        try:
            learnt = backend.guest_addresses(running)
        except BackendUnavailableError as exc:
            logger.warning("guest addresses not read: %s", exc)
    out: list[VmRecord] = []
    for vm in vms:
        known = {mac: list(addrs) for mac, addrs in static_addresses(vm).items()}
        for mac, addrs in learnt.get(vm.name, {}).items():
            known.setdefault(mac.lower(), []).extend(addrs)
        out.append(
            dataclasses.replace(vm, addresses={mac: clean(a) for mac, a in known.items() if a})
        )
    return out

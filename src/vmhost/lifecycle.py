"""Powering VMs on and off: start-vm, stop-vm, restart-vm and the crash restart of update-status.

A stopped VM keeps its place: its pinned CPUs, huge pages and disks stay booked (allocations
are every VM's placement, whatever its state), so starting it again never needs a new plan.

"Should run" is the hypervisor's own autostart flag (libvirt autostart, LXD boot.autostart),
set at compose. stop-vm clears it and start-vm sets it, so an operator's stop survives a host
reboot and update-status never undoes it; a VM that should run and crashed is started again,
once per hook.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from vmhost.backends import Backend
from vmhost.constraints import validate_name
from vmhost.model import InvalidRequestError, VmHostError, VmRecord, VmState
from vmhost.relation.keys import ACTION_OWNER

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STOP_TIMEOUT_S",
    "MAX_STOP_TIMEOUT_S",
    "Revival",
    "crash_note",
    "find_vm",
    "restart",
    "revive_crashed",
    "should_revive",
    "start",
    "stop",
]

DEFAULT_STOP_TIMEOUT_S = 120
MAX_STOP_TIMEOUT_S = 3600

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


def find_vm(vms: Sequence[VmRecord], name: str, owner: str | None = None) -> VmRecord:
    """Return the VM an operator may power on or off by `name`.

    Action-owned VMs are reachable by name alone; a relation's VM only with `owner` given
    explicitly and equal to its owner, so a typo never powers off another application's VM.

    Raises:
        InvalidRequestError: naming the field ("name" or "owner") and the fix.
    """
    name = validate_name(name)
    vm = next((v for v in vms if v.name == name), None)
    if vm is None:
        known = ", ".join(sorted(v.name for v in vms if v.managed)) or "none"
        raise InvalidRequestError(
            "name", f"no VM named {name!r}; VMs composed by vm-host: {known}"
        )
    if not vm.managed:
        raise InvalidRequestError(
            "name", f"{name} was not composed by vm-host; it is left alone (use virsh or lxc)"
        )
    if owner is None or owner == "":
        if vm.owner != ACTION_OWNER:
            raise InvalidRequestError(
                "owner",
                f"{name} belongs to {vm.owner}; give owner={vm.owner} to act on it anyway",
            )
    elif owner != vm.owner:
        raise InvalidRequestError("owner", f"{name} belongs to {vm.owner}, not {owner}")
    return vm


def start(backend: Backend, vm: VmRecord, progress: Progress = _quiet) -> None:
    """Start the VM and mark it as one that should run (host boot, crash restart)."""
    if vm.state is not VmState.RUNNING:
        progress(f"starting {vm.name}")
        backend.start(vm.name)
    if not vm.autostart:
        backend.set_autostart(vm.name, True)


def stop(
    backend: Backend,
    vm: VmRecord,
    *,
    timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    force: bool = False,
    progress: Progress = _quiet,
) -> bool:
    """Stop the VM and mark it as one that should stay off.

    Without `force` the guest is asked to shut down and given `timeout_s`; a guest still
    running after that is left running (and still marked to run), and False is returned so the
    caller can say to use force. With `force` it is powered off at once (like pulling the plug).

    Raises:
        VmHostError: the hypervisor refused.
    """
    if vm.autostart:
        backend.set_autostart(vm.name, False)
    if vm.state is VmState.STOPPED:
        return True
    if force:
        progress(f"powering {vm.name} off")
        return backend.stop(vm.name, 0, then_destroy=True)
    progress(f"asking {vm.name} to shut down (waiting up to {timeout_s:g} s)")
    off = False
    try:
        off = backend.stop(vm.name, timeout_s, then_destroy=False)
    finally:
        if vm.autostart and not off:
            backend.set_autostart(vm.name, True)
    return off


def restart(
    backend: Backend,
    vm: VmRecord,
    *,
    timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    force: bool = False,
    progress: Progress = _quiet,
) -> bool:
    """Stop as `stop` does, then start; False (nothing started) when the guest would not stop."""
    if not stop(backend, vm, timeout_s=timeout_s, force=force, progress=progress):
        return False
    start(backend, replace(vm, state=VmState.STOPPED, autostart=False), progress)
    return True


@dataclass(frozen=True)
class Revival:
    """One crashed VM that update-status tried to start again."""

    name: str
    error: str = ""
    """Why it did not start; empty when it did."""


def should_revive(vm: VmRecord) -> bool:
    """A vm-host VM that should run (autostart) and crashed (QEMU died, LXD error state)."""
    return vm.managed and vm.autostart and vm.state is VmState.FAILED


def revive_crashed(backend: Backend, vms: Sequence[VmRecord]) -> list[Revival]:
    """Start each crashed VM that should run, once.

    A VM that crashes again waits for the next update-status, so a crash loop costs one
    attempt per hook, never a busy loop.
    """
    out: list[Revival] = []
    for vm in vms:
        if not should_revive(vm):
            continue
        try:
            backend.start(vm.name)
        except VmHostError as exc:
            logger.error("%s crashed and did not start again: %s", vm.name, exc)
            out.append(Revival(vm.name, str(exc)))
            continue
        logger.warning("%s had crashed; started it again", vm.name)
        out.append(Revival(vm.name))
    return out


def crash_note(vms: Sequence[VmRecord]) -> str:
    """What the status line adds for VMs that should run and are crashed ("" when none).

    Asked afresh from the hypervisor by collect-status: a VM update-status could not start
    again stays in this note until it runs, so the operator sees it without reading logs.
    """
    names = sorted(vm.name for vm in vms if should_revive(vm))
    if not names:
        return ""
    return f"crashed: {', '.join(names)} (update-status starts them again; see juju debug-log)"

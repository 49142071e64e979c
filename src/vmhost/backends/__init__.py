"""Hypervisor backends behind one protocol, so the charm and tests do not care which."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Protocol

from vmhost.model import HostTopology, NicAttachment, Placement, VmRecord, VmSpec, VmStats

if TYPE_CHECKING:
    from collections.abc import Callable

    from vmhost.imagecache import ImageStore, Settings


MAC_PREFIXES = {"libvirt": "52:54:00", "lxd": "00:16:3e"}
"""The locally administered OUI each hypervisor uses for its guests' NICs."""


def stable_mac(
    prefix: str,
    vm: str,
    label: str,
    salt: str = "",
    taken: AbstractSet[str] = frozenset(),
) -> str:
    """Return a MAC under `prefix` (three octets) derived from the VM and NIC names.

    A re-run compose of the same request gets the same MAC (the guest keeps its DHCP lease),
    and the MAC is known before the hypervisor creates anything, so cloud-init's network config
    can match it. `salt` (the model UUID and the unit) keeps the same VM name on another host
    or model off this MAC on a shared L2; a MAC in `taken` (lower case: every VM's here and in
    the peer reports) is skipped for the next derivation.
    """
    base = f"{salt}\0{vm}\0{label}" if salt else f"{vm}\0{label}"  # unsalted: as before
    for attempt in range(1 << 16):
        seed = f"{base}\0{attempt}" if attempt else base
        digest = hashlib.sha256(seed.encode()).digest()
        mac = prefix + "".join(f":{b:02x}" for b in digest[:3])
        if mac not in taken:
            return mac
    raise ValueError(f"no free MAC under {prefix} for {vm}/{label}")


class BackendUnavailableError(Exception):
    """The hypervisor cannot be reached right now (daemon down, socket missing)."""


class Backend(Protocol):
    """What the charm needs from a hypervisor.

    Every method talks to the hypervisor itself; nothing is cached between calls, because the
    hypervisor is the ledger (allocations are rebuilt from its metadata on every hook).
    """

    name: str
    """"libvirt" or "lxd"."""

    @property
    def virt_type(self) -> str | None:
        """libvirt: "kvm" or "qemu" (TCG), config virt-type resolved; None where not chosen."""
        ...

    def version(self) -> str:
        """Return the hypervisor version ("9.0.0"); BackendUnavailableError when unreachable."""
        ...

    def topology(self) -> HostTopology:
        """Return NUMA nodes with free huge pages, host NICs and storage pools."""
        ...

    def list_vms(self) -> list[VmRecord]:
        """Return every VM on the host; those vm-host did not create have managed=False."""
        ...

    def ensure_pool(self, name: str, path: str) -> None:
        """Create and start a directory storage pool when it does not exist."""
        ...

    def ensure_project(self, project: str | None = None, storage_pool: str = "default") -> bool:
        """Create the project VMs live in when missing (LXD); no-op where there are none.

        Returns:
            Whether anything was created.
        """
        ...

    def compose(
        self,
        spec: VmSpec,
        placement: Placement,
        nics: Sequence[NicAttachment],
        default_pool: str,
    ) -> VmRecord:
        """Create volumes, define and start the VM; on any failure leave nothing behind."""
        ...

    def delete(self, name: str) -> list[str]:
        """Destroy and undefine the VM, delete the volumes vm-host created for it ("pool/vol").

        Returns the volumes deleted; a listed volume that another VM uses, or that this VM
        does not use, is kept (and logged).
        """
        ...

    def recover(self) -> list[str]:
        """Remove what composes killed mid-way left (see vmhost.intents); one line per compose."""
        ...

    def recent_recoveries(self) -> list[str]:
        """What `recover` removed or kept in the last day, for the status line."""
        ...

    def set_owner(self, name: str, owner: str) -> None:
        """Rewrite the owner in a vm-host VM's own ledger entry (nothing else changes).

        Raises:
            VmHostError: the VM does not exist or was not created by vm-host.
        """
        ...

    def image_store(self) -> ImageStore | None:
        """Return where images by name are cached (libvirt: the vm-host-images pool).

        None where the hypervisor resolves names itself (LXD's own image store).
        """
        ...

    def prepare_image(
        self,
        name: str,
        settings: Settings,
        *,
        wait: bool,
        log: Callable[[str], None] | None = None,
    ) -> str | None:
        """Get an image by name ready to compose from: None when it is, else what to wait for.

        `wait=True` (actions) fetches in the foreground with progress in `log`; `wait=False`
        (hooks) never waits: a missing image is fetched apart and the answer says so.

        Raises:
            InvalidRequestError: not an image name.
            VmHostError: the image cannot be had (an ImageFetchError names the check).
        """
        ...

    def probe_image(self, name: str, settings: Settings) -> str:
        """Where a compose would get an image from (a dry run): nothing is fetched.

        Cached: said so. Not cached: the configured source's verified index must list it.

        Raises:
            InvalidRequestError: not an image name, or no such local image.
            VmHostError: the image cannot be had; the message names the check and the fix.
        """
        ...

    def start(self, name: str) -> None:
        """Start a defined VM (a running one is left as it is)."""
        ...

    def stop(self, name: str, timeout_s: float = ..., *, then_destroy: bool = True) -> bool:
        """Ask the guest to shut down and wait up to `timeout_s` for it.

        Returns True when the VM is off. A guest still running after the timeout is powered
        off when `then_destroy` (then True too), else left running (False). `timeout_s=0`
        powers it off at once.
        """
        ...

    def set_autostart(self, name: str, enabled: bool) -> None:
        """Say whether the VM should run: started at host boot and after a crash."""
        ...

    def console_log(self, name: str, lines: int = 100) -> str:
        """Return the last `lines` lines of a VM's serial console ("" before any output).

        Raises:
            InvalidRequestError: a bad name or line count.
            VmHostError: the VM does not exist.
        """
        ...

    def guest_addresses(self, names: Sequence[str]) -> dict[str, dict[str, list[str]]]:
        """Return VM name -> NIC MAC -> the addresses the hypervisor knows the guest has.

        For the running VMs among `names`; a VM or NIC the hypervisor knows nothing about is
        left out. Never raises for one VM (BackendUnavailableError when unreachable).
        """
        ...

    def vm_stats(self) -> list[VmStats]:
        """Return usage counters of every running VM, in one call to the hypervisor."""
        ...

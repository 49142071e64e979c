"""Open the hypervisor backend and LXD's trust store the config names.

Apart from the protocol (vmhost.backends) so that the backends import the protocol and
this module imports the backends: the graph stays acyclic. Imports are lazy: an LXD host has
no libvirt library for libvirt-python to load, and only LXD hosts need cryptography.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vmhost import images
from vmhost.backends import Backend

if TYPE_CHECKING:
    from vmhost.lxd_trust import LxdTrust


def make_backend(
    kind: str,
    *,
    project: str,
    templates_dir: Path,
    virt_type: str = "auto",
) -> Backend:
    """Build the backend of that kind ("libvirt" or "lxd").

    Imported lazily: an LXD host has no libvirt library for libvirt-python to load.
    """
    if kind == "lxd":
        from vmhost.backends.lxd import LxdBackend

        return LxdBackend(project=project)
    from vmhost.backends.libvirt import LibvirtBackend

    return LibvirtBackend(
        templates_dir=templates_dir,
        virt_type=virt_type,
        image_pool=images.IMAGE_POOL,
        image_pool_path=images.IMAGE_POOL_PATH,
    )


def make_trust() -> LxdTrust:
    """Open LXD's trust store (imported lazily: only LXD hosts need it and cryptography)."""
    from vmhost.lxd_trust import LxdTrust

    return LxdTrust()

"""Open the hypervisor backend and LXD's trust store the config names.

Apart from the protocol (vmhost.backends) so that the backends import the protocol and
this module imports the backends: the graph stays acyclic. Imports are lazy: an LXD host has
no libvirt library for libvirt-python to load, and only LXD hosts need cryptography.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vmhost.backends import Backend
from vmhost.layout import HostLayout

if TYPE_CHECKING:
    from vmhost.lxd_trust import LxdTrust


def make_backend(
    kind: str,
    *,
    project: str,
    templates_dir: Path,
    virt_type: str = "auto",
    layout: HostLayout | None = None,
) -> Backend:
    """Build the backend of that kind ("libvirt" or "lxd").

    `layout` says where the backend keeps its image cache (the deployed charm's, HostLayout(),
    when None). Imported lazily: an LXD host has no libvirt library for libvirt-python to load.
    """
    layout = layout or HostLayout()
    if kind == "lxd":
        from vmhost.backends.lxd import LxdBackend

        return LxdBackend(project=project, socket_path=layout.lxd_socket)
    from vmhost.backends.libvirt import LibvirtBackend

    return LibvirtBackend(
        templates_dir=templates_dir,
        virt_type=virt_type,
        image_pool=layout.image_pool,
        image_pool_path=layout.image_pool_path,
    )


def make_trust(layout: HostLayout | None = None) -> LxdTrust:
    """Open LXD's trust store at the layout's socket.

    Imported lazily: only LXD hosts need it and cryptography.
    """
    from vmhost.lxd_trust import LxdTrust

    return LxdTrust((layout or HostLayout()).lxd_socket)

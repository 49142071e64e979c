"""What is wrong with this host right now, asked afresh on every hook by collect-status.

Each problem is one sentence an operator can act on, ending with the fix. Everything here
reads config and the host; nothing here writes, so the answer is the same after any hook,
an action included, until the operator or the host changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from vmhost import access, host, networks, settings
from vmhost.model import HostNic, InvalidRequestError, VmHostError

if TYPE_CHECKING:
    from vmhost.lxd_trust import LxdTrust

__all__ = ["backend_choice_problem", "problems"]


def backend_choice_problem(backend: str, recorded: str | None) -> str | None:
    """The backend cannot change after install: the fix is to set it back."""
    if recorded is None or recorded == backend:
        return None
    return f"backend is fixed after install (this host uses {recorded}); set backend={recorded}"


def problems(
    *,
    backend: str,
    libvirt_user: str,
    ssh_authorized_keys: str,
    hugepages: str,
    mapping: Mapping[str, networks.NetworkMapping],
    nics: Sequence[HostNic],
    trust: Callable[[], LxdTrust] | None = None,
    libvirt_user_adopt: bool = False,
    default_network: str = "",
) -> list[str]:
    """Every problem the operator must fix, in a stable order (huge pages, access, networks).

    Args:
        backend: "libvirt" or "lxd".
        libvirt_user: the access user (libvirt).
        ssh_authorized_keys: the option's text (libvirt).
        hugepages: the option's text.
        mapping: the parsed `networks` option.
        nics: the host's NICs.
        trust: opens LXD's trust store (LXD only).
        libvirt_user_adopt: whether an existing account may be taken over (libvirt).
        default_network: the option's value (a space in `networks` or a host bridge).
    """
    out = [
        f"{problem}; lower `hugepages`"
        for problem in host.hugepage_problems(settings.parse_hugepages_setting(hugepages))
    ]
    if backend == "libvirt":
        user = access.user_problem(libvirt_user, libvirt_user_adopt)
        if user:
            out.append(f"libvirt-user: {user}; fix with juju config")
        try:
            access.parse_public_keys(ssh_authorized_keys, "config")
        except InvalidRequestError as exc:
            out.append(f"{exc}; fix with juju config")
    elif trust is not None:
        try:
            trust().server_certificate()
        except VmHostError as exc:
            out.append(f"LXD trust: {exc}; fix with juju config")
    out += [f"networks: {p}" for p in networks.check_networks_on_host(mapping, nics)]
    default = networks.default_network_problem(default_network, mapping, nics)
    if default:
        out.append(default)
    return out

"""What is wrong with this host right now, asked afresh on every hook by collect-status.

Each problem is one sentence an operator can act on, ending with the fix. Everything here
reads config and the host; nothing here writes, so the answer is the same after any hook,
an action included, until the operator or the host changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

from vmhost import access, host, lifecycle, networks, report, settings
from vmhost.model import HostNic, HostTopology, InvalidRequestError, Policy, VmHostError
from vmhost.topology import format_cpu_list

if TYPE_CHECKING:
    from vmhost.actions import Snapshot
    from vmhost.backends import Backend
    from vmhost.config import CharmConfig
    from vmhost.lxd_trust import LxdTrust

__all__ = ["backend_choice_problem", "config_host_problems", "problems", "unit_status"]

Status = tuple[Literal["blocked", "waiting", "active"], str]
"""One status for collect-status: its kind and message."""


def unit_status(
    config: CharmConfig,
    read: Callable[[], Snapshot | None],
    backend: Backend,
    mapping: Mapping[str, networks.NetworkMapping],
    *,
    backend_error: str = "",
    make_trust: Callable[[], LxdTrust] | None = None,
    where: access.AccessLayout = access.SYSTEM,
) -> list[Status]:
    """Every status this unit has now, from its config and the host as read this hook.

    Blocked for what the operator must fix (each with the fix), waiting while the hypervisor
    cannot be reached, and active with the status line (plus a crash or a recovery to note).
    `read` reads the host (cached by the charm); it is not called for a backend that cannot
    run here. `mapping` is the parsed `networks` option.
    """
    choice = backend_choice_problem(config.backend, host.recorded_backend())
    if choice:
        return [("blocked", choice)]
    snapshot = read()
    if snapshot is None:
        daemon = "libvirtd" if config.backend == "libvirt" else "LXD"
        return [("waiting", f"waiting for {daemon}: {backend_error}")]
    found = [
        *config_host_problems(
            policy=config.policy,
            hugepages=config.hugepages,
            default_storage_pool=config.default_storage_pool,
            topology=snapshot.topology,
        ),
        *problems(
            backend=config.backend,
            libvirt_user=config.libvirt_user,
            ssh_authorized_keys=config.ssh_authorized_keys,
            hugepages=config.hugepages,
            mapping=mapping,
            nics=snapshot.topology.nics,
            trust=make_trust if config.backend == "lxd" else None,
            libvirt_user_adopt=config.libvirt_user_adopt,
            default_network=config.default_network,
            where=where,
        ),
    ]
    line = report.status_line(
        config.backend,
        snapshot.version,
        snapshot.topology,
        snapshot.allocations,
        config.policy,
        len(snapshot.vms),
        backend.virt_type,
    )
    notes = [lifecycle.crash_note(snapshot.vms), *backend.recent_recoveries()[-1:]]
    blocked: list[Status] = [("blocked", problem) for problem in found]
    return [*blocked, ("active", "; ".join([line, *(n for n in notes if n)]))]


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
    where: access.AccessLayout = access.SYSTEM,
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
        where: where the access user lives (the host layout's).
    """
    out = [
        f"{problem}; lower `hugepages`"
        for problem in host.hugepage_problems(settings.parse_hugepages_setting(hugepages))
    ]
    if backend == "libvirt":
        user = access.user_problem(libvirt_user, libvirt_user_adopt, where)
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


def config_host_problems(
    *,
    policy: Policy,
    hugepages: str,
    default_storage_pool: str,
    topology: HostTopology,
) -> list[str]:
    """Options this host contradicts, each naming the option, the numbers and the fix.

    Checked before anything is written: the charm sends no huge page reservation to the
    kernel and composes nothing while one of these stands.

    Args:
        policy: the placement policy (reserved CPUs and memory) built from the options.
        hugepages: the `hugepages` option's text (already valid syntax).
        default_storage_pool: the option as set ("" when vm-host makes its own pool).
        topology: the host as the hypervisor reports it.
    """
    out: list[str] = []
    cpus = set(topology.cpus)
    have = f"this host has CPUs {format_cpu_list(sorted(cpus))}" if cpus else "it has none"
    unknown = sorted(policy.reserved_cpus - cpus)
    if unknown:
        out.append(
            f"reserved-cpus: CPUs {format_cpu_list(unknown)} do not exist ({have}); "
            "fix with juju config"
        )
    elif cpus and cpus <= policy.reserved_cpus:
        out.append(
            f"reserved-cpus: reserves all {len(cpus)} CPUs of this host, none is left for VMs; "
            "keep some out of it with juju config"
        )
    memory_mib = sum(n.memory_kib for n in topology.nodes) // 1024
    if memory_mib and policy.reserved_memory_mib >= memory_mib:
        out.append(
            f"reserved-memory: {policy.reserved_memory_mib} MiB is not less than this host's "
            f"{memory_mib} MiB; lower it with juju config"
        )
    out += _hugepage_memory_problems(hugepages, topology)
    names = sorted(p.name for p in topology.pools)
    if default_storage_pool and default_storage_pool not in names:
        out.append(
            f"default-storage-pool: pool {default_storage_pool!r} does not exist on this host "
            f"(pools: {', '.join(names) or 'none'}); create it, or fix with juju config"
        )
    return out


def _hugepage_memory_problems(hugepages: str, topology: HostTopology) -> list[str]:
    """Huge page reservations larger than the memory they would come from."""
    wanted_host = 0
    wanted_node: dict[int, int] = {}
    for setting in settings.parse_hugepages_setting(hugepages):
        size = setting.size_kib * setting.count
        if setting.node is None:
            wanted_host += size
        else:
            wanted_node[setting.node] = wanted_node.get(setting.node, 0) + size
    nodes = {n.id: n.memory_kib for n in topology.nodes}
    out = []
    for node, kib in sorted(wanted_node.items()):
        if node not in nodes:
            out.append(
                f"hugepages: NUMA node {node} does not exist (nodes: "
                f"{format_cpu_list(sorted(nodes))}); fix with juju config"
            )
        elif kib >= nodes[node]:
            out.append(
                f"hugepages: {kib // 1024} MiB of huge pages on node {node} is not less than its "
                f"{nodes[node] // 1024} MiB of memory; lower it with juju config"
            )
    total = sum(nodes.values())
    if total and wanted_host + sum(wanted_node.values()) >= total:
        out.append(
            f"hugepages: {(wanted_host + sum(wanted_node.values())) // 1024} MiB of huge pages is "
            f"not less than this host's {total // 1024} MiB of memory; lower it with juju config"
        )
    return out

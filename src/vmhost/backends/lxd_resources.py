"""Host topology from LXD's `GET /1.0/resources` (MAAS's machine-resources prints the same).

Pure functions, so every quirk of real documents is tested from fixtures. Decisions worth
knowing:

- Offline threads are left out: nothing can be pinned to them. `siblings` lists the online
  threads of the same physical core.
- A thread without `numa_node` is on node 0 (LXD leaves it out on kernels without NUMA); a core
  without a `core` id counts as its own core (its first thread's id), never merged with another;
  `die` is read when LXD reports it (resources_cpu_core_die) and is 0 otherwise.
- Memory without `nodes` (no NUMA) becomes one node 0 holding all memory and all huge pages.
  A node id that only CPUs mention gets memory 0 rather than an invented share.
- LXD reports huge pages of the default size only (`memory.hugepages_size`, bytes); a size of
  0 means none. Free pages are total minus used. Other sizes (1G on a 2M-default host) are not
  in this document; the backend adds them from sysfs.
- NICs: one HostNic per Ethernet port of each card, with the card's NUMA node (a negative or
  missing node is None). SR-IOV counts belong to the card's PCI function, so they go on its
  first port only: counting them on every port of a dual-port card would promise VFs twice.
  VFs that LXD lists under `sriov.vfs` become NicKind.VF entries whose parent is that port.
  Ports that are not Ethernet (InfiniBand) cannot carry a VM NIC and are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vmhost.model import Cpu, HostNic, HostTopology, NicKind, NumaNode

__all__ = ["parse_network", "parse_resources"]


def _mapping(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"LXD resources: {what} is not an object")
    return value  # type: ignore[return-value]


def _items(value: object, what: str) -> Sequence[Mapping[str, Any]]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"LXD resources: {what} is not a list")
    for i, item in enumerate(value):  # type: ignore[reportUnknownVariableType]
        if not isinstance(item, Mapping):
            raise ValueError(f"LXD resources: {what}[{i}] is not an object")
    return value  # type: ignore[return-value]


def _int(value: object, what: str, default: int | None = None) -> int:
    if value is None:
        if default is None:
            raise ValueError(f"LXD resources: {what} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"LXD resources: {what} is not an integer: {value!r}")
    return value


def _parse_cpus(cpu: Mapping[str, Any]) -> dict[int, list[Cpu]]:
    """Return node id -> online CPUs from the cpu section."""
    by_node: dict[int, list[Cpu]] = {}
    seen: set[int] = set()
    for s_index, socket in enumerate(_items(cpu.get("sockets"), "cpu.sockets")):
        where = f"cpu.sockets[{s_index}]"
        socket_id = _int(socket.get("socket"), f"{where}.socket", s_index)
        for c_index, core in enumerate(_items(socket.get("cores"), f"{where}.cores")):
            cwhere = f"{where}.cores[{c_index}]"
            threads = [
                t
                for t in _items(core.get("threads"), f"{cwhere}.threads")
                if t.get("online", True) is not False
            ]
            if not threads:
                continue
            ids = [_int(t.get("id"), f"{cwhere}.threads[].id") for t in threads]
            core_id = _int(core.get("core"), f"{cwhere}.core", ids[0])
            die_id = _int(core.get("die"), f"{cwhere}.die", 0)
            siblings = tuple(sorted(ids))
            for thread, cpu_id in zip(threads, ids, strict=True):
                if cpu_id in seen:
                    raise ValueError(f"LXD resources: CPU {cpu_id} appears twice")
                seen.add(cpu_id)
                node = _int(thread.get("numa_node"), f"{cwhere}.threads[].numa_node", 0)
                by_node.setdefault(node, []).append(
                    Cpu(
                        id=cpu_id,
                        socket_id=socket_id,
                        die_id=die_id,
                        core_id=core_id,
                        siblings=siblings,
                    )
                )
    return by_node


def _hugepages(
    size_kib: int, total: object, used: object, what: str
) -> tuple[dict[int, int], dict[int, int]]:
    if size_kib <= 0:
        return {}, {}
    pages = _int(total, f"{what}.hugepages_total", 0)
    taken = _int(used, f"{what}.hugepages_used", 0)
    return {size_kib: pages}, {size_kib: max(0, pages - taken)}


def _parse_memory(memory: Mapping[str, Any]) -> dict[int, NumaNode]:
    """Return node id -> node with memory and huge pages (no CPUs yet)."""
    size_kib = _int(memory.get("hugepages_size"), "memory.hugepages_size", 0) // 1024
    nodes: dict[int, NumaNode] = {}
    entries = _items(memory.get("nodes"), "memory.nodes")
    if not entries:
        total, free = _hugepages(
            size_kib, memory.get("hugepages_total"), memory.get("hugepages_used"), "memory"
        )
        nodes[0] = NumaNode(
            id=0,
            memory_kib=_int(memory.get("total"), "memory.total", 0) // 1024,
            hugepages_total=total,
            hugepages_free=free,
        )
        return nodes
    for i, entry in enumerate(entries):
        what = f"memory.nodes[{i}]"
        node_id = _int(entry.get("numa_node"), f"{what}.numa_node", 0)
        if node_id in nodes:
            raise ValueError(f"LXD resources: memory node {node_id} appears twice")
        total, free = _hugepages(
            size_kib, entry.get("hugepages_total"), entry.get("hugepages_used"), what
        )
        nodes[node_id] = NumaNode(
            id=node_id,
            memory_kib=_int(entry.get("total"), f"{what}.total", 0) // 1024,
            hugepages_total=total,
            hugepages_free=free,
        )
    return nodes


def _card_node(card: Mapping[str, Any], what: str) -> int | None:
    node = card.get("numa_node")
    if node is None:
        return None
    value = _int(node, f"{what}.numa_node")
    return value if value >= 0 else None


def _ethernet_ports(card: Mapping[str, Any], what: str) -> list[Mapping[str, Any]]:
    return [
        p
        for p in _items(card.get("ports"), f"{what}.ports")
        if p.get("protocol", "ethernet") == "ethernet" and isinstance(p.get("id"), str)
    ]


def parse_network(network: Mapping[str, Any]) -> tuple[HostNic, ...]:
    """Return the host NICs of a resources document's `network` section, sorted by name.

    Args:
        network: `doc["network"]` (or a whole `.fragment.json` document, which is that section).

    Raises:
        ValueError: a card, port or VF is not shaped as LXD writes it.
    """
    nics: dict[str, HostNic] = {}
    for c_index, card in enumerate(_items(network.get("cards"), "network.cards")):
        what = f"network.cards[{c_index}]"
        node = _card_node(card, what)
        sriov = _mapping(card.get("sriov"), f"{what}.sriov")
        ports = _ethernet_ports(card, what)
        for p_index, port in enumerate(ports):
            first = p_index == 0
            nics[port["id"]] = HostNic(
                name=port["id"],
                kind=NicKind.PHYSICAL,
                numa_node=node,
                sriov_total_vfs=_int(sriov.get("maximum_vfs"), f"{what}.sriov.maximum_vfs", 0)
                if first
                else 0,
                sriov_enabled_vfs=_int(sriov.get("current_vfs"), f"{what}.sriov.current_vfs", 0)
                if first
                else 0,
                mac=port.get("address") or None,
            )
        pf = ports[0]["id"] if ports else None
        for v_index, vf in enumerate(_items(sriov.get("vfs"), f"{what}.sriov.vfs")):
            vwhat = f"{what}.sriov.vfs[{v_index}]"
            vf_node = _card_node(vf, vwhat)
            for port in _ethernet_ports(vf, vwhat):
                nics[port["id"]] = HostNic(
                    name=port["id"],
                    kind=NicKind.VF,
                    numa_node=vf_node if vf_node is not None else node,
                    mac=port.get("address") or None,
                    parent=pf,
                )
    return tuple(nics[name] for name in sorted(nics))


def parse_resources(doc: Mapping[str, Any]) -> HostTopology:
    """Build a HostTopology from the metadata of LXD's `GET /1.0/resources`.

    Args:
        doc: the response's metadata (cpu, memory, network, ... sections).

    Returns:
        Nodes sorted by id (the union of the nodes CPUs and memory name), CPUs sorted by id,
        NICs from the network section, arch from cpu.architecture, hypervisor "lxd". Pools
        and the version come from other endpoints.

    Raises:
        ValueError: the document lacks a cpu section or is not shaped as LXD writes it.
    """
    if not isinstance(doc, Mapping) or "cpu" not in doc:
        raise ValueError("LXD resources: not a GET /1.0/resources document (no cpu section)")
    cpu = _mapping(doc.get("cpu"), "cpu")
    by_node = _parse_cpus(cpu)
    memory = _parse_memory(_mapping(doc.get("memory"), "memory"))
    nodes = []
    for node_id in sorted(set(by_node) | set(memory)):
        base = memory.get(node_id, NumaNode(id=node_id))
        cpus = tuple(sorted(by_node.get(node_id, []), key=lambda c: c.id))
        nodes.append(
            NumaNode(
                id=node_id,
                cpus=cpus,
                memory_kib=base.memory_kib,
                hugepages_total=base.hugepages_total,
                hugepages_free=base.hugepages_free,
            )
        )
    arch = cpu.get("architecture")
    return HostTopology(
        nodes=tuple(nodes) or (NumaNode(id=0),),
        nics=parse_network(_mapping(doc.get("network"), "network")),
        arch=arch if isinstance(arch, str) and arch else HostTopology.arch,
        hypervisor="lxd",
    )

"""What operators read: the status line, action results, resource and VM tables.

Counts come from placement.usage (the allocator's own accounting), so what the operator sees is
exactly what the next placement decision will see.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from vmhost import networks, pools
from vmhost.model import HostNic, HostTopology, NicKind, Placement, Policy, VmRecord, page_label
from vmhost.placement import NicUsage, usage
from vmhost.settings import HugepageSetting
from vmhost.topology import format_cpu_list


def status_line(
    backend: str,
    version: str,
    topology: HostTopology,
    allocations: Sequence[Placement],
    policy: Policy,
    vm_count: int,
    virt_type: str | None = None,
) -> str:
    """Return "libvirt 9.0.0 (kvm): 2 NUMA nodes, 40/48 CPUs free, 3 VMs".

    The virt type is named where the backend chose one; `qemu` (TCG, no hardware
    virtualisation) says so, since its guests run many times slower.
    """
    vms = "1 VM" if vm_count == 1 else f"{vm_count} VMs"
    virt = ""
    if virt_type == "qemu":
        virt = " (qemu: TCG emulation, no hardware virtualisation; guests run slowly)"
    elif virt_type:
        virt = f" ({virt_type})"
    summary = usage(topology, allocations, policy).status_summary()
    return f"{backend} {version}{virt}: {summary}, {vms}"


def placement_json(placement: Placement) -> str:
    """The placement as a JSON string for action results and relation answers."""
    return json.dumps(placement_data(placement), sort_keys=True)


def placement_data(placement: Placement) -> dict[str, Any]:
    """The placement as plain data."""
    return {
        "vcpus": placement.vcpus,
        "memory-mib": placement.memory_mib,
        "numa-nodes": list(placement.host_nodes),
        "cpus": list(placement.pinned_cpus),
        "emulator-cpus": list(placement.emulator_cpus),
        "hugepages": [
            {"node": c.host_node, "size": page_label(c.hugepage_size_kib), "pages": c.hugepages}
            for c in placement.cells
            if c.hugepage_size_kib and c.hugepages
        ],
        "cells": [
            {
                "host-node": c.host_node,
                "vcpus": c.vcpus,
                "memory-mib": c.memory_mib,
                "cpus": list(c.cpus),
            }
            for c in placement.cells
        ],
        "vfs": [{"nic": v.nic, "count": v.count} for v in placement.vfs],
    }


def vm_nics(vm: VmRecord, host_nics: Sequence[HostNic]) -> list[dict[str, Any]]:
    """Each NIC of a VM with where it attaches on the host and that device's NUMA nodes.

    `off-node` is set when the device's hardware is on a node the VM has no cell on (its
    traffic crosses the interconnect). A VM without cells (shared, no huge pages) floats over
    every node and a device with no known node (a bridge of veths) has no locality to miss,
    so neither is ever off-node. A bond with ports on several nodes is off-node for a VM that
    is not on all of them.
    """
    vm_nodes = sorted(set(vm.placement.host_nodes))
    rows = []
    for nic in vm.interfaces:
        attached = str(nic.get("attached-to", ""))
        device = networks.host_device(attached)
        nodes = list(networks.device_nodes(host_nics, device)) if device else []
        rows.append(
            {
                "label": nic.get("label", ""),
                "mac": nic.get("mac", ""),
                "attached-to": attached,
                "host-device": device or None,
                "numa-nodes": nodes,
                "vm-nodes": vm_nodes,
                "off-node": bool(vm_nodes and nodes and not set(nodes) <= set(vm_nodes)),
                "space": nic.get("space") or None,
                "subnet": nic.get("subnet") or None,
            }
        )
    return rows


def vm_json(vm: VmRecord, host_nics: Sequence[HostNic] = ()) -> dict[str, Any]:
    """One VM as plain data for list-vms; `host_nics` (the host's) gives NIC locality."""
    return {
        "name": vm.name,
        "uuid": vm.uuid,
        "state": vm.state.value,
        "owner": vm.owner,
        "request-id": vm.request_id,
        "tags": list(vm.tags),
        "pool": vm.pool or None,
        "managed": vm.managed,
        "autostart": vm.autostart,
        "placement": placement_data(vm.placement),
        "volumes": list(vm.volumes),
        "interfaces": _interfaces(vm, host_nics),
        **({"state-reason": vm.state_reason} if vm.state_reason else {}),
        **({"problem": vm.problem} if vm.problem else {}),
    }


def vm_result(vm: VmRecord) -> dict[str, str]:
    """compose-vm's action result (flat strings, as `juju run` prints them)."""
    return {
        "name": vm.name,
        "uuid": vm.uuid,
        "state": vm.state.value,
        "placement": placement_json(vm.placement),
        "volumes": ", ".join(vm.volumes),
        "interfaces": json.dumps(_interfaces(vm), sort_keys=True),
    }


def _interfaces(vm: VmRecord, host_nics: Sequence[HostNic] | None = None) -> list[dict[str, Any]]:
    """Each NIC as data, with the addresses known for it (static at once, DHCP once learnt).

    Given the host's NICs, each also says its host device, that device's NUMA nodes and the
    off-node mark (vm_nics).
    """
    out: list[dict[str, Any]] = []
    located = vm_nics(vm, host_nics) if host_nics is not None else [{}] * len(vm.interfaces)
    for nic, where in zip(vm.interfaces, located, strict=True):
        item: dict[str, Any] = dict(nic)
        item["addresses"] = list(vm.addresses.get(nic.get("mac", "").lower(), ()))
        for key in ("host-device", "numa-nodes", "off-node", "space", "subnet"):
            if key in where:
                item[key] = where[key]
        out.append(item)
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def access_table(entries: Sequence[dict[str, str]]) -> str:
    """list-access as a table: one row per key or client, columns as describe_* gives them."""
    if not entries:
        return "no access granted"
    headers = list(entries[0])
    rows = [[e.get(h, "") or "-" for h in headers] for e in entries]
    return _table([h.upper() for h in headers], rows)


def _nic_brief(nic: dict[str, Any]) -> str:
    """One VM NIC in a table cell: "eth0>br-ext(1,off-node)"; "-" for an unknown node."""
    where = _nodes_text(nic["numa-nodes"]) + (",off-node" if nic["off-node"] else "")
    return f"{nic['label']}>{nic['host-device'] or '?'}({where})"


def vms_table(vms: Sequence[VmRecord], host_nics: Sequence[HostNic] = ()) -> str:
    """list-vms as a table; `host_nics` (the host's) gives each NIC's node and off-node mark."""
    rows = [
        (
            vm.name,
            vm.state.value,
            vm.owner if vm.managed else "(not vm-host)",
            vm.placement.vcpus,
            vm.placement.memory_mib,
            ",".join(str(n) for n in vm.placement.host_nodes) or "-",
            format_cpu_list(vm.placement.pinned_cpus) or "shared",
            "/".join(
                f"{c.hugepages}x{page_label(c.hugepage_size_kib)}"
                for c in vm.placement.cells
                if c.hugepage_size_kib and c.hugepages
            )
            or "-",
            vm.pool or "-",
            ",".join(vm.tags) or "-",
            ",".join(a for addrs in vm.addresses.values() for a in addrs) or "-",
            " ".join(_nic_brief(n) for n in vm_nics(vm, host_nics)) or "-",
        )
        for vm in vms
    ]
    headers = (
        "NAME",
        "STATE",
        "OWNER",
        "VCPUS",
        "MEM-MIB",
        "NODES",
        "CPUS",
        "HUGEPAGES",
        "POOL",
        "TAGS",
        "ADDRESSES",
        "NICS",
    )
    return _table(headers, rows) if rows else "no VMs"


def select_vms(
    vms: Sequence[VmRecord],
    *,
    owner: str | None = None,
    tag: str | None = None,
    state: str | None = None,
    pool: str | None = None,
) -> list[VmRecord]:
    """The VMs list-vms shows: those matching every filter given (None matches all).

    `owner` matches exactly or as a prefix ending at a ':' ("relation" matches every
    relation-owned VM, "relation:7" those of relation 7); `state` is a VmState value; `pool`
    a resource pool (VMs recorded without one are in it when pools.with_default said so).
    """
    return [
        vm
        for vm in vms
        if (owner is None or vm.owner == owner or vm.owner.startswith(owner + ":"))
        and (tag is None or tag in vm.tags)
        and (state is None or vm.state.value == state)
        and (pool is None or vm.pool == pool)
    ]


def _node_vms(vms: Sequence[VmRecord], node: int) -> list[dict[str, Any]]:
    """What each VM with a cell on `node` takes there."""
    rows = []
    for vm in sorted(vms, key=lambda v: v.name):
        cells = [c for c in vm.placement.cells if c.host_node == node]
        if not cells:
            continue
        pages = [
            {"size": page_label(c.hugepage_size_kib), "pages": c.hugepages}
            for c in cells
            if c.hugepage_size_kib and c.hugepages
        ]
        nodes = sorted(set(vm.placement.host_nodes))
        rows.append(
            {
                "name": vm.name,
                "state": vm.state.value,
                "vcpus": sum(c.vcpus for c in cells),
                "pinned-cpus": sorted(cpu for c in cells for cpu in c.cpus),
                "memory-mib": sum(c.memory_mib for c in cells),
                "hugepages": pages,
                "nodes": nodes,
                "spans": len(nodes) > 1,
            }
        )
    return rows


def _nic_rows(topology: HostTopology, sriov: Sequence[NicUsage]) -> list[dict[str, Any]]:
    """Every physical NIC, bond and bridge port: where its hardware is, its link, its VFs."""
    vfs = {n.nic: n for n in sriov}
    rows = []
    for nic in networks.listed_nics(topology.nics):
        use = vfs.get(nic.name)
        rows.append(
            {
                "name": nic.name,
                "kind": nic.kind.value,
                "numa-node": nic.numa_node,
                "numa-nodes": list(networks.device_nodes(topology.nics, nic.name)),
                "link": nic.link,
                "speed-mbps": nic.speed_mbps,
                "master": nic.master,
                "ports": networks.ports_of(topology.nics, nic.name)
                if nic.kind is NicKind.BOND
                else [],
                "vfs-total": nic.sriov_total_vfs,
                "vfs-enabled": nic.sriov_enabled_vfs,
                "vfs-used": use.vfs_used if use else 0,
                "vfs-free": use.vfs_free if use else nic.sriov_enabled_vfs,
            }
        )
    return rows


def sriov_nics(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of resources_json's NIC table that have SR-IOV VFs (or VMs holding some)."""
    return [n for n in data["nics"] if n["vfs-total"] > 0 or n["vfs-used"] > 0]


def resources_json(
    topology: HostTopology,
    vms: Sequence[VmRecord],
    policy: Policy,
    resource_pools: pools.Pools | None = None,
    peer_pool_use: Mapping[str, pools.Use] | None = None,
) -> dict[str, Any]:
    """show-resources as plain data: per node CPUs, memory, huge pages, VMs; NICs; pools.

    Storage pools, and resource pools (quota, used on this host, free) when `resource_pools`
    is given; `peer_pool_use` (the other units' reported use per pool, when there is a peer
    relation) adds the fleet's use and what it leaves free.

    Every CPU count is placement.usage's, so "free" is what a pinned request can take on the
    node now (policy and shared VMs' needs included), not the shared pool's size.
    """
    host_usage = usage(topology, [vm.placement for vm in vms], policy)
    nodes = []
    for node_usage in host_usage.nodes:
        node = topology.node(node_usage.node)
        cpu_ids = set(node.cpu_ids)
        pinned = sorted(
            cpu
            for vm in vms
            for cell in vm.placement.cells
            if cell.host_node == node.id
            for cpu in cell.cpus
        )
        reserved = sorted(cpu_ids & policy.reserved_cpus)
        node_vms = _node_vms(vms, node.id)
        nodes.append(
            {
                "id": node.id,
                "cpus": {
                    "total": node_usage.cpus_total,
                    "free": node_usage.cpus_free_for_pinning,
                    "pinned": pinned,
                    "reserved": reserved,
                    "shared-pool": node_usage.cpus_shared_pool,
                    "shared-vcpus-bound": sum(
                        v["vcpus"] for v in node_vms if not v["pinned-cpus"]
                    ),
                    "held-idle": node_usage.cpus_held,
                    "pinned-count": node_usage.cpus_pinned,
                    "reserved-count": node_usage.cpus_reserved,
                },
                "memory-mib": {
                    "general": node_usage.memory_total_mib,
                    "reserved": node_usage.memory_reserved_mib,
                    "bound": node_usage.memory_bound_mib,
                    "free": node_usage.memory_free_mib,
                },
                "hugepages": [
                    {
                        "size": h.label,
                        "total": h.total,
                        "allocated": h.allocated,
                        "unavailable": h.unavailable,
                        "free": h.free,
                    }
                    for h in node_usage.hugepages
                ],
                "vms": [v["name"] for v in node_vms],
                "vm-usage": node_vms,
            }
        )
    return {
        "backend": topology.hypervisor,
        "version": topology.hypervisor_version,
        "nodes": nodes,
        "shared": {
            "cpu-overcommit-ratio": host_usage.cpu_overcommit_ratio,
            "vcpus-allocated": host_usage.shared_vcpus_allocated,
            "vcpus-capacity": host_usage.shared_vcpus_capacity,
            "pool-cpus": host_usage.shared_pool_cpus,
            "pinnable-cpus": host_usage.cpus_pinnable,
            "memory-overcommit-ratio": host_usage.memory_overcommit_ratio,
            "memory-allocated-mib": host_usage.memory_allocated_mib,
            "memory-capacity-mib": host_usage.memory_capacity_mib,
            "floating-vms": sorted(vm.name for vm in vms if not vm.placement.cells),
        },
        "nics": _nic_rows(topology, host_usage.nics),
        "vm-nics": [
            {"vm": vm.name, **nic}
            for vm in sorted(vms, key=lambda v: v.name)
            for nic in vm_nics(vm, topology.nics)
        ],
        "pools": [
            {
                "name": p.name,
                "driver": p.driver,
                "capacity-gb": round(p.capacity_bytes / 10**9, 1),
                "allocation-gb": round(p.allocation_bytes / 10**9, 1),
                "available-gb": round(p.available_bytes / 10**9, 1),
                "capacity-bytes": p.capacity_bytes,
                "allocation-bytes": p.allocation_bytes,
                "available-bytes": p.available_bytes,
                "active": p.active,
            }
            for p in topology.pools
        ],
        **(
            {"resource-pools": _resource_pools(vms, resource_pools, peer_pool_use)}
            if resource_pools is not None
            else {}
        ),
    }


def _resource_pools(
    vms: Sequence[VmRecord], config: pools.Pools, peers: Mapping[str, pools.Use] | None
) -> list[dict[str, Any]]:
    here = pools.use_by_pool(vms, config.default)
    fleet = None if peers is None else pools.total_by_pool(here, peers, default=config.default)
    return pools.pool_rows(config, here, fleet)


def hugepage_grants(
    topology: HostTopology, configured: Sequence[HugepageSetting]
) -> list[dict[str, Any]]:
    """Huge pages the `hugepages` option asks for against what the kernel granted.

    The kernel grants what it can find contiguous, so a short grant is the operator's to see
    (and to fix with a boot-time reservation). A host-wide entry is compared with the sum over
    nodes and reported with node "all".
    """
    grants = []
    for entry in configured:
        nodes = [n for n in topology.nodes if entry.node is None or n.id == entry.node]
        granted = sum(int(n.hugepages_total.get(entry.size_kib, 0)) for n in nodes)
        grants.append(
            {
                "size": page_label(entry.size_kib),
                "node": "all" if entry.node is None else str(entry.node),
                "configured": entry.count,
                "granted": granted,
                "not-granted": max(0, entry.count - granted),
            }
        )
    return grants


def _vm_rows(data: dict[str, Any]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for node in data["nodes"]:
        for vm in node.get("vm-usage", []):
            pages = "/".join(f"{p['pages']}x{p['size']}" for p in vm["hugepages"]) or "-"
            rows.append(
                (
                    f"node {node['id']}",
                    vm["name"],
                    vm["state"],
                    vm["vcpus"],
                    format_cpu_list(vm["pinned-cpus"]) or "shared",
                    vm["memory-mib"],
                    pages,
                    "spans " + ",".join(str(n) for n in vm["nodes"]) if vm["spans"] else "-",
                )
            )
    return rows


_NIC_HEADERS = (
    "NIC",
    "KIND",
    "NUMA",
    "LINK",
    "SPEED",
    "MASTER",
    "PORTS",
    "VFS-ENABLED",
    "VFS-FREE",
    "VFS-TOTAL",
)


def _nodes_text(nodes: Sequence[int]) -> str:
    return ",".join(str(n) for n in nodes) or "-"


def _speed_text(mbps: int | None) -> str:
    if not mbps:
        return "-"
    return f"{mbps // 1000}G" if mbps % 1000 == 0 else f"{mbps}M"


def _nic_row(nic: dict[str, Any]) -> tuple[object, ...]:
    return (
        nic["name"],
        nic["kind"],
        _nodes_text(nic["numa-nodes"]),
        nic["link"] or "-",
        _speed_text(nic["speed-mbps"]),
        nic["master"] or "-",
        ",".join(nic["ports"]) or "-",
        nic["vfs-enabled"],
        nic["vfs-free"],
        nic["vfs-total"],
    )


_VM_NIC_HEADERS = ("VM", "NIC", "ATTACHED-TO", "NUMA", "VM-NODES", "SUBNET", "SPACE", "OFF-NODE")


def _vm_nic_row(nic: dict[str, Any]) -> tuple[object, ...]:
    return (
        nic["vm"],
        nic["label"],
        nic["attached-to"] or "-",
        _nodes_text(nic["numa-nodes"]),
        _nodes_text(nic["vm-nodes"]),
        nic["subnet"] or "-",
        nic["space"] or "-",
        "off-node" if nic["off-node"] else "-",
    )


def resources_table(data: dict[str, Any]) -> str:
    """show-resources as text an operator can read in a terminal."""
    node_rows = []
    for node in data["nodes"]:
        cpus = node["cpus"]
        memory = node["memory-mib"]
        pages = " ".join(f"{h['size']}:{h['free']}/{h['total']}" for h in node["hugepages"]) or "-"
        node_rows.append(
            (
                f"node {node['id']}",
                f"{cpus['free']}/{cpus['total']}",
                format_cpu_list(cpus["pinned"]) or "-",
                format_cpu_list(cpus["reserved"]) or "-",
                cpus["shared-pool"],
                f"{memory['free']}/{memory['general']}",
                pages,
                ",".join(node["vms"]) or "-",
            )
        )
    shared = data["shared"]
    parts = [
        f"{data['backend']} {data['version']}".strip(),
        _table(
            (
                "NUMA",
                "CPUS-FREE",
                "PINNED",
                "RESERVED",
                "SHARED-POOL",
                "MEM-FREE-MIB",
                "HUGEPAGES-FREE",
                "VMS",
            ),
            node_rows,
        ),
        "",
        f"pinnable CPUs {shared['pinnable-cpus']} (shared pool {shared['pool-cpus']}), "
        f"shared vCPUs {shared['vcpus-allocated']}/{shared['vcpus-capacity']} "
        f"(ratio {shared['cpu-overcommit-ratio']}), general memory "
        f"{shared['memory-allocated-mib']}/{shared['memory-capacity-mib']} MiB "
        f"(ratio {shared['memory-overcommit-ratio']})",
    ]
    if shared["floating-vms"]:
        parts.append(f"floating (shared, no NUMA binding): {', '.join(shared['floating-vms'])}")
    vm_rows = _vm_rows(data)
    if vm_rows:
        parts += [
            "",
            _table(
                ("NUMA", "VM", "STATE", "VCPUS", "CPUS", "MEM-MIB", "HUGEPAGES", "SPANS"),
                vm_rows,
            ),
        ]
    if data["nics"]:
        parts += ["", _table(_NIC_HEADERS, [_nic_row(n) for n in data["nics"]])]
    if data["vm-nics"]:
        parts += ["", _table(_VM_NIC_HEADERS, [_vm_nic_row(n) for n in data["vm-nics"]])]
    if data["pools"]:
        parts += [
            "",
            _table(
                ("POOL", "DRIVER", "USED-GB", "CAPACITY-GB", "ACTIVE"),
                [
                    (p["name"], p["driver"], p["allocation-gb"], p["capacity-gb"], p["active"])
                    for p in data["pools"]
                ],
            ),
        ]
    if data.get("resource-pools"):
        rows = data["resource-pools"]
        fleet = any("fleet-used" in r for p in rows for r in p["resources"])
        headers = (*_POOL_HEADERS, "FLEET-USED", "FLEET-FREE") if fleet else _POOL_HEADERS
        parts += ["", _table(headers, _pool_rows(rows))]
    return "\n".join(parts)


_POOL_HEADERS = ("RESOURCE-POOL", "RESOURCE", "QUOTA", "USED", "FREE")


def _pool_rows(rows: Sequence[dict[str, Any]]) -> list[tuple[object, ...]]:
    """One line per pool and resource; the default pool is marked, unset quotas unlimited."""
    out: list[tuple[object, ...]] = []
    for pool in rows:
        name = pool["name"] + (" (default)" if pool["default"] else "")
        if not pool["configured"]:
            name += " (not configured)"
        for item in pool["resources"]:
            limited = item["quota"] is not None
            row: tuple[object, ...] = (
                name,
                item["resource"],
                item["quota"] if limited else "unlimited",
                item["used"],
                item["free"] if limited else "-",
            )
            if "fleet-used" in item:
                row += (item["fleet-used"], item["fleet-free"] if limited else "-")
            out.append(row)
            name = ""
    return out

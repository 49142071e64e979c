"""JSON-ready forms of the model records that travel between units and out of actions.

One codec for the project: peer relation data (each unit's topology and allocations, read by
the leader to assign requests) and action results use these forms, so a record written by one
unit reads back equal on another (``x_from_dict(x_to_dict(r)) == r`` for every record).

Shapes, chosen to stay small in a databag and unambiguous to read back:

* Placement: ``{"vcpus", "memory-mib", "cells": [{"host-node", "vcpus", "memory-mib",
  "cpus": [..] (vCPU order), "hugepage-size-kib": int | null, "hugepages"}],
  "emulator-cpus": [..], "vfs": [{"nic", "count"}]}``.
* Topology: ``{"arch", "hypervisor", "hypervisor-version", "nodes": [{"id", "memory-kib",
  "cpus": [[id, socket, die, core, [siblings]], ..], "hugepages-total": [[size-kib, pages],
  ..], "hugepages-free": [..], "distances": [[node, distance], ..]}], "nics": [..],
  "pools": [..]}``. Mappings with integer keys are lists of pairs sorted by key, because JSON
  object keys are strings.

Readers ignore unknown keys (a newer unit may add some) and raise `CodecError` (a ValueError)
naming the path of the first bad value; they never return a half-read record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vmhost.model import (
    CellPlacement,
    Cpu,
    HostNic,
    HostTopology,
    NicKind,
    NumaNode,
    Placement,
    StoragePool,
    VfAssignment,
)

__all__ = [
    "CodecError",
    "placement_from_dict",
    "placement_to_dict",
    "topology_from_dict",
    "topology_to_dict",
]


class CodecError(ValueError):
    """Data that does not have the shape of the record it should describe."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


# ---------------------------------------------------------------------------------------------
# Strict readers: JSON has no separate bool/int, Python does; a bool is never a count.


def _obj(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CodecError(path, f"expected an object, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def _list(value: object, path: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise CodecError(path, f"expected an array, got {type(value).__name__}")
    return value  # type: ignore[return-value]


def _int(value: object, path: str, *, low: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(path, f"expected an integer, got {type(value).__name__}")
    if low is not None and value < low:
        raise CodecError(path, f"expected an integer >= {low}, got {value}")
    return value


def _str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise CodecError(path, f"expected a string, got {type(value).__name__}")
    return value


def _opt_int(value: object, path: str, *, low: int | None = 0) -> int | None:
    return None if value is None else _int(value, path, low=low)


def _opt_str(value: object, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise CodecError(path, f"expected true or false, got {type(value).__name__}")
    return value


def _ints(value: object, path: str, *, low: int | None = 0) -> tuple[int, ...]:
    return tuple(_int(v, f"{path}[{i}]", low=low) for i, v in enumerate(_list(value, path)))


def _strs(value: object, path: str) -> tuple[str, ...]:
    return tuple(_str(v, f"{path}[{i}]") for i, v in enumerate(_list(value, path)))


def _pairs(mapping: Mapping[int, int]) -> list[list[int]]:
    return [[k, mapping[k]] for k in sorted(mapping)]


def _int_map(value: object, path: str, *, key_low: int = 0, low: int = 0) -> dict[int, int]:
    out: dict[int, int] = {}
    for i, pair in enumerate(_list(value, path)):
        item = _list(pair, f"{path}[{i}]")
        if len(item) != 2:
            raise CodecError(f"{path}[{i}]", f"expected [key, value], got {len(item)} items")
        key = _int(item[0], f"{path}[{i}][0]", low=key_low)
        if key in out:
            raise CodecError(f"{path}[{i}][0]", f"key {key} appears twice")
        out[key] = _int(item[1], f"{path}[{i}][1]", low=low)
    return out


def _get(data: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in data:
        raise CodecError(f"{path}.{key}", "missing")
    return data[key]


# ---------------------------------------------------------------------------------------------
# Placement


def placement_to_dict(placement: Placement) -> dict[str, Any]:
    """Return a placement as JSON-ready data (see the module docstring for the shape)."""
    return {
        "vcpus": placement.vcpus,
        "memory-mib": placement.memory_mib,
        "cells": [
            {
                "host-node": c.host_node,
                "vcpus": c.vcpus,
                "memory-mib": c.memory_mib,
                "cpus": list(c.cpus),
                "hugepage-size-kib": c.hugepage_size_kib,
                "hugepages": c.hugepages,
            }
            for c in placement.cells
        ],
        "emulator-cpus": list(placement.emulator_cpus),
        "vfs": [{"nic": v.nic, "count": v.count} for v in placement.vfs],
    }


def placement_from_dict(data: object, path: str = "placement") -> Placement:
    """Read a placement written by `placement_to_dict`.

    Raises:
        CodecError: a field is missing or of the wrong type; the message names its path.
    """
    d = _obj(data, path)
    cells: list[CellPlacement] = []
    for i, raw in enumerate(_list(d.get("cells", []), f"{path}.cells")):
        cp = f"{path}.cells[{i}]"
        c = _obj(raw, cp)
        cells.append(
            CellPlacement(
                host_node=_int(_get(c, "host-node", cp), f"{cp}.host-node"),
                vcpus=_int(_get(c, "vcpus", cp), f"{cp}.vcpus"),
                memory_mib=_int(_get(c, "memory-mib", cp), f"{cp}.memory-mib"),
                cpus=_ints(c.get("cpus", []), f"{cp}.cpus"),
                hugepage_size_kib=_opt_int(
                    c.get("hugepage-size-kib"), f"{cp}.hugepage-size-kib", low=1
                ),
                hugepages=_int(c.get("hugepages", 0), f"{cp}.hugepages"),
            )
        )
    vfs: list[VfAssignment] = []
    for i, raw in enumerate(_list(d.get("vfs", []), f"{path}.vfs")):
        vp = f"{path}.vfs[{i}]"
        v = _obj(raw, vp)
        vfs.append(
            VfAssignment(
                nic=_str(_get(v, "nic", vp), f"{vp}.nic"),
                count=_int(v.get("count", 1), f"{vp}.count"),
            )
        )
    return Placement(
        vcpus=_int(_get(d, "vcpus", path), f"{path}.vcpus"),
        memory_mib=_int(_get(d, "memory-mib", path), f"{path}.memory-mib"),
        cells=tuple(cells),
        emulator_cpus=_ints(d.get("emulator-cpus", []), f"{path}.emulator-cpus"),
        vfs=tuple(vfs),
    )


# ---------------------------------------------------------------------------------------------
# Topology


def _cpu_to_list(cpu: Cpu) -> list[Any]:
    return [cpu.id, cpu.socket_id, cpu.die_id, cpu.core_id, list(cpu.siblings)]


def _cpu_from_list(value: object, path: str) -> Cpu:
    item = _list(value, path)
    if len(item) != 5:
        raise CodecError(
            path, f"expected [id, socket, die, core, siblings], got {len(item)} items"
        )
    return Cpu(
        id=_int(item[0], f"{path}[0]"),
        socket_id=_int(item[1], f"{path}[1]"),
        die_id=_int(item[2], f"{path}[2]"),
        core_id=_int(item[3], f"{path}[3]"),
        siblings=_ints(item[4], f"{path}[4]"),
    )


def _node_to_dict(node: NumaNode) -> dict[str, Any]:
    return {
        "id": node.id,
        "cpus": [_cpu_to_list(c) for c in node.cpus],
        "memory-kib": node.memory_kib,
        "hugepages-total": _pairs(node.hugepages_total),
        "hugepages-free": _pairs(node.hugepages_free),
        "distances": _pairs(node.distances),
    }


def _node_from_dict(value: object, path: str) -> NumaNode:
    d = _obj(value, path)
    return NumaNode(
        id=_int(_get(d, "id", path), f"{path}.id"),
        cpus=tuple(
            _cpu_from_list(c, f"{path}.cpus[{i}]")
            for i, c in enumerate(_list(d.get("cpus", []), f"{path}.cpus"))
        ),
        memory_kib=_int(d.get("memory-kib", 0), f"{path}.memory-kib"),
        hugepages_total=_int_map(
            d.get("hugepages-total", []), f"{path}.hugepages-total", key_low=1
        ),
        hugepages_free=_int_map(d.get("hugepages-free", []), f"{path}.hugepages-free", key_low=1),
        distances=_int_map(d.get("distances", []), f"{path}.distances"),
    )


def _nic_to_dict(nic: HostNic) -> dict[str, Any]:
    return {
        "name": nic.name,
        "kind": nic.kind.value,
        "numa-node": nic.numa_node,
        "sriov-total-vfs": nic.sriov_total_vfs,
        "sriov-enabled-vfs": nic.sriov_enabled_vfs,
        "mac": nic.mac,
        "addresses": list(nic.addresses),
        "vlan-id": nic.vlan_id,
        "parent": nic.parent,
        "master": nic.master,
        "link": nic.link,
        "speed-mbps": nic.speed_mbps,
    }


def _nic_from_dict(value: object, path: str) -> HostNic:
    d = _obj(value, path)
    kind = _str(d.get("kind", NicKind.PHYSICAL.value), f"{path}.kind")
    try:
        nic_kind = NicKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in NicKind)
        raise CodecError(f"{path}.kind", f"{kind!r} is not one of {known}") from None
    return HostNic(
        name=_str(_get(d, "name", path), f"{path}.name"),
        kind=nic_kind,
        numa_node=_opt_int(d.get("numa-node"), f"{path}.numa-node"),
        sriov_total_vfs=_int(d.get("sriov-total-vfs", 0), f"{path}.sriov-total-vfs"),
        sriov_enabled_vfs=_int(d.get("sriov-enabled-vfs", 0), f"{path}.sriov-enabled-vfs"),
        mac=_opt_str(d.get("mac"), f"{path}.mac"),
        addresses=_strs(d.get("addresses", []), f"{path}.addresses"),
        vlan_id=_opt_int(d.get("vlan-id"), f"{path}.vlan-id"),
        parent=_opt_str(d.get("parent"), f"{path}.parent"),
        master=_opt_str(d.get("master"), f"{path}.master"),
        link=_opt_str(d.get("link"), f"{path}.link"),
        speed_mbps=_opt_int(d.get("speed-mbps"), f"{path}.speed-mbps"),
    )


def _pool_to_dict(pool: StoragePool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "driver": pool.driver,
        "capacity-bytes": pool.capacity_bytes,
        "allocation-bytes": pool.allocation_bytes,
        "available-bytes": pool.available_bytes,
        "path": pool.path,
        "active": pool.active,
        "committed-bytes": pool.committed_bytes,
    }


def _pool_from_dict(value: object, path: str) -> StoragePool:
    d = _obj(value, path)
    return StoragePool(
        name=_str(_get(d, "name", path), f"{path}.name"),
        driver=_str(d.get("driver", "dir"), f"{path}.driver"),
        capacity_bytes=_int(d.get("capacity-bytes", 0), f"{path}.capacity-bytes"),
        allocation_bytes=_int(d.get("allocation-bytes", 0), f"{path}.allocation-bytes"),
        available_bytes=_int(d.get("available-bytes", 0), f"{path}.available-bytes"),
        path=_opt_str(d.get("path"), f"{path}.path"),
        active=_bool(d.get("active", True), f"{path}.active"),
        committed_bytes=_int(d.get("committed-bytes", 0), f"{path}.committed-bytes"),
    )


def topology_to_dict(topology: HostTopology) -> dict[str, Any]:
    """Return a host topology as compact JSON-ready data (see the module docstring)."""
    return {
        "arch": topology.arch,
        "hypervisor": topology.hypervisor,
        "hypervisor-version": topology.hypervisor_version,
        "nodes": [_node_to_dict(n) for n in topology.nodes],
        "nics": [_nic_to_dict(n) for n in topology.nics],
        "pools": [_pool_to_dict(p) for p in topology.pools],
    }


def topology_from_dict(data: object, path: str = "topology") -> HostTopology:
    """Read a topology written by `topology_to_dict`.

    Raises:
        CodecError: a field is missing or of the wrong type, or a node or CPU id appears twice;
            the message names its path.
    """
    d = _obj(data, path)
    nodes = tuple(
        _node_from_dict(n, f"{path}.nodes[{i}]")
        for i, n in enumerate(_list(_get(d, "nodes", path), f"{path}.nodes"))
    )
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids):
        raise CodecError(f"{path}.nodes", "two nodes share an id")
    cpu_ids = [c.id for n in nodes for c in n.cpus]
    if len(set(cpu_ids)) != len(cpu_ids):
        raise CodecError(f"{path}.nodes", "a CPU id appears twice")
    return HostTopology(
        nodes=nodes,
        nics=tuple(
            _nic_from_dict(n, f"{path}.nics[{i}]")
            for i, n in enumerate(_list(d.get("nics", []), f"{path}.nics"))
        ),
        pools=tuple(
            _pool_from_dict(p, f"{path}.pools[{i}]")
            for i, p in enumerate(_list(d.get("pools", []), f"{path}.pools"))
        ),
        arch=_str(d.get("arch", "x86_64"), f"{path}.arch"),
        hypervisor=_str(d.get("hypervisor", "libvirt"), f"{path}.hypervisor"),
        hypervisor_version=_str(d.get("hypervisor-version", ""), f"{path}.hypervisor-version"),
    )

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
naming the path of the first bad value; they never return a half-read record. The shapes are
pydantic models (`extra="ignore"`, strict scalars: JSON has no separate bool/int, Python does,
and a bool is never a count), written and read through the same model;
tests/unit/test_codec_compat.py pins what they write and what older writers left.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import StrictBool, StrictStr
from pydantic_core import PydanticCustomError

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
# Scalars and fixed-length arrays


Count = Annotated[int, pydantic.Strict(), pydantic.Field(ge=0)]
"""A non-negative integer; never a bool, a float or a string."""
PageSize = Annotated[int, pydantic.Strict(), pydantic.Field(ge=1)]
"""A huge page size in KiB."""


def _items(count: int, what: str):
    """Before validation: an array of exactly `count` items (`what` names them)."""

    def check(value: object) -> object:
        if isinstance(value, list | tuple) and len(value) != count:
            raise PydanticCustomError(
                "codec", "expected {what}, got {n} items", {"what": what, "n": len(value)}
            )
        return value

    return pydantic.BeforeValidator(check)


CpuRow = Annotated[
    tuple[Count, Count, Count, Count, tuple[Count, ...]],
    _items(5, "[id, socket, die, core, siblings]"),
]
"""A CPU as [id, socket, die, core, [siblings]]: five items keep a databag small."""


def _unique_keys(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    seen: set[int] = set()
    for i, (key, _value) in enumerate(pairs):
        if key in seen:
            raise PydanticCustomError(
                "codec", "key {key} appears twice", {"key": key, "subpath": f"[{i}][0]"}
            )
        seen.add(key)
    return pairs


PageMap = Annotated[
    list[Annotated[tuple[PageSize, Count], _items(2, "[key, value]")]],
    pydantic.AfterValidator(_unique_keys),
]
"""{size-kib: pages} as [[size-kib, pages], ..] sorted by size (JSON keys are strings)."""
NodeMap = Annotated[
    list[Annotated[tuple[Count, Count], _items(2, "[key, value]")]],
    pydantic.AfterValidator(_unique_keys),
]
"""{node: distance} as [[node, distance], ..] sorted by node."""


class _Wire(pydantic.BaseModel):
    """A shape on the wire: read by its hyphenated aliases, unknown keys ignored.

    Built on first use, so a hook that reads no peer report or LXD ledger does not pay for
    it. Writers build the same shapes as plain dicts (20 times faster than dumping a model,
    which a host report does for every VM in every hook); tests/unit/test_codec_compat.py
    holds writer and reader to one shape.
    """

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, defer_build=True)


def _alias(name: str) -> Any:
    return pydantic.Field(alias=name)


# ---------------------------------------------------------------------------------------------
# Placement


class _Cell(_Wire):
    host_node: Count = _alias("host-node")
    vcpus: Count
    memory_mib: Count = _alias("memory-mib")
    cpus: tuple[Count, ...] = ()
    """The host CPU of each vCPU, in vCPU order."""
    hugepage_size_kib: PageSize | None = pydantic.Field(None, alias="hugepage-size-kib")
    hugepages: Count = 0


class _Vf(_Wire):
    nic: StrictStr
    count: Count = 1


class _Placement(_Wire):
    vcpus: Count
    memory_mib: Count = _alias("memory-mib")
    cells: tuple[_Cell, ...] = ()
    emulator_cpus: tuple[Count, ...] = pydantic.Field((), alias="emulator-cpus")
    vfs: tuple[_Vf, ...] = ()

    def record(self) -> Placement:
        return Placement(
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            cells=tuple(
                CellPlacement(
                    host_node=c.host_node,
                    vcpus=c.vcpus,
                    memory_mib=c.memory_mib,
                    cpus=c.cpus,
                    hugepage_size_kib=c.hugepage_size_kib,
                    hugepages=c.hugepages,
                )
                for c in self.cells
            ),
            emulator_cpus=self.emulator_cpus,
            vfs=tuple(VfAssignment(nic=v.nic, count=v.count) for v in self.vfs),
        )


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
    return _read(_Placement, data, path).record()


# ---------------------------------------------------------------------------------------------
# Topology


class _Node(_Wire):
    id: Count
    cpus: tuple[CpuRow, ...] = ()
    memory_kib: Count = pydantic.Field(0, alias="memory-kib")
    hugepages_total: PageMap = pydantic.Field([], alias="hugepages-total")
    hugepages_free: PageMap = pydantic.Field([], alias="hugepages-free")
    distances: NodeMap = []

    def record(self) -> NumaNode:
        return NumaNode(
            id=self.id,
            cpus=tuple(Cpu(i, s, d, c, siblings) for i, s, d, c, siblings in self.cpus),
            memory_kib=self.memory_kib,
            hugepages_total=dict(self.hugepages_total),
            hugepages_free=dict(self.hugepages_free),
            distances=dict(self.distances),
        )


def _nic_kind(value: str) -> str:
    try:
        NicKind(value)
    except ValueError:
        known = ", ".join(k.value for k in NicKind)
        raise PydanticCustomError(
            "codec", "{kind} is not one of {known}", {"kind": repr(value), "known": known}
        ) from None
    return value


class _Nic(_Wire):
    name: StrictStr
    kind: Annotated[StrictStr, pydantic.AfterValidator(_nic_kind)] = NicKind.PHYSICAL.value
    numa_node: Count | None = pydantic.Field(None, alias="numa-node")
    sriov_total_vfs: Count = pydantic.Field(0, alias="sriov-total-vfs")
    sriov_enabled_vfs: Count = pydantic.Field(0, alias="sriov-enabled-vfs")
    mac: StrictStr | None = None
    addresses: tuple[StrictStr, ...] = ()
    vlan_id: Count | None = pydantic.Field(None, alias="vlan-id")
    parent: StrictStr | None = None
    master: StrictStr | None = None
    link: StrictStr | None = None
    speed_mbps: Count | None = pydantic.Field(None, alias="speed-mbps")

    def record(self) -> HostNic:
        return HostNic(
            name=self.name,
            kind=NicKind(self.kind),
            numa_node=self.numa_node,
            sriov_total_vfs=self.sriov_total_vfs,
            sriov_enabled_vfs=self.sriov_enabled_vfs,
            mac=self.mac,
            addresses=self.addresses,
            vlan_id=self.vlan_id,
            parent=self.parent,
            master=self.master,
            link=self.link,
            speed_mbps=self.speed_mbps,
        )


class _Pool(_Wire):
    name: StrictStr
    driver: StrictStr = "dir"
    capacity_bytes: Count = pydantic.Field(0, alias="capacity-bytes")
    allocation_bytes: Count = pydantic.Field(0, alias="allocation-bytes")
    available_bytes: Count = pydantic.Field(0, alias="available-bytes")
    path: StrictStr | None = None
    active: StrictBool = True
    committed_bytes: Count = pydantic.Field(0, alias="committed-bytes")

    def record(self) -> StoragePool:
        return StoragePool(
            name=self.name,
            driver=self.driver,
            capacity_bytes=self.capacity_bytes,
            allocation_bytes=self.allocation_bytes,
            available_bytes=self.available_bytes,
            path=self.path,
            active=self.active,
            committed_bytes=self.committed_bytes,
        )


def _unique_ids(nodes: tuple[_Node, ...]) -> tuple[_Node, ...]:
    ids = [n.id for n in nodes]
    if len(set(ids)) != len(ids):
        raise PydanticCustomError("codec", "two nodes share an id")
    cpu_ids = [row[0] for n in nodes for row in n.cpus]
    if len(set(cpu_ids)) != len(cpu_ids):
        raise PydanticCustomError("codec", "a CPU id appears twice")
    return nodes


class _Topology(_Wire):
    arch: StrictStr = "x86_64"
    hypervisor: StrictStr = "libvirt"
    hypervisor_version: StrictStr = pydantic.Field("", alias="hypervisor-version")
    nodes: Annotated[tuple[_Node, ...], pydantic.AfterValidator(_unique_ids)]
    nics: tuple[_Nic, ...] = ()
    pools: tuple[_Pool, ...] = ()

    def record(self) -> HostTopology:
        return HostTopology(
            nodes=tuple(n.record() for n in self.nodes),
            nics=tuple(n.record() for n in self.nics),
            pools=tuple(p.record() for p in self.pools),
            arch=self.arch,
            hypervisor=self.hypervisor,
            hypervisor_version=self.hypervisor_version,
        )


def _pairs(mapping: Mapping[int, int]) -> list[list[int]]:
    return [[k, mapping[k]] for k in sorted(mapping)]


def _cpu_to_list(cpu: Cpu) -> list[Any]:
    return [cpu.id, cpu.socket_id, cpu.die_id, cpu.core_id, list(cpu.siblings)]


def _node_to_dict(node: NumaNode) -> dict[str, Any]:
    return {
        "id": node.id,
        "cpus": [_cpu_to_list(c) for c in node.cpus],
        "memory-kib": node.memory_kib,
        "hugepages-total": _pairs(node.hugepages_total),
        "hugepages-free": _pairs(node.hugepages_free),
        "distances": _pairs(node.distances),
    }


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
    return _read(_Topology, data, path).record()


# ---------------------------------------------------------------------------------------------
# Reading: one error, named by its path


_M = TypeVar("_M", bound="_Wire")


def _read(model: type[_M], data: object, path: str) -> _M:
    try:
        return model.model_validate(data, by_alias=True, by_name=False)
    except pydantic.ValidationError as exc:
        raise _codec_error(exc.errors()[0], path) from None


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "an array",
    "tuple_type": "an array",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
}


def _codec_error(error: Any, root: str) -> CodecError:
    """The first pydantic error as the path of the bad value and what was wrong with it."""
    path = root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return CodecError(path, "missing")
    if kind in _EXPECTED:
        return CodecError(path, f"expected {_EXPECTED[kind]}, got {type(value).__name__}")
    if kind == "greater_than_equal":
        return CodecError(path, f"expected an integer >= {ctx['ge']}, got {value}")
    if kind == "codec":
        return CodecError(path + ctx.get("subpath", ""), error["msg"])
    return CodecError(path, error["msg"])

"""Host NUMA topology from libvirt capabilities and sysfs.

The parse functions are pure so every quirk of real capabilities documents can be tested from
fixtures. The only I/O is the sysfs huge page readers, because libvirtd caches capabilities and
its page counts go stale as soon as anything reserves or uses huge pages: callers combine both
with `apply_free_hugepages`.

Decisions worth knowing:

- The base page size of a cell is the smallest page size that cell lists (4K on x86_64, 4K or
  64K on aarch64, 8K on some test drivers); every larger size is a huge page size, even with a
  count of 0, so placement knows which sizes the host supports.
- A cell without `<memory>` gets its memory from its page counts times their sizes.
- A document without `<topology><cells>` (non-Linux or a broken host) gives one node 0 with no
  CPUs and no memory rather than an error: the caller can still show the host, and placement
  refuses every request with a clear "no CPUs" reason instead of guessing CPU ids.
- `<distances>` missing leaves `NumaNode.distances` empty; nothing is invented.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

from vmhost.model import Cpu, HostTopology, NumaNode

_UNIT_KIB = {
    "b": 1 / 1024,
    "bytes": 1 / 1024,
    "k": 1,
    "kb": 1000 / 1024,
    "kib": 1,
    "m": 1024,
    "mb": 1000**2 / 1024,
    "mib": 1024,
    "g": 1024**2,
    "gb": 1000**3 / 1024,
    "gib": 1024**2,
    "t": 1024**3,
    "tb": 1000**4 / 1024,
    "tib": 1024**3,
}

_HUGEPAGE_DIR = re.compile(r"hugepages-([0-9]+)kB")
_NODE_DIR = re.compile(r"node([0-9]+)")
_CPU_RANGE = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
MAX_CPU_ID = 65535
"""The highest CPU id vm-host reads (Linux allows 8192 today): a range is refused past it
before it is expanded, so "0-4294967295" cannot exhaust memory."""


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """Parse Linux cpu-list syntax ("0-3,8,10-11") into sorted unique CPU ids.

    The one parser for this syntax in vm-host: sysfs, libvirt `siblings` and the `pinned-cores`
    request field all use it, so they cannot disagree.

    Args:
        text: comma-separated ids or inclusive ranges; surrounding spaces are allowed.

    Returns:
        The CPU ids, sorted, without duplicates.

    Raises:
        ValueError: the text is empty, has an empty item, a non-numeric item or a range whose
            end is below its start.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty CPU list; give ids or ranges such as 0-3,8")
    ids: set[int] = set()
    for item in stripped.split(","):
        match = _CPU_RANGE.fullmatch(item.strip())
        if match is None:
            shown = item.strip()
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ValueError(f"bad CPU list item {shown!r}; use ids or ranges such as 0-3,8")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise ValueError(
                f"bad CPU range {item.strip()!r}; the end must not be below the start"
            )
        if end > MAX_CPU_ID:
            raise ValueError(f"CPU id {end} is out of range 0-{MAX_CPU_ID}")
        ids.update(range(start, end + 1))
    return tuple(sorted(ids))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Format CPU ids in compact Linux cpu-list syntax ("0-3,8"), the inverse of parse_cpu_list.

    Args:
        cpus: an iterable of CPU ids (any order, duplicates allowed).
    """
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def _to_kib(value: str | None, unit: str | None) -> int:
    """Convert a libvirt scaled integer to KiB; libvirt's default unit here is KiB."""
    if value is None or not value.strip():
        return 0
    factor = _UNIT_KIB.get((unit or "KiB").strip().lower())
    if factor is None:
        raise ValueError(f"unknown unit {unit!r} in capabilities")
    return int(int(value.strip()) * factor)


def _int_attr(element: ET.Element, name: str, default: int | None = None) -> int:
    raw = element.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"<{element.tag}> lacks the {name!r} attribute")
        return default
    return int(raw)


def _parse_pages(cell: ET.Element) -> dict[int, int]:
    """Return page size KiB -> page count for every `<pages>` of a cell, in any position."""
    pages: dict[int, int] = {}
    for entry in cell.findall("pages"):
        size_kib = _to_kib(entry.get("size"), entry.get("unit"))
        if size_kib <= 0:
            continue
        text = (entry.text or "").strip()
        pages[size_kib] = pages.get(size_kib, 0) + (int(text) if text else 0)
    return pages


def _parse_cpu(element: ET.Element) -> Cpu:
    cpu_id = _int_attr(element, "id")
    siblings_text = element.get("siblings")
    siblings = set(parse_cpu_list(siblings_text)) if siblings_text else set()
    siblings.add(cpu_id)
    return Cpu(
        id=cpu_id,
        socket_id=_int_attr(element, "socket_id", 0),
        die_id=_int_attr(element, "die_id", 0),
        # Without core_id the CPU counts as its own core, so it is never merged with another.
        core_id=_int_attr(element, "core_id", cpu_id),
        siblings=tuple(sorted(siblings)),
    )


def _parse_cell(cell: ET.Element) -> NumaNode:
    node_id = _int_attr(cell, "id")
    pages = _parse_pages(cell)
    base_kib = min(pages) if pages else None
    hugepages = {size: count for size, count in pages.items() if size != base_kib}

    memory = cell.find("memory")
    if memory is not None and (memory.text or "").strip():
        memory_kib = _to_kib(memory.text, memory.get("unit"))
    else:
        memory_kib = sum(size * count for size, count in pages.items())

    distances: dict[int, int] = {}
    for sibling in cell.findall("distances/sibling"):
        distances[_int_attr(sibling, "id")] = _int_attr(sibling, "value")

    cpus = tuple(sorted((_parse_cpu(c) for c in cell.findall("cpus/cpu")), key=lambda c: c.id))
    return NumaNode(
        id=node_id,
        cpus=cpus,
        memory_kib=memory_kib,
        hugepages_total=dict(sorted(hugepages.items())),
        # Placeholder only: libvirt's counts are totals. Callers must apply the real free
        # pages with apply_free_hugepages() before placing anything.
        hugepages_free=dict(sorted(hugepages.items())),
        distances=dict(sorted(distances.items())),
    )


def parse_capabilities(xml: str) -> HostTopology:
    """Build a HostTopology from a libvirt capabilities document.

    `hugepages_free` of each node is only a copy of the totals: libvirt does not report free
    pages here. Apply `read_free_hugepages()` (or virNodeGetFreePages) with
    `apply_free_hugepages()` before trusting it.

    Args:
        xml: the text of `virsh capabilities` / virConnectGetCapabilities().

    Returns:
        Nodes sorted by id, CPUs sorted by id, arch from host/cpu/arch, hypervisor "libvirt".
        NICs and pools are left empty; they come from other sources.

    Raises:
        ValueError: the text is not XML, not a `<capabilities>` document, or a cell or CPU
            lacks its id, or a CPU id appears twice.
    """
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirtd's own output
    except ET.ParseError as exc:
        raise ValueError(f"capabilities are not valid XML: {exc}") from exc
    if root.tag != "capabilities":
        raise ValueError(f"expected a <capabilities> document, got <{root.tag}>")

    arch = (root.findtext("host/cpu/arch") or "").strip() or HostTopology.arch
    cells = root.findall("host/topology/cells/cell")
    if cells:
        nodes = tuple(sorted((_parse_cell(c) for c in cells), key=lambda n: n.id))
    else:
        nodes = (NumaNode(id=0),)

    seen: set[int] = set()
    for node in nodes:
        for cpu in node.cpus:
            if cpu.id in seen:
                raise ValueError(f"CPU {cpu.id} appears in more than one cell")
            seen.add(cpu.id)
    if len({n.id for n in nodes}) != len(nodes):
        raise ValueError("a NUMA cell id appears twice in the capabilities")

    return HostTopology(nodes=nodes, arch=arch, hypervisor="libvirt")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _hugepage_dirs(root: Path) -> list[tuple[int, Path]]:
    """Return (node id, hugepages directory) pairs, sorted by node id."""
    node_base = root / "devices" / "system" / "node"
    node_dirs: list[tuple[int, Path]] = []
    if node_base.is_dir():
        for entry in node_base.iterdir():
            match = _NODE_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                node_dirs.append((int(match.group(1)), entry / "hugepages"))
    if not node_dirs:
        # A kernel built without NUMA has no node directories: the global pool is node 0.
        global_dir = root / "kernel" / "mm" / "hugepages"
        if global_dir.is_dir():
            node_dirs.append((0, global_dir))
    return sorted(node_dirs)


def _read_hugepage_counts(sysfs_root: str | Path, filename: str) -> dict[int, dict[int, int]]:
    result: dict[int, dict[int, int]] = {}
    for node_id, hugepage_dir in _hugepage_dirs(Path(sysfs_root)):
        sizes: dict[int, int] = {}
        entries = hugepage_dir.iterdir() if hugepage_dir.is_dir() else ()
        for entry in entries:
            match = _HUGEPAGE_DIR.fullmatch(entry.name)
            count = _read_int(entry / filename) if match else None
            if match and count is not None:
                sizes[int(match.group(1))] = count
        result[node_id] = dict(sorted(sizes.items()))
    return result


def read_free_hugepages(sysfs_root: str | Path = "/sys") -> dict[int, dict[int, int]]:
    """Read free huge pages per node and size from sysfs.

    Args:
        sysfs_root: where sysfs is mounted; tests pass a temporary tree.

    Returns:
        Node id -> page size KiB -> free pages, from
        `<root>/devices/system/node/node*/hugepages/hugepages-<N>kB/free_hugepages`. On a
        kernel without NUMA the global `<root>/kernel/mm/hugepages` counts are node 0. An
        unreadable file leaves its size out; a missing tree gives {}.
    """
    return _read_hugepage_counts(sysfs_root, "free_hugepages")


def read_total_hugepages(sysfs_root: str | Path = "/sys") -> dict[int, dict[int, int]]:
    """Read configured huge pages (nr_hugepages) per node and size from sysfs.

    libvirtd caches its capabilities, so totals changed after it started are only visible
    here. Same shape and rules as `read_free_hugepages`.
    """
    return _read_hugepage_counts(sysfs_root, "nr_hugepages")


def apply_free_hugepages(
    topology: HostTopology,
    free: dict[int, dict[int, int]],
    total: dict[int, dict[int, int]] | None = None,
) -> HostTopology:
    """Return a copy of the topology with real free (and optionally total) huge page counts.

    A size the topology knows but `free` does not report for a node counts as 0 free: pages
    nobody can vouch for are never handed out. Sizes only `free`/`total` know are added, so a
    host whose libvirt omits a size still offers it.

    Args:
        topology: from parse_capabilities (its free counts are placeholders).
        free: node id -> page size KiB -> free pages, as read_free_hugepages returns.
        total: when given, node id -> page size KiB -> configured pages; replaces the totals
            of the sizes it reports.
    """
    nodes: list[NumaNode] = []
    for node in topology.nodes:
        totals = dict(node.hugepages_total)
        if total is not None:
            totals.update(total.get(node.id, {}))
        node_free = free.get(node.id, {})
        sizes = set(totals) | set(node_free)
        for size in sizes:
            totals.setdefault(size, 0)
        nodes.append(
            dataclasses.replace(
                node,
                hugepages_total=dict(sorted(totals.items())),
                hugepages_free={size: node_free.get(size, 0) for size in sorted(sizes)},
            )
        )
    return dataclasses.replace(topology, nodes=tuple(nodes))

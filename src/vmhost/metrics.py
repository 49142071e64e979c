"""Prometheus metrics of a VM host, built from one reading of the hypervisor.

Every capacity number comes from `report.resources_json`, the data show-resources prints, so a
dashboard and the action never disagree. The exporter reads the hypervisor on its own clock
(`Sample`), and a scrape only turns the last sample into metric families: a slow hypervisor
never makes a scrape slow, and a scrape never touches the hypervisor.

The names and labels are documented in the README ("Metrics"); keep the two in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmhost import refusals, report
from vmhost.model import (
    HostTopology,
    Policy,
    VmRecord,
    VmState,
    VmStats,
    page_label,
)
from vmhost.settings import HugepageSetting

MIB = 1024 * 1024
UNMANAGED_OWNER = "unmanaged"
"""Owner label of domains vm-host did not create."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reading of the hypervisor (or why there is none)."""

    taken_at: float
    """Unix time the reading finished."""
    duration_s: float
    """How long reading the hypervisor took."""
    error: str = ""
    """Why the hypervisor could not be read; empty when it was."""
    version: str = ""
    topology: HostTopology | None = None
    vms: tuple[VmRecord, ...] = ()
    stats: tuple[VmStats, ...] = ()
    image_cache_bytes: int = 0

    @property
    def up(self) -> bool:
        """Whether this reading has the hypervisor's data."""
        return not self.error and self.topology is not None


def vm_pool(vm: VmRecord) -> str:
    """The storage pool of a VM's root disk ("none" for a VM without vm-host volumes)."""
    return vm.volumes[0].split("/", 1)[0] if vm.volumes else "none"


def vm_owner(vm: VmRecord) -> str:
    """The owner label: "action", "relation:<id>:<app>" or "unmanaged"."""
    return vm.owner if vm.managed else UNMANAGED_OWNER


def _gauge(name: str, doc: str, labels: Sequence[str] = (), unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)


def families(
    sample: Sample | None,
    policy: Policy,
    hugepages: Sequence[HugepageSetting] = (),
    refusal_counts: dict[str, int] | None = None,
) -> Iterator[Metric]:
    """Yield every vmhost_ metric family for a sample.

    Args:
        sample: the last reading; None before the first one (then only vmhost_up 0).
        policy: the placement rules the charm configured (the same as show-resources uses).
        hugepages: the `hugepages` option, to report pages the kernel did not grant.
        refusal_counts: placement refusals per reason class (refusals.read()).
    """
    up = _gauge("vmhost_up", "1 when the last reading of the hypervisor succeeded, else 0")
    up.add_metric([], 1.0 if sample is not None and sample.up else 0.0)
    yield up
    counts = refusal_counts if refusal_counts is not None else refusals.read()
    refused = CounterMetricFamily(
        "vmhost_placement_refusals",
        "Requests the allocator refused, by reason class (cpu, memory, hugepages, sriov, other)",
        labels=["reason"],
    )
    for reason, count in sorted(counts.items()):
        refused.add_metric([reason], float(count))
    yield refused
    if sample is None:
        return
    duration = _gauge(
        "vmhost_scrape_duration_seconds",
        "How long the exporter's last reading of the hypervisor took",
    )
    duration.add_metric([], sample.duration_s)
    yield duration
    taken = _gauge(
        "vmhost_last_reading_timestamp_seconds", "Unix time of the exporter's last reading"
    )
    taken.add_metric([], sample.taken_at)
    yield taken
    if not sample.up or sample.topology is None:
        return
    data = report.resources_json(sample.topology, list(sample.vms), policy)
    info = _gauge("vmhost_info", "The hypervisor behind this host", ["backend", "version"])
    info.add_metric([str(data["backend"]), str(data["version"] or sample.version)], 1.0)
    yield info
    yield from _node_families(data, sample.vms)
    yield from _hugepage_grant_families(sample.topology, hugepages)
    yield from _shared_families(data)
    yield from _pool_families(data)
    yield from _nic_families(data)
    yield from _vm_families(sample)
    cache = _gauge("vmhost_image_cache_bytes", "Bytes of cached base images on this host")
    cache.add_metric([], float(sample.image_cache_bytes))
    yield cache


def _node_families(data: dict[str, Any], vms: Sequence[VmRecord]) -> Iterator[Metric]:
    cpus = _gauge(
        "vmhost_cpus",
        "Host CPUs per NUMA node by state; the states add up to the node's CPUs",
        ["node", "state"],
    )
    free = _gauge(
        "vmhost_cpus_free_for_pinning",
        "Shared-pool CPUs of a node a pinned VM could take now",
        ["node"],
    )
    memory = _gauge(
        "vmhost_memory_bytes",
        "General (non-huge-page) memory per NUMA node by state: reserved for the host, bound "
        "to NUMA-pinned VMs, free for them",
        ["node", "state"],
    )
    pages = _gauge(
        "vmhost_hugepages",
        "Huge pages per NUMA node and size by state: allocated to VMs, reserved (in use "
        "outside vm-host), free",
        ["node", "size", "state"],
    )
    page_vms = _gauge(
        "vmhost_hugepage_vms",
        "VMs backed by huge pages of a size on a node",
        ["node", "size"],
    )
    backed: dict[tuple[str, str], int] = {}
    for vm in vms:
        for key in {
            (str(c.host_node), page_label(c.hugepage_size_kib))
            for c in vm.placement.cells
            if c.hugepage_size_kib and c.hugepages
        }:
            backed[key] = backed.get(key, 0) + 1
    for node in data["nodes"]:
        nid = str(node["id"])
        c = node["cpus"]
        cpus.add_metric([nid, "pinned"], float(c["pinned-count"]))
        cpus.add_metric([nid, "reserved"], float(c["reserved-count"]))
        cpus.add_metric([nid, "held-idle"], float(c["held-idle"]))
        cpus.add_metric([nid, "shared-pool"], float(c["shared-pool"]))
        free.add_metric([nid], float(c["free"]))
        m = node["memory-mib"]
        for state in ("reserved", "bound", "free"):
            memory.add_metric([nid, state], float(m[state] * MIB))
        for h in node["hugepages"]:
            pages.add_metric([nid, h["size"], "allocated"], float(h["allocated"]))
            pages.add_metric([nid, h["size"], "reserved"], float(h["unavailable"]))
            pages.add_metric([nid, h["size"], "free"], float(h["free"]))
            page_vms.add_metric([nid, h["size"]], float(backed.get((nid, h["size"]), 0)))
    yield from (cpus, free, memory, pages, page_vms)


def _hugepage_grant_families(
    topology: HostTopology, hugepages: Sequence[HugepageSetting]
) -> Iterator[Metric]:
    configured = _gauge(
        "vmhost_hugepages_configured",
        "Huge pages the hugepages option asks for (node 'all' for a host-wide entry)",
        ["node", "size"],
    )
    short = _gauge(
        "vmhost_hugepages_not_granted",
        "Huge pages the hugepages option asks for that the kernel did not grant",
        ["node", "size"],
    )
    for grant in report.hugepage_grants(topology, hugepages):
        configured.add_metric([grant["node"], grant["size"]], float(grant["configured"]))
        short.add_metric([grant["node"], grant["size"]], float(grant["not-granted"]))
    yield from (configured, short)


def _shared_families(data: dict[str, Any]) -> Iterator[Metric]:
    shared = data["shared"]
    values = (
        ("vmhost_shared_vcpus_allocated", "vCPUs of VMs that are not pinned", "vcpus-allocated"),
        (
            "vmhost_shared_vcpus_capacity",
            "vCPUs the shared pool can carry: shared-pool CPUs x cpu-overcommit-ratio",
            "vcpus-capacity",
        ),
        ("vmhost_cpu_overcommit_ratio", "The cpu-overcommit-ratio option", "cpu-overcommit-ratio"),
        (
            "vmhost_memory_overcommit_ratio",
            "The memory-overcommit-ratio option",
            "memory-overcommit-ratio",
        ),
    )
    for name, doc, key in values:
        g = _gauge(name, doc)
        g.add_metric([], float(shared[key]))
        yield g
    allocated = _gauge(
        "vmhost_shared_memory_allocated_bytes",
        "General memory of VMs that are not huge-page backed",
    )
    allocated.add_metric([], float(shared["memory-allocated-mib"] * MIB))
    capacity = _gauge(
        "vmhost_shared_memory_capacity_bytes",
        "General memory VMs may take: (memory - reserved-memory) x memory-overcommit-ratio",
    )
    capacity.add_metric([], float(shared["memory-capacity-mib"] * MIB))
    yield from (allocated, capacity)


def _pool_families(data: dict[str, Any]) -> Iterator[Metric]:
    used = _gauge(
        "vmhost_storage_pool_bytes",
        "Storage pool bytes by state (allocated, available)",
        ["pool", "state"],
    )
    capacity = _gauge("vmhost_storage_pool_capacity_bytes", "Storage pool size", ["pool"])
    active = _gauge("vmhost_storage_pool_active", "1 when the pool is active", ["pool"])
    for p in data["pools"]:
        used.add_metric([p["name"], "allocated"], float(p["allocation-bytes"]))
        used.add_metric([p["name"], "available"], float(p["available-bytes"]))
        capacity.add_metric([p["name"]], float(p["capacity-bytes"]))
        active.add_metric([p["name"]], 1.0 if p["active"] else 0.0)
    yield from (used, capacity, active)


def _nic_families(data: dict[str, Any]) -> Iterator[Metric]:
    vfs = _gauge(
        "vmhost_sriov_vfs",
        "SR-IOV VFs per physical function by state (used by VMs, free of the device's total)",
        ["nic", "node", "state"],
    )
    enabled = _gauge("vmhost_sriov_vfs_enabled", "VFs enabled on the device", ["nic", "node"])
    for n in report.sriov_nics(data):
        node = "none" if n["numa-node"] is None else str(n["numa-node"])
        vfs.add_metric([n["name"], node, "used"], float(n["vfs-used"]))
        vfs.add_metric([n["name"], node, "free"], float(n["vfs-free"]))
        enabled.add_metric([n["name"], node], float(n["vfs-enabled"]))
    yield from (vfs, enabled)


def _vm_families(sample: Sample) -> Iterator[Metric]:
    by_state = _gauge(
        "vmhost_vms",
        "VMs on this host by state, owner and root-disk pool",
        ["state", "owner", "pool"],
    )
    counts: dict[tuple[str, str, str], int] = {}
    for vm in sample.vms:
        key = (vm.state.value, vm_owner(vm), vm_pool(vm))
        counts[key] = counts.get(key, 0) + 1
    for state in VmState:  # every state has a series, so "failed" alerts see a 0 first
        if not any(k[0] == state.value for k in counts):
            by_state.add_metric([state.value, "none", "none"], 0.0)
    for (state, owner, pool), count in sorted(counts.items()):
        by_state.add_metric([state, owner, pool], float(count))
    yield by_state
    vcpus = _gauge("vmhost_vm_vcpus", "vCPUs of a VM", ["vm", "owner"])
    memory = _gauge("vmhost_vm_memory_bytes", "Memory a VM is given", ["vm", "owner"])
    pinned = _gauge("vmhost_vm_pinned", "1 when the VM's vCPUs are pinned", ["vm"])
    for vm in sample.vms:
        vcpus.add_metric([vm.name, vm_owner(vm)], float(vm.placement.vcpus))
        memory.add_metric([vm.name, vm_owner(vm)], float(vm.placement.memory_mib * MIB))
        pinned.add_metric([vm.name], 1.0 if vm.placement.pinned else 0.0)
    yield from (vcpus, memory, pinned)
    cpu = CounterMetricFamily("vmhost_vm_cpu_seconds", "CPU time a running VM used", labels=["vm"])
    rss = _gauge("vmhost_vm_memory_used_bytes", "Resident memory of a running VM", ["vm"])
    read = CounterMetricFamily(
        "vmhost_vm_block_read_bytes", "Bytes read from disks", labels=["vm"]
    )
    write = CounterMetricFamily(
        "vmhost_vm_block_write_bytes", "Bytes written to disks", labels=["vm"]
    )
    rx = CounterMetricFamily(
        "vmhost_vm_network_receive_bytes", "Bytes received on NICs", labels=["vm"]
    )
    tx = CounterMetricFamily(
        "vmhost_vm_network_transmit_bytes", "Bytes sent on NICs", labels=["vm"]
    )
    paused = _gauge("vmhost_vm_paused", "1 when the hypervisor holds the VM paused", ["vm"])
    for s in sample.stats:
        cpu.add_metric([s.name], s.cpu_seconds)
        rss.add_metric([s.name], float(s.memory_used_bytes))
        read.add_metric([s.name], float(s.block_read_bytes))
        write.add_metric([s.name], float(s.block_write_bytes))
        rx.add_metric([s.name], float(s.net_rx_bytes))
        tx.add_metric([s.name], float(s.net_tx_bytes))
        paused.add_metric([s.name], 1.0 if s.paused else 0.0)
    yield from (cpu, rss, read, write, rx, tx, paused)


class SampleCollector(Collector):
    """A prometheus_client collector that serves whatever sample `current()` returns."""

    def __init__(
        self,
        current: Any,
        policy: Policy,
        hugepages: Sequence[HugepageSetting] = (),
    ):
        self._current = current
        self._policy = policy
        self._hugepages = tuple(hugepages)

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families of the latest sample."""
        yield from families(self._current(), self._policy, self._hugepages)

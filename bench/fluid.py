"""The fluid reference: one pool of CPUs and one of 1G pages, no nodes, no cores.

It accepts a request whenever the host as a whole has room: enough free CPUs (one per vCPU)
and, for a 1G-hugepage request, enough free 1G pages. No real allocator can do better on
pinned VMs (a NUMA-bound VM must also fit its nodes), so the gap between nova and this bound
is what a placement policy could at most recover.
"""

from __future__ import annotations

from typing import Any

from bench.workload import BenchHost, Trace
from vmhost.model import PAGE_1G_KIB


def replay(host: BenchHost, trace: Trace) -> dict[str, Any]:
    """Replay a trace against the pooled host; results mirror the other allocators'."""
    requests = {r.id: r for r in trace.requests}
    cpus_free = host.total_cpus
    pages_free = sum(n.hugepages_total.get(PAGE_1G_KIB, 0) for n in host.topology.nodes)
    live: dict[int, tuple[int, int]] = {}
    results = []
    for what, rid in trace.events:
        if what == "depart":
            taken = live.pop(rid, None)
            if taken is not None:
                cpus_free += taken[0]
                pages_free += taken[1]
            continue
        request = requests[rid]
        pages = request.memory_mib * 1024 // PAGE_1G_KIB if request.hugepages_1g else 0
        accepted = request.vcpus <= cpus_free and pages <= pages_free
        results.append(
            {
                "id": rid,
                "accepted": accepted,
                "latency_s": 0.0,
                "pinned_before": host.total_cpus - cpus_free,
                "cells": [],
                "reason": "" if accepted else "no room host-wide",
            }
        )
        if accepted:
            cpus_free -= request.vcpus
            pages_free -= pages
            live[rid] = (request.vcpus, pages)
    return {"results": results}

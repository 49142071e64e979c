"""vm-host's allocator (`vmhost.placement.plan`) driven over the same traces as nova.

Each placement is checked against the host and the live placements outside the timed region:
a benchmark that let an allocator double-book a CPU or a page would compare nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bench.workload import BenchHost, Request, Trace
from vmhost.model import (
    PAGE_1G_KIB,
    CellPlacement,
    HugepageRequest,
    Placement,
    Policy,
    Rejection,
    VmSpec,
)
from vmhost.placement import plan

POLICY = Policy()
"""Default rules: smt-policy prefer (nova's default thread policy), no overcommit of pinned
CPUs, nothing reserved, as the nova host has every CPU in cpu_dedicated_set."""


def to_spec(request: Request) -> VmSpec:
    """Translate a benchmark request into vm-host's request record.

    Every vCPU is pinned (the allocator chooses the CPUs); two-node requests may span two
    nodes and are too big for one, so they always span exactly two.
    """
    return VmSpec(
        name=f"bench-{request.id}",
        vcpus=request.vcpus,
        memory_mib=request.memory_mib,
        pinned_count=request.vcpus,
        numa_nodes=request.numa_nodes,
        hugepages=HugepageRequest.P1G if request.hugepages_1g else None,
    )


def check_placement(
    host: BenchHost, live: Sequence[Placement], request: Request, placement: Placement
) -> list[str]:
    """Return every way `placement` breaks the host's capacity or the request (empty: none)."""
    return _check_cpus(host, live, request, placement) + _check_pages(
        host, live, request, placement
    )


def _check_cpus(
    host: BenchHost, live: Sequence[Placement], request: Request, placement: Placement
) -> list[str]:
    problems = []
    taken = {cpu for p in live for cpu in p.pinned_cpus}
    cpus = placement.pinned_cpus
    if len(cpus) != request.vcpus or len(set(cpus)) != len(cpus):
        problems.append(f"{len(cpus)} distinct pinned CPUs for {request.vcpus} vCPUs")
    if taken & set(cpus):
        problems.append(f"CPUs {sorted(taken & set(cpus))} already pinned")
    if len(placement.cells) > request.numa_nodes:
        problems.append(f"{len(placement.cells)} cells for numa_nodes={request.numa_nodes}")
    if sum(c.vcpus for c in placement.cells) != request.vcpus:
        problems.append("cell vCPUs do not add up")
    for cell in placement.cells:
        if not set(cell.cpus) <= set(host.topology.node(cell.host_node).cpu_ids):
            problems.append(f"cell on node {cell.host_node} pins CPUs of other nodes")
    return problems


def _check_pages(
    host: BenchHost, live: Sequence[Placement], request: Request, placement: Placement
) -> list[str]:
    problems = []
    if request.hugepages_1g:
        pages = sum(c.hugepages for c in placement.cells if c.hugepage_size_kib == PAGE_1G_KIB)
        if pages * 1024 < request.memory_mib:
            problems.append(f"{pages} 1G pages for {request.memory_mib} MiB")
    for node in host.topology.nodes:
        total = node.hugepages_total.get(PAGE_1G_KIB, 0)
        used = sum(
            c.hugepages
            for p in (*live, placement)
            for c in p.cells
            if c.host_node == node.id and c.hugepage_size_kib == PAGE_1G_KIB
        )
        if used > total:
            problems.append(f"node {node.id}: {used} 1G pages used of {total}")
    return problems


def replay(
    host: BenchHost, trace: Trace, repeats: int = 1, policy: Policy = POLICY
) -> dict[str, Any]:
    """Replay a trace through `plan`; results mirror the nova worker's answer.

    With repeats > 1 every plan call is timed that many times and the fastest kept, exactly
    as the nova worker does: `plan` is pure, so the answers are identical.
    """
    requests = {r.id: r for r in trace.requests}
    core_of = {c.id: c.siblings or (c.id,) for c in host.topology.cpus.values()}
    live: dict[int, Placement] = {}
    pinned = 0
    results = []
    violations: list[str] = []
    shared_core_vms = 0
    for what, rid in trace.events:
        if what == "depart":
            gone = live.pop(rid, None)
            if gone is not None:
                pinned -= len(gone.pinned_cpus)
            continue
        request = requests[rid]
        spec = to_spec(request)
        allocations = tuple(live.values())
        seconds = float("inf")
        answer: Placement | Rejection = Rejection("not run")
        for _ in range(repeats):
            start = time.perf_counter()
            answer = plan(host.topology, allocations, spec, policy)
            seconds = min(seconds, time.perf_counter() - start)
        accepted = not isinstance(answer, Rejection)
        if isinstance(answer, Placement):
            problems = check_placement(host, allocations, request, answer)
            violations.extend(f"request {rid}: {p}" for p in problems)
            busy = {core_of[cpu] for p in allocations for cpu in p.pinned_cpus}
            shared_core_vms += any(core_of[cpu] in busy for cpu in answer.pinned_cpus)
        results.append(
            {
                "id": rid,
                "accepted": accepted,
                "latency_s": seconds,
                "pinned_before": pinned,
                "cells": list(answer.host_nodes) if isinstance(answer, Placement) else [],
                "reason": answer.reason if isinstance(answer, Rejection) else "",
            }
        )
        if isinstance(answer, Placement):
            live[rid] = answer
            pinned += len(answer.pinned_cpus)
    return {
        "results": results,
        "violations": violations,
        "pinned_at_end": pinned,
        "shared_core_vms": shared_core_vms,
    }


def prefilled_allocations(
    host: BenchHost, prefill: Sequence[tuple[int, Sequence[int]]], mib_per_cpu: int
) -> tuple[Placement, ...]:
    """One pinned VM per (node, CPUs) entry, as the ledger would hold it."""
    return tuple(
        Placement(
            vcpus=len(cpus),
            memory_mib=len(cpus) * mib_per_cpu,
            cells=(
                CellPlacement(
                    host_node=node,
                    vcpus=len(cpus),
                    memory_mib=len(cpus) * mib_per_cpu,
                    cpus=tuple(cpus),
                ),
            ),
        )
        for node, cpus in prefill
    )


def time_plan(
    host: BenchHost,
    allocations: Sequence[Placement],
    request: Request,
    repeats: int,
    policy: Policy = POLICY,
) -> tuple[bool, list[float], str]:
    """Plan one request `repeats` times; return (accepted, seconds per call, reason)."""
    spec = to_spec(request)
    times = []
    answer: Placement | Rejection = Rejection("not run")
    for _ in range(repeats):
        start = time.perf_counter()
        answer = plan(host.topology, allocations, spec, policy)
        times.append(time.perf_counter() - start)
    reason = answer.reason if isinstance(answer, Rejection) else ""
    return isinstance(answer, Placement), times, reason

"""Compare vm-host's allocator with the real nova 34 NUMA fitter on the same request traces.

Run from the repository root:

    uv run --group bench python -m bench.allocator            # full run, ~10-15 minutes
    uv run --group bench python -m bench.allocator --quick    # < 2 minutes
    python bench/allocator.py --seed 7 --out /tmp/results

It prints a summary and writes allocator.json, allocator.md and allocator-rejections.png
under --out (default bench/results). See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/allocator.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_SRC = str(Path(__file__).resolve().parents[1] / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from bench import fluid, ours  # noqa: E402
from bench.nova_client import (  # noqa: E402
    NOVA_VERSION,
    NovaTimeoutError,
    NovaWorker,
    ensure_venv,
)
from bench.workload import (  # noqa: E402
    KINDS,
    MEMORY_MIB_PER_VCPU,
    BenchHost,
    Request,
    Trace,
    fixture_hosts,
    kind_sizes,
    make_trace,
    mean_request_cpus,
    nova_host_json,
    synthetic_host,
)
from vmhost.model import Policy  # noqa: E402

LOADS = (0.5, 0.7, 0.8, 0.9)
SIDES = ("ours", "nova", "nova_pack", "fluid")
"""vm-host; nova with its default cell order (emptiest first); nova with
`[compute] packing_host_numa_cells_allocation_strategy = True` (fullest first); the fluid
reference (one pool of CPUs and 1G pages: accept whenever the host as a whole has room)."""
TIMED = ("ours", "nova", "nova_pack")
"""Sides whose plan calls are timed (the fluid reference is a bound, not an allocator)."""
LABELS = {"ours": "vm-host", "nova": "nova", "nova_pack": "nova pack", "fluid": "fluid"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
QUICK_OUT = Path(__file__).resolve().parent / ".cache" / "results-quick"
"""--quick writes here by default (git-ignored), so it never overwrites the committed run."""


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def side_stats(
    trace: Trace, host: BenchHost, results: list[dict[str, Any]], violations: list[str]
) -> dict[str, Any]:
    """Summarise one allocator's answers to one trace."""
    kinds = {r.id: r.kind for r in trace.requests}
    vcpus = {r.id: r.vcpus for r in trace.requests}
    counted = results[trace.warmup_arrivals :]
    per_kind_total = Counter(kinds[r["id"]] for r in counted)
    per_kind_rej = Counter(kinds[r["id"]] for r in counted if not r["accepted"])
    per_kind_vcpus: Counter[str] = Counter()
    per_kind_rej_vcpus: Counter[str] = Counter()
    for r in counted:
        per_kind_vcpus[kinds[r["id"]]] += vcpus[r["id"]]
        if not r["accepted"]:
            per_kind_rej_vcpus[kinds[r["id"]]] += vcpus[r["id"]]
    rejected = sum(per_kind_rej.values())
    first = next((r for r in results if not r["accepted"]), None)
    latencies = [r["latency_s"] * 1e3 for r in results]
    rejected_lat = [r["latency_s"] * 1e3 for r in results if not r["accepted"]]
    return {
        "counted": len(counted),
        "rejected": rejected,
        "rate": rejected / len(counted) if counted else 0.0,
        "counted_vcpus": sum(vcpus[r["id"]] for r in counted),
        "rejected_vcpus": sum(vcpus[r["id"]] for r in counted if not r["accepted"]),
        "per_kind": {
            k: {
                "requests": per_kind_total[k],
                "rejected": per_kind_rej[k],
                "rate": per_kind_rej[k] / per_kind_total[k] if per_kind_total[k] else None,
                "vcpus": per_kind_vcpus[k],
                "rejected_vcpus": per_kind_rej_vcpus[k],
            }
            for k in KINDS
            if per_kind_total[k]
        },
        "first_rejection": None
        if first is None
        else {
            "arrival": results.index(first),
            "kind": kinds[first["id"]],
            "utilisation": first["pinned_before"] / host.total_cpus,
        },
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies),
            "rejected_p99": percentile(rejected_lat, 99) if rejected_lat else None,
        },
        "violations": violations[:20],
        "violation_count": len(violations),
        "latencies_ms": latencies,
        "rejected_latencies_ms": rejected_lat,
        "accepted_ids": [r["id"] for r in results if r["accepted"]],
    }


# ---------------------------------------------------------------------------------------------
# Runs


def run_trace(worker: NovaWorker, host: BenchHost, trace: Trace, repeats: int) -> dict[str, Any]:
    """Replay one trace through nova (in its worker, spread and pack), vm-host and fluid."""
    message = {
        "op": "replay",
        "host": nova_host_json(host.topology),
        "requests": {str(r.id): r.to_json() for r in trace.requests},
        "events": trace.events,
        "repeats": repeats,
    }
    nova_answer = worker.request({**message, "pack": False})
    pack_answer = worker.request({**message, "pack": True})
    ours_answer = ours.replay(host, trace, repeats)
    fluid_answer = fluid.replay(host, trace)
    return {
        "host": host.name,
        "load": trace.load,
        "part": trace.part,
        "timed": repeats > 1 or trace.part == 0,
        "arrivals": len(trace.requests),
        "warmup_arrivals": trace.warmup_arrivals,
        "mean_lifetime": round(trace.mean_lifetime, 3),
        "ours": side_stats(trace, host, ours_answer["results"], ours_answer["violations"]),
        "ours_vms_sharing_a_core": ours_answer["shared_core_vms"],
        "nova": side_stats(trace, host, nova_answer["results"], []),
        "nova_pack": side_stats(trace, host, pack_answer["results"], []),
        "fluid": side_stats(trace, host, fluid_answer["results"], []),
    }


def isolate_runs(
    hosts: list[BenchHost], arrivals: int, seed: int, log: Any
) -> list[dict[str, Any]]:
    """Replay odd-sized traces through vm-host under smt-policy prefer and isolate.

    Odd vCPU counts leave half-used cores; under prefer another VM may take the free thread
    (the count shows the check bites), under isolate no core may ever hold two VMs. nova has
    no equivalent to compare with: its `hw:cpu_thread_policy=isolate` gives every vCPU a core
    of its own (the sibling idles), and on a host configured with `cpu_dedicated_set` it
    refuses SMT hosts outright (bug 1889633), so only vm-host runs.
    """
    rows = []
    for host in hosts:
        for load in LOADS:
            trace = make_trace(host, load, arrivals, seed, odd=True)
            row: dict[str, Any] = {"host": host.name, "load": load}
            for smt in ("prefer", "isolate"):
                answer = ours.replay(host, trace, 1, Policy(smt_policy=smt))
                stats = side_stats(trace, host, answer["results"], answer["violations"])
                row[smt] = {
                    "rate": stats["rate"],
                    "accepted": len(stats["accepted_ids"]),
                    "vms_sharing_a_core": answer["shared_core_vms"],
                    "violation_count": stats["violation_count"],
                }
            rows.append(row)
            p, i = row["prefer"], row["isolate"]
            log(
                f"odd sizes {host.name:22s} load {load:.1f}: prefer rejects "
                f"{pct(p['rate']):>6s}, {p['vms_sharing_a_core']} VMs share a core; isolate "
                f"rejects {pct(i['rate']):>6s}, {i['vms_sharing_a_core']} VMs share a core"
            )
    return rows


def fragmented_host_case(
    nodes: int, cores: int = 12
) -> tuple[BenchHost, list[tuple[int, list[int]]], Request]:
    """A host that cannot take an 8-node request, though it has exactly enough free CPUs.

    Every node has 9 of its 12 cores pinned (both threads), leaving 6 free CPUs per node; the
    request wants 8 x 12 pinned vCPUs over 8 nodes. nova's 8 guest cells of 12 fit no node;
    vm-host's best 8 nodes hold 48 of the 96 CPUs needed. The request asks 1 GiB per vCPU,
    which the free memory holds on every host size (at 2 GiB per vCPU the 8-node host would
    refuse it for host-wide general memory before any node is looked at), so both allocators
    must reject it on CPUs.
    """
    host = synthetic_host(nodes, cores=cores)
    prefill = []
    for node in host.topology.nodes:
        busy_cores = sorted({c.siblings for c in node.cpus})[: cores - 3]
        prefill.append((node.id, sorted(cpu for core in busy_cores for cpu in core)))
    per_cell = cores
    request = Request(
        id=0,
        kind="eight-node",
        vcpus=8 * per_cell,
        memory_mib=8 * per_cell * 1024,
        numa_nodes=8,
    )
    return host, prefill, request


def rejection_times(
    python: Path, node_counts: tuple[int, ...], cap_s: float, log: Any
) -> list[dict[str, Any]]:
    """Time both allocators rejecting an 8-node request on fragmented hosts of growing size."""
    rows = []
    for nodes in node_counts:
        host, prefill, request = fragmented_host_case(nodes)
        allocations = ours.prefilled_allocations(host, prefill, MEMORY_MIB_PER_VCPU)
        accepted, times, reason = ours.time_plan(host, allocations, request, repeats=20)
        log(
            f"  {nodes:2d} nodes: vm-host {'placed' if accepted else 'rejected'} in "
            f"{statistics.median(times) * 1e3:.2f} ms (median of 20); nova ..."
        )
        worker = NovaWorker(python, name=f"nova-reject-{nodes}")
        worker.request({"op": "hello"}, timeout=120)  # imports nova before the clock starts
        started = time.perf_counter()
        try:
            answer = worker.request(
                {
                    "op": "fit",
                    "host": nova_host_json(host.topology),
                    "prefill": prefill,
                    "prefill_mib_per_cpu": MEMORY_MIB_PER_VCPU,
                    "request": request.to_json(),
                },
                timeout=cap_s,
            )
            nova = {
                "accepted": answer["accepted"],
                "seconds": answer["latency_s"],
                "timed_out": False,
            }
            worker.close()
        except NovaTimeoutError:
            nova = {"accepted": None, "seconds": None, "timed_out": True}
        wall = time.perf_counter() - started
        shown = f"> {cap_s:g} s (killed)" if nova["timed_out"] else f"{nova['seconds']:.3f} s"
        log(f"           nova {shown}")
        rows.append(
            {
                "nodes": nodes,
                "host": host.name,
                "request": "8 guest cells x 12 pinned vCPUs (96), hw:numa_nodes=8 / numa_nodes=8",
                "free_cpus_per_node": 6,
                "ours": {
                    "accepted": accepted,
                    "median_ms": statistics.median(times) * 1e3,
                    "max_ms": max(times) * 1e3,
                    "reason": reason,
                },
                "nova": {**nova, "cap_s": cap_s, "wall_s": wall},
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Aggregation and output


def _pool(sel: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool one side's per-trace stats: requests, vCPUs, per kind, two-node excluded."""
    counted = sum(s["counted"] for s in sel)
    rejected = sum(s["rejected"] for s in sel)
    kinds: dict[str, Any] = {}
    for k in KINDS:
        got = [s["per_kind"][k] for s in sel if k in s["per_kind"]]
        req = sum(g["requests"] for g in got)
        if not req:
            continue
        vcpus = sum(g["vcpus"] for g in got)
        rej_vcpus = sum(g["rejected_vcpus"] for g in got)
        kinds[k] = {
            "requests": req,
            "rejected": sum(g["rejected"] for g in got),
            "rate": sum(g["rejected"] for g in got) / req,
            "vcpus": vcpus,
            "rejected_vcpus": rej_vcpus,
            "vcpu_rate": rej_vcpus / vcpus if vcpus else 0.0,
        }
    demand = sum(s["counted_vcpus"] for s in sel)
    lost = sum(s["rejected_vcpus"] for s in sel)
    two = kinds.get("two-node", {"vcpus": 0, "rejected_vcpus": 0})
    utils = [s["first_rejection"]["utilisation"] for s in sel if s["first_rejection"]]
    return {
        "counted": counted,
        "rejected": rejected,
        "rate": rejected / counted if counted else 0.0,
        "vcpus": demand,
        "rejected_vcpus": lost,
        "vcpu_rate": lost / demand if demand else 0.0,
        "vcpu_rate_excl_two_node": (lost - two["rejected_vcpus"]) / (demand - two["vcpus"])
        if demand - two["vcpus"]
        else 0.0,
        "per_kind": kinds,
        "mean_util_at_first_rejection": statistics.mean(utils) if utils else None,
        "traces": len(sel),
        "traces_without_rejection": sum(1 for s in sel if not s["first_rejection"]),
    }


def _compare(row: dict[str, Any]) -> None:
    """Add the relative reductions (rejected vCPUs) and the share of the gap closed."""
    o, n, p, f = (row[side]["vcpu_rate"] for side in SIDES)
    row["fewer_vcpus_than_nova"] = (n - o) / n if n else None
    row["fewer_vcpus_than_pack"] = (p - o) / p if p else None
    row["gap_closed"] = (n - o) / (n - f) if n - f else None
    oe, pe = row["ours"]["vcpu_rate_excl_two_node"], row["nova_pack"]["vcpu_rate_excl_two_node"]
    row["excl_two_node_vs_pack"] = oe - pe
    o, n, p = row["ours"]["rate"], row["nova"]["rate"], row["nova_pack"]["rate"]
    row["relative_reduction"] = (n - o) / n if n else None
    row["relative_reduction_vs_pack"] = (p - o) / p if p else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool every host's and trace's counted requests per load, and over all loads ("all")."""
    per_load: dict[str, Any] = {}
    groups = [
        (f"{x:.1f}", [r for r in runs if r["load"] == x])
        for x in sorted({r["load"] for r in runs})
    ]
    groups.append(("all", runs))
    for key, sel in groups:
        if not sel:
            continue
        row: dict[str, Any] = {side: _pool([r[side] for r in sel]) for side in SIDES}
        _compare(row)
        per_load[key] = row
    return per_load


def latency_by_host(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool every plan call per host (all loads) into p50/p99."""
    out: dict[str, Any] = {}
    for host in dict.fromkeys(r["host"] for r in runs):
        row = {}
        timed = [r for r in runs if r["host"] == host and r["timed"]]
        for side in TIMED:
            lat = [x for r in timed for x in r[side]["latencies_ms"]]
            row[side] = {
                "calls": len(lat),
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "max_ms": max(lat),
            }
        rej = [x for r in timed for x in r["ours"]["rejected_latencies_ms"]]
        row["ours"]["rejected_calls"] = len(rej)
        row["ours"]["rejected_p99_ms"] = percentile(rej, 99) if rej else None
        out[host] = row
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def rel(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def _four(row: dict[str, Any], key: str) -> str:
    return " / ".join(pct(row[side][key]) for side in SIDES)


def vcpu_table(title: str, summary: dict[str, Any]) -> list[str]:
    """Markdown table of rejected vCPUs per load, against nova, nova pack and fluid."""
    lines = [
        f"#### {title}",
        "",
        "| load | vm-host | nova | nova pack | fluid | fewer than nova | fewer than nova pack "
        "| gap nova-fluid closed | two-node excluded (vm-host / nova / pack / fluid) "
        "| util. at 1st rejection (vm-host / nova / pack / fluid) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for load, row in summary.items():
        lines.append(
            f"| {load} | "
            + " | ".join(pct(row[side]["vcpu_rate"]) for side in SIDES)
            + f" | {rel(row['fewer_vcpus_than_nova'])} | {rel(row['fewer_vcpus_than_pack'])} | "
            f"{pct(row['gap_closed'])} | {_four(row, 'vcpu_rate_excl_two_node')} | "
            f"{_four(row, 'mean_util_at_first_rejection')} |"
        )
    lines.append("")
    return lines


def kind_table(title: str, summary: dict[str, Any], key: str) -> list[str]:
    """Markdown table of one per-kind rate (vCPUs or requests) for the four sides."""
    lines = [
        f"#### {title}",
        "",
        "| load | " + " | ".join(KINDS) + " |",
        "| ---: | " + " | ".join("---:" for _ in KINDS) + " |",
    ]
    for load, row in summary.items():
        cells = []
        for k in KINDS:
            got = [row[side]["per_kind"].get(k) for side in SIDES]
            cells.append(
                "-" if not all(got) else " / ".join(pct(g[key]) for g in got if g is not None)
            )
        lines.append(f"| {load} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def targets(summary: dict[str, Any], latency: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the measured number and whether it is met."""
    loads = [k for k in summary if k != "all"]

    def worst(key: str) -> tuple[str, float]:
        load = min(loads, key=lambda x: summary[x][key])
        return load, summary[load][key]

    nova_load, nova_min = worst("fewer_vcpus_than_nova")
    pack_load, pack_min = worst("fewer_vcpus_than_pack")
    excl_load = max(loads, key=lambda x: summary[x]["excl_two_node_vs_pack"])
    excl = summary[excl_load]["excl_two_node_vs_pack"]
    gap = summary["all"]["gap_closed"]
    p99 = max(row["ours"]["p99_ms"] for row in latency.values())
    rows = [
        (
            "fewer rejected vCPUs than nova, every load",
            ">= 35%",
            f"{100 * nova_min:.1f}% (worst, load {nova_load})",
            nova_min >= 0.35,
        ),
        (
            "fewer rejected vCPUs than nova pack, every load",
            ">= 15%",
            f"{100 * pack_min:.1f}% (worst, load {pack_load})",
            pack_min >= 0.15,
        ),
        (
            "two-node excluded: vm-host minus nova pack, every load",
            "<= 0 points",
            f"{100 * excl:+.2f} points (worst, load {excl_load})",
            excl <= 0,
        ),
        ("gap nova-fluid closed, pooled", ">= 75%", pct(gap), gap is not None and gap >= 0.75),
        ("plan p99, every host (no-fit included)", "< 5 ms", f"{p99:.2f} ms", p99 < 5),
    ]
    lines = [
        "#### Targets (synthetic hosts pooled)",
        "",
        "| target | wanted | measured | met |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [f"| {a} | {b} | {c} | {'yes' if d else 'NO'} |" for a, b, c, d in rows]
    lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """Render the report as Markdown tables."""
    meta = report["meta"]
    synth = [h["name"] for h in report["hosts"] if h["source"] == "synthetic"]
    lines = [
        f"Generated {meta['finished']} by `{meta['command']}` (seed {meta['seed']}, "
        f"{meta['traces']} traces per synthetic host and load, 1 per fixture host and load, "
        f"{meta['arrivals']} arrivals per trace, "
        f"{len(report['hosts'])} hosts x {len(meta['loads'])} loads, "
        f"{meta['duration_s']:.0f} s on {meta['cpus']} CPUs).",
        f"vm-host allocator: src/vmhost/placement.py at {meta['placement']}.",
        "",
    ]
    lines += vcpu_table(
        f"Rejected vCPUs per offered load: synthetic hosts ({', '.join(synth)}) pooled",
        report["summary_synthetic"],
    )
    lines += targets(report["summary_synthetic"], report["latency"])
    lines += kind_table(
        "Rejected vCPUs per request kind, synthetic hosts pooled "
        "(vm-host / nova / nova pack / fluid)",
        report["summary_synthetic"],
        "vcpu_rate",
    )
    if report["summary_fixtures"]:
        lines += vcpu_table(
            "Rejected vCPUs per offered load: libvirt fixture hosts pooled",
            report["summary_fixtures"],
        )
        lines += kind_table(
            "Rejected vCPUs per request kind, fixture hosts pooled "
            "(vm-host / nova / nova pack / fluid)",
            report["summary_fixtures"],
            "vcpu_rate",
        )
    lines += [
        "nova: default settings (host cells with the most free resources tried first). "
        "nova pack: `[compute] packing_host_numa_cells_allocation_strategy = True` (fullest "
        "cells first). fluid: one pool of CPUs and of 1G pages, accepts whenever the host as a "
        "whole has room (the bound no allocator of pinned VMs can beat). Rejected vCPUs: share "
        "of the requested vCPUs (warm-up excluded) that were turned away. Gap closed: (nova - "
        "vm-host) / (nova - fluid). Two-node excluded: the same share over every request "
        "except two-node ones. Utilisation at first rejection: pinned CPUs / host CPUs just "
        "before the first request that was turned away, averaged over the traces that had one.",
        "",
    ]
    lines += kind_table(
        "Rejected requests (by count) per kind, synthetic hosts pooled "
        "(vm-host / nova / nova pack / fluid)",
        report["summary_synthetic"],
        "rate",
    )
    lines += [
        "#### Rejected vCPUs per host (vm-host / nova / nova pack / fluid)",
        "",
        "| host | nodes | CPUs | " + " | ".join(f"load {x:.1f}" for x in meta["loads"]) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in meta["loads"]) + " |",
    ]
    for host in report["hosts"]:
        row = report["per_host"][host["name"]]
        cells = [_four(row[f"{x:.1f}"], "vcpu_rate") for x in meta["loads"]]
        lines.append(
            f"| {host['name']} | {host['nodes']} | {host['cpus']} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "#### Plan latency per host (every call of the first trace per load, all loads; ms)",
        "",
        "| host | calls | vm-host p50 | vm-host p99 | vm-host max | vm-host p99 rejected "
        "| nova p50 | nova p99 | nova max | nova pack p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["latency"].items():
        o, n, p = row["ours"], row["nova"], row["nova_pack"]
        rej = "-" if o["rejected_p99_ms"] is None else f"{o['rejected_p99_ms']:.2f}"
        lines.append(
            f"| {name} | {o['calls']} | {o['p50_ms']:.2f} | {o['p99_ms']:.2f} | "
            f"{o['max_ms']:.2f} | {rej} | {n['p50_ms']:.2f} | {n['p99_ms']:.2f} | "
            f"{n['max_ms']:.2f} | {p['p99_ms']:.2f} |"
        )
    lines += [
        "",
        "#### Time to reject an 8-node request that cannot fit",
        "",
        "Synthetic host, 12 cores x 2 threads per node, 9 cores of every node pinned (6 free "
        "CPUs per node); request: 96 pinned vCPUs and 96 GiB over 8 nodes (nova: 8 guest "
        "cells of 12).",
        "",
        "| host nodes | vm-host (median of 20) | vm-host max | nova |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in report["rejection_time"]:
        n = row["nova"]
        shown = (
            f"> {n['cap_s']:g} s (stopped)"
            if n["timed_out"]
            else f"{n['seconds']:.3f} s" + ("" if n["accepted"] is False else " (placed!)")
        )
        o = row["ours"]
        lines.append(
            f"| {row['nodes']} | {o['median_ms']:.2f} ms"
            f"{'' if not o['accepted'] else ' (placed!)'} | {o['max_ms']:.2f} ms | {shown} |"
        )
    lines += [
        "",
        "#### vm-host smt-policy prefer vs isolate (odd vCPU counts)",
        "",
        "Synthetic hosts, traces with small/medium/hugepage sizes one vCPU less (1, 3, 5, 7, 3) "
        "so half-used cores appear; vm-host only (nova's isolate means something else, see "
        'bench/README.md). "Sharing": VMs placed on a core that already ran another VM.',
        "",
        "| host | load | prefer: rejected | prefer: sharing | isolate: rejected "
        "| isolate: sharing | isolate: VMs placed |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["isolate"]:
        p, i = row["prefer"], row["isolate"]
        lines.append(
            f"| {row['host']} | {row['load']:.1f} | {pct(p['rate'])} | "
            f"{p['vms_sharing_a_core']} | {pct(i['rate'])} | {i['vms_sharing_a_core']} | "
            f"{i['accepted']} |"
        )
    viol = sum(r["ours"]["violation_count"] for r in report["runs"]) + sum(
        r[smt]["violation_count"] for r in report["isolate"] for smt in ("prefer", "isolate")
    )
    lines += [
        "",
        f"Placement check: {viol} vm-host placements broke a capacity rule "
        "(double-booked CPU, pages over the node's count, CPUs outside their cell's node).",
        "",
        "![rejected vCPUs against offered load](allocator-rejections.png)",
        "",
    ]
    return "\n".join(lines)


PLOT_STYLES = (
    ("ours", "vm-host", "-o", "tab:blue"),
    ("nova", f"nova {NOVA_VERSION} (default: spread)", "--s", "tab:orange"),
    ("nova_pack", f"nova {NOVA_VERSION} (packing strategy)", ":^", "tab:green"),
    ("fluid", "fluid reference (one pool)", "-.", "tab:gray"),
)


def plot(report: dict[str, Any], path: Path) -> None:
    """Draw rejected vCPUs against offered load: synthetic hosts pooled, and per host."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 5.6), layout="constrained")
    grid = fig.add_gridspec(2, 4)
    summary = report["summary_synthetic"]
    loads = [float(x) for x in summary if x != "all"]
    ax = fig.add_subplot(grid[:, :2])
    for side, label, style, color in PLOT_STYLES:
        rates = [100 * summary[f"{x:.1f}"][side]["vcpu_rate"] for x in loads]
        ax.plot(loads, rates, style, color=color, label=label, linewidth=2)
    synth = [h for h in report["hosts"] if h["source"] == "synthetic"][:4]
    ax.set_title(f"{len(synth)} synthetic hosts pooled ({report['meta']['traces']} traces each)")
    ax.set_xlabel("offered load (mean demanded CPUs / host CPUs)")
    ax.set_ylabel("requested vCPUs rejected (%)")
    ax.set_xticks(loads)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    for i, host in enumerate(synth):
        ax = fig.add_subplot(grid[i // 2, 2 + i % 2])
        row = report["per_host"][host["name"]]
        for side, _label, style, color in PLOT_STYLES:
            ax.plot(
                loads,
                [100 * row[f"{x:.1f}"][side]["vcpu_rate"] for x in loads],
                style,
                color=color,
            )
        ax.set_title(f"synthetic {host['nodes']} nodes x 24 CPUs", fontsize=10)
        ax.set_xticks(loads)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if i % 2 == 0:
            ax.set_ylabel("vCPUs rejected (%)", fontsize=9)
    fig.suptitle(
        f"Requested vCPUs rejected: vm-host allocator vs nova's NUMA fitter (seed "
        f"{report['meta']['seed']})"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Main


def placement_version() -> str:
    """The last commit of src/vmhost/placement.py, marked when the working copy differs."""
    git = shutil.which("git")
    repo = Path(__file__).resolve().parents[1]
    if git is None:
        return "unknown"
    path = "src/vmhost/placement.py"
    log = subprocess.run(
        [git, "-C", str(repo), "log", "-1", "--format=%h %s", "--", path],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        [git, "-C", str(repo), "status", "--porcelain", "--", path],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (log or "uncommitted") + (" (+ uncommitted changes)" if dirty else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare vm-host's allocator with the real nova NUMA fitter."
    )
    parser.add_argument("--quick", action="store_true", help="short run (< 2 minutes)")
    parser.add_argument(
        "--seed", type=int, default=1, help="seed every trace is drawn from (default 1)"
    )
    parser.add_argument(
        "--traces",
        type=int,
        help="traces per synthetic host and load (default 4; quick 2); fixture hosts get 1",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="results folder (default bench/results; with --quick bench/.cache/results-quick)",
    )
    parser.add_argument(
        "--arrivals", type=int, help="arrivals per trace (default 1200; quick 300)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="time each plan call k times, keep the fastest"
    )
    parser.add_argument(
        "--traces-only",
        action="store_true",
        help="skip the smt-policy and 8-node rejection sections (for iterating)",
    )
    parser.add_argument(
        "--nova-cap", type=float, help="seconds before nova's rejection is stopped (default 120)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    measured = placement_version()  # vmhost.placement was imported with this module

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    arrivals = args.arrivals or (300 if args.quick else 1200)
    traces = args.traces or (2 if args.quick else 4)
    cap = args.nova_cap or (10.0 if args.quick else 120.0)
    node_counts = (8, 10, 16) if args.quick else (8, 10, 12, 16)
    synthetic = [synthetic_host(n) for n in (2, 4, 8, 16)]
    fixtures = fixture_hosts()
    if args.quick:
        fixtures = [h for h in fixtures if "96cpu" in h.name or "cpu-pairs" in h.name]
    hosts = synthetic + fixtures

    python = ensure_venv(log)
    runs = []
    with NovaWorker(python) as worker:
        nova_version = worker.request({"op": "hello"})["nova"]
        log(
            f"nova {nova_version} worker ready; seed {args.seed}: {len(hosts)} hosts x "
            f"{len(LOADS)} loads x {traces} traces, {arrivals} arrivals per trace"
        )
        for host in hosts:
            for load in LOADS:
                # The fixture hosts are a side table: one trace per load.
                for part in range(traces if host in synthetic else 1):
                    trace = make_trace(host, load, arrivals, args.seed, part=part)
                    # Only the first trace per host and load is timed with repeats (the
                    # latency table); the others count rejections.
                    run = run_trace(worker, host, trace, args.repeats if part == 0 else 1)
                    runs.append(run)
                    o, n, p, f = (run[side] for side in SIDES)
                    log(
                        f"{host.name[:34]:34s} load {load:.1f} #{part}: vCPUs rejected vm-host "
                        f"{pct(o['rejected_vcpus'] / o['counted_vcpus']):>6s} nova "
                        f"{pct(n['rejected_vcpus'] / n['counted_vcpus']):>6s} pack "
                        f"{pct(p['rejected_vcpus'] / p['counted_vcpus']):>6s} fluid "
                        f"{pct(f['rejected_vcpus'] / f['counted_vcpus']):>6s}; "
                        f"p99 {o['latency_ms']['p99']:.2f} ms"
                        + (f"; {o['violation_count']} VIOLATIONS" if o["violation_count"] else "")
                    )
    isolate, reject_rows = [], []
    if not args.traces_only:
        isolate = isolate_runs(synthetic, max(100, arrivals // 2), args.seed, log)
        log(f"time to reject an 8-node request (nova capped at {cap:g} s)")
        reject_rows = rejection_times(python, node_counts, cap, log)

    summary = summarise(runs)
    report = {
        "meta": {
            "nova_version": nova_version,
            "placement": measured,
            "seed": args.seed,
            "traces": traces,
            "repeats": args.repeats,
            "quick": args.quick,
            "arrivals": arrivals,
            "loads": list(LOADS),
            "command": "python -m bench.allocator"
            + (" --quick" if args.quick else "")
            + f" --seed {args.seed}"
            + (f" --traces {args.traces}" if args.traces else "")
            + (f" --arrivals {args.arrivals}" if args.arrivals else "")
            + (f" --nova-cap {args.nova_cap:g}" if args.nova_cap else ""),
            "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "duration_s": time.perf_counter() - started,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "policy": "smt-policy prefer, no reserved CPUs, ratio 1.0 (vm-host); "
            "hw:cpu_policy=dedicated, default thread policy, every CPU in "
            "cpu_dedicated_set (nova)",
        },
        "hosts": [
            {
                "name": h.name,
                "source": h.source,
                "nodes": len(h.topology.nodes),
                "cpu_nodes": len(h.cpu_nodes),
                "cpus": h.total_cpus,
                "node_cpus": h.node_cpus,
                "smt": h.smt,
                "kind_sizes": kind_sizes(h),
                "mean_request_cpus": round(mean_request_cpus(kind_sizes(h)), 3),
            }
            for h in hosts
        ],
        "summary": summary,
        "summary_synthetic": summarise(
            [r for r in runs if r["host"] in {h.name for h in synthetic}]
        ),
        "summary_fixtures": summarise(
            [r for r in runs if r["host"] in {h.name for h in fixtures}]
        ),
        "per_host": {h.name: summarise([r for r in runs if r["host"] == h.name]) for h in hosts},
        "latency": latency_by_host(runs),
        "rejection_time": reject_rows,
        "isolate": isolate,
        "runs": runs,
    }
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    args.out.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(report))
    for run in slim["runs"]:
        for side in SIDES:
            del run[side]["latencies_ms"], run[side]["accepted_ids"]
            del run[side]["rejected_latencies_ms"]
    (args.out / "allocator.json").write_text(json.dumps(slim, indent=1) + "\n")
    (args.out / "allocator.md").write_text(markdown(report))
    plot(report, args.out / "allocator-rejections.png")

    print()
    print(markdown(report).split("#### Rejected vCPUs per host")[0])
    log(f"wrote {args.out}/allocator.json, allocator.md, allocator-rejections.png")
    broken = any(r["ours"]["violation_count"] for r in runs) or any(
        r["prefer"]["violation_count"]
        or r["isolate"]["violation_count"]
        or r["isolate"]["vms_sharing_a_core"]
        for r in isolate
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

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

from bench import ours  # noqa: E402
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
SIDES = ("ours", "nova", "nova_pack")
"""vm-host; nova with its default cell order (emptiest first); nova with
`[compute] packing_host_numa_cells_allocation_strategy = True` (fullest first)."""
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
        "accepted_ids": [r["id"] for r in results if r["accepted"]],
    }


# ---------------------------------------------------------------------------------------------
# Runs


def run_trace(worker: NovaWorker, host: BenchHost, trace: Trace, repeats: int) -> dict[str, Any]:
    """Replay one trace through nova (in its worker, spread and pack) and through vm-host."""
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
    return {
        "host": host.name,
        "load": trace.load,
        "arrivals": len(trace.requests),
        "warmup_arrivals": trace.warmup_arrivals,
        "mean_lifetime": round(trace.mean_lifetime, 3),
        "ours": side_stats(trace, host, ours_answer["results"], ours_answer["violations"]),
        "ours_vms_sharing_a_core": ours_answer["shared_core_vms"],
        "nova": side_stats(trace, host, nova_answer["results"], []),
        "nova_pack": side_stats(trace, host, pack_answer["results"], []),
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
    vm-host's best 8 nodes hold 48 of the 96 CPUs needed.
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
        memory_mib=8 * per_cell * MEMORY_MIB_PER_VCPU,
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


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool every host's counted requests per load level (each trace has equal arrivals)."""
    per_load: dict[str, Any] = {}
    for load in sorted({r["load"] for r in runs}):
        row: dict[str, Any] = {}
        for side in SIDES:
            sel = [r[side] for r in runs if r["load"] == load]
            counted = sum(s["counted"] for s in sel)
            rejected = sum(s["rejected"] for s in sel)
            kinds: dict[str, Any] = {}
            for k in KINDS:
                req = sum(s["per_kind"].get(k, {}).get("requests", 0) for s in sel)
                rej = sum(s["per_kind"].get(k, {}).get("rejected", 0) for s in sel)
                if req:
                    kinds[k] = {"requests": req, "rejected": rej, "rate": rej / req}
            utils = [s["first_rejection"]["utilisation"] for s in sel if s["first_rejection"]]
            demand = sum(s["counted_vcpus"] for s in sel)
            row[side] = {
                "counted": counted,
                "rejected": rejected,
                "rate": rejected / counted if counted else 0.0,
                "vcpu_rate": sum(s["rejected_vcpus"] for s in sel) / demand if demand else 0.0,
                "per_kind": kinds,
                "mean_util_at_first_rejection": statistics.mean(utils) if utils else None,
                "traces_without_rejection": sum(1 for s in sel if not s["first_rejection"]),
            }
        o, n, p = row["ours"]["rate"], row["nova"]["rate"], row["nova_pack"]["rate"]
        row["relative_reduction"] = (n - o) / n if n else None
        row["relative_reduction_vs_pack"] = (p - o) / p if p else None
        per_load[f"{load:.1f}"] = row
    return per_load


def latency_by_host(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool every plan call per host (all loads) into p50/p99."""
    out: dict[str, Any] = {}
    for host in dict.fromkeys(r["host"] for r in runs):
        row = {}
        for side in SIDES:
            lat = [x for r in runs if r["host"] == host for x in r[side]["latencies_ms"]]
            row[side] = {
                "calls": len(lat),
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "max_ms": max(lat),
            }
        out[host] = row
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def rel(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def load_table(title: str, summary: dict[str, Any]) -> list[str]:
    """Markdown table of rejection rates and first-rejection utilisation per load."""
    lines = [
        f"## {title}",
        "",
        "| load | vm-host | nova | nova pack | fewer than nova | fewer than nova pack "
        "| vCPUs rejected (vm-host / nova / pack) | util. at 1st rejection (vm-host / nova "
        "/ pack) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for load, row in summary.items():
        o, n, p = row["ours"], row["nova"], row["nova_pack"]
        lines.append(
            f"| {load} | {pct(o['rate'])} | {pct(n['rate'])} | {pct(p['rate'])} | "
            f"{rel(row['relative_reduction'])} | {rel(row['relative_reduction_vs_pack'])} | "
            f"{pct(o['vcpu_rate'])} / {pct(n['vcpu_rate'])} / {pct(p['vcpu_rate'])} | "
            f"{pct(o['mean_util_at_first_rejection'])} / "
            f"{pct(n['mean_util_at_first_rejection'])} / "
            f"{pct(p['mean_util_at_first_rejection'])} |"
        )
    lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """Render the report as Markdown tables."""
    meta = report["meta"]
    lines = [
        "# vm-host allocator vs nova " + meta["nova_version"],
        "",
        f"Generated {meta['finished']} by `{meta['command']}` "
        f"(seed {meta['seed']}, {meta['arrivals']} arrivals per trace, "
        f"{len(report['hosts'])} hosts x {len(meta['loads'])} loads, "
        f"{meta['duration_s']:.0f} s on {meta['cpus']} CPUs).",
        f"vm-host allocator: src/vmhost/placement.py at {meta['placement']}.",
        "",
    ]
    lines += load_table(
        "Rejection rate per offered load (all hosts pooled, warm-up excluded)", report["summary"]
    )
    lines += load_table(
        "Synthetic SMT hosts only (pooled)",
        report["summary_synthetic"],
    )
    lines += [
        "",
        "nova: default settings (host cells with the most free resources tried first). "
        "nova pack: `[compute] packing_host_numa_cells_allocation_strategy = True` (fullest "
        "cells first). "
        "vCPUs rejected: share of the requested vCPUs (not requests) that were turned away. "
        "Utilisation at first rejection: pinned CPUs / host CPUs just before the first request "
        "that was turned away, averaged over the traces that had a rejection.",
        "",
        "## Rejection rate per request kind, all hosts pooled (vm-host / nova / nova pack)",
        "",
        "| load | " + " | ".join(KINDS) + " |",
        "| ---: | " + " | ".join("---:" for _ in KINDS) + " |",
    ]
    for load, row in report["summary"].items():
        cells = []
        for k in KINDS:
            o, n, p = (row[side]["per_kind"].get(k) for side in SIDES)
            cells.append(
                "-"
                if not (o and n and p)
                else f"{pct(o['rate'])} / {pct(n['rate'])} / {pct(p['rate'])}"
            )
        lines.append(f"| {load} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Per host (rejection rate vm-host / nova / nova pack)",
        "",
        "| host | nodes | CPUs | " + " | ".join(f"load {x:.1f}" for x in meta["loads"]) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in meta["loads"]) + " |",
    ]
    by_host = {h["name"]: h for h in report["hosts"]}
    for name, host in by_host.items():
        cells = []
        for load in meta["loads"]:
            run = next(
                (r for r in report["runs"] if r["host"] == name and r["load"] == load), None
            )
            cells.append(
                "-" if run is None else " / ".join(pct(run[side]["rate"]) for side in SIDES)
            )
        lines.append(f"| {name} | {host['nodes']} | {host['cpus']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Plan latency per host (every call, all loads; ms)",
        "",
        "| host | calls | vm-host p50 | vm-host p99 | vm-host max "
        "| nova p50 | nova p99 | nova max | nova pack p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["latency"].items():
        o, n, p = row["ours"], row["nova"], row["nova_pack"]
        lines.append(
            f"| {name} | {o['calls']} | {o['p50_ms']:.2f} | {o['p99_ms']:.2f} | "
            f"{o['max_ms']:.2f} | {n['p50_ms']:.2f} | {n['p99_ms']:.2f} | {n['max_ms']:.2f} | "
            f"{p['p99_ms']:.2f} |"
        )
    lines += [
        "",
        "## Time to reject an 8-node request that cannot fit",
        "",
        "Synthetic host, 12 cores x 2 threads per node, 9 cores of every node pinned (6 free "
        "CPUs per node); request: 96 pinned vCPUs over 8 nodes (nova: 8 guest cells of 12).",
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
        "## vm-host smt-policy prefer vs isolate (odd vCPU counts)",
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
        "![rejection rate against offered load](allocator-rejections.png)",
        "",
    ]
    return "\n".join(lines)


PLOT_STYLES = (
    ("ours", "vm-host", "-o", "tab:blue"),
    ("nova", f"nova {NOVA_VERSION} (default: spread)", "--s", "tab:orange"),
    ("nova_pack", f"nova {NOVA_VERSION} (packing strategy)", ":^", "tab:green"),
)


def plot(report: dict[str, Any], path: Path) -> None:
    """Draw rejection rate against offered load: all hosts pooled, and per synthetic host."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 5.6), layout="constrained")
    grid = fig.add_gridspec(2, 4)
    loads = [float(x) for x in report["summary"]]
    ax = fig.add_subplot(grid[:, :2])
    for side, label, style, color in PLOT_STYLES:
        rates = [100 * report["summary"][f"{x:.1f}"][side]["rate"] for x in loads]
        ax.plot(loads, rates, style, color=color, label=label, linewidth=2)
    ax.set_title(f"All {len(report['hosts'])} hosts pooled")
    ax.set_xlabel("offered load (mean demanded CPUs / host CPUs)")
    ax.set_ylabel("requests rejected (%)")
    ax.set_xticks(loads)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    synth = [h for h in report["hosts"] if h["source"] == "synthetic"][:4]
    for i, host in enumerate(synth):
        ax = fig.add_subplot(grid[i // 2, 2 + i % 2])
        runs = sorted(
            (r for r in report["runs"] if r["host"] == host["name"]), key=lambda r: r["load"]
        )
        xs = [r["load"] for r in runs]
        for side, _label, style, color in PLOT_STYLES:
            ax.plot(xs, [100 * r[side]["rate"] for r in runs], style, color=color)
        ax.set_title(f"synthetic {host['nodes']} nodes x 24 CPUs", fontsize=10)
        ax.set_xticks(xs)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if i % 2 == 0:
            ax.set_ylabel("rejected (%)", fontsize=9)
    fig.suptitle("Pinned-VM requests rejected: vm-host allocator vs nova's NUMA fitter")
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
    parser.add_argument("--seed", type=int, default=1, help="trace seed (default 1)")
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
    cap = args.nova_cap or (10.0 if args.quick else 120.0)
    node_counts = (8, 10, 16) if args.quick else (8, 10, 12, 16)
    synthetic = [synthetic_host(n) for n in ((2, 4) if args.quick else (2, 4, 8, 16))]
    fixtures = fixture_hosts()
    if args.quick:
        fixtures = [h for h in fixtures if "96cpu" in h.name or "cpu-pairs" in h.name]
    hosts = synthetic + fixtures

    python = ensure_venv(log)
    runs = []
    with NovaWorker(python) as worker:
        nova_version = worker.request({"op": "hello"})["nova"]
        log(
            f"nova {nova_version} worker ready; {len(hosts)} hosts x {len(LOADS)} loads, "
            f"{arrivals} arrivals per trace"
        )
        for host in hosts:
            for load in LOADS:
                trace = make_trace(host, load, arrivals, args.seed)
                run = run_trace(worker, host, trace, args.repeats)
                runs.append(run)
                o, n, p = run["ours"], run["nova"], run["nova_pack"]
                log(
                    f"{host.name[:40]:40s} load {load:.1f}: rejected vm-host "
                    f"{pct(o['rate']):>6s} nova {pct(n['rate']):>6s} pack {pct(p['rate']):>6s}; "
                    f"p99 {o['latency_ms']['p99']:.2f} / "
                    f"{n['latency_ms']['p99']:.2f} ms"
                    + (f"; {o['violation_count']} VIOLATIONS" if o["violation_count"] else "")
                )
    isolate = isolate_runs(synthetic, max(100, arrivals // 2), args.seed, log)
    log(f"time to reject an 8-node request (nova capped at {cap:g} s)")
    reject_rows = rejection_times(python, node_counts, cap, log)

    summary = summarise(runs)
    report = {
        "meta": {
            "nova_version": nova_version,
            "placement": measured,
            "seed": args.seed,
            "repeats": args.repeats,
            "quick": args.quick,
            "arrivals": arrivals,
            "loads": list(LOADS),
            "command": "python -m bench.allocator" + (" --quick" if args.quick else ""),
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
    (args.out / "allocator.json").write_text(json.dumps(slim, indent=1) + "\n")
    (args.out / "allocator.md").write_text(markdown(report))
    plot(report, args.out / "allocator-rejections.png")

    print()
    print(markdown(report).split("## Per host")[0])
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

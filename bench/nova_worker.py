"""Drive the real nova NUMA fitter; runs inside bench/.nova-venv, never in vm-host's venv.

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout.

* ``{"op": "hello"}`` -> ``{"ok": true, "nova": "<version>"}``
* ``{"op": "replay", "host": H, "requests": {id: R}, "events": [["arrive"|"depart", id]],
  "repeats": k, "pack": bool}``
  -> ``{"ok": true, "results": [{"id", "accepted", "latency_s", "pinned_before",
  "cells"}]}`` (one entry per arrival, in event order). Departures of rejected requests are
  skipped, as a real cloud would never have started those VMs.
* ``{"op": "fit", "host": H, "prefill": [[node, [cpus]]], "request": R}`` -> ``{"ok": true,
  "accepted": bool, "latency_s": float}``: one fit on a host with CPUs already pinned.

H is `bench.workload.nova_host_json`; R is `bench.workload.Request.to_json`. Only the call
to `numa_fit_instance_to_host` is timed; building the instance topology from the flavor and
consuming or freeing host usage are not. With ``repeats`` each fit is timed k times and the
fastest kept (see `fit`).

Requests become flavors with ``hw:cpu_policy=dedicated`` (plus ``hw:numa_nodes=2`` for two
node requests and ``hw:mem_page_size=1GB`` for 1G-hugepage requests) and go through nova's
own `numa_get_constraints`, so the instance NUMA topology is exactly what nova's API would
build for such a flavor.
"""

# pyright: reportMissingImports=false
# (nova is installed in bench/.nova-venv only; this file never runs in vm-host's environment)

from __future__ import annotations

import json
import sys
import time
import warnings

warnings.simplefilter("ignore")  # eventlet and oslo deprecation noise; logging stays as nova
# leaves it unconfigured (WARNING and above, to stderr)

import nova.conf  # noqa: E402
from nova import objects  # noqa: E402
from nova.virt import hardware  # noqa: E402

objects.register_all()

_IMAGE = objects.ImageMeta.from_dict({})


def build_host(desc):
    """Build nova's host `NUMATopology` as the libvirt driver would, with no usage."""
    cells = []
    for node in desc["nodes"]:
        mempages = [
            objects.NUMAPagesTopology(size_kb=int(size), total=int(total), used=0, reserved=0)
            for size, total in sorted(node["pages"].items(), key=lambda kv: int(kv[0]))
        ]
        cells.append(
            objects.NUMACell(
                id=node["id"],
                socket=node["socket"],
                cpuset=set(),
                pcpuset=set(node["cpus"]),
                memory=node["memory_mib"],
                cpu_usage=0,
                memory_usage=0,
                pinned_cpus=set(),
                siblings=[set(s) for s in node["siblings"]],
                mempages=mempages,
                network_metadata=objects.NetworkMetadata(physnets=set(), tunneled=False),
            )
        )
    return objects.NUMATopology(cells=cells)


def instance_topology(request):
    """Build the instance NUMA topology nova's API derives from the request's flavor."""
    extra_specs = {"hw:cpu_policy": "dedicated"}
    if request["numa_nodes"] > 1:
        extra_specs["hw:numa_nodes"] = str(request["numa_nodes"])
    if request["hugepages_1g"]:
        extra_specs["hw:mem_page_size"] = "1GB"
    flavor = objects.Flavor(
        vcpus=request["vcpus"], memory_mb=request["memory_mib"], extra_specs=extra_specs
    )
    return hardware.numa_get_constraints(flavor, _IMAGE)


def fit(host, request, repeats=1):
    """Run nova's fitter; return (fitted instance topology or None, seconds).

    With repeats > 1 the same fit runs again on a fresh instance topology (nova writes the
    chosen pinning into it) and the fastest time is kept: the fitter does not change the host,
    so every run gives the same answer, and the minimum filters out preemption by other
    processes on a shared machine.
    """
    best = float("inf")
    fitted = None
    for _ in range(repeats):
        inst = instance_topology(request)
        start = time.perf_counter()
        fitted = hardware.numa_fit_instance_to_host(host, inst, None)
        best = min(best, time.perf_counter() - start)
    return fitted, best


def pinned_count(host):
    """Pinned host CPUs right now, from nova's own accounting."""
    return sum(len(cell.pinned_cpus) for cell in host.cells)


def replay(msg):
    """Replay a trace; see the module docstring.

    ``"pack": true`` sets ``[compute] packing_host_numa_cells_allocation_strategy = True``
    for this replay (nova's default, False, tries the emptiest host cells first).
    """
    conf = nova.conf.CONF
    conf.set_override(
        "packing_host_numa_cells_allocation_strategy", bool(msg.get("pack")), group="compute"
    )
    try:
        return _replay(msg)
    finally:
        conf.clear_override("packing_host_numa_cells_allocation_strategy", group="compute")


def _replay(msg):
    host = build_host(msg["host"])
    requests = msg["requests"]
    live = {}
    results = []
    for what, rid in msg["events"]:
        key = str(rid)
        if what == "depart":
            fitted = live.pop(key, None)
            if fitted is not None:
                host = hardware.numa_usage_from_instance_numa(host, fitted, free=True)
            continue
        before = pinned_count(host)
        fitted, seconds = fit(host, requests[key], msg.get("repeats", 1))
        if fitted is not None:
            host = hardware.numa_usage_from_instance_numa(host, fitted, free=False)
            live[key] = fitted
        results.append(
            {
                "id": rid,
                "accepted": fitted is not None,
                "latency_s": seconds,
                "pinned_before": before,
                "cells": [c.id for c in fitted.cells] if fitted is not None else [],
            }
        )
    return {"ok": True, "results": results, "pinned_at_end": pinned_count(host)}


def fit_prefilled(msg):
    """One fit on a host whose CPUs listed in prefill are already pinned."""
    host = build_host(msg["host"])
    by_id = {cell.id: cell for cell in host.cells}
    for node, cpus in msg["prefill"]:
        by_id[node].pin_cpus(set(cpus))
        by_id[node].memory_usage += len(cpus) * msg.get("prefill_mib_per_cpu", 0)
    fitted, seconds = fit(host, msg["request"])
    return {"ok": True, "accepted": fitted is not None, "latency_s": seconds}


def main():
    """Serve requests until stdin closes."""
    import nova.version

    handlers = {
        "hello": lambda _m: {"ok": True, "nova": nova.version.version_string()},
        "replay": replay,
        "fit": fit_prefilled,
    }
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            answer = handlers[msg["op"]](msg)
        except Exception as exc:  # report and keep serving
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

"""How long the exporter's reading and a scrape take with N VMs on the real libvirtd.

Composes N small VMs (1 vCPU, 64 MiB, a 1 GB sparse qcow2 root disk, no OS; one pinned VM per
two host CPUs, the rest shared) through the libvirt backend and pauses each (it stays active:
listed, in the bulk stats, holding its placement, but not spinning a host CPU), then times, K
times each:

- the reading (`exporter.read_sample`: version, topology, list_vms, one getAllDomainStats);
- a scrape (turning that reading into Prometheus text, what /metrics answers);
- the NUMA map page render.

It reports the fastest and median of each, for 0 VMs and for N, and the ratio between them;
then deletes what it made. Run it as root on a libvirt host, under the daemon lock here:

    flock /tmp/vmhost-daemons.lock uv run python -m bench.exporter --vms 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
from prometheus_client import CollectorRegistry, generate_latest

from vmhost import exporter, metrics
from vmhost.backends.libvirt import LibvirtBackend
from vmhost.model import DiskSpec, Policy, Rejection, VmSpec
from vmhost.placement import plan

PREFIX = "vmhost-bench-"
POOL = "vmhost-bench-pool"
POLICY = Policy(reserved_memory_mib=0)


def _times(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    spent = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - start)
    return {"min_s": min(spent), "median_s": statistics.median(spent)}


def _scrape(sample: metrics.Sample) -> bytes:
    registry = CollectorRegistry(auto_describe=False)

    class _C:
        def collect(self):
            return metrics.families(sample, POLICY, (), {})

    registry.register(_C())  # type: ignore[arg-type]
    return generate_latest(registry)


def measure(backend: LibvirtBackend, repeats: int) -> dict[str, Any]:
    sample = exporter.read_sample(backend)
    if sample.error:
        raise SystemExit(f"cannot read libvirt: {sample.error}")
    return {
        "vms": len(sample.vms),
        "running": len(sample.stats),
        "reading": _times(lambda: exporter.read_sample(backend), repeats),
        "scrape": _times(lambda: _scrape(sample), repeats),
        "page": _times(
            lambda: exporter.render_page(exporter.page_context(sample, POLICY, 30)), repeats
        ),
        "metrics_bytes": len(_scrape(sample)),
    }


def cleanup(backend: LibvirtBackend) -> None:
    for dom in backend.conn.listAllDomains(0):
        if dom.name().startswith(PREFIX):
            with contextlib.suppress(Exception):
                backend.delete(dom.name())
    with contextlib.suppress(libvirt.libvirtError):
        pool = backend.conn.storagePoolLookupByName(POOL)
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        pool.undefine()


def compose(backend: LibvirtBackend, count: int) -> float:
    start = time.perf_counter()
    cpus = len(backend.topology().cpus)
    for i in range(count):
        spec = VmSpec(
            name=f"{PREFIX}{i:03d}",
            vcpus=1,
            memory_mib=64,
            pinned_count=1 if i < cpus // 2 else 0,  # one pinned VM per two host CPUs
            disks=(DiskSpec("root", 1, POOL),),
        )
        allocations = [v.placement for v in backend.list_vms()]
        placement = plan(backend.topology(), allocations, spec, Policy(cpu_overcommit_ratio=100))
        if isinstance(placement, Rejection):
            raise SystemExit(f"{spec.name} refused: {placement}")
        backend.compose(spec, placement, (), POOL)
        # Paused, a domain stays active (listed, in the bulk stats, holding its placement)
        # without spinning a host CPU, so 50 of them fit on a small host.
        backend.conn.lookupByName(spec.name).suspend()
        print(f"\rcomposed {i + 1}/{count}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="exporter reading and scrape time with N VMs")
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/exporter.json"))
    args = parser.parse_args(argv)
    with LibvirtBackend() as backend:
        cleanup(backend)
        base = Path(tempfile.mkdtemp(prefix=PREFIX))
        base.chmod(0o755)
        backend.ensure_pool(POOL, str(base / "pool"))
        try:
            empty = measure(backend, args.repeats)
            compose_s = compose(backend, args.vms)
            full = measure(backend, args.repeats)
        finally:
            cleanup(backend)
            shutil.rmtree(base, ignore_errors=True)
    result = {
        "vms_composed": args.vms,
        "compose_s": round(compose_s, 1),
        "baseline": empty,
        "loaded": full,
        "reading_ratio": full["reading"]["median_s"] / empty["reading"]["median_s"],
        "scrape_ratio": full["scrape"]["median_s"] / empty["scrape"]["median_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for label, data in (("without bench VMs", empty), (f"with {args.vms} more VMs", full)):
        r, s, p = data["reading"], data["scrape"], data["page"]
        print(
            f"{label} ({data['vms']} VMs, {data['running']} running): reading median "
            f"{r['median_s'] * 1000:.1f} ms (min {r['min_s'] * 1000:.1f}), scrape median "
            f"{s['median_s'] * 1000:.2f} ms, page {p['median_s'] * 1000:.1f} ms, "
            f"/metrics {data['metrics_bytes']} bytes"
        )
    print(
        f"ratios loaded/baseline: reading {result['reading_ratio']:.1f}x, "
        f"scrape {result['scrape_ratio']:.1f}x; results in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

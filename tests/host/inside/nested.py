"""Helpers of the tests inside the multi-NUMA test host: the charm's actions, the host's view.

- `compose`, `delete`, `action`: the charm's actions in ops.testing on the real libvirtd;
- `free_pages()`: free huge pages per size and node (sysfs);
- `host_view(name)`: a running VM as the host sees it: numastat -p, memory per node and guest
  RAM mappings (numa_maps), vcpupin, emulatorpin, numatune, each thread's affinity (taskset -p);
- `wait_reports(ctx, state, names)`: the guests' own reports with the host view sampled while
  they ran.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from ops import testing

import charm

REPO = Path(__file__).resolve().parents[3]
RUN = Path("/run/vmhost")
RESULTS = Path(os.environ.get("VMHOST_RESULTS", "/run/vmhost/results"))
TINY = RUN / "tiny.qcow2"
LOCAL_IMAGES = Path("/var/lib/vmhost-test/local-images")
BRIDGE = "vmhost-test-br0"
POOL = "vmhost-test-pool"
HOST_SETUP: dict[str, Any] = {}
POOL_DIR = Path("/var/lib/vmhost-test/pool")
NODES = Path("/sys/devices/system/node")
QEMU_RUN = Path("/run/libvirt/qemu")
SIZES_KIB = (2048, 1048576)
BOOT_TIMEOUT_S = int(os.environ.get("VMHOST_NESTED_BOOT_TIMEOUT", "420"))
VIRSH = "/usr/bin/virsh"


def _load(name: str) -> ModuleType:
    path = REPO / "tests" / "guest" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"vmhost_host_{name}", path)
    assert module_spec
    assert module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


report = _load("report")


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def virsh(*args: str) -> str:
    return run(VIRSH, "-c", "qemu:///system", *args)


def action(ctx: testing.Context[charm.VmHostCharm], state: testing.State, which: str, **params):
    ctx.run(ctx.on.action(which, params=params), state)
    return dict(ctx.action_results or {})


def compose(ctx, state, name: str, **params) -> dict[str, Any]:
    """compose-vm; returns its results with placement and interfaces decoded."""
    params.setdefault("storage", "root:1")
    params.setdefault("image", "local:tiny")
    result = action(ctx, state, "compose-vm", name=name, **params)
    result["placement"] = json.loads(result["placement"])
    return result


def delete(ctx, state, name: str) -> None:
    with contextlib.suppress(testing.ActionFailed):
        action(ctx, state, "delete-vm", name=name)


def free_pages() -> dict[str, dict[int, int]]:
    """{"2M"|"1G": {node: free pages}} from sysfs."""
    out: dict[str, dict[int, int]] = {}
    for size in SIZES_KIB:
        label = "2M" if size == 2048 else "1G"
        out[label] = {}
        for node in sorted(NODES.glob("node[0-9]*")):
            path = node / "hugepages" / f"hugepages-{size}kB" / "free_hugepages"
            out[label][int(node.name[4:])] = int(path.read_text())
    return out


def qemu_pid(name: str) -> int:
    return int((QEMU_RUN / f"{name}.pid").read_text().strip())


def anon_mib_per_node(pid: int) -> dict[int, float]:
    """Anonymous and hugetlb memory of a process per node, from /proc/PID/numa_maps."""
    out: dict[int, float] = {}
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        fields = line.split()
        if not any(f.startswith(("anon=", "huge")) for f in fields):
            continue
        kib = page_kib
        for f in fields:
            if f.startswith("kernelpagesize_kB="):
                kib = int(f.split("=")[1])
        for f in fields:
            m = re.fullmatch(r"N(\d+)=(\d+)", f)
            if m:
                node = int(m.group(1))
                out[node] = out.get(node, 0.0) + int(m.group(2)) * kib / 1024
    return {n: round(v, 1) for n, v in sorted(out.items())}


def big_mappings(pid: int, min_mib: int = 64) -> list[dict[str, Any]]:
    """The process's anonymous or hugetlb mappings of min_mib or more (guest RAM) per node."""
    sizes = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        sizes[start] = (end - start) // (1024 * 1024)
    out = []
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        fields = line.split()
        size = sizes.get(int(fields[0], 16), 0)
        if size < min_mib or not any(f.startswith(("anon=", "huge")) for f in fields):
            continue
        kib = next((int(f.split("=")[1]) for f in fields if f.startswith("kernelpagesize_kB=")), 4)
        nodes = {}
        for f in fields:
            m = re.fullmatch(r"N(\d+)=(\d+)", f)
            if m:
                nodes[int(m.group(1))] = round(int(m.group(2)) * kib / 1024, 1)
        out.append({"size-mib": size, "policy": fields[1], "touched-mib-per-node": nodes})
    return out


def threads(pid: int) -> list[dict[str, Any]]:
    """Each thread of a QEMU process: id, name, the CPUs it may run on (taskset -p)."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda p: int(p.name)):
        with contextlib.suppress(OSError):
            tid = int(task.name)
            out.append(
                {
                    "tid": tid,
                    "name": (task / "comm").read_text().strip(),
                    "cpus": sorted(os.sched_getaffinity(tid)),
                    "taskset": run("/usr/bin/taskset", "-cp", str(tid)).strip(),
                }
            )
    return out


def host_view(name: str) -> dict[str, Any]:
    """What the test host says about a running VM."""
    pid = qemu_pid(name)
    return {
        "pid": pid,
        "numastat": run("/usr/bin/numastat", "-p", str(pid)),
        "memory-mib-per-node": anon_mib_per_node(pid),
        "guest-ram": big_mappings(pid),
        "vcpupin": virsh("vcpupin", name),
        "emulatorpin": virsh("emulatorpin", name),
        "numatune": virsh("numatune", name),
        "threads": threads(pid),
        "time": time.time(),
    }


def vcpu_threads(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in view["threads"] if re.fullmatch(r"CPU \d+/(KVM|TCG)", t["name"])]


def wait_reports(ctx, state, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each VM's report from its console, with the host's view sampled while it ran.

    The tiny guest powers off right after its report, so the host view is sampled every few
    seconds and the last sample taken while the VM ran is kept (its memory is at its peak).
    """
    start = time.monotonic()
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    while time.monotonic() - start < BOOT_TIMEOUT_S:
        for name in names:
            if "report" in out[name]:
                continue
            with contextlib.suppress(OSError, ValueError, subprocess.CalledProcessError):
                out[name]["host"] = host_view(name)
            log = action(ctx, state, "console-log", name=name, lines=2000)["log"]
            with contextlib.suppress(report.NoReportError):
                out[name]["report"] = report.parse(log)
                out[name]["report-after-s"] = round(time.monotonic() - start, 1)
        if all("report" in v for v in out.values()):
            return out
        time.sleep(3)
    missing = [n for n in names if "report" not in out[n]]
    pytest.fail(f"{missing} printed no report in {BOOT_TIMEOUT_S} s")

"""show-resources on the 4-node test host says what numastat and sysfs say.

Per node: the CPUs (sysfs cpulist), the memory (sysfs meminfo and numastat -m MemTotal, minus
the huge pages, which are not general memory), and per page size the pages and free pages
(sysfs nr_hugepages, free_hugepages; numastat -m HugePages_Total/Free for 2M, the default
size). With no VM on the host nothing is allocated.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ops import testing
from tests.host.inside.nested import NODES, action

from vmhost.topology import parse_cpu_list

LABELS = {"2M": 2048, "1G": 1048576}


def numastat_m() -> dict[str, dict[int, float]]:
    """Numastat -m: {row: {node: MB}}."""
    out = subprocess.run(
        ["/usr/bin/numastat", "-m"], check=True, capture_output=True, text=True
    ).stdout
    rows: dict[str, dict[int, float]] = {}
    header: list[int] = []
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] == ["Node"] and not header:
            header = [int(f) for f in fields[1::2] if f.isdigit()]
        elif fields and header and len(fields) == len(header) + 2:
            rows[fields[0]] = dict(zip(header, map(float, fields[1:-1]), strict=True))
    return rows


def _mb_or_pages(pages: int) -> tuple[float, float]:
    return (float(pages), float(pages * 2))


def test_show_resources_matches_numastat_and_sysfs(nested_host, evidence):
    import charm

    ctx = testing.Context(charm.VmHostCharm)
    state = testing.State(config=dict(nested_host), leader=True)
    data = json.loads(action(ctx, state, "show-resources")["json"])
    stat = numastat_m()
    sysfs = {}
    for node in data["nodes"]:
        path = NODES / f"node{node['id']}"
        meminfo = (path / "meminfo").read_text().split()
        total_kib = int(meminfo[meminfo.index("MemTotal:") + 1])
        pages = {
            label: {
                "total": int(Path(path, f"hugepages/hugepages-{kib}kB/nr_hugepages").read_text()),
                "free": int(Path(path, f"hugepages/hugepages-{kib}kB/free_hugepages").read_text()),
            }
            for label, kib in LABELS.items()
        }
        sysfs[node["id"]] = {
            "cpus": list(parse_cpu_list((path / "cpulist").read_text())),
            "memtotal-kib": total_kib,
            "hugepages": pages,
        }
    evidence("show-resources", {"show-resources": data, "numastat-m": stat, "sysfs": sysfs})
    assert [n["id"] for n in data["nodes"]] == [0, 1, 2, 3]
    for node in data["nodes"]:
        mine = sysfs[node["id"]]
        assert node["cpus"]["total"] == len(mine["cpus"]) == 1
        assert node["cpus"]["reserved"] == ([0] if node["id"] == 0 else [])
        assert abs(stat["MemTotal"][node["id"]] - mine["memtotal-kib"] / 1024) < 1
        huge_mib = sum(p["total"] * LABELS[s] // 1024 for s, p in mine["hugepages"].items())
        general = mine["memtotal-kib"] // 1024 - huge_mib
        assert abs(node["memory-mib"]["general"] - general) <= 1, (node, mine)
        shown = {h["size"]: h for h in node["hugepages"]}
        for label, pages in mine["hugepages"].items():
            assert shown[label]["total"] == pages["total"], (label, node, mine)
            assert shown[label]["free"] == pages["free"], (label, node, mine)
            assert shown[label]["allocated"] == 0
        # numastat -m gives pages of the default size as MB (2 per 2M page)
        assert stat["HugePages_Total"][node["id"]] in _mb_or_pages(
            mine["hugepages"]["2M"]["total"]
        )
        assert stat["HugePages_Free"][node["id"]] in _mb_or_pages(mine["hugepages"]["2M"]["free"])
        assert node["vms"] == []

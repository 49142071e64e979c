"""Parse the report the tiny test guest (tests/guest/build-tiny-image) prints on its console.

    python3 tests/guest/report.py CONSOLE_LOG     # prints the report as JSON

parse() returns {"cpus": int, "nodes": [{"id", "cpus", "memory_kib"}], "hugepages":
[{"node", "size", "count"}], "nics": {name: mac}, "addrs": {name: [CIDR]} (DHCP leases the
guest got), "seed": {file name: text}}, from the last
complete report in the text (a VM that rebooted prints one per boot).
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

BEGIN = "vmhost-report begin"
END = "vmhost-report end"


class NoReportError(ValueError):
    """The text holds no complete report (the guest has not finished, or never booted)."""


def parse(text: str) -> dict[str, Any]:
    """Return the last complete report in a console log."""
    lines = [line.strip() for line in text.replace("\r", "").splitlines()]
    if END not in lines:
        raise NoReportError("no complete vmhost report in the console log")
    end = len(lines) - 1 - lines[::-1].index(END)
    begin = end - 1
    while begin >= 0 and lines[begin] != BEGIN:
        begin -= 1
    if begin < 0:
        raise NoReportError("the report has an end but no beginning")
    report: dict[str, Any] = {
        "cpus": 0,
        "nodes": [],
        "hugepages": [],
        "nics": {},
        "addrs": {},
        "seed": {},
    }
    for line in lines[begin + 1 : end]:
        kind, _, rest = line.partition(" ")
        _add(report, kind, rest.split())
    return report


def _add(report: dict[str, Any], kind: str, fields: list[str]) -> None:
    """Add one report line to the report."""
    if kind == "cpus":
        report["cpus"] = int(fields[0])
    elif kind == "node":
        values = dict(f.split("=", 1) for f in fields[1:])
        report["nodes"].append(
            {
                "id": int(fields[0]),
                "cpus": values["cpus"],
                "memory_kib": int(values["memory-kib"]),
            }
        )
    elif kind == "hugepages":
        report["hugepages"].append(
            {"node": int(fields[0]), "size": fields[1], "count": int(fields[2])}
        )
    elif kind == "nic":
        report["nics"][fields[0]] = fields[1]
    elif kind == "addr":
        report["addrs"].setdefault(fields[0], []).append(fields[1])
    elif kind == "seed":
        data = fields[1] if len(fields) > 1 else ""
        report["seed"][fields[0]] = base64.b64decode(data).decode()


if __name__ == "__main__":
    print(json.dumps(parse(Path(sys.argv[1]).read_text(errors="replace")), indent=2))

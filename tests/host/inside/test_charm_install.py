"""The packed charm (tests/bin/pack-charm's artifact) runs its hooks on the systemd test host.

The .charm is unpacked where a Juju machine agent keeps it
(/var/lib/juju/agents/unit-vm-host-0/charm) and its own `dispatch` runs, as Juju runs it:
JUJU_* variables, JUJU_DISPATCH_PATH=hooks/<event>, and on PATH the hook tools, here stubs
that answer from a small model (config.yaml's defaults plus the test's options, leader, no
relations, an `access` binding on the host's address) and record every call (argv, stdin) in a
JSON-lines log. The charm's venv was built for Python 3.12 (Ubuntu 24.04's); the test host's
python3 is Debian's 3.11, so python3 on the hooks' PATH is the interpreter it was built with,
shared read-only from the machine that packed it (tests/host/run_host.py --python).

This file runs first (test_c... sorts before the others): the hooks meet a host nothing has
configured yet. In order:
- install: packages (apt), libvirtd.conf, the 1G hugetlbfs mount unit, libvirtd enabled and
  restarted under systemd, the default pool; status-set active;
- config-changed with nothing changed: libvirtd keeps its PID and start time (no restart);
- hugepages=2M:1400@1, more than node 1 can give: node 1 gets what the kernel grants, the other
  nodes keep theirs, and the unit is Blocked saying so with the numbers and the fix (node 1 is
  given back its 128 pages afterwards).
Evidence: results/charm-install.json (every hook's exit, output tail, statuses, tool calls).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.host.inside.nested import RUN

CHARM = RUN / "vm-host.charm"
PREFIX_FILE = RUN / "python312.prefix"
AGENT = Path("/var/lib/juju/agents/unit-vm-host-0")
CHARM_DIR = AGENT / "charm"
TOOLS = Path("/var/lib/juju/tools/unit-vm-host-0")
MODEL_UUID = str(uuid.UUID(int=0x12))
HOOK_TIMEOUT_S = 900
NODES = Path("/sys/devices/system/node")
TOOL_NAMES = [
    "action-fail",
    "action-get",
    "action-log",
    "action-set",
    "application-version-set",
    "close-port",
    "config-get",
    "credential-get",
    "goal-state",
    "is-leader",
    "juju-log",
    "juju-reboot",
    "leader-get",
    "leader-set",
    "network-get",
    "open-port",
    "opened-ports",
    "relation-get",
    "relation-ids",
    "relation-list",
    "relation-set",
    "resource-get",
    "secret-add",
    "secret-get",
    "secret-grant",
    "secret-ids",
    "secret-info-get",
    "secret-remove",
    "secret-revoke",
    "secret-set",
    "state-delete",
    "state-get",
    "state-set",
    "status-get",
    "status-set",
    "storage-add",
    "storage-get",
    "storage-list",
    "unit-get",
]

STUB = r'''#!/usr/bin/python3
"""A Juju hook tool stub: record the call, answer from model.json beside the log."""
import json, os, sys, time
from pathlib import Path

here = Path(os.environ["VMHOST_HOOK_STATE"])
tool = Path(sys.argv[0]).name
args = sys.argv[1:]
stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
with open(here / "calls.jsonl", "a") as log:
    log.write(json.dumps({"tool": tool, "args": args, "stdin": stdin, "t": time.time(),
                          "hook": os.environ.get("JUJU_DISPATCH_PATH")}) + "\n")
model = json.loads((here / "model.json").read_text())
as_json = "--format=json" in args
plain = [a for a in args if not a.startswith("-")]

def out(value):
    print(json.dumps(value) if as_json else ("" if value is None else value))

if tool == "config-get":
    config = model["config"]
    out(config if not plain else config.get(plain[0]))
elif tool == "is-leader":
    out(True)
elif tool in ("relation-ids", "relation-list", "opened-ports", "secret-ids", "storage-list"):
    out([])
elif tool == "network-get":
    address = model["address"]
    cidr = model["cidr"]
    out({"bind-addresses": [{"mac-address": "", "interface-name": model["interface"],
                             "addresses": [{"hostname": "", "value": address,
                                            "cidr": cidr}]}],
         "egress-subnets": [address + "/32"], "ingress-addresses": [address]})
elif tool == "unit-get":
    out(model["address"])
elif tool == "goal-state":
    out({"units": {"vm-host/0": {"status": "active", "since": "2026-12-02 00:00:00Z"}},
         "relations": {}})
elif tool in ("leader-get", "state-get"):
    out({})
elif tool == "status-get":
    out({"status": "unknown", "message": "", "status-data": {}})
elif tool == "credential-get":
    sys.exit("credential-get: not a cloud with credentials")
'''


def host_address() -> dict[str, str]:
    """The host's address, its subnet and interface, as Juju's network-get gives them."""
    routes = json.loads(
        subprocess.run(
            ["/usr/sbin/ip", "-4", "-j", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    for link in routes:
        for info in link.get("addr_info", []):
            if link["ifname"].startswith("en"):
                network = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network
                return {
                    "address": info["local"],
                    "cidr": str(network),
                    "interface": link["ifname"],
                }
    return {"address": "127.0.0.1", "cidr": "127.0.0.0/8", "interface": "lo"}


def libvirtd_service() -> dict[str, str]:
    keys = ["MainPID", "ExecMainStartTimestampMonotonic", "ActiveState", "NRestarts"]
    out = subprocess.run(
        ["/usr/bin/systemctl", "show", "libvirtd", *[f"--property={k}" for k in keys]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def node_pages(size_kib: int = 2048) -> dict[int, int]:
    return {
        int(n.name[4:]): int((n / f"hugepages/hugepages-{size_kib}kB/nr_hugepages").read_text())
        for n in sorted(NODES.glob("node[0-9]*"))
    }


class Unit:
    """The unpacked charm and its hook environment."""

    def __init__(self, state: Path) -> None:
        self.state = state
        defaults = yaml.safe_load((CHARM_DIR / "config.yaml").read_text())["options"]
        self.config = {k: v["default"] for k, v in defaults.items() if "default" in v}
        self.address = host_address()
        self.python_bin = state / "python-bin"
        self.hooks: list[dict[str, Any]] = []

    def set_config(self, **options: Any) -> None:
        self.config.update(options)
        model = {"config": self.config, **self.address}
        (self.state / "model.json").write_text(json.dumps(model))

    def calls(self, hook: str) -> list[dict[str, Any]]:
        lines = (self.state / "calls.jsonl").read_text().splitlines()
        return [c for c in map(json.loads, lines) if c["hook"] == f"hooks/{hook}"]

    def run(self, hook: str) -> dict[str, Any]:
        self.set_config()
        env = {
            "PATH": f"{TOOLS}:{self.python_bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "JUJU_CHARM_DIR": str(CHARM_DIR),
            "CHARM_DIR": str(CHARM_DIR),
            "JUJU_UNIT_NAME": "vm-host/0",
            "JUJU_MODEL_NAME": "vmhost-test",
            "JUJU_MODEL_UUID": MODEL_UUID,
            "JUJU_VERSION": "3.6.4",
            "JUJU_MACHINE_ID": "0",
            "JUJU_AVAILABILITY_ZONE": "",
            "JUJU_PRINCIPAL_UNIT": "",
            "JUJU_CONTEXT_ID": f"vm-host/0-{hook}-{len(self.hooks)}",
            "JUJU_DISPATCH_PATH": f"hooks/{hook}",
            "JUJU_HOOK_NAME": hook,
            "VMHOST_HOOK_STATE": str(self.state),
        }
        began = time.monotonic()
        started = time.time()
        try:
            done = subprocess.run(
                [str(CHARM_DIR / "dispatch")],
                cwd=CHARM_DIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=HOOK_TIMEOUT_S,
                check=False,
            )
            rc, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            rc, output = -1, f"hook {hook} timed out after {HOOK_TIMEOUT_S} s: {e.output!r}"
        calls = self.calls(hook)
        record = {
            "hook": hook,
            "exit": rc,
            "seconds": round(time.monotonic() - began, 1),
            "output-tail": output[-4000:],
            "statuses": [c["args"] for c in calls if c["tool"] == "status-set"],
            "tools": sorted({c["tool"] for c in calls}),
            "log": [c["args"][-1] for c in calls if c["tool"] == "juju-log"],
            "calls": [
                {"after-s": round(c["t"] - started, 1), "tool": c["tool"], "args": c["args"]}
                for c in calls
            ],
            "libvirtd": libvirtd_service(),
        }
        self.hooks.append(record)
        return record


def last_status(record: dict[str, Any]) -> tuple[str, str]:
    """The last unit status the hook set (status-set [--application=False] STATUS [MESSAGE])."""
    unit = [a for a in record["statuses"] if "--application=True" not in a]
    assert unit, f"hook {record['hook']} set no unit status: {record}"
    plain = [a for a in unit[-1] if not a.startswith("--")]
    return plain[0], plain[1] if len(plain) > 1 else ""


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not CHARM.exists() or not PREFIX_FILE.exists():
        reason = "no packed charm was handed to the test host (test-numa-host packs one)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    prefix = Path(PREFIX_FILE.read_text().strip())
    prefix.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["/usr/bin/mountpoint", "-q", str(prefix)], check=False).returncode:
        subprocess.run(
            ["/usr/bin/mount", "-t", "9p", "-o", "trans=virtio,version=9p2000.L,ro",
             "vmhost-python", str(prefix)],
            check=True,
        )  # fmt: skip
    python = next(p for p in (prefix / "bin/python3.12", prefix / "bin/python3") if p.exists())
    shutil.rmtree(AGENT, ignore_errors=True)
    shutil.rmtree(TOOLS, ignore_errors=True)
    CHARM_DIR.mkdir(parents=True)
    with zipfile.ZipFile(CHARM) as archive:
        archive.extractall(CHARM_DIR)
    (CHARM_DIR / "dispatch").chmod(0o755)
    TOOLS.mkdir(parents=True)
    (TOOLS / "hook-tool-stub").write_text(STUB)
    (TOOLS / "hook-tool-stub").chmod(0o755)
    for name in TOOL_NAMES:
        (TOOLS / name).symlink_to("hook-tool-stub")
    state = tmp_path_factory.mktemp("hook-state")
    (state / "calls.jsonl").write_text("")
    made = Unit(state)
    made.python_bin.mkdir()
    (made.python_bin / "python3").symlink_to(python)
    made.set_config()
    yield made
    # Give node 1 back what the kernel booted with, whatever a failed test left.
    Path(NODES / "node1/hugepages/hugepages-2048kB/nr_hugepages").write_text("128\n")


@pytest.fixture(scope="module")
def libvirt_client(installed: dict[str, Any]) -> Any:
    """A client that keeps libvirtd from exiting while the hooks run.

    Debian starts libvirtd with --timeout 120: an idle daemon exits, and socket activation
    starts a new one, a new PID that is no restart by the charm.
    """
    client = subprocess.Popen(
        ["/usr/bin/virsh", "-c", "qemu:///system", "event", "--all", "--loop"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield client
    client.kill()
    client.wait(timeout=30)


def restarts(record: dict[str, Any]) -> list[str]:
    """The hook's own log lines of libvirtd (re)starts."""
    return [line for line in record["log"] if "'restart', 'libvirtd'" in line]


@pytest.fixture(scope="module")
def installed(unit: Unit, evidence) -> dict[str, Any]:
    before = libvirtd_service()
    conf_before = Path("/etc/libvirt/libvirtd.conf").read_text()
    install = unit.run("install")
    evidence("charm-install", {"libvirtd-before": before, "hooks": unit.hooks})
    return {"before": before, "install": install, "conf-before": conf_before}


def test_install_hook_of_the_packed_charm_reaches_active(installed, unit, evidence):
    install = installed["install"]
    assert install["exit"] == 0, install["output-tail"]
    status, message = last_status(install)
    assert status == "active", (status, message, install["output-tail"])
    assert message.startswith("libvirt "), message
    assert "4 NUMA nodes" in message, message
    # What install did to the host, as the host says it.
    conf = Path("/etc/libvirt/libvirtd.conf").read_text()
    assert "Managed by the vm-host charm." in conf
    assert conf != installed["conf-before"]
    mounts = Path("/proc/mounts").read_text()
    assert "pagesize=1024M" in mounts or "pagesize=1G" in mounts, mounts
    after = install["libvirtd"]
    assert after["ActiveState"] == "active"
    assert after["ExecMainStartTimestampMonotonic"] != installed["before"].get(
        "ExecMainStartTimestampMonotonic"
    ), (installed["before"], after)
    assert (
        subprocess.run(
            ["/usr/bin/systemctl", "is-enabled", "libvirtd"], capture_output=True, check=False
        ).returncode
        == 0
    )


def test_a_hook_that_changes_nothing_restarts_nothing(installed, unit, evidence, libvirt_client):
    before = libvirtd_service()
    again = unit.run("config-changed")
    evidence("charm-install", {"libvirtd-before": installed["before"], "hooks": unit.hooks})
    assert again["exit"] == 0, again["output-tail"]
    assert last_status(again)[0] == "active", again["statuses"]
    assert restarts(installed["install"]), "install never restarted libvirtd"
    assert restarts(again) == []
    assert libvirt_client.poll() is None, "the libvirt client lost its connection"
    assert before["ActiveState"] == "active"
    assert again["libvirtd"]["MainPID"] == before["MainPID"], (before, again["libvirtd"])
    assert (
        again["libvirtd"]["ExecMainStartTimestampMonotonic"]
        == before["ExecMainStartTimestampMonotonic"]
    )


def test_hugepages_per_node_applied_and_a_short_grant_reported(
    installed, unit, evidence, libvirt_client
):
    others = {n: c for n, c in node_pages().items() if n != 1}
    before = libvirtd_service()
    unit.set_config(hugepages="2M:1400@1")
    short = unit.run("config-changed")
    after = node_pages()
    evidence(
        "charm-install",
        {
            "libvirtd-before": installed["before"],
            "hooks": unit.hooks,
            "2M-pages": {"before": others | {1: 128}, "asked-node1": 1400, "after": after},
        },
    )
    assert short["exit"] == 0, short["output-tail"]
    granted = after[1]
    assert 128 < granted < 1400, granted
    assert {n: c for n, c in after.items() if n != 1} == others
    # The operator must act (lower the option): Blocked, with the numbers and the fix.
    status, message = last_status(short)
    assert status == "blocked", (status, message)
    assert f"kernel granted {granted} of 1400 huge pages of 2 MiB on node 1" in message, message
    assert "lower `hugepages`" in message, message
    # A reservation of a size libvirt already has a mount for restarts nothing.
    assert restarts(short) == []
    assert short["libvirtd"]["MainPID"] == before["MainPID"]

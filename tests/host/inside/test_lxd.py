"""LXD virtual machines on the 4-node test host, composed through the charm with backend=lxd.

The test host's LXD (Debian's 5.0, started by tests/bin/ensure-lxd.sh) runs VMs on nested KVM.
The image is the tiny guest's UEFI variant (tests/guest/build-tiny-efi-image: systemd-boot,
secure boot off as the charm's definition sets), imported into LXD's store as the operator
would (`lxc image import ... --alias vmhost-test-tiny-efi`) and named `local:vmhost-test-tiny-efi`.
Two VMs boot side by side, as in test_pinning:
- `vmhost-test-lxd-span`: the explicit CPU list 1,3 with numa-nodes=2 (limits.cpu "1,3");
- `vmhost-test-lxd-node2`: a pinned count of 1 that the host places itself: CPU 0 is reserved
  and CPUs 1 and 3 are the first VM's (read back from LXD's ledger), so only node 2 is left
  (limits.cpu "2-2").
The evidence is each guest's own report, read from its console through LXD's client (`lxc
console`; LXD 5.0 keeps no console log for VMs, so the guest repeats its report, see
vmhost.linger), and the host's view of LXD's QEMU process while it ran: vCPU thread affinity
(taskset -p), where its memory lies (numastat -p, numa_maps) and the NUMA binding LXD gave it.
The charm's own console-log action is asked too and its answer recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops import testing
from tests.host.inside.nested import (
    BOOT_TIMEOUT_S,
    REPO,
    RUN,
    action,
    report,
    run,
    threads,
)

# Booting an LXD VM (OVMF under nested KVM) crashes this machine's QEMU 7.2 running the test
# host under TCG: "tcg_handle_interrupt: assertion failed: (qemu_mutex_iothread_locked())" (the
# x86 TCG CR8 write in SVM guest mode raises the virtual interrupt without the big QEMU lock),
# twice in two runs; the libvirt guests (SeaBIOS) never did. Until the outer QEMU is one that
# takes the lock there, these tests run only when asked: VMHOST_TEST_HOST_LXD=1
# (tests/bin/test-numa-host passes it on, with the LXD backend's VM tests, when it is set).
pytestmark = pytest.mark.skipif(
    os.environ.get("VMHOST_TEST_HOST_LXD") != "1",
    reason="LXD VMs crash the test host's outer QEMU 7.2 TCG (BQL assertion); "
    "VMHOST_TEST_HOST_LXD=1 runs them",
)

PROJECT = "vmhost-test-lxd"
ALIAS = "vmhost-test-tiny-efi"
SPAN = "vmhost-test-lxd-span"
NODE2 = "vmhost-test-lxd-node2"
MEMORY_MIB = 256
LXC = "/usr/bin/lxc"
LXD = "/usr/bin/lxd"
LXD_UNIT = "vmhost-test-lxd"
LXD_LOG = "/var/log/vm-host-test-lxd.log"
KVM_RUN = 0xAE80
LOOPBACK = testing.Network(
    "access",
    bind_addresses=[testing.BindAddress([testing.Address("127.0.0.1")])],
    ingress_addresses=["127.0.0.1"],
)


def lxc(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LXC, *args], capture_output=True, text=True, check=check, timeout=300)


def lxd_log_tail() -> str:
    log = Path(LXD_LOG)
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no LXD log)"


def remove_leftovers() -> None:
    """Instances, the project and the image alias an earlier (interrupted) run left."""
    listed = lxc("list", "--project", PROJECT, "--format=json", check=False)
    if listed.returncode == 0:
        for instance in json.loads(listed.stdout or "[]"):
            lxc("delete", "--force", "--project", PROJECT, instance["name"], check=False)
    lxc("project", "delete", PROJECT, check=False)
    lxc("image", "delete", ALIAS, check=False)


def qemu_pid(name: str) -> int:
    """LXD's QEMU process of an instance (its command line names the instance)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv and b"qemu-system" in argv[0] and name.encode() in b" ".join(argv):
                return int(proc.name)
    raise LookupError(f"no QEMU process for {name}")


def memory_per_node(pid: int, min_mib: int = 64) -> list[dict[str, Any]]:
    """The process's mappings of min_mib or more (guest RAM): policy and MiB per node."""
    sizes = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        sizes[start] = (end - start) // (1024 * 1024)
    out = []
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        fields = line.split()
        size = sizes.get(int(fields[0], 16), 0)
        if size < min_mib:
            continue
        kib = next((int(f.split("=")[1]) for f in fields if f.startswith("kernelpagesize_kB=")), 4)
        nodes = {}
        for f in fields:
            m = re.fullmatch(r"N(\d+)=(\d+)", f)
            if m:
                nodes[int(m.group(1))] = round(int(m.group(2)) * kib / 1024, 1)
        out.append({"size-mib": size, "policy": fields[1], "mib-per-node": nodes, "line": line})
    return out


def kvm_vcpus(pid: int) -> dict[int, int]:
    """The vCPU threads (index -> thread id): those in ioctl(KVM_RUN) on a kvm-vcpu fd.

    LXD's QEMU runs without debug-threads, so its vCPU threads are not named "CPU n/KVM". A
    thread on a CPU right now shows no syscall: ten samples, 0.2 s apart, are joined.
    """
    found: dict[int, int] = {}
    for _ in range(10):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (task / "syscall").read_text().split()
                if fields[0] != "16" or int(fields[2], 16) != KVM_RUN:
                    continue
                target = os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}")
                if target.startswith("anon_inode:kvm-vcpu:"):
                    found[int(target.rsplit(":", 1)[1])] = int(task.name)
        time.sleep(0.2)
    return found


def lxd_host_view(name: str) -> dict[str, Any]:
    pid = qemu_pid(name)
    vcpus = kvm_vcpus(pid)
    affinity = {i: sorted(os.sched_getaffinity(tid)) for i, tid in vcpus.items()}
    conf = next(Path("/var/log/lxd").glob(f"*{name}/qemu.conf"), None)
    return {
        "pid": pid,
        "numastat": run("/usr/bin/numastat", "-p", str(pid)),
        "guest-ram": memory_per_node(pid),
        "threads": threads(pid),
        "vcpu-threads": {str(i): {"tid": vcpus[i], "cpus": affinity[i]} for i in vcpus},
        "qemu-conf-numa": [
            line
            for line in (conf.read_text().splitlines() if conf else [])
            if re.search(r"host-nodes|policy|\[object|\[numa|cpus|node|qom-type|size", line)
        ],
        "time": time.time(),
    }


class Console:
    """`lxc console` attached to a VM on a pseudo-terminal (it needs one), output kept."""

    def __init__(self, name: str, path: Path) -> None:
        self.path = path
        self._chunks: list[bytes] = []
        master, slave = pty.openpty()
        self._master = master
        self.proc = subprocess.Popen(
            [LXC, "console", "--project", PROJECT, name],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self._chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self._master)
        self._reader.join(timeout=10)
        self.path.write_text(self.text())


@pytest.fixture(scope="module")
def lxd_ready(nested_host: dict[str, str]) -> Iterator[dict[str, Any]]:
    """LXD running with VM support, the UEFI tiny image imported; the backend marker lent."""
    from vmhost import host
    from vmhost.backends.lxd import vm_support_problem
    from vmhost.lxd_trust import LxdTrust

    started = time.monotonic()
    # LXD as a systemd service with its cgroup delegated (CPU, cpuset and hugetlb controllers),
    # as a systemd host runs it; Debian's lxd.service is masked in the test host (boot time).
    if subprocess.run([LXD, "waitready", "--timeout=1"], check=False).returncode != 0:
        subprocess.run(["/usr/bin/systemctl", "reset-failed", LXD_UNIT], check=False)
        subprocess.run(
            ["/usr/bin/systemd-run", f"--unit={LXD_UNIT}", "--property=Delegate=yes",
             "--property=KillMode=process", LXD, "--group", "root",
             f"--logfile={LXD_LOG}"],
            check=True,
        )  # fmt: skip
    # Ready before ensure-lxd.sh looks: a second daemon on the same database fails both.
    ready = subprocess.run(
        [LXD, "waitready", "--timeout=180"], capture_output=True, text=True, check=False
    )
    assert ready.returncode == 0, f"LXD did not start: {ready.stderr}\n{lxd_log_tail()}"
    done = subprocess.run(
        ["/bin/bash", str(REPO / "tests/bin/ensure-lxd.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, f"ensure-lxd.sh failed:\n{done.stdout}{done.stderr}"
    info = LxdTrust().server_info()
    problem = vm_support_problem(info)
    assert problem is None, f"LXD here cannot run VMs: {problem}\n{lxd_log_tail()}"
    remove_leftovers()
    lxc("image", "import", str(RUN / "lxd-metadata.tar.xz"), str(RUN / "tiny-efi.qcow2"),
        "--alias", ALIAS)  # fmt: skip
    saved = Path("/run/vmhost-test-backend-marker")
    had_marker = host.BACKEND_MARKER.exists()
    if had_marker:  # the libvirt tests' charm recorded libvirt: lend the host to LXD
        shutil.copy2(host.BACKEND_MARKER, saved)
        host.BACKEND_MARKER.unlink()
    try:
        yield {
            "server": info["environment"],
            "ready-after-s": round(time.monotonic() - started, 1),
        }
    finally:
        remove_leftovers()
        host.BACKEND_MARKER.unlink(missing_ok=True)
        if had_marker:
            shutil.copy2(saved, host.BACKEND_MARKER)


def lxd_state(nested_host: dict[str, str]) -> testing.State:
    config = {
        "backend": "lxd",
        "lxd-project": PROJECT,
        "default-storage-pool": "default",
        "default-network": nested_host["default-network"],
        "default-image": "",
        "reserved-cpus": "0",
        "https-port": 8443,
    }
    return testing.State(config=config, leader=True, networks={LOOPBACK})


def wait_console_reports(
    consoles: dict[str, Console], names: list[str]
) -> dict[str, dict[str, Any]]:
    """Each VM's report from its console, with the host view sampled while it ran."""
    start = time.monotonic()
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    while time.monotonic() - start < BOOT_TIMEOUT_S:
        for name in names:
            if "report" in out[name]:
                continue
            with contextlib.suppress(OSError, LookupError, ValueError):
                out[name]["host"] = lxd_host_view(name)
            with contextlib.suppress(report.NoReportError):
                out[name]["report"] = report.parse(consoles[name].text())
                out[name]["report-after-s"] = round(time.monotonic() - start, 1)
                with contextlib.suppress(OSError, LookupError, ValueError):
                    out[name]["host"] = lxd_host_view(name)
        if all("report" in v for v in out.values()):
            return out
        time.sleep(3)
    missing = [n for n in names if "report" not in out[n]]
    tails = {n: consoles[n].text()[-1500:] for n in missing}
    pytest.fail(f"{missing} printed no report on the console in {BOOT_TIMEOUT_S} s: {tails}")


@pytest.fixture(scope="module")
def booted(nested_host, lxd_ready, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Compose both LXD VMs through the charm, read their reports; delete them afterwards."""
    import charm

    ctx = testing.Context(charm.VmHostCharm)
    state = lxd_state(nested_host)
    out = ctx.run(ctx.on.config_changed(), state)
    status = out.unit_status
    assert isinstance(status, testing.ActiveStatus), status
    logs = tmp_path_factory.mktemp("consoles")
    consoles: dict[str, Console] = {}
    composed: dict[str, dict[str, Any]] = {}
    try:
        requests = {
            SPAN: {"pinned-cores": "1,3", "numa-nodes": 2},
            NODE2: {"pinned-cores": "1"},
        }
        for name, extra in requests.items():
            began = time.monotonic()
            result = action(
                ctx, state, "compose-vm", name=name, memory=MEMORY_MIB, storage="root:1",
                image=f"local:{ALIAS}", **extra,
            )  # fmt: skip
            result["placement"] = json.loads(result["placement"])
            result["compose-s"] = round(time.monotonic() - began, 1)
            consoles[name] = Console(name, logs / f"{name}.log")
            composed[name] = result
        seen = wait_console_reports(consoles, list(requests))
        charm_console = {}
        for name in requests:
            try:
                charm_console[name] = action(ctx, state, "console-log", name=name, lines=50)
            except testing.ActionFailed as failed:
                charm_console[name] = {"failed": failed.message}
        instances = {
            name: json.loads(lxc("query", f"/1.0/instances/{name}?project={PROJECT}").stdout)
            for name in requests
        }
        yield {
            name: composed[name]
            | seen[name]
            | {
                "status": status.message,
                "lxd": lxd_ready,
                "limits": {
                    k: v
                    for k, v in instances[name]["config"].items()
                    if k.startswith(("limits.", "security."))
                },
                "charm-console-log": charm_console[name],
                "console-tail": consoles[name].text()[-2000:],
            }
            for name in requests
        }
    finally:
        for console in consoles.values():
            console.close()
        for name in (SPAN, NODE2):
            with contextlib.suppress(testing.ActionFailed):
                action(ctx, state, "delete-vm", name=name)


def _share_on(vm: dict[str, Any], nodes: set[int]) -> float:
    per_node: dict[int, float] = {}
    for mapping in vm["host"]["guest-ram"]:
        for node, mib in mapping["mib-per-node"].items():
            per_node[node] = per_node.get(node, 0.0) + mib
    total = sum(per_node.values())
    return sum(v for n, v in per_node.items() if n in nodes) / total if total else 0.0


def test_lxd_vm_placed_on_node_2_is_pinned_there_and_reports_it(booted, evidence):
    vm = booted[NODE2]
    evidence("lxd-pinned-node2", vm)
    (cell,) = vm["placement"]["cells"]
    assert cell["host-node"] == 2
    assert cell["cpus"] == [2]
    assert vm["limits"]["limits.cpu"] == "2-2"
    assert vm["limits"]["security.secureboot"] == "false"
    # The host: LXD's QEMU runs the vCPU only on CPU 2; guest memory lies on node 2.
    assert {i: v["cpus"] for i, v in vm["host"]["vcpu-threads"].items()} == {"0": [2]}
    assert _share_on(vm, {2}) >= 0.95, vm["host"]["numastat"]
    # The guest, from its own console: one CPU, one NUMA node, at most the memory asked for.
    guest = vm["report"]
    assert guest["cpus"] == 1
    assert len(guest["nodes"]) == 1
    assert guest["nodes"][0]["memory_kib"] <= MEMORY_MIB * 1024


def test_lxd_vm_on_cpus_1_and_3_spans_nodes_1_and_3(booted, evidence):
    vm = booted[SPAN]
    evidence("lxd-pinned-span-1-3", vm)
    cells = {c["host-node"]: c for c in vm["placement"]["cells"]}
    assert set(cells) == {1, 3}
    assert vm["limits"]["limits.cpu"] == "1,3"
    by_vcpu = {i: v["cpus"] for i, v in vm["host"]["vcpu-threads"].items()}
    assert sorted(map(tuple, by_vcpu.values())) == [(1,), (3,)], by_vcpu
    assert _share_on(vm, {1, 3}) >= 0.95, vm["host"]["numastat"]
    guest = vm["report"]
    assert guest["cpus"] == 2
    assert len(guest["nodes"]) == 2, guest["nodes"]

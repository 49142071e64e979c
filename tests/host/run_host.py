"""Boot the multi-NUMA test host once and run steps inside it.

    python3 tests/host/run_host.py [--step NAME=COMMAND]... [-- COMMAND]

The host is a TCG guest (`<domain type='qemu'>`, `<cpu mode='maximum'>`) of the Debian 12 image
tests/host/build-host-image caches, booted from a qcow2 overlay that is removed afterwards, with
4 guest NUMA cells (1 vCPU and 3 GiB each, distances 10 local / 20 remote), a second NIC on a
PCIe expander bus of node 3 (a hub netdev: no traffic leaves it) and, from its kernel
command line, 128 2M pages and one 1G page on each node. It runs under its OWN libvirtd: the
session daemon of the system user vmhost-numa (qemu:///session, its runtime directory
/run/vmhost-numa), never the qemu:///system the integration tests share, and every run holds
/tmp/vmhost-numa.lock, so two runs never meet.

Inside, the checkout is the read-only 9p share /checkout (the project's .venv included, whose
site-packages the steps use with the host's python3) and /run/vmhost is this run's 9p share:
root's SSH key (made per run), the tiny test guest (tiny.qcow2), its UEFI variant as an LXD
image (tiny-efi.qcow2, lxd-metadata.tar.xz), with --charm the packed charm (vm-host.charm) and
python312.prefix, the original prefix of the Python 3.12 it was built with, which is shared
read-only as the 9p tag `vmhost-python` (a copy cached under the vmhost-numa user's home, since
QEMU runs as that user), and results/. Each step is a
shell command run over ssh as root in /checkout with VMHOST_RESULTS=/run/vmhost/results; its
output is streamed, its exit code kept, and results/ is copied to tests/host/results/ of the
checkout at the end. Several steps share one boot. Leftovers of an interrupted run (its domain,
overlay and run directory) are removed first. Prints one summary line per step and exits
non-zero when the boot or any step failed. Must run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LOCK = "/tmp/vmhost-numa.lock"
USER = "vmhost-numa"
USER_HOME = Path("/var/lib/vmhost-numa")
RUNTIME = Path("/run/vmhost-numa")
RUNS = USER_HOME / "runs"
DOMAIN = "vmhost-numa-host"
URI = "qemu:///session"
NODES = 4
CELL_MIB = 3072
CELL0_MIB = 4096  # node 0 also holds the kernel's early allocations: 3 GiB left no 1G page
# The NIC on a PCIe expander bus of node 3 (tests/host/inside/test_pinning.py checks it).
OFF_NODE_NIC_NODE = 3
OFF_NODE_NIC_MAC = "52:54:00:6e:0d:03"
BOOT_TIMEOUT_S = 300
SSH_OPTS = [
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
    "-o", "ServerAliveInterval=30",
]  # fmt: skip


def say(message: str) -> None:
    print(f"run-host: {message}", flush=True)


def as_user(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command as vmhost-numa with its own session environment."""
    env = [f"HOME={USER_HOME}", f"XDG_RUNTIME_DIR={RUNTIME}", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
    return subprocess.run(
        ["/usr/sbin/runuser", "-u", USER, "--", "/usr/bin/env", "-i", *env, *argv],
        check=check,
        capture_output=True,
        text=True,
    )


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return as_user("/usr/bin/virsh", "-q", "-c", URI, *args, check=check)


def ensure_user() -> None:
    """The dedicated user whose session libvirtd runs the test host."""
    if subprocess.run(["/usr/bin/id", USER], capture_output=True, check=False).returncode != 0:
        subprocess.run(
            ["/usr/sbin/useradd", "--system", "--home-dir", str(USER_HOME), "--create-home",
             "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )  # fmt: skip
    for directory in (USER_HOME, RUNTIME, RUNS):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, USER, USER)
        directory.chmod(0o700 if directory == RUNTIME else 0o755)


def remove_leftovers() -> None:
    """Remove the domain and run directories an earlier (maybe interrupted) run left."""
    if virsh("dominfo", DOMAIN, check=False).returncode == 0:
        say(f"removing the leftover domain {DOMAIN}")
        virsh("destroy", DOMAIN, check=False)
        virsh("undefine", DOMAIN, check=False)
    for old in RUNS.iterdir():
        shutil.rmtree(old, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(script: str) -> Path:
    """Run a build script of the tests and return the image path it prints."""
    out = subprocess.run(["/bin/bash", script], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def python_share(python: Path) -> tuple[Path, Path]:
    """A copy of a Python installation that vmhost-numa's QEMU can read: (prefix, copy).

    The copy is kept under the user's home, keyed by the prefix and its interpreter's mtime, and
    refreshed when either changes; older copies are removed.
    """
    real = python.resolve()
    prefix = real.parent.parent
    key = f"{prefix}:{real.stat().st_mtime_ns}"
    name = "py-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    base = USER_HOME / "python"
    copy = base / name
    base.mkdir(exist_ok=True)
    if not (copy / ".complete").exists():
        say(f"copying {prefix} for the test host (once per interpreter)")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(prefix, copy, symlinks=True)
        (copy / ".complete").write_text(key + "\n")
        subprocess.run(["/bin/chown", "-R", f"{USER}:{USER}", str(base)], check=True)
    for old in base.iterdir():
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return prefix, copy


def domain_xml(
    overlay: Path, run_dir: Path, console: Path, port: int, python: Path | None = None
) -> str:
    """The test host's domain: 4 cells of 1 vCPU and 3 GiB, 9p shares, user networking."""
    cells = []
    for node in range(NODES):
        distances = "".join(
            f"<sibling id='{other}' value='{10 if other == node else 20}'/>"
            for other in range(NODES)
        )
        cells.append(
            f"<cell id='{node}' cpus='{node}' memory='{CELL0_MIB if node == 0 else CELL_MIB}' "
            "unit='MiB'>"
            f"<distances>{distances}</distances></cell>"
        )
    netdev = f"user,id=vmhostnet0,hostfwd=tcp:127.0.0.1:{port}-:22"
    # A second NIC on a PCIe expander bus of node OFF_NODE_NIC_NODE, so the host has a NIC with
    # a NUMA node (the first has none): the NUMA view's NIC locality is checked with it. Its
    # netdev is a hub with no other port: no traffic leaves, no DHCP answers it.
    pxb = f"pxb-pcie,id=vmhostpxb,bus_nr=64,numa_node={OFF_NODE_NIC_NODE},bus=pcie.0,addr=0x1d"
    root_port = "pcie-root-port,id=vmhostrp,bus=vmhostpxb,chassis=64,addr=0x0"
    nic = f"virtio-net-pci,netdev=vmhostnet1,bus=vmhostrp,mac={OFF_NODE_NIC_MAC}"
    python_fs = ""
    if python is not None:
        python_fs = f"""
    <filesystem type='mount' accessmode='passthrough'>
      <source dir={quoteattr(str(python))}/>
      <target dir='vmhost-python'/>
      <readonly/>
    </filesystem>"""
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>{CELL0_MIB + (NODES - 1) * CELL_MIB}</memory>
  <vcpu placement='static'>{NODES}</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='maximum'>
    <topology sockets='{NODES}' dies='1' cores='1' threads='1'/>
    <numa>{"".join(cells)}</numa>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file={quoteattr(str(overlay))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <filesystem type='mount' accessmode='mapped'>
      <source dir={quoteattr(str(run_dir))}/>
      <target dir='vmhost-run'/>
    </filesystem>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir={quoteattr(str(REPO))}/>
      <target dir='vmhost-checkout'/>
      <readonly/>
    </filesystem>{python_fs}
    <serial type='file'><source path={quoteattr(str(console))}/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/><qemu:arg value={quoteattr(netdev)}/>
    <qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=vmhostnet0,addr=0x1e'/>
    <qemu:arg value='-device'/><qemu:arg value={quoteattr(pxb)}/>
    <qemu:arg value='-device'/><qemu:arg value={quoteattr(root_port)}/>
    <qemu:arg value='-netdev'/><qemu:arg value='hubport,id=vmhostnet1,hubid=7'/>
    <qemu:arg value='-device'/><qemu:arg value={quoteattr(nic)}/>
  </qemu:commandline>
</domain>
"""


class Host:
    """One boot of the test host: ssh into it, run steps, copy results out."""

    def __init__(self, key: Path, port: int, run_dir: Path, console: Path) -> None:
        self.key = key
        self.port = port
        self.run_dir = run_dir
        self.console = console

    def ssh(
        self, command: str, *, timeout: float | None = None, stream: bool = False
    ) -> tuple[int, str]:
        argv = ["/usr/bin/ssh", *SSH_OPTS, "-i", str(self.key), "-p", str(self.port),
                "root@127.0.0.1", command]  # fmt: skip
        if not stream:
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired:
                return 255, "timed out"
            return done.returncode, done.stdout + done.stderr
        lines = []
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout
            for line in proc.stdout:
                sys.stdout.write("    " + line)
                sys.stdout.flush()
                lines.append(line)
        return proc.returncode, "".join(lines)

    def wait_ready(self) -> float:
        """Wait for sshd and for systemd to have finished booting; return the boot seconds."""
        start = time.monotonic()
        refused = 0
        ready = "systemctl is-system-running --wait; mountpoint -q /checkout || mount /checkout"
        while time.monotonic() - start < BOOT_TIMEOUT_S:
            rc, out = self.ssh(ready, timeout=60)
            if rc != 255:
                if out.strip() not in ("running", "degraded"):
                    say(f"systemd says {out.strip()!r}")
                return time.monotonic() - start
            refused += "Permission denied" in out
            if refused >= 6:  # sshd answers but root's key never arrived
                break
            if virsh("domstate", DOMAIN, check=False).stdout.strip() != "running":
                break
            time.sleep(5)
        tail = self.console.read_text(errors="replace")[-4000:] if self.console.exists() else ""
        raise RuntimeError(f"the test host did not answer ssh in time; console:\n{tail}")


@contextlib.contextmanager
def booted(
    image: Path, tiny: Path, efi: Path, charm: Path | None = None, python: Path | None = None
) -> Iterator[Host]:
    """Boot an overlay of the image; always remove the domain and the run directory."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=RUNS))
    secret = Path(tempfile.mkdtemp(prefix="vmhost-numa-key-"))
    try:
        shutil.chown(run_dir, USER, USER)
        run_dir.chmod(0o755)
        key = secret / "id_ed25519"
        subprocess.run(
            ["/usr/bin/ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vmhost-numa-run",
             "-f", str(key)],
            check=True,
        )  # fmt: skip
        shutil.copyfile(key.with_suffix(".pub"), run_dir / "authorized_keys")
        shutil.copyfile(tiny, run_dir / "tiny.qcow2")
        for name in ("tiny-efi.qcow2", "lxd-metadata.tar.xz"):
            shutil.copyfile(efi / name, run_dir / name)
        shared_python = None
        if charm is not None:
            shutil.copyfile(charm, run_dir / "vm-host.charm")
        if python is not None:
            prefix, shared_python = python_share(python)
            (run_dir / "python312.prefix").write_text(f"{prefix}\n")
        (run_dir / "results").mkdir()
        shutil.chown(run_dir / "results", USER, USER)
        overlay = run_dir / "overlay.qcow2"
        as_user("/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                "-b", str(image), str(overlay))  # fmt: skip
        console = run_dir / "console.log"
        port = free_port()
        xml = run_dir / "domain.xml"
        xml.write_text(domain_xml(overlay, run_dir, console, port, shared_python))
        virsh("define", str(xml))
        virsh("start", DOMAIN)
        yield Host(key, port, run_dir, console)
    finally:
        virsh("destroy", DOMAIN, check=False)
        virsh("undefine", DOMAIN, check=False)
        shutil.rmtree(secret, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)


def collect(run_dir: Path, out: Path) -> list[str]:
    """Copy the run's results/ into the checkout's tests/host/results/ (fresh each run)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    names = []
    for path in sorted((run_dir / "results").iterdir()):
        if path.is_file():
            shutil.copyfile(path, out / path.name)
            names.append(path.name)
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Boot the multi-NUMA test host, run steps.")
    parser.add_argument("--step", action="append", default=[], metavar="NAME=COMMAND")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--charm", help="a packed .charm to hand to the test host")
    parser.add_argument("--python", help="the Python 3.12 the charm was built with")
    parser.add_argument("command", nargs="*", help="one more step, named 'command'")
    args = parser.parse_args(argv)
    steps = [tuple(s.split("=", 1)) for s in args.step]
    if args.command:
        steps.append(("command", shlex.join(args.command)))
    if not steps or any(len(s) != 2 for s in steps):
        parser.error("give at least one step as --step NAME=COMMAND or -- COMMAND")
    args.steps = steps
    return args


def main(argv: list[str]) -> int:
    # A TERM (a CI timeout, a killed job) unwinds like an error: the domain and run directory
    # are removed on the way out, not left for the next run's leftover cleanup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("must run as root")
        return 2
    timings: dict[str, float] = {}
    outcomes: list[tuple[str, int, float]] = []
    with open(LOCK, "w") as lock:
        waited = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        timings["lock wait"] = time.monotonic() - waited
        start = time.monotonic()
        image = build(str(HERE / "build-host-image"))
        tiny = build(str(REPO / "tests" / "guest" / "build-tiny-image"))
        efi = build(str(REPO / "tests" / "guest" / "build-tiny-efi-image"))
        timings["images"] = time.monotonic() - start
        ensure_user()
        remove_leftovers()
        start = time.monotonic()
        charm = Path(args.charm) if args.charm else None
        python = Path(args.python) if args.python else None
        with booted(image, tiny, efi, charm, python) as host:
            try:
                host.wait_ready()
                timings["boot"] = time.monotonic() - start
                say(f"test host up in {timings['boot']:.0f} s (ssh port {host.port})")
            except RuntimeError as error:
                say(str(error))
                outcomes.append(("boot", 1, time.monotonic() - start))
            steps = args.steps if not outcomes else []
            env = "PYTHONDONTWRITEBYTECODE=1 VMHOST_RESULTS=/run/vmhost/results VMHOST_TEST_HOST=1"
            if os.environ.get("CI"):
                env += " CI=1"
            for name, command in steps:
                say(f"step {name}: {command}")
                began = time.monotonic()
                rc, _ = host.ssh(f"cd /checkout && env {env} {command}", stream=True)
                outcomes.append((name, rc, time.monotonic() - began))
            collected = collect(host.run_dir, Path(args.results))
    say(f"results: {', '.join(collected) or 'none'} in {args.results}")
    for what, seconds in timings.items():
        say(f"time {what}: {seconds:.0f} s")
    for name, rc, seconds in outcomes:
        say(f"step {name}: {'passed' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s")
    rows = [{"name": n, "exit": rc, "seconds": round(s, 1)} for n, rc, s in outcomes]
    summary = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "steps": rows}
    (Path(args.results) / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(rc == 0 for _, rc, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What one hook costs: update-status of the charm against this machine's libvirtd, vs imports.

Run as root on a host with libvirtd (tests/bin/ensure-libvirt.sh starts it), under the daemon
lock when others share the machine:

    flock /tmp/vmhost-daemons.lock env PYTHONPATH=src:lib \
        .venv/bin/python -m bench.hooks [--runs N] [--out FILE]

In one run it measures, each in a fresh Python process, as Juju would start it:

- the import floor: `python -c "import ops, libvirt, pylxd, jinja2, pydantic"`;
- the update-status hook: `src/charm.py` dispatched like Juju does (JUJU_DISPATCH_PATH,
  JUJU_UNIT_NAME, ...), with the hook tools (config-get, status-set, juju-log, ...) as tiny
  shell scripts that answer like a leader unit with no relations, against the real libvirtd
  with 0 VMs and with 100 defined (not started) domains that carry vm-host's metadata as
  compose-vm writes it (rendered by the charm's own domain template);

and reports for each the best and the median wall time and process CPU time, and the
ratios hook / floor (the best runs' ratio is the headline: other work only adds time). The domains
(`vmhost-bench-NNN`), their pool (`vmhost-bench-pool`, in a temporary directory) and the
charm's state file are removed afterwards, also after an interrupted run (they are removed
first too). The hook runs as it does on a deployed unit: it keeps the access user and sshd
drop-in the charm manages (update-status creates them when missing, as on any unit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt

from vmhost import constraints, host
from vmhost.backends.libvirt import (
    TEMPLATES_DIR,
    Volume,
    domain_context,
    render_template,
)
from vmhost.model import CellPlacement, Placement

REPO = Path(__file__).resolve().parent.parent
PREFIX = "vmhost-bench-"
POOL = "vmhost-bench-pool"
IMPORT_FLOOR = "import ops, libvirt, pylxd, jinja2, pydantic"

HOOK_TOOL = """#!/bin/sh
tool=${0##*/}
case "$tool" in
config-get) cat "$VMHOST_BENCH_DIR/config.json" ;;
is-leader) echo true ;;
relation-ids|relation-list|opened-ports) echo '[]' ;;
network-get) echo '{"bind-addresses":[{"interface-name":"lo","addresses":[{"hostname":"",\
"value":"127.0.0.1","cidr":"127.0.0.0/8"}]}],"egress-subnets":["127.0.0.1/32"],\
"ingress-addresses":["127.0.0.1"]}' ;;
status-set) echo "$*" > "$VMHOST_BENCH_DIR/status" ;;
juju-log) echo "$*" >> "$VMHOST_BENCH_DIR/log" ;;
esac
"""
TOOLS = (
    "config-get",
    "is-leader",
    "relation-ids",
    "relation-list",
    "relation-get",
    "relation-set",
    "opened-ports",
    "open-port",
    "close-port",
    "network-get",
    "status-set",
    "status-get",
    "juju-log",
    "application-version-set",
)


def _quiet(_ctx: object, _err: object) -> None:
    """Keep libvirt from printing expected lookup failures."""


def remove_bench_objects(conn: libvirt.virConnect) -> None:
    """Undefine every vmhost-bench-* domain and remove the bench pool with its directory."""
    for dom in conn.listAllDomains(0):
        if dom.name().startswith(PREFIX):
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
    with contextlib.suppress(libvirt.libvirtError):
        pool = conn.storagePoolLookupByName(POOL)
        if pool.isActive():
            pool.destroy()
        pool.delete(0)
        pool.undefine()


def domain_xml(index: int) -> str:
    """A domain as compose-vm defines it: the charm's template and metadata, 1 vCPU, 128 MiB."""
    name = f"{PREFIX}{index:03d}"
    spec = constraints.build_spec(
        name=name, memory_mib=128, cores=1, storage=[{"label": "root", "size-gb": 1}]
    )
    placement = Placement(
        vcpus=1,
        memory_mib=128,
        cells=(CellPlacement(host_node=0, vcpus=1, memory_mib=128),),
    )
    root = Volume(POOL, f"{name}-root", f"/nonexistent/{name}-root")
    context = domain_context(
        spec, placement, (), (root,), None, uuid=str(uuid.uuid4()), domain_type="qemu"
    )
    return render_template(TEMPLATES_DIR, "domain.xml.j2", context)


@contextlib.contextmanager
def bench_host(pool_dir: Path) -> Iterator[libvirt.virConnect]:
    """A connection with the bench pool defined; everything removed afterwards."""
    libvirt.registerErrorHandler(_quiet, None)
    conn = libvirt.open("qemu:///system")
    marker = host.BACKEND_MARKER.read_bytes() if host.BACKEND_MARKER.exists() else None
    try:
        remove_bench_objects(conn)
        pool_dir.chmod(0o755)
        xml = render_template(
            TEMPLATES_DIR, "storage-pool.xml.j2", {"name": POOL, "path": str(pool_dir / "pool")}
        )
        pool = conn.storagePoolDefineXML(xml, 0)
        pool.build(0)
        pool.create(0)
        yield conn
    finally:
        remove_bench_objects(conn)
        conn.close()
        if marker is None:
            host.BACKEND_MARKER.unlink(missing_ok=True)
        else:
            host.BACKEND_MARKER.write_bytes(marker)


def charm_env(work: Path) -> dict[str, str]:
    """The environment Juju gives a dispatched update-status hook, hook tools first on PATH."""
    tools = work / "bin"
    tools.mkdir()
    script = tools / "hook-tool"
    script.write_text(HOOK_TOOL)
    script.chmod(0o755)
    for name in TOOLS:
        (tools / name).symlink_to(script)
    charm_dir = work / "charm"
    charm_dir.mkdir()
    for name in ("metadata.yaml", "config.yaml", "actions.yaml"):
        shutil.copy(REPO / name, charm_dir / name)
    (work / "config.json").write_text(json.dumps({"default-storage-pool": POOL}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUJU_", "PYTHON", "VIRTUAL"))}
    env.update(
        PATH=f"{tools}:{env.get('PATH', '/usr/bin:/bin')}",
        PYTHONPATH=f"{REPO / 'src'}:{REPO / 'lib'}",
        VMHOST_BENCH_DIR=str(work),
        JUJU_CHARM_DIR=str(charm_dir),
        JUJU_DISPATCH_PATH="hooks/update-status",
        JUJU_HOOK_NAME="update-status",
        JUJU_UNIT_NAME="vm-host/0",
        JUJU_MODEL_NAME="bench",
        JUJU_MODEL_UUID="00000000-0000-4000-8000-000000000000",
        JUJU_VERSION="3.6.4",
        JUJU_MACHINE_ID="0",
    )
    return env


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one process, which must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        log = cwd / "log"
        logged = log.read_text()[-4000:] if log.exists() else ""
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}{logged}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def measure(runs: int, env: dict[str, str], work: Path) -> dict[str, object]:
    """Best and median of the floor and the hook, interleaved so load drift hits both alike.

    The ratio is of the best runs (other work on the machine only ever adds time); the
    median ratio is reported beside it.

    Wall time is what a unit waits; the process's own CPU time is what it spends, and is far
    less disturbed by other work on the machine (libvirtd's share is not in it).
    """
    floor: list[tuple[float, float]] = []
    hook: list[tuple[float, float]] = []
    charm = str(REPO / "src" / "charm.py")
    timed([sys.executable, charm], env, work)  # warm caches (pyc, page cache), not counted
    for _ in range(runs):
        floor.append(timed([sys.executable, "-c", IMPORT_FLOOR], env, work))
        hook.append(timed([sys.executable, charm], env, work))
    status = (work / "status").read_text().strip().removeprefix("--application=False ")
    if not status.startswith("active"):
        raise SystemExit(f"update-status did not end active: {status}")
    out: dict[str, object] = {"status": status}
    for i, kind in enumerate(("wall", "cpu")):
        f = [x[i] for x in floor]
        h = [x[i] for x in hook]
        out[kind] = {
            "floor_min_s": round(min(f), 4),
            "hook_min_s": round(min(h), 4),
            "ratio": round(min(h) / min(f), 3),
            "floor_median_s": round(statistics.median(f), 4),
            "hook_median_s": round(statistics.median(h), 4),
            "median_ratio": round(statistics.median(h) / statistics.median(f), 3),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="hook runs per case (median)")
    parser.add_argument("--vms", type=int, default=100, help="domains in the second case")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--label", default="", help="name of this measurement in the output")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    results: dict[str, object] = {"commit": commit, "runs": args.runs, "python": sys.version}
    with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
        work = Path(tmp)
        pool_dir = work / "storage"
        pool_dir.mkdir()
        env = charm_env(work)
        with bench_host(pool_dir) as conn:
            results["0-vms"] = measure(args.runs, env, work)
            for i in range(args.vms):
                conn.defineXML(domain_xml(i))
            results[f"{args.vms}-vms"] = measure(args.runs, env, work)
    for case in ("0-vms", f"{args.vms}-vms"):
        r = results[case]
        assert isinstance(r, dict)
        for kind in ("wall", "cpu"):
            t = r[kind]
            print(
                f"{case:>8} {kind:>4}: update-status {t['hook_min_s'] * 1000:6.0f} ms, "
                f"import floor {t['floor_min_s'] * 1000:6.0f} ms, ratio {t['ratio']:.2f}x "
                f"(best of {args.runs}; median ratio {t['median_ratio']:.2f}x)"
            )
        print(f"{case:>8} status: {r['status']}")
    if args.out:
        previous = json.loads(args.out.read_text()) if args.out.exists() else {}
        previous[args.label or commit] = results
        args.out.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

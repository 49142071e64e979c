"""Faults on the real libvirtd: copied domains, forged metadata, interrupted composes, pools.

No mocks: the hypervisor, its pools and their files are real, and so are the faults. A killed
compose is a compose in another process, SIGKILLed while its call to define the domain is held
at a gate in front of libvirtd's socket (tests/integration/libvirt_gate.py): every volume
exists, the domain does not, and no code of the compose runs after the kill. A pool removed
mid-compose is destroyed and undefined from a second connection while the compose's call to
create its second volume is held at the gate. A full pool is a directory pool on a small
tmpfs; a pool whose directory vanished is one whose directory the test removed.

Everything is named vmhost-test-* so the conftest cleanup removes leftovers of a failed run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import libvirt
import pytest
from tests.integration.conftest import PREFIX, remove_test_domains
from tests.integration.libvirt_gate import (
    DOMAIN_DEFINE_XML,
    STORAGE_VOL_CREATE_XML,
    LibvirtGate,
    compose_in_child,
)
from tests.integration.test_libvirt_backend import domains, placed, volumes

from vmhost.backends.libvirt import METADATA_NS, LibvirtBackend
from vmhost.compose import HostState, compose
from vmhost.model import DiskSpec, Policy, VmHostError, VmSpec

GB = 10**9
HELD_TIMEOUT_S = 120
"""How long a compose may take to reach the held call (a spawned interpreter on a loaded host)."""

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_host")]


def spec(name: str, pool: str, **kw: object) -> VmSpec:
    base: dict[str, object] = {
        "name": name,
        "vcpus": 1,
        "memory_mib": 128,
        "disks": (DiskSpec("root", 1, pool),),
        "owner": "action",
    }
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def create_volume(backend: LibvirtBackend, pool: str, name: str) -> str:
    xml = (
        f"<volume><name>{name}</name><capacity unit='bytes'>1048576</capacity>"
        "<target><format type='qcow2'/></target></volume>"
    )
    return backend.conn.storagePoolLookupByName(pool).createXML(xml, 0).path()


def define_copy(backend: LibvirtBackend, name: str, copy: str, disk: str | None = None) -> None:
    """Define a copy of a domain as `virsh dumpxml | virsh define` (or virt-clone) makes it.

    The copy keeps <metadata>; libvirt gives it a new UUID. With `disk`, the copy's first disk
    is that file (virt-clone copies disks); without, it shares the original's disk files.
    """
    root = ET.fromstring(backend.conn.lookupByName(name).XMLDesc(0))
    root.find("name").text = copy  # type: ignore[union-attr]
    root.remove(root.find("uuid"))  # type: ignore[arg-type]
    for iface in root.findall("devices/interface"):
        mac = iface.find("mac")
        if mac is not None:
            iface.remove(mac)
    if disk is not None:
        source = root.find("devices/disk[@device='disk']/source")
        assert source is not None
        source.set("file", disk)
    backend.conn.defineXML(ET.tostring(root, encoding="unicode"))


def test_a_copy_sharing_the_disks_is_unmanaged_and_keeps_them(
    backend: LibvirtBackend, test_pool: str
) -> None:
    vm = spec("vmhost-test-orig", test_pool)
    backend.compose(vm, placed(backend, vm), (), test_pool)
    define_copy(backend, vm.name, "vmhost-test-copy")

    records = {r.name: r for r in backend.list_vms()}
    assert records[vm.name].managed
    copy = records["vmhost-test-copy"]
    assert not copy.managed
    assert "it is a copy" in copy.problem
    assert records[vm.name].uuid in copy.problem

    with pytest.raises(VmHostError, match="it is a copy"):
        backend.delete("vmhost-test-copy")
    assert "vmhost-test-copy" in domains(backend)
    assert "vmhost-test-orig-root" in volumes(backend, test_pool)

    # The original goes, but the disk the copy still uses stays.
    assert backend.delete(vm.name) == []
    assert vm.name not in domains(backend)
    assert "vmhost-test-orig-root" in volumes(backend, test_pool)


def test_a_clone_with_its_own_disk_never_takes_the_originals(
    backend: LibvirtBackend, test_pool: str
) -> None:
    vm = spec("vmhost-test-orig", test_pool)
    backend.compose(vm, placed(backend, vm), (), test_pool)
    clone_disk = create_volume(backend, test_pool, "vmhost-test-clone-root")
    define_copy(backend, vm.name, "vmhost-test-clone", disk=clone_disk)

    with pytest.raises(VmHostError, match="it is a copy"):
        backend.delete("vmhost-test-clone")
    assert {"vmhost-test-orig-root", "vmhost-test-clone-root"} <= volumes(backend, test_pool)
    assert "vmhost-test-clone" in domains(backend)

    # Without the copy, the original's own disk goes with it.
    backend.conn.lookupByName("vmhost-test-clone").undefine()
    assert backend.delete(vm.name) == [f"{test_pool}/vmhost-test-orig-root"]
    assert "vmhost-test-orig-root" not in volumes(backend, test_pool)
    assert "vmhost-test-clone-root" in volumes(backend, test_pool)


def test_forged_metadata_naming_another_vms_volume_never_deletes_it(
    backend: LibvirtBackend, test_pool: str
) -> None:
    victim = spec("vmhost-test-victim", test_pool)
    backend.compose(victim, placed(backend, victim), (), test_pool)
    uuid = "5d3c2b1a-0f9e-4d8c-b7a6-958473625140"
    own = create_volume(backend, test_pool, "vmhost-test-forged-root")
    # Well-formed metadata with its own UUID, claiming a relation and the victim's volume.
    backend.conn.defineXML(
        f"""<domain type='qemu'><name>vmhost-test-forged</name><uuid>{uuid}</uuid>
      <metadata><vmhost:vm xmlns:vmhost='{METADATA_NS}'>
        <vmhost:domain-uuid>{uuid}</vmhost:domain-uuid>
        <vmhost:owner>relation:7:pg</vmhost:owner><vmhost:request-id>db-0</vmhost:request-id>
        <vmhost:placement vcpus='1' memory-mib='128'/>
        <vmhost:volume pool='{test_pool}' name='vmhost-test-victim-root'/>
        <vmhost:volume pool='{test_pool}' name='vmhost-test-forged-root'/>
      </vmhost:vm></metadata>
      <memory unit='MiB'>128</memory><vcpu placement='static'>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os>
      <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{own}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""
    )
    forged = next(r for r in backend.list_vms() if r.name == "vmhost-test-forged")
    assert forged.managed  # its metadata is consistent: vm-host cannot tell it from its own

    deleted = backend.delete("vmhost-test-forged")

    assert deleted == [f"{test_pool}/vmhost-test-forged-root"]
    assert "vmhost-test-forged" not in domains(backend)
    left = volumes(backend, test_pool)
    assert "vmhost-test-victim-root" in left
    assert "vmhost-test-forged-root" not in left
    assert victim.name in domains(backend)
    backend.delete(victim.name)


@pytest.fixture
def gate_dir() -> Iterator[Path]:
    """A short private directory for a gate's socket (unix socket paths are short)."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX + "gate-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def wait_held(gate: LibvirtGate, what: str, alive) -> None:
    """Wait for the gate to hold its call; fail early, saying why, when the compose ended."""
    deadline = time.monotonic() + HELD_TIMEOUT_S
    while not gate.wait_held(0.2):
        if not alive():
            pytest.fail(f"the compose ended before {what}; calls through the gate: {gate.calls}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in {HELD_TIMEOUT_S} s; calls through the gate: {gate.calls}")


def kill_compose(backend: LibvirtBackend, vm: VmSpec, pool: str, gate_dir: Path) -> None:
    """Compose `vm` in another process and SIGKILL it as it asks libvirtd to define the domain.

    That is a hook killed after its volumes: they exist, the domain does not, and nothing of
    the compose (no except clause, no rollback) runs after the kill.
    """
    placement = placed(backend, vm)
    with LibvirtGate(gate_dir, hold=DOMAIN_DEFINE_XML) as gate:
        child = compose_in_child(gate.uri, backend, vm, placement, pool)
        try:
            wait_held(gate, "call to define the domain", child.is_alive)
        finally:
            child.kill()
            child.join(HELD_TIMEOUT_S)
    assert child.exitcode == -signal.SIGKILL


@pytest.fixture
def scratch_pool(backend: LibvirtBackend, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A second directory pool, vmhost-test-scratch, that a test may undefine or break."""
    tmp_path.chmod(0o755)
    path = tmp_path / "scratch"
    backend.ensure_pool("vmhost-test-scratch", str(path))
    yield "vmhost-test-scratch", path
    with contextlib.suppress(libvirt.libvirtError):
        pool = backend.conn.storagePoolLookupByName("vmhost-test-scratch")
        with contextlib.suppress(libvirt.libvirtError):
            pool.destroy()
        pool.undefine()


def test_a_killed_compose_leaves_an_intent_and_the_next_hook_removes_its_volumes(
    backend: LibvirtBackend, test_pool: str, gate_dir: Path
) -> None:
    vm = spec(
        "vmhost-test-killed",
        test_pool,
        disks=(DiskSpec("root", 1, test_pool), DiskSpec("data", 1, test_pool)),
    )
    placement = placed(backend, vm)

    kill_compose(backend, vm, test_pool, gate_dir)

    assert {"vmhost-test-killed-root", "vmhost-test-killed-data"} <= volumes(backend, test_pool)
    assert vm.name not in domains(backend)
    (intent,) = backend.intents.pending()
    assert intent.name == vm.name
    assert all(v.path for v in intent.volumes)
    with pytest.raises(VmHostError, match="already exists in pool"):
        backend.compose(vm, placement, (), test_pool)  # what blocked the name before

    messages = backend.recover()

    assert len(messages) == 1
    assert "interrupted compose of vmhost-test-killed" in messages[0]
    assert f"{test_pool}/vmhost-test-killed-root" in messages[0]
    assert f"{test_pool}/vmhost-test-killed-data" in messages[0]
    assert not {v for v in volumes(backend, test_pool) if v.startswith("vmhost-test-killed")}
    assert backend.intents.pending() == []
    assert backend.recent_recoveries()[-1] == messages[0]
    assert backend.recover() == []  # once only
    record = backend.compose(vm, placed(backend, vm), (), test_pool)  # the name is free again
    assert record.managed
    assert backend.intents.pending() == []  # a finished compose keeps no intent
    backend.delete(vm.name)


def test_recovery_keeps_a_volume_some_domain_uses(
    backend: LibvirtBackend, test_pool: str, gate_dir: Path
) -> None:
    vm = spec("vmhost-test-killed", test_pool)
    kill_compose(backend, vm, test_pool, gate_dir)
    (intent,) = backend.intents.pending()
    path = intent.volumes[0].path
    backend.conn.defineXML(
        f"""<domain type='qemu'><name>vmhost-test-adopter</name>
      <memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>
      <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
        <source file='{path}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"""
    )

    (message,) = backend.recover()

    assert "kept" in message
    assert "domain vmhost-test-adopter uses it" in message
    assert "vmhost-test-killed-root" in volumes(backend, test_pool)
    assert len(backend.intents.pending()) == 1  # tried again next hook

    backend.conn.lookupByName("vmhost-test-adopter").undefine()
    (message,) = backend.recover()
    assert f"removed {test_pool}/vmhost-test-killed-root" in message
    assert "vmhost-test-killed-root" not in volumes(backend, test_pool)
    assert backend.intents.pending() == []


def test_pool_undefined_mid_compose_is_cleaned_by_path(
    backend: LibvirtBackend, scratch_pool: tuple[str, Path], gate_dir: Path
) -> None:
    pool_name, pool_dir = scratch_pool
    vm = spec(
        "vmhost-test-vanish",
        pool_name,
        disks=(DiskSpec("root", 1, pool_name), DiskSpec("data", 1, pool_name)),
    )
    placement = placed(backend, vm)
    gate = LibvirtGate(gate_dir, hold=STORAGE_VOL_CREATE_XML, nth=2)  # the data volume's
    with contextlib.ExitStack() as stack:
        composer = stack.enter_context(
            LibvirtBackend(
                uri=gate.uri,
                virt_type=backend.virt_type,
                intent_dir=backend.intents.directory,
                console_log_dir=backend.console_log_dir,
            )
        )
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        stack.enter_context(gate)  # closed first: a held call never outlives the test
        running = executor.submit(composer.compose, vm, placement, (), pool_name)
        wait_held(gate, "call to create the second volume", lambda: not running.done())
        assert (pool_dir / "vmhost-test-vanish-root").is_file()  # the first volume is made
        gone = backend.conn.storagePoolLookupByName(pool_name)
        gone.destroy()
        gone.undefine()  # the operator removes the pool while the compose runs
        gate.release()
        with pytest.raises(VmHostError) as error:
            running.result(timeout=HELD_TIMEOUT_S)

    print(f"compose after the pool went: {error.value}")
    assert "nothing was left behind" in str(error.value)
    assert not (pool_dir / "vmhost-test-vanish-root").exists()  # unlinked by its path
    assert list(pool_dir.iterdir()) == []
    assert vm.name not in domains(backend)
    assert backend.intents.pending() == []


def test_a_pool_whose_directory_vanished_is_a_clear_error(
    backend: LibvirtBackend, scratch_pool: tuple[str, Path]
) -> None:
    pool_name, pool_dir = scratch_pool
    shutil.rmtree(pool_dir)
    vm = spec("vmhost-test-nodir", pool_name)

    with pytest.raises(VmHostError, match="cannot be read") as error:
        backend.compose(vm, placed(backend, vm), (), pool_name)

    assert not isinstance(error.value, libvirt.libvirtError)
    assert "recreate it and start the pool" in str(error.value)
    assert vm.name not in domains(backend)
    assert backend.intents.pending() == []
    backend.topology()  # the host can still be read
    backend.list_vms()


@pytest.fixture
def tiny_pool(backend: LibvirtBackend) -> Iterator[str]:
    """A directory pool on a 128 MiB tmpfs: a really small pool, vmhost-test-tiny."""
    base = Path(tempfile.mkdtemp(prefix="vmhost-test-tiny-"))
    base.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the disk files
    mount = base / "tiny"
    mount.mkdir()
    subprocess.run(
        ["/bin/mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount)], check=True
    )
    try:
        backend.ensure_pool("vmhost-test-tiny", str(mount / "pool"))
        yield "vmhost-test-tiny"
    finally:
        remove_test_domains(backend.conn)
        with contextlib.suppress(libvirt.libvirtError):
            pool = backend.conn.storagePoolLookupByName("vmhost-test-tiny")
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
            pool.undefine()
        subprocess.run(["/bin/umount", str(mount)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_a_full_pool_is_refused_in_dry_run_and_compose_and_the_ratio_applies(
    backend: LibvirtBackend, tiny_pool: str, test_bridge: str
) -> None:
    topology = backend.topology()
    pool = next(p for p in topology.pools if p.name == tiny_pool)
    assert 0 < pool.available_bytes <= 128 * 1024 * 1024
    vm = spec("vmhost-test-full", tiny_pool)
    host = HostState(topology, backend.list_vms(), Policy(), {}, tiny_pool, test_bridge)

    for dry_run in (True, False):
        got = compose(backend, vm, host, dry_run=dry_run)
        assert got.vm is None
        assert f"pool {tiny_pool!r} cannot hold 1.0 GB more" in got.rejected
    assert vm.name not in domains(backend)
    assert volumes(backend, tiny_pool) == set()

    # Overcommitted on purpose (10 x 128 MiB may back 1 GB): the thin disk is created, and
    # what it may still grow by then counts against the pool, so a second one is refused.
    roomy = dataclasses.replace(host, disk_overcommit_ratio=10.0)
    made = compose(backend, vm, roomy)
    assert made.vm is not None, made.error
    after = backend.topology()
    grown = next(p for p in after.pools if p.name == tiny_pool)
    assert 0.9 * GB < grown.committed_bytes <= GB
    again = dataclasses.replace(roomy, topology=after, vms=backend.list_vms())
    second = compose(backend, spec("vmhost-test-full2", tiny_pool), again, dry_run=True)
    assert "may still grow by" in second.rejected
    backend.delete(vm.name)

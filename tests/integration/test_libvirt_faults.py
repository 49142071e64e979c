"""Faults on the real libvirtd: copied domains, forged metadata, interrupted composes, pools.

No mocks: the hypervisor, its pools and their files are real; a "killed" compose is a
BaseException raised between the first volume and the define, which is what a hook killed
there leaves behind.

Everything is named vmhost-test-* so the conftest cleanup removes leftovers of a failed run.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from vmhost.backends.libvirt import METADATA_NS, LibvirtBackend
from vmhost.model import DiskSpec, Placement, Policy, Rejection, VmHostError, VmSpec

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


def placed(backend: LibvirtBackend, vm: VmSpec) -> Placement:
    from vmhost.placement import plan

    result = plan(backend.topology(), [r.placement for r in backend.list_vms()], vm, Policy())
    if isinstance(result, Rejection):
        pytest.fail(f"the allocator refused {vm.name} on this host: {result}")
    return result


def volumes(backend: LibvirtBackend, pool: str) -> set[str]:
    p = backend.conn.storagePoolLookupByName(pool)
    p.refresh(0)
    return set(p.listVolumes())


def domains(backend: LibvirtBackend) -> set[str]:
    return {d.name() for d in backend.conn.listAllDomains(0)}


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

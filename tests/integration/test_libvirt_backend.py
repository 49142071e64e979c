"""The libvirt backend against the real libvirtd and KVM on this machine: no mocks.

VMs are small (128-256 MiB, 1 vCPU, 1 GB sparse qcow2 disks) and boot no OS: what is checked
is what libvirt and the kernel report about them (live XML, huge pages, bridge ports).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest
from tests.integration.conftest import free_hugepages

from vmhost import imagecache
from vmhost.backends import BackendUnavailableError
from vmhost.backends.libvirt import METADATA_NS, LibvirtBackend
from vmhost.model import (
    AttachmentKind,
    DiskSpec,
    HugepageRequest,
    InvalidRequestError,
    NicAttachment,
    NicKind,
    Placement,
    Policy,
    Rejection,
    VmHostError,
    VmRecord,
    VmSpec,
    VmState,
)
from vmhost.placement import plan
from vmhost.topology import parse_cpu_list

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_host")]

QEMU_IMG = "/usr/bin/qemu-img"
GB = 10**9


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


def qemu_info(path: str) -> dict:
    out = subprocess.run(
        [QEMU_IMG, "info", "--force-share", "--output=json", path],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def placed(backend: LibvirtBackend, vm: VmSpec) -> Placement:
    """Plan a VM on the live host, counting what every existing domain already takes."""
    allocations = [r.placement for r in backend.list_vms()]
    result = plan(backend.topology(), allocations, vm, Policy())
    if isinstance(result, Rejection):
        pytest.fail(f"the allocator refused {vm.name} on this host: {result}")
    return result


def live_xml(backend: LibvirtBackend, name: str) -> ET.Element:
    return ET.fromstring(backend.conn.lookupByName(name).XMLDesc(0))


def volumes(backend: LibvirtBackend, pool: str) -> set[str]:
    p = backend.conn.storagePoolLookupByName(pool)
    p.refresh(0)
    return set(p.listVolumes())


def domains(backend: LibvirtBackend) -> set[str]:
    return {d.name() for d in backend.conn.listAllDomains(0)}


def create_volume(backend: LibvirtBackend, pool: str, name: str) -> None:
    xml = (
        f"<volume><name>{name}</name><capacity unit='bytes'>1048576</capacity>"
        "<target><format type='qcow2'/></target></volume>"
    )
    backend.conn.storagePoolLookupByName(pool).createXML(xml, 0)


def test_topology_and_version(backend: LibvirtBackend, test_pool: str, test_bridge: str) -> None:
    topology = backend.topology()
    assert topology.hypervisor == "libvirt"
    assert topology.hypervisor_version == backend.version()
    virsh = subprocess.run(
        ["/usr/bin/virsh", "-c", "qemu:///system", "version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"libvirt {backend.version()}" in virsh
    host_cpus = sorted(int(p.name[3:]) for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"))
    assert sorted(topology.cpus) == host_cpus
    pool = next(p for p in topology.pools if p.name == test_pool)
    assert pool.active
    assert pool.driver == "dir"
    assert pool.path is not None
    assert Path(pool.path).is_dir()
    assert pool.capacity_bytes > 0
    bridge = next(n for n in topology.nics if n.name == test_bridge)
    assert bridge.kind == NicKind.BRIDGE


def test_compose_pinned_vm_matches_placement_and_delete(
    backend: LibvirtBackend, test_pool: str
) -> None:
    vm = spec("vmhost-test-pinned", test_pool, pinned_count=1, request_id="pin-1")
    placement = placed(backend, vm)
    assert placement.pinned

    start = time.monotonic()
    record = backend.compose(vm, placement, (), test_pool)
    compose_s = time.monotonic() - start

    assert record.state == VmState.RUNNING
    root = live_xml(backend, vm.name)
    assert root.get("type") == "kvm"
    pins = {int(p.get("vcpu", "")): p.get("cpuset") for p in root.iter("vcpupin")}
    assert pins == {i: str(cpu) for i, cpu in enumerate(placement.pinned_cpus)}
    emulatorpin = root.find("cputune/emulatorpin")
    if placement.emulator_cpus:
        assert emulatorpin is not None
        assert parse_cpu_list(emulatorpin.get("cpuset", "")) == tuple(
            sorted(placement.emulator_cpus)
        )
    else:
        assert emulatorpin is None
    memory = root.find("numatune/memory")
    assert memory is not None
    assert memory.get("mode") == "strict"
    assert memory.get("nodeset") == ",".join(str(n) for n in placement.host_nodes)
    memnodes = [(m.get("cellid"), m.get("nodeset")) for m in root.iter("memnode")]
    assert memnodes == [(str(i), str(c.host_node)) for i, c in enumerate(placement.cells)]
    # What QEMU really runs with, not only what the XML says.
    vcpu_pins = backend.conn.lookupByName(vm.name).vcpuPinInfo(0)
    assert [tuple(i for i, on in enumerate(mask) if on) for mask in vcpu_pins] == [
        (cpu,) for cpu in placement.pinned_cpus
    ]

    start = time.monotonic()
    backend.delete(vm.name)
    delete_s = time.monotonic() - start
    assert vm.name not in domains(backend)
    assert not {v for v in volumes(backend, test_pool) if v.startswith(vm.name)}
    print(f"\ncompose (define+start) {compose_s:.2f} s, delete {delete_s:.2f} s")


def test_hugepage_backed_vm_takes_the_reserved_pages(
    backend: LibvirtBackend, test_pool: str, reserve_hugepages: Callable[..., int]
) -> None:
    vm = spec("vmhost-test-huge", test_pool, memory_mib=128, hugepages=HugepageRequest.P2M)
    pages = 128 * 1024 // 2048
    free_now = reserve_hugepages(pages)
    assert free_hugepages() == free_now
    placement = placed(backend, vm)
    assert placement.hugepage_backed
    assert sum(c.hugepages for c in placement.cells) == pages

    backend.compose(vm, placement, (), test_pool)
    root = live_xml(backend, vm.name)
    page = root.find("memoryBacking/hugepages/page")
    assert page is not None
    assert (page.get("size"), page.get("unit"), page.get("nodeset")) == ("2048", "KiB", "0")
    assert free_now - free_hugepages() == pages

    backend.delete(vm.name)
    assert free_hugepages() == free_now


def test_nic_on_a_bridge(backend: LibvirtBackend, test_pool: str, test_bridge: str) -> None:
    vm = spec("vmhost-test-nic", test_pool)
    nic = NicAttachment("eth0", AttachmentKind.BRIDGE, test_bridge)
    record = backend.compose(vm, placed(backend, vm), (nic,), test_pool)

    interface = live_xml(backend, vm.name).find("devices/interface")
    assert interface is not None
    assert interface.get("type") == "bridge"
    source = interface.find("source")
    target = interface.find("target")
    mac = interface.find("mac")
    assert source is not None
    assert target is not None
    assert mac is not None
    assert source.get("bridge") == test_bridge
    ports = {p.name for p in Path(f"/sys/class/net/{test_bridge}/brif").iterdir()}
    assert target.get("dev") in ports
    assert record.interfaces == (
        {"label": "eth0", "mac": mac.get("address"), "attached-to": test_bridge},
    )
    backend.delete(vm.name)
    assert not list(Path(f"/sys/class/net/{test_bridge}/brif").iterdir())


def test_nic_macvtap_on_a_host_interface(
    backend: LibvirtBackend, test_pool: str, test_bridge: str
) -> None:
    # There is no spare physical NIC here; macvtap's lower device is the test bridge.
    vm = spec("vmhost-test-macvtap", test_pool)
    nic = NicAttachment("eth0", AttachmentKind.DIRECT, test_bridge)
    backend.compose(vm, placed(backend, vm), (nic,), test_pool)
    interface = live_xml(backend, vm.name).find("devices/interface")
    assert interface is not None
    assert interface.get("type") == "direct"
    source = interface.find("source")
    target = interface.find("target")
    assert source is not None
    assert target is not None
    assert (source.get("dev"), source.get("mode")) == (test_bridge, "bridge")
    tap = Path("/sys/class/net") / str(target.get("dev"))
    assert (tap / f"lower_{test_bridge}").exists()
    backend.delete(vm.name)
    assert not tap.exists()


def test_delete_removes_exactly_its_volumes(backend: LibvirtBackend, test_pool: str) -> None:
    create_volume(backend, test_pool, "vmhost-test-foreign-vol")
    vm = spec(
        "vmhost-test-del",
        test_pool,
        disks=(DiskSpec("root", 1, test_pool), DiskSpec("data", 1, test_pool)),
        ssh_public_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test",),
    )
    record = backend.compose(vm, placed(backend, vm), (), test_pool)
    expected = {"vmhost-test-del-root", "vmhost-test-del-data", "vmhost-test-del-seed"}
    assert set(record.volumes) == {f"{test_pool}/{v}" for v in expected}
    assert expected <= volumes(backend, test_pool)
    cdrom = live_xml(backend, vm.name).find("devices/disk[@device='cdrom']/source")
    assert cdrom is not None
    assert cdrom.get("file", "").endswith("vmhost-test-del-seed")

    backend.delete(vm.name)
    left = volumes(backend, test_pool)
    assert not (expected & left)
    assert "vmhost-test-foreign-vol" in left
    assert vm.name not in domains(backend)
    with pytest.raises(VmHostError, match="does not exist"):
        backend.delete(vm.name)


def test_a_host_path_is_never_copied_into_a_disk(
    backend: LibvirtBackend, test_pool: str, image_pool: imagecache.Settings
) -> None:
    # Once, `image: /etc/shadow` (or another tenant's disk) was copied byte for byte into the
    # requester's root disk.
    local = Path(image_pool.local_dir)
    other = local / "other.raw"
    other.write_bytes(b"another tenant's data\n" + b"\0" * 4096)
    (local / "shadow.raw").symlink_to("/etc/shadow")
    before = volumes(backend, test_pool)
    for image in ("/etc/shadow", str(other)):
        vm = spec("vmhost-test-path", test_pool, image=image)
        with pytest.raises(InvalidRequestError, match="image"):
            backend.compose(vm, placed(backend, vm), (), test_pool)
    with pytest.raises(InvalidRequestError, match="links out of"):
        imagecache.ensure(backend, "local:shadow", image_pool)
    vm = spec("vmhost-test-path", test_pool, image="local:shadow")
    with pytest.raises(VmHostError, match="not in this host's image cache"):
        backend.compose(vm, placed(backend, vm), (), test_pool)
    assert volumes(backend, test_pool) == before
    assert backend.cached_images() == []
    assert vm.name not in domains(backend)


def test_root_disks_are_overlays_on_one_cached_base(
    backend: LibvirtBackend, test_pool: str, image_pool: imagecache.Settings
) -> None:
    image = Path(image_pool.local_dir) / "vmhost-test.raw"
    marker = b"vm-host image marker\n"
    image.write_bytes(marker + b"\0" * (4 * 1024 * 1024 - len(marker)))
    base = imagecache.ensure(backend, "local:vmhost-test", image_pool)
    assert base.name == "local:vmhost-test"
    info = qemu_info(base.path)
    assert info["format"] == "qcow2"  # converted, never copied as bytes
    assert "backing-filename" not in info
    assert imagecache.ensure(backend, "local:vmhost-test", image_pool) == base  # once

    names = ("vmhost-test-image", "vmhost-test-image2")
    for name in names:
        vm = spec(name, test_pool, image="local:vmhost-test")
        backend.compose(vm, placed(backend, vm), (), test_pool)
        root = live_xml(backend, name)
        assert [b.get("dev") for b in root.findall("os/boot")] == ["hd"]
        driver = root.find("devices/disk[@device='disk']/driver")
        assert driver is not None
        assert driver.get("type") == "qcow2"
        vol = backend.conn.storagePoolLookupByName(test_pool).storageVolLookupByName(
            f"{name}-root"
        )
        assert vol.info()[1] == GB  # the requested size
        info = qemu_info(vol.path())
        assert info["backing-filename"] == base.path  # an overlay: nothing was copied
        assert info["actual-size"] < 1024 * 1024
        # The guest reads the image's bytes through it (qemu-img follows the backing chain).
        subprocess.run(
            [QEMU_IMG, "compare", "-q", "-U", "-f", "raw", "-F", "qcow2", str(image), vol.path()],
            check=True,
        )
    assert sorted(backend.image_users()[base.volume]) == list(names)
    assert [(b.volume, b.sha256) for b in backend.cached_images()] == [(base.volume, base.sha256)]

    # A newer version replaces the base; the old one stays while VMs use it.
    image.write_bytes(marker + b"v2" + b"\0" * (4 * 1024 * 1024 - len(marker) - 2))
    os.utime(image, (time.time() + 5, time.time() + 5))
    newer = imagecache.ensure(backend, "local:vmhost-test", image_pool)
    assert {b.volume for b in backend.cached_images()} == {base.volume, newer.volume}
    for name in names:
        backend.delete(name)
    assert backend.image_users() == {}
    image.write_bytes(marker + b"v3" + b"\0" * (4 * 1024 * 1024 - len(marker) - 2))
    os.utime(image, (time.time() + 10, time.time() + 10))
    newest = imagecache.ensure(backend, "local:vmhost-test", image_pool)
    assert [b.volume for b in backend.cached_images()] == [newest.volume]


def test_local_qcow2_with_an_external_data_file_is_refused_untouched(
    backend: LibvirtBackend, test_pool: str, image_pool: imagecache.Settings
) -> None:
    # A qcow2 whose data_file is a host file would make QEMU open that file read-write.
    local = Path(image_pool.local_dir)
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"data_file={local / 'victim'}",
         str(local / "evil.qcow2"), "64M"],
        check=True,
    )  # fmt: skip
    with pytest.raises(VmHostError, match="external data file"):
        imagecache.ensure(backend, "local:evil", image_pool)
    assert backend.cached_images() == []
    assert list(backend.staging_dir().iterdir()) == []


def test_ensure_pool_defines_starts_and_restarts(backend: LibvirtBackend, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = tmp_path / "nested" / "images"
    name = "vmhost-test-ensure"
    try:
        backend.ensure_pool(name, str(path))
        pool = backend.conn.storagePoolLookupByName(name)
        assert pool.isActive()
        assert pool.autostart()
        assert path.is_dir()
        backend.ensure_pool(name, str(path))  # nothing to do
        pool.destroy()
        backend.ensure_pool(name, str(path))  # started again
        assert pool.isActive()
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            pool = backend.conn.storagePoolLookupByName(name)
            pool.destroy()
            pool.undefine()


def test_image_larger_than_the_disk_leaves_nothing(
    backend: LibvirtBackend, test_pool: str, image_pool: imagecache.Settings
) -> None:
    image = Path(image_pool.local_dir) / "big.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "2G"], check=True)
    imagecache.ensure(backend, "local:big", image_pool)
    before = volumes(backend, test_pool)
    vm = spec("vmhost-test-bigimage", test_pool, image="local:big")
    with pytest.raises(VmHostError, match="larger root disk"):
        backend.compose(vm, placed(backend, vm), (), test_pool)
    assert volumes(backend, test_pool) == before
    assert vm.name not in domains(backend)


def test_failure_at_start_leaves_no_domain_and_no_volume(
    backend: LibvirtBackend, test_pool: str
) -> None:
    # Volumes, seed and definition succeed; starting fails because the bridge does not exist.
    before = volumes(backend, test_pool)
    vm = spec(
        "vmhost-test-fail",
        test_pool,
        disks=(DiskSpec("root", 1, test_pool), DiskSpec("data", 1, test_pool)),
        user_data="#cloud-config\n",
    )
    nic = NicAttachment("eth0", AttachmentKind.BRIDGE, "vmhost-test-nob")
    with pytest.raises(VmHostError, match="starting the domain failed") as error:
        backend.compose(vm, placed(backend, vm), (nic,), test_pool)
    assert "nothing was left behind" in str(error.value)
    assert vm.name not in domains(backend)
    assert volumes(backend, test_pool) == before


def test_second_disk_in_a_missing_pool_leaves_nothing(
    backend: LibvirtBackend, test_pool: str
) -> None:
    before = volumes(backend, test_pool)
    vm = spec(
        "vmhost-test-nopool",
        test_pool,
        disks=(DiskSpec("root", 1, test_pool), DiskSpec("data", 1, "vmhost-test-missing")),
    )
    with pytest.raises(VmHostError, match="'vmhost-test-missing' does not exist"):
        backend.compose(vm, placed(backend, vm), (), test_pool)
    assert vm.name not in domains(backend)
    assert volumes(backend, test_pool) == before


def test_second_disk_whose_volume_exists_leaves_it_alone(
    backend: LibvirtBackend, test_pool: str
) -> None:
    create_volume(backend, test_pool, "vmhost-test-taken-data")
    before = volumes(backend, test_pool)
    vm = spec(
        "vmhost-test-taken",
        test_pool,
        disks=(DiskSpec("root", 1, test_pool), DiskSpec("data", 1, test_pool)),
    )
    with pytest.raises(VmHostError, match="already exists in pool"):
        backend.compose(vm, placed(backend, vm), (), test_pool)
    assert vm.name not in domains(backend)
    assert volumes(backend, test_pool) == before
    info = (
        backend.conn.storagePoolLookupByName(test_pool)
        .storageVolLookupByName("vmhost-test-taken-data")
        .info()
    )
    assert info[1] == 1048576  # the existing volume is untouched


def test_name_in_use_is_refused_before_anything(backend: LibvirtBackend, test_pool: str) -> None:
    vm = spec("vmhost-test-dup", test_pool)
    backend.compose(vm, placed(backend, vm), (), test_pool)
    before = volumes(backend, test_pool)
    again = spec("vmhost-test-dup", test_pool, disks=(DiskSpec("other", 1, test_pool),))
    with pytest.raises(VmHostError, match="already exists"):
        backend.compose(again, placed(backend, again), (), test_pool)
    assert volumes(backend, test_pool) == before
    backend.delete(vm.name)


def test_list_vms_round_trips_metadata_and_reports_foreign_domains(
    backend: LibvirtBackend, test_pool: str
) -> None:
    vm = spec(
        "vmhost-test-ledger",
        test_pool,
        pinned_count=1,
        owner="relation:3:maas",
        request_id="db-0",
    )
    placement = placed(backend, vm)
    backend.compose(vm, placement, (), test_pool)
    cpu = placement.pinned_cpus[0]
    foreign_xml = f"""<domain type='kvm'><name>vmhost-test-foreign</name>
      <memory unit='MiB'>256</memory><vcpu placement='static'>1</vcpu>
      <cputune><vcpupin vcpu='0' cpuset='{cpu}'/></cputune>
      <os><type arch='x86_64'>hvm</type></os></domain>"""
    backend.conn.defineXML(foreign_xml)

    records: dict[str, VmRecord] = {r.name: r for r in backend.list_vms()}
    mine = records[vm.name]
    assert mine.managed
    assert (mine.owner, mine.request_id) == ("relation:3:maas", "db-0")
    assert mine.placement == placement
    assert mine.state == VmState.RUNNING
    assert mine.volumes == (f"{test_pool}/vmhost-test-ledger-root",)
    foreign = records["vmhost-test-foreign"]
    assert not foreign.managed
    assert foreign.state == VmState.STOPPED
    assert foreign.placement.vcpus == 1
    assert foreign.placement.memory_mib == 256
    assert foreign.placement.pinned_cpus == (cpu,)

    with pytest.raises(VmHostError, match="not created by vm-host"):
        backend.delete("vmhost-test-foreign")
    assert "vmhost-test-foreign" in domains(backend)
    backend.delete(vm.name)


def test_stop_and_start(backend: LibvirtBackend, test_pool: str) -> None:
    vm = spec("vmhost-test-power", test_pool)
    backend.compose(vm, placed(backend, vm), (), test_pool)
    dom = backend.conn.lookupByName(vm.name)
    # No guest OS answers ACPI here, so stop falls back to destroy after the timeout.
    backend.stop(vm.name, timeout_s=1.0)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    backend.start(vm.name)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    backend.start(vm.name)  # already running: nothing to do
    backend.delete(vm.name)


def test_unreachable_daemon_is_reported(tmp_path: Path) -> None:
    unreachable = LibvirtBackend(uri=f"qemu+unix:///system?socket={tmp_path}/none.sock")
    with pytest.raises(BackendUnavailableError, match="cannot connect to libvirt"):
        unreachable.version()


def test_a_paused_vm_is_failed_with_the_reason(backend: LibvirtBackend, test_pool: str) -> None:
    vm = spec("vmhost-test-paused", test_pool)
    backend.compose(vm, placed(backend, vm), (), test_pool)
    dom = backend.conn.lookupByName(vm.name)
    try:
        dom.suspend()
        (record,) = [r for r in backend.list_vms() if r.name == vm.name]
        assert record.state == VmState.FAILED
        assert "virsh resume" in record.state_reason
        dom.resume()
        (record,) = [r for r in backend.list_vms() if r.name == vm.name]
        assert record.state == VmState.RUNNING
        assert record.state_reason == ""
    finally:
        backend.delete(vm.name)


@pytest.mark.parametrize(
    "placement",
    [
        "",
        "<vmhost:placement vcpus='two' memory-mib='256'/>",
        "<vmhost:placement vcpus='1' memory-mib='256'><vmhost:cell host-node='0' vcpus='1'"
        " memory-mib='256' cpus='1-2'/></vmhost:placement>",
    ],
)
def test_forged_metadata_makes_a_domain_unmanaged_not_a_crash(
    backend: LibvirtBackend, test_pool: str, placement: str
) -> None:
    backend.conn.defineXML(
        f"""<domain type='qemu'><name>vmhost-test-forged</name>
      <metadata><vmhost:vm xmlns:vmhost='{METADATA_NS}'>
        <vmhost:owner>relation:7:pg</vmhost:owner>{placement}
        <vmhost:volume pool='{test_pool}' name='vmhost-test-other-root'/>
      </vmhost:vm></metadata>
      <memory unit='MiB'>256</memory><vcpu placement='static'>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os></domain>"""
    )
    create_volume(backend, test_pool, "vmhost-test-other-root")

    records = {r.name: r for r in backend.list_vms()}

    forged = records["vmhost-test-forged"]
    assert not forged.managed
    assert "metadata is unreadable" in forged.problem
    assert forged.placement.memory_mib == 256
    with pytest.raises(VmHostError, match="unreadable vm-host metadata"):
        backend.delete("vmhost-test-forged")
    assert "vmhost-test-forged" in domains(backend)
    assert "vmhost-test-other-root" in volumes(backend, test_pool)


def _owner_seen_afresh(name: str) -> dict[str, str]:
    """The owner of `name` as a new connection to libvirtd sees it, in every place it lives."""
    ns = f"{{{METADATA_NS}}}"
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(name)
        seen = {
            "live": ET.fromstring(dom.XMLDesc(0)).findtext(f"metadata/{ns}vm/{ns}owner"),
            "defined": ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).findtext(
                f"metadata/{ns}vm/{ns}owner"
            ),
            "metadata": ET.fromstring(
                dom.metadata(
                    libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    METADATA_NS,
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG,
                )
            ).findtext("owner"),
        }
    finally:
        conn.close()
    return {k: (v or "").strip() for k, v in seen.items()}


def test_set_owner_re_owns_a_vm_as_a_fresh_connection_sees_it(
    backend: LibvirtBackend, test_pool: str
) -> None:
    # Composed with the owner format of earlier releases, as a VM from before an upgrade is.
    vm = spec("vmhost-test-owner", test_pool, owner="relation:3:pg", request_id="db-0")
    placement = placed(backend, vm)
    before = backend.compose(vm, placement, (), test_pool)
    released = "released:pg:vm-host:5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f"

    backend.set_owner(vm.name, released)  # running: live and stored definition

    assert _owner_seen_afresh(vm.name) == dict.fromkeys(("live", "defined", "metadata"), released)
    assert backend.conn.lookupByName(vm.name).isActive()
    with LibvirtBackend(virt_type=backend.virt_type) as fresh:
        (record,) = [r for r in fresh.list_vms() if r.name == vm.name]
    assert record.managed, record.problem
    assert record.owner == released
    # Nothing but the owner changed in vm-host's metadata.
    assert (record.request_id, record.spec_hash, record.volumes, record.placement) == (
        before.request_id,
        before.spec_hash,
        before.volumes,
        placement,
    )

    backend.stop(vm.name, timeout_s=1.0)  # stopped: the stored definition only
    backend.set_owner(vm.name, "action")
    seen = _owner_seen_afresh(vm.name)
    assert (seen["defined"], seen["metadata"]) == ("action", "action")

    # Re-owned twice, delete still finds every volume it composed.
    backend.delete(vm.name)
    assert not {v.partition("/")[2] for v in before.volumes} & volumes(backend, test_pool)


def test_set_owner_leaves_a_foreign_domain_alone(backend: LibvirtBackend) -> None:
    backend.conn.defineXML(
        """<domain type='qemu'><name>vmhost-test-foreign-owner</name>
      <memory unit='MiB'>64</memory><vcpu placement='static'>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os></domain>"""
    )
    with pytest.raises(VmHostError, match="not created by vm-host"):
        backend.set_owner("vmhost-test-foreign-owner", "action")
    xml = backend.conn.lookupByName("vmhost-test-foreign-owner").XMLDesc(0)
    assert "<metadata" not in xml

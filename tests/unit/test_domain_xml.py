"""Domain XML rendering: the exact elements libvirt gets for each kind of VM.

Every rendered document is parsed back with ElementTree and, where libvirt's schema validator
is installed, validated against libvirt's own domain schema.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
import yaml
from mime import mime_parts
from xml_schema import assert_valid

from vmhost.backends.libvirt import (
    METADATA_NS,
    TEMPLATES_DIR,
    LibvirtBackend,
    VirtualFunction,
    Volume,
    _state,
    disabled_cpu_features,
    disk_sources,
    domain_context,
    generate_mac,
    parse_proc_arp,
    placement_from_domain_xml,
    record_from_domain_xml,
    record_from_metadata,
    render_template,
    seed_documents,
)
from vmhost.model import (
    AttachmentKind,
    CellPlacement,
    DiskSpec,
    InvalidRequestError,
    NicAttachment,
    Placement,
    VmHostError,
    VmSpec,
    VmState,
)

ROOT = Volume("vm-host", "vm1-root", "/var/lib/vm-host/images/vm1-root")
DATA = Volume("fast", "vm1-data", "/srv/fast/vm1-data")
SEED = Volume("vm-host", "vm1-seed", "/var/lib/vm-host/images/vm1-seed", "raw")
UUID = "8f0c2c52-4e5e-4b8a-9a39-2f8d1f0f6f01"


def spec(**kw: object) -> VmSpec:
    base: dict[str, object] = {
        "name": "vm1",
        "vcpus": 2,
        "memory_mib": 2048,
        "disks": (DiskSpec("root", 10),),
        "owner": "relation:4:maas",
        "request_id": "req-1",
    }
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def render(
    vm: VmSpec,
    placement: Placement,
    nics: tuple[NicAttachment, ...] = (),
    disks: tuple[Volume, ...] = (ROOT,),
    seed: Volume | None = None,
    tmp_path: Path | None = None,
) -> ET.Element:
    context = domain_context(
        vm,
        placement,
        nics,
        disks,
        seed,
        uuid=UUID,
        cpu_disabled_features=disabled_cpu_features("x86_64", frozenset()),
    )
    xml = render_template(TEMPLATES_DIR, "domain.xml.j2", context)
    if tmp_path is not None:
        assert_valid(xml, tmp_path)
    return ET.fromstring(xml)


def pins(root: ET.Element) -> dict[int, str]:
    return {int(p.get("vcpu", "")): p.get("cpuset", "") for p in root.findall("cputune/vcpupin")}


def test_pinned_one_cell(tmp_path: Path) -> None:
    placement = Placement(
        vcpus=2,
        memory_mib=2048,
        cells=(CellPlacement(host_node=1, vcpus=2, memory_mib=2048, cpus=(5, 4)),),
        emulator_cpus=(0, 1),
    )
    root = render(spec(pinned_count=2), placement, tmp_path=tmp_path)

    assert root.get("type") == "kvm"
    assert root.findtext("name") == "vm1"
    vcpu = root.find("vcpu")
    assert vcpu is not None
    assert vcpu.get("placement") == "static"
    assert vcpu.text == "2"
    assert pins(root) == {0: "5", 1: "4"}
    emulatorpin = root.find("cputune/emulatorpin")
    assert emulatorpin is not None
    assert emulatorpin.get("cpuset") == "0-1"
    memory = root.find("numatune/memory")
    assert memory is not None
    assert (memory.get("mode"), memory.get("nodeset")) == ("strict", "1")
    memnodes = [(m.get("cellid"), m.get("mode"), m.get("nodeset")) for m in root.iter("memnode")]
    assert memnodes == [("0", "strict", "1")]
    cells = [
        (c.get("id"), c.get("cpus"), c.get("memory"), c.get("unit"))
        for c in root.findall("cpu/numa/cell")
    ]
    assert cells == [("0", "0-1", "2048", "MiB")]
    cpu = root.find("cpu")
    assert cpu is not None
    assert cpu.get("mode") == "host-passthrough"
    topology = root.find("cpu/topology")
    assert topology is not None
    assert (topology.get("sockets"), topology.get("cores"), topology.get("threads")) == (
        "1",
        "2",
        "1",
    )
    assert root.find("memoryBacking") is None
    assert root.findtext("memory") == str(2048 * 1024)


def test_pinned_two_cells(tmp_path: Path) -> None:
    placement = Placement(
        vcpus=4,
        memory_mib=4096,
        cells=(
            CellPlacement(host_node=0, vcpus=2, memory_mib=2048, cpus=(2, 14)),
            CellPlacement(host_node=1, vcpus=2, memory_mib=2048, cpus=(8, 20)),
        ),
    )
    root = render(
        spec(vcpus=4, memory_mib=4096, pinned_count=4, numa_nodes=2), placement, tmp_path=tmp_path
    )

    assert pins(root) == {0: "2", 1: "14", 2: "8", 3: "20"}
    assert set(pins(root).values()) == {str(c) for c in placement.pinned_cpus}
    assert root.find("cputune/emulatorpin") is None
    memory = root.find("numatune/memory")
    assert memory is not None
    assert memory.get("nodeset") == "0-1"
    assert [(m.get("cellid"), m.get("nodeset")) for m in root.iter("memnode")] == [
        ("0", "0"),
        ("1", "1"),
    ]
    assert [
        (c.get("id"), c.get("cpus"), c.get("memory")) for c in root.findall("cpu/numa/cell")
    ] == [("0", "0-1", "2048"), ("1", "2-3", "2048")]


@pytest.mark.parametrize(("size_kib", "pages_per_cell"), [(2048, 512), (1048576, 1)])
def test_hugepages_two_cells(tmp_path: Path, size_kib: int, pages_per_cell: int) -> None:
    cell_mib = pages_per_cell * size_kib // 1024
    placement = Placement(
        vcpus=2,
        memory_mib=2 * cell_mib,
        cells=tuple(
            CellPlacement(
                host_node=n,
                vcpus=1,
                memory_mib=cell_mib,
                hugepage_size_kib=size_kib,
                hugepages=pages_per_cell,
            )
            for n in (0, 1)
        ),
    )
    root = render(spec(memory_mib=2 * cell_mib), placement, tmp_path=tmp_path)

    page_elements = root.findall("memoryBacking/hugepages/page")
    assert [(p.get("size"), p.get("unit"), p.get("nodeset")) for p in page_elements] == [
        (str(size_kib), "KiB", "0-1")
    ]
    assert root.find("cputune") is None  # shared vCPUs, huge page memory
    assert [(m.get("cellid"), m.get("nodeset")) for m in root.iter("memnode")] == [
        ("0", "0"),
        ("1", "1"),
    ]
    assert [c.get("memory") for c in root.findall("cpu/numa/cell")] == [str(cell_mib)] * 2


def test_hugepages_one_cell_2m(tmp_path: Path) -> None:
    placement = Placement(
        vcpus=1,
        memory_mib=256,
        cells=(CellPlacement(0, 1, 256, cpus=(1,), hugepage_size_kib=2048, hugepages=128),),
    )
    root = render(
        spec(vcpus=1, memory_mib=256, pinned_count=1, hugepages="2M"), placement, tmp_path=tmp_path
    )
    page = root.find("memoryBacking/hugepages/page")
    assert page is not None
    assert (page.get("size"), page.get("unit"), page.get("nodeset")) == ("2048", "KiB", "0")
    assert pins(root) == {0: "1"}


def test_shared_vm_has_no_pinning_or_numa(tmp_path: Path) -> None:
    root = render(spec(vcpus=3), Placement(vcpus=3, memory_mib=2048), tmp_path=tmp_path)
    for path in ("cputune", "numatune", "cpu/numa", "memoryBacking"):
        assert root.find(path) is None, path
    topology = root.find("cpu/topology")
    assert topology is not None
    assert topology.get("cores") == "3"


def test_nics_bridge_and_macvtap(tmp_path: Path) -> None:
    nics = (
        NicAttachment("eth0", AttachmentKind.BRIDGE, "br-oam", mac="52:54:00:00:00:01"),
        NicAttachment("data", AttachmentKind.DIRECT, "enp5s0", mac="52:54:00:00:00:02"),
    )
    root = render(spec(), Placement(vcpus=2, memory_mib=2048), nics, tmp_path=tmp_path)
    interfaces = root.findall("devices/interface")
    assert [i.get("type") for i in interfaces] == ["bridge", "direct"]
    bridge_source = interfaces[0].find("source")
    direct_source = interfaces[1].find("source")
    assert bridge_source is not None
    assert direct_source is not None
    assert bridge_source.attrib == {"bridge": "br-oam"}
    assert direct_source.attrib == {"dev": "enp5s0", "mode": "bridge"}
    assert [i.find("mac").get("address") for i in interfaces] == [  # type: ignore[union-attr]
        "52:54:00:00:00:01",
        "52:54:00:00:00:02",
    ]
    assert [i.find("model").get("type") for i in interfaces] == ["virtio"] * 2  # type: ignore[union-attr]
    ledger = root.findall(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}interface")
    assert [(n.get("label"), n.get("attached-to")) for n in ledger] == [
        ("eth0", "br-oam"),
        ("data", "enp5s0"),
    ]


def test_sriov_nic_without_a_chosen_vf_is_refused() -> None:
    # The VF is chosen against the host's domains before rendering; a context without one
    # (or with a VF of another PF) would pass nothing through, so it is an error.
    nic = NicAttachment("vf0", AttachmentKind.HOSTDEV, "enp5s0f0", mac="52:54:00:00:00:03")
    with pytest.raises(VmHostError, match=r"no VF of enp5s0f0"):
        domain_context(
            spec(), Placement(vcpus=2, memory_mib=2048), (nic,), (ROOT,), None, uuid=UUID
        )
    other = VirtualFunction("enp6s0f0", 0, "0000:06:02.0")
    with pytest.raises(VmHostError, match=r"no VF of enp5s0f0"):
        domain_context(
            spec(),
            Placement(vcpus=2, memory_mib=2048),
            (nic,),
            (ROOT,),
            None,
            uuid=UUID,
            vfs={"vf0": other},
        )


def test_boot_order_without_and_with_image(tmp_path: Path) -> None:
    no_image = render(spec(), Placement(vcpus=2, memory_mib=2048), tmp_path=tmp_path)
    assert [b.get("dev") for b in no_image.findall("os/boot")] == ["network", "hd"]
    with_image = render(
        spec(image="/srv/images/noble.img"), Placement(vcpus=2, memory_mib=2048), tmp_path=tmp_path
    )
    assert [b.get("dev") for b in with_image.findall("os/boot")] == ["hd"]


def test_disks_are_virtio_and_seed_is_a_cdrom(tmp_path: Path) -> None:
    root = render(
        spec(),
        Placement(vcpus=2, memory_mib=2048),
        disks=(ROOT, DATA),
        seed=SEED,
        tmp_path=tmp_path,
    )
    disks = root.findall("devices/disk")
    assert [
        (d.get("device"), d.find("target").get("dev"), d.find("target").get("bus"))  # type: ignore[union-attr]
        for d in disks
    ] == [("disk", "vda", "virtio"), ("disk", "vdb", "virtio"), ("cdrom", "sda", "sata")]
    assert [d.find("source").get("file") for d in disks] == [ROOT.path, DATA.path, SEED.path]  # type: ignore[union-attr]
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "qcow2", "raw"]  # type: ignore[union-attr]
    assert disks[2].find("readonly") is not None
    volumes = root.findall(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}volume")
    assert [(v.get("pool"), v.get("name")) for v in volumes] == [
        ("vm-host", "vm1-root"),
        ("fast", "vm1-data"),
        ("vm-host", "vm1-seed"),
    ]


def test_serial_console_and_kvm_cpu_quirk(tmp_path: Path) -> None:
    root = render(spec(), Placement(vcpus=2, memory_mib=2048), tmp_path=tmp_path)
    assert root.find("devices/serial") is not None
    console = root.find("devices/console")
    assert console is not None
    assert console.get("type") == "pty"
    feature = root.find("cpu/feature")
    assert feature is not None
    assert feature.attrib == {"policy": "disable", "name": "arch-capabilities"}
    assert disabled_cpu_features("x86_64", frozenset({"arch_capabilities"})) == []
    assert disabled_cpu_features("aarch64", frozenset()) == []


def test_metadata_round_trips_and_is_escaped(tmp_path: Path) -> None:
    placement = Placement(
        vcpus=2,
        memory_mib=2048,
        cells=(CellPlacement(0, 2, 2048, cpus=(3, 1), hugepage_size_kib=2048, hugepages=1024),),
        emulator_cpus=(0,),
    )
    owner = "relation:7:<&\"evil'>"
    root = render(spec(owner=owner, request_id="r<&>"), placement, tmp_path=tmp_path)
    record = record_from_domain_xml(ET.tostring(root, encoding="unicode"), VmState.RUNNING)

    assert record.managed
    assert record.owner == owner
    assert record.request_id == "r<&>"
    assert record.placement == placement
    assert record.uuid == UUID
    assert record.volumes == ("vm-host/vm1-root",)
    assert len(record.spec_hash) == 16
    assert "evil" in (root.findtext("title") or "")


def test_metadata_records_each_nics_space_and_subnet(tmp_path: Path) -> None:
    nics = (
        NicAttachment(
            "eth0",
            AttachmentKind.BRIDGE,
            "br0",
            mac="52:54:00:00:00:01",
            space="data",
            subnet="10.0.5.0/24",
        ),
        NicAttachment("eth1", AttachmentKind.BRIDGE, "br1", mac="52:54:00:00:00:02"),
    )
    root = render(spec(), Placement(vcpus=2, memory_mib=2048), nics, tmp_path=tmp_path)
    record = record_from_domain_xml(ET.tostring(root, encoding="unicode"), VmState.RUNNING)
    assert record.interfaces == (
        {
            "label": "eth0",
            "mac": "52:54:00:00:00:01",
            "attached-to": "br0",
            "space": "data",
            "subnet": "10.0.5.0/24",
        },
        # Unknown (and so, in a VM composed before they were recorded, absent): no keys.
        {"label": "eth1", "mac": "52:54:00:00:00:02", "attached-to": "br1"},
    )


@pytest.mark.parametrize(
    "name", ["vm<1>", "vm&1", "vm'1", 'vm"1', "Vm1", "-vm", "vm/../etc", "a" * 64, ""]
)
def test_bad_names_never_reach_the_template(name: str) -> None:
    # A backend whose URI cannot even connect: the name must be refused before any connection.
    backend = LibvirtBackend(uri="qemu+unix:///system?socket=/nonexistent/sock")
    with pytest.raises(InvalidRequestError) as error:
        backend.compose(spec(name=name), Placement(vcpus=2, memory_mib=2048), (), "vm-host")
    assert error.value.field == "name"


def test_bad_volume_pool_and_bridge_names_are_refused() -> None:
    backend = LibvirtBackend(uri="qemu+unix:///system?socket=/nonexistent/sock")
    placement = Placement(vcpus=2, memory_mib=2048)
    with pytest.raises(InvalidRequestError, match=r"storage\[x y\]\.label"):
        backend.compose(spec(disks=(DiskSpec("x y", 1),)), placement, (), "vm-host")
    with pytest.raises(InvalidRequestError, match=r"storage\[root\]\.pool"):
        backend.compose(spec(disks=(DiskSpec("root", 1, "../etc"),)), placement, (), "vm-host")
    bad_bridge = NicAttachment("eth0", AttachmentKind.BRIDGE, "br0'><x")
    with pytest.raises(InvalidRequestError, match=r"interfaces\[eth0\]\.source"):
        backend.compose(spec(), placement, (bad_bridge,), "vm-host")
    bad_pf = NicAttachment("eth0", AttachmentKind.HOSTDEV, "enp5s0f0/../x")
    with pytest.raises(InvalidRequestError, match=r"interfaces\[eth0\]\.source.*SR-IOV PF"):
        backend.compose(spec(), placement, (bad_pf,), "vm-host")
    for vlan in (0, 4095, -1):
        bad_vlan = NicAttachment("eth0", AttachmentKind.HOSTDEV, "enp5s0f0", vlan=vlan)
        with pytest.raises(InvalidRequestError, match=r"interfaces\[eth0\]\.vlan.*1-4094"):
            backend.compose(spec(), placement, (bad_vlan,), "vm-host")
    with pytest.raises(InvalidRequestError, match="seed"):
        backend.compose(spec(disks=(DiskSpec("seed", 1),)), placement, (), "vm-host")


def test_a_bad_image_name_is_refused_before_connecting(tmp_path: Path) -> None:
    backend = LibvirtBackend(uri="qemu+unix:///system?socket=/nonexistent/sock")
    placement = Placement(vcpus=2, memory_mib=2048)
    for name in ("local:Bad Name", "ubuntu@24", "jammy-vm"):
        with pytest.raises(InvalidRequestError, match="image"):
            backend.compose(spec(image=name), placement, (), "vm-host")


def test_a_host_path_never_reaches_the_disk_even_past_the_request_checks(tmp_path: Path) -> None:
    # Defence in depth: a spec built without constraints.build_spec still cannot name a file.
    backend = LibvirtBackend(uri="qemu+unix:///system?socket=/nonexistent/sock")
    placement = Placement(vcpus=2, memory_mib=2048)
    for path in ("/etc/shadow", str(tmp_path / "x.qcow2"), "local:../etc/shadow"):
        with pytest.raises(InvalidRequestError, match="image"):
            backend.compose(spec(image=path), placement, (), "vm-host")


def test_foreign_domain_placement_is_reconstructed() -> None:
    xml = """<domain type='kvm'><name>legacy</name><uuid>u</uuid>
      <memory unit='KiB'>4194304</memory><currentMemory unit='KiB'>4194304</currentMemory>
      <memoryBacking><hugepages><page size='2' unit='M'/></hugepages></memoryBacking>
      <vcpu placement='static'>2</vcpu>
      <cputune><vcpupin vcpu='0' cpuset='6'/><vcpupin vcpu='1' cpuset='7'/>
        <emulatorpin cpuset='0-1'/></cputune>
      <numatune><memory mode='strict' nodeset='1'/></numatune>
      <devices><interface type='bridge'><mac address='52:54:00:aa:bb:cc'/>
        <source bridge='br0'/></interface></devices></domain>"""
    record = record_from_domain_xml(xml, VmState.STOPPED)
    assert not record.managed
    assert record.placement == Placement(
        vcpus=2,
        memory_mib=4096,
        cells=(CellPlacement(1, 2, 4096, cpus=(6, 7), hugepage_size_kib=2048, hugepages=2048),),
        emulator_cpus=(0, 1),
    )
    assert record.interfaces == (
        {"label": "net0", "mac": "52:54:00:aa:bb:cc", "attached-to": "br0"},
    )


def test_foreign_domain_with_loose_pins_counts_as_shared() -> None:
    root = ET.fromstring(
        "<domain><vcpu>2</vcpu><memory unit='MiB'>512</memory>"
        "<cputune><vcpupin vcpu='0' cpuset='0-1'/><vcpupin vcpu='1' cpuset='0-1'/></cputune>"
        "</domain>"
    )
    assert placement_from_domain_xml(root, None) == Placement(vcpus=2, memory_mib=512)


def test_foreign_domain_with_guest_cells_maps_memnodes() -> None:
    root = ET.fromstring(
        "<domain><vcpu>4</vcpu><memory unit='GiB'>4</memory>"
        "<cputune><vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='3'/>"
        "<vcpupin vcpu='2' cpuset='10'/><vcpupin vcpu='3' cpuset='11'/></cputune>"
        "<numatune><memory mode='strict' nodeset='0-1'/>"
        "<memnode cellid='0' mode='strict' nodeset='0'/>"
        "<memnode cellid='1' mode='strict' nodeset='1'/></numatune>"
        "<cpu><numa><cell id='0' cpus='0-1' memory='2' unit='GiB'/>"
        "<cell id='1' cpus='2-3' memory='2048' unit='MiB'/></numa></cpu></domain>"
    )
    placement = placement_from_domain_xml(root, None)
    assert placement.cells == (
        CellPlacement(0, 2, 2048, cpus=(2, 3)),
        CellPlacement(1, 2, 2048, cpus=(10, 11)),
    )


def test_seed_documents() -> None:
    nics = (
        NicAttachment(
            "eth0", AttachmentKind.BRIDGE, "br0", mac="52:54:00:00:00:01", ip="10.0.5.9/24"
        ),
        NicAttachment("data", AttachmentKind.BRIDGE, "br1", mac="52:54:00:00:00:02"),
    )
    assert seed_documents(spec(), (), "id") is None
    docs = seed_documents(
        spec(
            user_data="#cloud-config\npackages: [htop]\n", ssh_public_keys=("ssh-ed25519 AAA k",)
        ),
        nics,
        "iid-1",
    )
    assert docs is not None
    # The requester's #cloud-config first, as sent; vm-host's own (hostname, keys) last.
    (theirs, ours) = mime_parts(docs["user-data"])
    assert theirs[:2] == ("text/cloud-config", "#cloud-config\npackages: [htop]\n")
    assert ours[0] == "text/cloud-config"
    assert yaml.safe_load(ours[1]) == {
        "hostname": "vm1",
        "ssh_authorized_keys": ["ssh-ed25519 AAA k"],
    }
    network = yaml.safe_load(docs["network-config"])
    assert network["ethernets"]["eth0"] == {
        "match": {"macaddress": "52:54:00:00:00:01"},
        "set-name": "eth0",
        "addresses": ["10.0.5.9/24"],
    }
    assert network["ethernets"]["data"]["dhcp4"] is True
    assert yaml.safe_load(docs["meta-data"]) == {"instance-id": "iid-1", "local-hostname": "vm1"}
    # A script is no longer refused beside keys: it is a part of its own, the keys in vm-host's.
    docs = seed_documents(spec(user_data="#!/bin/sh\ntrue\n", ssh_public_keys=("k",)), (), "x")
    assert docs is not None
    (script, ours) = mime_parts(docs["user-data"])
    assert script[:2] == ("text/x-shellscript", "#!/bin/sh\ntrue\n")
    assert yaml.safe_load(ours[1])["ssh_authorized_keys"] == ["k"]


def test_generated_macs_are_stable_and_local() -> None:
    mac = generate_mac("vm1", "eth0")
    assert mac == generate_mac("vm1", "eth0")
    assert mac != generate_mac("vm1", "eth1")
    assert mac.startswith("52:54:00:")
    assert len(mac.split(":")) == 6


@pytest.mark.parametrize(
    ("template", "schema", "context"),
    [
        (
            "storage-pool.xml.j2",
            "storagepool",
            {"name": "vm-host", "path": "/var/lib/vm-host/images"},
        ),
        (
            "storage-volume.xml.j2",
            "storagevol",
            {"name": "vm1-root", "capacity_bytes": 10 * 10**9, "format": "qcow2"},
        ),
        (
            "storage-volume.xml.j2",
            "storagevol",
            {
                "name": "vm1-root",
                "capacity_bytes": 10 * 10**9,
                "format": "qcow2",
                "backing_path": "/var/lib/vm-host/image-cache/ubuntu-24.04-amd64_1_"
                + "a" * 64
                + ".qcow2",
            },
        ),
    ],
)
def test_storage_templates(tmp_path: Path, template: str, schema: str, context: dict) -> None:
    xml = render_template(TEMPLATES_DIR, template, context)
    root = ET.fromstring(xml)
    assert root.findtext("name") == context["name"]
    assert_valid(xml, tmp_path, schema)


@pytest.mark.parametrize(
    ("code", "reason", "state", "phrase"),
    [
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR, VmState.FAILED, "I/O"),
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER, VmState.FAILED, "resume"),
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_MIGRATION, VmState.RUNNING, ""),
        (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_STARTING_UP, VmState.RUNNING, ""),
        (libvirt.VIR_DOMAIN_CRASHED, 0, VmState.FAILED, "crashed"),
        (libvirt.VIR_DOMAIN_RUNNING, 1, VmState.RUNNING, ""),
        (libvirt.VIR_DOMAIN_SHUTOFF, 1, VmState.STOPPED, ""),
    ],
)
def test_domain_states_map_paused_and_crashed_to_failed_with_why(code, reason, state, phrase):
    got, why = _state(code, reason)
    assert got == state
    assert phrase in why
    assert bool(why) == (state == VmState.FAILED)


@pytest.mark.parametrize(
    "placement",
    [
        "",
        "<v:placement vcpus='two' memory-mib='256'/>",
        "<v:placement vcpus='1' memory-mib='256'><v:cell host-node='0' vcpus='1' memory-mib='256'"
        " cpus='1-2'/></v:placement>",
    ],
)
def test_bad_vm_host_metadata_is_an_unmanaged_record_with_the_reason(placement: str):
    xml = f"""<domain type='qemu'><name>copy</name><uuid>u-1</uuid>
      <metadata><v:vm xmlns:v='{METADATA_NS}'><v:owner>relation:7:pg</v:owner>{placement}
      </v:vm></metadata>
      <memory unit='MiB'>256</memory><vcpu>1</vcpu></domain>"""
    record = record_from_domain_xml(xml, VmState.RUNNING)
    assert not record.managed
    assert record.owner == ""
    assert "metadata is unreadable" in record.problem
    assert record.placement.memory_mib == 256


def test_unreadable_domain_xml_is_still_listed_by_name():
    xml = (
        "<domain type='qemu'><name>odd</name><memory unit='MiB'>256</memory>"
        "<vcpu>two</vcpu></domain>"
    )
    record = record_from_domain_xml(xml, VmState.STOPPED)
    assert record.name == "odd"
    assert not record.managed
    assert "unreadable" in record.problem


def test_record_from_metadata_matches_the_whole_domain_xml() -> None:
    # libvirtd returns the metadata element on its own and without its namespace; the record
    # built from it alone is the one the whole domain XML gives.
    placement = Placement(
        vcpus=2,
        memory_mib=2048,
        cells=(CellPlacement(host_node=1, vcpus=2, memory_mib=2048, cpus=(3, 2)),),
        emulator_cpus=(0,),
    )
    context = domain_context(spec(), placement, (), (ROOT,), SEED, uuid=UUID)
    xml = render_template(TEMPLATES_DIR, "domain.xml.j2", context)
    whole = record_from_domain_xml(xml, VmState.STOPPED)
    vm = ET.fromstring(xml).find(f"metadata/{{{METADATA_NS}}}vm")
    assert vm is not None
    for element in vm.iter():
        element.tag = element.tag.split("}")[-1]
    bare = ET.tostring(vm, encoding="unicode")
    assert "charmhub.io" not in bare
    alone = record_from_metadata("vm1", UUID, bare, VmState.STOPPED)
    assert alone == whole
    assert alone.managed
    assert alone.owner == "relation:4:maas"
    assert alone.placement.cells[0].cpus == (3, 2)


def test_metadata_records_the_domain_uuid_and_a_copy_is_not_ours(tmp_path: Path) -> None:
    placement = Placement(vcpus=2, memory_mib=2048)
    xml = ET.tostring(render(spec(), placement, tmp_path=tmp_path), encoding="unicode")
    assert f"<ns0:domain-uuid>{UUID}</ns0:domain-uuid>" in xml
    assert record_from_domain_xml(xml, VmState.RUNNING).managed

    # virt-clone and dumpxml + define give the copy a new UUID but keep <metadata>.
    copy = xml.replace(f"<uuid>{UUID}</uuid>", "<uuid>0b5a4c7e-1d2f-4c3b-8a9e-5f6d7e8f9a0b</uuid>")
    record = record_from_domain_xml(copy, VmState.RUNNING)
    assert not record.managed
    assert record.owner == ""
    assert record.volumes == ()
    assert "it is a copy" in record.problem
    assert UUID in record.problem
    assert record.placement.vcpus == 2  # its resources still count


def test_metadata_without_a_domain_uuid_is_not_ours(tmp_path: Path) -> None:
    xml = ET.tostring(render(spec(), Placement(vcpus=1, memory_mib=512)), encoding="unicode")
    forged = xml.replace(f"<ns0:domain-uuid>{UUID}</ns0:domain-uuid>", "")
    assert "domain-uuid" not in forged
    record = record_from_domain_xml(forged, VmState.RUNNING)
    assert not record.managed
    assert "names no domain UUID" in record.problem


def test_disk_sources_name_files_devices_and_pool_volumes() -> None:
    root = ET.fromstring(
        """<domain><devices>
        <disk type='file'><source file='/srv/a/../a/vm1-root'/></disk>
        <disk type='block'><source dev='/dev/vg/vm1-data'/></disk>
        <disk type='volume'><source pool='fast' volume='vm1-x'/></disk>
        <disk type='network'><source protocol='nbd' name='x'/></disk>
        </devices></domain>"""
    )
    assert disk_sources(root) == {"/srv/a/vm1-root", "/dev/vg/vm1-data", "fast/vm1-x"}


def test_proc_arp_gives_complete_entries_by_mac() -> None:
    text = (
        "IP address       HW type     Flags       HW address            Mask     Device\n"
        "10.231.77.150    0x1         0x2         52:54:00:AB:CD:EF     *        vmhost-test-nat\n"
        "10.231.77.151    0x1         0x0         00:00:00:00:00:00     *        vmhost-test-nat\n"
        "garbage\n"
    )
    assert parse_proc_arp(text) == {"52:54:00:ab:cd:ef": ["10.231.77.150"]}

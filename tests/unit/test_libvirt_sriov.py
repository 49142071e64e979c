"""SR-IOV VF NICs in the libvirt backend: VFs from sysfs, free-VF choice, domain XML, ledger.

sysfs is a fake tree laid out as the kernel lays it out (class/net/<pf>/device -> the PF's PCI
device, virtfn<N> -> the VF's PCI device, physfn back to the PF, net/<pf> under the PF).
Rendered domains are validated against libvirt's own schema with virt-xml-validate.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from xml_schema import assert_valid

from vmhost.backends.libvirt import (
    METADATA_NS,
    TEMPLATES_DIR,
    LibvirtBackend,
    VirtualFunction,
    Volume,
    choose_vfs,
    domain_context,
    hostdev_addresses,
    known_vfs,
    list_vfs,
    pci_address_attrs,
    record_from_domain_xml,
    render_template,
    vf_parent,
    virtual_functions,
)
from vmhost.model import (
    AttachmentKind,
    DiskSpec,
    NicAttachment,
    Placement,
    VfAssignment,
    VmHostError,
    VmSpec,
    VmState,
)

PF = "enp59s0f0"
PF_ADDRESS = "0000:3b:00.0"
ROOT = Volume("vm-host", "vm1-root", "/var/lib/vm-host/images/vm1-root")
UUID = "8f0c2c52-4e5e-4b8a-9a39-2f8d1f0f6f01"


def vf_address(index: int) -> str:
    """The address the kernel gives VF `index` of PF 0000:3b:00.0 with 8 functions a slot."""
    return f"0000:3b:{2 + index // 8:02x}.{index % 8}"


def fake_pf(sysfs: Path, pf: str, pf_address: str, vfs: list[str]) -> None:
    """Add a PF with its VFs to a fake sysfs tree, with relative links as the kernel has them."""
    devices = sysfs / "bus" / "pci" / "devices"
    pf_dev = devices / pf_address
    (pf_dev / "net" / pf).mkdir(parents=True)
    (pf_dev / "sriov_totalvfs").write_text(f"{len(vfs)}\n")
    (pf_dev / "sriov_numvfs").write_text(f"{len(vfs)}\n")
    net = sysfs / "class" / "net" / pf
    net.mkdir(parents=True)
    os.symlink(os.path.relpath(pf_dev, net), net / "device")
    for index, address in enumerate(vfs):
        vf_dev = devices / address
        vf_dev.mkdir()
        (vf_dev / "vendor").write_text("0x8086\n")
        os.symlink(f"../{address}", pf_dev / f"virtfn{index}")
        os.symlink(f"../{pf_address}", vf_dev / "physfn")


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """A PF with 12 VFs (so virtfn10 sorts before virtfn2 by name), a plain NIC, a bridge."""
    root = tmp_path / "sys"
    fake_pf(root, PF, PF_ADDRESS, [vf_address(i) for i in range(12)])
    plain = root / "bus" / "pci" / "devices" / "0000:05:00.0"
    (plain / "net" / "enp5s0").mkdir(parents=True)
    (root / "class" / "net" / "enp5s0").mkdir()
    os.symlink(plain, root / "class" / "net" / "enp5s0" / "device")
    (root / "class" / "net" / "br0" / "bridge").mkdir(parents=True)
    return root


def pci(address: str) -> str:
    """A libvirt `<address type='pci'>` element for a host PCI address."""
    attrs = pci_address_attrs(address)
    return (
        f"<address type='pci' domain='{attrs['domain']}' bus='{attrs['bus']}' "
        f"slot='{attrs['slot']}' function='{attrs['function']}'/>"
    )


def foreign_domain(name: str, devices: str) -> str:
    return (
        f"<domain type='kvm'><name>{name}</name><uuid>{UUID}</uuid>"
        "<memory unit='KiB'>1048576</memory><vcpu>1</vcpu>"
        f"<devices>{devices}</devices></domain>"
    )


def hostdev(address: str) -> str:
    """A plain `<hostdev>` as virsh attach-device writes it, with a guest address too."""
    return (
        f"<hostdev mode='subsystem' type='pci' managed='yes'><source>{pci(address)}</source>"
        "<address type='pci' domain='0x0000' bus='0x07' slot='0x00' function='0x0'/></hostdev>"
    )


def hostdev_interface(address: str, mac: str = "52:54:00:aa:bb:01") -> str:
    return (
        f"<interface type='hostdev' managed='yes'><mac address='{mac}'/>"
        f"<source>{pci(address)}</source></interface>"
    )


def spec(**kw: Any) -> VmSpec:
    base: dict[str, Any] = {
        "name": "vm1",
        "vcpus": 2,
        "memory_mib": 2048,
        "disks": (DiskSpec("root", 10),),
        "owner": "relation:4:maas",
        "request_id": "req-1",
    }
    base.update(kw)
    return VmSpec(**base)


def sriov_nic(
    label: str = "fast", vlan: int | None = None, mac: str | None = None
) -> NicAttachment:
    return NicAttachment(label, AttachmentKind.HOSTDEV, PF, mac=mac, vlan=vlan)


def render(
    nics: tuple[NicAttachment, ...],
    vfs: dict[str, VirtualFunction],
    tmp_path: Path,
    placement: Placement | None = None,
) -> str:
    context = domain_context(
        spec(),
        placement or Placement(vcpus=2, memory_mib=2048),
        nics,
        (ROOT,),
        None,
        uuid=UUID,
        vfs=vfs,
    )
    xml = render_template(TEMPLATES_DIR, "domain.xml.j2", context)
    assert_valid(xml, tmp_path)
    return xml


# -- VFs from sysfs


def test_vfs_are_listed_in_index_order(sysfs: Path) -> None:
    assert list_vfs(sysfs, PF) == [vf_address(i) for i in range(12)]
    assert list_vfs(sysfs, PF)[:3] == ["0000:3b:02.0", "0000:3b:02.1", "0000:3b:02.2"]
    assert list_vfs(sysfs, PF)[8:10] == ["0000:3b:03.0", "0000:3b:03.1"]
    vfs = virtual_functions(sysfs, PF)
    assert [vf.index for vf in vfs] == list(range(12))
    assert vfs[3] == VirtualFunction(PF, 3, "0000:3b:02.3")
    assert vfs[3].description == "enp59s0f0/vf3 (0000:3b:02.3)"


def test_nics_without_vfs_have_none(sysfs: Path) -> None:
    assert list_vfs(sysfs, "enp5s0") == []
    assert list_vfs(sysfs, "br0") == []
    assert list_vfs(sysfs, "nope0") == []
    assert list_vfs(sysfs.parent / "no-sysfs", PF) == []


def test_vf_parent_follows_physfn(sysfs: Path) -> None:
    assert vf_parent(sysfs, vf_address(5)) == PF
    assert vf_parent(sysfs, "0000:05:00.0") is None  # a plain device, no physfn
    assert vf_parent(sysfs, "0000:99:00.0") is None  # no such device
    found = known_vfs(sysfs, {vf_address(1), vf_address(10), "0000:05:00.0"})
    assert found == {
        vf_address(1): VirtualFunction(PF, 1, vf_address(1)),
        vf_address(10): VirtualFunction(PF, 10, vf_address(10)),
    }


def test_pci_address_attrs() -> None:
    assert pci_address_attrs("0000:3b:02.1") == {
        "domain": "0x0000",
        "bus": "0x3b",
        "slot": "0x02",
        "function": "0x1",
    }
    for bad in ("3b:02.1", "0000:3b:02.8", "0000:3b:02", "0000:3b:02.1'/><x"):
        with pytest.raises(VmHostError, match="not a PCI address"):
            pci_address_attrs(bad)


# -- which VFs domains hold


def test_hostdev_addresses_reads_both_forms_and_only_the_source() -> None:
    usb = (
        "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1234'/>"
        "<product id='0xbeef'/></source></hostdev>"
    )
    bridge = "<interface type='bridge'><source bridge='br0'/></interface>"
    xml = foreign_domain(
        "other", hostdev(vf_address(0)) + hostdev_interface(vf_address(9)) + usb + bridge
    )
    # The guest-side address 0000:07:00.0 of the hostdev is not a host device.
    assert hostdev_addresses(xml) == {vf_address(0), vf_address(9)}
    # libvirt may write decimal or short hex; the address is normalised.
    odd = "<address type='pci' domain='0' bus='59' slot='0x2' function='1'/>"
    xml = foreign_domain(
        "odd", f"<hostdev mode='subsystem' type='pci'><source>{odd}</source></hostdev>"
    )
    assert hostdev_addresses(xml) == {"0000:3b:02.1"}


def test_the_lowest_free_vf_is_chosen(sysfs: Path) -> None:
    domains = [
        foreign_domain("a", hostdev(vf_address(0))),
        foreign_domain("b", hostdev_interface(vf_address(1)) + hostdev_interface(vf_address(3))),
        foreign_domain("c", "<interface type='bridge'><source bridge='br0'/></interface>"),
    ]
    chosen = choose_vfs(sysfs, (sriov_nic(),), domains)
    assert chosen == {"fast": VirtualFunction(PF, 2, vf_address(2))}
    # Two NICs on the same PF get different VFs, still lowest first; other kinds get none.
    bridge = NicAttachment("eth0", AttachmentKind.BRIDGE, "br0")
    chosen = choose_vfs(sysfs, (bridge, sriov_nic("a"), sriov_nic("b")), domains)
    assert chosen == {
        "a": VirtualFunction(PF, 2, vf_address(2)),
        "b": VirtualFunction(PF, 4, vf_address(4)),
    }
    assert choose_vfs(sysfs, (sriov_nic(),), []) == {"fast": VirtualFunction(PF, 0, vf_address(0))}


def test_no_free_vf_names_the_pf_and_its_vf_count(sysfs: Path) -> None:
    domains = [foreign_domain(f"d{i}", hostdev(vf_address(i))) for i in range(11)]
    assert choose_vfs(sysfs, (sriov_nic(),), domains)["fast"].index == 11
    domains.append(foreign_domain("last", hostdev_interface(vf_address(11))))
    with pytest.raises(VmHostError, match=r"all 12 SR-IOV VFs of enp59s0f0 are in use"):
        choose_vfs(sysfs, (sriov_nic(),), domains)
    # One free VF, two NICs asking: the second one fails.
    with pytest.raises(VmHostError, match=r"interface b: all 12 SR-IOV VFs of enp59s0f0"):
        choose_vfs(sysfs, (sriov_nic("a"), sriov_nic("b")), domains[:-1])


def test_a_pf_without_enabled_vfs_is_refused(sysfs: Path) -> None:
    nic = NicAttachment("fast", AttachmentKind.HOSTDEV, "enp5s0")
    with pytest.raises(VmHostError, match=r"enp5s0 has no SR-IOV VFs enabled"):
        choose_vfs(sysfs, (nic,), [])


class FakeDomain:
    """Just what compose reads from an existing domain."""

    def __init__(self, name: str, xml: str, calls: list[str]):
        self._name = name
        self._xml = xml
        self._calls = calls

    def name(self) -> str:
        return self._name

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802 - libvirt's spelling
        self._calls.append(f"XMLDesc {self._name} {flags}")
        return self._xml

    def isActive(self) -> int:  # noqa: N802
        return 0

    def isPersistent(self) -> int:  # noqa: N802
        return 1


class FakeConnection:
    """A connection whose domains hold every VF; any other call is recorded and fails."""

    def __init__(self, domains: list[FakeDomain], calls: list[str]):
        self._domains = domains
        self.calls = calls

    def isAlive(self) -> int:  # noqa: N802
        return 1

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:  # noqa: N802
        self.calls.append("listAllDomains")
        return self._domains

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        raise AssertionError(f"compose called {name} although no VF was free")


def test_compose_without_a_free_vf_creates_nothing(sysfs: Path) -> None:
    calls: list[str] = []
    domains = [
        FakeDomain(f"d{i}", foreign_domain(f"d{i}", hostdev_interface(vf_address(i))), calls)
        for i in range(12)
    ]
    backend = LibvirtBackend(sysfs_root=str(sysfs))
    backend._conn = FakeConnection(domains, calls)  # type: ignore[assignment]
    placement = Placement(vcpus=2, memory_mib=2048, vfs=(VfAssignment(PF),))
    with pytest.raises(VmHostError, match=r"all 12 SR-IOV VFs of enp59s0f0 are in use"):
        backend.compose(spec(), placement, (sriov_nic(vlan=100),), "vm-host")
    # Only the domain list was read: no pool was looked up, no volume or domain created.
    assert calls == ["listAllDomains"] + [f"XMLDesc d{i} 0" for i in range(12)]


# -- the domain XML


def test_hostdev_nic_xml_validates_and_carries_the_vf(tmp_path: Path, sysfs: Path) -> None:
    nics = (
        NicAttachment("eth0", AttachmentKind.BRIDGE, "br0", mac="52:54:00:00:00:01"),
        sriov_nic("fast", vlan=100, mac="52:54:00:00:00:02"),
        sriov_nic("slow", mac="52:54:00:00:00:03"),
    )
    domains = [foreign_domain("a", hostdev(vf_address(0)) + hostdev(vf_address(1)))]
    vfs = choose_vfs(sysfs, nics, domains)
    assert {label: vf.index for label, vf in vfs.items()} == {"fast": 2, "slow": 3}
    placement = Placement(vcpus=2, memory_mib=2048, vfs=(VfAssignment(PF, 2),))
    root = ET.fromstring(render(nics, vfs, tmp_path, placement))

    interfaces = root.findall("devices/interface")
    assert [i.get("type") for i in interfaces] == ["bridge", "hostdev", "hostdev"]
    fast, slow = interfaces[1], interfaces[2]
    assert fast.get("managed") == "yes"
    assert fast.find("mac").get("address") == "52:54:00:00:00:02"  # type: ignore[union-attr]
    address = fast.find("source/address")
    assert address is not None
    assert address.attrib == {
        "type": "pci",
        "domain": "0x0000",
        "bus": "0x3b",
        "slot": "0x02",
        "function": "0x2",
    }
    assert [t.get("id") for t in fast.findall("vlan/tag")] == ["100"]
    assert fast.find("model") is None  # a VF has its own driver in the guest
    assert slow.find("vlan") is None
    assert slow.find("source/address").get("function") == "0x3"  # type: ignore[union-attr]

    ledger = root.findall(f"metadata/{{{METADATA_NS}}}vm/{{{METADATA_NS}}}interface")
    assert [(n.get("label"), n.get("attached-to")) for n in ledger] == [
        ("eth0", "br0"),
        ("fast", "enp59s0f0/vf2 (0000:3b:02.2)"),
        ("slow", "enp59s0f0/vf3 (0000:3b:02.3)"),
    ]
    # The rendered domain holds what it was given: the next choice skips both VFs.
    xml = ET.tostring(root, encoding="unicode")
    assert hostdev_addresses(xml) == {vf_address(2), vf_address(3)}
    assert choose_vfs(sysfs, (sriov_nic(),), [*domains, xml])["fast"].index == 4


def test_ledger_round_trip_counts_the_vfs(tmp_path: Path, sysfs: Path) -> None:
    nics = (sriov_nic("a", mac="52:54:00:00:00:02"), sriov_nic("b", mac="52:54:00:00:00:03"))
    vfs = choose_vfs(sysfs, nics, [])
    # A placement that counted fewer VFs than the NICs hold never lets the ledger undercount.
    placement = Placement(vcpus=2, memory_mib=2048, vfs=(VfAssignment(PF, 1),))
    record = record_from_domain_xml(render(nics, vfs, tmp_path, placement), VmState.RUNNING)
    assert record.managed
    assert record.placement.vfs == (VfAssignment(PF, 2),)
    assert [i["attached-to"] for i in record.interfaces] == [
        "enp59s0f0/vf0 (0000:3b:02.0)",
        "enp59s0f0/vf1 (0000:3b:02.1)",
    ]


def test_foreign_domain_vfs_count_against_their_pf(sysfs: Path) -> None:
    xml = foreign_domain(
        "legacy",
        hostdev(vf_address(4))
        + hostdev_interface(vf_address(7))
        + hostdev("0000:05:00.0")  # a whole NIC passed through: no VF of any PF
        + hostdev_interface("0000:5e:02.0", "52:54:00:aa:bb:02"),  # a VF sysfs does not know
    )
    vfs = known_vfs(sysfs, hostdev_addresses(xml))
    record = record_from_domain_xml(xml, VmState.STOPPED, None, vfs)
    assert not record.managed
    assert record.placement.vfs == (VfAssignment(PF, 2),)
    assert [(i["label"], i["attached-to"]) for i in record.interfaces] == [
        ("net0", "enp59s0f0/vf7 (0000:3b:02.7)"),
        ("net1", "0000:5e:02.0"),
    ]
    # Without the sysfs map nothing can be said about the PF.
    assert record_from_domain_xml(xml, VmState.STOPPED).placement.vfs == ()

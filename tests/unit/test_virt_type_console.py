"""virt-type (TCG domains use the `maximum` CPU model), the serial console log, image seeds."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from xml_schema import assert_valid

from vmhost.backends.libvirt import (
    TEMPLATES_DIR,
    LibvirtBackend,
    Volume,
    domain_context,
    render_template,
    resolve_virt_type,
    seed_documents,
)
from vmhost.model import CellPlacement, DiskSpec, InvalidRequestError, Placement, VmSpec

ROOT = Volume("vm-host", "vm1-root", "/var/lib/vm-host/images/vm1-root")
PLACEMENT = Placement(
    vcpus=2,
    memory_mib=512,
    cells=(
        CellPlacement(host_node=0, vcpus=1, memory_mib=256),
        CellPlacement(host_node=1, vcpus=1, memory_mib=256),
    ),
)


def spec(**kw: object) -> VmSpec:
    base: dict[str, object] = {
        "name": "vm1",
        "vcpus": 2,
        "memory_mib": 512,
        "disks": (DiskSpec("root", 10),),
        "owner": "action",
    }
    base.update(kw)
    return VmSpec(**base)  # type: ignore[arg-type]


def render(tmp_path: Path, domain_type: str, console_log: str | None) -> ET.Element:
    context = domain_context(
        spec(image="ubuntu@24.04"),
        PLACEMENT,
        (),
        (ROOT,),
        None,
        uuid="8f0c2c52-4e5e-4b8a-9a39-2f8d1f0f6f01",
        domain_type=domain_type,
        cpu_disabled_features=["arch-capabilities"],
        console_log=console_log,
    )
    xml = render_template(TEMPLATES_DIR, "domain.xml.j2", context)
    assert_valid(xml, tmp_path)
    return ET.fromstring(xml)


@pytest.mark.parametrize(
    ("requested", "kvm_exists", "flags", "expected"),
    [
        ("auto", True, {"svm", "sse2"}, "kvm"),
        ("auto", True, {"vmx"}, "kvm"),
        ("auto", True, {"sse2"}, "qemu"),  # PVM: /dev/kvm without hardware virtualisation
        ("auto", False, {"vmx"}, "qemu"),
        ("kvm", False, set(), "kvm"),
        ("qemu", True, {"vmx"}, "qemu"),
    ],
)
def test_virt_type(
    tmp_path: Path, requested: str, kvm_exists: bool, flags: set[str], expected: str
) -> None:
    dev = tmp_path / "kvm"
    if kvm_exists:
        dev.touch()
    assert resolve_virt_type(requested, dev, frozenset(flags)) == expected


def test_bad_virt_type_names_the_option() -> None:
    with pytest.raises(InvalidRequestError) as e:
        resolve_virt_type("xen")
    assert e.value.field == "virt-type"


def test_qemu_domain_uses_maximum_with_topology_and_numa(tmp_path: Path) -> None:
    root = render(tmp_path, "qemu", "/var/log/vm-host/console/vm1.log")
    assert root.get("type") == "qemu"
    cpu = root.find("cpu")
    assert cpu is not None
    assert cpu.get("mode") == "maximum"
    assert cpu.findall("feature") == []
    assert len(cpu.findall("numa/cell")) == 2
    assert cpu.find("topology") is not None
    log = root.find("devices/serial/log")
    assert log is not None
    assert (log.get("file"), log.get("append")) == ("/var/log/vm-host/console/vm1.log", "on")


def test_kvm_domain_keeps_host_passthrough(tmp_path: Path) -> None:
    root = render(tmp_path, "kvm", None)
    cpu = root.find("cpu")
    assert cpu is not None
    assert cpu.get("mode") == "host-passthrough"
    assert [f.get("name") for f in cpu.findall("feature")] == ["arch-capabilities"]
    assert root.find("devices/serial/log") is None


def test_a_vm_from_an_image_always_gets_a_seed_with_its_hostname() -> None:
    docs = seed_documents(spec(image="ubuntu@24.04"), (), "iid")
    assert docs is not None
    assert yaml.safe_load(docs["meta-data"])["local-hostname"] == "vm1"
    assert seed_documents(spec(), (), "iid") is None


def test_console_log_refuses_bad_names_and_counts(tmp_path: Path) -> None:
    backend = LibvirtBackend(
        uri="qemu+unix:///system?socket=/nonexistent/sock", console_log_dir=str(tmp_path)
    )
    with pytest.raises(InvalidRequestError, match="name"):
        backend.console_log("../etc/passwd")
    with pytest.raises(InvalidRequestError, match="lines"):
        backend.console_log("vm1", 0)

"""A VM from a named image boots under TCG and reports, from inside, what vm-host planned.

The image is the tiny test guest (tests/guest/build-tiny-image, cached by recipe), published as
com.ubuntu.cloud:server:24.04:amd64 in a signed simplestreams mirror on 127.0.0.1
(tests/guest/mirror.py). `ubuntu@24.04` is resolved and fetched into the image cache pool
(gpgv, sha256 and size checked), composed by the libvirt backend as an overlay on that base
with virt-type=qemu, and the guest's own console report is read back through console_log().
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import libvirt
import pytest
from tests.integration.test_libvirt_backend import placed, spec

from vmhost import imagecache, images
from vmhost.backends.libvirt import LibvirtBackend
from vmhost.model import AttachmentKind, NicAttachment, VmState

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_host")]

GUEST = Path(__file__).resolve().parents[1] / "guest"
BOOT_TIMEOUT_S = 180
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGd2bWhvc3R0ZXN0a2V5Zm9yY29uc29sZWxvZ3M test@vm-host"


def _load(name: str) -> ModuleType:
    module_spec = importlib.util.spec_from_file_location(
        f"vmhost_guest_{name}", GUEST / f"{name}.py"
    )
    assert module_spec
    assert module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


mirror = _load("mirror")
report = _load("report")


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    """The tiny test guest's qcow2 (built once per recipe, then cached)."""
    out = subprocess.run(
        ["bash", str(GUEST / "build-tiny-image")], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def signed_mirror(tiny_image: Path) -> Iterator[tuple[str, str]]:
    """(URL, keyring) of a signed mirror serving the tiny image as ubuntu@24.04."""
    directory = Path(tempfile.mkdtemp(prefix="vmhost-test-mirror-"))
    keyring = mirror.publish(tiny_image, directory)
    with mirror.serve(directory) as url:
        yield url, str(keyring)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def tcg(
    backend: LibvirtBackend, image_pool: imagecache.Settings, tmp_path: Path
) -> Iterator[LibvirtBackend]:
    """A virt-type=qemu backend (this machine's /dev/kvm cannot boot a guest).

    It shares the test image pool of `image_pool`.
    """
    with LibvirtBackend(
        virt_type="qemu",
        console_log_dir=str(tmp_path / "console"),
        image_pool=backend.image_pool,
        image_pool_path=backend.image_pool_path,
    ) as b:
        yield b


def wait_powered_off(backend: LibvirtBackend, name: str) -> float:
    start = time.monotonic()
    dom = backend.conn.lookupByName(name)
    while dom.isActive():
        if time.monotonic() - start > BOOT_TIMEOUT_S:
            pytest.fail(f"{name} did not power off in {BOOT_TIMEOUT_S} s:\n"
                        + backend.console_log(name, 50))  # fmt: skip
        time.sleep(0.5)
    return time.monotonic() - start


def test_named_image_boots_and_the_guest_reports_the_plan(
    tcg: LibvirtBackend,
    test_pool: str,
    test_bridge: str,
    signed_mirror: tuple[str, str],
    image_pool: imagecache.Settings,
) -> None:
    url, keyring = signed_mirror
    settings = dataclasses.replace(image_pool, source=images.Source(url=url, keyring=keyring))
    base = imagecache.ensure(tcg, "ubuntu@24.04", settings)
    assert images.file_sha256(Path(base.path)) == base.sha256

    vm = spec(
        "vmhost-test-boot",
        test_pool,
        vcpus=2,
        memory_mib=256,
        image="ubuntu@24.04",
        ssh_public_keys=(KEY,),
        user_data="#cloud-config\npackages: [htop]\n",
    )
    nic = NicAttachment("eth0", AttachmentKind.BRIDGE, test_bridge, ip="192.0.2.10/24")
    placement = placed(tcg, vm)
    record = tcg.compose(vm, placement, (nic,), test_pool)
    assert record.state == VmState.RUNNING
    root = tcg.conn.lookupByName(vm.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert "type='qemu'" in root
    assert "mode='maximum'" in root
    boot_s = wait_powered_off(tcg, vm.name)

    guest = report.parse(tcg.console_log(vm.name, 1000))
    print(f"guest report after {boot_s:.1f} s: {guest}")
    assert guest["cpus"] == placement.vcpus == 2
    assert len(guest["nodes"]) == max(1, len(placement.cells))
    assert set(guest["nics"].values()) == {i["mac"] for i in record.interfaces}
    assert f"local-hostname: {vm.name}" in guest["seed"]["meta-data"]
    assert KEY in guest["seed"]["user-data"]
    assert "htop" in guest["seed"]["user-data"]
    assert "192.0.2.10/24" in guest["seed"]["network-config"]
    log = Path(tcg.console_log_dir) / f"{vm.name}.log"
    assert log.stat().st_mode & 0o777 == 0o600

    tcg.delete(vm.name)
    assert not log.exists()

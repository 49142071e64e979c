"""A booted guest's addresses, as vm-host reports them: static at once, DHCP once leased.

The tiny test guest (tests/guest) runs busybox udhcpc on each NIC and prints what it got. Its
first NIC sits on a real libvirt NAT network with DHCP (dnsmasq, the `nat_network` fixture),
its second on a plain bridge with a static address from the request. vm-host must report the
static address right after compose and the very address the guest printed once libvirt has
the lease.
"""

from __future__ import annotations

import ipaddress
import shutil
import time
from pathlib import Path

import pytest
from tests.integration.conftest import NAT_SUBNET
from tests.integration.test_guest_boot import BOOT_TIMEOUT_S, report, tcg, tiny_image
from tests.integration.test_libvirt_backend import placed, spec

from vmhost import addresses, imagecache
from vmhost.backends.libvirt import LibvirtBackend
from vmhost.model import AttachmentKind, NicAttachment, VmRecord, VmState

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_host")]

__all__ = ["tcg", "tiny_image"]  # fixtures shared with test_guest_boot


def wait_for_report(backend: LibvirtBackend, name: str) -> tuple[dict, float]:
    """The guest's report, once its console shows one; and how long that took."""
    start = time.monotonic()
    while time.monotonic() - start < BOOT_TIMEOUT_S:
        try:
            return report.parse(backend.console_log(name, 1000)), time.monotonic() - start
        except report.NoReportError:
            time.sleep(1)
    pytest.fail(
        f"{name} printed no report in {BOOT_TIMEOUT_S} s:\n{backend.console_log(name, 50)}"
    )


def test_static_address_at_once_and_the_dhcp_lease_once_known(
    tcg: LibvirtBackend,
    test_pool: str,
    test_bridge: str,
    nat_network: str,
    tiny_image: Path,
    image_pool: imagecache.Settings,
) -> None:
    shutil.copyfile(tiny_image, Path(image_pool.local_dir) / "tiny.qcow2")
    imagecache.ensure(tcg, "local:tiny", image_pool)
    vm = spec("vmhost-test-addr", test_pool, memory_mib=256, image="local:tiny")
    nics = (
        NicAttachment("eth0", AttachmentKind.BRIDGE, nat_network),
        NicAttachment("data", AttachmentKind.BRIDGE, test_bridge, ip="192.0.2.10/24"),
    )
    record = tcg.compose(vm, placed(tcg, vm), nics, test_pool)
    assert record.state == VmState.RUNNING
    macs = {nic["label"]: nic["mac"] for nic in record.interfaces}

    (now,) = addresses.refresh(tcg, [record])
    assert now.addresses.get(macs["data"]) == ("192.0.2.10",)
    assert macs["eth0"] not in now.addresses  # no lease before the guest asks

    guest, boot_s = wait_for_report(tcg, vm.name)
    leased = guest["addrs"].get(next(n for n, m in guest["nics"].items() if m == macs["eth0"]))
    assert leased, f"the guest got no DHCP lease: {guest}"
    got = ipaddress.ip_interface(leased[0])
    assert got.network == ipaddress.ip_network(NAT_SUBNET)

    start = time.monotonic()
    found: VmRecord = now
    while time.monotonic() - start < 30:
        listed = next(v for v in tcg.list_vms() if v.name == vm.name)
        (found,) = addresses.refresh(tcg, [listed])
        if found.addresses.get(macs["eth0"]):
            break
        time.sleep(1)
    learnt_s = time.monotonic() - start
    print(f"report after {boot_s:.1f} s, lease known {learnt_s:.1f} s later: {found.addresses}")
    assert found.addresses[macs["eth0"]] == (str(got.ip),)
    assert found.addresses[macs["data"]] == ("192.0.2.10",)
    tcg.delete(vm.name)

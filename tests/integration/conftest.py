"""Fixtures for integration tests against the real libvirtd/KVM on this machine (no mocks).

Every module here may use them:

- `libvirt_daemons` (session): runs tests/bin/ensure-libvirt.sh, so `pytest tests/integration`
  works on a fresh machine; it installs what is missing and starts virtlogd/libvirtd.
- `backend` (session): a `LibvirtBackend` on qemu:///system whose image cache is the pool
  `vmhost-test-images` in a temporary directory (never the deployed charm's `vm-host-images`).
  Leftovers of an interrupted run (anything named `vmhost-test-*`: domains, volumes, pools,
  bridges) are removed before the first test and again after the last.
- `test_pool` (session): the name of a started directory pool `vmhost-test-pool` in a temporary
  directory, created through `backend.ensure_pool`.
- `image_pool` (function): a fresh, empty image cache pool `vmhost-test-images` for `backend`
  (removed with its bases and staging files afterwards); returns an imagecache.Settings naming
  that pool, whose local-image-dir and state dir are private temporary directories.
- `clean_host` (function): removes `vmhost-test-*` domains and volumes before and after one
  test, so a failing test cannot leak into the next.
- `test_bridge` (function): a Linux bridge `vmhost-test-br0`, up, deleted afterwards.
- `layout` (function): the HostLayout charm tests give the charm: the test image pool, and
  the relation journal and image fetch state in temporary directories, not /var/lib/vm-host.
  `charm_type` is `charm.VmHostCharm.with_layout(layout)`, the charm the tests run.
- `nat_network` (function): a transient libvirt NAT network `vmhost-test-nat` with DHCP on
  10.231.77.0/24 (dnsmasq), bridge `vmhost-test-nat`; yields the bridge, destroyed afterwards.
- `reserve_hugepages` (function): `reserve_hugepages(count, size_kib=2048)` adds `count` free
  huge pages on node 0 (or host-wide without NUMA) and returns how many are free now; the
  previous reservation is restored afterwards. The test is skipped, with the numbers, only
  when the kernel grants fewer pages than asked.

Name everything a test creates `vmhost-test-...` so the cleanup finds it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

import charm
from vmhost import imagecache
from vmhost.backends.libvirt import LibvirtBackend
from vmhost.host import set_hugepages
from vmhost.layout import HostLayout

REPO = Path(__file__).resolve().parents[2]
ENSURE_LIBVIRT = REPO / "tests" / "bin" / "ensure-libvirt.sh"
PREFIX = "vmhost-test-"
TEST_POOL = "vmhost-test-pool"
TEST_BRIDGE = "vmhost-test-br0"
TEST_IMAGE_POOL = "vmhost-test-images"
IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "/sbin/ip"
SYSFS = Path("/sys")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration as `integration`, whichever module holds it."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def _ignore_libvirt_errors(_ctx: object, _err: object) -> None:
    """Keep libvirt from printing expected lookup failures to stderr."""


def remove_test_domains(conn: libvirt.virConnect) -> None:
    """Destroy and undefine every domain named vmhost-test-*."""
    for dom in conn.listAllDomains(0):
        if not dom.name().startswith(PREFIX):
            continue
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            )


def remove_test_volumes(conn: libvirt.virConnect) -> None:
    """Delete every volume named vmhost-test-* in every active pool."""
    for pool in conn.listAllStoragePools(0):
        if not pool.isActive():
            continue
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if vol.name().startswith(PREFIX):
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)


def remove_test_pools(conn: libvirt.virConnect) -> None:
    """Stop and undefine every pool named vmhost-test-*, removing its directory."""
    for pool in conn.listAllStoragePools(0):
        if not pool.name().startswith(PREFIX):
            continue
        with contextlib.suppress(libvirt.libvirtError):
            if pool.isActive():
                for vol in pool.listAllVolumes(0):
                    vol.delete(0)
                pool.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            pool.delete(0)
        with contextlib.suppress(libvirt.libvirtError):
            pool.undefine()


def remove_test_bridges() -> None:
    """Delete every network link named vmhost-test-*."""
    for link in (SYSFS / "class" / "net").iterdir():
        if link.name.startswith(PREFIX):
            subprocess.run([IP, "link", "del", link.name], check=False, capture_output=True)


def remove_test_networks(conn: libvirt.virConnect) -> None:
    """Stop and undefine every libvirt network named vmhost-test-* (its bridge goes with it)."""
    for net in conn.listAllNetworks(0):
        if not net.name().startswith(PREFIX):
            continue
        with contextlib.suppress(libvirt.libvirtError):
            if net.isActive():
                net.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            if net.isPersistent():
                net.undefine()


def remove_leftovers(conn: libvirt.virConnect) -> None:
    """Remove everything a (possibly interrupted) test run left behind, in dependency order."""
    remove_test_domains(conn)
    remove_test_volumes(conn)
    remove_test_pools(conn)
    remove_test_networks(conn)
    remove_test_bridges()


@pytest.fixture(scope="session")
def image_cache_base() -> Iterator[Path]:
    """The directory holding the test image pool's (`cache`) and its staging directory."""
    base = Path(tempfile.mkdtemp(prefix=PREFIX + "images-"))
    base.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the bases
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def layout(tmp_path: Path, image_cache_base: Path) -> HostLayout:
    """Where the charm under test keeps its state: test names, temporary directories."""
    return HostLayout(
        image_pool=TEST_IMAGE_POOL,
        image_pool_path=str(image_cache_base / "cache"),
        image_state_dir=str(tmp_path / "image-fetch"),
        journal_dir=tmp_path / "relations",
    )


@pytest.fixture
def charm_type(layout: HostLayout) -> type[charm.VmHostCharm]:
    """The charm as deployed, keeping its state where `layout` says."""
    return charm.VmHostCharm.with_layout(layout)


@pytest.fixture(scope="session")
def libvirt_daemons() -> None:
    """Install and start virtlogd/libvirtd when they are not running."""
    result = subprocess.run(
        ["/bin/bash", str(ENSURE_LIBVIRT)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"ensure-libvirt.sh failed:\n{result.stdout}{result.stderr}")


@pytest.fixture(scope="session")
def backend(libvirt_daemons: None, image_cache_base: Path) -> Iterator[LibvirtBackend]:
    """A backend on qemu:///system, with vmhost-test-* leftovers removed before and after."""
    libvirt.registerErrorHandler(_ignore_libvirt_errors, None)
    # These VMs boot no OS, so they keep the KVM domain type wherever /dev/kvm exists (pinning
    # and numatune apply even under PVM); tests that boot a guest make a virt-type=qemu backend.
    virt_type = "kvm" if Path("/dev/kvm").exists() else "qemu"
    console = tempfile.mkdtemp(prefix=PREFIX + "console-")
    intents = tempfile.mkdtemp(prefix=PREFIX + "intents-")
    with LibvirtBackend(
        virt_type=virt_type,
        console_log_dir=console,
        intent_dir=intents,
        image_pool=TEST_IMAGE_POOL,
        image_pool_path=str(image_cache_base / "cache"),
    ) as b:
        remove_leftovers(b.conn)
        yield b
        remove_leftovers(b.conn)
    shutil.rmtree(console, ignore_errors=True)
    shutil.rmtree(intents, ignore_errors=True)


@pytest.fixture(scope="session")
def test_pool(backend: LibvirtBackend) -> Iterator[str]:
    """A started directory pool vmhost-test-pool in a temporary directory."""
    base = Path(tempfile.mkdtemp(prefix=PREFIX))
    base.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the disk files
    backend.ensure_pool(TEST_POOL, str(base / "pool"))
    yield TEST_POOL
    remove_test_domains(backend.conn)
    with contextlib.suppress(libvirt.libvirtError):
        pool = backend.conn.storagePoolLookupByName(TEST_POOL)
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        pool.undefine()
    shutil.rmtree(base, ignore_errors=True)


def remove_pool(conn: libvirt.virConnect, name: str) -> None:
    """Delete a pool's volumes, stop and undefine it (leaving its directory to the caller)."""
    with contextlib.suppress(libvirt.libvirtError):
        pool = conn.storagePoolLookupByName(name)
        if pool.isActive():
            pool.refresh(0)
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
        pool.undefine()


def empty_directory(path: Path) -> None:
    """Remove everything inside a directory, keeping the directory."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@pytest.fixture
def image_pool(
    backend: LibvirtBackend, tmp_path: Path, image_cache_base: Path
) -> Iterator[imagecache.Settings]:
    """A fresh image cache pool for `backend`; Settings with private local and state dirs."""
    remove_pool(backend.conn, TEST_IMAGE_POOL)
    empty_directory(image_cache_base)
    private = tmp_path / "image-pool"  # apart from what the test itself keeps in tmp_path
    local = private / "local-images"
    local.mkdir(parents=True)
    yield imagecache.Settings(
        local_dir=str(local),
        state_dir=str(private / "state"),
        pool=backend.image_pool,
        pool_path=backend.image_pool_path,
    )
    remove_test_domains(backend.conn)
    remove_test_volumes(backend.conn)
    remove_pool(backend.conn, TEST_IMAGE_POOL)
    empty_directory(image_cache_base)


@pytest.fixture
def clean_host(backend: LibvirtBackend) -> Iterator[None]:
    """Remove vmhost-test-* domains and volumes before and after one test."""
    remove_test_domains(backend.conn)
    remove_test_volumes(backend.conn)
    yield
    remove_test_domains(backend.conn)
    remove_test_volumes(backend.conn)


@pytest.fixture
def test_bridge(backend: LibvirtBackend) -> Iterator[str]:
    """A Linux bridge vmhost-test-br0 that is up; deleted after the test."""
    subprocess.run([IP, "link", "del", TEST_BRIDGE], check=False, capture_output=True)
    subprocess.run([IP, "link", "add", TEST_BRIDGE, "type", "bridge"], check=True)
    subprocess.run([IP, "link", "set", TEST_BRIDGE, "up"], check=True)
    yield TEST_BRIDGE
    remove_test_domains(backend.conn)  # a running guest's tap would keep the bridge busy
    subprocess.run([IP, "link", "del", TEST_BRIDGE], check=False, capture_output=True)


NAT_NETWORK = "vmhost-test-nat"
NAT_BRIDGE = "vmhost-test-nat"
NAT_SUBNET = "10.231.77.0/24"
NAT_XML = f"""<network>
  <name>{NAT_NETWORK}</name>
  <forward mode='nat'/>
  <bridge name='{NAT_BRIDGE}' stp='off' delay='0'/>
  <ip address='10.231.77.1' netmask='255.255.255.0'>
    <dhcp><range start='10.231.77.100' end='10.231.77.199'/></dhcp>
  </ip>
</network>"""


@pytest.fixture
def nat_network(backend: LibvirtBackend) -> Iterator[str]:
    """A transient libvirt NAT network with DHCP (dnsmasq) on bridge vmhost-test-nat.

    Yields the bridge name; the network (and its bridge, leases, firewall rules) is gone
    after the test.
    """
    remove_test_domains(backend.conn)
    remove_test_networks(backend.conn)
    net = backend.conn.networkCreateXML(NAT_XML)
    yield NAT_BRIDGE
    remove_test_domains(backend.conn)  # a running guest's tap would keep the bridge busy
    with contextlib.suppress(libvirt.libvirtError):
        net.destroy()


def hugepage_dir(size_kib: int) -> Path:
    """Return the sysfs directory of one page size on node 0 (host-wide without NUMA)."""
    node0 = SYSFS / "devices/system/node/node0/hugepages" / f"hugepages-{size_kib}kB"
    return node0 if node0.is_dir() else SYSFS / "kernel/mm/hugepages" / f"hugepages-{size_kib}kB"


def free_hugepages(size_kib: int = 2048) -> int:
    """Return the free huge pages of one size on node 0, as the kernel counts them now."""
    return int((hugepage_dir(size_kib) / "free_hugepages").read_text())


@pytest.fixture
def reserve_hugepages() -> Iterator[Callable[..., int]]:
    """Reserve extra huge pages for one test; the previous totals come back afterwards."""
    previous: dict[int, int] = {}
    node = 0 if (SYSFS / "devices/system/node/node0").is_dir() else None

    def reserve(count: int, size_kib: int = 2048) -> int:
        nr = hugepage_dir(size_kib) / "nr_hugepages"
        current = int(nr.read_text())
        previous.setdefault(size_kib, current)
        free_before = free_hugepages(size_kib)
        granted = set_hugepages(size_kib, current + count, node=node)
        if granted - current < count:
            set_hugepages(size_kib, previous[size_kib], node=node)
            pytest.skip(
                f"the kernel granted {granted - current} of {count} extra {size_kib} KiB huge "
                f"pages (memory too fragmented); this test needs all of them"
            )
        return free_before + count

    yield reserve
    for size_kib, count in previous.items():
        set_hugepages(size_kib, count, node=node)

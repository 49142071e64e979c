"""The LXD backend against the real LXD daemon of this machine (no mocks).

Everything lives in the project `vmhost-test-lxd` and the pool `vmhost-test-pool`, removed
before the first test (leftovers of an interrupted run) and after the last.

This machine's LXD cannot create virtual machines at all: its qemu driver is not operational
("vhost_vsock kernel module not loaded"), and LXD 5.0 refuses the instance type at creation,
before it looks at the config. So here:

- every instance definition is still checked by LXD's own validation, posted as a profile in
  the test project (LXD validates profile config and devices for any instance type), and what
  LXD must refuse is refused;
- compose is run for every kind of request; LXD's refusal is asserted to leave no instance and
  no volume behind, and the read-back part is skipped with the daemon's message (it runs on a
  host whose LXD can create VMs);
- the ledger (list_vms) and delete are tested on instances LXD can create here, containers
  carrying the same user.vm-host.* keys compose writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmhost.backends.lxd import (
    CPU_NODES_EXTENSION,
    KEY_OWNER,
    PROJECT_CONFIG,
    LxdBackend,
    LxdVmUnsupportedError,
    instance_definition,
    ledger_config,
)
from vmhost.lxd_trust import LxdError
from vmhost.model import (
    AttachmentKind,
    CellPlacement,
    DiskSpec,
    NicAttachment,
    Placement,
    VmHostError,
    VmSpec,
    VmState,
)

REPO = Path(__file__).resolve().parents[2]
ENSURE_LXD = REPO / "tests" / "bin" / "ensure-lxd.sh"
PROJECT = "vmhost-test-lxd"
POOL = "vmhost-test-pool"
DEFAULT_POOL = "default"
PREFIX = "vmhost-test-"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


def call(backend: LxdBackend, method: str, path: str, body: Any = None) -> Any:
    """Raw API call in the test project, for arranging and checking what the backend did."""
    sep = "&" if "?" in path else "?"
    return backend._call(method, f"{path}{sep}project={PROJECT}", body)


def instance_names(backend: LxdBackend) -> set[str]:
    return {u.rsplit("/", 1)[1].split("?")[0] for u in call(backend, "GET", "/1.0/instances")}


def volume_names(backend: LxdBackend, pool: str) -> set[str]:
    urls = call(backend, "GET", f"/1.0/storage-pools/{pool}/volumes/custom")
    return {u.rsplit("/", 1)[1].split("?")[0] for u in urls or []}


def all_test_volumes(backend: LxdBackend) -> set[str]:
    pools = {u.rsplit("/", 1)[1] for u in backend._call("GET", "/1.0/storage-pools")}
    return {f"{p}/{v}" for p in sorted(pools) for v in volume_names(backend, p)}


def remove_project(backend: LxdBackend) -> None:
    """Delete the test project with its instances, volumes and profiles, and the test pool."""
    if PROJECT in backend.client.projects():
        for name in instance_names(backend):
            with contextlib.suppress(LxdError):
                call(
                    backend,
                    "PUT",
                    f"/1.0/instances/{name}/state",
                    {"action": "stop", "force": True},
                )
            call(backend, "DELETE", f"/1.0/instances/{name}")
        pools = {u.rsplit("/", 1)[1] for u in backend._call("GET", "/1.0/storage-pools")}
        for pool in pools:
            for volume in volume_names(backend, pool):
                call(backend, "DELETE", f"/1.0/storage-pools/{pool}/volumes/custom/{volume}")
        for url in call(backend, "GET", "/1.0/profiles"):
            profile = url.rsplit("/", 1)[1].split("?")[0]
            if profile != "default":
                call(backend, "DELETE", f"/1.0/profiles/{profile}")
        backend._call("DELETE", f"/1.0/projects/{PROJECT}")
    pools = {u.rsplit("/", 1)[1] for u in backend._call("GET", "/1.0/storage-pools")}
    if POOL in pools:
        source = Path(backend._call("GET", f"/1.0/storage-pools/{POOL}")["config"]["source"])
        backend._call("DELETE", f"/1.0/storage-pools/{POOL}")
        if source.parent.name.startswith(PREFIX):  # the temporary directory of an earlier run
            shutil.rmtree(source.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def lxd() -> Iterator[LxdBackend]:
    """A backend on the running LXD (started by ensure-lxd.sh), project cleaned both ways."""
    result = subprocess.run(
        ["/bin/bash", str(ENSURE_LXD)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"ensure-lxd.sh failed:\n{result.stdout}{result.stderr}")
    backend = LxdBackend(project=PROJECT)
    remove_project(backend)
    yield backend
    remove_project(backend)


@pytest.fixture(scope="module")
def project(lxd: LxdBackend) -> Iterator[str]:
    """The test project, set up by the backend, with a second pool in a temporary directory."""
    base = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        lxd.ensure_pool(POOL, str(base / "pool"))
        assert lxd.ensure_project(PROJECT, DEFAULT_POOL) is True
        yield PROJECT
    finally:
        remove_project(lxd)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def clean(lxd: LxdBackend, project: str) -> Iterator[None]:
    """No instance, volume or extra profile in the test project before and after a test."""

    def wipe() -> None:
        for name in instance_names(lxd):
            with contextlib.suppress(LxdError):
                call(lxd, "PUT", f"/1.0/instances/{name}/state", {"action": "stop", "force": True})
            call(lxd, "DELETE", f"/1.0/instances/{name}")
        for ref in all_test_volumes(lxd):
            pool, _, volume = ref.partition("/")
            call(lxd, "DELETE", f"/1.0/storage-pools/{pool}/volumes/custom/{volume}")
        for url in call(lxd, "GET", "/1.0/profiles"):
            name = url.rsplit("/", 1)[1].split("?")[0]
            if name != "default":
                call(lxd, "DELETE", f"/1.0/profiles/{name}")

    wipe()
    yield
    wipe()


def spec(name: str = "vmhost-test-vm", **kw: Any) -> VmSpec:
    values: dict[str, Any] = {
        "name": name,
        "vcpus": 2,
        "memory_mib": 512,
        "disks": (DiskSpec("root", 1),),
        "owner": "relation:3:consumer",
        "request_id": "db-0",
    }
    values.update(kw)
    return VmSpec(**values)


def pinned(cpus: tuple[int, ...], memory: int = 512) -> Placement:
    return Placement(
        vcpus=len(cpus),
        memory_mib=memory,
        cells=(CellPlacement(host_node=0, vcpus=len(cpus), memory_mib=memory, cpus=cpus),),
    )


HUGE = Placement(
    vcpus=2,
    memory_mib=512,
    cells=(CellPlacement(0, 2, 512, hugepage_size_kib=2048, hugepages=256),),
)
TWO_NODES = Placement(
    vcpus=2,
    memory_mib=512,
    cells=(CellPlacement(0, 1, 256, (0,)), CellPlacement(1, 1, 256, (1,))),
)
KINDS: dict[str, tuple[VmSpec, Placement, list[NicAttachment]]] = {
    "shared": (spec(), Placement(vcpus=2, memory_mib=512), []),
    "pinned": (spec(pinned_count=2), pinned((0, 1)), []),
    "pinned-one": (spec(vcpus=1, pinned_count=1), pinned((1,)), []),
    "hugepages": (spec(hugepages=None), HUGE, []),
    "multi-node": (spec(pinned_count=2, numa_nodes=2), TWO_NODES, []),
    "nics": (
        spec(),
        Placement(vcpus=2, memory_mib=512),
        [
            NicAttachment("eth0", AttachmentKind.BRIDGE, "vmhost-br0", vlan=10),
            NicAttachment("data", AttachmentKind.DIRECT, "eth0", vlan=20),
            NicAttachment("fast", AttachmentKind.HOSTDEV, "eth0"),
        ],
    ),
    "extra-disks": (
        spec(disks=(DiskSpec("root", 1), DiskSpec("data", 1, POOL), DiskSpec("logs", 1))),
        Placement(vcpus=2, memory_mib=512),
        [],
    ),
    "static-ip": (
        spec(user_data="#cloud-config\npackages: [htop]\n"),
        Placement(vcpus=2, memory_mib=512),
        [NicAttachment("eth0", AttachmentKind.BRIDGE, "vmhost-br0", ip="10.9.0.5/24")],
    ),
}


def as_profile(name: str, definition: dict[str, Any]) -> dict[str, Any]:
    """The definition's config and devices as a profile (LXD keeps volatile keys per instance)."""
    config = {k: v for k, v in definition["config"].items() if not k.startswith("volatile.")}
    return {"name": name, "config": config, "devices": definition["devices"]}


def create_container(
    lxd: LxdBackend, name: str, config: dict[str, str], devices: dict[str, Any] | None = None
) -> None:
    """Create a (never started) container: the instance type LXD can create here."""
    call(
        lxd,
        "POST",
        "/1.0/instances",
        {
            "name": name,
            "type": "container",
            "source": {"type": "none"},
            "profiles": [],
            "config": config,
            "devices": {"root": {"type": "disk", "path": "/", "pool": DEFAULT_POOL}}
            | (devices or {}),
        },
    )


def create_volume(lxd: LxdBackend, pool: str, name: str) -> None:
    call(
        lxd,
        "POST",
        f"/1.0/storage-pools/{pool}/volumes/custom",
        {"name": name, "type": "custom", "content_type": "block", "config": {"size": "1GB"}},
    )


# ---------------------------------------------------------------------------------------------
# Host facts


def test_live_resources_parse(lxd: LxdBackend) -> None:
    topology = lxd.topology()
    assert topology.hypervisor == "lxd"
    assert topology.hypervisor_version == lxd.server_info()["environment"]["server_version"]
    assert len(topology.cpus) == os.cpu_count()
    assert [n.id for n in topology.nodes] == [0]
    mem_total_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    node = topology.nodes[0]
    # LXD reads the node's meminfo, /proc/meminfo is host-wide: same memory on one node.
    assert abs(node.memory_kib - mem_total_kib) <= mem_total_kib // 20
    assert 2048 in node.hugepages_total
    free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())
    assert node.hugepages_free[2048] == free
    lxd_nics = {c["ports"][0]["id"] for c in lxd.resources()["network"]["cards"] if c["ports"]}
    assert lxd_nics <= {n.name for n in topology.nics}


def test_storage_pools_read(lxd: LxdBackend, project: str) -> None:
    pools = {p.name: p for p in lxd.topology().pools}
    default = pools[DEFAULT_POOL]
    assert default.driver == "dir"
    assert default.capacity_bytes > 0
    assert 0 < default.available_bytes <= default.capacity_bytes
    assert default.path
    assert Path(default.path).is_dir()
    assert pools[POOL].driver == "dir"
    test_path = pools[POOL].path
    assert test_path is not None
    assert test_path.endswith("/pool")
    lxd.ensure_pool(POOL, "/elsewhere")  # present: left as it is
    assert {p.name: p.path for p in lxd.topology().pools}[POOL] == pools[POOL].path


def test_project_setup(lxd: LxdBackend, project: str) -> None:
    info = lxd._call("GET", f"/1.0/projects/{project}")
    assert {k: info["config"][k] for k in PROJECT_CONFIG} == PROJECT_CONFIG
    profile = call(lxd, "GET", "/1.0/profiles/default")
    assert profile["devices"]["root"] == {"type": "disk", "path": "/", "pool": DEFAULT_POOL}
    assert lxd.ensure_project(project, DEFAULT_POOL) is False


# ---------------------------------------------------------------------------------------------
# LXD's own validation of every definition


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lxd_accepts_every_definition(lxd: LxdBackend, kind: str) -> None:
    s, placement, nics = KINDS[kind]
    definition = instance_definition(s, placement, nics, DEFAULT_POOL)
    profile = as_profile(f"{PREFIX}{kind}", definition)
    has_nodes = "limits.cpu.nodes" in profile["config"]
    if has_nodes and CPU_NODES_EXTENSION not in lxd.server_info()["api_extensions"]:
        # This LXD predates the key: it refuses it, so compose leaves it out here.
        with pytest.raises(LxdError, match=r"Unknown configuration key: limits\.cpu\.nodes"):
            call(lxd, "POST", "/1.0/profiles", profile)
        del profile["config"]["limits.cpu.nodes"]
    call(lxd, "POST", "/1.0/profiles", profile)
    stored = call(lxd, "GET", f"/1.0/profiles/{PREFIX}{kind}")
    assert stored["config"] == profile["config"]
    assert stored["devices"] == profile["devices"]


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize(
    ("config", "devices", "message"),
    [
        ({"limits.cpu": "0,,1x"}, {}, "CPU limit"),
        ({"limits.memory": "lots"}, {}, "Invalid value: lots"),
        (
            {},
            {"eth0": {"type": "nic", "nictype": "bridged", "parent": "br0", "vlan": "5000"}},
            "VLAN",
        ),
        (
            {},
            {
                "eth0": {
                    "type": "nic",
                    "nictype": "macvlan",
                    "parent": "eth0",
                    "hwaddr": "not-a-mac",
                }
            },
            "MAC",
        ),
    ],
)
def test_lxd_refuses_what_it_should(
    lxd: LxdBackend, config: dict[str, str], devices: dict[str, Any], message: str
) -> None:
    with pytest.raises(LxdError, match=message):
        call(
            lxd,
            "POST",
            "/1.0/profiles",
            {"name": f"{PREFIX}bad", "config": config, "devices": devices},
        )
    assert f"{PREFIX}bad" not in {
        u.rsplit("/", 1)[1].split("?")[0] for u in call(lxd, "GET", "/1.0/profiles")
    }


# ---------------------------------------------------------------------------------------------
# compose


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_compose_every_kind_without_starting(lxd: LxdBackend, kind: str) -> None:
    s, placement, nics = KINDS[kind]
    try:
        record = lxd.compose(s, placement, nics, DEFAULT_POOL, start=False)
    except LxdVmUnsupportedError as e:
        assert instance_names(lxd) == set()
        assert all_test_volumes(lxd) == set()
        pytest.skip(f"LXD here cannot create virtual machines (nothing was left behind): {e}")
    assert record.managed
    assert record.state is VmState.STOPPED
    (listed,) = [r for r in lxd.list_vms() if r.name == s.name]
    assert listed.placement == placement
    assert (listed.owner, listed.request_id) == (s.owner, s.request_id)
    assert listed.volumes == tuple(
        f"{d.pool or DEFAULT_POOL}/{s.name}-{d.label}" for d in s.disks[1:]
    )
    lxd.delete(s.name)
    assert instance_names(lxd) == set()
    assert all_test_volumes(lxd) == set()


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize("start", [False, True])
def test_refused_compose_leaves_no_instance_and_no_volume(lxd: LxdBackend, start: bool) -> None:
    # Two extra disks are created before the instance. LXD then refuses: here at creation (no
    # VM support); on a VM-capable host at start, because the NIC's bridge does not exist.
    s = spec(disks=(DiskSpec("root", 1), DiskSpec("data", 1, POOL), DiskSpec("logs", 1)))
    nics = [NicAttachment("eth0", AttachmentKind.BRIDGE, "vmhost-nobr0")]
    before = all_test_volumes(lxd)
    if not start and lxd.vm_support() is None:
        pytest.skip("this LXD can create VMs; the refusal case needs start=True here")
    with pytest.raises(VmHostError) as info:
        lxd.compose(s, Placement(vcpus=2, memory_mib=512), nics, DEFAULT_POOL, start=start)
    message = str(info.value)
    assert "nothing was left behind" in message
    assert ("creating the instance failed" in message) or ("starting the instance" in message)
    assert instance_names(lxd) == set()
    assert all_test_volumes(lxd) == before == set()


@pytest.mark.usefixtures("clean")
def test_name_in_use_is_refused_before_anything_is_created(lxd: LxdBackend) -> None:
    create_container(lxd, "vmhost-test-vm", {"limits.cpu": "1"})
    s = spec(disks=(DiskSpec("root", 1), DiskSpec("data", 1)))
    with pytest.raises(VmHostError, match="already exists"):
        lxd.compose(s, Placement(vcpus=2, memory_mib=512), [], DEFAULT_POOL, start=False)
    assert all_test_volumes(lxd) == set()
    assert instance_names(lxd) == {"vmhost-test-vm"}


@pytest.mark.usefixtures("clean")
def test_taken_volume_missing_pool_and_missing_image_are_refused_untouched(
    lxd: LxdBackend,
) -> None:
    create_volume(lxd, DEFAULT_POOL, "vmhost-test-vm-data")
    placement = Placement(vcpus=2, memory_mib=512)
    taken = spec(disks=(DiskSpec("root", 1), DiskSpec("logs", 1), DiskSpec("data", 1)))
    with pytest.raises(VmHostError, match="already exists in pool"):
        lxd.compose(taken, placement, [], DEFAULT_POOL, start=False)
    no_pool = spec(disks=(DiskSpec("root", 1), DiskSpec("x", 1, "vmhost-test-nopool")))
    with pytest.raises(VmHostError, match="does not exist in LXD"):
        lxd.compose(no_pool, placement, [], DEFAULT_POOL, start=False)
    no_image = spec(image="vmhost-test-no-such-image")
    with pytest.raises(VmHostError, match="not in LXD's image store"):
        lxd.compose(no_image, placement, [], DEFAULT_POOL, start=False)
    assert all_test_volumes(lxd) == {f"{DEFAULT_POOL}/vmhost-test-vm-data"}
    assert instance_names(lxd) == set()


@pytest.mark.usefixtures("clean")
def test_booting_a_vm(lxd: LxdBackend) -> None:
    s = spec()
    try:
        record = lxd.compose(s, Placement(vcpus=1, memory_mib=512), [], DEFAULT_POOL)
    except LxdVmUnsupportedError as e:
        assert instance_names(lxd) == set()
        assert all_test_volumes(lxd) == set()
        problem = lxd.vm_support()
        assert problem is not None
        pytest.skip(f"LXD cannot boot VMs on this host: {e} (GET /1.0: {problem})")
    assert record.state is VmState.RUNNING
    lxd.stop(s.name, timeout_s=5)
    lxd.start(s.name)
    lxd.delete(s.name)
    assert instance_names(lxd) == set()


def test_start_of_a_missing_vm_is_refused(lxd: LxdBackend, project: str) -> None:
    with pytest.raises(VmHostError, match="does not exist"):
        lxd.start("vmhost-test-missing")


# ---------------------------------------------------------------------------------------------
# The ledger and delete, on instances LXD can create here


@pytest.mark.usefixtures("clean")
def test_list_vms_reads_the_ledger_back_and_reconstructs_foreign_instances(
    lxd: LxdBackend,
) -> None:
    s = spec(name="vmhost-test-owned", disks=(DiskSpec("root", 1), DiskSpec("data", 1, POOL)))
    placement = pinned((0, 1))
    nics = [NicAttachment("eth0", AttachmentKind.BRIDGE, "vmhost-br0", mac="00:16:3e:00:00:42")]
    definition = instance_definition(s, placement, nics, DEFAULT_POOL)
    ledger = {k: v for k, v in definition["config"].items() if k.startswith("user.vm-host.")}
    assert ledger == ledger_config(s, placement, nics, [f"{POOL}/vmhost-test-owned-data"])
    create_container(lxd, s.name, {"limits.cpu": "0,1", "limits.memory": "512MiB"} | ledger)
    create_container(
        lxd,
        "vmhost-test-foreign",
        {"limits.cpu": "1", "limits.memory": "256MiB"},
        {
            "eth0": {
                "type": "nic",
                "nictype": "bridged",
                "parent": "vmhost-br0",
                "hwaddr": "00:16:3e:00:00:43",
            }
        },
    )
    create_container(lxd, "vmhost-test-pinned", {"limits.cpu": "1-1", "limits.memory": "1GB"})
    records = {r.name: r for r in lxd.list_vms() if r.name.startswith(PREFIX)}
    assert set(records) == {"vmhost-test-owned", "vmhost-test-foreign", "vmhost-test-pinned"}
    owned = records["vmhost-test-owned"]
    assert owned.managed
    assert owned.placement == placement
    assert (owned.owner, owned.request_id) == ("relation:3:consumer", "db-0")
    assert owned.spec_hash == definition["config"]["user.vm-host.spec-hash"]
    assert owned.volumes == (f"{POOL}/vmhost-test-owned-data",)
    assert owned.interfaces == (
        {"label": "eth0", "mac": "00:16:3e:00:00:42", "attached-to": "vmhost-br0"},
    )
    assert owned.state is VmState.STOPPED
    assert len(owned.uuid) == 36
    foreign = records["vmhost-test-foreign"]
    assert not foreign.managed
    assert foreign.placement == Placement(vcpus=1, memory_mib=256)
    assert foreign.interfaces == (
        {"label": "eth0", "mac": "00:16:3e:00:00:43", "attached-to": "vmhost-br0"},
    )
    assert records["vmhost-test-pinned"].placement == Placement(
        vcpus=1, memory_mib=953, cells=(CellPlacement(0, 1, 953, (1,)),)
    )


@pytest.mark.usefixtures("clean")
def test_delete_removes_the_instance_and_exactly_its_volumes(lxd: LxdBackend) -> None:
    s = spec(name="vmhost-test-del")
    for pool, volume in [
        (POOL, "vmhost-test-del-data"),
        (DEFAULT_POOL, "vmhost-test-del-logs"),
        (DEFAULT_POOL, "vmhost-test-keep"),
    ]:
        create_volume(lxd, pool, volume)
    refs = [f"{POOL}/vmhost-test-del-data", f"{DEFAULT_POOL}/vmhost-test-del-logs"]
    create_container(lxd, s.name, ledger_config(s, Placement(1, 256), [], refs))
    create_container(lxd, "vmhost-test-foreign", {"limits.cpu": "1"})
    with pytest.raises(VmHostError, match="not created by vm-host"):
        lxd.delete("vmhost-test-foreign")
    with pytest.raises(VmHostError, match="does not exist"):
        lxd.delete("vmhost-test-nothing")
    lxd.delete(s.name)
    assert instance_names(lxd) == {"vmhost-test-foreign"}
    assert all_test_volumes(lxd) == {f"{DEFAULT_POOL}/vmhost-test-keep"}
    # The foreign instance was not touched.
    assert KEY_OWNER not in call(lxd, "GET", "/1.0/instances/vmhost-test-foreign")["config"]


@pytest.mark.usefixtures("clean")
def test_autostart_is_lxd_boot_autostart_and_read_back(lxd: LxdBackend) -> None:
    s = spec(name="vmhost-test-auto")
    create_container(lxd, s.name, ledger_config(s, Placement(1, 256), [], []))
    lxd.set_autostart(s.name, True)
    config = call(lxd, "GET", f"/1.0/instances/{s.name}")["config"]
    assert config["boot.autostart"] == "true"
    (record,) = [r for r in lxd.list_vms() if r.name == s.name]
    assert record.autostart
    lxd.set_autostart(s.name, False)
    assert call(lxd, "GET", f"/1.0/instances/{s.name}")["config"]["boot.autostart"] == "false"
    (record,) = [r for r in lxd.list_vms() if r.name == s.name]
    assert not record.autostart
    assert lxd.stop(s.name, 1, then_destroy=False)  # already stopped: off, nothing to do
    with pytest.raises(VmHostError, match="does not exist"):
        lxd.set_autostart("vmhost-test-nothing", True)


@pytest.mark.usefixtures("clean")
def test_an_image_by_name_is_pulled_by_the_real_lxd_and_a_failed_pull_leaves_nothing(
    lxd: LxdBackend, tmp_path: Path
) -> None:
    # The real daemon takes vm-host's pull request (fields it would refuse: 400) and reports
    # the pull's failure: the local mirror's index names an LXD VM image it does not serve.
    from tests.integration.test_guest_boot import mirror

    from vmhost import imagecache, images

    fingerprint = "cd" * 32
    product = images.StreamImage("24.04").product_id(images.host_arch())
    streams = tmp_path / "streams/v1"
    streams.mkdir(parents=True)
    index = {
        "format": "index:1.0",
        "index": {
            "images": {
                "datatype": "image-downloads",
                "format": "products:1.0",
                "path": "streams/v1/images.json",
                "products": [product],
            }
        },
    }
    item = {
        "ftype": "lxd.tar.xz",
        "path": "none/lxd.tar.xz",
        "size": 10,
        "sha256": "ab" * 32,
        "combined_disk-kvm-img_sha256": fingerprint,
    }
    products = {
        "format": "products:1.0",
        "datatype": "image-downloads",
        "content_id": "images",
        "products": {
            product: {
                "arch": "amd64",
                "os": "ubuntu",
                "release": "noble",
                "version": "24.04",
                "versions": {"20261201": {"items": {"lxd.tar.xz": item}}},
            }
        },
    }
    (streams / "index.json").write_text(json.dumps(index))
    (streams / "images.json").write_text(json.dumps(products))
    before = {i["fingerprint"] for i in lxd._store_images()}
    with pytest.raises(VmHostError, match=r"ubuntu@24\.04 is not in LXD's image store"):
        lxd.image_source("ubuntu@24.04")
    with mirror.serve(tmp_path) as url:
        settings = imagecache.Settings(
            source=images.Source(url=url, allow_unsigned=True), state_dir=str(tmp_path / "st")
        )
        with pytest.raises(images.ImageFetchError, match="LXD's pull failed") as failed:
            lxd.prepare_image("ubuntu@24.04", settings, wait=True)
    print(f"LXD's answer: {failed.value}")
    assert failed.value.reason == "unreachable"
    assert {i["fingerprint"] for i in lxd._store_images()} == before
    assert lxd._image_pull(fingerprint) is None  # no pull left running


@pytest.mark.usefixtures("clean")
def test_an_image_by_name_lands_in_lxds_store_and_is_what_the_vm_would_boot(
    lxd: LxdBackend, tmp_path: Path
) -> None:
    # A real LXD VM image (metadata tarball + qcow2 disk, fingerprint the sha256 of both)
    # served by the local mirror: LXD pulls it, and the name resolves to its fingerprint.
    import hashlib
    import io
    import tarfile

    from tests.integration.test_guest_boot import mirror

    from vmhost import imagecache, images

    arch = images.host_arch()
    meta = io.BytesIO()
    with tarfile.open(fileobj=meta, mode="w:xz") as tar:
        doc = f"architecture: {arch}\ncreation_date: 1764547200\n".encode()
        info = tarfile.TarInfo("metadata.yaml")
        info.size = len(doc)
        tar.addfile(info, io.BytesIO(doc))
    serve_dir = tmp_path / "mirror"
    (serve_dir / "img").mkdir(parents=True)
    (serve_dir / "img/lxd.tar.xz").write_bytes(meta.getvalue())
    disk = serve_dir / "img/disk-kvm.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    fingerprint = hashlib.sha256(meta.getvalue() + disk.read_bytes()).hexdigest()
    product = images.StreamImage("24.04").product_id(arch)
    items = {
        "lxd.tar.xz": {
            "ftype": "lxd.tar.xz",
            "path": "img/lxd.tar.xz",
            "size": len(meta.getvalue()),
            "sha256": hashlib.sha256(meta.getvalue()).hexdigest(),
            "combined_disk-kvm-img_sha256": fingerprint,
        },
        "disk-kvm.img": {
            "ftype": "disk-kvm.img",
            "path": "img/disk-kvm.img",
            "size": disk.stat().st_size,
            "sha256": hashlib.sha256(disk.read_bytes()).hexdigest(),
        },
    }
    streams = serve_dir / "streams/v1"
    streams.mkdir(parents=True)
    (streams / "index.json").write_text(json.dumps({
        "format": "index:1.0",
        "index": {"images": {"datatype": "image-downloads", "format": "products:1.0",
                             "path": "streams/v1/images.json", "products": [product]}},
    }))  # fmt: skip
    (streams / "images.json").write_text(json.dumps({
        "format": "products:1.0", "datatype": "image-downloads", "content_id": "images",
        "products": {product: {
            "arch": images.ARCHES.get(arch, arch), "os": "ubuntu", "release": "noble",
            "version": "24.04", "release_title": "24.04 LTS",
            "versions": {"20261201": {"items": items}},
        }},
    }))  # fmt: skip
    try:
        with mirror.serve(serve_dir) as url:
            settings = imagecache.Settings(
                source=images.Source(url=url, allow_unsigned=True),
                state_dir=str(tmp_path / "st"),
            )
            logged: list[str] = []
            assert (
                lxd.prepare_image("ubuntu@24.04", settings, wait=True, log=logged.append) is None
            )
        print(f"pulled: {logged}; store: {lxd._store_images()}")
        assert lxd.image_source("ubuntu@24.04") == {"type": "image", "fingerprint": fingerprint}
        assert lxd.prepare_image("ubuntu@24.04", settings, wait=False) is None  # cached
    finally:
        with contextlib.suppress(LxdError):
            lxd._call("DELETE", lxd._p(f"/1.0/images/{fingerprint}"))

"""The LXD instance definition for each kind of request, the ledger round trip and the readers.

All pure: the definitions are compared with the exact config and devices LXD gets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from mime import mime_parts
from tests.fixtures import LXD_RESOURCES

from vmhost import imagecache, images
from vmhost.backends import BackendUnavailableError
from vmhost.backends.lxd import (
    KEY_INTERFACES,
    KEY_OWNER,
    KEY_PLACEMENT,
    KEY_REQUEST_ID,
    KEY_SPEC_HASH,
    KEY_VOLUMES,
    LxdBackend,
    LxdVmUnsupportedError,
    check_hugepage_size,
    generate_mac,
    instance_definition,
    limits_cpu,
    parse_memory_mib,
    placement_from_limits,
    record_from_instance,
    vm_support_problem,
    volume_name,
)
from vmhost.backends.lxd_resources import parse_resources
from vmhost.codec import placement_to_dict
from vmhost.constraints import spec_hash
from vmhost.lxd_trust import LxdError
from vmhost.model import (
    AttachmentKind,
    CellPlacement,
    DiskSpec,
    HostTopology,
    InvalidRequestError,
    NicAttachment,
    Placement,
    VfAssignment,
    VmHostError,
    VmSpec,
    VmState,
)

FIXTURES = LXD_RESOURCES
TWO_NODES = parse_resources(json.loads((FIXTURES / "x86-2node-smt-sriov.json").read_text()))
BASE = {"security.secureboot": "false", "boot.autostart": "true"}
ROOT = {"type": "disk", "path": "/", "pool": "default", "size": "20GB"}


def spec(**kw: Any) -> VmSpec:
    values: dict[str, Any] = {
        "name": "web-1",
        "vcpus": 2,
        "memory_mib": 2048,
        "disks": (DiskSpec("root", 20),),
    }
    values.update(kw)
    return VmSpec(**values)


def pinned(cpus: tuple[int, ...], node: int = 0, memory: int = 2048) -> Placement:
    return Placement(
        vcpus=len(cpus),
        memory_mib=memory,
        cells=(CellPlacement(host_node=node, vcpus=len(cpus), memory_mib=memory, cpus=cpus),),
        emulator_cpus=(1,),
    )


def plain(config: dict[str, str]) -> dict[str, str]:
    """The config without the ledger keys (checked on their own)."""
    return {k: v for k, v in config.items() if not k.startswith("user.vm-host.")}


def test_shared_vm_without_nics_is_an_empty_vm_with_a_root_disk() -> None:
    s = spec()
    placement = Placement(vcpus=2, memory_mib=2048)
    d = instance_definition(s, placement, [], "default")
    assert d == {
        "name": "web-1",
        "type": "virtual-machine",
        "description": "vm-host VM web-1 for action",
        "profiles": [],
        "source": {"type": "none"},
        "config": {
            **BASE,
            "limits.cpu": "2",
            "limits.memory": "2048MiB",
            KEY_OWNER: "action",
            KEY_REQUEST_ID: "",
            KEY_SPEC_HASH: spec_hash(s),
            KEY_PLACEMENT: json.dumps(
                placement_to_dict(placement), sort_keys=True, separators=(",", ":")
            ),
            KEY_VOLUMES: "[]",
            KEY_INTERFACES: "[]",
        },
        "devices": {"root": ROOT},
    }


def test_pinned_vm_gets_the_allocators_cpu_set_and_its_node() -> None:
    d = instance_definition(spec(vcpus=4, pinned_count=4), pinned((2, 3, 6, 7)), [], "default")
    assert plain(d["config"]) == {
        **BASE,
        "limits.cpu": "2,3,6,7",
        "limits.cpu.nodes": "0",
        "limits.memory": "2048MiB",
    }


def test_one_pinned_cpu_is_written_as_a_range_not_a_count() -> None:
    assert limits_cpu(pinned((5,))) == "5-5"
    assert limits_cpu(Placement(vcpus=5, memory_mib=64)) == "5"


def test_hugepage_backed_shared_vm() -> None:
    placement = Placement(
        vcpus=2,
        memory_mib=2048,
        cells=(
            CellPlacement(
                host_node=1, vcpus=2, memory_mib=2048, hugepage_size_kib=2048, hugepages=1024
            ),
        ),
    )
    d = instance_definition(spec(), placement, [], "default")
    assert plain(d["config"]) == {
        **BASE,
        "limits.cpu": "2",
        "limits.cpu.nodes": "1",
        "limits.memory": "2048MiB",
        "limits.memory.hugepages": "true",
    }


def test_multi_node_pinned_vm_spans_both_nodes() -> None:
    placement = Placement(
        vcpus=4,
        memory_mib=4096,
        cells=(
            CellPlacement(host_node=0, vcpus=2, memory_mib=2048, cpus=(0, 1)),
            CellPlacement(host_node=1, vcpus=2, memory_mib=2048, cpus=(4, 5)),
        ),
    )
    d = instance_definition(spec(vcpus=4, pinned_count=4, numa_nodes=2), placement, [], "default")
    assert plain(d["config"]) == {
        **BASE,
        "limits.cpu": "0,1,4,5",
        "limits.cpu.nodes": "0-1",
        "limits.memory": "4096MiB",
    }


def test_bridged_macvlan_and_sriov_nics_boot_from_the_network_without_image() -> None:
    nics = [
        NicAttachment("0", AttachmentKind.BRIDGE, "br0", guest_name="eth0"),
        NicAttachment("data", AttachmentKind.DIRECT, "bond0", vlan=100, mac="00:16:3E:00:00:0A"),
        NicAttachment("fast", AttachmentKind.HOSTDEV, "enp5s0f0", vlan=200),
    ]
    placement = Placement(vcpus=2, memory_mib=2048, vfs=(VfAssignment("enp5s0f0"),))
    d = instance_definition(spec(), placement, nics, "default")
    mac0 = generate_mac("web-1", "0")
    mac2 = generate_mac("web-1", "fast")
    assert d["devices"] == {
        "root": ROOT,
        "eth0": {
            "type": "nic",
            "nictype": "bridged",
            "parent": "br0",
            "hwaddr": mac0,
            "boot.priority": "13",
        },
        "data": {
            "type": "nic",
            "nictype": "macvlan",
            "parent": "bond0",
            "hwaddr": "00:16:3e:00:00:0a",
            "vlan": "100",
            "boot.priority": "12",
        },
        "fast": {
            "type": "nic",
            "nictype": "sriov",
            "parent": "enp5s0f0",
            "hwaddr": mac2,
            "vlan": "200",
            "boot.priority": "11",
        },
    }
    assert plain(d["config"]) == {
        **BASE,
        "limits.cpu": "2",
        "limits.memory": "2048MiB",
        "volatile.eth0.hwaddr": mac0,
        "volatile.data.hwaddr": "00:16:3e:00:00:0a",
        "volatile.fast.hwaddr": mac2,
    }
    assert json.loads(d["config"][KEY_INTERFACES]) == [
        {"label": "0", "mac": mac0, "attached-to": "br0"},
        {"label": "data", "mac": "00:16:3e:00:00:0a", "attached-to": "bond0"},
        {"label": "fast", "mac": mac2, "attached-to": "enp5s0f0"},
    ]
    assert mac0.startswith("00:16:3e:")
    assert mac0 == generate_mac("web-1", "0")


def test_extra_disks_are_custom_volumes_in_their_pools() -> None:
    s = spec(disks=(DiskSpec("root", 20), DiskSpec("Data_1", 100, "ssd"), DiskSpec("logs", 5)))
    d = instance_definition(s, Placement(vcpus=2, memory_mib=2048), [], "default")
    assert d["devices"] == {
        "root": ROOT,
        "data-1": {"type": "disk", "pool": "ssd", "source": "web-1-data-1"},
        "logs": {"type": "disk", "pool": "default", "source": "web-1-logs"},
    }
    assert json.loads(d["config"][KEY_VOLUMES]) == ["ssd/web-1-data-1", "default/web-1-logs"]
    assert volume_name("web-1", "Data_1") == "web-1-data-1"


def test_root_disk_in_its_own_pool() -> None:
    s = spec(disks=(DiskSpec("root", 40, "fast"),))
    d = instance_definition(s, Placement(vcpus=2, memory_mib=2048), [], "default")
    assert d["devices"]["root"] == {"type": "disk", "path": "/", "pool": "fast", "size": "40GB"}


def test_static_ip_goes_to_cloud_init_network_config_keyed_by_mac() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMIanm1xVqZXAHMc2k3cQ2KZ4HqvbXNVHuUFuTDJ9WEq a@b"
    nics = [
        NicAttachment("eth0", AttachmentKind.BRIDGE, "br0", ip="10.0.5.9/24", guest_name="eth0"),
        NicAttachment("eth1", AttachmentKind.BRIDGE, "br1", mac="00:16:3e:00:00:01"),
    ]
    s = spec(user_data="#cloud-config\npackages: [htop]\n", ssh_public_keys=(key,))
    d = instance_definition(s, Placement(vcpus=2, memory_mib=2048), nics, "default")
    network = yaml.safe_load(d["config"]["cloud-init.network-config"])
    assert network == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": generate_mac("web-1", "eth0")},
                "set-name": "eth0",
                "addresses": ["10.0.5.9/24"],
            },
            "eth1": {
                "match": {"macaddress": "00:16:3e:00:00:01"},
                "set-name": "eth1",
                "dhcp4": True,
            },
        },
    }
    theirs, ours = mime_parts(d["config"]["cloud-init.user-data"])
    assert theirs[:2] == ("text/cloud-config", "#cloud-config\npackages: [htop]\n")
    assert yaml.safe_load(ours[1]) == {"hostname": "web-1", "ssh_authorized_keys": [key]}


def test_no_cloud_init_keys_without_user_data_keys_or_static_addresses() -> None:
    nics = [NicAttachment("eth0", AttachmentKind.BRIDGE, "br0")]
    d = instance_definition(spec(), Placement(vcpus=2, memory_mib=2048), nics, "default")
    assert not [k for k in d["config"] if k.startswith("cloud-init.")]


def test_image_alias_or_fingerprint_and_no_network_boot() -> None:
    nics = [NicAttachment("eth0", AttachmentKind.BRIDGE, "br0")]
    d = instance_definition(
        spec(image="jammy-vm"), Placement(vcpus=2, memory_mib=2048), nics, "default"
    )
    assert d["source"] == {"type": "image", "alias": "jammy-vm"}
    assert "boot.priority" not in d["devices"]["eth0"]
    fp = "a" * 64
    d = instance_definition(spec(image=fp), Placement(vcpus=2, memory_mib=2048), [], "default")
    assert d["source"] == {"type": "image", "fingerprint": fp}


@pytest.mark.parametrize(
    ("kw", "nics", "field"),
    [
        ({"name": "Bad_Name"}, [], "name"),
        ({"image": "/var/lib/images/jammy.img"}, [], "image"),
        ({"image": "has space"}, [], "image"),
        ({"disks": ()}, [], "storage"),
        ({"disks": (DiskSpec("root", 20, "Bad/Pool"),)}, [], "storage[root].pool"),
        ({}, [NicAttachment("eth0", AttachmentKind.BRIDGE, "br0;rm")], "interfaces[eth0].source"),
        (
            {},
            [NicAttachment("eth0", AttachmentKind.BRIDGE, "br0", mac="zz:00:00:00:00:00")],
            "interfaces[eth0].mac",
        ),
        ({}, [NicAttachment("eth0", AttachmentKind.BRIDGE, "br0", vlan=5000)], "interfaces[eth0]"),
        ({}, [NicAttachment("root", AttachmentKind.BRIDGE, "br0")], "interfaces[root]"),
    ],
)
def test_bad_names_are_refused_with_the_field(
    kw: dict[str, Any], nics: list[NicAttachment], field: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        instance_definition(spec(**kw), Placement(vcpus=2, memory_mib=2048), nics, "default")
    assert info.value.field.startswith(field)


def test_bad_default_pool_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="default-storage-pool"):
        instance_definition(spec(), Placement(vcpus=2, memory_mib=2048), [], "../x")


# ---------------------------------------------------------------------------------------------
# Ledger round trip


def instance_from(definition: dict[str, Any], status: str = "Stopped") -> dict[str, Any]:
    """What LXD returns for an instance created from a definition (plus its volatile keys)."""
    return {
        "name": definition["name"],
        "type": definition["type"],
        "status": status,
        "project": "vm-host",
        "config": {
            **definition["config"],
            "volatile.uuid": "6f1c0a0e-0000-4000-8000-000000000001",
        },
        "expanded_config": definition["config"],
        "devices": definition["devices"],
        "expanded_devices": definition["devices"],
    }


def no_topology() -> HostTopology:
    raise AssertionError("a managed instance must not need the host map")


@pytest.mark.parametrize(
    "placement",
    [
        Placement(vcpus=2, memory_mib=2048),
        pinned((2, 3, 6, 7)),
        Placement(
            vcpus=4,
            memory_mib=4096,
            cells=(
                CellPlacement(0, 2, 2048, (1, 0), hugepage_size_kib=2048, hugepages=1024),
                CellPlacement(1, 2, 2048, (5, 4), hugepage_size_kib=2048, hugepages=1024),
            ),
            emulator_cpus=(2, 3),
            vfs=(VfAssignment("eth0", 2),),
        ),
    ],
)
def test_ledger_round_trip(placement: Placement) -> None:
    s = spec(
        vcpus=placement.vcpus,
        owner="relation:7:consumer",
        request_id="db-0",
        disks=(DiskSpec("root", 20), DiskSpec("data", 10, "ssd")),
    )
    nics = [
        NicAttachment("eth0", AttachmentKind.BRIDGE, "br0"),
        NicAttachment("eth1", AttachmentKind.BRIDGE, "br1", space="data", subnet="10.0.5.0/24"),
    ]
    d = instance_definition(s, placement, nics, "default")
    record = record_from_instance(instance_from(d, "Running"), no_topology, "vm-host")
    assert record.managed
    assert record.name == "web-1"
    assert record.uuid == "6f1c0a0e-0000-4000-8000-000000000001"
    assert record.state is VmState.RUNNING
    assert record.placement == placement
    assert record.owner == "relation:7:consumer"
    assert record.request_id == "db-0"
    assert record.spec_hash == spec_hash(s)
    assert record.volumes == ("ssd/web-1-data",)
    assert record.interfaces == (
        {"label": "eth0", "mac": generate_mac("web-1", "eth0"), "attached-to": "br0"},
        {
            "label": "eth1",
            "mac": generate_mac("web-1", "eth1"),
            "attached-to": "br1",
            "space": "data",
            "subnet": "10.0.5.0/24",
        },
    )


def test_ledger_keys_in_another_project_are_not_ours() -> None:
    d = instance_definition(spec(), pinned((0, 1)), [], "default")
    instance = instance_from(d) | {"project": "default"}
    record = record_from_instance(instance, lambda: TWO_NODES, "vm-host")
    assert not record.managed
    assert record.name == "default/web-1"
    assert record.placement.pinned_cpus == (0, 1)


def test_unreadable_ledger_placement_falls_back_to_the_limits() -> None:
    d = instance_definition(spec(), pinned((4, 5)), [], "default")
    instance = instance_from(d)
    instance["config"][KEY_PLACEMENT] = "{not json"
    record = record_from_instance(instance, lambda: TWO_NODES, "vm-host")
    assert record.managed
    assert record.placement.pinned_cpus == (4, 5)
    assert record.placement.host_nodes == (1,)


# ---------------------------------------------------------------------------------------------
# Instances vm-host did not create


def foreign(config: dict[str, str], kind: str = "virtual-machine") -> dict[str, Any]:
    return {
        "name": "other",
        "type": kind,
        "status": "Stopped",
        "project": "vm-host",
        "config": config,
        "expanded_config": config,
        "expanded_devices": {
            "eth0": {"type": "nic", "nictype": "bridged", "parent": "br0"},
            "root": {"type": "disk", "path": "/", "pool": "default"},
        },
    }


def test_foreign_pinned_instance_is_split_by_the_nodes_of_its_cpus() -> None:
    cfg = {
        "limits.cpu": "0,4-5",
        "limits.memory": "3GiB",
        "volatile.eth0.hwaddr": "00:16:3e:1:2:3",
    }
    record = record_from_instance(foreign(cfg), lambda: TWO_NODES, "vm-host")
    assert not record.managed
    assert record.owner == ""
    assert record.placement == Placement(
        vcpus=3,
        memory_mib=3072,
        cells=(
            CellPlacement(host_node=0, vcpus=1, memory_mib=1024, cpus=(0,)),
            CellPlacement(host_node=1, vcpus=2, memory_mib=2048, cpus=(4, 5)),
        ),
    )
    assert record.interfaces == ({"label": "eth0", "mac": "00:16:3e:1:2:3", "attached-to": "br0"},)


def test_foreign_counts_defaults_and_hugepages() -> None:
    assert placement_from_limits({"limits.cpu": "4"}, "virtual-machine", no_topology) == (
        Placement(vcpus=4, memory_mib=1024)
    )
    assert placement_from_limits({}, "virtual-machine", no_topology) == Placement(1, 1024)
    assert placement_from_limits({}, "container", no_topology) == Placement(0, 0)
    huge = placement_from_limits(
        {
            "limits.cpu": "2",
            "limits.memory": "1GiB",
            "limits.memory.hugepages": "true",
            "limits.cpu.nodes": "1",
        },
        "virtual-machine",
        lambda: TWO_NODES,
    )
    assert huge == Placement(
        vcpus=2,
        memory_mib=1024,
        cells=(CellPlacement(1, 2, 1024, (), hugepage_size_kib=2048, hugepages=512),),
    )


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512MiB", 512),
        ("2GB", 1907),
        ("1073741824", 1024),
        ("1.5GiB", 1536),
        ("50%", 7959),
        ("", None),
        ("lots", None),
    ],
)
def test_parse_memory(text: str, mib: int | None) -> None:
    total = sum(n.memory_kib for n in TWO_NODES.nodes) // 1024
    assert parse_memory_mib(text, lambda: total) == mib


# ---------------------------------------------------------------------------------------------
# Host checks


def test_vm_support_from_the_server_environment() -> None:
    problem = vm_support_problem({"environment": {"driver": "lxc", "server_version": "5.0.2"}})
    assert problem is not None
    assert "qemu" in problem
    assert "lxc" in problem
    assert vm_support_problem({"environment": {"driver": "lxc | qemu"}}) is None
    typed = {"environment": {"driver": "lxc | qemu", "instance_types": ["container"]}}
    assert vm_support_problem(typed) is not None


def test_hugepage_size_must_be_the_host_default() -> None:
    cell = CellPlacement(0, 2, 2048, hugepage_size_kib=1048576, hugepages=2)
    with pytest.raises(VmHostError, match="default huge page size"):
        check_hugepage_size(Placement(2, 2048, (cell,)), 2048)
    check_hugepage_size(Placement(2, 2048, (cell,)), 1048576)
    check_hugepage_size(Placement(2, 2048), 2048)


def test_constructor_validates_the_project_and_contacts_nothing() -> None:
    backend = LxdBackend("vm-host", socket_path="/nonexistent/unix.socket")
    assert backend.name == "lxd"
    assert backend.project == "vm-host"
    with pytest.raises(InvalidRequestError, match="lxd-project"):
        LxdBackend("Bad Project")


# ---------------------------------------------------------------------------------------------
# The backend's call sequence, on an in-memory LXD (the real daemon is in tests/integration)


class FakeLxd:
    """Just enough of LXD's API, in memory, to follow compose, delete, start and list."""

    def __init__(self, driver: str = "lxc | qemu", extensions: tuple[str, ...] = ()):
        self.driver = driver
        self.extensions = list(extensions)
        self.instances: dict[str, dict[str, Any]] = {}
        self.volumes: dict[str, set[str]] = {"default": set(), "ssd": set()}
        self.fail_start: str | None = None
        self.calls: list[tuple[str, str]] = []
        self.patches: list[tuple[str, Any]] = []
        self.hugepages_size = 2 << 20
        self.store: list[dict[str, Any]] = [
            {"fingerprint": "ab" * 32, "aliases": [{"name": "jammy-vm"}]}
        ]
        """GET /1.0/images (set by the test)."""
        self.image_posts: list[Any] = []
        self.operations: dict[str, dict[str, Any]] = {}
        """Operation id -> what GET /1.0/operations/<id>/wait answers (set by the test)."""

    def projects(self) -> list[str]:
        return ["default", "vm-host"]

    def request_text(self, path: str) -> str:
        url = urlsplit(path)
        self.calls.append(("GET", url.path))
        name = url.path.strip("/").split("/")[2]
        return self.instances[name].get("console", "")

    def request(  # noqa: C901 - a router
        self, method: str, path: str, body: Any = None, *, wait: bool = True
    ) -> Any:
        url = urlsplit(path)
        query = parse_qs(url.query)
        parts = url.path.strip("/").split("/")[1:]
        self.calls.append((method, url.path))
        if parts == []:
            return {
                "environment": {"driver": self.driver, "server_version": "5.0.2"},
                "api_extensions": self.extensions,
            }
        if parts == ["resources"]:
            doc = json.loads((FIXTURES / "x86-2node-smt-sriov.json").read_text())
            doc["memory"]["hugepages_size"] = self.hugepages_size
            return doc
        if parts[0] == "instances" and method == "PATCH":
            return self._patch(parts[1], body)
        if parts[0] == "instances":
            return self._instances(method, parts[1:], query, body)
        if parts[0] == "storage-pools":
            if len(parts) == 1:
                return [f"/1.0/storage-pools/{p}" for p in self.volumes]
            pool = parts[1]
            if method == "GET":
                return [
                    f"/1.0/storage-pools/{pool}/volumes/custom/{v}" for v in self.volumes[pool]
                ]
            if method == "POST":
                self.volumes[pool].add(body["name"])
                return None
            if parts[-1] not in self.volumes[pool]:
                raise LxdError("Storage volume not found")
            self.volumes[pool].remove(parts[-1])
            return None
        if parts[0] == "images" and method == "POST":
            self.image_posts.append((body, wait))
            return {"id": f"op{len(self.image_posts)}", "status": "Running"}
        if parts[0] == "images":
            return self.store
        if parts == ["operations"]:
            ops = self.operations.items()
            return {"running": [{"id": i, "metadata": op.get("metadata")} for i, op in ops]}
        if parts[0] == "operations" and parts[-1] == "wait":
            return self.operations[parts[1]]
        raise AssertionError(f"unexpected call {method} {path}")

    def _patch(self, name: str, body: Any) -> None:
        """PATCH /1.0/instances/<name>: recorded; its config keys merged into the instance's."""
        self.patches.append((name, body))
        instance = self.instances[name]
        instance["config"] = {**instance["config"], **body.get("config", {})}

    def _instances(
        self, method: str, parts: list[str], query: dict[str, list[str]], body: Any
    ) -> Any:
        if not parts:
            if method == "POST":
                self.instances[body["name"]] = {
                    **body,
                    "status": "Stopped",
                    "project": "vm-host",
                    "config": {**body["config"], "volatile.uuid": "uuid-" + body["name"]},
                }
                return None
            if query.get("recursion") == ["1"]:
                return list(self.instances.values())
            return [f"/1.0/instances/{n}" for n in self.instances]
        instance = self.instances[parts[0]]
        if parts[1:] == ["state"]:
            if method == "GET":
                return {"status": instance["status"], "network": instance.get("network")}
            if body["action"] == "start":
                if self.fail_start:
                    raise LxdError(f"LXD operation failed: {self.fail_start}")
                instance["status"] = "Running"
            else:
                instance["status"] = "Stopped"
            return None
        if method == "DELETE":
            if instance["status"] != "Stopped":
                raise LxdError("Instance is running")
            del self.instances[parts[0]]
            return None
        return instance


def fake_backend(fake: FakeLxd) -> LxdBackend:
    backend = LxdBackend("vm-host", socket_path="/nonexistent/unix.socket")
    backend._client = fake  # type: ignore[assignment]
    return backend


TWO_CELLS = Placement(
    vcpus=2,
    memory_mib=2048,
    cells=(CellPlacement(0, 1, 1024, (0,)), CellPlacement(1, 1, 1024, (4,))),
)
DISKS = (DiskSpec("root", 20), DiskSpec("data", 10, "ssd"))


def test_compose_creates_volumes_then_the_instance_and_starts_it() -> None:
    fake = FakeLxd(extensions=("numa_cpu_placement",))
    s = spec(disks=DISKS, pinned_count=2, numa_nodes=2)
    record = fake_backend(fake).compose(s, TWO_CELLS, [], "default")
    assert fake.volumes["ssd"] == {"web-1-data"}
    posted = fake.instances["web-1"]
    expected = instance_definition(s, TWO_CELLS, [], "default")
    assert {k: posted[k] for k in expected if k != "config"} == {
        k: v for k, v in expected.items() if k != "config"
    }
    assert posted["config"]["limits.cpu.nodes"] == "0-1"
    assert posted["status"] == "Running"
    assert record.managed
    assert record.state is VmState.RUNNING
    assert record.placement == TWO_CELLS
    assert record.volumes == ("ssd/web-1-data",)
    order = [c for c in fake.calls if c[0] in ("POST", "PUT")]
    assert order == [
        ("POST", "/1.0/storage-pools/ssd/volumes/custom"),
        ("POST", "/1.0/instances"),
        ("PUT", "/1.0/instances/web-1/state"),
    ]


def test_compose_leaves_limits_cpu_nodes_out_where_lxd_lacks_the_extension() -> None:
    fake = FakeLxd()
    fake_backend(fake).compose(spec(pinned_count=2), TWO_CELLS, [], "default", start=False)
    assert "limits.cpu.nodes" not in fake.instances["web-1"]["config"]
    assert fake.instances["web-1"]["config"]["limits.cpu"] == "0,4"
    assert fake.instances["web-1"]["status"] == "Stopped"


def test_start_failure_removes_the_instance_and_the_volumes() -> None:
    fake = FakeLxd()
    fake.fail_start = "Failed to start device eth0: parent br9 not found"
    with pytest.raises(VmHostError, match=r"starting the instance failed.*br9.*nothing was left"):
        fake_backend(fake).compose(spec(disks=DISKS), Placement(2, 2048), [], "default")
    assert fake.instances == {}
    assert fake.volumes == {"default": set(), "ssd": set()}


def test_no_qemu_driver_is_refused_at_start_with_the_reason_and_rolled_back() -> None:
    fake = FakeLxd(driver="lxc")
    with pytest.raises(LxdVmUnsupportedError, match="qemu driver is not operational"):
        fake_backend(fake).compose(spec(disks=DISKS), Placement(2, 2048), [], "default")
    assert ("PUT", "/1.0/instances/web-1/state") not in fake.calls
    assert fake.instances == {}
    assert fake.volumes["ssd"] == set()


def test_refusals_before_anything_is_created() -> None:
    fake = FakeLxd()
    backend = fake_backend(fake)
    backend.compose(spec(), Placement(2, 2048), [], "default", start=False)
    with pytest.raises(VmHostError, match="already exists in LXD project"):
        backend.compose(spec(disks=DISKS), Placement(2, 2048), [], "default")
    fake.volumes["ssd"].add("web-2-data")
    with pytest.raises(VmHostError, match="already exists in pool 'ssd'"):
        backend.compose(spec(name="web-2", disks=DISKS), Placement(2, 2048), [], "default")
    with pytest.raises(VmHostError, match="nopool does not exist"):
        backend.compose(
            spec(name="web-3", disks=(DiskSpec("root", 20, "nopool"),)),
            Placement(2, 2048),
            [],
            "default",
        )
    with pytest.raises(VmHostError, match="not in LXD's image store"):
        backend.compose(spec(name="web-4", image="focal"), Placement(2, 2048), [], "default")
    huge = Placement(2, 2048, (CellPlacement(0, 2, 2048, (), 1048576, 2),))
    with pytest.raises(VmHostError, match="default huge page size"):
        backend.compose(spec(name="web-5"), huge, [], "default")
    assert set(fake.instances) == {"web-1"}
    assert fake.volumes == {"default": set(), "ssd": {"web-2-data"}}


def test_image_from_the_store_is_found_by_alias_and_fingerprint() -> None:
    fake = FakeLxd()
    backend = fake_backend(fake)
    backend.compose(spec(image="jammy-vm"), Placement(2, 2048), [], "default", start=False)
    backend.compose(spec(name="web-2", image="abab" * 4), Placement(2, 2048), [], "default")
    assert fake.instances["web-1"]["source"] == {"type": "image", "alias": "jammy-vm"}
    assert fake.instances["web-2"]["source"]["fingerprint"] == "abab" * 4


def test_delete_stops_and_removes_exactly_the_recorded_volumes() -> None:
    fake = FakeLxd()
    backend = fake_backend(fake)
    backend.compose(spec(disks=DISKS), Placement(2, 2048), [], "default")
    fake.volumes["ssd"].add("keep-me")
    backend.delete("web-1")
    assert fake.instances == {}
    assert fake.volumes == {"default": set(), "ssd": {"keep-me"}}


def test_delete_tolerates_a_volume_already_gone_and_refuses_foreign_instances() -> None:
    fake = FakeLxd()
    backend = fake_backend(fake)
    backend.compose(spec(disks=DISKS), Placement(2, 2048), [], "default", start=False)
    fake.volumes["ssd"].clear()
    backend.delete("web-1")
    assert fake.instances == {}
    fake.instances["other"] = {"name": "other", "status": "Stopped", "config": {}}
    with pytest.raises(VmHostError, match="not created by vm-host"):
        backend.delete("other")
    with pytest.raises(VmHostError, match="does not exist"):
        backend.delete("ghost")
    assert "other" in fake.instances


def test_start_stop_and_list() -> None:
    fake = FakeLxd()
    backend = fake_backend(fake)
    backend.compose(spec(), Placement(2, 2048), [], "default", start=False)
    backend.start("web-1")
    backend.start("web-1")  # already running: nothing to do
    assert fake.instances["web-1"]["status"] == "Running"
    backend.stop("web-1")
    assert fake.instances["web-1"]["status"] == "Stopped"
    (record,) = backend.list_vms()
    assert (record.name, record.state, record.uuid) == ("web-1", VmState.STOPPED, "uuid-web-1")
    assert backend.version() == "5.0.2"


def test_unreachable_daemon_is_backend_unavailable() -> None:
    backend = LxdBackend("vm-host", socket_path="/nonexistent/unix.socket")
    with pytest.raises(BackendUnavailableError, match="is LXD running"):
        backend.version()


def test_set_owner_patches_only_the_owner_key_of_a_vm_host_instance() -> None:
    fake = FakeLxd()
    backend = fake_backend(fake)
    backend.compose(spec(owner="relation:7:pg"), Placement(2, 2048), [], "default", start=False)
    backend.set_owner("web-1", "released:pg:vm-host:5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f")
    assert fake.patches == [
        (
            "web-1",
            {"config": {KEY_OWNER: "released:pg:vm-host:5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f"}},
        )
    ]
    (record,) = backend.list_vms()
    assert record.owner.startswith("released:pg:")
    fake.instances["other"] = {"name": "other", "status": "Stopped", "config": {}}
    with pytest.raises(VmHostError, match="not created by vm-host"):
        backend.set_owner("other", "action")
    assert len(fake.patches) == 1


def test_guest_addresses_and_console_log_come_from_the_instance() -> None:
    fake = FakeLxd()
    backend = fake_backend(fake)
    fake.instances["web-1"] = {"name": "web-1", "status": "Running", "project": "vm-host"}
    fake.instances["web-1"]["network"] = {
        "eth0": {
            "hwaddr": "00:16:3E:00:00:01",
            "addresses": [
                {"family": "inet", "address": "10.0.0.7", "scope": "global"},
                {"family": "inet6", "address": "fe80::1", "scope": "link"},
            ],
        },
        "lo": {"hwaddr": "", "addresses": [{"address": "127.0.0.1", "scope": "local"}]},
    }
    fake.instances["web-1"]["console"] = "a\r\nb\nc\n"
    assert backend.guest_addresses(["web-1"]) == {"web-1": {"00:16:3e:00:00:01": ["10.0.0.7"]}}
    assert backend.console_log("web-1", 2) == "b\nc"
    with pytest.raises(InvalidRequestError, match="lines"):
        backend.console_log("web-1", 0)


# -- images by name on LXD: LXD's own store, pulled from image-source


def vm_image(fingerprint: str, version: str, serial: str, **kw: Any) -> dict[str, Any]:
    props = {"os": "Ubuntu", "version": version, "architecture": "amd64", "serial": serial}
    return {
        "fingerprint": fingerprint,
        "type": kw.pop("type", "virtual-machine"),
        "properties": {**props, **kw},
        "aliases": [],
    }


def test_a_stream_name_boots_the_newest_vm_image_of_that_release_in_lxds_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(images, "host_arch", lambda: "x86_64")
    fake = FakeLxd()
    fake.store = [
        vm_image("11" * 32, "24.04", "20261101"),
        vm_image("22" * 32, "24.04", "20261201"),
        vm_image("33" * 32, "24.04", "20261215", type="container"),  # not a VM image
        vm_image("44" * 32, "24.04", "20261220", architecture="arm64"),
        vm_image("55" * 32, "22.04", "20261230"),
    ]
    backend = fake_backend(fake)
    for name in ("ubuntu@24.04", "noble", "24.04"):
        assert backend.image_source(name) == {"type": "image", "fingerprint": "22" * 32}
    backend.compose(spec(image="ubuntu@24.04"), Placement(2, 2048), [], "default", start=False)
    assert fake.instances["web-1"]["source"] == {"type": "image", "fingerprint": "22" * 32}


def test_a_stream_name_lxd_does_not_have_is_refused_naming_sync_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(images, "host_arch", lambda: "x86_64")
    fake = FakeLxd()
    backend = fake_backend(fake)
    with pytest.raises(
        VmHostError, match=r"ubuntu@22\.04 is not in LXD's image store.*sync-images"
    ):
        backend.compose(spec(image="ubuntu@22.04"), Placement(2, 2048), [], "default")
    assert "web-1" not in fake.instances
    with pytest.raises(VmHostError, match=r"lxc image import FILE --alias web\`"):
        backend.compose(spec(image="local:web"), Placement(2, 2048), [], "default")
    assert "web-1" not in fake.instances


def write_stream(root: Path, items: dict[str, Any]) -> images.Source:
    """An unsigned simplestreams tree (index + one products file) under root."""
    product = "com.ubuntu.cloud:server:24.04:amd64"
    (root / "streams/v1").mkdir(parents=True)
    (root / "streams/v1/index.json").write_text(
        json.dumps(
            {
                "index": {
                    "downloads": {
                        "datatype": "image-downloads",
                        "path": "streams/v1/products.json",
                        "products": [product],
                    }
                }
            }
        )
    )
    (root / "streams/v1/products.json").write_text(
        json.dumps({"products": {product: {"versions": items}}})
    )
    return images.Source(url=f"file://{root}/", allow_unsigned=True)


def test_prepare_image_asks_lxd_to_pull_the_fingerprint_the_index_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "host_arch", lambda: "x86_64")
    combined = "cd" * 32
    source = write_stream(
        tmp_path,
        {
            "20261101": {"items": {"lxd.tar.xz": {"combined_disk-kvm-img_sha256": "ef" * 32}}},
            "20261201": {"items": {"lxd.tar.xz": {"combined_disk-kvm-img_sha256": combined}}},
        },
    )
    settings = imagecache.Settings(source=source, state_dir=str(tmp_path / "state"))
    fake = FakeLxd()
    backend = fake_backend(fake)

    # A hook: the pull starts as LXD's background operation and the answer says so.
    waiting = backend.prepare_image("ubuntu@24.04", settings, wait=False)
    assert waiting == "downloading ubuntu@24.04 20261201 into LXD's image store"
    ((body, waited),) = fake.image_posts
    assert waited is False
    assert body["source"] == {
        "type": "image",
        "mode": "pull",
        "server": source.url,
        "protocol": "simplestreams",
        "fingerprint": combined,
        "image_type": "virtual-machine",
    }
    # The next hook finds that operation running and starts no second pull.
    fake.operations["op1"] = {"metadata": {"fingerprint": combined}, "status": "Running"}
    assert backend.prepare_image("ubuntu@24.04", settings, wait=False) == waiting
    assert len(fake.image_posts) == 1

    # compose-vm waits for it; then the store has the image and composes from it.
    fake.operations["op1"] = {"metadata": {"fingerprint": combined}, "status": "Success"}
    fake.store.append(vm_image(combined, "24.04", "20261201"))
    assert backend.prepare_image("ubuntu@24.04", settings, wait=True) is None
    assert len(fake.image_posts) == 1
    assert backend.image_source("ubuntu@24.04") == {"type": "image", "fingerprint": combined}


def test_a_failed_pull_or_an_index_without_an_lxd_image_names_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "host_arch", lambda: "x86_64")
    combined = "cd" * 32
    source = write_stream(
        tmp_path / "ok",
        {"20261201": {"items": {"lxd.tar.xz": {"combined_disk-kvm-img_sha256": combined}}}},
    )
    fake = FakeLxd()
    backend = fake_backend(fake)
    fake.operations["op1"] = {"status": "Failure", "err": "403 from the mirror"}
    settings = imagecache.Settings(source=source, state_dir=str(tmp_path / "state"))
    with pytest.raises(images.ImageFetchError, match="LXD's pull failed: 403 from the mirror"):
        backend.prepare_image("ubuntu@24.04", settings, wait=True)

    bare = write_stream(tmp_path / "bare", {"20261201": {"items": {"disk1.img": {}}}})
    settings = imagecache.Settings(source=bare, state_dir=str(tmp_path / "state"))
    with pytest.raises(images.ImageFetchError, match="no version with an LXD VM image") as exc:
        backend.prepare_image("ubuntu@24.04", settings, wait=False)
    assert exc.value.reason == "not-found"
    assert len(fake.image_posts) == 1  # only the first, failed pull

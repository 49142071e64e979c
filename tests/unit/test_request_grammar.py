"""The library's grammar and the workload's checks agree: one set of limits.

Every request the library accepts either builds a spec or is answered failed naming a
field, and the limits the library enforces are the ones the workload enforces.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import charm
from charms.vm_host.v0 import vm_host as lib
from vmhost import constraints, pools
from vmhost.config import ComposeParams
from vmhost.model import VmSpec
from vmhost.relation.serve import build_request
from vmhost.topology import format_cpu_list

FIELDS = (
    "memory",
    "cores",
    "pinned-cores",
    "numa-nodes",
    "hugepages",
    "storage",
    "interfaces",
    "image",
    "user-data",
    "ssh-public-keys",
    "name",
    "id",
)


def test_the_library_and_the_workload_share_one_set_of_limits():
    assert lib.MAX_CORES == constraints.MAX_CORES
    assert lib.MIN_MEMORY_MIB == constraints.MIN_MEMORY_MIB
    assert lib.MAX_MEMORY_MIB == constraints.MAX_MEMORY_MIB
    assert lib.MAX_NUMA_NODES == constraints.MAX_NUMA_NODES
    assert lib.MAX_SSH_KEYS == constraints.MAX_SSH_KEYS
    assert lib.MAX_DISKS == constraints.MAX_DISKS
    assert lib.MAX_INTERFACES == constraints.MAX_INTERFACES
    assert lib.MAX_TAGS == constraints.MAX_TAGS
    assert lib._MAX_DISK_GB == constraints.MAX_DISK_GB  # pyright: ignore[reportPrivateUsage]


def _bare(pattern: str) -> str:
    """A pattern without its anchors and without grouping-only '?:' (both match the same)."""
    return pattern.removeprefix("^").removesuffix("$").replace("(?:", "(")


@pytest.mark.parametrize(
    ("library", "workload"),
    [
        ("_LABEL_RE", constraints.LABEL_PATTERN),
        ("_SPACE_RE", constraints.SPACE_PATTERN),
        ("_DEVICE_RE", constraints.HOST_DEVICE_PATTERN),
        ("_POOL_RE", constraints.NAME_PATTERN),
        ("_NAME_RE", constraints.TAG_PATTERN),
        ("_ID_RE", constraints.REQUEST_ID_PATTERN),
        ("_RESOURCE_POOL_RE", pools.POOL_NAME),
    ],
)
def test_the_library_and_the_workload_share_one_set_of_name_rules(
    library: str, workload: re.Pattern[str]
):
    rule = getattr(lib, library)
    rule = rule.pattern if isinstance(rule, re.Pattern) else rule
    assert _bare(rule) == _bare(workload.pattern)


def near(low: int, high: int) -> st.SearchStrategy[int]:
    """Values at and around both ends of a range, and some inside it."""
    edges = [low - 1, low, low + 1, high - 1, high, high + 1]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


labels = st.from_regex(r"\A[a-z][a-z0-9]{0,6}\Z")
disks = st.fixed_dictionaries(
    {"label": labels, "size-gb": near(1, constraints.MAX_DISK_GB)},
    optional={"pool": st.sampled_from(["ssd", "default", "vm-host"])},
)
nics = st.fixed_dictionaries(
    {"label": labels},
    optional={
        "space": st.sampled_from(["storage", "public", "a-b"]),
        "vlan": near(0, 4094),
        "mode": st.sampled_from(["bridge", "macvtap", "sriov"]),
        "ip": st.sampled_from(["10.0.5.20", "fd00::5"]),
        "subnet": st.sampled_from(["10.0.5.0/24", "fd00::/64"]),
    },
)
requests = st.fixed_dictionaries(
    {"id": st.from_regex(r"\A[a-z0-9-]{1,40}\Z")},
    optional={
        "memory": st.one_of(
            near(constraints.MIN_MEMORY_MIB, constraints.MAX_MEMORY_MIB),
            st.sampled_from([1024, 2048, 1000, 4096, 1 << 20]),
        ),
        "cores": near(1, constraints.MAX_CORES),
        "pinned-cores": st.one_of(
            near(1, constraints.MAX_CORES),
            st.lists(st.integers(0, 70000), min_size=1, max_size=12),
        ),
        "numa-nodes": near(1, constraints.MAX_NUMA_NODES),
        "hugepages": st.sampled_from(["2M", "1G", "any"]),
        "storage": st.one_of(
            st.lists(disks, max_size=4), st.sampled_from(["root:20,data:100(ssd)", "50"])
        ),
        "interfaces": st.one_of(
            st.lists(nics, max_size=3),
            st.sampled_from(["eth0:space=storage", "eth0:space=a;eth1:vlan=5,mode=macvtap"]),
        ),
        "image": st.sampled_from(["ubuntu/24.04", "/var/lib/images/x.img", "noble"]),
        "user-data": st.sampled_from(["#cloud-config\n{}\n", "not yaml: [", ""]),
        "ssh-public-keys": st.lists(
            st.sampled_from(["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB x", "ssh-rsa AAAA y"]),
            max_size=3,
        ),
    },
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_every_accepted_request_builds_a_spec_or_fails_naming_a_field(request: dict[str, Any]):
    valid, invalid = lib.parse_requests({"version": '"0"', "requests": json.dumps([request])})
    for refused in invalid:
        assert refused.reason
    for accepted in valid:
        wire = accepted.model_dump(mode="json", by_alias=True, exclude_none=True)
        built = build_request(7, "app", wire, default_root_gb=20)
        assert built is not None
        if built.spec is None:
            assert built.error is not None
            field = built.error.split(":", 1)[0].split("[", 1)[0].split(".", 1)[0]
            assert field in FIELDS, built.error
        else:
            assert built.spec.request_id == accepted.id
            assert built.spec.memory_mib == accepted.memory


# MAAS strings from the grammar's pieces, good and bad: labels, keys (MAAS ones vm-host refuses
# too), values, separators.
_maas_nic = st.tuples(
    st.sampled_from(["eth0", "0", "data", "_x", ""]),
    st.lists(
        st.tuples(
            st.sampled_from(
                ["space", "vid", "vlan", "subnet_cidr", "ip", "mode", "bridge", "fabric", "Mode"]
            ),
            st.sampled_from(["oam", "5", "4095", "10.0.5.0/24", "10.0.5.1", "sriov", "br0", ""]),
        ),
        max_size=3,
    ),
).map(lambda nic: nic[0] + ":" + ",".join(f"{k}={v}" for k, v in nic[1]))
maas_interfaces = st.lists(_maas_nic, min_size=1, max_size=3).map(";".join)
maas_storage = st.lists(
    st.tuples(
        st.sampled_from(["root:", "data:", "", "x y:"]),
        st.sampled_from(["20", "0", "65537", "1.5", ""]),
        st.sampled_from(["", "(ssd)", "(a,b)", "(", "(Bad)"]),
    ).map("".join),
    min_size=1,
    max_size=3,
).map(",".join)


@settings(max_examples=300)
@given(storage=st.none() | maas_storage, interfaces=st.none() | maas_interfaces)
def test_a_maas_string_means_the_same_from_compose_vm_and_from_a_relation(
    storage: str | None, interfaces: str | None
):
    # compose-vm: the charm reads the strings with the library's grammar, then the workload.
    params = ComposeParams(name="vm", memory=1024, storage=storage, interfaces=interfaces)
    try:
        handed = params.read_by(charm.wire_request)
        by_action: tuple[Any, Any] | str = (
            constraints.parse_storage(handed.storage),
            constraints.parse_interfaces(handed.interfaces),
        )
    except (ValueError, constraints.InvalidRequestError) as exc:
        by_action = str(exc)
    # A relation request with the same strings: the library's model, then the workload.
    wire = {"id": "r", "memory": 1024, "storage": storage, "interfaces": interfaces}
    valid, invalid = lib.parse_requests({"version": '"0"', "requests": json.dumps([wire])})
    if invalid:
        by_relation: tuple[Any, Any] | str = invalid[0].reason
    else:
        dumped = valid[0].model_dump(mode="json", by_alias=True, exclude_none=True)
        try:
            by_relation = (
                constraints.parse_storage(dumped.get("storage")),
                constraints.parse_interfaces(dumped.get("interfaces")),
            )
        except constraints.InvalidRequestError as exc:
            by_relation = str(exc)
    assert isinstance(by_action, str) == isinstance(by_relation, str), (by_action, by_relation)
    if not isinstance(by_action, str):
        assert by_action == by_relation


def _action_cpus(cpus: list[int]) -> str:
    """A CPU list as compose-vm takes it: digits alone are a count, so one CPU is "N-N"."""
    return format_cpu_list(cpus) if len(cpus) > 1 else f"{cpus[0]}-{cpus[0]}"


@settings(max_examples=300)
@given(
    cpus=st.none() | st.lists(st.integers(0, 40), min_size=1, max_size=6, unique=True),
    count=st.none() | near(1, constraints.MAX_CORES),
    cores=st.none() | st.integers(0, 8),
    tags=st.lists(st.sampled_from(["db", "prod", "a.b", "x y", "-z"]), max_size=3),
    storage=st.none() | maas_storage,
    interfaces=st.none() | maas_interfaces,
)
def test_compose_vm_and_a_relation_request_build_the_same_spec(
    cpus: list[int] | None,
    count: int | None,
    cores: int | None,
    tags: list[str],
    storage: str | None,
    interfaces: str | None,
):
    pinned: list[int] | int | None = cpus if cpus is not None else count
    # The action: its own string forms ("2,3,6-7", "db,prod"), through the charm's reading.
    params = ComposeParams(
        name="vm",
        memory=1024,
        cores=cores,
        pinned_cores=_action_cpus(cpus) if cpus else (None if count is None else str(count)),
        tags=",".join(tags) or None,
        storage=storage,
        interfaces=interfaces,
    )
    try:
        read = params.read_by(charm.wire_request)
        by_action: VmSpec | None = constraints.build_spec(
            name="vm",
            cores=read.cores,
            memory_mib=read.memory,
            pinned_cores=read.pinned_cores,
            storage=read.storage,
            interfaces=read.interfaces,
            tags=read.tags,
        )
    except (ValueError, constraints.InvalidRequestError):
        by_action = None
    # A relation request: the requester's forms (a CPU list, a list of tags).
    wire = {"id": "r", "memory": 1024, "cores": cores, "pinned-cores": pinned, "tags": tags}
    wire |= {"storage": storage, "interfaces": interfaces}
    valid, _ = lib.parse_requests(
        {
            "version": '"0"',
            "requests": json.dumps([{k: v for k, v in wire.items() if v is not None}]),
        }
    )
    built = None
    if valid:
        dumped = valid[0].model_dump(mode="json", by_alias=True, exclude_none=True)
        built = build_request(7, "app", dumped, default_root_gb=20)
    by_relation = built.spec if built is not None else None
    assert (by_action is None) == (by_relation is None), (by_action, built)
    if by_action is not None and by_relation is not None:
        same = dataclasses.replace(by_relation, name="vm", owner="action", request_id="")
        assert by_action == same

"""The library's grammar and the workload's checks agree: one set of limits.

Every request the library accepts either builds a spec or is answered failed naming a
field, and the limits the library enforces are the ones the workload enforces.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charms.vm_host.v0 import vm_host as lib
from vmhost import constraints
from vmhost.relation.serve import build_request

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

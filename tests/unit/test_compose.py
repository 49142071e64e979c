"""The one compose path: name, NICs, placement, backend, dry run; actions and relations alike."""

from __future__ import annotations

from dataclasses import replace

import pytest

from charms.vm_host.v0.vm_host import VmRequest
from fake_backend import FakeBackend
from vmhost.compose import HostState, Outcome, book_disks, compose, deletable, name_taken
from vmhost.constraints import build_spec, spec_hash
from vmhost.model import (
    AttachmentKind,
    Cpu,
    HostNic,
    HostTopology,
    NicKind,
    NumaNode,
    Placement,
    Policy,
    VfAssignment,
    VmRecord,
    VmSpec,
    VmState,
)
from vmhost.networks import NetworkMapping, default_network_problem, parse_networks_config


def host(cpus: int = 4) -> HostTopology:
    return HostTopology(
        nodes=(
            NumaNode(
                id=0,
                cpus=tuple(Cpu(id=c, socket_id=0, core_id=c) for c in range(cpus)),
                memory_kib=8 * 1024 * 1024,
                distances={0: 10},
            ),
        ),
        nics=(HostNic("br0", kind=NicKind.BRIDGE),),
    )


def state(backend: FakeBackend, default_network: str = "br0") -> HostState:
    backend.ensure_pool("vm-host", "/var/lib/vm-host/images")  # 100 GB free
    return HostState(
        backend.topology(), backend.list_vms(), Policy(), {}, "vm-host", default_network
    )


def spec(name: str = "web", **fields: object) -> VmSpec:
    fields.setdefault("memory_mib", 1024)
    if isinstance(fields.get("interfaces"), str):
        # A MAAS string as a requirer may send it: the vm_host library reads it.
        wire = VmRequest.model_validate({"id": "x", "interfaces": fields["interfaces"]})
        fields["interfaces"] = wire.model_dump(mode="json", by_alias=True, exclude_none=True)[
            "interfaces"
        ]
    return build_spec(name=name, **fields)  # type: ignore[arg-type]


def record_of(s: VmSpec) -> VmRecord:
    return VmRecord(
        name=s.name,
        uuid="u",
        state=VmState.RUNNING,
        placement=Placement(vcpus=s.vcpus, memory_mib=s.memory_mib),
        spec_hash=spec_hash(s),
    )


def composes(backend: FakeBackend) -> list[str]:
    return [c for c in backend.calls if c.startswith("compose:")]


def test_composes_and_returns_the_record():
    backend = FakeBackend(host=host())
    got = compose(backend, spec(), state(backend))
    assert got.vm is not None
    assert got.vm.name == "web"
    assert got.error is None
    assert composes(backend) == ["compose:web"]


def test_dry_run_places_and_composes_nothing():
    backend = FakeBackend(host=host())
    got = compose(backend, spec(pinned_cores=2), state(backend), dry_run=True)
    assert got.vm is None
    assert got.placement is not None
    assert len(got.placement.pinned_cpus) == 2
    assert composes(backend) == []


def test_a_taken_name_is_refused_before_anything_else():
    backend = FakeBackend(host=host())
    compose(backend, spec(), state(backend))
    again = compose(backend, spec(), state(backend))
    assert again.vm is None
    assert "already exists" in again.refused
    assert "choose another name" in again.refused
    assert composes(backend) == ["compose:web"]


def test_a_relation_spec_is_told_to_use_another_id():
    backend = FakeBackend(host=host())
    compose(backend, spec(), state(backend))
    relation = spec(owner="relation:1:app", request_id="x")
    assert "request it under another id" in (name_taken(relation, backend.list_vms()) or "")


def test_unknown_space_is_refused_naming_the_interface():
    backend = FakeBackend(host=host())
    got = compose(
        backend, spec(interfaces=[{"label": "eth0", "space": "nowhere"}]), state(backend)
    )
    assert got.vm is None
    assert got.refused
    assert "eth0" in got.refused or "interfaces" in got.refused
    assert composes(backend) == []


def test_what_does_not_fit_is_rejected_with_the_allocators_reason():
    backend = FakeBackend(host=host(cpus=2))
    got = compose(backend, spec(pinned_cores=4), state(backend))
    assert got.vm is None
    assert got.rejected
    assert got.error == got.rejected
    assert composes(backend) == []


def test_a_failing_hypervisor_is_reported_as_rolled_back():
    backend = FakeBackend(host=host(), fail_compose="disk full")
    got = compose(backend, spec(), state(backend))
    assert got.vm is None
    assert got.error == "compose failed and was rolled back: disk full"


def test_progress_hears_the_nodes_before_the_slow_part():
    backend = FakeBackend(host=host())
    heard: list[str] = []
    compose(backend, spec(pinned_cores=1), state(backend), progress=heard.append)
    assert heard == ["composing web on host nodes [0]"]
    assert Outcome(spec()).error is None


def test_only_action_vms_are_deletable_by_name():
    backend = FakeBackend(host=host())
    compose(backend, spec("ops"), state(backend))
    compose(backend, spec("pg-1-db", owner="relation:1:pg", request_id="db"), state(backend))
    vms = backend.list_vms()
    got = deletable(vms, "ops", owner="action")
    assert not isinstance(got, str)
    assert got.name == "ops"
    assert "belongs to relation:1:pg" in str(deletable(vms, "pg-1-db", owner="action"))
    assert str(deletable(vms, "nope", owner="action")) == (
        "no VM named 'nope'; VMs composed by vm-host: ops, pg-1-db"
    )


# ---------------------------------------------------------------------------------------------
# The default NIC of a request without interfaces

MAPPING = {
    "oam": NetworkMapping("oam", AttachmentKind.BRIDGE, "br0"),
    "data": NetworkMapping("data", AttachmentKind.DIRECT, "eno1"),
}


def nics_of(backend: FakeBackend, name: str = "web") -> list[tuple[str, str, str]]:
    _, nics = backend.composed[name]
    return [(n.label, n.kind.value, n.source) for n in nics]


def test_default_network_may_name_a_host_bridge():
    backend = FakeBackend(host=host())
    got = compose(backend, spec(), state(backend, "br0"))
    assert got.vm is not None
    assert nics_of(backend) == [("eth0", "bridge", "br0")]
    # The spec stays without interfaces: its hash does not depend on host config.
    assert backend.composed["web"][0].interfaces == ()


def test_default_network_may_name_a_space_of_networks():
    backend = FakeBackend(host=host())
    hs = replace(state(backend, "oam"), networks=MAPPING)
    assert compose(backend, spec(), hs).vm is not None
    assert nics_of(backend) == [("eth0", "bridge", "br0")]


def test_without_default_network_the_one_mapped_space_is_the_default():
    backend = FakeBackend(host=host())
    hs = replace(state(backend, ""), networks={"oam": MAPPING["oam"]})
    assert compose(backend, spec(), hs).vm is not None
    assert nics_of(backend) == [("eth0", "bridge", "br0")]


@pytest.mark.parametrize(
    ("mapping", "phrase"),
    [({}, "networks maps no space"), (MAPPING, "networks maps 2 spaces (data, oam)")],
)
def test_without_a_default_network_the_request_is_refused_with_the_fix(mapping, phrase):
    backend = FakeBackend(host=host())
    hs = replace(state(backend, ""), networks=mapping)
    got = compose(backend, spec(), hs, dry_run=True)
    assert got.refused.startswith("interfaces: none requested and this host has no default")
    assert phrase in got.refused
    assert "juju config vm-host default-network=" in got.refused
    assert composes(backend) == []


def test_explicit_interfaces_ignore_the_default_network():
    backend = FakeBackend(host=host())
    got = compose(
        backend, spec(interfaces=[{"label": "data", "bridge": "br0"}]), state(backend, "missing")
    )
    assert got.vm is not None
    assert nics_of(backend) == [("data", "bridge", "br0")]


def test_a_default_bridge_that_is_missing_is_refused_naming_default_network():
    backend = FakeBackend(host=host())
    got = compose(backend, spec(), state(backend, "br-gone"))
    assert got.refused.startswith("default-network: the default NIC on 'br-gone'")
    assert "br-gone" in got.refused
    assert composes(backend) == []


def test_default_network_problem_blocks_only_when_it_names_nothing_usable():
    nics = (HostNic("br0", kind=NicKind.BRIDGE), HostNic("eno1"))
    assert default_network_problem("", MAPPING, nics) is None
    assert default_network_problem("oam", MAPPING, nics) is None
    assert default_network_problem("br0", {}, nics) is None
    assert "a physical interface, not a bridge" in (
        default_network_problem("eno1", MAPPING, nics) or ""
    )
    problem = default_network_problem("br9", MAPPING, nics) or ""
    assert "is not a space in networks (spaces: data, oam)" in problem
    assert "juju config vm-host default-network=" in problem


GB = 10**9


def pool_state(backend: FakeBackend, free_gb: float, committed_gb: float = 0, ratio=1.0):
    from dataclasses import replace

    from vmhost.model import StoragePool

    backend.pools["vm-host"] = StoragePool(
        "vm-host",
        capacity_bytes=int(free_gb * GB) + 10**6,
        available_bytes=int(free_gb * GB),
        committed_bytes=int(committed_gb * GB),
    )
    return replace(
        HostState(backend.topology(), backend.list_vms(), Policy(), {}, "vm-host", "br0"),
        disk_overcommit_ratio=ratio,
    )


def test_disks_beyond_the_pools_free_space_are_rejected_in_dry_run_too():
    backend = FakeBackend(host=host())
    big = spec(storage=[{"label": "root", "size-gb": 400}, {"label": "data", "size-gb": 101}])
    for dry_run in (True, False):
        got = compose(backend, big, pool_state(backend, free_gb=0.008), dry_run=dry_run)
        assert got.vm is None
        assert got.placement is None
        assert "pool 'vm-host' cannot hold 501 GB more" in got.rejected
        assert "0.0 GB free" in got.rejected
        assert "disk-overcommit-ratio" in got.rejected
    assert composes(backend) == []


def test_what_existing_disks_may_still_grow_counts_against_the_pool():
    backend = FakeBackend(host=host())
    fits = compose(
        backend,
        spec(storage=[{"label": "root", "size-gb": 20}]),
        pool_state(backend, 50),
        dry_run=True,
    )
    assert fits.placement is not None
    promised = compose(
        backend,
        spec(storage=[{"label": "root", "size-gb": 20}]),
        pool_state(backend, 50, 40),
        dry_run=True,
    )
    assert "may still grow by 40.0 GB" in promised.rejected
    over = compose(
        backend,
        spec(storage=[{"label": "root", "size-gb": 20}]),
        pool_state(backend, 50, 40, ratio=2.0),
        dry_run=True,
    )
    assert over.placement is not None  # 2 x 50 GB may back 60 GB of disks


def test_a_missing_or_stopped_pool_is_refused_in_dry_run_too():
    from dataclasses import replace

    backend = FakeBackend(host=host())
    got = compose(
        backend,
        spec(
            storage=[
                {"label": "root", "size-gb": 10},
                {"label": "data", "size-gb": 5, "pool": "fast"},
            ]
        ),
        pool_state(backend, 50),
        dry_run=True,
    )
    assert got.placement is None
    assert got.refused.startswith("storage[data].pool: storage pool 'fast' does not exist")
    assert "pools: vm-host" in got.refused
    backend.pools["vm-host"] = replace(backend.pools["vm-host"], active=False)
    stopped = compose(
        backend,
        spec(),
        HostState(backend.topology(), [], Policy(), {}, "vm-host", "br0"),
        dry_run=True,
    )
    assert "'vm-host' is not active" in stopped.refused


def test_a_round_books_the_disks_it_composed():
    backend = FakeBackend(host=host())
    first = pool_state(backend, 50)
    booked = book_disks(first, spec(storage=[{"label": "root", "size-gb": 30}]))
    assert booked.topology.pools[0].committed_bytes == 30 * GB
    assert first.topology.pools[0].committed_bytes == 0
    assert (
        "cannot hold"
        in compose(backend, spec("b", storage=[{"label": "root", "size-gb": 30}]), booked).rejected
    )


def two_nodes_with_a_pf(enabled: int) -> HostTopology:
    nodes = tuple(
        NumaNode(
            id=n,
            cpus=tuple(Cpu(id=n * 4 + c, socket_id=n, core_id=c) for c in range(4)),
            memory_kib=8 * 1024 * 1024,
            distances={m: 10 if m == n else 21 for m in range(2)},
        )
        for n in range(2)
    )
    pf = HostNic(name="enp65s0f0", numa_node=1, sriov_total_vfs=8, sriov_enabled_vfs=enabled)
    return HostTopology(nodes=nodes, nics=(pf,))


def test_sriov_mapped_through_networks_gets_numa_alignment_and_vf_counts():
    """`fast: {sriov-pf: enp65s0f0}` in networks, the way the README recommends."""
    mapping = parse_networks_config("fast: {sriov-pf: enp65s0f0}")
    backend = FakeBackend(host=two_nodes_with_a_pf(enabled=1))
    wired = spec("db", pinned_cores=2, interfaces=[{"label": "eth0", "space": "fast"}])
    here = replace(state(backend), networks=mapping)
    got = compose(backend, wired, here, dry_run=True)
    assert got.placement is not None, got.error
    assert got.placement.host_nodes == (1,)  # the PF's node, though node 0 is as free
    assert got.placement.vfs == (VfAssignment(nic="enp65s0f0", count=1),)
    # The one enabled VF taken, dry-run refuses the next as compose would.
    taken = replace(here, vms=[replace(record_of(wired), placement=got.placement)])
    again = compose(
        backend,
        spec("db2", pinned_cores=2, interfaces=[{"label": "eth0", "space": "fast"}]),
        taken,
        dry_run=True,
    )
    assert again.placement is None
    assert "1 of its 1 enabled VFs are in use" in again.rejected
    # VFs the PF could have but has not enabled are not free.
    without_vfs = replace(two_nodes_with_a_pf(enabled=0), pools=here.topology.pools)
    none = replace(here, topology=without_vfs)
    refused = compose(backend, wired, none, dry_run=True)
    assert "0 of its 0 enabled VFs" in refused.rejected
    assert "sriov_numvfs 0 of sriov_totalvfs 8" in refused.rejected


# --- reach: relation requests go only where the operator mapped ------------------------------


def reach_host() -> HostTopology:
    return replace(
        host(),
        nics=(
            HostNic("br-oam", kind=NicKind.BRIDGE, addresses=("10.0.0.1/24",)),
            HostNic("br-mgmt", kind=NicKind.BRIDGE, addresses=("10.9.0.1/24",)),
            HostNic("eno2", addresses=("10.8.0.1/24",)),
        ),
    )


def reach_state(backend: FakeBackend, allowed: frozenset[str] = frozenset()) -> HostState:
    backend.ensure_pool("vm-host", "/var/lib/vm-host/images")
    return HostState(
        backend.topology(),
        backend.list_vms(),
        Policy(),
        parse_networks_config("oam: {bridge: br-oam}"),
        "vm-host",
        allowed_interfaces=allowed,
    )


RELATION = {"owner": "relation:7:pg:vm-host:m", "request_id": "db-0"}


@pytest.mark.parametrize(
    ("interfaces", "device"),
    [
        ("eth0:bridge=br-mgmt", "br-mgmt"),
        ("eth0:parent=eno2", "eno2"),
        ("eth0:subnet_cidr=10.9.0.0/24", "br-mgmt"),
        ("eth0:ip=10.8.0.9", "eno2"),
        ("eth0:space=oam;eth1:bridge=br-mgmt", "br-mgmt"),
    ],
)
def test_a_relation_request_cannot_reach_an_unmapped_host_interface(interfaces, device):
    backend = FakeBackend(host=reach_host())
    got = compose(backend, spec(interfaces=interfaces, **RELATION), reach_state(backend))
    assert got.vm is None
    assert f"allowed-host-interfaces={device}" in got.refused
    assert not composes(backend)
    # Listed by the operator, the same request is served; an action may always name it.
    allowed = compose(
        backend, spec(interfaces=interfaces, **RELATION), reach_state(backend, frozenset({device}))
    )
    assert allowed.vm is not None, allowed.error
    fresh = FakeBackend(host=reach_host())
    action = compose(fresh, spec("act", interfaces=interfaces), reach_state(fresh))
    assert action.vm is not None, action.error


@pytest.mark.parametrize("interfaces", ["eth0:space=oam", "eth0:subnet_cidr=10.0.0.0/24", None])
def test_a_relation_request_may_use_mapped_spaces_and_the_default_network(interfaces):
    backend = FakeBackend(host=reach_host())
    host_state = replace(reach_state(backend), default_network="br-mgmt")
    got = compose(backend, spec(interfaces=interfaces, **RELATION), host_state)
    assert got.vm is not None, got.error


def test_a_static_address_another_vm_has_is_refused_for_every_requester():
    backend = FakeBackend(host=reach_host())
    first = compose(
        backend, spec("a", interfaces=[{"label": "eth0", "ip": "10.0.0.9"}]), reach_state(backend)
    )
    assert first.vm is not None
    for requester in ({}, RELATION):
        got = compose(
            backend,
            spec("b", interfaces=[{"label": "eth0", "ip": "10.0.0.9"}], **requester),
            reach_state(backend),
        )
        assert got.refused == (
            "interfaces.eth0: ip 10.0.0.9 is already the address of VM a; choose another "
            "address or leave ip out for DHCP"
        )
    other = compose(
        backend, spec("c", interfaces=[{"label": "eth0", "ip": "10.0.0.10"}]), reach_state(backend)
    )
    assert other.vm is not None

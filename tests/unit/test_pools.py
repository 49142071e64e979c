"""Resource pools: config parsing (hostile values included), accounting, refusals, wiring."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import hypothesis.strategies as st
import pytest
import yaml
from hypothesis import given, settings
from ops import testing
from test_charm_provider import TwoUnits
from test_domain_xml import render
from test_domain_xml import spec as libvirt_spec
from test_lxd_backend import (
    FakeLxd,
    fake_backend,
    instance_from,
    no_topology,
    vm_image,
    write_stream,
)
from test_lxd_backend import spec as lxd_spec
from test_report_schema import validate

import charms.vm_host.v0.vm_host as vm_lib
from fake_backend import FakeImageStore
from vmhost import compose, constraints, imagecache, images, pools
from vmhost.backends.libvirt import record_from_domain_xml
from vmhost.backends.lxd import instance_definition, record_from_instance
from vmhost.config import CharmConfig
from vmhost.model import (
    PAGE_1G_KIB,
    PAGE_2M_KIB,
    CellPlacement,
    Cpu,
    HostTopology,
    InvalidRequestError,
    NumaNode,
    Placement,
    Policy,
    VmHostError,
    VmRecord,
    VmSpec,
    VmState,
)
from vmhost.relation import fleet, serve
from vmhost.relation.keys import RequestKey, vm_name

pytestmark = pytest.mark.usefixtures("fake_host")

# ---------------------------------------------------------------------------------------------
# Parsing


def test_resource_pools_parse_every_quota_and_leave_the_rest_unlimited() -> None:
    parsed = pools.parse_resource_pools(
        "db: {vcpus: 64, pinned-cpus: 48, memory: 196608, hugepages: {1G: 16, 2M: 0}, vms: 8}\n"
        "test: {vms: 4}\n"
        "free:\n"
    )
    assert list(parsed) == ["db", "free", "test"]
    db = parsed["db"]
    assert (db.vcpus, db.pinned_cpus, db.memory, db.vms) == (64, 48, 196608, 8)
    assert db.hugepage_limits() == {PAGE_1G_KIB: 16, PAGE_2M_KIB: 0}
    assert parsed["test"].vcpus is None
    assert parsed["test"].vms == 4
    assert parsed["free"].unlimited
    assert pools.parse_resource_pools("") == {}
    assert pools.parse_resource_pools("  \n") == {}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{db: {vms: 1", ["resource-pools", "not valid YAML"]),
        ("- db\n- test", ["resource-pools", "mapping"]),
        ("just text", ["resource-pools", "mapping"]),
        ("{db: {cpus: 4}}", ["resource-pools[db]", "unknown quota key 'cpus'", "pinned-cpus"]),
        ("{db: {vms: -1}}", ["resource-pools[db]", "vms", "from 0"]),
        ("{db: {memory: 1.5}}", ["resource-pools[db]", "memory", "whole number"]),
        ("{db: {vms: true}}", ["resource-pools[db]", "vms", "whole number"]),
        ("{db: {vms: '3'}}", ["resource-pools[db]", "vms", "whole number"]),
        ("{db: {vms: 1e400}}", ["resource-pools[db]", "vms", "whole number"]),
        ("{db: {vcpus: 10000000000000}}", ["resource-pools[db]", "vcpus", "from 0"]),
        ("{db: {hugepages: {4M: 1}}}", ["resource-pools[db]", "'4M'", "2M, 1G"]),
        ("{db: {hugepages: {1G: -2}}}", ["resource-pools[db]", "hugepages.1G"]),
        ("{db: {hugepages: 16}}", ["resource-pools[db]", "hugepages must be a mapping"]),
        ("{db: [1, 2]}", ["resource-pools[db]", "must be a mapping"]),
        ("{DB: {}}", ["resource-pools", "'DB' is not a pool name"]),
        ("{1: {}}", ["resource-pools", "not a pool name"]),
        ("{'a b': {}}", ["resource-pools", "not a pool name"]),
        ("{-db: {}}", ["resource-pools", "not a pool name"]),
        ("{" + ", ".join(f"p{i}: {{}}" for i in range(300)) + "}", ["more than 256"]),
        ("x" * 70000, ["longer than"]),
        ("db: {}\nb: {vms: &a [1, 2], vcpus: *a}", ["resource-pools[b]", "vms", "whole number"]),
        ("!!python/object:os.system {}", ["not valid YAML"]),
    ],
)
def test_bad_resource_pools_name_the_option_and_the_fix(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        pools.parse_resource_pools(text)
    for word in words:
        assert word in str(err.value)


def test_app_pools_must_name_pools_that_exist() -> None:
    loaded = pools.load("{db: {vms: 2}}", "default", "{pg: [db, db], web: default}")
    assert loaded.app_pools == {"pg": ("db",), "web": ("default",)}
    with pytest.raises(InvalidRequestError) as err:
        pools.load("{db: {vms: 2}}", "default", "{pg: [dbx]}")
    assert str(err.value).startswith("app-pools[pg]: names 'dbx'")
    assert "add it to resource-pools" in str(err.value)
    for bad in ("{pg: []}", "{pg: {a: 1}}", "{Pg: [db]}", "[db]", "{pg: [7]}"):
        with pytest.raises(InvalidRequestError) as err:
            pools.load("{db: {}}", "default", bad)
        assert str(err.value).startswith("app-pools")


def test_charm_config_refuses_bad_pool_options_naming_each() -> None:
    for option, value, field in (
        ("resource-pools", "{db: {vms: -1}}", "resource-pools[db]"),
        ("default-pool", "Not A Pool", "default-pool"),
        ("app-pools", "{pg: [nope]}", "app-pools[pg]"),
    ):
        with pytest.raises(InvalidRequestError) as err:
            CharmConfig.model_validate({option.replace("-", "_"): value})
        assert err.value.field == field
    config = CharmConfig.model_validate(
        {"resource_pools": "{db: {vms: 1}}", "default_pool": "db", "app_pools": "{pg: [db]}"}
    )
    assert config.pool_config.default == "db"
    assert config.pool_config.quota("db").vms == 1


def test_a_request_lands_in_its_pool_the_default_or_its_apps_first() -> None:
    p = pools.load("{db: {}, test: {}}", "default", "{pg: [db, test], web: [test, default]}")
    assert p.pool_for(None) == "default"
    assert p.pool_for("db") == "db"
    assert p.pool_for(None, "pg") == "db"  # limited to pools without the default: its first
    assert p.pool_for(None, "web") == "default"
    assert p.pool_for(None, "other") == "default"
    with pytest.raises(InvalidRequestError) as err:
        p.pool_for("nope", "web")
    assert err.value.field == "pool"
    assert "no resource pool named 'nope' (pools: db, default, test)" in str(err.value)
    with pytest.raises(InvalidRequestError) as err:
        p.pool_for("db", "web")
    assert "application web may use only the pools test, default" in str(err.value)
    assert "app-pools" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Accounting


def pinned(cpus: int, pages: int = 0, size: int = PAGE_1G_KIB) -> Placement:
    return Placement(
        vcpus=cpus,
        memory_mib=pages * size // 1024 if pages else 1024,
        cells=(
            CellPlacement(
                0,
                cpus,
                pages * size // 1024 if pages else 1024,
                cpus=tuple(range(cpus)),
                hugepage_size_kib=size if pages else None,
                hugepages=pages,
            ),
        ),
    )


def record(name: str, placement: Placement, pool: str = "", managed: bool = True) -> VmRecord:
    return VmRecord(name, "u-" + name, VmState.RUNNING, placement, pool=pool, managed=managed)


def test_use_counts_every_vm_by_pool_unrecorded_in_the_default() -> None:
    vms = [
        record("a", pinned(4, pages=2), "db"),
        record("b", pinned(2), "db"),
        record("old", Placement(vcpus=2, memory_mib=512)),  # composed before pools
        record("foreign", Placement(vcpus=8, memory_mib=8192), managed=False),
    ]
    use = pools.use_by_pool(vms, "default")
    assert use["db"] == pools.Use(6, 6, 3072, {PAGE_1G_KIB: 2}, 2)
    assert use["default"] == pools.Use(2, 0, 512, {}, 1)
    assert set(use) == {"db", "default"}


def test_the_refusal_gives_the_numbers_and_the_fix() -> None:
    p = pools.load("{db: {pinned-cpus: 48}}", "default", "")
    text = p.refusal("db", pools.Use(pinned_cpus=40, vms=5), pools.Use(16, 16, 1024, {}, 1))
    assert text == (
        "pool db: 40 of 48 pinned CPUs used, this VM needs 16; raise the quota with "
        "juju config vm-host resource-pools=... or choose another pool"
    )
    assert p.refusal("db", pools.Use(pinned_cpus=32), pools.Use(16, 16, 1024, {}, 1)) is None
    assert (
        p.refusal("default", pools.Use(999, 999, 999, {}, 999), pools.Use(1, 1, 1, {}, 1)) is None
    )


def test_peer_form_of_a_use_round_trips_and_skips_unknown_page_sizes() -> None:
    use = pools.Use(4, 2, 4096, {PAGE_2M_KIB: 512}, 1)
    assert pools.use_from_dict(pools.use_to_dict(use)) == use
    assert pools.use_from_dict({"vms": 2, "hugepages": {"64K": 3}, "new": 1}) == pools.Use(vms=2)


@settings(max_examples=60, deadline=None)
@given(
    quota=st.integers(0, 12),
    wanted=st.lists(st.integers(1, 6), max_size=12),
)
def test_accepted_vms_never_exceed_the_quota(quota: int, wanted: list[int]) -> None:
    p = pools.load(f"{{db: {{pinned-cpus: {quota}, vms: 3}}}}", "default", "")
    vms: list[VmRecord] = []
    for i, cpus in enumerate(wanted):
        used = pools.use_by_pool(vms, p.default).get("db", pools.Use())
        need = pools.use_of(pinned(cpus))
        refused = p.refusal("db", used, need)
        fits = used.pinned_cpus + cpus <= quota and used.vms < 3
        assert (refused is None) == fits
        if refused is None:
            vms.append(record(f"v{i}", pinned(cpus), "db"))
    total = pools.use_by_pool(vms, p.default).get("db", pools.Use())
    assert total.pinned_cpus <= quota
    assert total.vms <= 3


# ---------------------------------------------------------------------------------------------
# The VM's record


def test_the_pool_leaves_the_spec_hash_alone() -> None:
    built = constraints.build_spec(name="vm1", memory_mib=256, pool="db")
    assert built.pool == "db"
    plain = constraints.build_spec(name="vm1", memory_mib=256)
    assert constraints.spec_hash(built) == constraints.spec_hash(plain)
    with pytest.raises(InvalidRequestError) as err:
        constraints.build_spec(name="vm1", memory_mib=256, pool="Bad Pool")
    assert err.value.field == "pool"


def test_libvirt_metadata_and_lxd_ledger_record_the_pool() -> None:
    root = render(libvirt_spec(pool="db"), Placement(vcpus=2, memory_mib=2048))
    assert record_from_domain_xml(ET.tostring(root, encoding="unicode"), VmState.RUNNING).pool == (
        "db"
    )
    root = render(libvirt_spec(), Placement(vcpus=2, memory_mib=2048))
    assert (
        record_from_domain_xml(ET.tostring(root, encoding="unicode"), VmState.RUNNING).pool == ""
    )
    d = instance_definition(lxd_spec(pool="db"), Placement(vcpus=2, memory_mib=2048), [], "x")
    assert record_from_instance(instance_from(d, "Running"), no_topology, "vm-host").pool == "db"


# ---------------------------------------------------------------------------------------------
# compose: one host's view


def host_state(topology, vms, text: str) -> compose.HostState:
    return compose.HostState(
        topology=topology,
        vms=vms,
        policy=Policy(),
        networks={},
        default_pool="vm-host",
        default_network="br0",
        pools=pools.load(text, "default", ""),
    )


def test_compose_refuses_past_the_vms_quota_and_creates_nothing(backend) -> None:
    topology = backend.topology()
    spec = constraints.build_spec(name="a", memory_mib=256, pool="db")
    state = host_state(topology, [], "{db: {vms: 1}}")
    first = compose.compose(backend, spec, state)
    assert first.vm is not None
    assert first.vm.pool == "db"
    second = compose.compose(
        backend,
        constraints.build_spec(name="b", memory_mib=256, pool="db"),
        host_state(topology, [first.vm], "{db: {vms: 1}}"),
    )
    assert second.vm is None
    assert second.rejected.startswith("pool db: 1 of 1 VMs used, this VM needs 1;")
    assert "b" not in backend.vms
    assert "compose:b" not in backend.calls
    other = compose.compose(
        backend,
        constraints.build_spec(name="c", memory_mib=256),  # the default pool is unlimited
        host_state(topology, [first.vm], "{db: {vms: 1}}"),
    )
    assert other.vm is not None


def test_huge_pages_any_are_checked_as_placed(backend) -> None:
    topology = backend.topology()
    # The request says "any": only the placement tells it takes 2M pages (node 1 has 64).
    spec = constraints.build_spec(name="a", memory_mib=64, hugepages="any", pool="db")
    out = compose.compose(backend, spec, host_state(topology, [], "{db: {hugepages: {2M: 40}}}"))
    assert out.vm is not None
    again = compose.compose(
        backend,
        constraints.build_spec(name="b", memory_mib=64, hugepages="any", pool="db"),
        host_state(topology, [out.vm], "{db: {hugepages: {2M: 40}}}"),
    )
    assert again.rejected.startswith("pool db: 32 of 40 2M huge pages used, this VM needs 32")
    assert again.placement is not None  # it fits the host: only the quota refuses it


# ---------------------------------------------------------------------------------------------
# The charm: the action, the relation, bad config


def run_action(ctx, name: str, params: dict[str, Any], state: testing.State):
    ctx.run(ctx.on.action(name, params=params), state)
    return ctx.action_results


def test_compose_vm_in_a_full_pool_fails_with_the_numbers(ctx, backend) -> None:
    state = testing.State(leader=True, config={"resource-pools": "{db: {vms: 1}}"})
    run_action(ctx, "compose-vm", {"name": "db-a", "memory": 256, "pool": "db"}, state)
    assert backend.vms["db-a"].pool == "db"
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", {"name": "db-b", "memory": 256, "pool": "db"}, state)
    assert failed.value.message == (
        "cannot place db-b, nothing done: pool db: 1 of 1 VMs used, this VM needs 1; raise "
        "the quota with juju config vm-host resource-pools=... or choose another pool"
    )
    assert "db-b" not in backend.vms
    run_action(ctx, "compose-vm", {"name": "plain", "memory": 256}, state)
    assert backend.vms["plain"].pool == "default"


def test_compose_vm_naming_an_unknown_pool_fails_naming_the_field(ctx, backend) -> None:
    state = testing.State(leader=True, config={"resource-pools": "{db: {}}"})
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", {"name": "x", "memory": 256, "pool": "nope"}, state)
    assert failed.value.message.startswith(
        "bad request, nothing done: pool: no resource pool named 'nope' (pools: db, default)"
    )
    assert not backend.composed


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("resource-pools", "{db: {vms: -1}}"),
        ("resource-pools", "{db: {vms: 1"),
        ("resource-pools", "{db: {hugepages: {3M: 1}}}"),
        ("app-pools", "{pg: [nope]}"),
        ("default-pool", "-bad-"),
    ],
)
def test_bad_pool_config_blocks_naming_the_option_and_composes_nothing(
    ctx, backend, option: str, value: str
) -> None:
    relation = vm_lib.requirer_relation([{"id": "db-0", "memory": 256}], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(relation),
        testing.State(leader=True, relations={relation}, config={option: value}),
    )
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert out.unit_status.message.startswith(f"invalid config: {option}")
    assert "fix with juju config" in out.unit_status.message
    assert not backend.composed
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(
            ctx, "compose-vm", {"name": "x", "memory": 256}, testing.State(config={option: value})
        )
    assert option in failed.value.message
    assert not backend.composed


def relation_round(ctx, requests: list[dict[str, Any]], config: dict[str, str], app: str = "pg"):
    relation = vm_lib.requirer_relation(requests, remote_app_name=app)
    out = ctx.run(
        ctx.on.relation_changed(relation),
        testing.State(leader=True, relations={relation}, config=config),
    )
    return {a.id: a for a in vm_lib.answers_from(out.get_relation(relation.id))}


def test_relation_requests_land_in_their_pools_within_the_quota(ctx, backend) -> None:
    config = {"resource-pools": "{db: {vms: 1}}"}
    answers = relation_round(
        ctx,
        [{"id": "a", "memory": 256, "pool": "db"}, {"id": "b", "memory": 256, "pool": "db"}],
        config,
    )
    assert answers["a"].state == "running"
    assert answers["a"].pool == "db"
    assert answers["b"].state == "failed"
    assert answers["b"].error == (
        "pool db: 1 of 1 VMs used, this VM needs 1; raise the quota with juju config vm-host "
        "resource-pools=... or choose another pool"
    )
    assert {vm.pool for vm in backend.vms.values()} == {"db"}


def test_relation_requests_naming_a_pool_they_may_not_use_fail(ctx, backend) -> None:
    config = {"resource-pools": "{db: {}, web: {}}", "app-pools": "{pg: [db]}"}
    answers = relation_round(
        ctx,
        [
            {"id": "a", "memory": 256},
            {"id": "b", "memory": 256, "pool": "web"},
            {"id": "c", "memory": 256, "pool": "nope"},
        ],
        config,
    )
    assert answers["a"].state == "running"
    assert answers["a"].pool == "db"
    assert answers["b"].state == "failed"
    assert (answers["b"].error or "").startswith(
        "pool: application pg may use only the pools db (config app-pools), not 'web'"
    )
    assert answers["c"].state == "failed"
    assert (answers["c"].error or "").startswith("pool: no resource pool named 'nope'")
    assert len(backend.vms) == 1


def test_the_library_carries_the_pool_and_refuses_a_bad_one() -> None:
    request = vm_lib.VmRequest.model_validate({"id": "a", "memory": 256, "pool": "db"})
    assert request.model_dump(by_alias=True, exclude_none=True)["pool"] == "db"
    assert vm_lib.VmRequest.model_validate({"id": "a", "memory": 256}).pool is None
    with pytest.raises(ValueError, match="pool"):
        vm_lib.VmRequest.model_validate({"id": "a", "memory": 256, "pool": "Bad Pool"})
    assert vm_lib.LIBPATCH >= 7  # pool is in the library since LIBPATCH 7
    built = serve.build_request(
        3, "pg", {"id": "a", "memory": 256, "pool": "db"}, default_root_gb=20
    )
    assert built is not None
    assert built.spec is not None
    assert built.spec.pool == "db"
    answer = vm_lib.VmAnswer.model_validate(
        json.loads(json.dumps({"id": "a", "state": "running", "pool": "db"}))
    )
    assert answer.pool == "db"


# ---------------------------------------------------------------------------------------------
# The leader: pools hold across units


def fleet_host(cpus: int = 8) -> HostTopology:
    return HostTopology(
        nodes=(
            NumaNode(
                0,
                cpus=tuple(Cpu(i, core_id=i, siblings=(i,)) for i in range(cpus)),
                memory_kib=16 << 20,
            ),
        )
    )


def key(request_id: str) -> RequestKey:
    return RequestKey(7, "pg", request_id)


def db_spec(request_id: str, cpus: int = 2, pool: str = "db") -> VmSpec:
    k = key(request_id)
    built = constraints.build_spec(
        name=vm_name(k),
        owner=k.owner,
        request_id=k.request_id,
        memory_mib=1024,
        pinned_cores=cpus,
        pool=pool,
    )
    return built


def test_a_report_carries_its_use_per_pool_and_an_old_one_reads_as_none() -> None:
    topology = fleet_host()
    vms = [record("a", pinned(2), "db"), record("old", Placement(vcpus=1, memory_mib=256))]
    text = fleet.unit_report(topology, vms, hostname="h0", scope=None)
    got, problem = fleet.parse_host_report(text)
    assert problem is None
    assert got is not None
    assert got.pools == {"": pools.Use(1, 0, 256, {}, 1), "db": pools.Use(2, 2, 1024, {}, 1)}
    old = json.loads(text)
    del old["pools"]
    got, problem = fleet.parse_host_report(json.dumps(old))
    assert problem is None
    assert got is not None
    assert got.pools == {}
    bad = {**json.loads(text), "pools": {"db": {"vms": -1}}}
    assert fleet.parse_host_report(json.dumps(bad))[0] is None


def test_two_units_reports_fill_a_pool_and_the_leader_refuses_with_the_numbers() -> None:
    p = pools.load("{db: {pinned-cpus: 6, vms: 3}}", "default", "")
    topology = fleet_host()
    reports = {
        "vm-host/0": fleet.HostReport(
            topology, (pinned(2),), pools={"db": pools.use_of(pinned(2))}
        ),
        "vm-host/1": fleet.HostReport(
            topology, (pinned(2),), pools={"db": pools.use_of(pinned(2))}
        ),
    }
    requests = [(key("c"), db_spec("c", 4), None), (key("d"), db_spec("d", 2), None)]
    result = fleet.assign(requests, reports, {}, frozenset(), Policy(), resource_pools=p)
    # Each unit alone would have room (4 of 6 used fleet-wide, 2 on each host): the fleet not.
    assert result.unplaced[key("c")] == (
        "pool db: 4 of 6 pinned CPUs used, this VM needs 4; raise the quota with juju config "
        "vm-host resource-pools=... or choose another pool"
    )
    assert key("d") in result.units  # 2 more fit: 6 of 6
    more = [*requests, (key("e"), db_spec("e", 1), None)]
    result = fleet.assign(more, reports, {}, frozenset(), Policy(), resource_pools=p)
    assert result.unplaced[key("e")].startswith("pool db: 3 of 3 VMs used, this VM needs 1")
    # Another pool, and no pools at all, are not limited by db's use.
    other = [(key("f"), db_spec("f", 4, pool="default"), None)]
    assert (
        key("f") in fleet.assign(other, reports, {}, frozenset(), Policy(), resource_pools=p).units
    )
    assert key("c") in fleet.assign(requests, reports, {}, frozenset(), Policy()).units


def test_unrecorded_vms_in_reports_count_in_the_default_pool() -> None:
    p = pools.load("{default: {vms: 1}}", "default", "")
    reports = {"vm-host/0": fleet.HostReport(fleet_host(), pools={"": pools.Use(vms=1)})}
    spec = db_spec("a", pool="default")
    got = fleet.assign(
        [(key("a"), spec, None)], reports, {}, frozenset(), Policy(), resource_pools=p
    )
    assert got.unplaced[key("a")].startswith("pool default: 1 of 1 VMs used")


def test_the_leader_across_units_counts_both_reports(fake_host, topology, monkeypatch) -> None:
    # vm-host/0 and vm-host/1 each compose one db VM (pinned to them); the pool holds 2, so
    # a third request is refused by the leader with the fleet's numbers, and nothing is made.
    units = TwoUnits(monkeypatch, topology, "delete")
    units.config = {**units.config, "resource-pools": "{db: {vms: 2}}"}
    requests = [
        {"id": "a", "memory": 256, "pool": "db", "host": "vm-host/0"},
        {"id": "b", "memory": 256, "pool": "db", "host": "vm-host/1"},
    ]
    units.relation = vm_lib.requirer_relation(requests, remote_app_name="pg", relation_id=7)
    units.run(1, lambda c, r, p: c.on.relation_changed(r, remote_unit=0))  # first report
    units.settle()
    assert units.hosted() == {"vm-host/0": ["pg-7-a"], "vm-host/1": ["pg-7-b"]}
    reported, _ = fleet.parse_host_report(units.reports[1])
    assert reported is not None
    assert reported.pools["db"].vms == 1

    units.relation = vm_lib.requirer_relation(
        [*requests, {"id": "c", "memory": 256, "pool": "db"}], remote_app_name="pg", relation_id=7
    )
    units.settle()
    out = units.run(0, lambda c, r, p: c.on.relation_changed(r, remote_unit=0))
    got = {a.id: a for a in vm_lib.answers_from(out.get_relation(7))}
    assert got["c"].state == "failed"
    assert (got["c"].error or "").startswith("pool db: 2 of 2 VMs used, this VM needs 1;")
    assert units.hosted() == {"vm-host/0": ["pg-7-a"], "vm-host/1": ["pg-7-b"]}

    # show-resources on either unit: this host's use, and the fleet's the leader holds to.
    units.run(0, lambda c, r, p: c.on.action("show-resources"))
    data = json.loads((units.ctx[0].action_results or {})["json"])
    validate(data, "show-resources")
    (db,) = [p for p in data["resource-pools"] if p["name"] == "db"]
    vms = next(r for r in db["resources"] if r["resource"] == "vms")
    assert vms == {
        "resource": "vms",
        "quota": 2,
        "used": 1,
        "free": 1,
        "fleet-used": 2,
        "fleet-free": 0,
    }
    table = (units.ctx[0].action_results or {})["table"]
    lines = [line.split() for line in table.splitlines()]
    assert [
        "RESOURCE-POOL",
        "RESOURCE",
        "QUOTA",
        "USED",
        "FREE",
        "FLEET-USED",
        "FLEET-FREE",
    ] in lines
    assert ["db", "vms", "2", "1", "1", "2", "0"] in lines

    # compose-vm on a unit counts the other unit's report too: the fleet's pool is full,
    # though this host alone holds one VM of two; a dry run says the same, nothing is made.
    for dry_run in (True, False):
        params = {"name": "db-x", "memory": 256, "pool": "db", "dry-run": dry_run}
        with pytest.raises(testing.ActionFailed) as failed:
            units.run(1, lambda c, r, p, params=params: c.on.action("compose-vm", params=params))
        assert "pool db: 2 of 2 VMs used, this VM needs 1;" in failed.value.message
    assert units.hosted() == {"vm-host/0": ["pg-7-a"], "vm-host/1": ["pg-7-b"]}
    # Another pool still composes by action, and its dry run says what was counted.
    units.run(
        1,
        lambda c, r, p: c.on.action(
            "compose-vm", params={"name": "other-x", "memory": 256, "dry-run": True}
        ),
    )
    found = units.ctx[1].action_results or {}
    assert "and the other units' reports counted" in json.dumps(found)


# ---------------------------------------------------------------------------------------------
# list-vms, show-resources, dry runs


POOLS_CONFIG = {"resource-pools": "{db: {vms: 2, pinned-cpus: 4, hugepages: {2M: 64}}, test: {}}"}


def test_list_vms_shows_each_vms_pool_and_filters_on_it(ctx, backend) -> None:
    state = testing.State(leader=True, config=POOLS_CONFIG)
    run_action(ctx, "compose-vm", {"name": "db-a", "memory": 256, "pool": "db"}, state)
    run_action(ctx, "compose-vm", {"name": "t-a", "memory": 256, "pool": "test"}, state)
    backend.vms["old"] = record("old", Placement(vcpus=1, memory_mib=256))  # before pools
    results = run_action(ctx, "list-vms", {"pool": "db"}, state)
    assert [v["name"] for v in json.loads(results["json"])] == ["db-a"]
    assert json.loads(results["json"])[0]["pool"] == "db"
    header, row = results["table"].splitlines()
    assert header.split()[8] == "POOL"
    assert row.split()[8] == "db"
    results = run_action(ctx, "list-vms", {"pool": "default"}, state)
    assert [v["name"] for v in json.loads(results["json"])] == ["old"]
    listed = json.loads(run_action(ctx, "list-vms", {}, state)["json"])
    assert {v["name"]: v["pool"] for v in listed} == {
        "db-a": "db",
        "t-a": "test",
        "old": "default",
    }
    validate(listed, "list-vms")


def test_show_resources_has_the_pools_table_in_text_and_json(ctx, backend) -> None:
    state = testing.State(leader=True, config=POOLS_CONFIG)
    params = {"name": "db-a", "memory": 64, "pinned-cores": "2", "hugepages": "2M", "pool": "db"}
    run_action(ctx, "compose-vm", params, state)
    results = run_action(ctx, "show-resources", {}, state)
    data = json.loads(results["json"])
    validate(data, "show-resources")
    by_name = {p["name"]: p for p in data["resource-pools"]}
    assert sorted(by_name) == ["db", "default", "test"]
    assert by_name["default"]["default"] is True
    db = {r["resource"]: (r["quota"], r["used"], r["free"]) for r in by_name["db"]["resources"]}
    assert db == {
        "vms": (2, 1, 1),
        "vcpus": (None, 2, None),
        "pinned-cpus": (4, 2, 2),
        "memory-mib": (None, 64, None),
        "hugepages-2M": (64, 32, 32),
    }
    table = results["table"]
    lines = [line.split() for line in table.splitlines()]
    assert ["RESOURCE-POOL", "RESOURCE", "QUOTA", "USED", "FREE"] in lines
    assert ["db", "vms", "2", "1", "1"] in lines
    assert ["pinned-cpus", "4", "2", "2"] in lines
    assert ["default", "(default)", "vms", "unlimited", "0", "-"] in lines


def test_a_dry_run_reports_the_pool_the_storage_and_the_image(ctx, backend, tmp_path) -> None:
    backend.images = FakeImageStore(tmp_path / "pool")
    backend.images.cache("ubuntu@24.04")
    state = testing.State(leader=True, config=POOLS_CONFIG)
    params = {"name": "db-a", "memory": 256, "pinned-cores": "2", "pool": "db", "dry-run": True}
    results = run_action(ctx, "compose-vm", params, state)
    assert results["pool"] == (
        "pool db: fits (VMs 0+1 of 2, pinned CPUs 0+2 of 4, 2M huge pages 0+0 of 64; this host's "
        "VMs counted)"
    )
    assert results["storage"] == "pool vm-host: 20.0 GB of 100 GB room"
    assert results["image"] == "ubuntu@24.04 20261201: cached"
    assert backend.vms == {}
    assert not any(c.startswith(("prepare_image", "compose")) for c in backend.calls)


def test_a_dry_run_says_where_an_image_would_come_from_or_fails_with_the_fix(
    ctx, backend, tmp_path, monkeypatch
) -> None:
    backend.images = FakeImageStore(tmp_path / "pool")
    item = images.StreamItem(
        "p", "20261130", "disk1.img", "https://example/x.img", "b" * 64, 600_000_000
    )
    monkeypatch.setattr(images, "resolve", lambda source, image, arch: item)
    state = testing.State(leader=True)
    params = {"name": "vm-a", "memory": 256, "dry-run": True}
    results = run_action(ctx, "compose-vm", params, state)
    assert results["image"] == (
        "ubuntu@24.04 20261130: not cached, fetched from "
        "https://cloud-images.ubuntu.com/releases/ (600 MB) when composed"
    )

    def unreachable(source, image, arch):
        raise images.ImageFetchError("unreachable", "https://cloud-images.ubuntu.com/: timed out")

    monkeypatch.setattr(images, "resolve", unreachable)
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", params, state)
    assert failed.value.message.startswith(
        "image not available, nothing done: ubuntu@24.04: fetch failed [unreachable]"
    )
    assert "image-source" in failed.value.message
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", {**params, "image": "local:nope"}, state)
    assert "local-image-dir" in failed.value.message
    assert backend.images.bases == {}
    assert backend.vms == {}


def test_a_dry_run_is_refused_by_a_full_pool_as_compose_would_be(ctx, backend) -> None:
    state = testing.State(leader=True, config={"resource-pools": "{db: {vms: 0}}"})
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(
            ctx, "compose-vm", {"name": "a", "memory": 256, "pool": "db", "dry-run": True}, state
        )
    assert "pool db: 0 of 0 VMs used, this VM needs 1" in failed.value.message


_YAMLISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300) | _YAMLISH.map(lambda v: yaml.safe_dump(v)))
def test_any_text_parses_or_is_refused_naming_the_option(text: str) -> None:
    for parse, option in (
        (pools.parse_resource_pools, "resource-pools"),
        (pools.parse_app_pools, "app-pools"),
    ):
        assert refused_field(parse, text) in (None, option) or str(
            refused_field(parse, text)
        ).startswith(option + "[")


def refused_field(parse: Any, text: str) -> str | None:
    """The field the parser's refusal names, or None when it parsed (to a mapping)."""
    try:
        parsed = parse(text)
    except InvalidRequestError as exc:
        return exc.field
    assert isinstance(parsed, dict)
    return None


def test_lxd_probe_reads_the_store_then_the_index_and_pulls_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(images, "host_arch", lambda: "x86_64")
    combined = "cd" * 32
    source = write_stream(
        tmp_path,
        {"20261201": {"items": {"lxd.tar.xz": {"combined_disk-kvm-img_sha256": combined}}}},
    )
    settings = imagecache.Settings(source=source, state_dir=str(tmp_path / "state"))
    fake = FakeLxd()
    backend = fake_backend(fake)
    assert backend.probe_image("ubuntu@24.04", settings) == (
        f"ubuntu@24.04 20261201: LXD pulls it from {source.url}"
    )
    assert fake.image_posts == []
    fake.store.append(vm_image(combined, "24.04", "20261201"))
    assert backend.probe_image("ubuntu@24.04", settings) == "ubuntu@24.04: in LXD's image store"
    bare = write_stream(tmp_path / "bare", {"20261201": {"items": {"disk1.img": {}}}})
    with pytest.raises(VmHostError, match="image-source"):
        backend.probe_image("jammy", imagecache.Settings(source=bare, state_dir=str(tmp_path)))

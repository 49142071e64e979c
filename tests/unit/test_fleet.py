"""Relation VM decisions and multi-unit assignment: isolation, release, changes, best fit."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from charms.vm_host.v0.vm_host import VmAnswer
from fake_backend import FakeBackend
from vmhost.compose import HostState
from vmhost.constraints import build_spec, spec_hash, validate_name
from vmhost.model import (
    PAGE_1G_KIB,
    CellPlacement,
    Cpu,
    HostNic,
    HostTopology,
    NicKind,
    NumaNode,
    Placement,
    Policy,
    VmRecord,
    VmSpec,
    VmState,
)
from vmhost.placement import plan
from vmhost.relation.fleet import (
    Assignment,
    HostReport,
    Peers,
    assign,
    assignment_from_json,
    assignment_to_json,
    collect_reports,
    composed_from_json,
    host_report,
    lead,
    parse_host_report,
)
from vmhost.relation.keys import (
    VM_NAME_MAX,
    Owner,
    RequestKey,
    Scope,
    composed_keys,
    parse_owner,
    read_owner,
    relation_owner,
    released_owner,
    request_key_of,
    vm_name,
)
from vmhost.relation.serve import (
    CHANGED_ERROR,
    Changes,
    Power,
    RelationRequest,
    Round,
    answer_for,
    answers_by_relation,
    plan_changes,
    serve,
)

GIB = 1024
POLICY = Policy()

# ---------------------------------------------------------------------------------------------
# Helpers


def host(cpus: int = 8, nodes: int = 1, mem_gib: int = 16, pages_1g: int = 0) -> HostTopology:
    """A host without SMT: node n holds CPUs n*cpus .. n*cpus+cpus-1."""
    return HostTopology(
        nodes=tuple(
            NumaNode(
                id=n,
                cpus=tuple(Cpu(id=n * cpus + c, socket_id=n, core_id=c) for c in range(cpus)),
                memory_kib=(mem_gib * GIB + pages_1g * GIB) * 1024,
                hugepages_total={PAGE_1G_KIB: pages_1g} if pages_1g else {},
                hugepages_free={PAGE_1G_KIB: pages_1g} if pages_1g else {},
                distances={m: 10 if m == n else 21 for m in range(nodes)},
            )
            for n in range(nodes)
        )
    )


def spec_for(key: RequestKey, **fields: object) -> VmSpec:
    fields.setdefault("memory_mib", 1024)
    return build_spec(
        name=vm_name(key),
        owner=key.owner,
        request_id=key.request_id,
        **fields,  # type: ignore[arg-type]
    )


def record_of(spec: VmSpec, state: VmState = VmState.RUNNING) -> VmRecord:
    """The VM a backend would list after composing the spec."""
    return VmRecord(
        name=spec.name,
        uuid=f"uuid-{spec.name}",
        state=state,
        placement=Placement(vcpus=spec.vcpus, memory_mib=spec.memory_mib),
        owner=spec.owner,
        request_id=spec.request_id,
        spec_hash=spec_hash(spec),
        interfaces=tuple({"label": i.label, "mac": "52:54:00:00:00:01"} for i in spec.interfaces),
    )


def action_vm(name: str) -> VmRecord:
    spec = build_spec(name=name, memory_mib=512)
    return record_of(spec)


def foreign_vm(name: str) -> VmRecord:
    return VmRecord(
        name=name,
        uuid="u",
        state=VmState.RUNNING,
        placement=Placement(vcpus=1, memory_mib=512),
        owner="",
        managed=False,
    )


A_X = RequestKey(1, "app-a", "x")
A_Y = RequestKey(1, "app-a", "y")
B_Y = RequestKey(2, "app-b", "y")
B_Z = RequestKey(2, "app-b", "z")


def names(vms: Sequence[VmRecord]) -> list[str]:
    return [vm.name for vm in vms]


def keys(pairs: Sequence[tuple[RequestKey, object]]) -> list[RequestKey]:
    return [k for k, _ in pairs]


def serve_round(
    existing: Sequence[VmRecord], desired: Mapping[RequestKey, VmSpec], *, live: set[int]
) -> tuple[FakeBackend, Round]:
    """One unit's round against an in-memory backend holding `existing`."""
    topology = replace(host(cpus=8), nics=(HostNic("br0", kind=NicKind.BRIDGE),))
    backend = FakeBackend(host=topology, vms={vm.name: vm for vm in existing})
    backend.ensure_pool("vm-host", "/var/lib/vm-host/images")
    state = HostState(backend.topology(), backend.list_vms(), POLICY, {}, "vm-host", "br0")
    result = serve(
        backend,
        state,
        [RelationRequest(k, s) for k, s in desired.items()],
        set(desired),
        release_policy="delete",
        live_relation_ids=live,
        power=Power(),
    )
    return backend, result


def touched(changes: Changes) -> set[str]:
    """Every VM name that appears anywhere in a result."""
    out = set(names(changes.to_delete)) | set(names(changes.released))
    out |= set(names(changes.duplicates))
    for _, vm in (*changes.changed, *changes.unchanged, *changes.retained):
        out.add(vm.name)
    out |= {spec.name for _, spec in changes.to_compose}
    return out


# ---------------------------------------------------------------------------------------------
# Owners and names


def test_owner_round_trip():
    owner = relation_owner(7, "postgresql")
    assert owner == "relation:7:postgresql"
    assert parse_owner(owner) == (7, "postgresql")


@pytest.mark.parametrize(
    "owner",
    [
        "action",
        "",
        "relation:",
        "relation:x:app",
        "relation:-1:app",
        "relation:07:app",
        "relation:+7:app",
        "relation:7:",
        "relation:7:App",
        "relation:7:a:b",
        "relation:7:maas/0",
        "relation:٣:app",
        "Relation:7:app",
    ],
)
def test_parse_owner_refuses_anything_but_a_relation_owner(owner: str):
    assert parse_owner(owner) is None


@pytest.mark.parametrize(("rel", "app"), [(-1, "a"), (True, "a"), (1, ""), (1, "A"), (1, "a:b")])
def test_relation_owner_refuses_bad_parts(rel: int, app: str):
    with pytest.raises(ValueError, match=r"relation id|application name"):
        relation_owner(rel, app)


def test_request_key_refuses_bad_request_ids():
    with pytest.raises(ValueError, match="request id"):
        RequestKey(1, "app", "Bad_Id")


def test_request_key_of_ignores_action_and_foreign_vms():
    assert request_key_of(record_of(spec_for(A_X))) == A_X
    assert request_key_of(action_vm("ops-1")) is None
    assert request_key_of(foreign_vm("legacy")) is None


@pytest.mark.parametrize(
    ("key", "name"),
    [
        (RequestKey(7, "pg", "db-0"), "pg-7-db-0"),
        (RequestKey(12, "mysql-innodb", "0"), "mysql-innodb-12-0"),
    ],
)
def test_plain_names(key: RequestKey, name: str):
    assert vm_name(key) == name


def test_names_that_would_read_alike_differ():
    # "a" + "b-c" and "a-b" + "c" would both be "a-b-c" without the relation id.
    pairs = [
        (RequestKey(1, "a", "b-c"), RequestKey(1, "a-b", "c")),
        (RequestKey(1, "a", "2-c"), RequestKey(12, "a", "c")),
        (RequestKey(1, "ab", "c"), RequestKey(1, "a", "bc")),
    ]
    for left, right in pairs:
        assert vm_name(left) != vm_name(right)


@pytest.mark.parametrize(
    "key",
    [
        RequestKey(3, "a-very-long-application-name-for-testing", "request-with-a-long-id-0"),
        RequestKey(3, "app-2", "x"),  # not a Juju application name: segment without a letter
        RequestKey(3, "app", "db-"),  # ends with a hyphen: not a VM name as is
        RequestKey(3, "9app", "x"),
    ],
)
def test_hashed_names_are_valid_short_and_stable(key: RequestKey):
    name = vm_name(key)
    assert validate_name(name) == name
    assert len(name) <= VM_NAME_MAX
    assert re.search(r"-[0-9a-f]{10}$", name)
    assert vm_name(key) == name
    assert vm_name(replace(key, relation_id=key.relation_id + 1)) != name


juju_apps = st.from_regex(r"\A[a-z][a-z0-9]{0,6}(-[a-z][a-z0-9]{0,4}){0,3}\Z")
any_apps = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,70}\Z")
request_ids = st.from_regex(r"\A[a-z0-9-]{1,40}\Z")
keys_strategy = st.builds(RequestKey, st.integers(0, 10**6), juju_apps | any_apps, request_ids)


@given(keys_strategy, keys_strategy, st.integers(16, 63))
def test_names_are_valid_bounded_and_distinct(left: RequestKey, right: RequestKey, limit: int):
    name = vm_name(left, max_length=limit)
    assert validate_name(name) == name
    assert len(name) <= limit
    if left != right:
        assert name != vm_name(right, max_length=limit)


@given(st.builds(RequestKey, st.integers(0, 999), juju_apps, request_ids))
def test_plain_names_decode_back_to_their_request(key: RequestKey):
    name = vm_name(key)
    if (
        re.search(r"-[0-9a-f]{10}$", name)
        and name != f"{key.app}-{key.relation_id}-{key.request_id}"
    ):
        return  # hashed form
    segments = name.split("-")
    cut = next(i for i, seg in enumerate(segments) if seg.isdigit())
    assert "-".join(segments[:cut]) == key.app
    assert int(segments[cut]) == key.relation_id
    assert "-".join(segments[cut + 1 :]) == key.request_id


# ---------------------------------------------------------------------------------------------
# plan_changes


def test_isolation_removing_app_a_request_touches_only_app_a_vm():
    a_x, a_y, b_y = spec_for(A_X), spec_for(A_Y), spec_for(B_Y)
    existing = [
        record_of(a_x),
        record_of(a_y),
        record_of(b_y),
        action_vm("app-b-2-z"),
        action_vm("ops"),
        foreign_vm("legacy"),
    ]
    # App A withdrew x; app B now also asks for z, whose name an action VM already has.
    desired = {A_Y: a_y, B_Y: b_y, B_Z: spec_for(B_Z)}
    changes = plan_changes(desired, existing, release_policy="delete", live_relation_ids={1, 2})
    assert names(changes.to_delete) == [a_x.name]
    assert keys(changes.unchanged) == [A_Y, B_Y]
    # The action and foreign VMs appear nowhere, whatever happens.
    composing = {spec.name for _, spec in changes.to_compose}
    assert not (touched(changes) - composing) & {"app-b-2-z", "ops", "legacy"}
    # z's name is taken: the round's compose step refuses it and composes nothing.
    backend, result = serve_round(existing, desired, live={1, 2})
    assert result.composed == []
    assert list(result.failures) == [B_Z]
    assert "already taken" in result.failures[B_Z]
    assert not [c for c in backend.calls if c.startswith("compose:")]
    assert [c for c in backend.calls if c.startswith("delete:")] == [f"delete:{a_x.name}"]
    assert backend.vms["app-b-2-z"].owner == "action"


def test_isolation_same_request_id_in_two_apps_never_matches_across():
    a_y, b_y = spec_for(A_Y), spec_for(B_Y)
    changes = plan_changes(
        {A_Y: a_y}, [record_of(b_y)], release_policy="delete", live_relation_ids={1, 2}
    )
    # B's VM answers B's request only: A's "y" is composed anew, B's VM (no longer asked for
    # on the live relation 2 in this call) is B's own business.
    assert changes.to_compose == ((A_Y, a_y),)
    assert a_y.name != b_y.name
    assert changes.unchanged == ()


def test_app_removing_everything_never_deletes_action_vms():
    existing = [record_of(spec_for(A_X)), action_vm("app-a-1-y"), foreign_vm("app-a-1-z")]
    changes = plan_changes({}, existing, release_policy="delete", live_relation_ids={1})
    assert names(changes.to_delete) == ["app-a-1-x"]


@pytest.mark.parametrize(
    ("policy", "deleted", "released"),
    [
        ("delete", ["app-a-1-x", "app-a-1-y"], []),
        ("keep", [], ["app-a-1-x", "app-a-1-y"]),
    ],
)
def test_broken_relation_releases_by_policy(policy: str, deleted: list[str], released: list[str]):
    existing = [
        record_of(spec_for(A_Y)),
        record_of(spec_for(A_X)),
        record_of(spec_for(B_Y)),
        action_vm("ops"),
    ]
    desired = {B_Y: spec_for(B_Y)}
    changes = plan_changes(desired, existing, release_policy=policy, live_relation_ids={2})
    assert names(changes.to_delete) == deleted
    assert names(changes.released) == released
    assert keys(changes.unchanged) == [B_Y]


def test_changed_spec_is_reported_never_recreated():
    composed = spec_for(B_Y, memory_mib=1024)
    asked = spec_for(B_Y, memory_mib=2048)
    vm = record_of(composed)
    changes = plan_changes({B_Y: asked}, [vm], release_policy="delete", live_relation_ids={2})
    assert changes.changed == ((B_Y, vm),)
    assert changes.to_delete == ()
    assert changes.to_compose == ()
    assert changes.errors == {B_Y: CHANGED_ERROR}
    answer = answer_for(B_Y, vm, changes.errors[B_Y], spec=asked)
    assert (answer["state"], answer["error"]) == ("running", CHANGED_ERROR)


def test_a_vm_named_by_an_older_scheme_still_matches_its_request():
    spec = spec_for(B_Y)
    vm = record_of(replace(spec, name="old-style-name"))
    changes = plan_changes({B_Y: spec}, [vm], release_policy="delete", live_relation_ids={2})
    assert changes.unchanged == ((B_Y, vm),)


def test_new_requests_are_composed_in_key_order():
    desired = {B_Z: spec_for(B_Z), A_Y: spec_for(A_Y), A_X: spec_for(A_X)}
    changes = plan_changes(desired, [], release_policy="delete", live_relation_ids={1, 2})
    assert keys(changes.to_compose) == [A_X, A_Y, B_Z]


def test_retained_requests_keep_their_vms():
    vm = record_of(spec_for(A_X))
    changes = plan_changes({}, [vm], release_policy="delete", live_relation_ids={1}, retain={A_X})
    assert changes.to_delete == ()
    assert changes.retained == ((A_X, vm),)
    assert changes.existing == {A_X: vm}


def test_duplicate_vms_of_one_request_are_left_alone():
    spec = spec_for(A_X)
    first = record_of(spec)
    second = replace(first, name="app-a-1-x-copy")
    changes = plan_changes(
        {A_X: spec}, [second, first], release_policy="delete", live_relation_ids={1}
    )
    assert changes.unchanged == ((A_X, first),)
    assert changes.duplicates == (second,)
    assert changes.to_delete == ()


def test_relation_vm_without_request_id_is_deleted_with_its_relation_only():
    orphan = replace(record_of(spec_for(A_X)), request_id="")
    live = plan_changes({}, [orphan], release_policy="keep", live_relation_ids={1})
    gone = plan_changes({}, [orphan], release_policy="keep", live_relation_ids=set())
    assert live.to_delete == (orphan,)
    assert gone.released == (orphan,)


def test_two_requests_with_one_name_conflict():
    first, second = RequestKey(1, "app", "x"), RequestKey(1, "app", "y")
    spec = spec_for(first)
    clash = replace(spec_for(second), name=spec.name)
    _, result = serve_round([], {first: spec, second: clash}, live={1})
    assert result.composed == [spec.name]
    assert list(result.failures) == [second]
    assert "already taken" in result.failures[second]


def test_bugs_in_the_caller_raise():
    with pytest.raises(ValueError, match="release policy"):
        plan_changes({}, [], release_policy="purge", live_relation_ids=set())
    wrong = replace(spec_for(A_X), owner="action")
    with pytest.raises(ValueError, match="owner"):
        plan_changes({A_X: wrong}, [], release_policy="delete", live_relation_ids={1})


def test_plan_changes_is_deterministic():
    existing = [record_of(spec_for(k)) for k in (A_X, A_Y, B_Y)] + [action_vm("ops")]
    desired = {A_X: spec_for(A_X, memory_mib=2048), B_Z: spec_for(B_Z)}
    first = plan_changes(desired, existing, release_policy="delete", live_relation_ids={1, 2})
    for seed in range(5):
        shuffled = list(existing)
        random.Random(seed).shuffle(shuffled)
        again = plan_changes(
            dict(reversed(list(desired.items()))),
            shuffled,
            release_policy="delete",
            live_relation_ids={2, 1},
        )
        assert again == first


# ---------------------------------------------------------------------------------------------
# Answers


def test_answers_have_the_wire_shape_the_library_reads():
    spec = spec_for(
        A_X,
        pinned_cores=2,
        hugepages="1G",
        interfaces=[{"label": "eth0", "ip": "10.0.5.9", "subnet": "10.0.5.0/24"}],
    )
    placement = Placement(
        vcpus=2,
        memory_mib=1024,
        cells=(CellPlacement(0, 2, 1024, (2, 3), PAGE_1G_KIB, 1),),
    )
    vm = replace(
        record_of(spec),
        placement=placement,
        interfaces=({"label": "eth0", "mac": "52:54:00:aa:bb:cc", "attached-to": "br0"},),
    )
    answer = answer_for(A_X, vm, spec=spec, power_address="qemu+ssh://virsh@10.0.0.5/system")
    assert answer == {
        "id": "x",
        "name": "app-a-1-x",
        "state": "running",
        "uuid": "uuid-app-a-1-x",
        "interfaces": [
            {"label": "eth0", "mac": "52:54:00:aa:bb:cc", "attached-to": "br0", "ip": "10.0.5.9"}
        ],
        "placement": {"numa-nodes": [0], "cpus": [2, 3], "hugepages": "1G"},
        "power": {"type": "virsh", "address": "qemu+ssh://virsh@10.0.0.5/system", "id": vm.name},
    }
    assert VmAnswer.model_validate(answer).placement is not None


@pytest.mark.parametrize(
    ("vm", "error", "state"),
    [(None, None, "pending"), (None, "cannot place: no room", "failed")],
)
def test_answers_without_a_vm(vm: VmRecord | None, error: str | None, state: str):
    answer = answer_for(B_Y, vm, error, spec=spec_for(B_Y), power_type="lxd")
    assert answer["state"] == state
    assert answer.get("error") == error
    assert answer["name"] == "app-b-2-y"
    assert "power" not in answer
    VmAnswer.model_validate(answer)


def test_answer_for_a_shared_vm_has_no_pinning():
    vm = record_of(spec_for(A_Y))
    answer = answer_for(A_Y, vm, power_type="lxd", power_address="https://10.0.0.5:8443")
    assert answer["placement"] == {"numa-nodes": [], "cpus": []}
    assert answer["power"]["type"] == "lxd"
    VmAnswer.model_validate(answer)


# ---------------------------------------------------------------------------------------------
# Host reports


def test_host_report_round_trip():
    topology = host(cpus=4, nodes=2, pages_1g=2)
    allocations = [
        Placement(vcpus=2, memory_mib=1024, cells=(CellPlacement(1, 2, 1024, (4, 5)),)),
        Placement(vcpus=1, memory_mib=512),
    ]
    text = host_report(topology, allocations, hostname="node1", composed={B_Y, A_X})
    parsed, reason = parse_host_report(text)
    assert reason is None
    assert parsed is not None
    assert parsed == HostReport(topology, parsed.allocations, "node1", frozenset({A_X, B_Y}))
    assert sorted(parsed.allocations, key=str) == sorted(allocations, key=str)
    # Order of the hypervisor's list does not change the text.
    assert host_report(topology, allocations[::-1], hostname="node1", composed={A_X, B_Y}) == text


def _valid_report() -> dict[str, object]:
    return json.loads(host_report(host(), [], composed={A_X}))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "no host report yet"),
        ("", "no host report yet"),
        ("{not json", "not JSON"),
        ("[]", "not a JSON object"),
        (json.dumps({**_valid_report(), "version": "1"}), "version"),
        (json.dumps({**_valid_report(), "topology": None}), "topology"),
        (json.dumps({**_valid_report(), "topology": {"nodes": "x"}}), "topology.nodes"),
        (json.dumps({**_valid_report(), "allocations": {}}), "allocations"),
        (json.dumps({**_valid_report(), "allocations": [{"vcpus": -1}]}), "allocations[0]"),
        (json.dumps({**_valid_report(), "hostname": 5}), "hostname"),
        (json.dumps({**_valid_report(), "composed": [[1, "App", "x"]]}), "composed[0]"),
        (json.dumps({**_valid_report(), "composed": [["1", "app", "x"]]}), "composed[0]"),
        (json.dumps({**_valid_report(), "composed": "x"}), "composed"),
    ],
)
def test_bad_host_reports_are_ignored_with_a_reason(text: str | None, reason: str):
    report, why = parse_host_report(text)
    assert report is None
    assert why is not None
    assert reason in why


@given(st.text(max_size=200))
def test_parse_host_report_never_raises(text: str):
    report, reason = parse_host_report(text)
    assert (report is None) != (reason is None)


def test_collect_reports_splits_good_from_bad():
    good = host_report(host(), [])
    reports, problems = collect_reports(
        {"vm-host/1": "junk", "vm-host/0": good, "vm-host/2": None}
    )
    assert list(reports) == ["vm-host/0"]
    assert problems == {"vm-host/1": "host report is not JSON", "vm-host/2": "no host report yet"}


# ---------------------------------------------------------------------------------------------
# Assignment


def pinned(key: RequestKey, count: int) -> VmSpec:
    return spec_for(key, pinned_cores=count)


def report(
    topology: HostTopology,
    allocations: Sequence[Placement] = (),
    hostname: str | None = None,
    composed: frozenset[RequestKey] = frozenset(),
) -> HostReport:
    return HostReport(topology, tuple(allocations), hostname, composed)


def busy(topology: HostTopology, pinned_cpus: int) -> list[Placement]:
    """Allocations that pin this many CPUs of the host."""
    spec = VmSpec(name="filler", vcpus=pinned_cpus, memory_mib=1024, pinned_count=pinned_cpus)
    result = plan(topology, [], spec, POLICY)
    assert isinstance(result, Placement)
    return [result]


K = [RequestKey(1, "app", f"r{i}") for i in range(6)]


def run_assign(
    requests: Sequence[tuple[RequestKey, VmSpec, str | None]],
    reports: Mapping[str, HostReport],
    current: Mapping[RequestKey, str] | None = None,
    composed: frozenset[RequestKey] = frozenset(),
    **kwargs: object,
) -> Assignment:
    return assign(requests, reports, current or {}, composed, POLICY, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("busy0", "busy1", "want", "expected"),
    [
        # Both fit: best fit packs the fuller unit, keeping the emptier one's room whole.
        (2, 0, 4, "vm-host/0"),
        (0, 2, 4, "vm-host/1"),
        # Does not fit on the fuller unit: goes to the emptier one.
        (6, 0, 4, "vm-host/1"),
        (0, 6, 4, "vm-host/0"),
        # Equal fit: unit name order.
        (0, 0, 4, "vm-host/0"),
    ],
)
def test_best_fit_across_units(busy0: int, busy1: int, want: int, expected: str):
    topology = host(cpus=8)
    reports = {
        "vm-host/0": report(topology, busy(topology, busy0) if busy0 else []),
        "vm-host/1": report(topology, busy(topology, busy1) if busy1 else []),
    }
    result = run_assign([(K[0], pinned(K[0], want), None)], reports)
    assert result.units == {K[0]: expected}
    assert result.unplaced == {}


def test_shared_vms_pack_by_shared_headroom():
    topology = host(cpus=8)
    filler = Placement(vcpus=6, memory_mib=1024)
    reports = {"vm-host/0": report(topology), "vm-host/1": report(topology, [filler])}
    result = run_assign([(K[0], spec_for(K[0], cores=2), None)], reports)
    assert result.units == {K[0]: "vm-host/1"}


def test_sequential_simulation_prevents_double_counting():
    topology = host(cpus=8)
    requests = [(K[0], pinned(K[0], 6), None), (K[1], pinned(K[1], 6), None)]
    one = run_assign(requests, {"vm-host/0": report(topology)})
    assert one.units == {K[0]: "vm-host/0"}
    assert set(one.unplaced) == {K[1]}
    assert one.unplaced[K[1]].startswith("fits on no vm-host unit: vm-host/0: ")
    two = run_assign(requests, {"vm-host/0": report(topology), "vm-host/1": report(topology)})
    assert two.units == {K[0]: "vm-host/0", K[1]: "vm-host/1"}


@pytest.mark.parametrize(
    ("host_field", "expected"),
    [("vm-host/1", "vm-host/1"), ("node-b", "vm-host/1"), ("vm-host/0", "vm-host/0")],
)
def test_host_field_pins_to_one_unit(host_field: str, expected: str):
    topology = host(cpus=8)
    reports = {
        "vm-host/0": report(topology, busy(topology, 2), hostname="node-a"),
        "vm-host/1": report(topology, hostname="node-b"),
    }
    result = run_assign([(K[0], pinned(K[0], 2), host_field)], reports)
    assert result.units == {K[0]: expected}


def test_pinned_host_that_is_full_or_unknown_gets_a_reason():
    topology = host(cpus=8)
    reports = {
        "vm-host/0": report(topology, busy(topology, 8), hostname="node-a"),
        "vm-host/1": report(topology, hostname="node-b"),
    }
    result = run_assign(
        [(K[0], pinned(K[0], 2), "node-a"), (K[1], pinned(K[1], 2), "node-c")], reports
    )
    assert result.units == {}
    assert result.unplaced[K[0]].startswith("fits on no vm-host unit: vm-host/0: ")
    assert result.unplaced[K[1]] == (
        "host 'node-c' names no vm-host unit; units: vm-host/0 (node-a), vm-host/1 (node-b)"
    )


def test_unit_departure_reassigns_only_requests_not_composed():
    topology = host(cpus=8)
    reports = {"vm-host/0": report(topology), "vm-host/1": report(topology)}
    current = {K[0]: "vm-host/2", K[1]: "vm-host/2", K[2]: "vm-host/1"}
    requests = [(k, pinned(k, 2), None) for k in K[:3]]
    result = run_assign(requests, reports, current, composed=frozenset({K[0]}))
    assert result.units[K[0]] == "vm-host/2"  # composed: never moved
    assert result.units[K[1]] in {"vm-host/0", "vm-host/1"}  # its unit left: placed anew
    assert result.units[K[2]] == "vm-host/1"  # its unit is still here


def test_requests_composed_on_a_unit_that_left_are_placed_anew():
    topology = host(cpus=8)
    reports = {"vm-host/0": report(topology)}
    # vm-host/1 reported K0 composed, then left: its report (and VM) are gone.
    result = run_assign([(K[0], pinned(K[0], 2), None)], reports, {K[0]: "vm-host/1"})
    assert result.units == {K[0]: "vm-host/0"}


def test_reports_say_where_a_request_is_composed():
    topology = host(cpus=8)
    reports = {
        "vm-host/0": report(topology),
        "vm-host/1": report(topology, busy(topology, 2), composed=frozenset({K[0]})),
    }
    result = run_assign([(K[0], pinned(K[0], 2), None)], reports, {K[0]: "vm-host/0"})
    assert result.units == {K[0]: "vm-host/1"}


def test_composed_requests_stay_even_when_their_pin_changes():
    topology = host(cpus=8)
    reports = {
        "vm-host/0": report(topology, busy(topology, 2), composed=frozenset({K[0]})),
        "vm-host/1": report(topology, hostname="node-b"),
    }
    result = run_assign([(K[0], pinned(K[0], 2), "node-b")], reports, {K[0]: "vm-host/0"})
    assert result.units == {K[0]: "vm-host/0"}


def test_pending_assignment_stays_while_it_fits_and_counts_first():
    topology = host(cpus=8)
    reports = {"vm-host/0": report(topology, busy(topology, 4)), "vm-host/1": report(topology)}
    # K5 was assigned to vm-host/1 earlier (maybe being composed right now): it stays, and its
    # CPUs count before the new K0 (first in key order) is placed, so K0 no longer fits.
    current = {K[5]: "vm-host/1"}
    requests = [(K[0], pinned(K[0], 5), None), (K[5], pinned(K[5], 6), None)]
    result = run_assign(requests, reports, current)
    assert result.units == {K[5]: "vm-host/1"}
    assert list(result.unplaced) == [K[0]]


def test_pending_assignment_moves_when_it_no_longer_fits():
    topology = host(cpus=8)
    reports = {"vm-host/0": report(topology, busy(topology, 8)), "vm-host/1": report(topology)}
    result = run_assign([(K[0], pinned(K[0], 2), None)], reports, {K[0]: "vm-host/0"})
    assert result.units == {K[0]: "vm-host/1"}


def test_unit_with_unreadable_report_keeps_its_requests():
    topology = host(cpus=8)
    reports = {"vm-host/0": report(topology)}
    result = run_assign(
        [(K[0], pinned(K[0], 2), None)],
        reports,
        {K[0]: "vm-host/1"},
        present={"vm-host/0", "vm-host/1"},
    )
    assert result.units == {K[0]: "vm-host/1"}


def test_eligibility_hook_excludes_units():
    topology = host(cpus=8)
    reports = {"vm-host/0": report(topology, busy(topology, 2)), "vm-host/1": report(topology)}

    def only_unit_one(unit: str, _report: HostReport, _spec: VmSpec) -> str | None:
        return None if unit == "vm-host/1" else "space oam is not reachable here"

    result = run_assign([(K[0], pinned(K[0], 2), None)], reports, eligible=only_unit_one)
    assert result.units == {K[0]: "vm-host/1"}
    nowhere = run_assign([(K[0], pinned(K[0], 2), None)], reports, eligible=lambda *_: "no bridge")
    assert nowhere.unplaced[K[0]] == (
        "fits on no vm-host unit: vm-host/0: no bridge; vm-host/1: no bridge"
    )


def test_no_reports_at_all():
    result = run_assign([(K[0], pinned(K[0], 2), None)], {})
    assert result.unplaced == {K[0]: "no vm-host unit has reported its host yet"}


def test_reasons_are_shortened():
    topology = host(cpus=2)
    reports = {f"vm-host/{i}": report(topology) for i in range(20)}
    result = run_assign([(K[0], pinned(K[0], 4), None)], reports)
    assert len(result.unplaced[K[0]]) <= 1000
    assert result.unplaced[K[0]].endswith("...")


def test_duplicate_request_keys_are_a_bug():
    with pytest.raises(ValueError, match="share a key"):
        run_assign([(K[0], pinned(K[0], 1), None), (K[0], pinned(K[0], 1), None)], {})


def test_assignment_is_deterministic():
    topology = host(cpus=4, nodes=2)
    reports = {
        "vm-host/0": report(topology, busy(topology, 3)),
        "vm-host/1": report(topology),
        "vm-host/2": report(topology, busy(topology, 1)),
    }
    requests = [(k, pinned(k, 1 + i % 3), None) for i, k in enumerate(K)]
    first = run_assign(requests, reports)
    assert len(first.units) + len(first.unplaced) == len(K)
    for seed in range(5):
        shuffled = list(requests)
        random.Random(seed).shuffle(shuffled)
        again = run_assign(shuffled, dict(reversed(list(reports.items()))))
        assert again == first
        assert assignment_to_json(again) == assignment_to_json(first)


def test_assignment_json_round_trip():
    assignment = Assignment(
        units={K[1]: "vm-host/1", B_Y: "vm-host/0"}, unplaced={A_X: "fits on no vm-host unit"}
    )
    text = assignment_to_json(assignment)
    back, reason = assignment_from_json(text)
    assert reason is None
    assert back == assignment
    assert back.for_unit("vm-host/1") == {K[1]}
    assert list(json.loads(text)) == ["assigned", "unplaced", "version"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, None),
        ("", None),
        ("nope", "not JSON"),
        ('{"version": "9"}', "version"),
        ('{"version": "0", "assigned": {}}', "assigned is not an array"),
        ('{"version": "0", "assigned": [[1, "app", "x"]]}', "assigned[0]"),
        ('{"version": "0", "unplaced": [[1, "App", "x", "r"]]}', "unplaced[0]"),
        ('{"version": "0", "assigned": [[true, "app", "x", "u"]]}', "assigned[0]"),
    ],
)
def test_bad_assignment_data_gives_an_empty_assignment(text: str | None, reason: str | None):
    assignment, why = assignment_from_json(text)
    assert assignment == Assignment()
    if reason is None:
        assert why is None
    else:
        assert why is not None
        assert reason in why


# ---------------------------------------------------------------------------------------------
# Properties and a whole round of the protocol


owners = st.sampled_from(
    ["action", "", "relation:1:app-a", "relation:2:app-b", "relation:3:gone", "relation:x:y"]
)
vm_records = st.builds(
    VmRecord,
    name=st.from_regex(r"\A[a-z][a-z0-9-]{0,8}[a-z0-9]\Z"),
    uuid=st.just("u"),
    state=st.just(VmState.RUNNING),
    placement=st.just(Placement(vcpus=1, memory_mib=64)),
    owner=owners,
    request_id=st.sampled_from(["", "x", "y", "z"]),
    spec_hash=st.just("0"),
    managed=st.booleans(),
)


@given(
    st.lists(vm_records, max_size=8, unique_by=lambda v: v.name),
    st.sets(st.sampled_from([A_X, A_Y, B_Y, B_Z])),
    st.sampled_from(["delete", "keep"]),
)
def test_only_relation_vms_of_dropped_requests_or_gone_relations_are_deleted(
    existing: list[VmRecord], wanted: set[RequestKey], policy: str
):
    desired = {k: spec_for(k) for k in wanted}
    changes = plan_changes(desired, existing, release_policy=policy, live_relation_ids={1, 2})
    for vm in changes.to_delete:
        parsed = parse_owner(vm.owner)
        assert vm.managed
        assert parsed is not None
        assert request_key_of(vm) not in desired
        assert parsed[0] in {1, 2} or policy == "delete"
    outsiders = {vm.name for vm in existing if not vm.managed or parse_owner(vm.owner) is None}
    assert not (touched(changes) - {s.name for _, s in changes.to_compose}) & outsiders
    if policy == "keep":
        assert all(parse_owner(vm.owner) != (3, "gone") for vm in changes.to_delete)


def test_composed_keys_and_answers_by_relation():
    vms = [record_of(spec_for(A_X)), record_of(spec_for(B_Y)), action_vm("ops")]
    assert composed_keys(vms) == {A_X, B_Y}
    by_key = {request_key_of(vm): vm for vm in vms if request_key_of(vm) is not None}
    answers = answers_by_relation(
        [B_Z, A_X, B_Y, A_Y],
        by_key,  # type: ignore[arg-type]
        specs={B_Z: spec_for(B_Z)},
        errors={A_Y: "fits on no vm-host unit"},
        power_address="qemu+ssh://virsh@10.0.0.5/system",
    )
    assert list(answers) == [1, 2]
    assert [(a["id"], a["state"]) for a in answers[1]] == [("x", "running"), ("y", "failed")]
    assert [(a["id"], a["state"]) for a in answers[2]] == [("y", "running"), ("z", "pending")]
    assert answers[2][1]["name"] == "app-b-2-z"
    for items in answers.values():
        for item in items:
            VmAnswer.model_validate(item)


class Unit:
    """One vm-host unit in a test: its host's VMs, composing what is assigned to it."""

    def __init__(self, name: str, topology: HostTopology, hostname: str):
        self.name, self.topology, self.hostname = name, topology, hostname
        self.vms: list[VmRecord] = []

    def report(self) -> str:
        return host_report(
            self.topology,
            [vm.placement for vm in self.vms],
            hostname=self.hostname,
            composed=composed_keys(self.vms),
        )

    def reconcile(self, assignment_text: str, specs: Mapping[RequestKey, VmSpec]) -> Changes:
        assignment, reason = assignment_from_json(assignment_text)
        assert reason is None
        mine = assignment.for_unit(self.name)
        desired = {k: specs[k] for k in mine}
        changes = plan_changes(
            desired,
            self.vms,
            release_policy="delete",
            live_relation_ids={k.relation_id for k in specs},
            retain=set(specs) - mine,
        )
        gone = {vm.name for vm in changes.to_delete}
        self.vms = [vm for vm in self.vms if vm.name not in gone]
        for _key, spec in changes.to_compose:
            placed = plan(self.topology, [vm.placement for vm in self.vms], spec, POLICY)
            assert isinstance(placed, Placement)
            self.vms.append(replace(record_of(spec), placement=placed))
        return changes


def leader_round(
    units: Sequence[Unit], specs: Mapping[RequestKey, VmSpec], previous: str | None
) -> str:
    reports, problems = collect_reports({u.name: u.report() for u in units})
    assert problems == {}
    current, _ = assignment_from_json(previous)
    requests = [(k, specs[k], None) for k in specs]
    return assignment_to_json(assign(requests, reports, current.units, frozenset(), POLICY))


def test_a_whole_round_composes_each_request_once_and_is_stable():
    topology = host(cpus=8)
    units = [Unit("vm-host/0", topology, "a"), Unit("vm-host/1", topology, "b")]
    specs = {k: pinned(k, 5) for k in (A_X, A_Y, B_Y)}
    text = leader_round(units, specs, None)
    for unit in units:
        unit.reconcile(text, specs)
    hosted = sorted(vm.name for u in units for vm in u.vms)
    # Two of the three 5-CPU requests fit (one per 8-CPU unit); the third is unplaced.
    assert len(hosted) == 2
    assert len(assignment_from_json(text)[0].unplaced) == 1
    # The next round sees what was composed and changes nothing.
    again = leader_round(units, specs, text)
    assert again == text
    for unit in units:
        changes = unit.reconcile(again, specs)
        assert changes.to_compose == ()
        assert changes.to_delete == ()
    # Withdraw one hosted request: only its VM goes, on its own unit.
    hosted_key = next(iter(assignment_from_json(text)[0].units))
    del specs[hosted_key]
    text = leader_round(units, specs, again)
    for unit in units:
        unit.reconcile(text, specs)
    assert len([vm for u in units for vm in u.vms]) == 1
    assert hosted_key not in {request_key_of(vm) for u in units for vm in u.vms}
    # The freed CPUs show in the next reports; the leader's next round places the third.
    text = leader_round(units, specs, text)
    for unit in units:
        unit.reconcile(text, specs)
    assert composed_keys(vm for u in units for vm in u.vms) == set(specs)
    assert assignment_from_json(text)[0].unplaced == {}


# ---------------------------------------------------------------------------------------------
# lead: one hook's decision


def lead_args(**overrides: object) -> dict[str, object]:
    args: dict[str, object] = {
        "leader": True,
        "requests": [RelationRequest(A_X, spec_for(A_X)), RelationRequest(A_Y, error="bad")],
        "topology": host(),
        "vms": [],
        "hostname": "a",
        "peers": None,
        "policy": POLICY,
        "mapping": {},
    }
    args.update(overrides)
    return args


def test_lead_without_peers_hosts_everything_here():
    decision = lead("vm-host/0", **lead_args())  # type: ignore[arg-type]
    assert decision.mine == {A_X}
    assert decision.answer_errors == {A_Y: "bad"}
    assert decision.assignment_text is None
    assert parse_host_report(decision.report)[0] is not None
    follower = lead("vm-host/0", **lead_args(leader=False))  # type: ignore[arg-type]
    assert follower.mine == {A_X}
    assert follower.answer_errors == {}


def test_a_follower_takes_the_assignment_in_force_and_answers_no_refusals():
    text = assignment_to_json(Assignment(units={A_X: "vm-host/1"}))
    peers = Peers(reports={"vm-host/0": None}, assignment=text)
    decision = lead("vm-host/1", **lead_args(leader=False, peers=peers))  # type: ignore[arg-type]
    assert decision.mine == {A_X}
    assert decision.answer_errors == {}
    assert decision.assignment_text is None
    bad = lead("vm-host/1", **lead_args(leader=False, peers=Peers({}, "{")))  # type: ignore[arg-type]
    assert bad.mine == frozenset()
    assert bad.problems == ("peer assignment unreadable: assignment is not JSON",)


def test_the_leader_assigns_writes_and_answers_the_unplaceable():
    other = host_report(host(), [], hostname="b")
    # (Until issue 11 item 6 this fleet also held vm-host/2 with an unreadable report and
    # still placed A_X; now nothing new is placed while a report is unknown, see
    # test_nothing_new_is_placed_while_a_member_report_is_unknown.)
    peers = Peers(reports={"vm-host/1": other}, assignment=None)
    big = replace(spec_for(B_Y), vcpus=64)
    requests = [RelationRequest(A_X, spec_for(A_X)), RelationRequest(B_Y, big)]
    decision = lead("vm-host/0", **lead_args(peers=peers, requests=requests))  # type: ignore[arg-type]
    assignment, problem = assignment_from_json(decision.assignment_text)
    assert problem is None
    assert set(assignment.units) == {A_X}
    assert set(decision.answer_errors) == {B_Y}
    assert "fits on no vm-host unit" in decision.answer_errors[B_Y]
    assert decision.problems == ()
    assert decision.mine == assignment.for_unit("vm-host/0")


@pytest.mark.parametrize("unknown", [None, "nonsense", '{"version": "7"}'])
def test_nothing_new_is_placed_while_a_member_report_is_unknown(unknown: str | None):
    other = host_report(host(), [], hostname="b")
    held = assignment_to_json(Assignment(units={A_Y: "vm-host/1"}))
    peers = Peers(reports={"vm-host/1": other, "vm-host/2": unknown}, assignment=held)
    requests = [RelationRequest(A_X, spec_for(A_X)), RelationRequest(A_Y, spec_for(A_Y))]
    decision = lead("vm-host/0", **lead_args(peers=peers, requests=requests))  # type: ignore[arg-type]
    assignment, _ = assignment_from_json(decision.assignment_text)
    # What was assigned stays; what is new waits, and its requester is told why.
    assert assignment.units == {A_Y: "vm-host/1"}
    assert decision.answer_errors == {A_X: "waiting for vm-host/2 to report"}
    assert decision.mine == frozenset()
    assert len(decision.problems) == 1
    assert decision.problems[0].startswith("host report of vm-host/2 ignored: ")
    # Once vm-host/2 reports, the waiting request is placed.
    peers = Peers(reports={"vm-host/1": other, "vm-host/2": other}, assignment=held)
    again = lead("vm-host/0", **lead_args(peers=peers, requests=requests))  # type: ignore[arg-type]
    assert A_X in assignment_from_json(again.assignment_text)[0].units
    assert again.answer_errors == {}


def test_one_bad_assignment_row_never_voids_the_others():
    text = json.dumps(
        {
            "version": "0",
            "assigned": [
                [1, "app-a", "x", "vm-host/1"],
                [1, "App", "y", "vm-host/1"],
                ["1", "app-a", "z", "vm-host/0"],
                [2, "app-b", "y", "vm-host/0"],
            ],
            "unplaced": [[2, "app-b", "z", "no room"], "junk"],
        }
    )
    assignment, why = assignment_from_json(text)
    assert assignment.units == {A_X: "vm-host/1", B_Y: "vm-host/0"}
    assert assignment.unplaced == {B_Z: "no room"}
    assert why is not None
    for bad in ("assigned[1]", "assigned[2]", "unplaced[1]"):
        assert bad in why
    # A follower keeps serving its own rows.
    peers = Peers(reports={}, assignment=text)
    decision = lead(
        "vm-host/1",
        **lead_args(leader=False, peers=peers),  # type: ignore[arg-type]
    )
    assert decision.mine == {A_X}


def test_a_newer_assignment_version_keeps_the_rows_it_can_read():
    text = json.dumps({"version": "1", "assigned": [[1, "app-a", "x", "vm-host/1", "extra"]]})
    older = json.dumps({"version": "1", "assigned": [[1, "app-a", "x", "vm-host/1"]]})
    assert assignment_from_json(older)[0].units == {A_X: "vm-host/1"}
    assignment, why = assignment_from_json(text)
    assert assignment.units == {}
    assert why is not None
    assert "version" in why


def test_a_unit_never_composes_what_another_report_lists_as_composed():
    elsewhere = host_report(host(), [], hostname="b", composed={A_X})
    # The (rewritten) assignment gives A_X to vm-host/0 although vm-host/1 hosts it.
    text = assignment_to_json(Assignment(units={A_X: "vm-host/0"}))
    peers = Peers(reports={"vm-host/1": elsewhere}, assignment=text)
    follower = lead("vm-host/0", **lead_args(leader=False, peers=peers))  # type: ignore[arg-type]
    assert follower.mine == frozenset()
    leader = lead("vm-host/0", **lead_args(peers=peers))  # type: ignore[arg-type]
    assert leader.mine == frozenset()
    assert assignment_from_json(leader.assignment_text)[0].units == {A_X: "vm-host/1"}
    # A unit that hosts it itself keeps it (there is nothing to compose, only to answer).
    mine = lead(
        "vm-host/0",
        **lead_args(leader=False, peers=peers, vms=[record_of(spec_for(A_X))]),  # type: ignore[arg-type]
    )
    assert mine.mine == {A_X}


def test_the_leader_places_nothing_where_the_networks_cannot_serve_it():
    wired = spec_for(A_X, interfaces=[{"label": "eth0", "space": "storage"}])
    decision = lead(
        "vm-host/0",
        **lead_args(requests=[RelationRequest(A_X, wired)], peers=Peers({}, None)),  # type: ignore[arg-type]
    )
    assert decision.mine == frozenset()
    assert "storage" in decision.answer_errors[A_X]


@pytest.mark.parametrize("text", ["[" * 2000 + "]" * 2000, '{"a":' * 2000 + "1" + "}" * 2000])
def test_deeply_nested_peer_data_is_unreadable_not_a_recursion_error(text: str):
    import vmhost.relation.fleet as fleet_module

    report, problem = fleet_module.parse_host_report(text)
    assert report is None
    assert problem is not None
    assignment, why = fleet_module.assignment_from_json(text)
    assert not assignment.units
    assert why is not None
    assert "nested too deeply" in why


def test_a_failed_vm_is_answered_with_the_hypervisor_reason():
    spec = spec_for(A_X)
    vm = replace(record_of(spec, VmState.FAILED), state_reason="paused on a disk I/O error")
    answer = answer_for(A_X, vm, spec=spec)
    assert answer["state"] == "failed"
    assert answer["error"] == "paused on a disk I/O error"
    assert answer_for(A_X, vm, "changed", spec=spec)["error"] == "changed"


# ---------------------------------------------------------------------------------------------
# Scopes, legacy owners and relations seen broken (issue 11 items 7 and 8)

SCOPE = Scope("vm-host", "5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f")
OTHER_APP = Scope("vm-host-b", SCOPE.model_uuid)
OTHER_MODEL = Scope("vm-host", "0b8c3c1e-4e09-4b6f-9d0e-7f1f5d1c2a3b")


def scoped(key: RequestKey, scope: Scope = SCOPE) -> VmRecord:
    return replace(record_of(spec_for(key)), owner=key.owner_in(scope))


def test_scoped_owners_round_trip_and_legacy_ones_still_parse():
    owner = relation_owner(7, "pg", SCOPE)
    assert owner == f"relation:7:pg:vm-host:{SCOPE.model_uuid}"
    assert read_owner(owner) == Owner("pg", 7, SCOPE)
    assert parse_owner(owner) == (7, "pg")
    assert read_owner("relation:7:pg") == Owner("pg", 7, None)
    released = released_owner("pg", SCOPE)
    assert released == f"released:pg:vm-host:{SCOPE.model_uuid}"
    assert read_owner(released) == Owner("pg", None, SCOPE)
    assert read_owner(released).released  # type: ignore[union-attr]
    assert parse_owner(released) is None
    for bad in (
        "relation:7:pg:vm-host",
        "relation:7:pg:vm-host:not-a-uuid",
        f"relation:7:pg:Vm:{SCOPE.model_uuid}",
        f"relation:7:pg:vm-host:{SCOPE.model_uuid}:x",
        "released:pg",
        f"released:PG:vm-host:{SCOPE.model_uuid}",
    ):
        assert read_owner(bad) is None, bad
    with pytest.raises(ValueError, match="model uuid"):
        Scope("vm-host", "../../etc")


def test_a_vm_composed_before_scoped_owners_still_counts_as_its_request():
    """A legacy owner (relation:<id>:<app>) is still this scope's request in the host report.

    Otherwise the leader would see the request uncomposed after an upgrade and place a
    second VM for it.
    """
    legacy = replace(record_of(spec_for(A_X)), owner="relation:1:app-a")
    assert request_key_of(legacy, SCOPE) == A_X
    assert composed_keys([legacy], SCOPE) == {A_X}
    host_of_b = replace(legacy, owner=relation_owner(1, "app-a", OTHER_APP))
    assert composed_keys([legacy, host_of_b], OTHER_MODEL) == {A_X}
    assert request_key_of(host_of_b, SCOPE) is None


@pytest.mark.parametrize("policy", ["delete", "keep"])
def test_vms_of_another_application_or_model_are_in_no_result(policy: str):
    existing = [scoped(A_X, OTHER_APP), scoped(A_Y, OTHER_MODEL), scoped(B_Y, OTHER_APP)]
    for live, broken in (({1, 2}, set()), (set(), {1, 2})):
        changes = plan_changes(
            {},
            existing,
            release_policy=policy,
            live_relation_ids=live,
            broken_relation_ids=broken,
            scope=SCOPE,
        )
        assert touched(changes) == set()
        assert changes.orphaned == ()
    assert request_key_of(scoped(A_X, OTHER_APP), SCOPE) is None
    assert composed_keys([scoped(A_X, OTHER_APP), scoped(A_Y)], SCOPE) == {A_Y}


@pytest.mark.parametrize("policy", ["delete", "keep"])
def test_only_relations_seen_broken_are_released_the_rest_is_orphaned(policy: str):
    existing = [scoped(A_X), scoped(B_Y), replace(scoped(B_Z), owner="relation:2:app-b")]
    changes = plan_changes(
        {},
        existing,
        release_policy=policy,
        live_relation_ids=set(),
        broken_relation_ids={1},
        scope=SCOPE,
    )
    gone = names(changes.to_delete) if policy == "delete" else names(changes.released)
    assert gone == [scoped(A_X).name]
    assert names(changes.orphaned) == sorted([scoped(B_Y).name, scoped(B_Z).name])
    assert (changes.released if policy == "delete" else changes.to_delete) == ()


def test_legacy_owner_of_a_live_relation_id_with_another_app_is_orphaned():
    mine = replace(record_of(spec_for(A_X)), owner="relation:1:app-a")
    theirs = replace(record_of(spec_for(RequestKey(1, "mysql", "x"))), owner="relation:1:mysql")
    spec = replace(spec_for(A_X), owner=A_X.owner_in(SCOPE))
    changes = plan_changes(
        {A_X: spec},
        [mine, theirs],
        release_policy="delete",
        live_relation_ids={1},
        broken_relation_ids=set(),
        scope=SCOPE,
        live_apps={1: "app-a"},
    )
    assert changes.unchanged == ((A_X, mine),)
    assert changes.orphaned == (theirs,)
    assert changes.to_delete == ()


def test_serve_re_owns_kept_vms_and_answers_nothing_for_them():
    vm = scoped(A_X)
    backend = FakeBackend(host=host(cpus=8), vms={vm.name: vm})
    state = HostState(backend.topology(), backend.list_vms(), POLICY, {}, "vm-host")
    result = serve(
        backend,
        state,
        [],
        set(),
        release_policy="keep",
        live_relation_ids=set(),
        power=Power(),
        broken_relation_ids={1},
        scope=SCOPE,
    )
    assert result.released == [vm.name]
    assert backend.vms[vm.name].owner == released_owner("app-a", SCOPE)
    assert result.answers == {}
    # The next round leaves a released VM alone whatever happens.
    again = plan_changes(
        {A_X: replace(spec_for(A_X), owner=A_X.owner_in(SCOPE))},
        backend.list_vms(),
        release_policy="delete",
        live_relation_ids={1},
        broken_relation_ids={1},
        scope=SCOPE,
    )
    assert again.to_delete == ()
    assert again.released == ()
    assert [k for k, _ in again.to_compose] == [A_X]


# ---------------------------------------------------------------------------------------------
# Departed units (issue 11 item 5)


def test_a_request_composed_on_a_unit_that_left_is_answered_not_placed_anew():
    topology = host(cpus=8)
    reports = {"vm-host/0": report(topology)}
    previous = Assignment(units={K[0]: "vm-host/1", K[1]: "vm-host/1"}, composed=frozenset({K[0]}))
    requests = [(K[0], pinned(K[0], 2), None), (K[1], pinned(K[1], 2), None)]
    result = run_assign(requests, reports, previous.units, previous=previous)
    # K1 was not composed there yet: placed anew. K0's VM went with vm-host/1.
    assert result.units == {K[1]: "vm-host/0"}
    assert result.unplaced[K[0]].startswith("host vm-host/1 left")
    assert result.left == {K[0]: ("vm-host/1", "")}
    # It stays so in later rounds, read back from the peer data ...
    text = assignment_to_json(result)
    back, why = assignment_from_json(text)
    assert why is None
    assert back.left == result.left
    later = run_assign(requests, reports, back.units, previous=back)
    assert later.left == result.left
    assert set(later.units) == {K[1]}
    # ... until an operator asks, or the request's host changes.
    asked = run_assign(requests, reports, back.units, previous=back, reassign={K[0]})
    assert asked.units == {K[0]: "vm-host/0", K[1]: "vm-host/0"}
    assert asked.left == {}
    pinned_now = [(K[0], pinned(K[0], 2), "vm-host/0"), requests[1]]
    moved = run_assign(pinned_now, reports, back.units, previous=back)
    assert moved.units[K[0]] == "vm-host/0"


def test_lead_keeps_which_requests_are_composed_in_the_peer_data():
    other = host_report(host(), [], hostname="b", composed={A_X})
    peers = Peers(
        reports={"vm-host/1": other},
        assignment=assignment_to_json(Assignment(units={A_X: "vm-host/1"})),
    )
    decision = lead("vm-host/0", **lead_args(peers=peers))  # type: ignore[arg-type]
    assert decision.composed_text is not None
    assert composed_from_json(decision.composed_text) == ({A_X: "vm-host/1"}, None)
    # vm-host/1 leaves: A_X is answered, never composed here.
    gone = Peers(reports={}, assignment=decision.assignment_text, composed=decision.composed_text)
    after = lead("vm-host/0", **lead_args(peers=gone))  # type: ignore[arg-type]
    assert after.mine == frozenset()
    assert after.answer_errors[A_X].startswith("host vm-host/1 left")
    # A garbled `composed` is logged; nothing else is lost.
    bad = Peers(reports={"vm-host/1": other}, assignment=decision.assignment_text, composed="{")
    noisy = lead("vm-host/0", **lead_args(peers=bad))  # type: ignore[arg-type]
    assert noisy.problems == ("peer data unreadable: composed is not JSON",)
    assert assignment_from_json(noisy.assignment_text)[0].units == {A_X: "vm-host/1"}


def test_the_leader_counts_vfs_of_sriov_mapped_through_networks():
    from vmhost.model import HostNic
    from vmhost.networks import parse_networks_config

    def with_pf(enabled: int) -> HostTopology:
        pf = HostNic(name="enp65s0f0", numa_node=0, sriov_total_vfs=8, sriov_enabled_vfs=enabled)
        return replace(host(), nics=(pf,))

    mapping = parse_networks_config("fast: {sriov-pf: enp65s0f0}")
    wired = spec_for(A_X, pinned_cores=2, interfaces=[{"label": "eth0", "space": "fast"}])
    peers = Peers(reports={"vm-host/1": host_report(with_pf(2), [])}, assignment=None)
    decision = lead(
        "vm-host/0",
        **lead_args(  # type: ignore[arg-type]
            requests=[RelationRequest(A_X, wired)],
            topology=with_pf(0),
            peers=peers,
            mapping=mapping,
        ),
    )
    # vm-host/0's PF has no VF enabled: only vm-host/1 can pass one through.
    assert assignment_from_json(decision.assignment_text)[0].units == {A_X: "vm-host/1"}

"""The charm serving VMs over the `vms` relation, in ops.testing with the in-memory backend."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from ops import testing

import charms.vm_host.v0.vm_host as vm_lib
from conftest import FakeHost
from vmhost.relation import fleet, keys, serve

pytestmark = pytest.mark.usefixtures("fake_access")

DB = {"id": "db-0", "cores": 2, "memory": 1024, "pinned-cores": 2}
WEB = {"id": "web-0", "cores": 1, "memory": 512}


def answers(out: testing.State, relation: testing.Relation) -> dict[str, vm_lib.VmAnswer]:
    return {a.id: a for a in vm_lib.answers_from(out.get_relation(relation.id))}


def test_requests_are_composed_and_answered(ctx, backend, fake_host: FakeHost):
    relation = vm_lib.requirer_relation([DB, WEB], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    db = backend.vms[f"pg-{relation.id}-db-0"]
    assert db.owner == f"relation:{relation.id}:pg"
    assert len(db.placement.pinned_cpus) == 2
    got = answers(out, relation)
    assert got["db-0"].state == "running"
    assert got["db-0"].placement is not None
    assert sorted(got["db-0"].placement.cpus) == sorted(db.placement.pinned_cpus)
    assert got["web-0"].state == "running"
    assert got["web-0"].power is not None
    assert got["web-0"].power.type == "virsh"


def test_bad_and_unplaceable_requests_fail_with_reasons_others_go_on(ctx, backend, fake_host):
    bad = {"id": "bad-0", "memory": 512, "storage": "root:x"}
    huge = {"id": "huge-0", "memory": 1024, "pinned-cores": 30}
    relation = vm_lib.requirer_relation([DB, bad, huge], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    got = answers(out, relation)
    assert got["db-0"].state == "running"
    assert got["bad-0"].state == "failed"
    assert got["bad-0"].error is not None
    assert "storage" in got["bad-0"].error
    assert got["huge-0"].state == "failed"
    assert got["huge-0"].error is not None
    assert "30" in got["huge-0"].error
    assert sorted(backend.vms) == [f"pg-{relation.id}-db-0"]


def test_apps_are_isolated_and_withdrawal_deletes_only_that_vm(ctx, backend, fake_host):
    pg = vm_lib.requirer_relation([DB], remote_app_name="pg")
    web = vm_lib.requirer_relation([WEB], remote_app_name="web")
    ctx.run(ctx.on.action("compose-vm", params={"name": "ops-0", "memory": 256}), testing.State())
    state = testing.State(leader=True, relations={pg, web})
    ctx.run(ctx.on.relation_changed(pg), state)
    assert sorted(backend.vms) == ["ops-0", f"pg-{pg.id}-db-0", f"web-{web.id}-web-0"]

    # web withdraws its request: only its VM goes.
    web_now = replace(web, remote_app_data={"version": '"0"', "requests": "[]"})
    out = ctx.run(
        ctx.on.relation_changed(web_now), testing.State(leader=True, relations={pg, web_now})
    )
    assert sorted(backend.vms) == ["ops-0", f"pg-{pg.id}-db-0"]
    assert answers(out, web_now) == {}
    # pg never sees web's VMs nor the action's.
    assert set(answers(out, pg)) == {"db-0"}


@pytest.mark.parametrize(("policy", "kept"), [("delete", False), ("keep", True)])
def test_broken_relation_releases_by_policy(ctx, backend, fake_host, policy, kept):
    relation = vm_lib.requirer_relation([DB], remote_app_name="pg")
    state = testing.State(leader=True, relations={relation}, config={"release-policy": policy})
    ctx.run(ctx.on.relation_changed(relation), state)
    name = f"pg-{relation.id}-db-0"
    assert name in backend.vms
    ctx.run(ctx.on.relation_broken(relation), state)
    assert (name in backend.vms) is kept


def test_changed_request_keeps_the_vm_and_says_why(ctx, backend, fake_host):
    relation = vm_lib.requirer_relation([DB], remote_app_name="pg")
    ctx.run(ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation}))
    # The same request again is unchanged (the backend recorded what it composed).
    same = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    assert answers(same, relation)["db-0"].error is None
    bigger = replace(
        relation,
        remote_app_data={"version": '"0"', "requests": json.dumps([{**DB, "memory": 2048}])},
    )
    out = ctx.run(ctx.on.relation_changed(bigger), testing.State(leader=True, relations={bigger}))
    got = answers(out, bigger)["db-0"]
    assert got.state == "running"
    assert got.error == serve.CHANGED_ERROR
    assert backend.vms[f"pg-{relation.id}-db-0"].placement.memory_mib == 1024


def test_leader_assigns_to_the_unit_a_request_pins(ctx, backend, fake_host, topology):
    other = fleet.host_report(topology, [], hostname="far-host")
    peer = testing.PeerRelation("hosts", peers_data={1: {"report": other}})
    pinned = {**WEB, "host": "far-host"}
    relation = vm_lib.requirer_relation([DB, pinned], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation, peer})
    )
    assignment, problem = fleet.assignment_from_json(
        out.get_relation(peer.id).local_app_data["assignment"]
    )
    assert problem is None
    by_id = {k.request_id: unit for k, unit in assignment.units.items()}
    assert by_id == {"db-0": "vm-host/0", "web-0": "vm-host/1"}
    # Only this unit's request is composed and answered here.
    assert sorted(backend.vms) == [f"pg-{relation.id}-db-0"]
    assert set(answers(out, relation)) == {"db-0"}
    assert "report" in out.get_relation(peer.id).local_unit_data


def test_non_leader_composes_what_the_leader_assigned_to_it(ctx, backend, fake_host, topology):
    relation = vm_lib.requirer_relation([DB, WEB], remote_app_name="pg", relation_id=7)
    key_db = keys.RequestKey(7, "pg", "db-0")
    key_web = keys.RequestKey(7, "pg", "web-0")
    assignment = fleet.Assignment(units={key_db: "vm-host/1", key_web: "vm-host/0"})
    peer = testing.PeerRelation(
        "hosts", local_app_data={"assignment": fleet.assignment_to_json(assignment)}
    )
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=False, relations={relation, peer})
    )
    assert sorted(backend.vms) == ["pg-7-web-0"]
    assert set(answers(out, relation)) == {"web-0"}


def test_requests_of_a_departed_unit_are_reassigned_when_not_composed(ctx, backend, fake_host):
    relation = vm_lib.requirer_relation([DB, WEB], remote_app_name="pg", relation_id=7)
    key_db = keys.RequestKey(7, "pg", "db-0")
    key_web = keys.RequestKey(7, "pg", "web-0")
    # vm-host/1 was given web-0 but has left the peer relation before composing it.
    before = fleet.Assignment(units={key_db: "vm-host/0", key_web: "vm-host/1"})
    peer = testing.PeerRelation(
        "hosts", local_app_data={"assignment": fleet.assignment_to_json(before)}
    )
    state = testing.State(leader=True, relations={relation, peer})
    out = ctx.run(ctx.on.relation_departed(peer, remote_unit=1, departing_unit=1), state)
    after, _ = fleet.assignment_from_json(out.get_relation(peer.id).local_app_data["assignment"])
    assert after.units == {key_db: "vm-host/0", key_web: "vm-host/0"}
    assert sorted(backend.vms) == ["pg-7-db-0", "pg-7-web-0"]


@pytest.mark.parametrize("assignment", ["{", '{"version": "0", "assigned": [[7, "pg"]]}', None])
@pytest.mark.parametrize("report_of_one", ["composed", "missing", "garbled"])
def test_lost_or_garbled_peer_data_never_gives_a_second_vm(
    ctx, backend, fake_host, topology, assignment, report_of_one
):
    # vm-host/1 hosts pg-7-db-0. The leader (vm-host/0, empty host) lost the assignment, and
    # vm-host/1's report says so, is not there yet, or cannot be read.
    relation = vm_lib.requirer_relation([DB], remote_app_name="pg", relation_id=7)
    composed = fleet.host_report(topology, [], composed={keys.RequestKey(7, "pg", "db-0")})
    report = {"composed": composed, "missing": None, "garbled": '{"version": "0", "topo'}
    peers_data = {1: {"report": report[report_of_one]}} if report[report_of_one] else {1: {}}
    peer = testing.PeerRelation(
        "hosts",
        peers_data=peers_data,
        local_app_data={"assignment": assignment} if assignment else {},
    )
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation, peer})
    )
    assert backend.vms == {}
    after, _ = fleet.assignment_from_json(out.get_relation(peer.id).local_app_data["assignment"])
    key = keys.RequestKey(7, "pg", "db-0")
    if report_of_one == "composed":
        assert after.units == {key: "vm-host/1"}
        assert answers(out, relation) == {}
    else:
        assert after.units == {}
        assert after.unplaced == {key: "waiting for vm-host/1 to report"}
        got = answers(out, relation)["db-0"]
        assert (got.state, got.error) == ("pending", "waiting for vm-host/1 to report")


@pytest.mark.parametrize(
    "image", ["/etc/shadow", "/var/lib/vm-host/images/other-vm-root", "../../etc/shadow", "a/b"]
)
def test_a_request_naming_a_host_path_is_refused_and_reads_nothing(ctx, backend, fake_host, image):
    # A requester once got any readable host file (/etc/shadow, another tenant's disk) copied
    # into its own root disk: a request names images, never paths.
    relation = vm_lib.requirer_relation([WEB | {"image": image}], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    got = answers(out, relation)["web-0"]
    assert got.state == "failed"
    assert got.error is not None
    assert got.error.startswith("image:")
    assert "host path" in got.error
    assert "local:NAME" in got.error
    assert not any(call.startswith("compose") for call in backend.calls)
    assert backend.vms == {}

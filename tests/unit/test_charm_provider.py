"""The charm serving VMs over the `vms` relation, in ops.testing with the in-memory backend."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from ops import testing

import charm
import charms.vm_host.v0.vm_host as vm_lib
from conftest import MODEL_UUID, FakeHost, make_ctx
from fake_backend import FakeBackend
from vmhost.model import Placement, VmRecord, VmState
from vmhost.relation import fleet, keys, serve

pytestmark = pytest.mark.usefixtures("fake_host")

DB = {"id": "db-0", "cores": 2, "memory": 1024, "pinned-cores": 2}
WEB = {"id": "web-0", "cores": 1, "memory": 512}


def out_scope(out: testing.State) -> keys.Scope:
    return keys.Scope("vm-host", out.model.uuid)


def answers(out: testing.State, relation: testing.Relation) -> dict[str, vm_lib.VmAnswer]:
    return {a.id: a for a in vm_lib.answers_from(out.get_relation(relation.id))}


def test_requests_are_composed_and_answered(ctx, backend, fake_host: FakeHost):
    relation = vm_lib.requirer_relation([DB, WEB], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    db = backend.vms[f"pg-{relation.id}-db-0"]
    # Owners carry the vm-host application and model (issue 11 item 8; was
    # f"relation:{relation.id}:pg" before).
    assert db.owner.startswith(f"relation:{relation.id}:pg:vm-host:")
    assert keys.read_owner(db.owner) == keys.Owner("pg", relation.id, out_scope(out))
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


# ---------------------------------------------------------------------------------------------
# Removal: remove-unit of one of two units, ownership scopes, release-policy keep


KEY_DB = keys.RequestKey(7, "pg", "db-0")
KEY_WEB = keys.RequestKey(7, "pg", "web-0")


class TwoUnits:
    """vm-host/0 (leader) and vm-host/1, each with its own host, sharing the peer data."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, topology, policy: str):
        self.monkeypatch = monkeypatch
        self.backends = {0: FakeBackend(host=topology), 1: FakeBackend(host=topology)}
        self.ctx = {i: make_ctx(unit_id=i) for i in (0, 1)}
        self.config = {"release-policy": policy}
        self.relation = vm_lib.requirer_relation([DB, WEB], remote_app_name="pg", relation_id=7)
        self.reports: dict[int, str] = {}
        self.app_data: dict[str, str] = {}

    def peer(self, unit: int, members: tuple[int, ...]) -> testing.PeerRelation:
        others = [i for i in members if i != unit]
        return testing.PeerRelation(
            "hosts",
            id=3,
            peers_data={
                i: ({"report": self.reports[i]} if i in self.reports else {}) for i in others
            },
            local_app_data=dict(self.app_data),
            local_unit_data={"report": self.reports[unit]} if unit in self.reports else {},
        )

    def run(self, unit: int, event_of, *, members=(0, 1), relations=None, **kwargs):
        self.monkeypatch.setattr(
            charm, "make_backend", lambda config, layout=None: self.backends[unit]
        )
        peer = self.peer(unit, members)
        relation = self.relation
        state = testing.State(
            leader=unit == 0,
            relations=relations if relations is not None else {relation, peer},
            config=self.config,
            **kwargs,
        )
        out = self.ctx[unit].run(event_of(self.ctx[unit], relation, peer), state)
        if any(r.endpoint == "hosts" for r in state.relations):
            after = out.get_relation(peer.id)
            self.reports[unit] = after.local_unit_data.get("report", "")
            if unit == 0:
                self.app_data = dict(after.local_app_data)
        return out

    def hosted(self) -> dict[str, list[str]]:
        return {f"vm-host/{i}": sorted(b.vms) for i, b in self.backends.items()}

    def settle(self) -> None:
        """Hooks on both units until the assignment is served (leader, follower, leader)."""
        for unit in (0, 1, 0, 1):
            self.run(unit, lambda c, r, p: c.on.relation_changed(r, remote_unit=0))


@pytest.mark.parametrize("policy", ["delete", "keep"])
def test_remove_unit_of_one_of_two_deletes_nothing_and_composes_no_duplicate(
    fake_host, topology, monkeypatch, policy
):
    fleet_ = TwoUnits(monkeypatch, topology, policy)
    # db-0 pinned to vm-host/1, web-0 to vm-host/0.
    fleet_.relation = vm_lib.requirer_relation(
        [{**DB, "host": "vm-host/1"}, {**WEB, "host": "vm-host/0"}],
        remote_app_name="pg",
        relation_id=7,
    )
    fleet_.run(1, lambda c, r, p: c.on.relation_changed(r, remote_unit=0))  # first report
    fleet_.settle()
    assert fleet_.hosted() == {"vm-host/0": ["pg-7-web-0"], "vm-host/1": ["pg-7-db-0"]}

    # juju remove-unit vm-host/1: on vm-host/1, departed (itself departing), then broken.
    leaving = fleet_.run(
        1, lambda c, r, p: c.on.relation_departed(p, remote_unit=0, departing_unit=1)
    )
    assert "report" in leaving.get_relation(3).local_unit_data
    fleet_.run(1, lambda c, r, p: c.on.relation_broken(r))
    fleet_.run(1, lambda c, r, p: c.on.relation_broken(p))
    fleet_.run(1, lambda c, r, p: c.on.update_status(), relations={fleet_.relation})
    # Nothing deleted, nothing re-owned, nothing composed on the departing unit.
    assert fleet_.hosted()["vm-host/1"] == ["pg-7-db-0"]
    db = fleet_.backends[1].vms["pg-7-db-0"]
    assert keys.read_owner(db.owner) == keys.Owner("pg", 7, keys.Scope("vm-host", MODEL_UUID))
    assert not [c for c in fleet_.backends[1].calls if c.startswith(("delete", "set_owner"))]

    # The leader sees vm-host/1 go: db-0 is answered failed, never composed again by itself.
    out = fleet_.run(
        0,
        lambda c, r, p: c.on.relation_departed(p, remote_unit=1, departing_unit=1),
        members=(0,),
    )
    assert fleet_.hosted()["vm-host/0"] == ["pg-7-web-0"]
    got = answers(out, fleet_.relation)
    assert got["db-0"].state == "failed"
    assert got["db-0"].error is not None
    assert got["db-0"].error.startswith("host vm-host/1 left")
    assert "reassign-vm" in got["db-0"].error
    assert got["web-0"].state == "running"
    # Later hooks keep it so.
    again = fleet_.run(0, lambda c, r, p: c.on.update_status(), members=(0,))
    assert fleet_.hosted()["vm-host/0"] == ["pg-7-web-0"]
    assert answers(again, fleet_.relation)["db-0"].error.startswith("host vm-host/1 left")  # type: ignore[union-attr]

    # The request's host changes to the remaining unit: it is placed anew there.
    fleet_.relation = vm_lib.requirer_relation(
        [{**DB, "host": "vm-host/0"}, {**WEB, "host": "vm-host/0"}],
        remote_app_name="pg",
        relation_id=7,
    )
    moved = fleet_.run(0, lambda c, r, p: c.on.relation_changed(r, remote_unit=0), members=(0,))
    assert fleet_.hosted()["vm-host/0"] == ["pg-7-db-0", "pg-7-web-0"]
    assert answers(moved, fleet_.relation)["db-0"].state == "running"


def test_reassign_vm_places_a_request_whose_host_left(fake_host, topology, monkeypatch):
    fleet_ = TwoUnits(monkeypatch, topology, "delete")
    fleet_.relation = vm_lib.requirer_relation(
        [{**DB, "host": None}, WEB], remote_app_name="pg", relation_id=7
    )
    fleet_.relation = vm_lib.requirer_relation([DB, WEB], remote_app_name="pg", relation_id=7)
    fleet_.run(1, lambda c, r, p: c.on.relation_changed(r, remote_unit=0))
    # vm-host/1 composed db-0 under an assignment the leader wrote earlier.
    fleet_.app_data["assignment"] = fleet.assignment_to_json(
        fleet.Assignment(units={KEY_DB: "vm-host/1", KEY_WEB: "vm-host/0"})
    )
    fleet_.run(1, lambda c, r, p: c.on.relation_changed(r, remote_unit=0))
    fleet_.settle()
    assert fleet_.hosted() == {"vm-host/0": ["pg-7-web-0"], "vm-host/1": ["pg-7-db-0"]}
    fleet_.run(
        0, lambda c, r, p: c.on.relation_departed(p, remote_unit=1, departing_unit=1), members=(0,)
    )
    assert fleet_.hosted()["vm-host/0"] == ["pg-7-web-0"]

    ctx = fleet_.ctx[0]
    monkeypatch.setattr(charm, "make_backend", lambda config, layout=None: fleet_.backends[0])
    state = testing.State(leader=True, relations={fleet_.relation, fleet_.peer(0, (0,))})
    with pytest.raises(testing.ActionFailed, match="no request of pg with id 'nope'"):
        ctx.run(ctx.on.action("reassign-vm", params={"app": "pg", "id": "nope"}), state)
    out = ctx.run(ctx.on.action("reassign-vm", params={"app": "pg", "id": "db-0"}), state)
    assert ctx.action_results == {"app": "pg", "id": "db-0", "unit": "vm-host/0"}
    assert fleet_.hosted()["vm-host/0"] == ["pg-7-db-0", "pg-7-web-0"]
    assert answers(out, fleet_.relation)["db-0"].state == "running"
    follower = make_ctx(unit_id=1)
    with pytest.raises(testing.ActionFailed, match="leader"):
        follower.run(
            follower.on.action("reassign-vm", params={"app": "pg", "id": "db-0"}),
            testing.State(leader=False, relations={fleet_.relation}),
        )


def test_keep_re_owns_released_vms_and_delete_vm_may_delete_them(ctx, backend, fake_host):
    relation = vm_lib.requirer_relation([DB], remote_app_name="pg", relation_id=7)
    state = testing.State(leader=True, relations={relation}, config={"release-policy": "keep"})
    ctx.run(ctx.on.relation_changed(relation), state)
    ctx.run(ctx.on.relation_broken(relation), state)
    vm = backend.vms["pg-7-db-0"]
    assert vm.owner == f"released:pg:vm-host:{MODEL_UUID}"
    listed = ctx.run(ctx.on.action("list-vms"), testing.State())
    assert listed is not None
    assert f"released:pg:vm-host:{MODEL_UUID}" in (ctx.action_results or {})["json"]
    # Another vm-host application's released VM stays out of reach.
    other = replace(vm, name="other-0", owner=f"released:pg:vm-host-b:{MODEL_UUID}")
    backend.vms["other-0"] = other
    with pytest.raises(testing.ActionFailed, match="belongs to"):
        ctx.run(ctx.on.action("delete-vm", params={"name": "other-0"}), testing.State())
    ctx.run(ctx.on.action("delete-vm", params={"name": "pg-7-db-0"}), testing.State())
    assert sorted(backend.vms) == ["other-0"]


def test_vms_of_another_vm_host_application_or_model_are_never_touched(ctx, backend, fake_host):
    relation = vm_lib.requirer_relation([DB], remote_app_name="pg", relation_id=7)
    template = VmRecord(
        name="x",
        uuid="u",
        state=VmState.RUNNING,
        placement=Placement(vcpus=1, memory_mib=512),
        request_id="db-0",
        spec_hash="0",
    )
    other_app = replace(template, name="pg-7-db-0", owner=f"relation:7:pg:vm-host-b:{MODEL_UUID}")
    other_model = replace(
        template,
        name="pg-9-db-0",
        owner="relation:9:pg:vm-host:0b8c3c1e-4e09-4b6f-9d0e-7f1f5d1c2a3b",
    )
    backend.vms = {vm.name: vm for vm in (other_app, other_model)}
    for policy in ("delete", "keep"):
        state = testing.State(leader=True, relations={relation}, config={"release-policy": policy})
        out = ctx.run(ctx.on.relation_changed(relation), state)
        # Our db-0 cannot have the name another application's VM holds: refused, not matched.
        got = answers(out, relation)["db-0"]
        assert got.state == "failed"
        assert "already taken" in (got.error or "")
        ctx.run(ctx.on.relation_broken(relation), state)
    assert backend.vms == {vm.name: vm for vm in (other_app, other_model)}
    assert not [c for c in backend.calls if c.startswith(("delete", "set_owner"))]


@pytest.mark.parametrize("policy", ["delete", "keep"])
def test_a_vm_that_merely_looks_orphaned_is_reported_not_released(
    ctx, backend, fake_host, policy, caplog
):
    # A VM of this application for relation 9, which this hook does not list and this unit
    # never saw broken (a run that does not list every relation).
    relation = vm_lib.requirer_relation([WEB], remote_app_name="pg", relation_id=7)
    ctx.run(ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation}))
    nine = vm_lib.requirer_relation([DB], remote_app_name="pg", relation_id=9)
    ctx.run(ctx.on.relation_changed(nine), testing.State(leader=True, relations={nine}))
    assert sorted(backend.vms) == ["pg-7-web-0", "pg-9-db-0"]
    state = testing.State(leader=True, relations={relation}, config={"release-policy": policy})
    ctx.run(ctx.on.relation_changed(relation), state)
    assert sorted(backend.vms) == ["pg-7-web-0", "pg-9-db-0"]
    assert backend.vms["pg-9-db-0"].owner.startswith("relation:9:pg:vm-host:")
    assert "pg-9-db-0" in caplog.text
    assert "did not see removed" in caplog.text
    # Once this unit sees relation 9 broken, it is released by the policy.
    ctx.run(ctx.on.relation_broken(nine), replace(state, relations={relation, nine}))
    if policy == "delete":
        assert sorted(backend.vms) == ["pg-7-web-0"]
    else:
        assert backend.vms["pg-9-db-0"].owner.startswith("released:pg:vm-host:")


def test_legacy_owners_written_before_scopes_are_still_served(ctx, backend, fake_host):
    """Upgrade path: VMs owned ``relation:<id>:<app>`` (no scope) by an older revision."""
    relation = vm_lib.requirer_relation([DB, WEB], remote_app_name="pg", relation_id=7)
    state = testing.State(leader=True, relations={relation})
    ctx.run(ctx.on.relation_changed(relation), state)
    # Rewrite both VMs as an older revision would have owned them; add another model's
    # legacy VM that happens to have relation id 7 too (but app mysql).
    for name in ("pg-7-db-0", "pg-7-web-0"):
        backend.vms[name] = replace(backend.vms[name], owner="relation:7:pg")
    stranger = replace(backend.vms["pg-7-web-0"], name="mysql-7-web-0", owner="relation:7:mysql")
    backend.vms[stranger.name] = stranger
    backend.calls.clear()
    out = ctx.run(ctx.on.relation_changed(relation), state)
    got = answers(out, relation)
    assert (got["db-0"].state, got["db-0"].error) == ("running", None)
    assert not [c for c in backend.calls if c.startswith(("compose", "delete"))]
    # A withdrawn request's legacy VM goes; the other model's legacy VM stays.
    web_only = replace(relation, remote_app_data={"version": '"0"', "requests": json.dumps([WEB])})
    ctx.run(ctx.on.relation_changed(web_only), replace(state, relations={web_only}))
    assert sorted(backend.vms) == ["mysql-7-web-0", "pg-7-web-0"]
    # Its relation seen broken: the legacy VM is released like a scoped one.
    ctx.run(ctx.on.relation_broken(web_only), replace(state, relations={web_only}))
    assert sorted(backend.vms) == ["mysql-7-web-0"]


@pytest.mark.parametrize("policy", ["delete", "keep"])
def test_legacy_owned_vms_are_never_released_by_mistake_after_upgrade(
    backend, fake_host, policy, caplog
):
    """VMs an older revision composed (owner ``relation:<id>:<app>``) survive every hook.

    Upgraded, the charm must still see them as this application's where their relation is
    live, report them where it is not, leave them alone while the unit is leaving, and only
    release them (by the policy) once this unit saw their relation broken.
    """
    ctx = make_ctx(unit_id=1)  # ops.testing takes departing_unit=0 for "none given"
    relation = vm_lib.requirer_relation([DB], remote_app_name="pg", relation_id=7)
    nine = vm_lib.requirer_relation([WEB], remote_app_name="pg", relation_id=9)
    config = {"release-policy": policy}
    ctx.run(ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation}))
    ctx.run(ctx.on.relation_changed(nine), testing.State(leader=True, relations={nine}))
    for name, number in (("pg-7-db-0", 7), ("pg-9-web-0", 9)):
        backend.vms[name] = replace(backend.vms[name], owner=f"relation:{number}:pg")
    legacy = dict(backend.vms)
    backend.calls.clear()

    def untouched() -> None:
        assert backend.vms == legacy
        assert not [c for c in backend.calls if c.startswith(("compose", "delete", "set_owner"))]

    # The upgrade itself, then hooks that list relation 7 only, or no relation at all.
    state = testing.State(leader=True, relations={relation}, config=config)
    ctx.run(ctx.on.upgrade_charm(), state)
    untouched()
    out = ctx.run(ctx.on.relation_changed(relation), state)
    untouched()
    assert (answers(out, relation)["db-0"].state, answers(out, relation)["db-0"].error) == (
        "running",
        None,
    )
    ctx.run(ctx.on.update_status(), testing.State(leader=True, config=config))
    untouched()
    assert "pg-9-web-0" in caplog.text  # reported as looking orphaned, not released

    # juju remove-unit of this unit: departed with itself departing, then every relation broken.
    peer = testing.PeerRelation("hosts", id=3, peers_data={0: {}})
    leaving = testing.State(leader=True, relations={relation, nine, peer}, config=config)
    ctx.run(ctx.on.relation_departed(peer, remote_unit=0, departing_unit=1), leaving)
    ctx.run(ctx.on.relation_broken(relation), leaving)
    ctx.run(ctx.on.relation_broken(nine), leaving)
    untouched()


@pytest.mark.parametrize("field", ["requests", "version"])
def test_one_hostile_app_never_stops_another_apps_vms(ctx, backend, fake_host, field):
    """2 kB of nested JSON from one app: that app is refused, the other app is served."""
    nested = "[" * 1000 + "]" * 1000
    hostile = testing.Relation(
        "vms",
        remote_app_name="evil",
        remote_app_data={"version": '"0"', "requests": "[]", field: nested},
    )
    healthy = vm_lib.requirer_relation([DB], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(hostile),
        testing.State(leader=True, relations={hostile, healthy}),
    )
    assert answers(out, healthy)["db-0"].state == "running"
    assert f"pg-{healthy.id}-db-0" in backend.vms
    assert not [name for name in backend.vms if name.startswith("evil-")]

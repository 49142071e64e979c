"""start-vm, stop-vm, restart-vm, list-access and the crash restart, through the charm."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from ops import testing

from credentials import ed25519_public_key
from vmhost import lifecycle
from vmhost.model import InvalidRequestError, Placement, VmRecord, VmState

pytestmark = pytest.mark.usefixtures("fake_host")


def run_action(ctx, name, params=None, config=None):
    state = testing.State(config=config or {}, leader=True)
    ctx.run(ctx.on.action(name, params=params or {}), state)
    return ctx.action_results or {}


def power_calls(backend):
    return [c for c in backend.calls if c.startswith(("start", "stop", "autostart"))]


def record(name, owner="action", managed=True, state=VmState.RUNNING, autostart=True):
    return VmRecord(
        name=name,
        uuid=f"uuid-{name}",
        state=state,
        placement=Placement(vcpus=1, memory_mib=512),
        owner=owner,
        managed=managed,
        autostart=autostart,
    )


# ---------------------------------------------------------------------------------------------
# Which VM an operator may power on or off


@pytest.mark.parametrize(
    ("name", "owner", "field", "phrase"),
    [
        ("ghost", None, "name", "no VM named 'ghost'; VMs composed by vm-host: db-0, pg-4-a"),
        ("other", None, "name", "not composed by vm-host"),
        ("pg-4-a", None, "owner", "give owner=relation:4:pg"),
        ("pg-4-a", "relation:5:pg", "owner", "belongs to relation:4:pg, not relation:5:pg"),
        ("Bad_Name", None, "name", ""),
    ],
)
def test_find_vm_refuses_with_the_field_and_fix(name, owner, field, phrase):
    vms = [record("db-0"), record("pg-4-a", owner="relation:4:pg"), record("other", managed=False)]
    with pytest.raises(InvalidRequestError) as refused:
        lifecycle.find_vm(vms, name, owner)
    assert refused.value.field == field
    assert phrase in str(refused.value)


def test_find_vm_reaches_a_relation_vm_with_its_owner():
    vms = [record("pg-4-a", owner="relation:4:pg")]
    assert lifecycle.find_vm(vms, "pg-4-a", "relation:4:pg").name == "pg-4-a"


# ---------------------------------------------------------------------------------------------
# Actions


def test_stop_keeps_the_place_and_start_brings_it_back(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 1024, "pinned-cores": "4"})
    pinned = backend.vms["db-0"].placement.pinned_cpus
    results = run_action(ctx, "stop-vm", {"name": "db-0"})
    assert results == {"name": "db-0", "state": "stopped"}
    assert power_calls(backend) == ["autostart:db-0:off", "stop:db-0:120:wait"]
    assert backend.vms["db-0"].autostart is False
    # A stopped VM still holds its CPUs: the status line and show-resources count them.
    out = ctx.run(ctx.on.update_status(), testing.State())
    assert out.unit_status == testing.ActiveStatus(
        "libvirt 9.0.0: 2 NUMA nodes, 20/24 CPUs free, 1 VM"
    )
    assert "start:db-0" not in backend.calls  # update-status never undoes an operator's stop
    data = json.loads(run_action(ctx, "show-resources")["json"])
    assert sum(len(n["cpus"]["pinned"]) for n in data["nodes"]) == 4
    listed = json.loads(run_action(ctx, "list-vms")["json"])
    assert (listed[0]["state"], listed[0]["autostart"]) == ("stopped", False)
    results = run_action(ctx, "start-vm", {"name": "db-0"})
    assert results == {"name": "db-0", "state": "running"}
    assert backend.vms["db-0"].placement.pinned_cpus == pinned
    assert backend.vms["db-0"].autostart is True


def test_stop_of_a_guest_that_ignores_shutdown_fails_and_leaves_it_running(
    ctx, backend, fake_host
):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    backend.ignores_acpi.add("db-0")
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "stop-vm", {"name": "db-0", "timeout": 5})
    assert "did not shut down within 5 s" in failed.value.message
    assert "force=true" in failed.value.message
    vm = backend.vms["db-0"]
    assert (vm.state, vm.autostart) == (VmState.RUNNING, True)
    results = run_action(ctx, "stop-vm", {"name": "db-0", "force": True})
    assert results["state"] == "stopped"
    assert power_calls(backend)[-1] == "stop:db-0:0:destroy"


def test_restart_stops_then_starts(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    results = run_action(ctx, "restart-vm", {"name": "db-0", "force": True})
    assert results["state"] == "running"
    assert power_calls(backend) == [
        "autostart:db-0:off",
        "stop:db-0:0:destroy",
        "start:db-0",
        "autostart:db-0:on",
    ]


def test_power_actions_on_relation_vms_need_the_owner(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "pg-4-a", "memory": 512})
    backend.vms["pg-4-a"] = replace(backend.vms["pg-4-a"], owner="relation:4:pg")
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "stop-vm", {"name": "pg-4-a"})
    assert "owner=relation:4:pg" in failed.value.message
    assert backend.vms["pg-4-a"].state is VmState.RUNNING
    run_action(ctx, "stop-vm", {"name": "pg-4-a", "owner": "relation:4:pg", "force": True})
    assert backend.vms["pg-4-a"].state is VmState.STOPPED


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"name": "db-0", "timeout": 0}, "timeout"),
        ({"name": "db-0", "timeout": 99999}, "timeout: must be at most 3600 seconds"),
        ({"name": "Bad_Name"}, "name"),
    ],
)
def test_bad_stop_parameters_change_nothing(ctx, backend, fake_host, params, phrase):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    before = list(backend.calls)
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "stop-vm", params)
    assert phrase in failed.value.message
    assert not [c for c in backend.calls[len(before) :] if c.startswith(("stop", "autostart"))]


def test_update_status_restarts_a_crashed_vm_once_and_reports_it(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    run_action(ctx, "compose-vm", {"name": "db-1", "memory": 512})
    run_action(ctx, "stop-vm", {"name": "db-1", "force": True})
    backend.vms["db-0"] = replace(backend.vms["db-0"], state=VmState.FAILED)
    backend.vms["db-1"] = replace(backend.vms["db-1"], state=VmState.FAILED)
    # Any hook's status says so; only update-status restarts.
    out = ctx.run(ctx.on.config_changed(), testing.State())
    assert "crashed: db-0 (update-status starts them again" in out.unit_status.message
    assert "start:db-0" not in backend.calls
    out = ctx.run(ctx.on.update_status(), testing.State())
    assert backend.calls.count("start:db-0") == 1
    assert "start:db-1" not in backend.calls  # stopped by the operator: stays off
    # Free counts what pinned VMs can take: the two shared 1-vCPU VMs keep 2 CPUs at ratio 1.
    assert out.unit_status == testing.ActiveStatus(
        "libvirt 9.0.0: 2 NUMA nodes, 22/24 CPUs free, 2 VMs"
    )


def test_revive_tries_each_crashed_vm_once_and_reports_failures(backend):
    backend.vms = {
        "a": record("a", state=VmState.FAILED),
        "b": record("b", state=VmState.FAILED),
        "c": record("c", state=VmState.FAILED, autostart=False),
        "d": record("d", state=VmState.FAILED, managed=False),
        "e": record("e", state=VmState.STOPPED),
    }
    del backend.vms["b"]  # gone between the listing and the start: the start fails
    vms = [record("a", state=VmState.FAILED), record("b", state=VmState.FAILED)]
    vms += [backend.vms[n] for n in ("c", "d", "e")]
    out = lifecycle.revive_crashed(backend, vms)
    assert [(r.name, bool(r.error)) for r in out] == [("a", False), ("b", True)]
    assert [c for c in backend.calls if c.startswith("start")] == ["start:a", "start:b"]


def test_list_access_shows_keys_with_source_and_fingerprint(ctx, backend, fake_host):
    key = ed25519_public_key()
    run_action(ctx, "authorize-ssh-key", {"name": "laptop", "key": key})
    results = run_action(ctx, "list-access")
    (entry,) = json.loads(results["json"])
    assert entry["name"] == "laptop"
    assert entry["source"] == "action"
    assert entry["type"] == "ssh-ed25519"
    assert entry["fingerprint"].startswith("SHA256:")
    assert entry["fingerprint"] in results["table"]
    assert key.split()[1] not in results["json"]  # fingerprints only, never the key itself

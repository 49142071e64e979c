"""The charm in ops.testing, with an in-memory backend and host (no hypervisor touched)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from ops import testing

import charms.vm_host.v0.vm_host_access as access_lib
from conftest import OPERATOR_LINE
from credentials import ed25519_public_key
from vmhost import access, host
from vmhost.model import Placement, VmRecord, VmState

pytestmark = pytest.mark.usefixtures("fake_host")


def run_action(ctx, name, params=None, config=None):
    state = testing.State(config=config or {}, leader=True)
    ctx.run(ctx.on.action(name, params=params or {}), state)
    return ctx.action_results or {}


# ---------------------------------------------------------------------------------------------
# Lifecycle and status


def test_install_sets_up_host_and_default_pool(ctx, backend, fake_host):
    backend.pools.clear()  # a fresh host
    out = ctx.run(ctx.on.install(), testing.State())
    assert fake_host.calls[:3] == [
        "install",
        "write:/etc/libvirt/libvirtd.conf",
        "ensure_libvirtd",
    ]
    assert f"ensure_pool:{host.DEFAULT_POOL_NAME}" in backend.calls
    assert out.unit_status == testing.ActiveStatus(
        "libvirt 9.0.0: 2 NUMA nodes, 24/24 CPUs free, 0 VMs"
    )


def test_config_changed_does_not_reinstall_packages(ctx, backend, fake_host):
    ctx.run(ctx.on.config_changed(), testing.State())
    assert "install" not in fake_host.calls


def test_configured_pool_is_not_created(ctx, backend, fake_host):
    ctx.run(ctx.on.config_changed(), testing.State(config={"default-storage-pool": "fast"}))
    assert not [c for c in backend.calls if c.startswith("ensure_pool")]


@pytest.mark.parametrize(
    ("option", "value", "phrase"),
    [
        ("cpu-overcommit-ratio", 0.0, "cpu-overcommit-ratio: must be greater than 0"),
        (
            "cpu-overcommit-ratio",
            11.0,
            "cpu-overcommit-ratio: must be greater than 0 and at most 10",
        ),
        ("memory-overcommit-ratio", -1.0, "memory-overcommit-ratio"),
        ("reserved-cpus", "0-", "reserved-cpus"),
        ("hugepages", "3M:4", "hugepages"),
        ("smt-policy", "sometimes", "smt-policy"),
        ("default-storage-pool", "Bad Pool", "default-storage-pool"),
        ("release-policy", "shred", "release-policy"),
        ("libvirt-user", "root;rm", "libvirt-user"),
        ("libvirt-user", "root", "libvirt-user: 'root' is a system or login account"),
        ("libvirt-user", "ubuntu", "libvirt-user: 'ubuntu' is a system or login account"),
        ("libvirt-user", "libvirt", "set a dedicated name such as 'virsh'"),
        ("lxd-project", "Bad/Project", "lxd-project"),
        ("https-port", 70000, "https-port"),
    ],
)
def test_invalid_config_blocks_and_changes_nothing(ctx, backend, fake_host, option, value, phrase):
    out = ctx.run(ctx.on.config_changed(), testing.State(config={option: value}))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert phrase in out.unit_status.message
    assert "juju config" in out.unit_status.message
    assert fake_host.calls == []
    assert not [c for c in backend.calls if c.startswith(("ensure_pool", "compose"))]


def test_backend_is_fixed_after_install(ctx, backend, fake_host):
    ctx.run(ctx.on.install(), testing.State())
    out = ctx.run(ctx.on.config_changed(), testing.State(config={"backend": "lxd"}))
    assert out.unit_status == testing.BlockedStatus(
        "backend is fixed after install (this host uses libvirt); set backend=libvirt"
    )


def test_unreachable_hypervisor_is_waiting(ctx, backend, fake_host):
    backend.reachable = False
    out = ctx.run(ctx.on.update_status(), testing.State())
    assert isinstance(out.unit_status, testing.WaitingStatus)
    assert "qemu:///system" in out.unit_status.message


def test_hugepages_granted_short_blocks_with_numbers(ctx, backend, fake_host):
    fake_host.granted = 100
    out = ctx.run(ctx.on.config_changed(), testing.State(config={"hugepages": "2M:512"}))
    assert "hugepages:2048:512:None" in fake_host.calls
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "granted 100 of 512" in out.unit_status.message


def test_an_action_after_a_blocked_reconcile_still_shows_blocked(ctx, backend, fake_host):
    fake_host.granted = 100
    config = {"hugepages": "2M:512"}
    blocked = ctx.run(ctx.on.config_changed(), testing.State(config=config))
    assert isinstance(blocked.unit_status, testing.BlockedStatus)
    out = ctx.run(ctx.on.action("list-vms"), replace(blocked, config=config))
    assert out.unit_status == blocked.unit_status
    # The kernel grants the rest later: the next hook of any kind says so.
    fake_host.pages[(2048, None)] = 512
    fixed = ctx.run(ctx.on.action("list-vms"), out)
    assert isinstance(fixed.unit_status, testing.ActiveStatus)


def test_a_bad_key_option_stays_blocked_through_actions(ctx, backend, fake_host, host_access):
    config = {"ssh-authorized-keys": "ssh-ed25519 not-base64!"}
    blocked = ctx.run(ctx.on.config_changed(), testing.State(config=config))
    assert "ssh-authorized-keys" in blocked.unit_status.message
    out = ctx.run(ctx.on.action("show-resources"), blocked)
    assert out.unit_status == blocked.unit_status


def test_configured_1g_pages_get_a_hugetlbfs_mount_and_libvirtd_restarts_for_it(
    ctx, backend, fake_host
):
    fake_host.mounted = ["/dev/hugepages1G (1G)"]
    config = {"hugepages": "2M:64@0,1G:2@0,1G:2@1"}
    out = ctx.run(ctx.on.config_changed(), testing.State(config=config))
    assert fake_host.mount_sizes == [[2048, 1048576]]
    # libvirtd.conf did not change (the fake write says so), the new mount did: restart.
    assert fake_host.restart_asked == [True]
    assert isinstance(out.unit_status, testing.ActiveStatus)
    # Mounts in place: the next hook asks again and restarts nothing.
    fake_host.mounted = []
    ctx.run(ctx.on.config_changed(), out)
    assert fake_host.restart_asked == [True, False]


def test_a_failed_hugetlbfs_mount_is_logged_and_the_hook_goes_on(ctx, backend, fake_host):
    fake_host.mount_error = "hugepages: mounting hugetlbfs (pagesize=1G) on /dev/x failed: no"
    ctx.run(ctx.on.config_changed(), testing.State(config={"hugepages": "1G:1"}))
    assert fake_host.restart_asked == [False]
    assert "ensure_libvirtd" in fake_host.calls
    assert any("pagesize=1G" in log.message for log in ctx.juju_log)


def test_hugepages_on_missing_node_blocks(ctx, backend, fake_host):
    out = ctx.run(ctx.on.config_changed(), testing.State(config={"hugepages": "2M:8@7"}))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "NUMA node 7" in out.unit_status.message


def test_reconcile_is_idempotent(ctx, backend, fake_host):
    backend.pools.clear()  # a fresh host
    state = testing.State()
    first = ctx.run(ctx.on.config_changed(), state)
    second = ctx.run(ctx.on.config_changed(), first)
    assert first.unit_status == second.unit_status
    assert [c for c in backend.calls if c.startswith("ensure_pool")] == [
        f"ensure_pool:{host.DEFAULT_POOL_NAME}"
    ]


# ---------------------------------------------------------------------------------------------
# compose-vm


def test_compose_pinned_vm(ctx, backend, fake_host):
    results = run_action(ctx, "compose-vm", {"name": "db-0", "memory": 1024, "pinned-cores": "4"})
    vm = backend.vms["db-0"]
    assert vm.owner == "action"
    assert len(vm.placement.pinned_cpus) == 4
    assert len(vm.placement.host_nodes) == 1
    assert results["name"] == "db-0"
    placement = json.loads(results["placement"])
    assert sorted(placement["cpus"]) == sorted(vm.placement.pinned_cpus)


def test_compose_status_counts_pinned_cpus(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 1024, "pinned-cores": "4"})
    out = ctx.run(ctx.on.update_status(), testing.State())
    assert out.unit_status == testing.ActiveStatus(
        "libvirt 9.0.0: 2 NUMA nodes, 20/24 CPUs free, 1 VM"
    )


def test_compose_dry_run_creates_nothing(ctx, backend, fake_host):
    results = run_action(
        ctx, "compose-vm", {"name": "db-0", "memory": 1024, "pinned-cores": "2", "dry-run": True}
    )
    assert backend.vms == {}
    assert len(json.loads(results["placement"])["cpus"]) == 2


def test_compose_hugepages_lands_on_node_with_pages(ctx, backend, fake_host):
    run_action(
        ctx,
        "compose-vm",
        {"name": "hp-0", "memory": 64, "cores": 1, "pinned-cores": "1", "hugepages": "2M"},
    )
    vm = backend.vms["hp-0"]
    assert vm.placement.host_nodes == (1,)
    assert vm.placement.cells[0].hugepages == 32


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"name": "Bad_Name", "memory": 512}, "name"),
        ({"name": "ok", "memory": 512, "pinned-cores": "abc"}, "pinned-cores"),
        ({"name": "ok", "memory": 512, "cores": 2, "pinned-cores": "4"}, "pinned-cores"),
        ({"name": "ok", "memory": 512, "storage": "root:x"}, "storage"),
        ({"name": "ok", "memory": 512, "interfaces": "eth0:fabric=f1"}, "fabric"),
    ],
)
def test_compose_bad_input_fails_naming_the_field(ctx, backend, fake_host, params, phrase):
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", params)
    assert phrase in failed.value.message
    assert "nothing done" in failed.value.message
    assert backend.vms == {}


def test_compose_that_does_not_fit_is_refused_with_numbers(ctx, backend, fake_host):
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", {"name": "big", "memory": 1024, "pinned-cores": "20"})
    assert "cannot place big" in failed.value.message
    assert "20" in failed.value.message
    assert backend.vms == {}


def test_compose_refuses_existing_name(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    assert "already exists" in failed.value.message


def test_compose_failure_is_reported_as_rolled_back(ctx, backend, fake_host):
    backend.fail_compose = "volume db-0-root could not be created"
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    assert "rolled back" in failed.value.message
    assert "db-0-root" in failed.value.message


def test_compose_when_hypervisor_down_fails_cleanly(ctx, backend, fake_host):
    backend.reachable = False
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    assert "not reachable" in failed.value.message


# ---------------------------------------------------------------------------------------------
# delete-vm, list-vms, show-resources


def test_delete_vm(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    results = run_action(ctx, "delete-vm", {"name": "db-0"})
    assert results["deleted"] == "db-0"
    assert backend.vms == {}


def test_delete_unknown_vm_lists_known(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "delete-vm", {"name": "db-9"})
    assert "db-0" in failed.value.message
    assert "db-0" in backend.vms


def test_delete_refuses_relation_owned_vm(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    backend.vms["db-0"] = replace(backend.vms["db-0"], owner="relation:4:postgresql")
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "delete-vm", {"name": "db-0"})
    assert "relation:4:postgresql" in failed.value.message
    assert "db-0" in backend.vms


def test_delete_refuses_foreign_domain(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    backend.vms["db-0"] = replace(backend.vms["db-0"], managed=False)
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "delete-vm", {"name": "db-0"})
    assert "not composed by vm-host" in failed.value.message


def test_list_vms(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512, "pinned-cores": "2"})
    results = run_action(ctx, "list-vms")
    assert "db-0" in results["table"]
    listed = json.loads(results["json"])
    assert [vm["name"] for vm in listed] == ["db-0"]
    assert listed[0]["owner"] == "action"


def test_show_resources(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512, "pinned-cores": "2"})
    results = run_action(ctx, "show-resources")
    data = json.loads(results["json"])
    assert [n["id"] for n in data["nodes"]] == [0, 1]
    pinned = sum(len(n["cpus"]["pinned"]) for n in data["nodes"])
    assert pinned == 2
    assert "db-0" in results["table"]
    assert results["table"].splitlines()[0] == "libvirt"
    assert "node 0" in results["table"]


def test_remove_keeps_vms(ctx, backend, fake_host):
    run_action(ctx, "compose-vm", {"name": "db-0", "memory": 512})
    ctx.run(ctx.on.remove(), testing.State())
    assert "db-0" in backend.vms


def test_networks_mapping_to_missing_bridge_blocks(ctx, backend, fake_host):
    out = ctx.run(
        ctx.on.config_changed(),
        testing.State(config={"networks": "oam: {bridge: br-missing}"}),
    )
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "br-missing" in out.unit_status.message


# ---------------------------------------------------------------------------------------------
# Hypervisor access (libvirt over SSH)


def test_config_keys_are_authorized_and_operator_lines_survive(
    ctx, backend, fake_host, host_access
):
    key = ed25519_public_key()
    ctx.run(ctx.on.config_changed(), testing.State(config={"ssh-authorized-keys": key}))
    managed = access.managed_keys(host_access.text)
    assert [(k.source, f"{k.key_type} {k.blob}") for k in managed] == [("config", key)]
    assert "OperatorOwnLineOutsideBlock" in host_access.text
    assert f'restrict,command="{host_access.command}" {key}' in host_access.text


def test_bad_config_key_blocks_naming_the_option(ctx, backend, fake_host, host_access):
    good = ed25519_public_key()
    state = ctx.run(ctx.on.config_changed(), testing.State(config={"ssh-authorized-keys": good}))
    bad_state = testing.State(
        config={"ssh-authorized-keys": f"{good}\nssh-ed25519 not-base64!"},
        relations=state.relations,
    )
    out = ctx.run(ctx.on.config_changed(), bad_state)
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "ssh-authorized-keys" in out.unit_status.message
    # The keys that were authorized stay authorized until the option is fixed.
    assert [k.source for k in access.managed_keys(host_access.text)] == ["config"]


def test_related_manager_key_is_authorized_and_uri_published(ctx, backend, fake_host, host_access):
    key = ed25519_public_key()
    relation = access_lib.requirer_relation({0: access_lib.requirer_databag(ssh_public_key=key)})
    out = ctx.run(ctx.on.relation_changed(relation), testing.State(relations={relation}))
    managed = access.managed_keys(host_access.text)
    assert [k.source for k in managed] == [f"relation:{relation.id}:manager/0"]
    published = access_lib.published_from(out.get_relation(relation.id))
    assert published.backend == "libvirt"
    assert published.uri is not None
    assert published.uri.startswith("qemu+ssh://virsh@")
    assert published.uri.endswith("/system")
    assert published.ssh_host_keys == ["ssh-ed25519 AAAAhostkey"]

    # The manager leaves: exactly its key goes.
    ctx.run(ctx.on.relation_broken(relation), testing.State(relations={relation}))
    assert access.managed_keys(host_access.text) == []


def test_related_manager_with_bad_key_is_skipped(ctx, backend, fake_host, host_access):
    relation = access_lib.requirer_relation(
        {0: access_lib.requirer_databag(ssh_public_key="ssh-ed25519 AAAA garbage")}
    )
    out = ctx.run(ctx.on.relation_changed(relation), testing.State(relations={relation}))
    assert access.managed_keys(host_access.text) == []
    assert isinstance(out.unit_status, testing.ActiveStatus)


def test_authorize_and_revoke_ssh_key_actions(ctx, backend, fake_host, host_access):
    key = ed25519_public_key()
    results = run_action(ctx, "authorize-ssh-key", {"name": "laptop", "key": key})
    assert results["fingerprint"].startswith("SHA256:")
    assert results["uri"].startswith("qemu+ssh://virsh@")
    assert [k.action_name for k in access.managed_keys(host_access.text)] == ["laptop"]
    # A reconcile keeps action keys.
    ctx.run(ctx.on.config_changed(), testing.State())
    assert [k.action_name for k in access.managed_keys(host_access.text)] == ["laptop"]
    run_action(ctx, "revoke-ssh-key", {"key": "laptop"})
    assert access.managed_keys(host_access.text) == []


def test_authorize_bad_key_fails_and_changes_nothing(ctx, backend, fake_host, host_access):
    before = host_access.text
    with pytest.raises(testing.ActionFailed) as failed:
        run_action(ctx, "authorize-ssh-key", {"name": "laptop", "key": "ssh-rsa AAAA\nevil"})
    assert "nothing changed" in failed.value.message
    assert host_access.text == before


def test_remove_revokes_access(ctx, backend, fake_host, host_access):
    key = ed25519_public_key()
    ctx.run(ctx.on.config_changed(), testing.State(config={"ssh-authorized-keys": key}))
    assert host_access.layout.sshd_drop_in.exists()
    ctx.run(ctx.on.remove(), testing.State(config={"ssh-authorized-keys": key}))
    # The managed block and the sshd drop-in go; the operator's own line keeps the user.
    assert host_access.text == OPERATOR_LINE
    assert not host_access.layout.sshd_drop_in.exists()
    assert host_access.accounts.calls == []
    assert "reload_sshd" in fake_host.calls


def test_remove_deletes_the_user_vm_host_made_when_nothing_else_is_in_it(
    ctx, backend, fake_host, host_access
):
    user = host_access.accounts.lookup("virsh")
    assert user is not None
    user.authorized_keys.write_text("")
    ctx.run(ctx.on.remove(), testing.State())
    assert host_access.accounts.calls == ["userdel:virsh"]


def test_what_a_killed_compose_left_is_removed_and_said(ctx, backend):
    backend.orphans = ["an interrupted compose of vm1 left volumes: removed vm-host/vm1-root"]
    out = ctx.run(ctx.on.update_status(), testing.State())
    assert "recover" in backend.calls
    assert isinstance(out.unit_status, testing.ActiveStatus)
    assert out.unit_status.message.endswith("removed vm-host/vm1-root")


def test_compose_vm_recovers_first_and_says_so(ctx, backend):
    backend.orphans = ["an interrupted compose of vm1 left volumes: removed vm-host/vm1-root"]
    results = run_action(ctx, "compose-vm", {"name": "vm1", "memory": 512})
    assert backend.calls.index("recover") < backend.calls.index("compose:vm1")
    assert results["recovered"].endswith("removed vm-host/vm1-root")


@pytest.mark.parametrize(
    ("config", "phrase"),
    [
        ({"reserved-cpus": "0-99"}, "reserved-cpus: CPUs 24-99 do not exist"),
        ({"reserved-cpus": "0-23"}, "reserved-cpus: reserves all 24 CPUs"),
        ({"reserved-memory": 10**8}, "reserved-memory: 100000000 MiB is not less than"),
        ({"default-storage-pool": "nope"}, "default-storage-pool: pool 'nope' does not exist"),
        ({"hugepages": "1G:4000"}, "hugepages: 4096000 MiB of huge pages is not less than"),
        ({"hugepages": "2M:8@7"}, "hugepages: NUMA node 7 does not exist"),
    ],
)
def test_config_the_host_contradicts_blocks_before_anything_is_written(
    ctx, backend, fake_host, config, phrase
):
    out = ctx.run(ctx.on.config_changed(), testing.State(config=config))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert phrase in out.unit_status.message
    assert "juju config" in out.unit_status.message
    assert not [c for c in fake_host.calls if c.startswith("hugepages:")]
    assert not [c for c in backend.calls if c.startswith(("compose", "delete", "recover"))]
    # An action does not unblock it: status is computed from config and host each time.
    after = ctx.run(
        ctx.on.action("list-vms"), testing.State(config=config, unit_status=out.unit_status)
    )
    assert isinstance(after.unit_status, testing.BlockedStatus)
    assert phrase in after.unit_status.message
    again = ctx.run(ctx.on.update_status(), testing.State(config=config))
    assert phrase in again.unit_status.message


def test_the_status_line_warns_when_guests_run_under_tcg(ctx, backend, fake_host) -> None:
    backend.virt_type = "qemu"
    out = ctx.run(ctx.on.update_status(), testing.State(leader=True))
    assert out.unit_status.name == "active"
    assert "(qemu: TCG emulation, no hardware virtualisation" in out.unit_status.message


def test_list_vms_lists_an_unreadable_domain_by_name_with_the_reason(ctx, backend) -> None:
    backend.vms["forged"] = VmRecord(
        "forged",
        "u-1",
        VmState.RUNNING,
        Placement(vcpus=1, memory_mib=64),
        managed=False,
        problem="its vm-host metadata is unreadable (vcpus='two')",
    )
    ctx.run(ctx.on.action("list-vms"), testing.State(leader=True))
    (listed,) = json.loads(ctx.action_results["json"])  # type: ignore[index]
    assert listed["name"] == "forged"
    assert listed["managed"] is False
    assert "vcpus='two'" in listed["problem"]
    assert "(not vm-host)" in ctx.action_results["table"]  # type: ignore[index]

"""The charm itself (ops.testing Context) on top of the real libvirt backend: no fakes.

Juju is the only thing not real here: the events and actions are fed by ops.testing, and
everything the charm does lands on this machine's libvirtd with KVM.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import libvirt
import pytest
from ops import testing

import charm
from vmhost.backends.libvirt import LibvirtBackend, resolve_virt_type
from vmhost.topology import parse_cpu_list

VM = "vmhost-test-charm-0"


@pytest.fixture
def ctx(charm_type: type[charm.VmHostCharm]) -> testing.Context[charm.VmHostCharm]:
    return testing.Context(charm_type)


@pytest.fixture
def state(test_pool: str, clean_host: None, test_bridge: str) -> testing.State:
    # A request without interfaces gets its one NIC on default-network; network boot
    # (default-image ""): these VMs test placement, images have their own tests.
    config = {
        "default-storage-pool": test_pool,
        "default-network": test_bridge,
        "default-image": "",
    }
    return testing.State(config=config, leader=True)


def run(ctx, state, action, **params):
    ctx.run(ctx.on.action(action, params=params), state)
    return ctx.action_results or {}


def domain_names(backend: LibvirtBackend) -> set[str]:
    return {d.name() for d in backend.conn.listAllDomains(0)}


def volume_names(backend: LibvirtBackend, pool: str) -> set[str]:
    return {v.name() for v in backend.conn.storagePoolLookupByName(pool).listAllVolumes(0)}


def test_reconcile_reports_the_live_host(ctx, state, backend):
    out = ctx.run(ctx.on.config_changed(), state)
    assert isinstance(out.unit_status, testing.ActiveStatus)
    version = backend.version()
    virt = resolve_virt_type(state.config.get("virt-type", "auto"))
    assert out.unit_status.message.startswith(f"libvirt {version} ({virt}")
    nodes = len(backend.topology().nodes)
    assert f"{nodes} NUMA node" in out.unit_status.message


def test_compose_pinned_vm_matches_plan_then_delete(ctx, state, backend, test_pool):
    before = volume_names(backend, test_pool)
    results = run(
        ctx, state, "compose-vm", name=VM, memory=128, **{"pinned-cores": "1", "storage": "root:1"}
    )
    placement = json.loads(results["placement"])
    dom = backend.conn.lookupByName(VM)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    live = ET.fromstring(dom.XMLDesc(0))
    pins = {int(p.get("vcpu", -1)): p.get("cpuset") for p in live.iter("vcpupin")}
    assert pins == {0: str(placement["cpus"][0])}
    memnodes = [(m.get("cellid"), m.get("mode"), m.get("nodeset")) for m in live.iter("memnode")]
    assert memnodes == [("0", "strict", str(placement["numa-nodes"][0]))]
    emulator = live.find("cputune/emulatorpin")
    assert emulator is not None
    emulator_cpus = set(parse_cpu_list(emulator.get("cpuset", "")))
    assert emulator_cpus == set(placement["emulator-cpus"])
    if len(backend.topology().cpus) > 1:  # emulator threads stay off the pinned vCPU
        assert placement["cpus"][0] not in emulator_cpus
    created = volume_names(backend, test_pool) - before
    assert created == {f"{VM}-root"}

    listed = json.loads(run(ctx, state, "list-vms")["json"])
    mine = next(vm for vm in listed if vm["name"] == VM)
    assert mine["owner"] == "action"
    assert mine["placement"]["cpus"] == placement["cpus"]

    status = ctx.run(ctx.on.update_status(), state).unit_status
    assert isinstance(status, testing.ActiveStatus)

    deleted = run(ctx, state, "delete-vm", name=VM)
    assert deleted["deleted"] == VM
    assert VM not in domain_names(backend)
    assert volume_names(backend, test_pool) == before


def test_request_that_does_not_fit_is_refused_and_leaves_nothing(ctx, state, backend, test_pool):
    cpus = len(backend.topology().cpus)
    before_domains = domain_names(backend)
    before_volumes = volume_names(backend, test_pool)
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "compose-vm", name=VM, memory=128, **{"pinned-cores": str(cpus + 1)})
    assert f"needs {cpus + 1} pinned CPUs" in failed.value.message
    assert "nothing done" in failed.value.message
    assert domain_names(backend) == before_domains
    assert volume_names(backend, test_pool) == before_volumes


def test_dry_run_creates_nothing(ctx, state, backend, test_pool):
    before_volumes = volume_names(backend, test_pool)
    results = run(
        ctx, state, "compose-vm", name=VM, memory=128, **{"pinned-cores": "1", "dry-run": True}
    )
    assert len(json.loads(results["placement"])["cpus"]) == 1
    assert VM not in domain_names(backend)
    assert volume_names(backend, test_pool) == before_volumes


def test_failed_compose_through_the_charm_leaves_nothing(ctx, state, backend, test_pool):
    # The data disk's volume name is taken: the hypervisor refuses it, the root is rolled back.
    pool = backend.conn.storagePoolLookupByName(test_pool)
    pool.createXML(
        f"<volume><name>{VM}-data</name><capacity unit='bytes'>1048576</capacity>"
        "<target><format type='qcow2'/></target></volume>",
        0,
    )
    before_volumes = volume_names(backend, test_pool)
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "compose-vm", name=VM, memory=128, storage="root:1,data:1")
    assert "rolled back" in failed.value.message
    assert VM not in domain_names(backend)
    assert volume_names(backend, test_pool) == before_volumes


def test_a_host_path_image_is_refused_through_the_charm(ctx, state, backend, test_pool):
    before_volumes = volume_names(backend, test_pool)
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "compose-vm", name=VM, memory=128, image="/etc/shadow")
    assert "host path" in failed.value.message
    assert "nothing done" in failed.value.message
    assert VM not in domain_names(backend)
    assert volume_names(backend, test_pool) == before_volumes


def test_a_disk_in_a_missing_pool_is_refused_before_anything(ctx, state, backend, test_pool):
    before_volumes = volume_names(backend, test_pool)
    for dry_run in (True, False):
        with pytest.raises(testing.ActionFailed) as failed:
            run(
                ctx,
                state,
                "compose-vm",
                name=VM,
                memory=128,
                storage="root:1,data:1(vmhost-test-missing-pool)",
                **{"dry-run": dry_run},
            )
        assert "'vmhost-test-missing-pool' does not exist" in failed.value.message
        assert "nothing done" in failed.value.message
    assert VM not in domain_names(backend)
    assert volume_names(backend, test_pool) == before_volumes


def test_image_store_name_is_refused_on_libvirt(ctx, state, backend, test_pool):
    before_volumes = volume_names(backend, test_pool)
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "compose-vm", name=VM, memory=128, image="jammy-vm")
    assert "image" in failed.value.message
    assert "local-image-dir" in failed.value.message
    assert VM not in domain_names(backend)
    assert volume_names(backend, test_pool) == before_volumes


def test_config_this_host_contradicts_is_blocked_naming_the_option(ctx, backend, test_pool):
    cpus = len(backend.topology().cpus)
    beyond = {"default-storage-pool": test_pool, "reserved-cpus": f"0-{cpus + 3}"}
    out = ctx.run(ctx.on.config_changed(), testing.State(config=beyond, leader=True))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert f"reserved-cpus: CPUs {cpus}-{cpus + 3} do not exist" in out.unit_status.message

    missing = {"default-storage-pool": "vmhost-test-absent"}
    out = ctx.run(ctx.on.config_changed(), testing.State(config=missing, leader=True))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "pool 'vmhost-test-absent' does not exist" in out.unit_status.message
    assert test_pool in out.unit_status.message  # the pools it does have

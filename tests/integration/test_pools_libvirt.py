"""Resource pools through the charm on the real libvirtd: quota, record, list and show.

The charm runs in ops.testing; every VM it composes is a real domain whose pool is recorded
in vm-host's metadata and read back from libvirt (the hypervisor is the ledger).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from ops import testing

import charm
from vmhost.backends.libvirt import METADATA_NS, LibvirtBackend

FIRST = "vmhost-test-rp-a"
SECOND = "vmhost-test-rp-b"
OTHER = "vmhost-test-rp-c"


@pytest.fixture
def ctx(charm_type: type[charm.VmHostCharm]) -> testing.Context[charm.VmHostCharm]:
    return testing.Context(charm_type)


@pytest.fixture
def state(test_pool: str, clean_host: None, test_bridge: str) -> testing.State:
    config = {
        "default-storage-pool": test_pool,
        "default-network": test_bridge,
        "default-image": "",
        "resource-pools": "{db: {vms: 1, pinned-cpus: 1}, scratch: {}}",
    }
    return testing.State(config=config, leader=True)


def run(ctx, state, action, **params):
    ctx.run(ctx.on.action(action, params=params), state)
    return ctx.action_results or {}


def domains(backend: LibvirtBackend) -> set[str]:
    return {d.name() for d in backend.conn.listAllDomains(0)}


def volumes(backend: LibvirtBackend, pool: str) -> set[str]:
    return {v.name() for v in backend.conn.storagePoolLookupByName(pool).listAllVolumes(0)}


def test_a_pool_with_room_for_one_vm_refuses_the_second_and_leaves_nothing(
    ctx, state, backend, test_pool
):
    run(ctx, state, "compose-vm", name=FIRST, memory=128, storage="root:1", pool="db")
    metadata = ET.fromstring(backend.conn.lookupByName(FIRST).XMLDesc(0)).find(
        f"metadata/{{{METADATA_NS}}}vm"
    )
    assert metadata is not None
    assert metadata.findtext(f"{{{METADATA_NS}}}pool") == "db"

    before = (domains(backend), volumes(backend, test_pool))
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "compose-vm", name=SECOND, memory=128, storage="root:1", pool="db")
    assert failed.value.message == (
        f"cannot place {SECOND}, nothing done: pool db: 1 of 1 VMs used, this VM needs 1; "
        "raise the quota with juju config vm-host resource-pools=... or choose another pool"
    )
    assert (domains(backend), volumes(backend, test_pool)) == before
    assert SECOND not in domains(backend)

    # The dry run says the same before anything, and names the pool's numbers when it fits.
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "compose-vm", name=SECOND, memory=128, pool="db", **{"dry-run": True})
    assert "pool db: 1 of 1 VMs used" in failed.value.message
    checked = run(
        ctx,
        state,
        "compose-vm",
        name=OTHER,
        memory=128,
        storage="root:1",
        pool="scratch",
        **{"dry-run": True},
    )
    assert checked["pool"].startswith("pool scratch: fits (no quota")
    assert checked["storage"].startswith(f"pool {test_pool}: 1.0 GB of ")
    assert checked["image"] == "none: the VM boots from the network"
    assert (domains(backend), volumes(backend, test_pool)) == before


def test_list_vms_filters_by_pool_and_show_resources_counts_them(ctx, state, backend):
    run(ctx, state, "compose-vm", name=FIRST, memory=128, storage="root:1", pool="db")
    run(ctx, state, "compose-vm", name=OTHER, memory=128, storage="root:1", pool="scratch")

    listed = run(ctx, state, "list-vms", pool="db")
    assert [vm["name"] for vm in json.loads(listed["json"])] == [FIRST]
    header, row = listed["table"].splitlines()
    assert header.split()[8] == "POOL"
    assert row.split()[8] == "db"
    everything = {vm["name"]: vm["pool"] for vm in json.loads(run(ctx, state, "list-vms")["json"])}
    assert everything[FIRST] == "db"
    assert everything[OTHER] == "scratch"

    shown = run(ctx, state, "show-resources")
    pools = {p["name"]: p for p in json.loads(shown["json"])["resource-pools"]}
    db = {r["resource"]: (r["quota"], r["used"], r["free"]) for r in pools["db"]["resources"]}
    assert db["vms"] == (1, 1, 0)
    assert db["pinned-cpus"] == (1, 0, 1)
    assert db["vcpus"] == (None, 1, None)
    scratch = {r["resource"]: r["used"] for r in pools["scratch"]["resources"]}
    assert scratch["vms"] == 1
    assert pools["default"]["default"] is True
    lines = [line.split() for line in shown["table"].splitlines()]
    assert ["RESOURCE-POOL", "RESOURCE", "QUOTA", "USED", "FREE"] in lines
    assert ["db", "vms", "1", "1", "0"] in lines
    print("\n--- show-resources (table) ---\n" + shown["table"])
    print("\n--- list-vms (table) ---\n" + run(ctx, state, "list-vms")["table"])

"""A consumer's request over the `vms` relation, served by the charm on the real libvirt.

The request asks for one NIC by subnet and one by static address; the VM's NICs must sit on
the bridges that carry those subnets and its NoCloud seed must carry the address. Breaking
the relation removes the VM and its volumes. Removing the unit (relation-departed with itself
departing, then relation-broken) leaves the VM and its disks, under both release policies;
release-policy keep re-owns the domain in libvirt so delete-vm can delete it.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace

import libvirt
import pytest
import yaml
from ops import testing

import charm
import charms.vm_host.v0.vm_host as vm_lib

IP = "/usr/sbin/ip"
ISOINFO = "/usr/bin/isoinfo"
BRIDGES = {"vmhost-test-bra": "10.231.1.1/24", "vmhost-test-brb": "10.231.2.1/24"}
APP = "vmhost-test-app"


@pytest.fixture
def bridges() -> Iterator[dict[str, str]]:
    for name, address in BRIDGES.items():
        subprocess.run([IP, "link", "del", name], check=False, capture_output=True)
        subprocess.run([IP, "link", "add", name, "type", "bridge"], check=True)
        subprocess.run([IP, "addr", "add", address, "dev", name], check=True)
        subprocess.run([IP, "link", "set", name, "up"], check=True)
    yield BRIDGES
    for name in BRIDGES:
        subprocess.run([IP, "link", "del", name], check=False, capture_output=True)


@pytest.fixture
def ctx(charm_type: type[charm.VmHostCharm]) -> testing.Context[charm.VmHostCharm]:
    return testing.Context(charm_type)


def read_iso_file(path: str, name: str) -> str:
    result = subprocess.run(
        [ISOINFO, "-R", "-i", path, "-x", f"/{name}"], capture_output=True, check=True
    )
    return result.stdout.decode()


@pytest.mark.usefixtures("clean_host")
def test_relation_request_gets_nics_on_the_right_bridges_and_a_static_address(
    ctx, backend, test_pool, bridges
):
    request = {
        "id": "db-0",
        "cores": 1,
        "memory": 128,
        "pinned-cores": 1,
        "storage": "root:1",
        "interfaces": "eth0:subnet_cidr=10.231.1.0/24;data:ip=10.231.2.50",
    }
    relation = vm_lib.requirer_relation([request], remote_app_name=APP, relation_id=41)
    config = {
        "default-storage-pool": test_pool,
        "default-image": "",  # network boot
        # The subnet and the address resolve to these bridges: mapped, so relation VMs may go.
        "networks": yaml.safe_dump({s: {"bridge": b} for s, b in zip("ab", BRIDGES, strict=True)}),
    }
    state = testing.State(config=config, leader=True, relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation), state)

    (answer,) = vm_lib.answers_from(out.get_relation(41))
    assert answer.state == "running", answer.error
    name = f"{APP}-41-db-0"
    assert answer.name == name
    dom = backend.conn.lookupByName(name)
    xml = ET.fromstring(dom.XMLDesc(0))
    sources = {}
    for iface in xml.iter("interface"):
        mac = iface.find("mac")
        source = iface.find("source")
        assert mac is not None
        assert source is not None
        sources[mac.get("address")] = source.get("bridge")
    by_label = {i.label: i for i in answer.interfaces}
    assert sources[by_label["eth0"].mac] == "vmhost-test-bra"
    assert sources[by_label["data"].mac] == "vmhost-test-brb"
    assert by_label["data"].ip == "10.231.2.50"

    pool = backend.conn.storagePoolLookupByName(test_pool)
    seed = pool.storageVolLookupByName(f"{name}-seed").path()
    network = yaml.safe_load(read_iso_file(seed, "network-config"))
    data_nic = next(
        nic
        for nic in network["ethernets"].values()
        if nic["match"]["macaddress"] == by_label["data"].mac
    )
    assert data_nic["addresses"] == ["10.231.2.50/24"]

    ctx.run(ctx.on.relation_broken(relation), state)
    assert name not in {d.name() for d in backend.conn.listAllDomains(0)}
    assert not [v.name() for v in pool.listAllVolumes(0) if v.name().startswith(name)]


@pytest.mark.usefixtures("clean_host")
def test_relation_requests_reach_only_what_the_operator_mapped(ctx, backend, test_pool, bridges):
    """Named host interfaces and unmapped networks are refused; a static address is one VM's."""
    bra, brb = BRIDGES
    config = {
        "default-storage-pool": test_pool,
        "default-image": "",
        "networks": yaml.safe_dump({"a": {"bridge": bra}}),
        "cpu-overcommit-ratio": 4.0,  # three 1-vCPU VMs on a 2-CPU test machine
    }
    reaching = [
        {"id": "named", "memory": 128, "storage": "root:1", "interfaces": f"eth0:bridge={brb}"},
        {"id": "subnet", "memory": 128, "storage": "root:1", "interfaces": "eth0:ip=10.231.2.60"},
        {"id": "mapped", "memory": 128, "storage": "root:1", "interfaces": "eth0:ip=10.231.1.60"},
    ]
    relation = vm_lib.requirer_relation(reaching, remote_app_name=APP, relation_id=45)
    state = testing.State(config=config, leader=True, relations={relation}, model=MODEL)
    out = ctx.run(ctx.on.relation_changed(relation), state)
    answers = {a.id: a for a in vm_lib.answers_from(out.get_relation(45))}
    assert answers["mapped"].state == "running", answers["mapped"].error
    for refused in ("named", "subnet"):
        assert answers[refused].state == "failed"
        assert f"allowed-host-interfaces={brb}" in (answers[refused].error or "")
        assert f"{APP}-45-{refused}" not in _names(backend)
        assert not _volumes(backend, test_pool, f"{APP}-45-{refused}")

    # The same address for another app: refused while the first VM has it.
    other = vm_lib.requirer_relation(
        [{"id": "dup", "memory": 128, "storage": "root:1", "interfaces": "eth0:ip=10.231.1.60"}],
        remote_app_name=APP + "-b",
        relation_id=46,
    )
    state = testing.State(config=config, leader=True, relations={relation, other}, model=MODEL)
    out = ctx.run(ctx.on.relation_changed(other), state)
    (dup,) = vm_lib.answers_from(out.get_relation(46))
    assert dup.state == "failed"
    assert f"ip 10.231.1.60 is already the address of VM {APP}-45-mapped" in (dup.error or "")

    # Listed by the operator: the named bridge and the unmapped subnet are served.
    allowed = {**config, "allowed-host-interfaces": brb}
    state = testing.State(config=allowed, leader=True, relations={relation}, model=MODEL)
    out = ctx.run(ctx.on.relation_changed(relation), state)
    answers = {a.id: a for a in vm_lib.answers_from(out.get_relation(45))}
    assert {i: (a.state, a.error) for i, a in answers.items()} == dict.fromkeys(
        answers, ("running", None)
    )
    ctx.run(ctx.on.relation_broken(relation), state)
    assert not {n for n in _names(backend) if n.startswith(f"{APP}-45-")}


def _names(backend) -> set[str]:
    return {d.name() for d in backend.conn.listAllDomains(0)}


def _volumes(backend, pool: str, name: str) -> list[str]:
    volumes = backend.conn.storagePoolLookupByName(pool).listAllVolumes(0)
    return sorted(v.name() for v in volumes if v.name().startswith(name))


MODEL = testing.Model(uuid="5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f")


@pytest.mark.usefixtures("clean_host")
@pytest.mark.parametrize("policy", ["delete", "keep"])
def test_remove_unit_leaves_the_vm_and_its_disks_on_the_real_host(
    ctx, charm_type, backend, test_pool, test_bridge, policy
):
    request = {"id": "db-0", "cores": 1, "memory": 128, "storage": "root:1"}
    relation = vm_lib.requirer_relation([request], remote_app_name=APP, relation_id=43)
    peer = testing.PeerRelation("hosts", id=3, peers_data={0: {}})
    config = {
        "default-storage-pool": test_pool,
        "default-network": test_bridge,
        "default-image": "",  # network boot: no image to wait for
        "release-policy": policy,
    }
    unit = testing.Context(charm_type, unit_id=1)
    state = testing.State(config=config, leader=True, relations={relation}, model=MODEL)
    out = unit.run(unit.on.relation_changed(relation), state)
    (answer,) = vm_lib.answers_from(out.get_relation(43))
    assert answer.state == "running", answer.error
    name = f"{APP}-43-db-0"
    assert name in _names(backend)
    volumes = _volumes(backend, test_pool, name)
    assert volumes

    # juju remove-unit vm-host/1: departed with itself departing, then every relation broken.
    leaving = testing.State(config=config, leader=True, relations={relation, peer}, model=MODEL)
    unit.run(unit.on.relation_departed(peer, remote_unit=0, departing_unit=1), leaving)
    unit.run(unit.on.relation_broken(relation), leaving)
    unit.run(unit.on.relation_broken(peer), leaving)
    unit.run(unit.on.update_status(), testing.State(config=config, leader=True, model=MODEL))
    assert name in _names(backend)
    assert _volumes(backend, test_pool, name) == volumes
    owner = ET.fromstring(backend.conn.lookupByName(name).XMLDesc(0)).findtext(
        "metadata/{https://charmhub.io/vm-host/metadata/1}vm/{https://charmhub.io/vm-host/metadata/1}owner"
    )
    assert owner == f"relation:43:{APP}:vm-host:{MODEL.uuid}"


@pytest.mark.usefixtures("clean_host")
def test_keep_re_owns_the_domain_in_libvirt_and_delete_vm_then_deletes_it(
    ctx, backend, test_pool, test_bridge
):
    request = {"id": "db-0", "cores": 1, "memory": 128, "storage": "root:1"}
    relation = vm_lib.requirer_relation([request], remote_app_name=APP, relation_id=44)
    config = {
        "default-storage-pool": test_pool,
        "default-network": test_bridge,
        "default-image": "",  # network boot: no image to wait for
        "release-policy": "keep",
    }
    state = testing.State(config=config, leader=True, relations={relation}, model=MODEL)
    ctx.run(ctx.on.relation_changed(relation), state)
    name = f"{APP}-44-db-0"
    dom = backend.conn.lookupByName(name)
    assert dom.isActive()
    ctx.run(ctx.on.relation_broken(relation), state)

    # Re-owned live and in the stored definition; still running, disks untouched.
    ns = "{https://charmhub.io/vm-host/metadata/1}"
    released = f"released:{APP}:vm-host:{MODEL.uuid}"
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        root = ET.fromstring(backend.conn.lookupByName(name).XMLDesc(flags))
        assert root.findtext(f"metadata/{ns}vm/{ns}owner") == released
        assert root.find(f"metadata/{ns}vm/{ns}placement") is not None
    assert backend.conn.lookupByName(name).isActive()
    (record,) = [vm for vm in backend.list_vms() if vm.name == name]
    assert (record.owner, record.request_id, record.managed) == (released, "db-0", True)

    # The operator deletes it with delete-vm, disks included.
    volumes = _volumes(backend, test_pool, name)
    assert volumes
    ctx.run(ctx.on.action("delete-vm", params={"name": name}), replace(state, relations=set()))
    assert name not in _names(backend)
    assert _volumes(backend, test_pool, name) == []

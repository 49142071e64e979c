"""A consumer's request over the `vms` relation, served by the charm on the real libvirt.

The request asks for one NIC by subnet and one by static address; the VM's NICs must sit on
the bridges that carry those subnets and its NoCloud seed must carry the address. Breaking
the relation removes the VM and its volumes.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator

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
def ctx() -> testing.Context[charm.VmHostCharm]:
    return testing.Context(charm.VmHostCharm)


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
    config = {"default-storage-pool": test_pool}
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

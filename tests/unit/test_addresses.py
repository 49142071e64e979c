"""NIC addresses: static at once, learnt ones (DHCP) as soon as the backend knows them."""

from __future__ import annotations

import json

import pytest
from ops import testing

import charms.vm_host.v0.vm_host as vm_lib
from fake_backend import FakeBackend
from vmhost import addresses
from vmhost.backends import BackendUnavailableError
from vmhost.model import Placement, VmRecord, VmState

pytestmark = pytest.mark.usefixtures("fake_host")

MAC = "52:54:00:00:00:00"


def record(name="web-0", state=VmState.RUNNING, **nic: str) -> VmRecord:
    iface = {"label": "eth0", "mac": MAC, "attached-to": "br0", **nic}
    return VmRecord(name, "u", state, Placement(1, 512), interfaces=(iface,))


def test_clean_drops_prefixes_loopback_link_local_and_repeats():
    got = addresses.clean(["10.0.0.5/24", "fe80::1", "127.0.0.1", "10.0.0.5", "x", "2001:db8::7"])
    assert got == ("10.0.0.5", "2001:db8::7")


def test_static_first_then_learnt(topology):
    backend = FakeBackend(host=topology, learnt={"web-0": {MAC.upper(): ["10.0.0.9"]}})
    (vm,) = addresses.refresh(backend, [record(ip="192.0.2.10/24")])
    assert vm.addresses == {MAC: ("192.0.2.10", "10.0.0.9")}


def test_stopped_and_foreign_vms_are_not_asked_about(topology):
    backend = FakeBackend(host=topology)
    foreign = VmRecord("other", "u", VmState.RUNNING, Placement(1, 512), managed=False)
    addresses.refresh(backend, [record(state=VmState.STOPPED, ip="192.0.2.10/24"), foreign])
    assert not [c for c in backend.calls if c.startswith("guest_addresses")]


def test_an_unreachable_hypervisor_leaves_static_addresses(topology):
    class Down(FakeBackend):
        def guest_addresses(self, names):
            raise BackendUnavailableError("down")

    (vm,) = addresses.refresh(Down(host=topology), [record(ip="192.0.2.10/24")])
    assert vm.addresses == {MAC: ("192.0.2.10",)}


def test_list_vms_and_the_compose_result_carry_addresses(ctx, backend):
    state = testing.State(leader=True)
    ctx.run(
        ctx.on.action(
            "compose-vm", params={"name": "web-0", "memory": 512, "interfaces": "eth0:bridge=br0"}
        ),
        state,
    )
    result = json.loads((ctx.action_results or {})["interfaces"])
    assert result[0]["addresses"] == []  # DHCP: not known yet
    mac = result[0]["mac"]
    backend.learnt = {"web-0": {mac: ["10.0.0.9"]}}
    ctx.run(ctx.on.action("list-vms"), state)
    listed = json.loads((ctx.action_results or {})["json"])
    assert listed[0]["interfaces"][0]["addresses"] == ["10.0.0.9"]
    assert "10.0.0.9" in (ctx.action_results or {})["table"]


def test_relation_answers_fill_in_the_dhcp_address_on_a_later_hook(ctx, backend):
    relation = vm_lib.requirer_relation([{"id": "web-0", "memory": 512}], remote_app_name="app")
    state = testing.State(leader=True, relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation), state)
    (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
    assert answer.state == "running"
    (nic,) = answer.interfaces
    assert nic.addresses == []
    assert nic.ip is None
    backend.learnt = {answer.name or "": {nic.mac or "": ["10.0.0.9"]}}
    out = ctx.run(ctx.on.update_status(), out)
    (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
    (nic,) = answer.interfaces
    assert nic.addresses == ["10.0.0.9"]
    assert nic.ip == "10.0.0.9"


def test_old_answers_without_addresses_still_parse():
    bag = {"version": '"0"', "vms": json.dumps([{"id": "a", "state": "running",
           "interfaces": [{"label": "eth0", "ip": "10.0.0.1"}]}])}  # fmt: skip
    (answer,) = vm_lib.parse_answers(bag)[0]
    assert answer.interfaces[0].addresses == []
    assert answer.interfaces[0].ip == "10.0.0.1"

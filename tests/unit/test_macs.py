"""MACs: salted with the model and unit, stable for a request, never one the fleet has."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from ops import testing
from test_compose import host, spec, state
from test_fleet import A_X, lead_args, spec_for

import charms.vm_host.v0.vm_host as vm_lib
from fake_backend import FakeBackend
from vmhost.backends import MAC_PREFIXES, stable_mac
from vmhost.compose import assign_macs, compose, macs_in_use
from vmhost.model import AttachmentKind, NicAttachment, Placement, VmRecord, VmState
from vmhost.relation.fleet import Peers, host_report, lead, parse_host_report
from vmhost.relation.serve import RelationRequest

pytestmark = pytest.mark.usefixtures("fake_host")

LIBVIRT = MAC_PREFIXES["libvirt"]


def test_the_salt_separates_hosts_and_models_and_keeps_one_request_stable():
    here = stable_mac(LIBVIRT, "db-0", "eth0", "model-a/vm-host/0")
    assert here == stable_mac(LIBVIRT, "db-0", "eth0", "model-a/vm-host/0")
    others = {
        stable_mac(LIBVIRT, "db-0", "eth0", "model-a/vm-host/1"),
        stable_mac(LIBVIRT, "db-0", "eth0", "model-b/vm-host/0"),
        stable_mac(LIBVIRT, "db-0", "eth1", "model-a/vm-host/0"),
    }
    assert here not in others
    assert len(others) == 3
    assert here.startswith("52:54:00:")


def test_a_taken_mac_is_skipped_for_the_next_derivation():
    first = stable_mac(LIBVIRT, "db-0", "eth0", "s")
    second = stable_mac(LIBVIRT, "db-0", "eth0", "s", taken={first})
    assert second != first
    assert second == stable_mac(LIBVIRT, "db-0", "eth0", "s", taken={first})
    assert stable_mac(LIBVIRT, "db-0", "eth0", "s", taken={first, second}) not in {first, second}


def nic_record(name: str, mac: str) -> VmRecord:
    return VmRecord(
        name,
        "u",
        VmState.RUNNING,
        Placement(vcpus=1, memory_mib=256),
        interfaces=({"label": "eth0", "mac": mac, "attached-to": "br0"},),
    )


def test_compose_never_gives_a_mac_a_local_or_peer_vm_has():
    backend = FakeBackend(host=host())
    salted = replace(state(backend), mac_salt="m/vm-host/0")
    plain = compose(backend, spec("a"), salted)
    assert plain.vm is not None
    wanted = stable_mac(LIBVIRT, "b", "eth0", "m/vm-host/0")
    # The MAC "b" would get is already a peer unit's: b gets the next one.
    fleet = replace(salted, vms=backend.list_vms(), peer_macs=frozenset({wanted}))
    got = compose(backend, spec("b"), fleet)
    assert got.vm is not None
    mac = got.vm.interfaces[0]["mac"]
    assert mac != wanted
    assert mac not in macs_in_use([plain.vm])
    # And without the peer's, b would have had exactly that MAC (the check can fail).
    alone = FakeBackend(host=host())
    fresh = compose(alone, spec("b"), replace(state(alone), mac_salt="m/vm-host/0"))
    assert fresh.vm is not None
    assert fresh.vm.interfaces[0]["mac"] == wanted


def test_a_mac_the_request_brings_is_kept():
    backend = FakeBackend(host=host())
    nic = NicAttachment("eth0", AttachmentKind.BRIDGE, "br0", mac="52:54:00:AA:BB:CC")
    (out,) = assign_macs(spec("a"), [nic], state(backend), LIBVIRT)
    assert out.mac == "52:54:00:aa:bb:cc"


def test_host_reports_carry_the_macs_and_lead_hands_the_peers_on():
    vms = [nic_record("x", "52:54:00:01:02:03")]
    text = host_report(host(), [vm.placement for vm in vms], macs=macs_in_use(vms))
    report, problem = parse_host_report(text)
    assert problem is None
    assert report is not None
    assert report.macs == {"52:54:00:01:02:03"}
    # An older report without the key still reads, with no MACs.
    older = json.loads(text)
    del older["macs"]
    assert parse_host_report(json.dumps(older))[0].macs == frozenset()  # type: ignore[union-attr]

    peers = Peers(reports={"vm-host/1": text}, assignment=None)
    requests = [RelationRequest(A_X, spec_for(A_X))]
    decision = lead("vm-host/0", **lead_args(peers=peers, requests=requests))  # type: ignore[arg-type]
    assert decision.peer_macs == {"52:54:00:01:02:03"}
    mine = parse_host_report(decision.report)[0]
    assert mine is not None
    assert mine.macs == frozenset()


def test_the_same_request_in_two_models_gets_two_macs(ctx, backend):
    macs = []
    for model in ("5f0c1d2e-3a4b-4c5d-8e6f-000000000001", "5f0c1d2e-3a4b-4c5d-8e6f-000000000002"):
        backend.vms.clear()
        relation = vm_lib.requirer_relation(
            [{"id": "db-0", "memory": 256, "interfaces": "eth0:bridge=br0"}],
            remote_app_name="pg",
        )
        out = ctx.run(
            ctx.on.relation_changed(relation),
            testing.State(
                leader=True,
                relations={relation},
                model=testing.Model(uuid=model),
                config={"allowed-host-interfaces": "br0"},
            ),
        )
        (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
        assert answer.state == "running", answer.error
        macs.append(answer.interfaces[0].mac)
    assert macs[0] != macs[1]

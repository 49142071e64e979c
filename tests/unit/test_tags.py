"""Request tags: validated, recorded in each backend's ledger, answered, listed and filtered."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from ops import testing
from test_domain_xml import render
from test_domain_xml import spec as libvirt_spec
from test_lxd_backend import instance_from, no_topology
from test_lxd_backend import spec as lxd_spec

import charms.vm_host.v0.vm_host as vm_lib
from vmhost import constraints, report
from vmhost.backends.libvirt import record_from_domain_xml
from vmhost.backends.lxd import instance_definition, record_from_instance
from vmhost.model import InvalidRequestError, Placement, VmRecord, VmState

pytestmark = pytest.mark.usefixtures("fake_host")


def build(**kw: Any):
    return constraints.build_spec(name="vm1", memory_mib=256, **kw)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, ()),
        ("", ()),
        ("db, prod ,db", ("db", "prod")),
        (["db", "team.a_1-x"], ("db", "team.a_1-x")),
    ],
)
def test_tags_are_validated_and_deduplicated(given: object, expected: tuple[str, ...]) -> None:
    assert build(tags=given).tags == expected


@pytest.mark.parametrize(
    "given",
    [["-db"], ["a b"], ["x" * 65], [7], {"db": 1}, ["ok"] * 30 + [f"t{i}" for i in range(40)]],
)
def test_bad_tags_name_the_field(given: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        build(tags=given)
    assert err.value.field == "tags"


def test_tags_leave_the_spec_hash_alone() -> None:
    assert constraints.spec_hash(build(tags=["db"])) == constraints.spec_hash(build())


def test_libvirt_metadata_records_the_tags() -> None:
    root = render(libvirt_spec(tags=("db", "x<&>")), Placement(vcpus=2, memory_mib=2048))
    record = record_from_domain_xml(ET.tostring(root, encoding="unicode"), VmState.RUNNING)
    assert record.tags == ("db", "x<&>")


def test_lxd_ledger_records_the_tags() -> None:
    d = instance_definition(lxd_spec(tags=("db",)), Placement(vcpus=2, memory_mib=2048), [], "x")
    assert record_from_instance(instance_from(d, "Running"), no_topology, "vm-host").tags == (
        "db",
    )
    untagged = instance_definition(lxd_spec(), Placement(vcpus=2, memory_mib=2048), [], "x")
    assert (
        record_from_instance(instance_from(untagged, "Running"), no_topology, "vm-host").tags == ()
    )


def vm(name: str, owner: str, tags: tuple[str, ...], state: VmState = VmState.RUNNING) -> VmRecord:
    return VmRecord(name, "u-" + name, state, Placement(vcpus=1, memory_mib=256), owner, tags=tags)


VMS = [
    vm("a", "action", ("db",)),
    vm("b", "relation:7:pg", ("db", "prod"), VmState.STOPPED),
    vm("c", "relation:70:web", ()),
]


@pytest.mark.parametrize(
    ("filters", "names"),
    [
        ({}, ["a", "b", "c"]),
        ({"tag": "db"}, ["a", "b"]),
        ({"tag": "prod"}, ["b"]),
        ({"owner": "relation"}, ["b", "c"]),
        ({"owner": "relation:7"}, ["b"]),
        ({"owner": "relation:7:pg"}, ["b"]),
        ({"owner": "action"}, ["a"]),
        ({"state": "stopped"}, ["b"]),
        ({"tag": "db", "state": "running"}, ["a"]),
    ],
)
def test_select_vms_matches_every_filter(filters: dict[str, str], names: list[str]) -> None:
    assert [v.name for v in report.select_vms(VMS, **filters)] == names


def test_compose_vm_tags_reach_list_vms_and_its_filter(ctx, backend):
    state = testing.State(leader=True)
    params = {"name": "web-0", "memory": 256, "tags": "web,prod"}
    ctx.run(ctx.on.action("compose-vm", params=params), state)
    ctx.run(ctx.on.action("compose-vm", params={"name": "web-1", "memory": 256}), state)
    assert backend.composed["web-0"][0].tags == ("web", "prod")

    ctx.run(ctx.on.action("list-vms", params={"tag": "prod"}), state)
    listed = json.loads(ctx.action_results["json"])  # type: ignore[index]
    assert [(v["name"], v["tags"]) for v in listed] == [("web-0", ["web", "prod"])]
    assert "web,prod" in ctx.action_results["table"]  # type: ignore[index]

    ctx.run(ctx.on.action("list-vms", params={}), state)
    assert len(json.loads(ctx.action_results["json"])) == 2  # type: ignore[index]


def test_list_vms_refuses_an_unknown_state(ctx, backend):
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(ctx.on.action("list-vms", params={"state": "asleep"}), testing.State(leader=True))
    assert "state" in failed.value.message


def test_bad_compose_tags_fail_naming_the_field(ctx, backend):
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(
            ctx.on.action("compose-vm", params={"name": "web-0", "memory": 256, "tags": "a b"}),
            testing.State(leader=True),
        )
    assert failed.value.message.startswith("bad request, nothing done: tags")
    assert "must be 1-64 letters" in failed.value.message
    assert not backend.composed


def test_relation_request_tags_are_recorded_and_answered(ctx, backend):
    relation = vm_lib.requirer_relation(
        [{"id": "db-0", "memory": 256, "tags": ["db", "pg"]}], remote_app_name="pg"
    )
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
    assert answer.state == "running"
    assert answer.tags == ["db", "pg"]
    spec, _ = backend.composed[answer.name or ""]
    assert spec.tags == ("db", "pg")

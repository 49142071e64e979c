"""The vm-consumer test charm, driven in ops.testing against answers a vm-host would publish."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import ops
import pytest
import yaml
from ops import testing

from charms.vm_host.v0.vm_host import (
    SEEN_KEY,
    InterfaceRequest,
    StorageRequest,
    VmAnswer,
    VmFailedEvent,
    VmReadyEvent,
    VmRemovedEvent,
    VmRequest,
    provider_relation,
    requests_from,
)

CHARM_DIR = Path(__file__).resolve().parents[1] / "charms" / "vm-consumer"


def _load_charm() -> type[ops.CharmBase]:
    """Import the consumer by path: its module is also called `charm`, like vm-host's."""
    name = "vm_consumer_charm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CHARM_DIR / "src" / "charm.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].VmConsumerCharm


VmConsumerCharm = _load_charm()
META = yaml.safe_load((CHARM_DIR / "metadata.yaml").read_text())
CONFIG = yaml.safe_load((CHARM_DIR / "config.yaml").read_text())

MAC = "52:54:00:12:34:56"
RUNNING = VmAnswer.model_validate(
    {
        "id": "db-0",
        "name": "vmhost-vm-consumer-db-0",
        "state": "running",
        "interfaces": [{"label": "eth0", "mac": MAC, "attached-to": "br0"}],
    }
)


@pytest.fixture
def ctx() -> testing.Context[ops.CharmBase]:
    return testing.Context(VmConsumerCharm, meta=META, config=CONFIG)


def _events(ctx: testing.Context[Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for event in ctx.emitted_events:
        if isinstance(event, VmReadyEvent):
            found.append(("ready", event.vm.id))
        elif isinstance(event, VmFailedEvent):
            found.append(("failed", event.vm.id))
        elif isinstance(event, VmRemovedEvent):
            found.append(("removed", event.vm_id))
    return found


def test_leader_requests_the_default_vm(ctx: testing.Context[ops.CharmBase]):
    relation = provider_relation()
    out = ctx.run(ctx.on.leader_elected(), testing.State(leader=True, relations={relation}))
    assert requests_from(out.get_relation(relation.id)) == [
        VmRequest(id="db-0", cores=1, memory=1024)
    ]
    assert out.unit_status == testing.WaitingStatus("waiting for vm db-0")


def test_relation_created_gets_the_requests(ctx: testing.Context[ops.CharmBase]):
    relation = provider_relation()
    out = ctx.run(
        ctx.on.relation_created(relation), testing.State(leader=True, relations={relation})
    )
    assert [r.id for r in requests_from(out.get_relation(relation.id))] == ["db-0"]


def test_config_requests_with_maas_strings_are_written_structured(
    ctx: testing.Context[ops.CharmBase],
):
    requests = [
        {"id": "web-0", "cores": 2, "memory": 2048},
        {"id": "db-0", "storage": "root:20(ssd),data:100", "interfaces": "eth0:space=oam"},
    ]
    relation = provider_relation()
    state = testing.State(
        leader=True, relations={relation}, config={"requests": json.dumps(requests)}
    )
    out = ctx.run(ctx.on.config_changed(), state)
    written = requests_from(out.get_relation(relation.id))
    assert [r.id for r in written] == ["db-0", "web-0"]
    assert written[0].storage == [
        StorageRequest(label="root", size_gb=20, pool="ssd"),
        StorageRequest(label="data", size_gb=100),
    ]
    assert written[0].interfaces == [InterfaceRequest(label="eth0", space="oam")]
    raw = json.loads(out.get_relation(relation.id).local_app_data["requests"])
    assert raw[0]["storage"][0] == {"label": "root", "size-gb": 20, "pool": "ssd"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "config requests is not JSON; give a JSON array"),
        ('{"id": "db-0"}', "config requests must be a JSON array of requests"),
        (
            '[{"id": "db-0", "interfaces": "eth0:fabric=f1"}]',
            "config requests: invalid interfaces",
        ),
        ('[{"id": "DB"}]', "config requests: invalid id"),
    ],
)
def test_bad_config_blocks_and_writes_nothing(
    ctx: testing.Context[ops.CharmBase], value: str, message: str
):
    relation = provider_relation()
    state = testing.State(leader=True, relations={relation}, config={"requests": value})
    out = ctx.run(ctx.on.config_changed(), state)
    assert out.get_relation(relation.id).local_app_data == {}
    assert out.unit_status == testing.BlockedStatus(message)


def test_duplicate_ids_in_config_write_nothing(ctx: testing.Context[ops.CharmBase]):
    relation = provider_relation()
    value = json.dumps([{"id": "a"}, {"id": "a"}])
    state = testing.State(leader=True, relations={relation}, config={"requests": value})
    out = ctx.run(ctx.on.config_changed(), state)
    assert out.get_relation(relation.id).local_app_data == {}


def test_non_leader_writes_nothing_but_shows_state(ctx: testing.Context[ops.CharmBase]):
    relation = provider_relation({0: [RUNNING]})
    out = ctx.run(ctx.on.config_changed(), testing.State(leader=False, relations={relation}))
    assert out.get_relation(relation.id).local_app_data == {}
    assert out.unit_status == testing.ActiveStatus(f"vm db-0 running at {MAC}")


def test_without_relation_it_is_blocked(ctx: testing.Context[ops.CharmBase]):
    out = ctx.run(ctx.on.leader_elected(), testing.State(leader=True))
    assert out.unit_status == testing.BlockedStatus("needs a vm-host relation: juju integrate")


def test_running_vm_makes_it_active_and_fires_vm_ready(ctx: testing.Context[ops.CharmBase]):
    relation = provider_relation({0: [RUNNING]})
    out = ctx.run(
        ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation})
    )
    assert out.unit_status == testing.ActiveStatus(f"vm db-0 running at {MAC}")
    assert _events(ctx) == [("ready", "db-0")]
    assert any("vm db-0 ready on vm-host/0" in log.message for log in ctx.juju_log)


def test_failed_vm_blocks_with_the_reason(ctx: testing.Context[ops.CharmBase]):
    failed = VmAnswer(id="db-0", state="failed", error="no host has 1 free core")
    relation = provider_relation({0: [failed]})
    out = ctx.run(
        ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation})
    )
    assert out.unit_status == testing.BlockedStatus("vm db-0 failed: no host has 1 free core")
    assert _events(ctx) == [("failed", "db-0")]


def test_pending_vm_waits_without_events(ctx: testing.Context[ops.CharmBase]):
    relation = provider_relation({0: [VmAnswer(id="db-0", state="pending")]})
    out = ctx.run(
        ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation})
    )
    assert out.unit_status == testing.WaitingStatus("vm db-0 pending")
    assert _events(ctx) == []


def test_vm_lifecycle_across_hooks(ctx: testing.Context[ops.CharmBase]):
    relation = provider_relation({0: [VmAnswer(id="db-0", state="pending")]})
    state = testing.State(relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation, remote_unit=0), state)
    assert _events(ctx) == []

    running = dataclasses.replace(
        out.get_relation(relation.id),
        remote_units_data=provider_relation({0: [RUNNING]}).remote_units_data,
    )
    ctx.emitted_events.clear()
    out = ctx.run(
        ctx.on.relation_changed(running, remote_unit=0),
        dataclasses.replace(out, relations={running}),
    )
    assert _events(ctx) == [("ready", "db-0")]
    assert out.get_relation(relation.id).local_unit_data[SEEN_KEY] == '{"db-0":"running"}'

    gone = dataclasses.replace(
        out.get_relation(relation.id),
        remote_units_data=provider_relation({0: []}).remote_units_data,
    )
    ctx.emitted_events.clear()
    out = ctx.run(
        ctx.on.relation_changed(gone, remote_unit=0), dataclasses.replace(out, relations={gone})
    )
    assert _events(ctx) == [("removed", "db-0")]
    assert out.unit_status == testing.WaitingStatus("waiting for vm db-0")


def test_two_hosts_answering_for_a_moving_vm(ctx: testing.Context[ops.CharmBase]):
    relation = provider_relation(
        {0: [VmAnswer(id="db-0", state="failed", error="host leaving")], 1: [RUNNING]}
    )
    out = ctx.run(
        ctx.on.relation_changed(relation, remote_unit=1), testing.State(relations={relation})
    )
    assert out.unit_status == testing.ActiveStatus(f"vm db-0 running at {MAC}")
    assert _events(ctx) == [("ready", "db-0")]

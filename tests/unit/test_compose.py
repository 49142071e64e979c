"""The one compose path: name, NICs, placement, backend, dry run; actions and relations alike."""

from __future__ import annotations

from fake_backend import FakeBackend
from vmhost.compose import HostState, Outcome, compose, deletable, name_taken
from vmhost.constraints import build_spec
from vmhost.model import Cpu, HostTopology, NumaNode, Policy, VmSpec


def host(cpus: int = 4) -> HostTopology:
    return HostTopology(
        nodes=(
            NumaNode(
                id=0,
                cpus=tuple(Cpu(id=c, socket_id=0, core_id=c) for c in range(cpus)),
                memory_kib=8 * 1024 * 1024,
                distances={0: 10},
            ),
        )
    )


def state(backend: FakeBackend) -> HostState:
    return HostState(backend.topology(), backend.list_vms(), Policy(), {}, "vm-host")


def spec(name: str = "web", **fields: object) -> VmSpec:
    fields.setdefault("memory_mib", 1024)
    return build_spec(name=name, **fields)  # type: ignore[arg-type]


def composes(backend: FakeBackend) -> list[str]:
    return [c for c in backend.calls if c.startswith("compose:")]


def test_composes_and_returns_the_record():
    backend = FakeBackend(host=host())
    got = compose(backend, spec(), state(backend))
    assert got.vm is not None
    assert got.vm.name == "web"
    assert got.error is None
    assert composes(backend) == ["compose:web"]


def test_dry_run_places_and_composes_nothing():
    backend = FakeBackend(host=host())
    got = compose(backend, spec(pinned_cores=2), state(backend), dry_run=True)
    assert got.vm is None
    assert got.placement is not None
    assert len(got.placement.pinned_cpus) == 2
    assert composes(backend) == []


def test_a_taken_name_is_refused_before_anything_else():
    backend = FakeBackend(host=host())
    compose(backend, spec(), state(backend))
    again = compose(backend, spec(), state(backend))
    assert again.vm is None
    assert "already exists" in again.refused
    assert "choose another name" in again.refused
    assert composes(backend) == ["compose:web"]


def test_a_relation_spec_is_told_to_use_another_id():
    backend = FakeBackend(host=host())
    compose(backend, spec(), state(backend))
    relation = spec(owner="relation:1:app", request_id="x")
    assert "request it under another id" in (name_taken(relation, backend.list_vms()) or "")


def test_unknown_space_is_refused_naming_the_interface():
    backend = FakeBackend(host=host())
    got = compose(backend, spec(interfaces="eth0:space=nowhere"), state(backend))
    assert got.vm is None
    assert got.refused
    assert "eth0" in got.refused or "interfaces" in got.refused
    assert composes(backend) == []


def test_what_does_not_fit_is_rejected_with_the_allocators_reason():
    backend = FakeBackend(host=host(cpus=2))
    got = compose(backend, spec(pinned_cores=4), state(backend))
    assert got.vm is None
    assert got.rejected
    assert got.error == got.rejected
    assert composes(backend) == []


def test_a_failing_hypervisor_is_reported_as_rolled_back():
    backend = FakeBackend(host=host(), fail_compose="disk full")
    got = compose(backend, spec(), state(backend))
    assert got.vm is None
    assert got.error == "compose failed and was rolled back: disk full"


def test_progress_hears_the_nodes_before_the_slow_part():
    backend = FakeBackend(host=host())
    heard: list[str] = []
    compose(backend, spec(pinned_cores=1), state(backend), progress=heard.append)
    assert heard == ["composing web on host nodes [0]"]
    assert Outcome(spec()).error is None


def test_only_action_vms_are_deletable_by_name():
    backend = FakeBackend(host=host())
    compose(backend, spec("ops"), state(backend))
    compose(backend, spec("pg-1-db", owner="relation:1:pg", request_id="db"), state(backend))
    vms = backend.list_vms()
    got = deletable(vms, "ops", owner="action")
    assert not isinstance(got, str)
    assert got.name == "ops"
    assert "belongs to relation:1:pg" in str(deletable(vms, "pg-1-db", owner="action"))
    assert str(deletable(vms, "nope", owner="action")) == (
        "no VM named 'nope'; VMs composed by vm-host: ops, pg-1-db"
    )

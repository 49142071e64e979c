"""Tests for the vm_host charm library: wire schema vectors, provider and requirer."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ops
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ops import testing

from charms.vm_host.v0 import vm_host as lib
from charms.vm_host.v0.vm_host import (
    HostedVm,
    InterfaceRequest,
    InvalidRequest,
    NotLeaderError,
    RequirerAppData,
    StorageRequest,
    VmAnswer,
    VmFailedEvent,
    VmHostProvider,
    VmHostRequirer,
    VmReadyEvent,
    VmRemovedEvent,
    VmRequest,
    answers_from,
    parse_answers,
    parse_requests,
    provider_relation,
    requests_from,
    requirer_relation,
)

JUJU_KEYS = {"egress-subnets": "10.0.0.1/32", "ingress-address": "10.0.0.1"}


def bag(requests: Any, **extra: str) -> dict[str, str]:
    """A requirer app databag holding `requests` (any JSON value) as the wire has it."""
    return {"version": '"0"', "requests": json.dumps(requests), **extra}


def only_invalid(request: dict[str, Any]) -> InvalidRequest:
    valid, invalid = parse_requests(bag([request]))
    assert valid == []
    assert len(invalid) == 1
    return invalid[0]


# ---------------------------------------------------------------------------------------------
# Schema vectors


def test_empty_databag_is_valid():
    assert parse_requests({}) == ([], [])
    assert parse_answers({}) == ([], [])
    assert RequirerAppData() == RequirerAppData(version="0", requests=[])


def test_juju_keys_and_unknown_fields_are_ignored():
    data = bag(
        [{"id": "db-0", "cores": 2, "colour": "blue", "future": {"x": 1}}],
        **JUJU_KEYS,
        **{"something-new": "not json at all"},
    )
    valid, invalid = parse_requests(data)
    assert invalid == []
    assert valid == [VmRequest(id="db-0", cores=2)]


def test_nulls_mean_absent():
    valid, invalid = parse_requests(
        bag(
            [
                {
                    "id": "db-0",
                    "cores": None,
                    "memory": None,
                    "pinned-cores": None,
                    "hugepages": None,
                    "storage": None,
                    "interfaces": None,
                    "tags": None,
                    "ssh-public-keys": None,
                    "host": None,
                }
            ]
        )
    )
    assert invalid == []
    assert valid == [VmRequest(id="db-0")]
    assert valid[0].tags == []
    assert parse_requests({"version": '"0"', "requests": "null"}) == ([], [])
    assert parse_answers({"vms": "null"}) == ([], [])


def test_full_request_parses_to_typed_fields():
    valid, invalid = parse_requests(
        bag(
            [
                {
                    "id": "db-0",
                    "cores": 4,
                    "memory": 8192,
                    "pinned-cores": [2, 3, 14, 15],
                    "numa-nodes": 1,
                    "hugepages": "1G",
                    "storage": [{"label": "root", "size-gb": 40, "pool": "ssd"}],
                    "interfaces": [{"label": "eth0", "ip": "10.0.5.20", "subnet": "10.0.5.0/24"}],
                    "image": "ubuntu@24.04",
                    "user-data": "#cloud-config\n",
                    "ssh-public-keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@example"],
                    "tags": ["db"],
                    "host": "vm-host/1",
                }
            ]
        )
    )
    assert invalid == []
    (request,) = valid
    assert request.pinned_cores == [2, 3, 14, 15]
    assert request.pinned_count == 4
    assert request.numa_nodes == 1
    assert request.storage == [StorageRequest(label="root", size_gb=40, pool="ssd")]
    assert request.interfaces == [
        InterfaceRequest(label="eth0", ip="10.0.5.20", subnet="10.0.5.0/24")
    ]
    assert request.user_data == "#cloud-config\n"
    assert request.host == "vm-host/1"


@pytest.mark.parametrize(
    ("request_data", "field"),
    [
        ({"id": "DB-0"}, "id"),
        ({"id": ""}, "id"),
        ({"id": "a" * 41}, "id"),
        ({"id": "db_0"}, "id"),
        ({"id": 7}, "id"),
        ({"id": "db-0", "cores": "4"}, "cores"),
        ({"id": "db-0", "cores": True}, "cores"),
        ({"id": "db-0", "cores": 4.5}, "cores"),
        ({"id": "db-0", "cores": 0}, "cores"),
        ({"id": "db-0", "memory": -1}, "memory"),
        ({"id": "db-0", "hugepages": "4M"}, "hugepages"),
        ({"id": "db-0", "hugepages": True}, "hugepages"),
        ({"id": "db-0", "pinned-cores": 0}, "pinned-cores"),
        ({"id": "db-0", "pinned-cores": []}, "pinned-cores"),
        ({"id": "db-0", "pinned-cores": [-1]}, "pinned-cores"),
        ({"id": "db-0", "pinned-cores": [1, 1]}, "pinned-cores"),
        ({"id": "db-0", "cores": 2, "pinned-cores": 4}, "pinned-cores"),
        ({"id": "db-0", "cores": 2, "pinned-cores": [1, 2, 3]}, "pinned-cores"),
        ({"id": "db-0", "numa-nodes": 0}, "numa-nodes"),
        ({"id": "db-0", "storage": [{"label": "root", "size-gb": -5}]}, "size-gb"),
        ({"id": "db-0", "storage": [{"label": "root", "size-gb": 0}]}, "size-gb"),
        ({"id": "db-0", "storage": [{"label": "root"}]}, "size-gb"),
        ({"id": "db-0", "user-data": "\u00e9" * 32769}, "user-data"),
        ({"id": "db-0", "storage": [{"label": "r/t", "size-gb": 5}]}, "label"),
        ({"id": "db-0", "storage": [{"label": "root", "size-gb": 5, "pool": "a b"}]}, "pool"),
        ({"id": "db-0", "storage": {"root": 5}}, "storage"),
        ({"id": "db-0", "interfaces": [{"label": "eth0", "vlan": 5000}]}, "vlan"),
        ({"id": "db-0", "interfaces": [{"label": "eth0", "numa-strict": "yes"}]}, "numa-strict"),
        ({"id": "db-0", "interfaces": [{"label": "eth0", "mode": "tap"}]}, "mode"),
        ({"id": "db-0", "interfaces": [{"label": "eth0", "subnet": "oam"}]}, "CIDR"),
        ({"id": "db-0", "interfaces": [{"label": "eth0", "ip": "10.0.5.300"}]}, "ip"),
        ({"id": "db-0", "interfaces": [{"space": "oam"}]}, "label"),
        ({"id": "db-0", "image": "two words"}, "image"),
        ({"id": "db-0", "user-data": "x" * 65537}, "user-data"),
        ({"id": "db-0", "ssh-public-keys": ["ssh-rsa AAAA\nrm -rf /"]}, "ssh-public-keys"),
        ({"id": "db-0", "ssh-public-keys": "ssh-rsa AAAA"}, "ssh-public-keys"),
        ({"id": "db-0", "tags": ["has space"]}, "tags"),
        ({"id": "db-0", "host": "../etc"}, "host"),
        ("db-0", "VmRequest"),
        (None, "VmRequest"),
    ],
)
def test_bad_values_are_invalid_with_a_reason_naming_the_field(request_data: Any, field: str):
    bad = only_invalid(request_data)
    assert bad.index == 0
    assert field in bad.reason
    expected_id = request_data.get("id") if isinstance(request_data, dict) else None
    if isinstance(expected_id, str) and lib.re.match(lib._ID_RE, expected_id):
        assert bad.id == expected_id
    else:
        assert bad.id is None


def test_reason_never_echoes_the_input():
    secret = "s3cret-password-in-user-data"
    bad = only_invalid({"id": "db-0", "user-data": [secret], "memory": secret})
    assert secret not in bad.reason
    assert "user-data" in bad.reason
    assert "memory" in bad.reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"requests": "[{"}, "requests is not JSON"),
        ({"requests": '{"id": "db-0"}'}, "requests must be a JSON array"),
        ({"version": '"1"', "requests": "[]"}, "unsupported version; this library speaks '0'"),
        ({"version": "0.x", "requests": "[]"}, "version is not JSON"),
    ],
)
def test_unusable_databag_is_one_invalid_entry(data: dict[str, str], reason: str):
    assert parse_requests(data) == ([], [InvalidRequest(index=None, id=None, reason=reason)])


def test_one_bad_request_never_invalidates_the_others():
    valid, invalid = parse_requests(
        bag(
            [
                {"id": "web-1", "cores": 1},
                {"id": "db-0", "cores": "many"},
                {"id": "api-0", "interfaces": "eth0:fabric=f1"},
                {"id": "cache-0", "storage": "root:20(ssd),data:100"},
                {"cores": 2},
            ]
        )
    )
    assert [r.id for r in valid] == ["cache-0", "web-1"]
    assert [(b.index, b.id) for b in invalid] == [(1, "db-0"), (2, "api-0"), (4, None)]
    assert "fabric" in invalid[1].reason
    assert "id: Field required" in invalid[2].reason


def test_duplicate_ids_are_all_invalid():
    valid, invalid = parse_requests(
        bag([{"id": "db-0", "cores": 1}, {"id": "web-0"}, {"id": "db-0", "cores": 2}])
    )
    assert [r.id for r in valid] == ["web-0"]
    assert [(b.index, b.id) for b in invalid] == [(0, "db-0"), (2, "db-0")]
    assert all("more than one request" in b.reason for b in invalid)


def test_duplicate_of_an_invalid_request_also_invalidates_the_valid_one():
    valid, invalid = parse_requests(bag([{"id": "db-0", "cores": "x"}, {"id": "db-0"}]))
    assert valid == []
    assert [b.index for b in invalid] == [0, 1]


def test_requests_come_out_sorted_by_id_whatever_the_input_order():
    ids = ["web-2", "db-0", "api-9", "db-10"]
    valid, _ = parse_requests(bag([{"id": i} for i in ids]))
    assert [r.id for r in valid] == sorted(ids)
    data = RequirerAppData(requests=[VmRequest(id=i) for i in ids])
    assert [r.id for r in data.requests] == sorted(ids)


def test_requirer_app_data_refuses_duplicate_ids():
    with pytest.raises(pydantic.ValidationError, match="repeated: db-0"):
        RequirerAppData(requests=[VmRequest(id="db-0"), VmRequest(id="db-0")])


# ---------------------------------------------------------------------------------------------
# MAAS compose strings


def test_maas_interfaces_reference_example():
    request = VmRequest.model_validate(
        {"id": "x", "interfaces": "eth0:space=oam;eth1:subnet_cidr=10.0.5.0/24;data:vid=100"}
    )
    assert request.interfaces == [
        InterfaceRequest(label="eth0", space="oam"),
        InterfaceRequest(label="eth1", subnet="10.0.5.0/24"),
        InterfaceRequest(label="data", vlan=100),
    ]


def test_maas_interfaces_design_example_and_every_supported_key():
    request = VmRequest.model_validate(
        {
            "id": "x",
            "interfaces": (
                "eth0:space=oam;data:vid=100;"
                "pub:ip=10.0.5.20,subnet=10.0.5.0/24,mode=macvtap;"
                "0:vlan=vid:200,mode=sriov;1:vlan=300"
            ),
        }
    )
    assert request.interfaces == [
        InterfaceRequest(label="eth0", space="oam"),
        InterfaceRequest(label="data", vlan=100),
        InterfaceRequest(label="pub", ip="10.0.5.20", subnet="10.0.5.0/24", mode="macvtap"),
        InterfaceRequest(label="0", vlan=200, mode="sriov"),
        InterfaceRequest(label="1", vlan=300),
    ]


def test_maas_storage_reference_examples():
    assert VmRequest.model_validate({"id": "x", "storage": "root:80(ssd),data:400"}).storage == [
        StorageRequest(label="root", size_gb=80, pool="ssd"),
        StorageRequest(label="data", size_gb=400),
    ]
    assert VmRequest.model_validate({"id": "x", "storage": "root:20(pool),data:100"}).storage == [
        StorageRequest(label="root", size_gb=20, pool="pool"),
        StorageRequest(label="data", size_gb=100),
    ]


def test_maas_storage_without_labels_in_both_forms():
    assert lib.parse_maas_storage("200(ssd),300,1") == [
        StorageRequest(label="root", size_gb=200, pool="ssd"),
        StorageRequest(label="disk1", size_gb=300),
        StorageRequest(label="disk2", size_gb=1),
    ]
    structured = VmRequest.model_validate(
        {"id": "x", "storage": [{"size-gb": 20}, {"size-gb": 5, "pool": "ssd", "label": None}]}
    )
    assert structured.storage == [
        StorageRequest(label="root", size_gb=20),
        StorageRequest(label="disk1", size_gb=5, pool="ssd"),
    ]


def test_vm_host_interface_extensions():
    request = VmRequest.model_validate(
        {
            "id": "x",
            "interfaces": "eth0:bridge=br-oam;data:parent=enp5s0f0,mode=sriov,numa_strict=true",
        }
    )
    assert request.interfaces == [
        InterfaceRequest(label="eth0", bridge="br-oam"),
        InterfaceRequest(label="data", parent="enp5s0f0", mode="sriov", numa_strict=True),
    ]
    wire = request.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert wire["interfaces"][1] == {
        "label": "data",
        "parent": "enp5s0f0",
        "mode": "sriov",
        "numa-strict": True,
    }


def test_empty_maas_strings_mean_the_host_defaults():
    request = VmRequest.model_validate({"id": "x", "storage": "", "interfaces": ""})
    assert request.storage is None
    assert request.interfaces is None


@pytest.mark.parametrize(
    ("interfaces", "reason"),
    [
        ("eth0:fabric=f1", "key 'fabric' is not supported"),
        ("eth0:fabric_class=10g", "key 'fabric_class' is not supported"),
        ("eth0:not_space=dmz", "key 'not_space' is not supported"),
        ("eth0:type=bond", "key 'type' is not supported"),
        ("eth0:tag=sriov", "key 'tag' is not supported"),
        ("eth0:space=oam;eth0:space=dmz", "labels must be unique"),
        ("eth0:space=oam,space=dmz", "space is given more than once"),
        ("eth0:vid=100,vlan=200", "vlan is given more than once"),
        ("eth0", "is not 'label:key=value"),
        ("eth0:space", "is not key=value"),
        ("eth0:space=", "is not key=value"),
        ("eth0:space=oam;", "is not 'label:key=value"),
        ("-bad:space=oam", "interface label '-bad'"),
        ("eth0:vid=abc", "must be a VLAN id"),
        ("eth0:vlan=name:foo", "must be a VLAN id"),
        ("eth0:vid=5000", "vlan"),
        ("eth0:subnet=oam-subnet", "must be a subnet in CIDR form"),
        ("eth0:subnet=10.0.5.1/24", "must be a subnet in CIDR form"),
        ("eth0:subnet=10.0.5.0", "needs a prefix length"),
        ("eth0:space=OAM", "space"),
        ("eth0:bridge=br0,parent=eth1", "not both"),
        ("eth0:bridge=br0,mode=sriov", "bridge attaches with mode bridge"),
        ("eth0:parent=eth1,mode=bridge", "parent is for mode macvtap or sriov"),
        ("eth0:parent=eth1,numa_strict=true", "numa-strict applies only to mode sriov"),
        ("eth0:mode=sriov,numa_strict=maybe", "numa_strict must be true or false"),
        ("eth0:bridge=a-very-long-bridge-name", "bridge"),
        ("eth0:ip=10.0.6.1,subnet_cidr=10.0.5.0/24", "ip is not inside subnet 10.0.5.0/24"),
        ("eth0:mode=bond", "mode"),
    ],
)
def test_bad_maas_interfaces_invalidate_that_request(interfaces: str, reason: str):
    bad = only_invalid({"id": "db-0", "interfaces": interfaces})
    assert bad.id == "db-0"
    assert reason in bad.reason
    assert bad.reason.startswith("interfaces") or "labels must be unique" in bad.reason


@pytest.mark.parametrize(
    ("storage", "reason"),
    [
        ("root:20(ssd,fast)", "exactly one pool"),
        ("root:20()", "exactly one pool"),
        ("root:abc", "must be a whole number of GB"),
        ("root:-5", "must be a whole number of GB"),
        ("root:20.5", "must be a whole number of GB"),
        ("root:0", "size-gb: must be at least 1"),
        ("root:65537", "size-gb: must be at most 65536"),
        ("root:20(SSD)", "pool"),
        ("root:20(ssd", "unbalanced '('"),
        ("root:20)ssd(", "unbalanced ')'"),
        (":20", "storage label ''"),
        ("r/t:20", "storage label 'r/t'"),
        ("root:20,root:30", "storage: disk labels must be unique"),
        ("root:20,,data:5", "storage size of 'disk1'"),
        ("root:20(bad pool)", "pool"),
        ("root:20:30", "is not 'label:size(pool)'"),
    ],
)
def test_bad_maas_storage_invalidates_that_request(storage: str, reason: str):
    bad = only_invalid({"id": "db-0", "storage": storage})
    assert bad.id == "db-0"
    assert reason in bad.reason


_label = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_-]{0,10}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            _label,
            st.integers(1, 65536),
            st.none() | st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda d: d[0],
    )
)
def test_maas_storage_round_trips_generated_strings(disks: list[tuple[str, int, str | None]]):
    text = ",".join(
        f"{label}:{size}" + (f"({pool})" if pool else "") for label, size, pool in disks
    )
    assert lib.parse_maas_storage(text) == [
        StorageRequest(label=label, size_gb=size, pool=pool) for label, size, pool in disks
    ]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab01:;,=()._-/ vidspace"), max_size=40))
def test_arbitrary_strings_either_parse_or_are_invalid(text: str):
    for field in ("storage", "interfaces"):
        valid, invalid = parse_requests(bag([{"id": "x", field: text}]))
        assert len(valid) + len(invalid) == 1


# ---------------------------------------------------------------------------------------------
# Answers


def test_answers_parse_sorted_and_bad_ones_skipped():
    data = {
        "version": '"0"',
        "vms": json.dumps(
            [
                {"id": "web-0", "state": "running", "interfaces": None, "new-field": 1},
                {"id": "db-0", "state": "exploded"},
                {"id": "api-0", "state": "failed", "error": "no capacity"},
                {"id": "api-0", "state": "running"},
                "junk",
            ]
        ),
        **JUJU_KEYS,
    }
    answers, problems = parse_answers(data)
    assert [(a.id, a.state) for a in answers] == [("api-0", "failed"), ("web-0", "running")]
    assert answers[1].interfaces == []
    assert len(problems) == 3
    assert problems[0].startswith("vms[1]: state")


@pytest.mark.parametrize(
    "data",
    [{"vms": "{"}, {"vms": '{"id": "x"}'}, {"version": '"7"', "vms": "[]"}],
)
def test_unusable_answer_databag_gives_no_answers(data: dict[str, str]):
    answers, problems = parse_answers(data)
    assert answers == []
    assert len(problems) == 1


def test_provider_unit_data_sorts_and_refuses_duplicates():
    data = lib.ProviderUnitData(
        vms=[VmAnswer(id="b", state="pending"), VmAnswer(id="a", state="running")]
    )
    assert [a.id for a in data.vms] == ["a", "b"]
    with pytest.raises(pydantic.ValidationError, match="repeated: a"):
        lib.ProviderUnitData(vms=[VmAnswer(id="a", state="pending")] * 2)


# ---------------------------------------------------------------------------------------------
# Provider in ops.testing

PROVIDER_META = {"name": "host", "provides": {"vms": {"interface": "vm_host"}}}


class HolisticProvider(ops.CharmBase):
    """Answers every request pending and every invalid one failed, on every event."""

    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self.vms = VmHostProvider(self)
        framework.observe(self.on.update_status, self._reconcile)
        framework.observe(self.vms.on.requests_changed, self._reconcile)

    def _reconcile(self, _: ops.EventBase):
        for batch in self.vms.sync():
            assert batch.relation is not None
            answers = [VmAnswer(id=r.id, state="pending") for r in batch.valid]
            answers += [
                VmAnswer(id=bad.id, state="failed", error=bad.reason)
                for bad in batch.invalid
                if bad.id is not None and bad.id not in {a.id for a in answers}
            ]
            self.vms.publish(batch.relation, answers)


def test_provider_answers_a_mix_of_valid_and_invalid_requests():
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    relation = requirer_relation(
        [
            VmRequest(id="web-0", cores=1, storage=lib.parse_maas_storage("root:10")),
            {"id": "db-0", "hugepages": "3M"},
            {"id": "api-0", "interfaces": "eth0:not_space=dmz"},
            {"id": "DB-1"},
        ]
    )
    out = ctx.run(ctx.on.relation_changed(relation), testing.State(relations={relation}))
    published = out.get_relation(relation.id)
    answers = answers_from(published)
    assert [(a.id, a.state) for a in answers] == [
        ("api-0", "failed"),
        ("db-0", "failed"),
        ("web-0", "pending"),
    ]
    assert "not_space" in (answers[0].error or "")
    assert "hugepages" in (answers[1].error or "")
    assert published.local_unit_data["version"] == '"0"'


def test_provider_requests_lists_each_relation_with_its_app():
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    first = requirer_relation([{"id": "a-0"}], remote_app_name="alpha", relation_id=7)
    second = requirer_relation([{"id": "b-0"}, {"id": 1}], remote_app_name="beta", relation_id=3)
    empty = testing.Relation("vms", remote_app_name="gamma", id=9)
    state = testing.State(relations={first, second, empty})
    with ctx(ctx.on.update_status(), state) as mgr:
        found = mgr.charm.vms.requests
        mgr.run()
    assert [(r.relation_id, r.app_name) for r in found] == [
        (3, "beta"),
        (7, "alpha"),
        (9, "gamma"),
    ]
    assert [r.id for r in found[0].valid] == ["b-0"]
    assert found[0].invalid[0].index == 1
    assert found[0].invalid_ids == set()
    assert found[2].valid == []
    assert found[2].invalid == []


def test_provider_never_raises_on_garbage_remote_data():
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    relation = testing.Relation(
        "vms", remote_app_data={"requests": "not json", "version": "{{"}, remote_app_name="bad"
    )
    out = ctx.run(ctx.on.relation_changed(relation), testing.State(relations={relation}))
    assert answers_from(out.get_relation(relation.id)) == []


@pytest.mark.parametrize("kind", ["joined", "changed", "departed"])
def test_requests_changed_carries_the_relation_requests(kind: str):
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    relation = requirer_relation([{"id": "db-0"}], remote_units=(0, 1))
    event = getattr(ctx.on, f"relation_{kind}")
    args: dict[str, Any] = {"remote_unit": 1}
    if kind == "departed":
        args["departing_unit"] = 1
    ctx.run(event(relation, **args), testing.State(relations={relation}))
    (emitted,) = [e for e in ctx.emitted_events if isinstance(e, lib.RequestsChangedEvent)]
    assert emitted.relation.id == relation.id
    assert [r.id for r in emitted.requests.valid] == ["db-0"]


def test_on_relation_broken_the_relation_leaves_requests():
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    relation = requirer_relation([{"id": "db-0"}])
    with ctx(ctx.on.relation_broken(relation), testing.State(relations={relation})) as mgr:
        mgr.run()
        assert mgr.charm.vms.requests == []
    (emitted,) = [e for e in ctx.emitted_events if isinstance(e, lib.RequestsChangedEvent)]
    assert emitted.requests.valid == []


def test_publish_is_stable_and_round_trips_to_the_requirer():
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    relation = requirer_relation([])
    answers = [
        VmAnswer.model_validate(
            {
                "id": "web-0",
                "name": "vmhost-consumer-web-0",
                "state": "running",
                "uuid": "5f7c3a2e-8d9b-4c1a-9e0f-1a2b3c4d5e6f",
                "interfaces": [
                    {"label": "eth0", "mac": "52:54:00:aa:bb:cc", "attached-to": "br0"}
                ],
                "placement": {"numa-nodes": [0], "cpus": [2, 3], "hugepages": "1G"},
                "power": {"type": "virsh", "address": "qemu+ssh://virsh@10.0.0.5/system"},
            }
        ),
        VmAnswer(id="db-0", state="failed", error="no node has 64 GiB of 1G pages free"),
    ]
    with ctx(ctx.on.update_status(), testing.State(relations={relation})) as mgr:
        rel = mgr.charm.model.get_relation("vms", relation.id)
        assert rel is not None
        mgr.charm.vms.publish(rel, answers)
        first = dict(rel.data[mgr.charm.unit])
        mgr.charm.vms.publish(rel, list(reversed(answers)))
        assert dict(rel.data[mgr.charm.unit]) == first
    assert first["version"] == '"0"'
    assert [a["id"] for a in json.loads(first["vms"])] == ["db-0", "web-0"]
    assert "null" not in first["vms"]
    assert answers_from(testing.Relation("vms", local_unit_data=first)) == sorted(
        answers, key=lambda a: a.id
    )


def test_clear_removes_what_publish_wrote():
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    relation = dataclasses.replace(
        requirer_relation([]),
        local_unit_data={**JUJU_KEYS, "version": '"0"', "vms": '[{"id":"a","state":"running"}]'},
    )
    with ctx(ctx.on.start(), testing.State(relations={relation})) as mgr:
        rel = mgr.charm.model.get_relation("vms", relation.id)
        assert rel is not None
        mgr.charm.vms.clear(rel)
        out = mgr.run()
    assert out.get_relation(relation.id).local_unit_data == JUJU_KEYS


def test_publish_refuses_duplicate_answers():
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    relation = requirer_relation([])
    with ctx(ctx.on.start(), testing.State(relations={relation})) as mgr:
        rel = mgr.charm.model.get_relation("vms", relation.id)
        assert rel is not None
        with pytest.raises(pydantic.ValidationError):
            mgr.charm.vms.publish(rel, [{"id": "a", "state": "running"}] * 2)
        assert "vms" not in rel.data[mgr.charm.unit]


# ---------------------------------------------------------------------------------------------
# Requirer in ops.testing

REQUIRER_META = {"name": "consumer", "requires": {"vm-host": {"interface": "vm_host"}}}


class Requester(ops.CharmBase):
    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self.vm_host = VmHostRequirer(self)


def test_request_vms_writes_sorted_validated_requests_on_every_relation():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    first = provider_relation(relation_id=1)
    second = provider_relation(relation_id=2, remote_app_name="other-host")
    with ctx(ctx.on.update_status(), testing.State(leader=True, relations={first, second})) as m:
        m.charm.vm_host.request_vms(
            [
                {"id": "web-0", "cores": 1, "interfaces": "eth0:space=oam"},
                VmRequest.model_validate(
                    {"id": "db-0", "memory": 4096, "storage": "root:20(ssd)"}
                ),
            ]
        )
        assert [r.id for r in m.charm.vm_host.requests] == ["db-0", "web-0"]
        out = m.run()
    for rel_id in (1, 2):
        written = out.get_relation(rel_id).local_app_data
        assert written["version"] == '"0"'
        requests = requests_from(out.get_relation(rel_id))
        assert [r.id for r in requests] == ["db-0", "web-0"]
        assert requests[1].interfaces == [InterfaceRequest(label="eth0", space="oam")]
        assert requests[0].storage == [StorageRequest(label="root", size_gb=20, pool="ssd")]


def test_withdraw_drops_one_request():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = dataclasses.replace(
        provider_relation(),
        local_app_data={"version": '"0"', "requests": '[{"id":"a"},{"id":"b"}]'},
    )
    with ctx(ctx.on.update_status(), testing.State(leader=True, relations={relation})) as m:
        m.charm.vm_host.withdraw("a")
        out = m.run()
    assert [r.id for r in requests_from(out.get_relation(relation.id))] == ["b"]


def test_non_leader_cannot_request_or_withdraw():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = provider_relation()
    with ctx(ctx.on.update_status(), testing.State(leader=False, relations={relation})) as m:
        with pytest.raises(NotLeaderError, match="is_leader"):
            m.charm.vm_host.request_vms([VmRequest(id="a")])
        with pytest.raises(NotLeaderError):
            m.charm.vm_host.withdraw("a")
        with pytest.raises(NotLeaderError):
            _ = m.charm.vm_host.requests
        out = m.run()
    assert out.get_relation(relation.id).local_app_data == {}


def test_request_vms_refuses_bad_input_and_writes_nothing():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = provider_relation()
    with ctx(ctx.on.update_status(), testing.State(leader=True, relations={relation})) as m:
        with pytest.raises(pydantic.ValidationError, match="fabric"):
            m.charm.vm_host.request_vms([{"id": "a", "interfaces": "eth0:fabric=x"}])
        with pytest.raises(pydantic.ValidationError, match="repeated"):
            m.charm.vm_host.request_vms([{"id": "a"}, {"id": "a"}])
        out = m.run()
    assert out.get_relation(relation.id).local_app_data == {}


def test_vms_gathers_answers_from_every_unit_and_picks_the_best():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = provider_relation(
        {
            0: [VmAnswer(id="db-0", state="failed", error="moved"), {"id": "a", "state": "x"}],
            1: [VmAnswer(id="db-0", state="running"), VmAnswer(id="web-0", state="pending")],
            2: [],
        },
        remote_app_name="hosts",
    )
    with ctx(ctx.on.update_status(), testing.State(relations={relation})) as m:
        vms = m.charm.vm_host.vms
        best = m.charm.vm_host.vm("db-0")
        missing = m.charm.vm_host.vm("nope")
        m.run()
    assert [(vm.id, vm.unit, vm.state) for vm in vms] == [
        ("db-0", "hosts/0", "failed"),
        ("db-0", "hosts/1", "running"),
        ("web-0", "hosts/1", "pending"),
    ]
    assert all(vm.relation_id == relation.id for vm in vms)
    assert best is not None
    assert best.unit == "hosts/1"
    assert missing is None


def _vm_events(ctx: testing.Context[Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for event in ctx.emitted_events:
        if isinstance(event, VmReadyEvent):
            found.append(("ready", event.vm.id))
        elif isinstance(event, VmFailedEvent):
            found.append(("failed", event.vm.id))
        elif isinstance(event, VmRemovedEvent):
            found.append(("removed", event.vm_id))
    return found


def test_events_follow_what_the_provider_publishes():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = provider_relation(
        {
            0: [
                VmAnswer(id="db-0", state="running"),
                VmAnswer(id="db-1", state="failed", error="no 1G pages left"),
                VmAnswer(id="web-0", state="pending"),
            ]
        }
    )
    out = ctx.run(
        ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation})
    )
    assert _vm_events(ctx) == [("ready", "db-0"), ("failed", "db-1")]
    ready = next(e for e in ctx.emitted_events if isinstance(e, VmReadyEvent))
    failed = next(e for e in ctx.emitted_events if isinstance(e, VmFailedEvent))
    assert isinstance(ready.vm, HostedVm)
    assert ready.vm.unit == "vm-host/0"
    assert failed.vm.error == "no 1G pages left"
    seen = out.get_relation(relation.id).local_unit_data[lib.SEEN_KEY]
    assert json.loads(seen) == {"db-0": "running", "db-1": "failed", "web-0": "pending"}

    # Nothing changed: no events.
    ctx.emitted_events.clear()
    again = out.get_relation(relation.id)
    out = ctx.run(ctx.on.relation_changed(again, remote_unit=0), out)
    assert _vm_events(ctx) == []

    # web-0 comes up, db-0 is withdrawn and gone, db-1 still failed.
    ctx.emitted_events.clear()
    later = dataclasses.replace(
        out.get_relation(relation.id),
        remote_units_data=provider_relation(
            {
                0: [
                    VmAnswer(id="db-1", state="failed", error="no 1G pages left"),
                    VmAnswer(id="web-0", state="running"),
                ]
            }
        ).remote_units_data,
    )
    out = ctx.run(
        ctx.on.relation_changed(later, remote_unit=0), dataclasses.replace(out, relations={later})
    )
    assert _vm_events(ctx) == [("ready", "web-0"), ("removed", "db-0")]

    # The relation goes away: everything left is removed.
    ctx.emitted_events.clear()
    final = out.get_relation(relation.id)
    ctx.run(ctx.on.relation_broken(final), out)
    assert _vm_events(ctx) == [("removed", "db-1"), ("removed", "web-0")]


def test_departing_host_unit_removes_its_vms():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = provider_relation(
        {0: [VmAnswer(id="a", state="running")], 1: [VmAnswer(id="b", state="running")]},
        local_unit_data={lib.SEEN_KEY: '{"a":"running","b":"running"}'},
    )
    gone = dataclasses.replace(relation, remote_units_data={0: relation.remote_units_data[0]})
    ctx.run(
        ctx.on.relation_departed(gone, remote_unit=1, departing_unit=1),
        testing.State(relations={gone}),
    )
    assert _vm_events(ctx) == [("removed", "b")]


def test_unreadable_snapshot_is_reset_not_fatal():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = provider_relation(
        {0: [VmAnswer(id="a", state="running")]}, local_unit_data={lib.SEEN_KEY: "[oops"}
    )
    out = ctx.run(
        ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation})
    )
    assert _vm_events(ctx) == [("ready", "a")]
    assert out.get_relation(relation.id).local_unit_data[lib.SEEN_KEY] == '{"a":"running"}'


def test_bad_provider_data_is_skipped_and_the_hook_goes_on():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = testing.Relation(
        "vm-host",
        remote_app_name="vm-host",
        remote_units_data={
            0: {"vms": "this is not json"},
            1: {"version": '"0"', "vms": '[{"id":"ok","state":"running"},{"id":"x"}]'},
        },
    )
    ctx.run(ctx.on.relation_changed(relation, remote_unit=1), testing.State(relations={relation}))
    assert _vm_events(ctx) == [("ready", "ok")]


def test_vm_event_payload_survives_a_snapshot():
    ctx = testing.Context(Requester, meta=REQUIRER_META)
    relation = provider_relation({0: [VmAnswer(id="a", state="running")]})
    ctx.run(ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation}))
    ready = next(e for e in ctx.emitted_events if isinstance(e, VmReadyEvent))
    snapshot = ready.snapshot()
    assert json.loads(snapshot["payload"])["id"] == "a"
    assert snapshot["relation_id"] == relation.id


def test_testing_helpers_build_the_wire_format():
    relation = requirer_relation([VmRequest(id="b"), {"id": "a", "cores": 2}], relation_id=42)
    assert relation.id == 42
    assert relation.endpoint == "vms"
    assert relation.remote_app_name == "consumer"
    assert json.loads(relation.remote_app_data["requests"]) == [
        {"id": "b", "ssh-public-keys": [], "tags": []},
        {"id": "a", "cores": 2},
    ]
    host = provider_relation({3: [VmAnswer(id="a", state="pending")]})
    assert host.endpoint == "vm-host"
    assert json.loads(host.remote_units_data[3]["vms"]) == [
        {"id": "a", "interfaces": [], "state": "pending", "tags": []}
    ]
    with pytest.raises(ValueError, match="id"):
        requests_from(testing.Relation("vm-host", local_app_data=bag([{"id": "BAD"}])))
    with pytest.raises(ValueError, match="state"):
        answers_from(testing.Relation("vms", local_unit_data={"vms": '[{"id":"a"}]'}))


def test_normalised_request_is_what_the_workload_parser_takes():
    """The provider hands library output to vmhost.constraints; both must read it alike."""
    from vmhost import constraints
    from vmhost.model import DiskSpec, HugepageRequest, InterfaceMode, InterfaceSpec

    (request,), _ = parse_requests(
        bag(
            [
                {
                    "id": "db-0",
                    "cores": 4,
                    "memory": 8192,
                    "pinned-cores": [2, 3, 14, 15],
                    "hugepages": "1G",
                    "storage": "root:40(ssd),data:200",
                    "interfaces": (
                        "eth0:space=oam;data:vid=100,mode=sriov,parent=enp5s0f0,numa_strict=true;"
                        "pub:ip=10.0.5.20,subnet_cidr=10.0.5.0/24"
                    ),
                }
            ]
        )
    )
    wire = request.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec = constraints.build_spec(
        name="vmhost-consumer-db-0",
        request_id=wire["id"],
        cores=wire["cores"],
        memory_mib=wire["memory"],
        pinned_cores=wire["pinned-cores"],
        hugepages=wire["hugepages"],
        storage=wire["storage"],
        interfaces=wire["interfaces"],
    )
    assert spec.pinned_cpus == (2, 3, 14, 15)
    assert spec.hugepages is HugepageRequest.P1G
    assert spec.disks == (
        DiskSpec(label="root", size_gb=40, pool="ssd"),
        DiskSpec(label="data", size_gb=200),
    )
    assert spec.interfaces == (
        InterfaceSpec(label="eth0", space="oam"),
        InterfaceSpec(
            label="data",
            vlan=100,
            mode=InterfaceMode.SRIOV,
            parent="enp5s0f0",
            numa_strict=True,
        ),
        InterfaceSpec(label="pub", ip="10.0.5.20", subnet="10.0.5.0/24"),
    )


# ---------------------------------------------------------------------------------------------
# Hostile databags: bounded work, no exceptions, nothing echoed at length

DEEP = "[" * 2000 + "]" * 2000


@pytest.mark.parametrize("key", ["requests", "version"])
def test_deeply_nested_json_is_an_invalid_databag_not_a_recursion_error(key: str):
    valid, invalid = lib.parse_requests({key: DEEP})
    assert valid == []
    assert [bad.index for bad in invalid] == [None]
    assert "nested too deeply" in invalid[0].reason


def test_deeply_nested_answers_and_snapshot_are_skipped():
    answers, problems = lib.parse_answers({"vms": DEEP})
    assert answers == []
    assert problems
    assert "nested too deeply" in problems[0]
    assert lib._load_seen(DEEP, 3) == {}


def test_an_oversized_databag_value_is_refused_before_decoding():
    valid, invalid = lib.parse_requests({"requests": "[" + " " * (5 << 20) + "]"})
    assert valid == []
    assert "longer than" in invalid[0].reason


def test_requests_beyond_the_cap_are_invalid_and_keep_their_ids():
    many = [{"id": f"r-{i}", "memory": 512} for i in range(lib.MAX_REQUESTS + 2)]
    valid, invalid = lib.parse_requests({"requests": json.dumps(many)})
    assert len(valid) == lib.MAX_REQUESTS
    assert [bad.id for bad in invalid] == [f"r-{lib.MAX_REQUESTS}", f"r-{lib.MAX_REQUESTS + 1}"]
    assert all("at most" in bad.reason for bad in invalid)


def test_an_id_with_a_trailing_newline_is_not_usable():
    _, invalid = lib.parse_requests({"requests": json.dumps([{"id": "db-0\n", "cores": 1}])})
    assert invalid[0].id is None


def test_a_huge_bad_value_is_not_echoed_in_the_reason():
    huge = "x" * 200_000
    _, invalid = lib.parse_requests({"requests": json.dumps([{"id": "a", "storage": huge}])})
    _, invalid_if = lib.parse_requests(
        {"requests": json.dumps([{"id": "b", "interfaces": "eth0:" + huge}])}
    )
    assert len(invalid[0].reason) < 300
    assert len(invalid_if[0].reason) < 300


@pytest.mark.parametrize(
    ("hostname", "ok"),
    [
        ("db-0", True),
        ("DB-0.Example.com", True),
        ("db-0.example.com.", True),
        ("-db", False),
        ("db_0", False),
        ("a" * 64, False),
        (".".join(["abcdefgh"] * 29), False),
        ("db 0", False),
    ],
)
def test_hostname_is_a_request_field_checked_by_syntax(hostname, ok):
    valid, invalid = parse_requests(bag([{"id": "db-0", "memory": 512, "hostname": hostname}]))
    if ok:
        assert [r.hostname for r in valid] == [hostname]
    else:
        assert not valid
        assert "hostname" in invalid[0].reason


def test_bad_remote_values_log_one_short_line_each(caplog: pytest.LogCaptureFixture):
    """An id with a newline or a 200 kB value can neither split nor flood a log line."""
    ctx = testing.Context(HolisticProvider, meta=PROVIDER_META)
    relation = testing.Relation(
        "vms",
        remote_app_name="consumer",
        remote_app_data={
            "version": '"0"',
            "requests": json.dumps(
                [{"id": "db-0\nFAKE log line", "cores": 1}, {"id": "a", "storage": "x" * 200_000}]
            ),
        },
    )
    with caplog.at_level("WARNING", logger=lib.__name__):
        ctx.run(ctx.on.relation_changed(relation), testing.State(relations={relation}))
    lines = [r.getMessage() for r in caplog.records if r.name == lib.__name__]
    assert len(lines) == 2
    for line in lines:
        assert "\n" not in line
        assert len(line) < 600
    assert "(id None)" in lines[0]  # an id that is not one is never echoed

"""Hostile remote data, fuzzed: every endpoint's databags and the peer data, on both sides.

Each example is one hook in ops.testing with databags a hostile or broken remote could write:
valid documents with one value replaced (wrong types, huge numbers, deep nesting, long or
multi-line strings), and raw text that is not JSON at all. The property: the hook never raises,
the status it leaves is a real one (active, blocked, waiting or maintenance), and it finishes in
bounded time. CI (CI set) runs at least 500 examples per endpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ops
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from ops import testing
from test_consumer_charm import CONFIG as CONSUMER_CONFIG
from test_consumer_charm import META as CONSUMER_META
from test_consumer_charm import VmConsumerCharm

import charm
import charms.vm_host.v0.vm_host as vm_lib
import charms.vm_host.v0.vm_host_access as access_lib
from conftest import install_fake_host, make_layout, make_topology
from credentials import ed25519_public_key, self_signed_pem
from fake_backend import FakeBackend
from fake_lxd import FakeLxd, serving
from vmhost.model import CellPlacement, Placement
from vmhost.relation import fleet
from vmhost.relation.keys import RequestKey

EXAMPLES = 500 if os.environ.get("CI") else 60
HOOK_SECONDS = 10.0
"""A generous bound: a hook on fuzzed data took 36 s before list checks were made linear."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)

TOPOLOGY = make_topology()
KEY = ed25519_public_key()
PEM = self_signed_pem("fuzz")

# ---------------------------------------------------------------------------------------------
# Strategies: hostile JSON values, raw databag text, and valid documents with one value swapped

_SPECIAL_STRINGS = [
    "db-0\n",
    "0-4294967295",
    "0-65535,0-65535",
    "root:99999999999999(ssd)",
    "eth0:bridge=br-mgmt",
    "eth0:space=oam;" * 100,
    "\x00",
    "\ud800",
    "",
]
_SPECIAL_NUMBERS = [0, -1, 1 << 31, 1 << 64, 4294967295, 10**400]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from(_SPECIAL_NUMBERS),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(_SPECIAL_STRINGS),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=25,
)


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


deep_values = st.integers(min_value=500, max_value=5000).map(_deep)
hostile_values = st.one_of(json_values, deep_values)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found.extend(_paths(value, (*prefix, i)))
    return found


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """The document with the value at path replaced (unchanged when path no longer exists)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict) and head in doc:
        return {**doc, head: _replace(doc[head], rest, value)}
    if isinstance(doc, list) and isinstance(head, int) and head < len(doc):
        copy = list(doc)
        copy[head] = _replace(doc[head], rest, value)
        return copy
    return doc


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> Any:
    """The document with up to three values (or whole subtrees) replaced by hostile ones."""
    paths = _paths(doc)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        doc = _replace(doc, draw(st.sampled_from(paths)), draw(hostile_values))
    return doc


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value)
    except (RecursionError, ValueError):
        return "[" * 100000


def raw_text(doc: Any) -> st.SearchStrategy[str]:
    """What a databag value can hold: the mutated JSON document, or any text at all."""
    return st.one_of(
        mutated(doc).map(_dumps),
        mutated(doc).map(_dumps),
        st.text(max_size=200),
        st.integers(min_value=1, max_value=200000).map(lambda n: "[" * n),
        st.sampled_from(['"0"', '"1"', "null", "{}", "[]"]),
        st.integers(min_value=1000, max_value=300000).map(lambda n: '"' + "x" * n + '"'),
    )


def absent_or(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), strategy)


def databag(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Running one hook and checking the property

GOOD_STATUSES = (
    testing.ActiveStatus,
    testing.BlockedStatus,
    testing.WaitingStatus,
    testing.MaintenanceStatus,
)


@contextmanager
def vm_host_ctx() -> Iterator[tuple[testing.Context[charm.VmHostCharm], FakeBackend]]:
    """A fresh vm-host charm with the in-memory backend and host, and a layout of its own.

    The access code runs for real against the example's own temporary home; backend=lxd
    examples reach a fake LXD on the layout's socket, never this machine's (they would set its
    core.https_address to ops.testing's 192.0.2.0 bind address).
    """
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as root:
        backend = FakeBackend(host=TOPOLOGY)
        mp.setattr(charm, "make_backend", lambda config, layout=None: backend)
        layout = make_layout(Path(root))
        mp.setattr(charm.VmHostCharm, "layout", layout)
        lxd = FakeLxd(PEM)
        lxd.projects["vm-host"] = {"name": "vm-host"}
        install_fake_host(mp)
        assert layout.lxd_socket is not None
        with serving(lxd, layout.lxd_socket):
            yield testing.Context(charm.VmHostCharm), backend


def run_hook(ctx: testing.Context[Any], event: Any, state: testing.State) -> testing.State:
    started = time.monotonic()
    out = ctx.run(event, state)
    elapsed = time.monotonic() - started
    assert elapsed < HOOK_SECONDS, f"hook took {elapsed:.1f} s"
    return out


def assert_status(out: testing.State) -> None:
    assert isinstance(out.unit_status, GOOD_STATUSES), out.unit_status


# ---------------------------------------------------------------------------------------------
# The vms endpoint, provider side (vm-host reads requests)

VALID_REQUESTS = [
    {"id": "db-0", "cores": 2, "memory": 1024, "pinned-cores": [2, 3]},
    {
        "id": "web-0",
        "cores": 1,
        "memory": 512,
        "storage": "root:8(default),data:1",
        "interfaces": "eth0:space=oam",
        "tags": ["web"],
        "ssh-public-keys": [KEY],
        "hugepages": "2M",
    },
    {
        "id": "cache-0",
        "pinned-cores": 2,
        "numa-nodes": 1,
        "storage": [{"label": "root", "size-gb": 4}],
        "interfaces": [{"label": "eth0", "mode": "bridge", "vlan": 10}],
        "host": "far-host",
    },
]


@FUZZ
@given(
    version=absent_or(raw_text("0")),
    requests=absent_or(raw_text(VALID_REQUESTS)),
    leader=st.booleans(),
    broken=st.booleans(),
)
def test_fuzz_vms_provider(version: str | None, requests: str | None, leader: bool, broken: bool):
    relation = testing.Relation(
        "vms",
        interface="vm_host",
        remote_app_name="pg",
        remote_app_data=databag(version=version, requests=requests),
        remote_units_data={0: {}},
    )
    with vm_host_ctx() as (ctx, _):
        state = testing.State(leader=leader, relations={relation})
        out = run_hook(ctx, ctx.on.relation_changed(relation), state)
        assert_status(out)
        answers = out.get_relation(relation.id).local_unit_data.get("vms", "[]")
        for answer in json.loads(answers):
            assert len(answer.get("error") or "") <= 2048
        if broken:
            after = out.get_relation(relation.id)
            assert_status(run_hook(ctx, ctx.on.relation_broken(after), out))


# ---------------------------------------------------------------------------------------------
# The access endpoint, provider side (vm-host reads keys and certificates)


@FUZZ
@given(
    key=absent_or(raw_text(KEY)),
    certificate=absent_or(raw_text(PEM)),
    projects=absent_or(raw_text(["maas", "default"])),
    config=st.sampled_from([{}, {"backend": "lxd"}]),
)
def test_fuzz_access_provider(
    key: str | None, certificate: str | None, projects: str | None, config: dict[str, str]
):
    relation = access_lib.requirer_relation(
        {0: databag(**{"ssh-public-key": key, "certificate": certificate, "projects": projects})}
    )
    with vm_host_ctx() as (ctx, _):
        state = testing.State(leader=True, relations={relation}, config=config)
        out = run_hook(ctx, ctx.on.relation_changed(relation, remote_unit=0), state)
        assert_status(out)


# ---------------------------------------------------------------------------------------------
# The peer relation (host reports and the leader's assignment)

ELSEWHERE = Placement(
    vcpus=2,
    memory_mib=1024,
    cells=(CellPlacement(host_node=0, vcpus=2, memory_mib=1024, cpus=(4, 5)),),
)
REPORT = json.loads(
    fleet.host_report(
        TOPOLOGY,
        [ELSEWHERE],
        hostname="far-host",
        composed=frozenset({RequestKey(9, "pg", "old-0")}),
    )
)
ASSIGNMENT = {
    "version": "0",
    "assigned": [[9, "pg", "db-0", "vm-host/1"], [9, "pg", "web-0", "vm-host/0"]],
    "unplaced": [[9, "pg", "cache-0", "no host has room"]],
    "left": [[9, "pg", "old-1", "vm-host/2", ""]],
}
COMPOSED = {"version": "0", "composed": [[9, "pg", "db-0", "vm-host/1"]]}


@FUZZ
@given(
    report=absent_or(raw_text(REPORT)),
    assignment=absent_or(raw_text(ASSIGNMENT)),
    composed=absent_or(raw_text(COMPOSED)),
    leader=st.booleans(),
    departed=st.booleans(),
)
def test_fuzz_peer_data(
    report: str | None,
    assignment: str | None,
    composed: str | None,
    leader: bool,
    departed: bool,
):
    peer = testing.PeerRelation(
        "hosts",
        id=100,
        peers_data={1: databag(report=report)},
        local_app_data=databag(assignment=assignment, composed=composed),
    )
    old = {"id": "old-0", "memory": 256}
    vms = vm_lib.requirer_relation([*VALID_REQUESTS[:2], old], remote_app_name="pg", relation_id=9)
    with vm_host_ctx() as (ctx, backend):
        state = testing.State(leader=leader, relations={peer, vms})
        event = (
            ctx.on.relation_departed(peer, remote_unit=1, departing_unit=1)
            if departed
            else ctx.on.relation_changed(peer, remote_unit=1)
        )
        out = run_hook(ctx, event, state)
        assert_status(out)
        # However garbled the rest is, no unit composes a request another readable report
        # lists as composed (REPORT says vm-host/1 hosts old-0).
        parsed, _ = fleet.parse_host_report(report)
        if parsed is not None and RequestKey(9, "pg", "old-0") in parsed.composed:
            assert "pg-9-old-0" not in backend.vms


# ---------------------------------------------------------------------------------------------
# The vms endpoint, requirer side (a consumer reads vm-host's answers)

VALID_ANSWERS = [
    {
        "id": "db-0",
        "name": "pg-9-db-0",
        "state": "running",
        "uuid": "0b8c3c1e-4e09-4b6f-9d0e-7f1f5d1c2a3b",
        "interfaces": [{"label": "eth0", "mac": "52:54:00:12:34:56", "attached-to": "br0"}],
        "placement": {"numa-nodes": [0], "cpus": [2, 3], "hugepages": "2M"},
        "power": {"type": "virsh", "address": "qemu+ssh://virsh@10.0.0.5/system", "id": "x"},
    },
    {"id": "web-0", "state": "failed", "error": "no room"},
]


@FUZZ
@given(
    version=absent_or(raw_text("0")),
    vms=absent_or(raw_text(VALID_ANSWERS)),
    seen=absent_or(raw_text({"db-0": "pending", "gone-0": "running"})),
)
def test_fuzz_vms_requirer(version: str | None, vms: str | None, seen: str | None):
    relation = testing.Relation(
        "vm-host",
        interface="vm_host",
        remote_app_name="vm-host",
        remote_units_data={0: databag(version=version, vms=vms)},
        local_unit_data=databag(**{vm_lib.SEEN_KEY: seen}),
    )
    ctx = testing.Context(VmConsumerCharm, meta=CONSUMER_META, config=CONSUMER_CONFIG)
    state = testing.State(leader=True, relations={relation})
    out = run_hook(ctx, ctx.on.relation_changed(relation, remote_unit=0), state)
    assert_status(out)


# ---------------------------------------------------------------------------------------------
# The access endpoint, requirer side (a manager reads what vm-host publishes)

ACCESS_META = {"name": "manager", "requires": {"vm-host-access": {"interface": "vm_host_access"}}}


class ManagerCharm(ops.CharmBase):
    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self.vm_hosts = access_lib.VmHostAccessRequirer(self)
        framework.observe(self.vm_hosts.on.access_changed, self._on_access_changed)

    def _on_access_changed(self, _event: ops.EventBase) -> None:
        hosts = self.vm_hosts.access
        self.unit.status = ops.ActiveStatus(f"{len(hosts)} hosts")


PUBLISHED = json.loads(
    json.dumps(
        {
            "version": "0",
            "backend": "libvirt",
            "uri": "qemu+ssh://virsh@10.0.0.5/system",
            "ssh-host-keys": [KEY],
            "url": "https://10.0.0.5:8443",
            "server-certificate": PEM,
            "project": "vm-host",
        }
    )
)


@FUZZ
@given(doc=mutated(PUBLISHED), raw=st.dictionaries(st.sampled_from(sorted(PUBLISHED)), st.text()))
def test_fuzz_access_requirer(doc: Any, raw: dict[str, str]):
    data = (
        {k: _dumps(v) for k, v in doc.items()}
        if isinstance(doc, dict)
        else {"backend": _dumps(doc)}
    )
    data.update(raw)
    relation = testing.Relation(
        "vm-host-access",
        interface="vm_host_access",
        remote_app_name="vm-host",
        remote_units_data={0: data},
    )
    ctx = testing.Context(ManagerCharm, meta=ACCESS_META)
    out = run_hook(
        ctx, ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation})
    )
    assert isinstance(out.unit_status, testing.ActiveStatus), out.unit_status

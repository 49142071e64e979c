"""The vm_host_access library: schema vectors and ops.testing round trips for both sides."""

from __future__ import annotations

import json

import ops
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from ops import testing
from pydantic import ValidationError

from charms.vm_host.v0 import vm_host_access as lib
from credentials import self_signed_pem

KEY = (
    ed25519.Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode()
)


PEM = self_signed_pem("maas")
LIBVIRT_INFO = lib.AccessInfo(
    backend="libvirt",
    uri="qemu+ssh://virsh@10.0.0.5/system",
    ssh_host_keys=[KEY],
)
LXD_INFO = lib.AccessInfo(
    backend="lxd",
    url="https://10.0.0.5:8443",
    server_certificate=PEM,
    project="vm-host",
)


# ---------------------------------------------------------------------------------------------
# Schema


def test_library_metadata():
    assert len(lib.LIBID) == 32
    assert lib.LIBAPI == 0
    assert lib.LIBPATCH >= 1
    assert lib.PYDEPS


def test_requirer_data_accepts_a_key_and_drops_its_comment():
    data = lib.RequirerUnitData.model_validate({"ssh-public-key": KEY + " me@laptop"})

    assert data.ssh_public_key == KEY


def test_requirer_data_sorts_and_dedupes_projects():
    data = lib.RequirerUnitData.model_validate(
        {"certificate": PEM, "projects": ["maas", "alpha", "maas"]}
    )

    assert data.projects == ["alpha", "maas"]
    assert data.certificate == PEM.strip() + "\n"


def test_unknown_fields_are_ignored():
    data = lib.RequirerUnitData.model_validate({"ssh-public-key": KEY, "colour": "blue"})

    assert data.ssh_public_key == KEY


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"ssh-public-key": "ssh-dss AAAA"}, "unknown key type"),
        ({"ssh-public-key": f'command="sh" {KEY}'}, "options"),
        ({"ssh-public-key": f"{KEY}\n{KEY}"}, "one line"),
        ({"ssh-public-key": "ssh-ed25519 !!!"}, "not valid base64"),
        ({"ssh-public-key": "ssh-rsa " + KEY.split()[1]}, "not a ssh-rsa key"),
        ({"certificate": "hello"}, "exactly one PEM certificate"),
        ({"certificate": PEM + PEM}, "exactly one PEM certificate"),
        ({"certificate": PEM + "-----BEGIN PRIVATE KEY-----"}, "private key"),
        ({"projects": ["Bad_Name"]}, "not a valid LXD project name"),
        ({"projects": "maas"}, "list"),
    ],
)
def test_bad_requirer_data_is_refused_with_the_reason(data: dict, reason: str):
    with pytest.raises(ValidationError) as info:
        lib.RequirerUnitData.model_validate(data)

    assert reason in str(info.value)


def test_provider_data_round_trips_through_the_databag():
    bag = lib.provider_databag(LXD_INFO)

    assert json.loads(bag["version"]) == "0"
    assert json.loads(bag["backend"]) == "lxd"
    assert "uri" not in bag
    assert lib._load(lib.ProviderUnitData, bag) == LXD_INFO


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"uri": "ssh://x"}, "qemu+ssh://"),
        ({"url": "http://x:8443"}, "https://"),
        ({"backend": "xen"}, "backend"),
    ],
)
def test_bad_provider_data_is_refused(data: dict, reason: str):
    with pytest.raises(ValidationError) as info:
        lib.ProviderUnitData.model_validate(data)

    assert reason in str(info.value)


def test_non_json_values_are_reported_not_raised_as_decode_errors():
    with pytest.raises(ValueError, match="ssh-public-key: not JSON-encoded"):
        lib._load(lib.RequirerUnitData, {"ssh-public-key": KEY})


# ---------------------------------------------------------------------------------------------
# Provider side (a vm-host-like charm)

PROVIDER_META = {
    "name": "host",
    "provides": {"access": {"interface": "vm_host_access"}},
}


class ProviderCharm(ops.CharmBase):
    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self.access = lib.VmHostAccessProvider(self, relation_name="access")
        self.changes = 0
        framework.observe(self.access.on.clients_changed, self._on_clients_changed)

    def _on_clients_changed(self, _event: ops.EventBase) -> None:
        self.changes += 1
        self.access.sync(LIBVIRT_INFO)


def test_provider_reads_valid_clients_and_reports_invalid_ones():
    ctx = testing.Context(ProviderCharm, meta=PROVIDER_META)
    relation = lib.requirer_relation(
        {
            0: lib.requirer_databag(ssh_public_key=KEY + " laptop"),
            1: {"ssh-public-key": json.dumps("ssh-ed25519 !!!")},
            2: lib.requirer_databag(certificate=PEM, projects=["maas"]),
            3: {},
            4: {"ssh-public-key": "not json"},
        },
        relation_id=7,
        remote_app_name="maas",
    )

    with ctx(
        ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation})
    ) as mgr:
        clients = mgr.charm.access.clients
        invalid = mgr.charm.access.invalid_clients
        state = mgr.run()

    assert [(c.unit, c.source) for c in clients] == [
        ("maas/0", "relation:7:maas/0"),
        ("maas/2", "relation:7:maas/2"),
    ]
    assert clients[0].ssh_public_key == KEY
    assert clients[1].certificate == PEM.strip() + "\n"
    assert clients[1].projects == ("maas",)
    assert [(i.unit, i.relation_id) for i in invalid] == [("maas/1", 7), ("maas/4", 7)]
    assert "not valid base64" in invalid[0].reason
    assert "not JSON-encoded" in invalid[1].reason
    published = lib.published_from(state.get_relation(7))
    assert published == LIBVIRT_INFO


def test_provider_emits_clients_changed_on_departure_and_broken():
    ctx = testing.Context(ProviderCharm, meta=PROVIDER_META)
    relation = lib.requirer_relation({0: lib.requirer_databag(ssh_public_key=KEY)})
    state = testing.State(relations={relation})

    with ctx(ctx.on.relation_departed(relation, remote_unit=0), state) as mgr:
        mgr.run()
        assert mgr.charm.changes == 1
    with ctx(ctx.on.relation_broken(relation), state) as mgr:
        mgr.run()
        assert mgr.charm.changes == 1
        assert mgr.charm.access.clients == []


def test_provider_never_crashes_on_garbage():
    ctx = testing.Context(ProviderCharm, meta=PROVIDER_META)
    relation = lib.requirer_relation(
        {0: {"ssh-public-key": json.dumps(12), "certificate": json.dumps(["x"]), "projects": "{"}}
    )

    with ctx(
        ctx.on.relation_changed(relation, remote_unit=0), testing.State(relations={relation})
    ) as mgr:
        assert mgr.charm.access.clients == []
        assert len(mgr.charm.access.invalid_clients) == 1
        mgr.run()


# ---------------------------------------------------------------------------------------------
# Requirer side (a manager-like charm)

REQUIRER_META = {
    "name": "manager",
    "requires": {"vm-host-access": {"interface": "vm_host_access"}},
}


class RequirerCharm(ops.CharmBase):
    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self.vm_hosts = lib.VmHostAccessRequirer(self)
        self.seen: list[lib.HostAccess] = []
        framework.observe(self.vm_hosts.on.access_changed, self._on_access_changed)
        framework.observe(self.on["vm-host-access"].relation_joined, self._on_joined)

    def _on_joined(self, _event: ops.EventBase) -> None:
        self.vm_hosts.set_ssh_public_key(KEY + " manager@host")
        self.vm_hosts.set_certificate(PEM, ["maas"])

    def _on_access_changed(self, _event: ops.EventBase) -> None:
        self.seen = self.vm_hosts.access


def test_requirer_publishes_key_and_certificate():
    ctx = testing.Context(RequirerCharm, meta=REQUIRER_META)
    relation = lib.provider_relation()

    state = ctx.run(
        ctx.on.relation_joined(relation, remote_unit=0), testing.State(relations={relation})
    )

    asked = lib.requested_from(state.get_relation(relation.id))
    assert asked.ssh_public_key == KEY
    assert asked.certificate == PEM.strip() + "\n"
    assert asked.projects == ["maas"]


def test_requirer_withdraws_what_it_asked_for():
    ctx = testing.Context(RequirerCharm, meta=REQUIRER_META)
    relation = lib.provider_relation(
        local_unit_data=lib.requirer_databag(ssh_public_key=KEY, certificate=PEM, projects=["a"])
    )

    with ctx(ctx.on.update_status(), testing.State(relations={relation})) as mgr:
        mgr.charm.vm_hosts.set_ssh_public_key(None)
        mgr.charm.vm_hosts.set_certificate(None)
        state = mgr.run()

    bag = state.get_relation(relation.id).local_unit_data
    assert not any(bag.get(k) for k in ("ssh-public-key", "certificate", "projects"))


def test_requirer_refuses_a_bad_key_before_sending_it():
    ctx = testing.Context(RequirerCharm, meta=REQUIRER_META)
    relation = lib.provider_relation()

    with ctx(ctx.on.update_status(), testing.State(relations={relation})) as mgr:
        with pytest.raises(ValueError, match="options"):
            mgr.charm.vm_hosts.set_ssh_public_key(f"no-pty {KEY}")
        mgr.run()


def test_requirer_reads_each_hosts_access_and_skips_bad_ones():
    ctx = testing.Context(RequirerCharm, meta=REQUIRER_META)
    relation = lib.provider_relation({0: LIBVIRT_INFO, 1: LXD_INFO, 2: lib.AccessInfo()})
    bad = testing.Relation(
        "vm-host-access",
        interface="vm_host_access",
        remote_app_name="other",
        remote_units_data={0: {"backend": json.dumps("lxd"), "url": json.dumps("ftp://x")}},
    )

    state_in = testing.State(relations={relation, bad})
    with ctx(ctx.on.relation_changed(relation, remote_unit=1), state_in) as mgr:
        mgr.run()
        seen = mgr.charm.seen

    assert [(h.unit, h.backend) for h in seen] == [("vm-host/0", "libvirt"), ("vm-host/1", "lxd")]
    assert seen[0].uri == "qemu+ssh://virsh@10.0.0.5/system"
    assert seen[0].ssh_host_keys == (KEY,)
    assert seen[1].url == "https://10.0.0.5:8443"
    assert seen[1].server_certificate == PEM
    assert seen[1].project == "vm-host"


def test_requirer_relation_helper_takes_models_too():
    ctx = testing.Context(ProviderCharm, meta=PROVIDER_META)
    relation = lib.requirer_relation(
        {0: lib.RequirerUnitData(ssh_public_key=KEY, projects=["maas"])}, remote_app_name="tf"
    )

    with ctx(ctx.on.update_status(), testing.State(relations={relation})) as mgr:
        clients = mgr.charm.access.clients
        mgr.run()

    assert [(c.unit, c.ssh_public_key, c.projects) for c in clients] == [("tf/0", KEY, ("maas",))]


@pytest.mark.parametrize("key", ["ssh-public-key", "certificate", "projects"])
def test_deeply_nested_requirer_values_are_invalid_not_a_recursion_error(key: str):
    with pytest.raises(ValueError, match="nested too deeply"):
        lib._load(lib.RequirerUnitData, {key: "[" * 2000 + "]" * 2000})


def test_oversized_requirer_values_are_refused_before_decoding():
    with pytest.raises(ValueError, match="longer than"):
        lib._load(lib.RequirerUnitData, {"certificate": '"' + "A" * (2 << 20) + '"'})

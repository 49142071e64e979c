"""The charm with backend=lxd: same actions and relation, LXD trust for managers."""

from __future__ import annotations

from typing import ClassVar

import pytest
from ops import testing

import charm
import charms.vm_host.v0.vm_host_access as access_lib
from conftest import FakeHost
from credentials import self_signed_pem
from fake_backend import FakeBackend
from vmhost import lxd_trust

LXD = {"backend": "lxd"}


class FakeTrust:
    """LXD's trust store in memory."""

    certificates: ClassVar[dict[str, tuple[str, list[str]]]] = {}
    https: ClassVar[str | None] = None
    tokens: ClassVar[list[str]] = []

    def __init__(self, socket_path=None):
        pass

    def ensure_https(self, address, port=8443):
        type(self).https = f"{address}:{port}"
        return True

    def sync_relation_certificates(self, wanted):
        for name in [n for n in self.certificates if n.startswith("vm-host:relation")]:
            del self.certificates[name]
        for unit, (pem, projects) in wanted.items():
            self.certificates[f"vm-host:relation:{unit}"] = (pem, list(projects))
        return {}

    def server_certificate(self):
        return "-----BEGIN CERTIFICATE-----\nserver\n-----END CERTIFICATE-----\n"

    def trust_certificate(self, pem, name, projects):
        self.certificates[name] = (pem, list(projects))
        return True

    def trust_action_client(self, client, pem, projects):
        name = lxd_trust.action_certificate_name(client)
        self.trust_certificate(pem, name, projects)
        return name

    def untrust_action_client(self, client):
        name = lxd_trust.action_certificate_name(client)
        return name if self.untrust(name) else None

    def untrust(self, name):
        return self.certificates.pop(name, None) is not None

    def issue_trust_token(self, client_name, projects):
        self.tokens.append(client_name)
        return "eyJ0b2tlbiI6ICJzZWNyZXQifQ=="

    def remove_managed(self, prefix="vm-host:"):
        gone = [n for n in self.certificates if n.startswith(prefix)]
        for name in gone:
            del self.certificates[name]
        return gone


@pytest.fixture(autouse=True)
def fake_trust(monkeypatch: pytest.MonkeyPatch) -> type[FakeTrust]:
    FakeTrust.certificates = {}
    FakeTrust.https = None
    FakeTrust.tokens = []
    monkeypatch.setattr(charm, "make_trust", FakeTrust)
    return FakeTrust


def test_lxd_host_is_active_and_named(ctx, backend: FakeBackend, fake_host: FakeHost):
    backend.name = "lxd"
    out = ctx.run(ctx.on.install(), testing.State(config=LXD))
    assert "ensure_lxd:5.21/stable:True" in fake_host.calls
    assert "install" not in fake_host.calls  # no libvirt packages on an LXD host
    assert isinstance(out.unit_status, testing.ActiveStatus)
    assert out.unit_status.message.startswith("lxd ")


def test_lxd_not_running_is_waiting(ctx, backend, fake_host: FakeHost):
    fake_host.running = False
    backend.reachable = False
    out = ctx.run(ctx.on.config_changed(), testing.State(config=LXD))
    assert isinstance(out.unit_status, testing.WaitingStatus)
    assert "LXD" in out.unit_status.message


def test_related_manager_certificate_is_trusted_for_the_project_only(
    ctx, backend, fake_host, fake_trust
):
    pem = self_signed_pem("manager")
    relation = access_lib.requirer_relation(
        {0: access_lib.requirer_databag(certificate=pem, projects=["default"])}
    )
    state = testing.State(config=LXD, relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation, remote_unit=0), state)
    assert fake_trust.certificates == {"vm-host:relation:manager/0": (pem, ["vm-host"])}
    published = access_lib.published_from(out.get_relation(relation.id))
    assert published.backend == "lxd"
    assert published.url is not None
    assert published.url.endswith(":8443")
    assert published.project == "vm-host"
    assert testing.TCPPort(8443) in out.opened_ports

    ctx.run(ctx.on.relation_broken(relation), state)
    assert fake_trust.certificates == {}


def test_trust_actions(ctx, backend, fake_host, fake_trust):
    state = testing.State(config=LXD)
    ctx.run(
        ctx.on.action("add-trusted-client", params={"name": "maas", "certificate": "PEM"}), state
    )
    assert fake_trust.certificates == {"vm-host:maas": ("PEM", ["vm-host"])}
    ctx.run(ctx.on.action("get-trust-token", params={"name": "tf"}), state)
    assert (ctx.action_results or {})["token"] == "eyJ0b2tlbiI6ICJzZWNyZXQifQ=="
    ctx.run(ctx.on.action("remove-trusted-client", params={"name": "maas"}), state)
    assert fake_trust.certificates == {}
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(ctx.on.action("remove-trusted-client", params={"name": "maas"}), state)
    assert "no trusted client named 'maas'" in failed.value.message


def test_trust_actions_need_the_lxd_backend(ctx, backend, fake_host):
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(ctx.on.action("get-trust-token", params={"name": "tf"}), testing.State())
    assert "backend=lxd" in failed.value.message


def test_remove_untrusts_everything_vm_host_added(ctx, backend, fake_host, fake_trust):
    fake_trust.certificates = {"vm-host:maas": ("PEM", ["vm-host"]), "other": ("X", [])}
    ctx.run(ctx.on.remove(), testing.State(config=LXD))
    assert list(fake_trust.certificates) == ["other"]


def test_compose_on_lxd_answers_with_lxd_power(ctx, backend, fake_host):
    import charms.vm_host.v0.vm_host as vm_lib

    backend.name = "lxd"
    relation = vm_lib.requirer_relation([{"id": "db-0", "memory": 512}], remote_app_name="pg")
    state = testing.State(config=LXD, leader=True, relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation), state)
    (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
    assert answer.state == "running"
    assert answer.power is not None
    assert answer.power.type == "lxd"
    assert answer.power.address is not None
    assert answer.power.address.startswith("https://")

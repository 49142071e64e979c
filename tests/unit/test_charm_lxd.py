"""The charm with backend=lxd: same actions and relation, LXD trust for managers."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from ops import testing

import charms.vm_host.v0.vm_host_access as access_lib
from conftest import FakeHost
from credentials import self_signed_pem
from fake_backend import FakeBackend
from fake_lxd import FakeLxd, serving
from vmhost import lxd_trust
from vmhost.layout import HostLayout

LXD = {"backend": "lxd"}


@pytest.fixture(autouse=True)
def lxd(layout: HostLayout) -> Iterator[FakeLxd]:
    """LXD's API at the layout's socket, with vm-host's project as the backend made it."""
    fake = FakeLxd(self_signed_pem("lxd-server"))
    fake.projects["vm-host"] = {"name": "vm-host", "config": lxd_trust.PROJECT_FEATURES}
    assert layout.lxd_socket is not None
    with serving(fake, layout.lxd_socket):
        yield fake


def trusted(lxd: FakeLxd) -> dict[str, tuple[str, list[str], bool]]:
    """What LXD's trust store holds: name -> (certificate body, projects, restricted)."""
    return {
        c["name"]: (c.get("certificate", ""), list(c.get("projects") or []), c["restricted"])
        for c in lxd.certs.values()
    }


def body(pem: str) -> str:
    """The base64 DER LXD's API takes for a PEM certificate."""
    return "".join(line for line in pem.strip().splitlines() if not line.startswith("-----"))


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
    ctx, backend, fake_host, lxd: FakeLxd
):
    pem = self_signed_pem("manager")
    relation = access_lib.requirer_relation(
        {0: access_lib.requirer_databag(certificate=pem, projects=["default"])}
    )
    state = testing.State(config=LXD, relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation, remote_unit=0), state)
    assert trusted(lxd) == {"vm-host:manager/0": (body(pem), ["vm-host"], True)}
    assert lxd.config["core.https_address"].endswith(":8443")
    published = access_lib.published_from(out.get_relation(relation.id))
    assert published.backend == "lxd"
    assert published.url is not None
    assert published.url.endswith(":8443")
    assert published.project == "vm-host"
    assert testing.TCPPort(8443) in out.opened_ports

    ctx.run(ctx.on.relation_broken(relation), state)
    assert trusted(lxd) == {}


def test_trust_actions(ctx, backend, fake_host, lxd: FakeLxd):
    state = ctx.run(ctx.on.config_changed(), testing.State(config=LXD))  # LXD listens
    pem = self_signed_pem("maas")
    ctx.run(
        ctx.on.action("add-trusted-client", params={"name": "maas", "certificate": pem}), state
    )
    assert trusted(lxd) == {"vm-host:maas": (body(pem), ["vm-host"], True)}
    ctx.run(ctx.on.action("get-trust-token", params={"name": "tf"}), state)
    token = json.loads(base64.b64decode((ctx.action_results or {})["token"]))
    assert token["client_name"] == "vm-host:tf"
    (pending,) = lxd.operations.values()
    assert pending["metadata"]["request"]["projects"] == ["vm-host"]
    assert pending["metadata"]["request"]["restricted"] is True
    ctx.run(ctx.on.action("remove-trusted-client", params={"name": "maas"}), state)
    assert trusted(lxd) == {}
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(ctx.on.action("remove-trusted-client", params={"name": "maas"}), state)
    assert "no trusted client named 'maas'" in failed.value.message


def test_trust_actions_need_the_lxd_backend(ctx, backend, fake_host):
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(ctx.on.action("get-trust-token", params={"name": "tf"}), testing.State())
    assert "backend=lxd" in failed.value.message


def test_remove_untrusts_everything_vm_host_added(ctx, backend, fake_host, lxd: FakeLxd):
    for n, name in enumerate(("vm-host:maas", "vm-host:maas/0", "other")):
        fingerprint = f"{n:064x}"
        lxd.certs[fingerprint] = {"name": name, "fingerprint": fingerprint, "restricted": True}
    ctx.run(ctx.on.remove(), testing.State(config=LXD))
    assert list(trusted(lxd)) == ["other"]


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


def test_a_relation_round_keeps_the_clients_actions_added(ctx, backend, fake_host, lxd: FakeLxd):
    by_action = self_signed_pem("terraform")
    ctx.run(
        ctx.on.action("add-trusted-client", params={"name": "tf", "certificate": by_action}),
        testing.State(config=LXD),
    )
    relation = access_lib.requirer_relation(
        {0: access_lib.requirer_databag(certificate=self_signed_pem("manager"))}
    )
    state = testing.State(config=LXD, relations={relation})
    ctx.run(ctx.on.relation_changed(relation, remote_unit=0), state)
    assert sorted(trusted(lxd)) == ["vm-host:manager/0", "vm-host:tf"]
    ctx.run(ctx.on.relation_broken(relation), state)
    assert trusted(lxd) == {"vm-host:tf": (body(by_action), ["vm-host"], True)}

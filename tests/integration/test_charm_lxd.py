"""The charm (ops.testing) with backend=lxd against this machine's real LXD daemon.

This machine's kernel lacks vhost_vsock, so LXD refuses virtual machines outright; the charm
must say so and leave nothing behind. Everything before that is exercised for real: the
project and pool set-up, HTTPS on the access address, certificate trust by relation and by
action, trust tokens, and the status line read from the live daemon.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops import testing
from tests.integration import lxd_fixture
from tests.integration.lxd_fixture import HTTPS_PORT, make_client

import charm
import charms.vm_host.v0.vm_host_access as access_lib
from vmhost import host
from vmhost.lxd_trust import LxdTrust

lxd = lxd_fixture.lxd
PROJECT = "vmhost-test-charm"
LOOPBACK = testing.Network(
    "access",
    bind_addresses=[testing.BindAddress([testing.Address("127.0.0.1")])],
    ingress_addresses=["127.0.0.1"],
)


@pytest.fixture
def lxd_host(lxd: LxdTrust, tmp_path: Path) -> Iterator[LxdTrust]:
    """This machine recorded libvirt as its backend; lend it to LXD for one test."""
    saved = tmp_path / "backend"
    had_marker = host.BACKEND_MARKER.exists()
    if had_marker:
        shutil.copy2(host.BACKEND_MARKER, saved)
        host.BACKEND_MARKER.unlink()
    try:
        yield lxd
    finally:
        host.BACKEND_MARKER.unlink(missing_ok=True)
        if had_marker:
            shutil.copy2(saved, host.BACKEND_MARKER)
        lxd_fixture.cleanup(lxd)


@pytest.fixture
def ctx(charm_type: type[charm.VmHostCharm]) -> testing.Context[charm.VmHostCharm]:
    return testing.Context(charm_type)


def state(**kwargs) -> testing.State:
    config = {
        "backend": "lxd",
        "lxd-project": PROJECT,
        "default-storage-pool": "default",
        "https-port": HTTPS_PORT,
    }
    return testing.State(config=config, leader=True, networks={LOOPBACK}, **kwargs)


def test_reconcile_sets_up_project_and_reports_live_host(ctx, lxd_host: LxdTrust):
    out = ctx.run(ctx.on.config_changed(), state())
    assert isinstance(out.unit_status, testing.ActiveStatus), out.unit_status
    version = lxd_host.server_info()["environment"]["server_version"]
    assert out.unit_status.message.startswith(f"lxd {version}: 1 NUMA node")
    assert PROJECT in lxd_host.projects()
    assert lxd_host.https_address() == f"127.0.0.1:{HTTPS_PORT}"


def test_relation_certificate_is_trusted_for_the_project_then_removed(
    ctx, lxd_host: LxdTrust, tmp_path: Path
):
    client = make_client(tmp_path, "vmhost-test-manager", lxd_host)
    assert client.auth() == "untrusted"
    relation = access_lib.requirer_relation(
        {0: access_lib.requirer_databag(certificate=client.pem)}, relation_id=31
    )
    out = ctx.run(ctx.on.relation_changed(relation, remote_unit=0), state(relations={relation}))
    published = access_lib.published_from(out.get_relation(31))
    assert published.url == f"https://127.0.0.1:{HTTPS_PORT}"
    assert published.project == PROJECT
    assert published.server_certificate == lxd_host.server_certificate()
    assert client.auth() == "trusted"
    assert client.request("GET", f"/1.0/instances?project={PROJECT}").status_code == 200
    assert client.request("GET", "/1.0/instances?project=default").status_code == 403

    ctx.run(ctx.on.relation_broken(relation), state(relations={relation}))
    assert client.auth() == "untrusted"


def test_trust_token_lets_a_client_in_once(ctx, lxd_host: LxdTrust, tmp_path: Path):
    ctx.run(ctx.on.config_changed(), state())
    ctx.run(ctx.on.action("get-trust-token", params={"name": "vmhost-test-tf"}), state())
    token = (ctx.action_results or {})["token"]
    (tmp_path / "a").mkdir()
    first = make_client(tmp_path / "a", "vmhost-test-tf", lxd_host)
    body = {"type": "client", "password": token}
    assert first.request("POST", "/1.0/certificates", body).status_code in (200, 201)
    assert first.auth() == "trusted"
    (tmp_path / "b").mkdir()
    second = make_client(tmp_path / "b", "vmhost-test-tf2", lxd_host)
    assert second.request("POST", "/1.0/certificates", body).status_code >= 400
    assert second.auth() == "untrusted"


def test_compose_vm_is_refused_with_the_daemons_reason_and_leaves_nothing(
    ctx, lxd_host, test_bridge
):
    ctx.run(ctx.on.config_changed(), state())
    on_bridge = state()
    # No image: this test is about LXD refusing VMs, not about fetching one (no network here).
    on_bridge = dataclasses.replace(
        on_bridge, config={**on_bridge.config, "default-network": test_bridge, "default-image": ""}
    )
    before = lxd_host.request("GET", f"/1.0/instances?project={PROJECT}")
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(
            ctx.on.action(
                "compose-vm",
                params={"name": "vmhost-test-lxd-vm", "memory": 256, "storage": "root:1"},
            ),
            on_bridge,
        )
    message = failed.value.message
    if "vhost_vsock" not in message and "not supported" not in message:
        pytest.fail(f"unexpected refusal: {message}")
    assert "rolled back" in message
    assert lxd_host.request("GET", f"/1.0/instances?project={PROJECT}") == before

"""user-data, ssh-public-keys and hostname reach the VM the same way by action and relation."""

from __future__ import annotations

import pytest
from ops import testing

import charms.vm_host.v0.vm_host as vm_lib
from credentials import ed25519_public_key
from vmhost import cloudinit

pytestmark = pytest.mark.usefixtures("fake_host")

SCRIPT = "#!/bin/sh\necho ready\n"


def test_compose_vm_passes_user_data_keys_and_hostname(ctx, backend):
    keys = [ed25519_public_key() + " a@x", ed25519_public_key() + " b@x"]
    params = {
        "name": "web-0",
        "memory": 512,
        "user-data": SCRIPT,
        "ssh-public-keys": ", ".join(keys),
        "hostname": "web-0.example.com",
    }
    ctx.run(ctx.on.action("compose-vm", params=params), testing.State(leader=True))
    spec, _ = backend.composed["web-0"]
    assert spec.user_data == SCRIPT
    assert spec.ssh_public_keys == tuple(keys)
    assert spec.hostname == "web-0.example.com"
    text = cloudinit.user_data(spec)
    assert SCRIPT in text
    assert all(k in text for k in keys)
    assert "fqdn: web-0.example.com" in text


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"user-data": "just some text"}, "user-data: cloud-init would ignore"),
        ({"ssh-public-keys": "ssh-ed25519 AAAA"}, "ssh-public-keys:"),
        ({"hostname": "no_underscores"}, "hostname:"),
    ],
)
def test_compose_vm_refuses_bad_inputs_naming_the_field(ctx, backend, params, phrase):
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(
            ctx.on.action("compose-vm", params={"name": "web-0", "memory": 512, **params}),
            testing.State(leader=True),
        )
    assert phrase in failed.value.message
    assert "nothing done" in failed.value.message
    assert not backend.composed


def test_relation_request_passes_user_data_keys_and_hostname(ctx, backend):
    key = ed25519_public_key() + " db@x"
    request = {
        "id": "db-0",
        "memory": 512,
        "user-data": "#cloud-config\npackages: [postgresql]\n",
        "ssh-public-keys": [key],
        "hostname": "db-0",
    }
    relation = vm_lib.requirer_relation([request], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
    assert answer.state == "running"
    spec, _ = backend.composed[answer.name or ""]
    assert spec.hostname == "db-0"
    text = cloudinit.user_data(spec)
    assert "packages: [postgresql]" in text
    assert key in text
    assert "hostname: db-0" in text


def test_relation_request_with_ignored_user_data_fails_with_the_reason(ctx, backend):
    request = {"id": "db-0", "memory": 512, "user-data": "packages: [postgresql]\n"}
    relation = vm_lib.requirer_relation([request], remote_app_name="pg")
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
    assert answer.state == "failed"
    assert answer.error is not None
    assert "user-data: cloud-init would ignore" in answer.error
    assert not backend.composed

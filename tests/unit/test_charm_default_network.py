"""The default NIC through the charm: default-network, its refusal and its Blocked status."""

from __future__ import annotations

import pytest
from ops import testing

pytestmark = pytest.mark.usefixtures("fake_host")


def compose(ctx, config):
    ctx.run(
        ctx.on.action("compose-vm", params={"name": "web-0", "memory": 512}),
        testing.State(leader=True, config=config),
    )
    return ctx.action_results or {}


def test_a_vm_without_interfaces_gets_eth0_on_default_network(ctx, backend):
    compose(ctx, {"default-network": "br0"})
    _, nics = backend.composed["web-0"]
    assert [(n.label, n.source) for n in nics] == [("eth0", "br0")]


def test_without_a_default_network_compose_vm_is_refused_with_the_fix(ctx, backend):
    with pytest.raises(testing.ActionFailed) as failed:
        compose(ctx, {"default-network": ""})
    message = failed.value.message
    assert message.startswith("bad request, nothing done: interfaces: none requested")
    assert "juju config vm-host default-network=" in message
    assert "web-0" not in backend.vms


def test_the_one_mapped_space_is_the_default(ctx, backend):
    compose(ctx, {"default-network": "", "networks": "oam: {bridge: br0}"})
    _, nics = backend.composed["web-0"]
    assert [(n.label, n.source) for n in nics] == [("eth0", "br0")]


def test_a_default_network_that_names_nothing_here_blocks_with_the_fix(ctx, backend):
    out = ctx.run(ctx.on.update_status(), testing.State(config={"default-network": "br-nope"}))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "default-network 'br-nope' is not a space in networks" in out.unit_status.message


def test_a_default_network_that_is_no_name_is_invalid_config(ctx, backend):
    out = ctx.run(ctx.on.config_changed(), testing.State(config={"default-network": "a b/c"}))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "default-network" in out.unit_status.message

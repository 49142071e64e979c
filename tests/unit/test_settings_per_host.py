"""Per-host maps for reserved-cpus, hugepages and networks: {unit or hostname: value, "*": x}."""

from __future__ import annotations

import socket

import pytest
from ops import testing

from vmhost import settings
from vmhost.model import InvalidRequestError

pytestmark = pytest.mark.usefixtures("fake_host")

MAP = '{vm-host/0: "0-1", big-box: "0-3", "*": "0"}'


@pytest.mark.parametrize(
    ("unit", "hostname", "expected"),
    [
        ("vm-host/0", "big-box", "0-1"),  # the unit name wins over the hostname
        ("vm-host/1", "big-box", "0-3"),
        ("vm-host/2", "small", "0"),
    ],
)
def test_the_unit_then_the_hostname_then_the_default(unit, hostname, expected):
    assert settings.for_host("reserved-cpus", MAP, unit, hostname) == expected


@pytest.mark.parametrize("plain", ["", "0-1,24-25", "2M:1024,1G:4@0"])
def test_plain_values_are_used_on_every_host(plain):
    assert settings.for_host("hugepages", plain, "vm-host/0", "h") == plain


def test_a_plain_networks_mapping_is_not_a_per_host_map():
    plain = "oam: {bridge: br-oam}\ndata: {parent: bond0, mode: macvtap}"
    assert settings.for_host("networks", plain, "vm-host/0", "h") == plain


def test_a_per_host_networks_map_gives_this_hosts_mapping_as_yaml():
    text = '{vm-host/1: {oam: {bridge: br1}}, "*": {oam: {bridge: br0}}}'
    mine = settings.for_host("networks", text, "vm-host/1", "h")
    other = settings.for_host("networks", text, "vm-host/0", "h")
    assert "br1" in mine
    assert "br0" in other
    assert "br1" not in other


@pytest.mark.parametrize(
    ("option", "text", "field", "phrase"),
    [
        ("reserved-cpus", '{vm-host/0: "0-1"}', "reserved-cpus", 'needs a "*" entry'),
        ("reserved-cpus", '{vm-host/0: "0-", "*": ""}', "reserved-cpus[vm-host/0]", "cpu-list"),
        ("hugepages", '{"*": "3M:4"}', "hugepages[*]", "SIZE:COUNT"),
        ("hugepages", '{"*": [1, 2]}', "hugepages[*]", "must be text"),
        ("networks", '{"*": {oam: {colour: red}}}', "networks[*]", ""),
    ],
)
def test_a_bad_entry_is_refused_naming_the_option_and_entry(option, text, field, phrase):
    parse = {
        "reserved-cpus": settings.parse_reserved_cpus,
        "hugepages": settings.parse_hugepages_setting,
        "networks": __import__("vmhost.networks").networks.parse_networks_config,
    }[option]
    with pytest.raises(InvalidRequestError) as refused:
        settings.check_per_host(option, text, parse)
    assert refused.value.field == field
    assert phrase in str(refused.value)


def test_the_charm_uses_this_units_entry(ctx, backend, fake_host):
    hostname = socket.gethostname()
    config = {"reserved-cpus": f'{{vm-host/0: "0-3", {hostname}: "0-1", "*": ""}}'}
    out = ctx.run(ctx.on.config_changed(), testing.State(config=config))
    assert out.unit_status == testing.ActiveStatus(
        "libvirt 9.0.0: 2 NUMA nodes, 20/24 CPUs free, 0 VMs"
    )
    config = {"reserved-cpus": f'{{vm-host/9: "0-3", {hostname}: "0-1", "*": ""}}'}
    out = ctx.run(ctx.on.config_changed(), testing.State(config=config))
    assert out.unit_status == testing.ActiveStatus(
        "libvirt 9.0.0: 2 NUMA nodes, 22/24 CPUs free, 0 VMs"
    )


def test_the_charm_blocks_on_a_bad_entry_naming_it(ctx, backend, fake_host):
    config = {"hugepages": '{vm-host/3: "2M:x", "*": ""}'}
    out = ctx.run(ctx.on.config_changed(), testing.State(config=config))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "hugepages[vm-host/3]" in out.unit_status.message
    assert fake_host.calls == []


def test_allowed_host_interfaces_plain_and_per_host():
    from vmhost.config import CharmConfig

    assert CharmConfig.model_validate(
        {"allowed_host_interfaces": "br-data, eno2"}
    ).allowed_interfaces == {
        "br-data",
        "eno2",
    }
    per_host = CharmConfig.model_validate(
        {"allowed_host_interfaces": '{vm-host/1: "br1", "*": ""}'}
    )
    assert per_host.for_host("vm-host/1", "h").allowed_interfaces == {"br1"}
    assert per_host.for_host("vm-host/0", "h").allowed_interfaces == frozenset()


def test_the_charm_blocks_on_a_bad_allowed_host_interface(ctx, backend, fake_host):
    config = {"allowed-host-interfaces": "br0 ../etc"}
    out = ctx.run(ctx.on.config_changed(), testing.State(config=config))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert "allowed-host-interfaces" in out.unit_status.message
    assert fake_host.calls == []

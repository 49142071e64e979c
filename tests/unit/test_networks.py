"""Unit tests for vmhost.networks.

Sysfs discovery on fake trees, iproute2 JSON parsing on captured samples, the `networks` config
parser and every matching rule of resolve().
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import yaml
from fake_sysfs import FakeSys
from hypothesis import given, settings
from hypothesis import strategies as st

from vmhost import networks
from vmhost.constraints import guest_interface_name
from vmhost.model import (
    AttachmentKind,
    HostNic,
    InterfaceMode,
    InterfaceSpec,
    InvalidRequestError,
    NicAttachment,
    NicKind,
    VmHostError,
)
from vmhost.networks import (
    NetworkMapping,
    device_nodes,
    discover_nics,
    host_device,
    listed_nics,
    parse_ip_addr_json,
    parse_ip_link_json,
    parse_networks_config,
    ports_of,
    resolve,
    validate_ifname,
)

# ---------------------------------------------------------------------------------------------
# Captured iproute2 6.1 output (Debian 12), re-indented only. HOST_*: this build machine's
# `ip -j addr show`; NETNS_*: a namespace holding bridge vmhost-br-a (10.77.1.1/24) with port
# vmhost-v1, its veth peer vmhost-v0 (10.77.2.1/24) and macvlan vmhost-mv0 on vmhost-v0.

HOST_IP_ADDR_JSON = """\
[
 {
  "ifindex": 1,
  "ifname": "lo",
  "flags": [
   "LOOPBACK",
   "UP",
   "LOWER_UP"
  ],
  "mtu": 65536,
  "qdisc": "noqueue",
  "operstate": "UNKNOWN",
  "group": "default",
  "txqlen": 1000,
  "link_type": "loopback",
  "address": "00:00:00:00:00:00",
  "broadcast": "00:00:00:00:00:00",
  "addr_info": [
   {
    "family": "inet",
    "local": "127.0.0.1",
    "prefixlen": 8,
    "scope": "host",
    "label": "lo",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   },
   {
    "family": "inet6",
    "local": "::1",
    "prefixlen": 128,
    "scope": "host",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   }
  ]
 },
 {
  "ifindex": 2,
  "ifname": "ifb0",
  "flags": [
   "BROADCAST",
   "NOARP"
  ],
  "mtu": 1500,
  "qdisc": "noop",
  "operstate": "DOWN",
  "group": "default",
  "txqlen": 32,
  "link_type": "ether",
  "address": "1a:c6:9c:63:98:e0",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "addr_info": []
 },
 {
  "ifindex": 3,
  "ifname": "ifb1",
  "flags": [
   "BROADCAST",
   "NOARP"
  ],
  "mtu": 1500,
  "qdisc": "noop",
  "operstate": "DOWN",
  "group": "default",
  "txqlen": 32,
  "link_type": "ether",
  "address": "4a:09:de:ab:f2:95",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "addr_info": []
 },
 {
  "ifindex": 4,
  "ifname": "eth0",
  "flags": [
   "BROADCAST",
   "MULTICAST",
   "UP",
   "LOWER_UP"
  ],
  "mtu": 1400,
  "qdisc": "pfifo_fast",
  "operstate": "UP",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "02:fc:00:00:00:01",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "addr_info": [
   {
    "family": "inet",
    "local": "192.0.2.2",
    "prefixlen": 24,
    "broadcast": "192.0.2.255",
    "scope": "global",
    "label": "eth0",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   },
   {
    "family": "inet6",
    "local": "fd00::2",
    "prefixlen": 64,
    "scope": "global",
    "nodad": true,
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   },
   {
    "family": "inet6",
    "local": "fe80::fc:ff:fe00:1",
    "prefixlen": 64,
    "scope": "link",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   }
  ]
 }
]
"""


NETNS_IP_ADDR_JSON = """\
[
 {
  "ifindex": 1,
  "ifname": "lo",
  "flags": [
   "LOOPBACK"
  ],
  "mtu": 65536,
  "qdisc": "noop",
  "operstate": "DOWN",
  "group": "default",
  "txqlen": 1000,
  "link_type": "loopback",
  "address": "00:00:00:00:00:00",
  "broadcast": "00:00:00:00:00:00",
  "addr_info": []
 },
 {
  "ifindex": 2,
  "ifname": "vmhost-br-a",
  "flags": [
   "BROADCAST",
   "MULTICAST",
   "UP",
   "LOWER_UP"
  ],
  "mtu": 1500,
  "qdisc": "noqueue",
  "operstate": "UP",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "2e:bc:45:e4:98:63",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "addr_info": [
   {
    "family": "inet",
    "local": "10.77.1.1",
    "prefixlen": 24,
    "scope": "global",
    "label": "vmhost-br-a",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   },
   {
    "family": "inet6",
    "local": "fe80::2cbc:45ff:fee4:9863",
    "prefixlen": 64,
    "scope": "link",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   }
  ]
 },
 {
  "ifindex": 3,
  "link": "vmhost-v0",
  "ifname": "vmhost-v1",
  "flags": [
   "BROADCAST",
   "MULTICAST",
   "UP",
   "LOWER_UP"
  ],
  "mtu": 1500,
  "qdisc": "noqueue",
  "master": "vmhost-br-a",
  "operstate": "UP",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "2e:bc:45:e4:98:63",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "addr_info": [
   {
    "family": "inet6",
    "local": "fe80::2cbc:45ff:fee4:9863",
    "prefixlen": 64,
    "scope": "link",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   }
  ]
 },
 {
  "ifindex": 4,
  "link": "vmhost-v1",
  "ifname": "vmhost-v0",
  "flags": [
   "BROADCAST",
   "MULTICAST",
   "UP",
   "LOWER_UP"
  ],
  "mtu": 1500,
  "qdisc": "noqueue",
  "operstate": "UP",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "0a:31:60:fd:ab:6f",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "addr_info": [
   {
    "family": "inet",
    "local": "10.77.2.1",
    "prefixlen": 24,
    "scope": "global",
    "label": "vmhost-v0",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   },
   {
    "family": "inet6",
    "local": "fe80::831:60ff:fefd:ab6f",
    "prefixlen": 64,
    "scope": "link",
    "valid_life_time": 4294967295,
    "preferred_life_time": 4294967295
   }
  ]
 },
 {
  "ifindex": 5,
  "link": "vmhost-v0",
  "ifname": "vmhost-mv0",
  "flags": [
   "BROADCAST",
   "MULTICAST"
  ],
  "mtu": 1500,
  "qdisc": "noop",
  "operstate": "DOWN",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "06:30:42:77:d9:a1",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "addr_info": []
 }
]
"""


NETNS_IP_LINK_JSON = """\
[
 {
  "ifindex": 1,
  "ifname": "lo",
  "flags": [
   "LOOPBACK"
  ],
  "mtu": 65536,
  "qdisc": "noop",
  "operstate": "DOWN",
  "linkmode": "DEFAULT",
  "group": "default",
  "txqlen": 1000,
  "link_type": "loopback",
  "address": "00:00:00:00:00:00",
  "broadcast": "00:00:00:00:00:00",
  "promiscuity": 0,
  "allmulti": 0,
  "min_mtu": 0,
  "max_mtu": 0,
  "inet6_addr_gen_mode": "eui64",
  "num_tx_queues": 1,
  "num_rx_queues": 1,
  "gso_max_size": 65536,
  "gso_max_segs": 65535,
  "tso_max_size": 524280,
  "tso_max_segs": 65535,
  "gro_max_size": 65536
 },
 {
  "ifindex": 2,
  "ifname": "vmhost-br-a",
  "flags": [
   "BROADCAST",
   "MULTICAST",
   "UP",
   "LOWER_UP"
  ],
  "mtu": 1500,
  "qdisc": "noqueue",
  "operstate": "UP",
  "linkmode": "DEFAULT",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "2e:bc:45:e4:98:63",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "promiscuity": 0,
  "allmulti": 0,
  "min_mtu": 68,
  "max_mtu": 65535,
  "linkinfo": {
   "info_kind": "bridge",
   "info_data": {
    "forward_delay": 1500,
    "hello_time": 200,
    "max_age": 2000,
    "ageing_time": 30000,
    "stp_state": 0,
    "priority": 32768,
    "vlan_filtering": 0,
    "bridge_id": "8000.2e:bc:45:e4:98:63",
    "root_id": "8000.2e:bc:45:e4:98:63",
    "root_port": 0,
    "root_path_cost": 0,
    "topology_change": 0,
    "topology_change_detected": 0,
    "hello_timer": 0.0,
    "tcn_timer": 0.0,
    "topology_change_timer": 0.0,
    "gc_timer": 0.08,
    "group_fwd_mask": "0",
    "group_addr": "01:80:c2:00:00:00",
    "mcast_snooping": 1,
    "no_linklocal_learn": 0,
    "mcast_vlan_snooping": 0,
    "mcast_router": 1,
    "mcast_query_use_ifaddr": 0,
    "mcast_querier": 0,
    "mcast_hash_elasticity": 16,
    "mcast_hash_max": 4096,
    "mcast_last_member_cnt": 2,
    "mcast_startup_query_cnt": 2,
    "mcast_last_member_intvl": 100,
    "mcast_membership_intvl": 26000,
    "mcast_querier_intvl": 25500,
    "mcast_query_intvl": 12500,
    "mcast_query_response_intvl": 1000,
    "mcast_startup_query_intvl": 3124,
    "mcast_stats_enabled": 0,
    "mcast_igmp_version": 2,
    "mcast_mld_version": 1,
    "nf_call_iptables": 0,
    "nf_call_ip6tables": 0,
    "nf_call_arptables": 0
   }
  },
  "inet6_addr_gen_mode": "eui64",
  "num_tx_queues": 1,
  "num_rx_queues": 1,
  "gso_max_size": 65536,
  "gso_max_segs": 65535,
  "tso_max_size": 524280,
  "tso_max_segs": 65535,
  "gro_max_size": 65536
 },
 {
  "ifindex": 3,
  "link": "vmhost-v0",
  "ifname": "vmhost-v1",
  "flags": [
   "BROADCAST",
   "MULTICAST",
   "UP",
   "LOWER_UP"
  ],
  "mtu": 1500,
  "qdisc": "noqueue",
  "master": "vmhost-br-a",
  "operstate": "UP",
  "linkmode": "DEFAULT",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "2e:bc:45:e4:98:63",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "promiscuity": 1,
  "allmulti": 1,
  "min_mtu": 68,
  "max_mtu": 65535,
  "linkinfo": {
   "info_kind": "veth",
   "info_slave_kind": "bridge",
   "info_slave_data": {
    "state": "forwarding",
    "priority": 32,
    "cost": 2,
    "hairpin": false,
    "guard": false,
    "root_block": false,
    "fastleave": false,
    "learning": true,
    "flood": true,
    "id": "0x8001",
    "no": "0x1",
    "designated_port": 32769,
    "designated_cost": 0,
    "bridge_id": "8000.2e:bc:45:e4:98:63",
    "root_id": "8000.2e:bc:45:e4:98:63",
    "hold_timer": 0.0,
    "message_age_timer": 0.0,
    "forward_delay_timer": 14.98,
    "topology_change_ack": 0,
    "config_pending": 0,
    "proxy_arp": false,
    "proxy_arp_wifi": false,
    "multicast_router": 1,
    "mcast_flood": true,
    "bcast_flood": true,
    "mcast_to_unicast": false,
    "neigh_suppress": false,
    "group_fwd_mask": "0",
    "group_fwd_mask_str": "0x0",
    "vlan_tunnel": false,
    "isolated": false,
    "locked": false
   }
  },
  "inet6_addr_gen_mode": "eui64",
  "num_tx_queues": 2,
  "num_rx_queues": 2,
  "gso_max_size": 65536,
  "gso_max_segs": 65535,
  "tso_max_size": 524280,
  "tso_max_segs": 65535,
  "gro_max_size": 65536
 },
 {
  "ifindex": 4,
  "link": "vmhost-v1",
  "ifname": "vmhost-v0",
  "flags": [
   "BROADCAST",
   "MULTICAST",
   "UP",
   "LOWER_UP"
  ],
  "mtu": 1500,
  "qdisc": "noqueue",
  "operstate": "UP",
  "linkmode": "DEFAULT",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "0a:31:60:fd:ab:6f",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "promiscuity": 0,
  "allmulti": 0,
  "min_mtu": 68,
  "max_mtu": 65535,
  "linkinfo": {
   "info_kind": "veth"
  },
  "inet6_addr_gen_mode": "eui64",
  "num_tx_queues": 2,
  "num_rx_queues": 2,
  "gso_max_size": 65536,
  "gso_max_segs": 65535,
  "tso_max_size": 524280,
  "tso_max_segs": 65535,
  "gro_max_size": 65536
 },
 {
  "ifindex": 5,
  "link": "vmhost-v0",
  "ifname": "vmhost-mv0",
  "flags": [
   "BROADCAST",
   "MULTICAST"
  ],
  "mtu": 1500,
  "qdisc": "noop",
  "operstate": "DOWN",
  "linkmode": "DEFAULT",
  "group": "default",
  "txqlen": 1000,
  "link_type": "ether",
  "address": "06:30:42:77:d9:a1",
  "broadcast": "ff:ff:ff:ff:ff:ff",
  "promiscuity": 0,
  "allmulti": 0,
  "min_mtu": 68,
  "max_mtu": 65535,
  "linkinfo": {
   "info_kind": "macvlan",
   "info_data": {
    "mode": "bridge",
    "bcqueuelen": 1000,
    "usedbcqueuelen": 1000
   }
  },
  "inet6_addr_gen_mode": "eui64",
  "num_tx_queues": 1,
  "num_rx_queues": 1,
  "gso_max_size": 65536,
  "gso_max_segs": 65535,
  "tso_max_size": 524280,
  "tso_max_segs": 65535,
  "gro_max_size": 65536
 }
]
"""


# Hand-written in the captured shape: what iproute2 prints for a VLAN and a bond (this kernel
# cannot create either).
VLAN_BOND_IP_LINK_JSON = """\
[
 {"ifindex": 2, "ifname": "eno1", "flags": ["BROADCAST", "MULTICAST", "SLAVE", "UP"],
  "mtu": 1500, "master": "bond0", "link_type": "ether", "address": "52:54:00:aa:00:01",
  "linkinfo": {"info_slave_kind": "bond",
               "info_slave_data": {"state": "ACTIVE", "mii_status": "UP"}}},
 {"ifindex": 3, "ifname": "bond0", "flags": ["BROADCAST", "MULTICAST", "MASTER", "UP"],
  "mtu": 1500, "link_type": "ether", "address": "52:54:00:aa:00:01",
  "linkinfo": {"info_kind": "bond", "info_data": {"mode": "802.3ad", "miimon": 100}}},
 {"ifindex": 4, "link": "bond0", "ifname": "bond0.100",
  "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"], "mtu": 1500, "master": "br100",
  "link_type": "ether", "address": "52:54:00:aa:00:01",
  "linkinfo": {"info_kind": "vlan",
               "info_data": {"protocol": "802.1Q", "id": 100, "flags": ["REORDER_HDR"]},
               "info_slave_kind": "bridge", "info_slave_data": {"state": "forwarding"}}},
 {"ifindex": 5, "link": null, "ifname": "eth9.7", "flags": ["BROADCAST"], "mtu": 1500,
  "link_type": "ether", "address": "52:54:00:aa:00:09",
  "linkinfo": {"info_kind": "vlan", "info_data": {"protocol": "802.1ad", "id": 7}}}
]
"""

VLAN_BOND_IP_ADDR_JSON = """\
[
 {"ifindex": 3, "ifname": "bond0", "flags": ["MASTER", "UP"], "mtu": 1500,
  "address": "52:54:00:aa:00:01", "addr_info": []},
 {"ifindex": 6, "ifname": "br100", "flags": ["UP"], "mtu": 1500,
  "address": "52:54:00:aa:00:01",
  "addr_info": [
   {"family": "inet", "local": "10.0.100.2", "prefixlen": 24, "scope": "global",
    "label": "br100"},
   {"family": "inet", "local": "10.0.101.2", "prefixlen": 24, "scope": "global",
    "secondary": true, "label": "br100"},
   {"family": "inet6", "local": "2001:db8:100::2", "prefixlen": 64, "scope": "global"},
   {"family": "inet6", "local": "fe80::5054:ff:feaa:1", "prefixlen": 64, "scope": "link"}]}
]
"""

PROC_VLAN_TEXT = """\
eth0.200  VID: 200\t REORDER_HDR: 1  dev->priv_flags: 1001
         total frames received            0
          total bytes received            0
      Broadcast/Multicast Rcvd            0

      total frames transmitted            0
       total bytes transmitted            0
Device: eth0
INGRESS priority mappings: 0:0  1:0  2:0  3:0  4:0  5:0  6:0  7:0
 EGRESS priority mappings:
"""


# ---------------------------------------------------------------------------------------------
# iproute2 parsers


def test_parse_ip_addr_host_sample():
    addrs = parse_ip_addr_json(HOST_IP_ADDR_JSON)
    assert addrs["eth0"] == ("192.0.2.2/24", "fd00::2/64")
    assert addrs["ifb0"] == ()
    assert addrs["lo"] == ()  # host scope only


def test_parse_ip_addr_netns_sample_skips_link_local():
    addrs = parse_ip_addr_json(NETNS_IP_ADDR_JSON)
    assert addrs["vmhost-br-a"] == ("10.77.1.1/24",)
    assert addrs["vmhost-v0"] == ("10.77.2.1/24",)
    assert addrs["vmhost-v1"] == ()
    assert set(addrs) == {"lo", "vmhost-br-a", "vmhost-v0", "vmhost-v1", "vmhost-mv0"}


def test_parse_ip_addr_secondary_and_ipv6():
    addrs = parse_ip_addr_json(VLAN_BOND_IP_ADDR_JSON)
    assert addrs["br100"] == ("10.0.100.2/24", "10.0.101.2/24", "2001:db8:100::2/64")
    assert addrs["bond0"] == ()


@pytest.mark.parametrize("text", ["", "  \n"])
def test_parse_ip_addr_empty(text):
    assert parse_ip_addr_json(text) == {}


@pytest.mark.parametrize("text", ["{not json", '{"ifname": "x"}'])
def test_parse_ip_addr_garbage_raises(text):
    with pytest.raises(VmHostError, match="ip -j addr show"):
        parse_ip_addr_json(text)


def test_parse_ip_addr_skips_malformed_entries():
    text = (
        '[{"ifname": 3}, {"ifname": "a", "addr_info": [{"family": "inet", "local": "bad",'
        ' "prefixlen": 24}, {"family": "inet", "local": "10.1.1.1"},'
        ' {"family": "packet", "local": "x", "prefixlen": 1}, "junk"]}, 7]'
    )
    assert parse_ip_addr_json(text) == {"a": ()}


def test_parse_ip_link_netns_sample_has_no_vlans():
    assert parse_ip_link_json(NETNS_IP_LINK_JSON) == {}


def test_parse_ip_link_vlans():
    assert parse_ip_link_json(VLAN_BOND_IP_LINK_JSON) == {
        "bond0.100": (100, "bond0"),
        "eth9.7": (7, None),
    }


def test_parse_ip_link_garbage_raises():
    with pytest.raises(VmHostError, match="ip -j -d link show"):
        parse_ip_link_json("[")


def test_find_ip_binary_is_absolute():
    binary = networks.find_ip_binary()
    assert binary is not None
    assert os.path.isabs(binary)
    assert os.access(binary, os.X_OK)


def test_read_addresses_runs_real_ip():
    addrs = networks.read_addresses()
    assert "lo" in addrs
    assert all("/" in a for values in addrs.values() for a in values)


# ---------------------------------------------------------------------------------------------
# sysfs discovery on fake trees


@pytest.fixture
def fake_sys(tmp_path: Path) -> FakeSys:
    return FakeSys(tmp_path)


def by_name(nics: tuple[HostNic, ...]) -> dict[str, HostNic]:
    return {n.name: n for n in nics}


def test_discover_bridge_with_ports(fake_sys: FakeSys):
    fake_sys.nic("lo", mac="00:00:00:00:00:00")
    fake_sys.nic("br0", bridge=True, devtype="bridge", mac="52:54:00:00:00:aa")
    fake_sys.nic("eno1", pci=True, numa=0, master="br0")
    fake_sys.nic("tap0", master="br0")
    nics = fake_sys.discover(addresses={"br0": ("10.0.0.2/24",)})
    assert [n.name for n in nics] == ["br0", "eno1", "tap0"]
    nic = by_name(nics)
    assert nic["br0"].kind is NicKind.BRIDGE
    assert nic["br0"].mac == "52:54:00:00:00:aa"
    assert nic["br0"].addresses == ("10.0.0.2/24",)
    assert nic["br0"].parent is None
    assert nic["eno1"].kind is NicKind.PHYSICAL
    assert (nic["eno1"].parent, nic["eno1"].master) == ("br0", "br0")
    assert nic["eno1"].numa_node == 0
    assert nic["tap0"].kind is NicKind.VIRTUAL
    assert nic["tap0"].master == "br0"
    assert nic["tap0"].numa_node is None


def test_discover_bond_and_its_ports(fake_sys: FakeSys):
    fake_sys.nic("bond0", bonding=True)
    fake_sys.nic("eno1", pci=True, master="bond0")
    fake_sys.nic("eno2", pci=True, master="bond0")
    (fake_sys.net / "bonding_masters").write_text("bond0\n")
    nic = by_name(fake_sys.discover())
    assert set(nic) == {"bond0", "eno1", "eno2"}
    assert nic["bond0"].kind is NicKind.BOND
    assert nic["eno1"].parent == "bond0"
    assert nic["eno2"].master == "bond0"


def test_discover_pf_and_vf(fake_sys: FakeSys):
    fake_sys.nic("enp1s0f0", pci=True, numa=1, total_vfs=63, num_vfs=4)
    fake_sys.nic("enp1s0f0v0", pci=True, numa=1, physfn="enp1s0f0")
    nic = by_name(fake_sys.discover())
    pf, vf = nic["enp1s0f0"], nic["enp1s0f0v0"]
    assert pf.kind is NicKind.PHYSICAL
    assert (pf.sriov_total_vfs, pf.sriov_enabled_vfs, pf.numa_node) == (63, 4, 1)
    assert vf.kind is NicKind.VF
    assert vf.parent == "enp1s0f0"
    assert (vf.sriov_total_vfs, vf.sriov_enabled_vfs) == (0, 0)


def test_discover_numa_minus_one_is_none(fake_sys: FakeSys):
    fake_sys.nic("eno1", pci=True, numa=-1)
    assert fake_sys.discover()[0].numa_node is None


def test_discover_virtio_numa_from_pci_parent(fake_sys: FakeSys):
    # virtio-net: class/net/eth0/device is virtioN, whose parent PCI function holds numa_node.
    pci = fake_sys.devices / "0000:00:03.0"
    (pci / "virtio2").mkdir(parents=True)
    (pci / "numa_node").write_text("1\n")
    fake_sys.nic("eth0")
    os.symlink(pci / "virtio2", fake_sys.net / "eth0" / "device")
    nic = fake_sys.discover()[0]
    assert (nic.kind, nic.numa_node) == (NicKind.PHYSICAL, 1)


def test_discover_vlan_from_proc(fake_sys: FakeSys):
    fake_sys.nic("eth0", pci=True)
    fake_sys.nic("br200", bridge=True)
    fake_sys.nic("eth0.200", devtype="vlan", master="br200")
    fake_sys.proc_vlan("eth0.200", PROC_VLAN_TEXT)
    vlan = by_name(fake_sys.discover())["eth0.200"]
    assert vlan.kind is NicKind.VLAN
    assert (vlan.vlan_id, vlan.parent, vlan.master) == (200, "eth0", "br200")


def test_discover_vlan_from_ip_link_json(fake_sys: FakeSys):
    fake_sys.nic("bond0", bonding=True)
    fake_sys.nic("bond0.100", devtype="vlan", master="br100")
    fake_sys.nic("br100", bridge=True)
    nic = by_name(fake_sys.discover(vlan_links=parse_ip_link_json(VLAN_BOND_IP_LINK_JSON)))
    assert (nic["bond0.100"].vlan_id, nic["bond0.100"].parent) == (100, "bond0")
    assert nic["bond0.100"].master == "br100"


def test_discover_vlan_lower_from_sysfs_link_when_nothing_else(fake_sys: FakeSys):
    fake_sys.nic("eth0", pci=True)
    fake_sys.nic("eth0.5", devtype="vlan", lower="eth0")
    vlan = by_name(fake_sys.discover())["eth0.5"]
    assert (vlan.kind, vlan.vlan_id, vlan.parent) == (NicKind.VLAN, None, "eth0")


def test_discover_missing_mac_and_vanished_files(fake_sys: FakeSys):
    fake_sys.nic("veth0", mac=None)
    nic = fake_sys.discover()[0]
    assert (nic.kind, nic.mac, nic.addresses) == (NicKind.VIRTUAL, None, ())


def test_discover_missing_root_is_empty(tmp_path: Path):
    assert discover_nics(tmp_path / "nothing", {}) == ()


def test_discover_link_state_and_speed(fake_sys: FakeSys):
    fake_sys.nic("eno1", pci=True, numa=0, operstate="up", speed=25000)
    fake_sys.nic("eno2", pci=True, numa=1, operstate="down", speed=-1)
    fake_sys.nic("eno3", pci=True)  # neither file readable: a driver without them
    nic = by_name(fake_sys.discover())
    assert (nic["eno1"].link, nic["eno1"].speed_mbps) == ("up", 25000)
    assert (nic["eno2"].link, nic["eno2"].speed_mbps) == ("down", None)
    assert (nic["eno3"].link, nic["eno3"].speed_mbps) == (None, None)


def test_device_nodes_bridge_member_bond_vlan_and_virtual(fake_sys: FakeSys):
    # br-data: bond0 (eno1 on node 0, eno2 on node 1); br-ext: VLAN 100 on eno3 (node 1);
    # br-virt: a veth only; eno4: firmware names no node.
    fake_sys.nic("br-data", bridge=True)
    fake_sys.nic("bond0", bonding=True, master="br-data")
    fake_sys.nic("eno1", pci=True, numa=0, master="bond0")
    fake_sys.nic("eno2", pci=True, numa=1, master="bond0")
    fake_sys.nic("br-ext", bridge=True)
    fake_sys.nic("eno3", pci=True, numa=1)
    fake_sys.nic("eno3.100", devtype="vlan", lower="eno3", master="br-ext")
    fake_sys.nic("vnet0", master="br-ext")
    fake_sys.nic("br-virt", bridge=True)
    fake_sys.nic("veth0", master="br-virt")
    fake_sys.nic("eno4", pci=True, numa=-1)
    nics = fake_sys.discover(vlan_links={"eno3.100": (100, "eno3")})
    assert device_nodes(nics, "br-data") == (0, 1)
    assert device_nodes(nics, "bond0") == (0, 1)
    assert device_nodes(nics, "eno2") == (1,)
    assert device_nodes(nics, "br-ext") == (1,)
    assert device_nodes(nics, "eno3.100") == (1,)
    assert device_nodes(nics, "br-virt") == ()
    assert device_nodes(nics, "eno4") == ()
    assert device_nodes(nics, "missing") == ()
    # Physical NICs, bonds and VLAN bridge ports get rows; bridges, taps and veths do not.
    assert [n.name for n in listed_nics(nics)] == [
        "bond0",
        "eno1",
        "eno2",
        "eno3",
        "eno3.100",
        "eno4",
    ]
    assert ports_of(nics, "bond0") == ["eno1", "eno2"]


@pytest.mark.parametrize(
    ("attached", "device"),
    [
        ("br0", "br0"),
        ("enp59s0f0/vf3 (0000:3b:02.1)", "enp59s0f0"),
        ("0000:3b:02.1", "0000:3b:02.1"),
        ("", ""),
    ],
)
def test_host_device_of_attached_to(attached: str, device: str):
    assert host_device(attached) == device


def test_discover_sorted_by_name(fake_sys: FakeSys):
    for name in ("zz", "a1", "m"):
        fake_sys.nic(name)
    assert [n.name for n in fake_sys.discover()] == ["a1", "m", "zz"]


# ---------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name", ["br0", "a", "x" * 15, "eth0.100", "br-oam_1", "enp1s0f0v3"])
def test_validate_ifname_accepts(name):
    assert validate_ifname(name, "f") == name


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        ("", "non-empty"),
        (None, "non-empty"),
        (7, "non-empty"),
        ("x" * 16, "at most 15"),
        (".", "not a valid interface name"),
        ("..", "not a valid interface name"),
        ("br/0", "'/'"),
        ("br:0", "':'"),
        ("br 0", "whitespace"),
        ("br\t0", "whitespace"),
    ],
)
def test_validate_ifname_rejects(name, phrase):
    with pytest.raises(InvalidRequestError) as err:
        validate_ifname(name, "networks")
    assert err.value.field == "networks"
    assert phrase in str(err.value)


def test_guest_names_from_labels():
    specs = [InterfaceSpec(label, bridge="br-oam") for label in ("0", "12", "007", "data")]
    result = resolve(specs, HOST)
    assert [a.guest_name for a in result] == ["eth0", "eth12", "eth7", "data"]
    assert [a.label for a in result] == ["0", "12", "007", "data"]


def test_guest_name_too_long():
    with pytest.raises(InvalidRequestError) as err:
        resolve([InterfaceSpec("a-very-long-label-name", bridge="br-oam")], HOST)
    assert err.value.field == "interfaces.a-very-long-label-name"
    assert "guest interface name" in str(err.value)
    assert "at most 15" in str(err.value)


# ---------------------------------------------------------------------------------------------
# The networks option


@pytest.mark.parametrize("text", [None, "", "  \n", "null", "~", "# nothing mapped\n"])
def test_networks_config_empty(text):
    assert parse_networks_config(text) == {}


def test_networks_config_all_shapes():
    text = """
oam: {bridge: br-oam}
data:
  parent: bond0
  mode: macvtap
storage: {parent: eno3}
fast: {sriov-pf: enp1s0f0, vlan: 100}
untagged: {sriov-pf: enp1s0f1}
"""
    parsed = parse_networks_config(text)
    assert list(parsed) == ["data", "fast", "oam", "storage", "untagged"]
    assert parsed["oam"] == NetworkMapping("oam", AttachmentKind.BRIDGE, "br-oam")
    assert parsed["data"] == NetworkMapping("data", AttachmentKind.DIRECT, "bond0")
    assert parsed["storage"] == NetworkMapping("storage", AttachmentKind.DIRECT, "eno3")
    assert parsed["fast"] == NetworkMapping("fast", AttachmentKind.HOSTDEV, "enp1s0f0", 100)
    assert parsed["untagged"].vlan is None
    assert parsed["fast"].mode is InterfaceMode.SRIOV
    assert parsed["data"].mode is InterfaceMode.MACVTAP
    assert parsed["oam"].mode is InterfaceMode.BRIDGE
    assert parsed["fast"].describe() == "SR-IOV VF of enp1s0f0 vlan 100"


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("oam: {bridge: br0", ["not valid YAML", "line", "oam: {bridge: br-oam}"]),
        ("- oam\n- data\n", ["must be a YAML mapping", "not a list"]),
        ("just-a-string", ["must be a YAML mapping", "not a str"]),
        ("OAM: {bridge: br0}", ["'OAM' is not a Juju space name"]),
        ("oam-: {bridge: br0}", ["not a Juju space name"]),
        ("1: {bridge: br0}", ["1 is not a Juju space name"]),
        ("oam: br0", ["space 'oam' must map to a mapping", "bridge: br-oam"]),
        ("oam: {}", ["exactly one of bridge, parent or sriov-pf", "it has none"]),
        ("oam: {mode: macvtap}", ["exactly one of", "it has mode"]),
        ("oam: {bridge: br0, parent: eth0}", ["exactly one of", "it has bridge, parent"]),
        ("oam: {bridge: br0, vlan: 5}", ["unknown key(s) vlan next to bridge", "allowed: bridge"]),
        ("oam: {parent: eth0, vlan: 5}", ["unknown key(s) vlan", "allowed: mode, parent"]),
        ("oam: {sriov-pf: p0, mode: sriov}", ["unknown key(s) mode", "sriov-pf, vlan"]),
        (
            "oam: {parent: eth0, mode: bridge}",
            ["mode 'bridge' is not supported", "bridge: <name>"],
        ),
        ("oam: {parent: eth0, mode: sriov}", ["not supported with parent", "sriov-pf: <name>"]),
        ("oam: {bridge: br-with-a-long-name}", ["space 'oam': bridge", "at most 15"]),
        ("oam: {bridge: 'br 0'}", ["whitespace"]),
        ("oam: {parent: 'a/b'}", ["'/'"]),
        ("oam: {bridge: 12}", ["non-empty interface name"]),
        ("oam: {sriov-pf: p0, vlan: 0}", ["1 to 4094", "got 0"]),
        ("oam: {sriov-pf: p0, vlan: 4095}", ["1 to 4094"]),
        ("oam: {sriov-pf: p0, vlan: ten}", ["1 to 4094", "'ten'"]),
        ("oam: {sriov-pf: p0, vlan: true}", ["1 to 4094", "True"]),
    ],
)
def test_networks_config_errors(text, phrases):
    with pytest.raises(InvalidRequestError) as err:
        parse_networks_config(text)
    assert err.value.field == "networks"
    for phrase in phrases:
        assert phrase in str(err.value)


# ---------------------------------------------------------------------------------------------
# Matching

HOST = (
    HostNic("br-oam", NicKind.BRIDGE, addresses=("10.0.1.2/24", "fd00:1::2/64")),
    HostNic("eno1", NicKind.PHYSICAL, numa_node=0, parent="br-oam", master="br-oam"),
    HostNic("bond0", NicKind.BOND, addresses=("10.0.2.2/24",)),
    HostNic("eno2", NicKind.PHYSICAL, parent="bond0", master="bond0"),
    HostNic("eno3", NicKind.PHYSICAL, parent="bond0", master="bond0"),
    HostNic("bond0.100", NicKind.VLAN, vlan_id=100, parent="bond0", master="br100"),
    HostNic("br100", NicKind.BRIDGE, addresses=("10.0.100.2/24",)),
    HostNic("bond0.200", NicKind.VLAN, vlan_id=200, parent="bond0", addresses=("10.0.200.2/24",)),
    HostNic(
        "enp1s0f0",
        NicKind.PHYSICAL,
        numa_node=1,
        sriov_total_vfs=8,
        sriov_enabled_vfs=4,
        addresses=("10.0.3.2/24",),
    ),
    HostNic("enp1s0f0v0", NicKind.VF, numa_node=1, parent="enp1s0f0"),
    HostNic("enp1s0f0.300", NicKind.VLAN, vlan_id=300, parent="enp1s0f0"),
    HostNic("eth9", NicKind.PHYSICAL, addresses=("10.0.9.2/24",)),
    HostNic("veth0", NicKind.VIRTUAL),
    HostNic("br-empty", NicKind.BRIDGE),
)

NETWORKS = parse_networks_config(
    "oam: {bridge: br-oam}\n"
    "data: {parent: bond0}\n"
    "fast: {sriov-pf: enp1s0f0, vlan: 42}\n"
    "ghost: {bridge: br-ghost}\n"
)
NETWORKS_OK = {k: v for k, v in NETWORKS.items() if k != "ghost"}


def one(spec: InterfaceSpec, **kwargs) -> NicAttachment:
    kwargs.setdefault("networks", NETWORKS_OK)
    (attachment,) = resolve([spec], HOST, **kwargs)
    return attachment


def fails(spec: InterfaceSpec, *phrases: str, **kwargs) -> str:
    kwargs.setdefault("networks", NETWORKS_OK)
    with pytest.raises(InvalidRequestError) as err:
        resolve([spec], HOST, **kwargs)
    assert err.value.field == f"interfaces.{spec.label}"
    message = str(err.value)
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_explicit_bridge():
    att = one(InterfaceSpec("0", bridge="br-oam"))
    assert att == NicAttachment(
        "0",
        AttachmentKind.BRIDGE,
        "br-oam",
        guest_name="eth0",
        space="oam",
        subnet="10.0.1.0/24",
    )


def test_explicit_bridge_errors():
    fails(InterfaceSpec("a", bridge="br-nope"), "bridge 'br-nope' does not exist", "bridges:")
    fails(InterfaceSpec("a", bridge="eth9"), "physical interface, not a bridge", "parent=eth9")
    fails(InterfaceSpec("a", bridge="br 0"), "whitespace")
    fails(
        InterfaceSpec("a", bridge="br-oam", mode=InterfaceMode.MACVTAP),
        "mode macvtap cannot attach to bridge br-oam",
    )
    fails(InterfaceSpec("a", bridge="br-oam", parent="eth9"), "bridge or parent, not both")


def test_explicit_parent_is_macvtap_by_default():
    att = one(InterfaceSpec("data", parent="eth9"))
    assert (att.kind, att.source, att.guest_name) == (AttachmentKind.DIRECT, "eth9", "data")
    assert one(InterfaceSpec("data", parent="bond0")).source == "bond0"


def test_explicit_parent_modes():
    att = one(InterfaceSpec("x", parent="enp1s0f0", mode=InterfaceMode.SRIOV, vlan=7))
    assert (att.kind, att.source, att.vlan) == (AttachmentKind.HOSTDEV, "enp1s0f0", 7)
    att = one(InterfaceSpec("x", parent="eno1", mode=InterfaceMode.BRIDGE))
    assert (att.kind, att.source) == (AttachmentKind.BRIDGE, "br-oam")


def test_explicit_parent_errors():
    fails(InterfaceSpec("x", parent="nope0"), "parent 'nope0' does not exist", "subnets:")
    fails(InterfaceSpec("x", parent="eno2"), "eno2 is a port of bond0", "use parent=bond0")
    fails(
        InterfaceSpec("x", parent="eth9", mode=InterfaceMode.SRIOV),
        "mode sriov needs an SR-IOV capable NIC",
        "SR-IOV PFs: enp1s0f0 (8 VFs)",
    )
    fails(
        InterfaceSpec("x", parent="eth9", mode=InterfaceMode.BRIDGE),
        "mode bridge needs a bridge",
        "create a bridge over eth9 or use mode macvtap",
    )


def test_space_through_networks_option():
    assert one(InterfaceSpec("0", space="oam")).source == "br-oam"
    att = one(InterfaceSpec("0", space="data"))
    assert (att.kind, att.source) == (AttachmentKind.DIRECT, "bond0")
    att = one(InterfaceSpec("0", space="fast"))
    assert (att.kind, att.source, att.vlan) == (AttachmentKind.HOSTDEV, "enp1s0f0", 42)
    att = one(InterfaceSpec("0", space="fast", mode=InterfaceMode.SRIOV, vlan=42))
    assert att.vlan == 42


def test_space_option_wins_over_binding():
    att = one(InterfaceSpec("0", space="oam"), space_bindings={"oam": "eth9"})
    assert att.source == "br-oam"


def test_space_through_endpoint_binding():
    bindings = {"public": "eth9", "internal": "eno1"}
    att = one(InterfaceSpec("0", space="public"), space_bindings=bindings)
    assert (att.kind, att.source) == (AttachmentKind.DIRECT, "eth9")
    # A binding on a bridge port attaches to the bridge, as MAAS preferred.
    att = one(InterfaceSpec("0", space="internal"), space_bindings=bindings)
    assert (att.kind, att.source) == (AttachmentKind.BRIDGE, "br-oam")


def test_space_errors():
    message = fails(
        InterfaceSpec("0", space="nowhere"),
        "cannot reach space 'nowhere'",
        "spaces: data (macvtap on bond0), fast (SR-IOV VF of enp1s0f0 vlan 42), "
        "oam (bridge br-oam), public (interface eth9)",
        "10.0.1.0/24 on br-oam",
        "10.0.200.0/24 on bond0.200",
        "fd00:1::/64 on br-oam",
        "VLANs: 100 on bond0.100 (bridge br100), 200 on bond0.200, 300 on enp1s0f0.300",
        "bridges: br-empty, br-oam, br100",
        space_bindings={"public": "eth9"},
    )
    assert message.startswith("interfaces.0: ")
    fails(
        InterfaceSpec("0", space="ghost"),
        "maps space 'ghost' to bridge br-ghost",
        "no interface 'br-ghost'",
        networks=NETWORKS,
    )
    fails(
        InterfaceSpec("0", space="x"),
        "bound to host interface 'gone0', which does not exist",
        space_bindings={"x": "gone0"},
    )
    fails(
        InterfaceSpec("0", space="oam", mode=InterfaceMode.MACVTAP),
        "mode macvtap disagrees with space 'oam'",
    )
    fails(InterfaceSpec("0", space="fast", vlan=7), "vlan 7 disagrees with space 'fast'")


def test_mapping_checked_against_host():
    bad = parse_networks_config(
        "a: {bridge: eth9}\nb: {sriov-pf: eth9}\nc: {parent: nope0}\nd: {bridge: br100}\n"
    )
    problems = networks.check_networks_on_host(bad, HOST)
    assert len(problems) == 3
    assert "eth9 is a physical interface, not a bridge" in problems[0]
    assert "eth9 has no SR-IOV virtual functions" in problems[1]
    assert "no interface 'nope0'" in problems[2]
    assert networks.check_networks_on_host(NETWORKS_OK, HOST) == []
    fails(InterfaceSpec("0", space="b"), "no SR-IOV virtual functions", networks=bad)


def test_subnet():
    assert one(InterfaceSpec("0", subnet="10.0.1.0/24")).source == "br-oam"
    assert one(InterfaceSpec("0", subnet="fd00:1::/64")).source == "br-oam"
    att = one(InterfaceSpec("0", subnet="10.0.2.0/24"))
    assert (att.kind, att.source) == (AttachmentKind.DIRECT, "bond0")
    # A wider request still finds the interface whose address lies inside it.
    assert one(InterfaceSpec("0", subnet="10.0.9.0/16")).source == "br-oam"
    att = one(InterfaceSpec("0", subnet="10.0.200.0/24"))
    assert (att.kind, att.source) == (AttachmentKind.DIRECT, "bond0.200")


@pytest.mark.parametrize(
    ("spec", "space", "subnet"),
    [
        # Asked for: recorded as asked (the subnet in its network form).
        (InterfaceSpec("0", space="oam"), "oam", "10.0.1.0/24"),
        (InterfaceSpec("0", subnet="10.0.2.7/24"), "data", "10.0.2.0/24"),
        (InterfaceSpec("0", ip="fd00:1::50"), "oam", "fd00:1::/64"),
        # Not asked for: the space networks maps to the device, the device's IPv4 subnet.
        (InterfaceSpec("0", bridge="br-oam"), "oam", "10.0.1.0/24"),
        (InterfaceSpec("0", vlan=100), None, "10.0.100.0/24"),
        (InterfaceSpec("0", parent="eth9"), None, "10.0.9.0/24"),
        # Unknown: a bridge without addresses; a VF is not on its PF's subnet.
        (InterfaceSpec("0", bridge="br-empty"), None, None),
        (InterfaceSpec("0", space="fast"), "fast", None),
    ],
)
def test_attachment_records_space_and_subnet(spec, space, subnet):
    att = one(spec)
    assert (att.space, att.subnet) == (space, subnet)


def test_subnet_errors():
    fails(
        InterfaceSpec("0", subnet="192.168.7.0/24"),
        "no host interface has an address in subnet 192.168.7.0/24",
        "subnets: 10.0.1.0/24 on br-oam, 10.0.2.0/24 on bond0",
    )
    fails(InterfaceSpec("0", subnet="banana"), "'banana' is not a CIDR")


def test_vlan():
    att = one(InterfaceSpec("0", vlan=100))
    assert (att.kind, att.source, att.vlan) == (AttachmentKind.BRIDGE, "br100", None)
    att = one(InterfaceSpec("0", vlan=200))
    assert (att.kind, att.source) == (AttachmentKind.DIRECT, "bond0.200")
    att = one(InterfaceSpec("0", vlan=300, mode=InterfaceMode.SRIOV))
    assert (att.kind, att.source, att.vlan) == (AttachmentKind.HOSTDEV, "enp1s0f0", 300)


def test_vlan_errors():
    fails(
        InterfaceSpec("0", vlan=999),
        "no interface on VLAN 999",
        "VLANs: 100 on bond0.100 (bridge br100)",
    )
    fails(InterfaceSpec("0", vlan=5000), "0 to 4094")
    fails(
        InterfaceSpec("0", vlan=200, mode=InterfaceMode.BRIDGE),
        "mode bridge needs a bridge, but bond0.200 is not a bridge",
    )


def test_ip():
    att = one(InterfaceSpec("data", ip="10.0.1.50"))
    assert (att.kind, att.source, att.ip) == (AttachmentKind.BRIDGE, "br-oam", "10.0.1.50/24")
    att = one(InterfaceSpec("data", ip="fd00:1::50"))
    assert att.ip == "fd00:1::50/64"
    att = one(InterfaceSpec("data", ip="10.0.3.9", mode=InterfaceMode.SRIOV))
    assert (att.kind, att.source, att.ip) == (AttachmentKind.HOSTDEV, "enp1s0f0", "10.0.3.9/24")


def test_ip_takes_the_most_specific_subnet():
    host = (
        HostNic("br-wide", NicKind.BRIDGE, addresses=("10.8.0.1/16",)),
        HostNic("br-narrow", NicKind.BRIDGE, addresses=("10.8.5.1/24",)),
    )
    (att,) = resolve([InterfaceSpec("0", ip="10.8.5.9")], host)
    assert (att.source, att.ip) == ("br-narrow", "10.8.5.9/24")
    (att,) = resolve([InterfaceSpec("0", ip="10.8.7.9")], host)
    assert (att.source, att.ip) == ("br-wide", "10.8.7.9/16")


def test_ip_errors():
    fails(
        InterfaceSpec("0", ip="192.168.7.9"),
        "no host interface is on a subnet containing 192.168.7.9",
        "subnets:",
    )
    fails(InterfaceSpec("0", ip="10.0.1.2"), "10.0.1.2 is the host's own address on br-oam")
    fails(InterfaceSpec("0", ip="10.0.1.0"), "network or broadcast address of 10.0.1.0/24")
    fails(InterfaceSpec("0", ip="10.0.1.255"), "network or broadcast address")
    fails(InterfaceSpec("0", ip="10.0.1.x"), "'10.0.1.x' is not an IPv4 or IPv6 address")
    fails(
        InterfaceSpec("0", ip="10.0.1.200", subnet="10.0.1.0/25"),
        "ip 10.0.1.200 is not inside the requested subnet 10.0.1.0/25",
    )


def test_constraints_that_agree():
    att = one(InterfaceSpec("0", space="oam", subnet="10.0.1.0/24", ip="10.0.1.9"))
    assert (att.source, att.ip) == ("br-oam", "10.0.1.9/24")
    # The VLAN interface is a port of br100, which carries the subnet: one network.
    att = one(InterfaceSpec("0", vlan=100, subnet="10.0.100.0/24"))
    assert att.source == "br100"
    att = one(InterfaceSpec("0", space="fast", ip="10.0.3.7"))
    assert (att.kind, att.source, att.ip) == (AttachmentKind.HOSTDEV, "enp1s0f0", "10.0.3.7/24")
    att = one(InterfaceSpec("0", vlan=300, ip="10.0.3.7", mode=InterfaceMode.SRIOV))
    assert (att.source, att.vlan) == ("enp1s0f0", 300)
    att = one(InterfaceSpec("0", parent="eth9", subnet="10.0.9.0/24"))
    assert att.source == "eth9"


def test_constraints_that_disagree():
    fails(
        InterfaceSpec("0", space="oam", subnet="10.0.9.0/24"),
        "constraints point at different host networks",
        "space=oam -> br-oam",
        "subnet=10.0.9.0/24 -> eth9",
    )
    fails(
        InterfaceSpec("0", vlan=100, ip="10.0.2.9"),
        "vlan=100 -> bond0.100 (in br100)",
        "ip=10.0.2.9 -> bond0",
    )
    fails(
        InterfaceSpec("0", bridge="br-oam", subnet="10.0.100.0/24"),
        "bridge=br-oam -> br-oam, subnet=10.0.100.0/24 -> br100",
    )
    fails(
        InterfaceSpec("0", space="fast", subnet="10.0.9.0/24"),
        "different host networks",
        "space=fast -> enp1s0f0",
    )


def test_mode_preference_and_explicit_modes():
    # bridge port -> its bridge; bond -> macvtap on the bond; bond port -> macvtap on the bond.
    bindings = {"a": "eno1", "b": "bond0", "c": "eno2", "d": "veth0", "e": "enp1s0f0v0"}
    expect = {
        "a": (AttachmentKind.BRIDGE, "br-oam"),
        "b": (AttachmentKind.DIRECT, "bond0"),
        "c": (AttachmentKind.DIRECT, "bond0"),
        "d": (AttachmentKind.DIRECT, "veth0"),
        "e": (AttachmentKind.DIRECT, "enp1s0f0v0"),
    }
    for space, wanted in expect.items():
        att = one(InterfaceSpec("0", space=space), space_bindings=bindings, networks={})
        assert (att.kind, att.source) == wanted, space
    # Explicit macvtap on a bridge port goes on the bridge (the kernel refuses port macvlans).
    att = one(
        InterfaceSpec("0", space="a", mode=InterfaceMode.MACVTAP),
        space_bindings=bindings,
        networks={},
    )
    assert (att.kind, att.source) == (AttachmentKind.DIRECT, "br-oam")
    # SR-IOV from a VF or the PF itself names the PF.
    att = one(InterfaceSpec("0", space="e", mode=InterfaceMode.SRIOV), space_bindings=bindings)
    assert (att.kind, att.source) == (AttachmentKind.HOSTDEV, "enp1s0f0")


def test_sriov_found_below_a_bridge():
    host = (
        HostNic("br0", NicKind.BRIDGE, addresses=("10.5.0.1/24",)),
        HostNic("bond1", NicKind.BOND, master="br0"),
        HostNic("p1", NicKind.PHYSICAL, master="bond1", sriov_total_vfs=16),
    )
    (att,) = resolve([InterfaceSpec("0", subnet="10.5.0.0/24", mode=InterfaceMode.SRIOV)], host)
    assert (att.kind, att.source) == (AttachmentKind.HOSTDEV, "p1")
    (att,) = resolve([InterfaceSpec("0", subnet="10.5.0.0/24")], host)
    assert (att.kind, att.source) == (AttachmentKind.BRIDGE, "br0")


def test_master_given_only_as_parent_still_counts():
    host = (
        HostNic("br0", NicKind.BRIDGE),
        HostNic("eth0", NicKind.PHYSICAL, parent="br0", addresses=("10.6.0.2/24",)),
    )
    (att,) = resolve([InterfaceSpec("0", subnet="10.6.0.0/24")], host)
    assert (att.kind, att.source) == (AttachmentKind.BRIDGE, "br0")


def test_no_constraint():
    fails(
        InterfaceSpec("0"),
        "has no constraint",
        "space, subnet, vlan, ip, bridge or parent",
        "bridges: br-empty",
    )
    fails(InterfaceSpec("0", mode=InterfaceMode.BRIDGE), "has no constraint")
    att = one(InterfaceSpec("0"), default_bridge="br-empty")
    assert (att.kind, att.source) == (AttachmentKind.BRIDGE, "br-empty")
    fails(InterfaceSpec("0"), "default bridge 'br-gone' does not exist", default_bridge="br-gone")
    fails(InterfaceSpec("0"), "default bridge 'eth9' is not a bridge", default_bridge="eth9")


def test_several_interfaces_in_order_with_guest_names():
    specs = [
        InterfaceSpec("0", space="oam"),
        InterfaceSpec("1", subnet="10.0.2.0/24"),
        InterfaceSpec("data", ip="10.0.9.20"),
        InterfaceSpec("fast", space="fast"),
    ]
    result = resolve(specs, HOST, NETWORKS_OK)
    assert [a.label for a in result] == ["0", "1", "data", "fast"]
    assert [a.guest_name for a in result] == ["eth0", "eth1", "data", "fast"]
    assert [a.source for a in result] == ["br-oam", "bond0", "eth9", "enp1s0f0"]
    assert result[2].ip == "10.0.9.20/24"
    assert resolve([], HOST) == ()


def test_request_level_errors():
    with pytest.raises(InvalidRequestError, match="label is used twice") as err:
        resolve([InterfaceSpec("a", bridge="br-oam"), InterfaceSpec("a", bridge="br100")], HOST)
    assert err.value.field == "interfaces.a"
    with pytest.raises(InvalidRequestError, match="guest name eth0 is also the name") as err:
        resolve([InterfaceSpec("0", bridge="br-oam"), InterfaceSpec("eth0", bridge="br100")], HOST)
    assert err.value.field == "interfaces.eth0"
    with pytest.raises(InvalidRequestError, match=r"ip 10\.0\.1\.9 is also requested by 'a'"):
        resolve([InterfaceSpec("a", ip="10.0.1.9"), InterfaceSpec("b", ip="10.0.1.9")], HOST)


def test_resolve_on_discovered_fake_tree(fake_sys: FakeSys):
    fake_sys.nic("br0", bridge=True)
    fake_sys.nic("eno1", pci=True, master="br0", numa=0)
    fake_sys.nic("enp2s0", pci=True, total_vfs=7, num_vfs=2)
    fake_sys.nic("enp2s0v1", pci=True, physfn="enp2s0")
    nics = fake_sys.discover(addresses={"br0": ("172.16.4.1/22",), "enp2s0": ("172.20.0.1/24",)})
    result = resolve(
        [
            InterfaceSpec("0", ip="172.16.5.9"),
            InterfaceSpec("1", space="oam"),
            InterfaceSpec("2", subnet="172.20.0.0/24", mode=InterfaceMode.SRIOV),
        ],
        nics,
        space_bindings={"oam": "eno1"},
    )
    assert [(a.kind, a.source, a.ip) for a in result] == [
        (AttachmentKind.BRIDGE, "br0", "172.16.5.9/22"),
        (AttachmentKind.BRIDGE, "br0", None),
        (AttachmentKind.HOSTDEV, "enp2s0", None),
    ]


# ---------------------------------------------------------------------------------------------
# Properties: parsers fail only with their own errors, whatever they are given


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_networks_config_any_text_is_parsed_or_refused_cleanly(text):
    try:
        parsed = parse_networks_config(text)
    except InvalidRequestError as err:
        field = err.field
        parsed = {}
    else:
        field = "networks"
    assert field == "networks"
    for space, mapping in parsed.items():
        assert mapping.space == space
        assert validate_ifname(mapping.device, "x") == mapping.device


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=12), yaml_values, max_size=4))
def test_networks_config_any_structure_is_parsed_or_refused_cleanly(data):
    field = "networks"
    try:
        parse_networks_config(yaml.safe_dump(data))
    except InvalidRequestError as err:
        field = err.field
    assert field == "networks"


@settings(max_examples=200, deadline=None)
@given(st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6))
def test_ip_json_parsers_fail_only_with_vmhost_errors(data):
    text = json.dumps(data)
    for parser in (parse_ip_addr_json, parse_ip_link_json):
        with contextlib.suppress(VmHostError):
            parser(text)


@given(st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9_-]{0,11}", fullmatch=True))
def test_guest_names_are_valid_interface_names(label):
    (att,) = resolve([InterfaceSpec(label, bridge="br-oam")], HOST)
    assert att.guest_name == guest_interface_name(label)
    assert validate_ifname(att.guest_name, "x") == att.guest_name

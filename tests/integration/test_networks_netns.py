"""Discovery and matching against the real kernel, inside a network namespace.

The test builds bridges, veth pairs and a macvlan with addresses in the namespace
`vmhost-test-ns`, runs discover_nics() in a subprocess under `ip netns exec` (which mounts a
sysfs showing only the namespace's devices) and resolves requests against what it found. No
mocks: the kernel and iproute2 answer. The namespace (and with it every link) is removed before
and after, so an interrupted run leaves nothing that breaks the next one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmhost.model import AttachmentKind, HostNic, InterfaceSpec, InvalidRequestError, NicKind
from vmhost.networks import find_ip_binary, parse_networks_config, resolve

pytestmark = pytest.mark.integration

NS = "vmhost-test-ns"
REPO = Path(__file__).resolve().parents[2]
IP = find_ip_binary() or "/usr/sbin/ip"

# Links created inside the namespace (all names carry the vmhost- prefix):
#   vmhost-br-a  bridge, 10.77.1.1/24 and fd77:1::1/64, port vmhost-a1 (veth, peer vmhost-a2)
#   vmhost-br-b  bridge without address, port vmhost-v1 (veth, peer vmhost-v0)
#   vmhost-v0    veth, 10.77.2.1/24
#   vmhost-mv0   macvlan on vmhost-v0
SETUP = [
    ["link", "add", "vmhost-br-a", "type", "bridge"],
    ["link", "add", "vmhost-br-b", "type", "bridge"],
    ["link", "add", "vmhost-a1", "type", "veth", "peer", "name", "vmhost-a2"],
    ["link", "add", "vmhost-v0", "type", "veth", "peer", "name", "vmhost-v1"],
    ["link", "set", "vmhost-a1", "master", "vmhost-br-a"],
    ["link", "set", "vmhost-v1", "master", "vmhost-br-b"],
    ["link", "add", "vmhost-mv0", "link", "vmhost-v0", "type", "macvlan", "mode", "bridge"],
    ["addr", "add", "10.77.1.1/24", "dev", "vmhost-br-a"],
    ["addr", "add", "fd77:1::1/64", "dev", "vmhost-br-a", "nodad"],
    ["addr", "add", "10.77.2.1/24", "dev", "vmhost-v0"],
    *(
        ["link", "set", name, "up"]
        for name in ("lo", "vmhost-br-a", "vmhost-br-b", "vmhost-a1", "vmhost-v0", "vmhost-v1")
    ),
]

DISCOVER = (
    "import dataclasses, json\n"
    "from vmhost.networks import discover_nics\n"
    "print(json.dumps([dataclasses.asdict(n) for n in discover_nics()]))\n"
)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], check=check, capture_output=True, text=True, timeout=30)


def in_ns(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ip("netns", "exec", NS, *args, check=check)


def delete_namespace() -> None:
    if NS in ip("netns", "list").stdout.split():
        ip("netns", "del", NS)


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    if not os.access(IP, os.X_OK):
        pytest.fail(
            "iproute2 is needed for the network namespace tests (apt-get install iproute2)"
        )
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    delete_namespace()  # leftovers of an interrupted run
    ip("netns", "add", NS)
    try:
        for command in SETUP:
            in_ns(IP, *command)
        yield NS
    finally:
        delete_namespace()


@pytest.fixture(scope="module")
def nics(netns: str) -> tuple[HostNic, ...]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [IP, "netns", "exec", netns, sys.executable, "-c", DISCOVER],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    found = []
    for raw in json.loads(done.stdout):
        raw["kind"] = NicKind(raw["kind"])
        raw["addresses"] = tuple(raw["addresses"])
        found.append(HostNic(**raw))
    return tuple(found)


def by_name(nics: tuple[HostNic, ...]) -> dict[str, HostNic]:
    return {n.name: n for n in nics}


def test_discovery_sees_only_the_namespace(nics):
    names = [n.name for n in nics]
    assert names == sorted(
        [
            "vmhost-a1",
            "vmhost-a2",
            "vmhost-br-a",
            "vmhost-br-b",
            "vmhost-mv0",
            "vmhost-v0",
            "vmhost-v1",
        ]
    )


def test_discovery_kinds_ports_and_addresses(nics):
    nic = by_name(nics)
    assert nic["vmhost-br-a"].kind is NicKind.BRIDGE
    assert nic["vmhost-br-b"].kind is NicKind.BRIDGE
    for name in ("vmhost-a1", "vmhost-a2", "vmhost-v0", "vmhost-v1", "vmhost-mv0"):
        assert nic[name].kind is NicKind.VIRTUAL, name
    assert (nic["vmhost-a1"].master, nic["vmhost-a1"].parent) == ("vmhost-br-a", "vmhost-br-a")
    assert nic["vmhost-v1"].master == "vmhost-br-b"
    assert nic["vmhost-a2"].master is None
    assert nic["vmhost-br-a"].addresses == ("10.77.1.1/24", "fd77:1::1/64")
    assert nic["vmhost-v0"].addresses == ("10.77.2.1/24",)
    assert nic["vmhost-br-b"].addresses == ()  # link-local only
    assert all(n.numa_node is None and n.sriov_total_vfs == 0 for n in nics)


def test_discovery_macs_match_iproute2(netns, nics):
    links = json.loads(in_ns(IP, "-j", "link", "show").stdout)
    macs = {link["ifname"]: link["address"] for link in links if link["ifname"] != "lo"}
    assert {n.name: n.mac for n in nics} == macs


def test_resolve_against_the_namespace(nics):
    networks = parse_networks_config("oam: {bridge: vmhost-br-a}\n")
    specs = [
        InterfaceSpec("0", subnet="10.77.1.0/24"),
        InterfaceSpec("1", ip="10.77.2.50"),
        InterfaceSpec("2", bridge="vmhost-br-b"),
        InterfaceSpec("oam", space="oam", ip="fd77:1::99"),
        InterfaceSpec("data", space="data"),
    ]
    result = resolve(specs, nics, networks, space_bindings={"data": "vmhost-v1"})
    assert [(a.guest_name, a.kind, a.source, a.ip) for a in result] == [
        ("eth0", AttachmentKind.BRIDGE, "vmhost-br-a", None),
        ("eth1", AttachmentKind.DIRECT, "vmhost-v0", "10.77.2.50/24"),
        ("eth2", AttachmentKind.BRIDGE, "vmhost-br-b", None),
        ("oam", AttachmentKind.BRIDGE, "vmhost-br-a", "fd77:1::99/64"),
        ("data", AttachmentKind.BRIDGE, "vmhost-br-b", None),
    ]


def test_unreachable_subnet_lists_what_the_namespace_offers(nics):
    with pytest.raises(InvalidRequestError) as err:
        resolve([InterfaceSpec("0", subnet="10.99.0.0/24")], nics)
    assert err.value.field == "interfaces.0"
    message = str(err.value)
    assert "10.77.1.0/24 on vmhost-br-a" in message
    assert "10.77.2.0/24 on vmhost-v0" in message
    assert "bridges: vmhost-br-a, vmhost-br-b" in message


def test_direct_attachment_is_a_parent_the_kernel_accepts(netns, nics):
    """A macvtap on the resolved parent works; one on a bridge port is refused by the kernel.

    This is why resolve() moves macvtap from a bridge or bond port to its master.
    """
    (att,) = resolve([InterfaceSpec("0", ip="10.77.2.60")], nics)
    assert att.kind is AttachmentKind.DIRECT
    made = in_ns(
        IP, "link", "add", "vmhost-mt0", "link", att.source, "type", "macvtap", "mode",
        "bridge", check=False,
    )  # fmt: skip
    try:
        assert made.returncode == 0, made.stderr
    finally:
        in_ns(IP, "link", "del", "vmhost-mt0", check=False)
    refused = in_ns(
        IP, "link", "add", "vmhost-mt1", "link", "vmhost-a1", "type", "macvtap", "mode",
        "bridge", check=False,
    )  # fmt: skip
    in_ns(IP, "link", "del", "vmhost-mt1", check=False)
    assert refused.returncode != 0
    assert "busy" in refused.stderr.lower()

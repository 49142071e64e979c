"""Proof inside a booted guest, composed through the charm, by action and by relation.

The charm runs in ops.testing on this machine's real libvirtd (virt-type auto: TCG here, since
/dev/kvm is PVM). The guest is the tiny test image (tests/guest), which prints what it sees on
its serial console; the test reads that back through the charm's console-log action and checks
it against what the charm answered: the MACs, the requested hostname and SSH key in user-data,
the static address in network-config, the planned vCPU count, and the DHCP address libvirt's
NAT network leased, which the relation answer must carry once known.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ops import testing
from tests.integration.conftest import IP, NAT_SUBNET
from tests.integration.test_charm_images_libvirt import charm_pool
from tests.integration.test_guest_boot import BOOT_TIMEOUT_S, report, tiny_image

import charm
import charms.vm_host.v0.vm_host as vm_lib
from vmhost.backends.libvirt import LibvirtBackend

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_host")]

__all__ = ["charm_pool", "tiny_image"]  # fixtures shared with other test modules

STATIC_BRIDGE = "vmhost-test-brs"
STATIC_NET = "10.231.78.1/24"
KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMatanbep/N+adaXybtOu3k2EXKr4yLMtWFtjT1gfE5p "
    "proof@vm-host"
)
APP = "vmhost-test-app"


@pytest.fixture
def static_bridge() -> Iterator[str]:
    """A bridge on 10.231.78.0/24, so a request's ip=10.231.78.x resolves to it."""
    subprocess.run([IP, "link", "del", STATIC_BRIDGE], check=False, capture_output=True)
    subprocess.run([IP, "link", "add", STATIC_BRIDGE, "type", "bridge"], check=True)
    subprocess.run([IP, "addr", "add", STATIC_NET, "dev", STATIC_BRIDGE], check=True)
    subprocess.run([IP, "link", "set", STATIC_BRIDGE, "up"], check=True)
    yield STATIC_BRIDGE
    subprocess.run([IP, "link", "del", STATIC_BRIDGE], check=False, capture_output=True)


@pytest.fixture
def ctx(charm_type: type[charm.VmHostCharm]) -> testing.Context[charm.VmHostCharm]:
    return testing.Context(charm_type)


@pytest.fixture
def config(
    test_pool: str,
    nat_network: str,
    static_bridge: str,
    tiny_image: Path,
    charm_pool: LibvirtBackend,
    tmp_path: Path,
) -> dict[str, str]:
    """The charm's config: images named local:tiny come from local-image-dir (the test guest)."""
    local = tmp_path / "local-images"
    local.mkdir()
    local.chmod(0o755)
    shutil.copyfile(tiny_image, local / "tiny.qcow2")
    # The NIC of a request without interfaces would go on the NAT network.
    return {
        "default-storage-pool": test_pool,
        "default-network": nat_network,
        "local-image-dir": str(local),
        "default-image": "",
    }


def action(ctx, state, which, **params):
    ctx.run(ctx.on.action(which, params=params), state)
    return dict(ctx.action_results or {})  # a copy: the next action run replaces it


def guest_report(ctx, state, name: str) -> tuple[dict, float]:
    """The guest's own report, read with console-log once the guest has printed it."""
    start = time.monotonic()
    log = ""
    while time.monotonic() - start < BOOT_TIMEOUT_S:
        log = action(ctx, state, "console-log", name=name, lines=2000)["log"]
        try:
            return report.parse(log), time.monotonic() - start
        except report.NoReportError:
            time.sleep(2)
    pytest.fail(f"{name} printed no report in {BOOT_TIMEOUT_S} s:\n{log[-3000:]}")


def check_guest(
    guest: dict, macs: dict[str, str], *, uuid: str, hostname: str, static_ip: str
) -> None:
    """What the guest saw matches what the charm planned and answered."""
    assert f"instance-id: {uuid}" in guest["seed"]["meta-data"]  # this VM's boot, no other
    assert guest["cpus"] == 2
    assert sorted(guest["nics"].values()) == sorted(macs.values())
    user_data = guest["seed"]["user-data"]
    assert f"hostname: {hostname}" in user_data
    assert KEY in user_data
    network = yaml.safe_load(guest["seed"]["network-config"])
    static = next(
        n for n in network["ethernets"].values() if n["match"]["macaddress"] == macs["data"]
    )
    assert static["addresses"] == [static_ip]
    assert f"local-hostname: {hostname}" in guest["seed"]["meta-data"]


def test_compose_vm_action_boots_a_guest_that_reports_the_request(
    ctx, config, nat_network, backend: LibvirtBackend
):
    state = testing.State(config=config, leader=True)
    name = "vmhost-test-guest-0"
    result = action(
        ctx,
        state,
        "compose-vm",
        name=name,
        memory=256,
        cores=2,
        storage="root:1",
        image="local:tiny",
        interfaces="eth0:bridge=vmhost-test-nat;data:ip=10.231.78.50",
        hostname="guest-0.example.com",
        **{"ssh-public-keys": KEY},
    )
    assert result["state"] == "running"
    nics = json.loads(result["interfaces"])
    macs = {n["label"]: n["mac"] for n in nics}
    static = next(n for n in nics if n["label"] == "data")
    assert static["addresses"] == ["10.231.78.50"]  # at once, before the guest boots
    placement = json.loads(result["placement"])
    assert placement["vcpus"] == 2

    guest, boot_s = guest_report(ctx, state, name)
    print(f"action VM report after {boot_s:.1f} s: {json.dumps(guest, sort_keys=True)}")
    check_guest(guest, macs, uuid=result["uuid"], hostname="guest-0", static_ip="10.231.78.50/24")
    assert "fqdn: guest-0.example.com" in guest["seed"]["user-data"]
    action(ctx, state, "delete-vm", name=name)
    assert name not in {d.name() for d in backend.conn.listAllDomains(0)}


def test_relation_request_boots_a_guest_and_the_answer_gets_its_dhcp_address(
    ctx, config, nat_network, backend: LibvirtBackend
):
    request = {
        "id": "db-0",
        "cores": 2,
        "memory": 256,
        "storage": "root:1",
        "image": "local:tiny",
        # Through the spaces the operator mapped: a relation may not name host bridges.
        "interfaces": "eth0:space=nat;data:space=static,ip=10.231.78.51",
        "hostname": "db-0",
        "ssh-public-keys": [KEY],
        "user-data": "#cloud-config\npackages: [postgresql]\n",
    }
    relation = vm_lib.requirer_relation([request], remote_app_name=APP, relation_id=43)
    spaces = {"nat": {"bridge": nat_network}, "static": {"bridge": STATIC_BRIDGE}}
    config = {**config, "networks": yaml.safe_dump(spaces)}
    state = testing.State(config=config, leader=True, relations={relation})
    # Cached first: an uncached image would be fetched in the background and answered pending.
    action(ctx, state, "sync-images", names="local:tiny")
    started = time.monotonic()
    state = ctx.run(ctx.on.relation_changed(relation), state)
    compose_s = time.monotonic() - started
    (answer,) = vm_lib.answers_from(state.get_relation(43))
    assert answer.state == "running", answer.error
    assert answer.name is not None
    by_label = {i.label: i for i in answer.interfaces}
    assert by_label["data"].addresses == ["10.231.78.51"]
    assert by_label["data"].ip == "10.231.78.51"
    macs = {label: nic.mac or "" for label, nic in by_label.items()}

    guest, boot_s = guest_report(ctx, state, answer.name)
    print(f"relation VM report after {boot_s:.1f} s: {json.dumps(guest, sort_keys=True)}")
    check_guest(guest, macs, uuid=answer.uuid or "", hostname="db-0", static_ip="10.231.78.51/24")
    assert "packages: [postgresql]" in guest["seed"]["user-data"]  # the requester's, kept
    eth0 = next(n for n, mac in guest["nics"].items() if mac == macs["eth0"])
    (leased,) = guest["addrs"][eth0]
    assert leased.endswith("/24")
    assert leased.startswith(NAT_SUBNET.rsplit(".", 2)[0])

    # update-status refreshes the answer until it carries the lease the guest got.
    start = time.monotonic()
    eth0_answer = by_label["eth0"]
    while time.monotonic() - start < 30:
        state = ctx.run(ctx.on.update_status(), state)
        (answer,) = vm_lib.answers_from(state.get_relation(43))
        eth0_answer = next(i for i in answer.interfaces if i.label == "eth0")
        if eth0_answer.addresses:
            break
        time.sleep(1)
    learnt_s = time.monotonic() - start
    print(f"compose {compose_s:.1f} s, report {boot_s:.1f} s, lease in answer {learnt_s:.1f} s")
    assert eth0_answer.addresses == [leased.split("/")[0]]
    assert eth0_answer.ip == leased.split("/")[0]

    ctx.run(ctx.on.relation_broken(state.get_relation(43)), state)
    assert answer.name not in {d.name() for d in backend.conn.listAllDomains(0)}

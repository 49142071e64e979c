"""Power actions and the crash restart, through the charm, on the real libvirtd: no fakes.

The guests boot no OS, so none answers an ACPI shutdown: a graceful stop-vm must time out and
leave the VM running, force=true must power it off. A crash is a real one: QEMU is killed
(by the pid libvirt recorded for this test's own domain) and libvirt sees its monitor close.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import libvirt
import pytest
from ops import testing

import charm
from vmhost.backends.libvirt import LibvirtBackend
from vmhost.model import VmState

pytestmark = pytest.mark.integration

VM = "vmhost-test-power-0"


@pytest.fixture
def ctx(charm_type: type[charm.VmHostCharm]) -> testing.Context[charm.VmHostCharm]:
    return testing.Context(charm_type)


@pytest.fixture
def state(test_pool: str, clean_host: None, test_bridge: str) -> testing.State:
    # A request without interfaces gets its one NIC on default-network; network boot
    # (default-image ""): these VMs test power, images have their own tests.
    config = {
        "default-storage-pool": test_pool,
        "default-network": test_bridge,
        "default-image": "",
    }
    return testing.State(config=config, leader=True)


def run(ctx, state, action, **params):
    ctx.run(ctx.on.action(action, params=params), state)
    return ctx.action_results or {}


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())


def wait_for(check, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out after {seconds} s")


def test_stop_start_and_crash_restart(ctx, state, backend: LibvirtBackend) -> None:
    params = {"pinned-cores": "1", "storage": "root:1"}
    run(ctx, state, "compose-vm", name=VM, memory=128, **params)
    dom = backend.conn.lookupByName(VM)
    assert dom.autostart() == 1
    pinned = json.loads(run(ctx, state, "list-vms")["json"])
    cpus = next(v for v in pinned if v["name"] == VM)["placement"]["cpus"]

    # No guest OS answers ACPI: a graceful stop times out, says so and changes nothing.
    started = time.monotonic()
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "stop-vm", name=VM, timeout=2)
    assert time.monotonic() - started >= 2
    assert "did not shut down within 2 s" in failed.value.message
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert dom.autostart() == 1

    assert run(ctx, state, "stop-vm", name=VM, force=True)["state"] == "stopped"
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    assert dom.autostart() == 0  # stays off across a host reboot
    # It keeps its place: its pinned CPU is still booked in show-resources.
    data = json.loads(run(ctx, state, "show-resources")["json"])
    assert cpus[0] in [c for n in data["nodes"] for c in n["cpus"]["pinned"]]
    ctx.run(ctx.on.update_status(), state)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF  # an operator's stop is kept

    assert run(ctx, state, "start-vm", name=VM)["state"] == "running"
    assert dom.autostart() == 1
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    # A real crash: QEMU dies. libvirt reports shutoff (crashed); the status line says so
    # and update-status starts it again, once.
    first = qemu_pid(VM)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not dom.isActive())
    (record,) = [r for r in backend.list_vms() if r.name == VM]
    assert record.state is VmState.FAILED
    out = ctx.run(ctx.on.config_changed(), state)
    assert f"crashed: {VM}" in out.unit_status.message
    out = ctx.run(ctx.on.update_status(), state)
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert qemu_pid(VM) != first
    assert f"crashed: {VM}" not in out.unit_status.message

    assert run(ctx, state, "restart-vm", name=VM, force=True)["state"] == "running"
    assert dom.autostart() == 1
    run(ctx, state, "delete-vm", name=VM)


def test_power_actions_refuse_unknown_and_foreign_vms(ctx, state, backend) -> None:
    foreign = """<domain type='qemu'><name>vmhost-test-foreign-power</name>
      <memory unit='MiB'>64</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os></domain>"""
    backend.conn.defineXML(foreign)
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "start-vm", name="vmhost-test-foreign-power")
    assert "not composed by vm-host" in failed.value.message
    assert not backend.conn.lookupByName("vmhost-test-foreign-power").isActive()
    with pytest.raises(testing.ActionFailed) as failed:
        run(ctx, state, "stop-vm", name="vmhost-test-nothing")
    assert "no VM named 'vmhost-test-nothing'" in failed.value.message

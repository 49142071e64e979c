"""End to end on a real Juju controller: a consumer asks vm-host for a VM over the relation.

Needs a bootstrapped controller on a cloud whose machines have /dev/kvm (MAAS, or LXD with
nested virtualisation), and the two charms packed: set VM_HOST_CHARM and VM_CONSUMER_CHARM to
their .charm files. Without a controller every test here is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

jubilant = pytest.importorskip("jubilant")


def _controller_reason() -> str | None:
    juju = shutil.which("juju")
    if juju is None:
        return "no juju client on this machine"
    result = subprocess.run(
        [juju, "show-controller", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        return f"no Juju controller: {result.stderr.strip() or 'juju show-controller failed'}"
    for var in ("VM_HOST_CHARM", "VM_CONSUMER_CHARM"):
        if not os.environ.get(var):
            return f"{var} is not set to a packed .charm file"
    return None


_REASON = _controller_reason()
pytestmark = [pytest.mark.juju, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def juju():
    with jubilant.temp_model() as juju:
        juju.wait_timeout = 20 * 60
        yield juju


def test_consumer_gets_a_vm_and_loses_it_with_the_relation(juju):
    juju.deploy(os.environ["VM_HOST_CHARM"], "vm-host")
    juju.deploy(
        os.environ["VM_CONSUMER_CHARM"],
        "consumer",
        config={"requests": '[{"id": "db-0", "cores": 1, "memory": 512, "storage": "root:2"}]'},
    )
    juju.integrate("vm-host:vms", "consumer:vm-host")
    juju.wait(
        lambda status: (
            jubilant.all_active(status, "vm-host", "consumer")
            and "db-0" in status.apps["consumer"].units["consumer/0"].workload_status.message
        )
    )
    listed = juju.run("vm-host/0", "list-vms")
    assert "consumer-db-0" in listed.results["table"]

    juju.remove_relation("vm-host:vms", "consumer:vm-host")
    juju.wait(lambda status: jubilant.all_active(status, "vm-host"))
    listed = juju.run("vm-host/0", "list-vms")
    assert "consumer-db-0" not in listed.results["table"]

"""The charm (ops.testing) granting libvirt access on this machine: real user, sshd, libvirtd.

A manager's key reaches libvirt over qemu+ssh after the charm authorizes it, by action and by
relation, and stops working when it is revoked or the relation goes.
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest
from ops import testing
from tests.integration import sshd_fixture
from tests.integration.sshd_fixture import make_key_pair, qemu_ssh_uri

import charm
import charms.vm_host.v0.vm_host_access as access_lib

sshd = sshd_fixture.sshd
libvirtd = sshd_fixture.libvirtd
access_user = sshd_fixture.access_user


def can_list_domains(user: str, port: int, key: Path) -> bool:
    try:
        conn = libvirt.open(qemu_ssh_uri(user, port, key))
    except libvirt.libvirtError:
        return False
    try:
        conn.listAllDomains(0)
        return True
    finally:
        conn.close()


@pytest.fixture
def ctx(charm_type: type[charm.VmHostCharm]) -> testing.Context[charm.VmHostCharm]:
    return testing.Context(charm_type)


def test_action_and_relation_keys_reach_libvirt(
    ctx, access_user: str, sshd: int, libvirtd: str, tmp_path: Path
):
    config = {"libvirt-user": access_user}
    by_action = make_key_pair(tmp_path, "by-action")
    by_relation = make_key_pair(tmp_path, "by-relation")
    assert not can_list_domains(access_user, sshd, by_action.private)

    state = testing.State(config=config, leader=True)
    ctx.run(
        ctx.on.action(
            "authorize-ssh-key", params={"name": "laptop", "key": by_action.public_text}
        ),
        state,
    )
    assert (ctx.action_results or {})["fingerprint"].startswith("SHA256:")
    assert can_list_domains(access_user, sshd, by_action.private)

    relation = access_lib.requirer_relation(
        {0: access_lib.requirer_databag(ssh_public_key=by_relation.public_text.strip())}
    )
    with_relation = testing.State(config=config, leader=True, relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation), with_relation)
    published = access_lib.published_from(out.get_relation(relation.id))
    assert published.uri is not None
    assert published.uri.startswith(f"qemu+ssh://{access_user}@")
    assert can_list_domains(access_user, sshd, by_relation.private)
    # The relation's reconcile kept the action's key.
    assert can_list_domains(access_user, sshd, by_action.private)

    ctx.run(ctx.on.relation_broken(relation), with_relation)
    assert not can_list_domains(access_user, sshd, by_relation.private)
    assert can_list_domains(access_user, sshd, by_action.private)

    ctx.run(ctx.on.action("revoke-ssh-key", params={"key": "laptop"}), state)
    assert not can_list_domains(access_user, sshd, by_action.private)

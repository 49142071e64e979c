"""libvirt access over SSH against the real sshd and libvirtd of this machine.

A throwaway user gets keys through vmhost.access; a libvirt-python client connects with
qemu+ssh, the same key cannot run a command or forward, revoked and dropped keys are refused,
and an operator's own line outside the managed block survives every change.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from tests.integration import sshd_fixture
from tests.integration.sshd_fixture import make_key_pair, qemu_ssh_uri, ssh

from vmhost import access
from vmhost.model import InvalidRequestError

pytestmark = pytest.mark.integration

# Fixtures from the helper module, bound here so pytest finds them for this module.
sshd = sshd_fixture.sshd
libvirtd = sshd_fixture.libvirtd
access_user = sshd_fixture.access_user

OPERATOR_LINES = "# added by the operator by hand\n"


def _daemon(uri: str) -> tuple[str, str]:
    """Connect, list the domains, and say which daemon answered (hostname, host UUID).

    Domain lists are not compared: other tests on this machine create and delete domains at
    the same time. The host UUID from the capabilities names the daemon's host.
    """
    conn = libvirt.open(uri)
    try:
        assert isinstance(conn.listAllDomains(), list)
        caps = conn.getCapabilities()
        uuid = ET.fromstring(caps).findtext("host/uuid") or ""
        return conn.getHostname(), uuid
    finally:
        conn.close()


def _refused(uri: str) -> bool:
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return True
    return False


def _known_hosts(directory: Path, port: int) -> Path:
    path = directory / "known_hosts"
    keys = access.ssh_host_public_keys()
    assert keys, "the host has no SSH host keys to publish"
    path.write_text("".join(f"[127.0.0.1]:{port} {key}\n" for key in keys))
    return path


def _operator_part(text: str) -> str:
    before, _, after = access._split_block(text)
    return "\n".join(before + after)


def test_ensure_user_makes_a_locked_account_with_private_ssh_files(access_user: str):
    user = access.ensure_user(access_user)
    again = access.ensure_user(access_user)

    assert again == user
    assert (user.home / access.CREATED_MARKER).exists()
    for group in ("libvirt", "libvirt-qemu"):
        try:
            members = grp.getgrnam(group).gr_mem
        except KeyError:
            continue
        assert access_user in members
    ssh_dir = user.home / ".ssh"
    assert stat.S_IMODE(ssh_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(user.authorized_keys.stat().st_mode) == 0o600
    assert user.authorized_keys.stat().st_uid == user.uid
    shadow = subprocess.run(
        ["/usr/bin/passwd", "--status", access_user], capture_output=True, text=True, check=True
    ).stdout.split()
    assert shadow[1] == "L", f"account is not locked: {shadow}"


def test_qemu_ssh_access_lifecycle(access_user: str, sshd: int, libvirtd: str, tmp_path: Path):
    user = access.ensure_user(access_user)
    operator_key = make_key_pair(tmp_path, "operator")
    user.authorized_keys.write_text(OPERATOR_LINES + operator_key.public_text)
    operator_text = _operator_part(user.authorized_keys.read_text())
    laptop = make_key_pair(tmp_path, "laptop")
    ci = make_key_pair(tmp_path, "ci")
    known_hosts = _known_hosts(tmp_path, sshd)
    laptop_uri = qemu_ssh_uri(access_user, sshd, laptop.private)
    ci_uri = qemu_ssh_uri(access_user, sshd, ci.private)

    # Before: the key is not authorized.
    assert _refused(laptop_uri)

    # authorize-ssh-key: libvirt over SSH reaches the same daemon as the local socket.
    key = access.authorize_key(access_user, laptop.public_text, "laptop")
    line = user.authorized_keys.read_text()
    assert f'restrict,command="{access.forced_command()}" ssh-ed25519 {key.blob}' in line
    assert line.rstrip().endswith(access.BLOCK_END)
    assert _daemon(laptop_uri) == _daemon(libvirtd)
    assert _operator_part(user.authorized_keys.read_text()) == operator_text

    # The same key runs no command and forwards nothing.
    result = ssh(access_user, sshd, laptop.private, known_hosts, "id")
    assert "uid=" not in result.stdout
    assert "uid=" not in result.stderr
    forward = ssh(access_user, sshd, laptop.private, known_hosts, "-W", f"127.0.0.1:{sshd}")
    assert "SSH-2.0" not in forward.stdout
    assert forward.returncode != 0

    # Config/relation keys come and go through sync_keys; the action key is kept.
    relation_key = access.parse_public_key(ci.public_text, "relation:3:maas/0")
    assert access.sync_keys(access_user, [relation_key]) is True
    assert access.sync_keys(access_user, [relation_key]) is False
    assert {k.source for k in access.current_keys(access_user)} == {
        "action:laptop",
        "relation:3:maas/0",
    }
    assert _daemon(ci_uri) == _daemon(libvirtd)
    assert _daemon(laptop_uri) == _daemon(libvirtd)

    # A relation key cannot be revoked by the action (it would come back); the key stays.
    with pytest.raises(InvalidRequestError, match="relation:3:maas/0"):
        access.revoke_key(access_user, relation_key.fingerprint)

    # revoke-ssh-key: that key is refused, the other still works.
    removed = access.revoke_key(access_user, "laptop")
    assert [k.source for k in removed] == ["action:laptop"]
    assert _refused(laptop_uri)
    assert _daemon(ci_uri) == _daemon(libvirtd)

    # The relation departs: its key is refused too.
    access.sync_keys(access_user, [])
    assert _refused(ci_uri)
    assert access.current_keys(access_user) == []
    assert _operator_part(user.authorized_keys.read_text()) == operator_text
    assert stat.S_IMODE(user.authorized_keys.stat().st_mode) == 0o600

    # The operator's own line was never touched and still logs in (with its own rights).
    result = ssh(access_user, sshd, operator_key.private, known_hosts, "echo", "operator-ok")
    assert "operator-ok" in result.stdout


def test_revoke_by_fingerprint_and_bad_requests_change_nothing(
    access_user: str, sshd: int, libvirtd: str, tmp_path: Path
):
    access.ensure_user(access_user)
    laptop = make_key_pair(tmp_path, "laptop")
    key = access.authorize_key(access_user, laptop.public_text, "laptop")
    before = access.current_keys(access_user)

    with pytest.raises(InvalidRequestError, match="already names another key"):
        access.authorize_key(access_user, make_key_pair(tmp_path, "x").public_text, "laptop")
    with pytest.raises(InvalidRequestError, match="options are not allowed"):
        access.authorize_key(access_user, f'command="/bin/sh" {laptop.public_text}', "evil")
    with pytest.raises(InvalidRequestError, match="no key authorized by action"):
        access.revoke_key(access_user, "nobody")
    assert access.current_keys(access_user) == before
    assert access.authorize_key(access_user, laptop.public_text, "laptop") == key

    access.revoke_key(access_user, key.fingerprint)

    assert access.current_keys(access_user) == []
    assert _refused(qemu_ssh_uri(access_user, sshd, laptop.private))


def test_remove_access_keeps_a_user_with_operator_lines(access_user: str, tmp_path: Path):
    user = access.ensure_user(access_user)
    operator_key = make_key_pair(tmp_path, "operator")
    user.authorized_keys.write_text(operator_key.public_text)
    access.authorize_key(access_user, make_key_pair(tmp_path, "k").public_text, "k")

    assert access.remove_access(access_user) is False
    assert user.authorized_keys.read_text() == operator_key.public_text

    user.authorized_keys.write_text("")
    assert access.remove_access(access_user) is True
    assert not user.home.exists()
    assert access.remove_access(access_user) is False


def test_an_adopted_user_is_never_deleted(access_user: str):
    subprocess.run(
        ["/usr/sbin/useradd", "--system", "--create-home", "--shell", "/bin/sh", access_user],
        check=True,
    )
    user = access.ensure_user(access_user, adopt=True)

    assert not (user.home / access.CREATED_MARKER).exists()
    assert access.remove_access(access_user) is False
    assert user.home.exists()


def test_sshd_accepts_the_drop_in_and_confines_the_user(access_user: str, tmp_path: Path):
    access.ensure_user(access_user)
    drop_in = tmp_path / "vm-host.conf"
    assert access.ensure_sshd_drop_in(access_user, drop_in) is True
    assert access.ensure_sshd_drop_in(access_user, drop_in) is False
    # The machine's own sshd_config, with its Include pointed at the rendered drop-in, so the
    # Match block is checked where Debian and Ubuntu include it (before the main settings).
    main = Path("/etc/ssh/sshd_config").read_text().splitlines()
    include = f"Include {drop_in}"
    lines = [include if line.startswith("Include ") else line for line in main]
    if include not in lines:
        lines.insert(0, include)
    config = tmp_path / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    os.chmod(config, 0o600)

    subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], check=True)
    effective = subprocess.run(
        [
            "/usr/sbin/sshd",
            "-T",
            "-f",
            str(config),
            "-C",
            f"user={access_user},host=client,addr=127.0.0.1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    other = subprocess.run(
        ["/usr/sbin/sshd", "-T", "-f", str(config), "-C", "user=root,host=client,addr=127.0.0.1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()

    assert f"forcecommand {access.forced_command().lower()}" in effective
    assert "permittty no" in effective
    assert "allowtcpforwarding no" in effective
    assert "forcecommand none" in other
    assert access.remove_sshd_drop_in(drop_in) is True
    assert access.remove_sshd_drop_in(drop_in) is False
    assert "permittty yes" in other


def test_an_adopted_user_without_a_login_shell_is_refused_with_the_fix(access_user: str):
    subprocess.run(
        ["/usr/sbin/useradd", "--system", "--shell", "/usr/sbin/nologin", access_user],
        check=True,
    )

    with pytest.raises(access.VmHostError, match=f"usermod --shell /bin/sh {access_user}"):
        access.ensure_user(access_user, adopt=True)


def test_an_existing_account_is_not_taken_over_without_the_option(access_user: str):
    subprocess.run(
        ["/usr/sbin/useradd", "--system", "--create-home", "--shell", "/bin/sh", access_user],
        check=True,
    )
    home = Path(pwd.getpwnam(access_user).pw_dir)

    with pytest.raises(access.VmHostError, match="libvirt-user-adopt=true"):
        access.ensure_user(access_user)
    assert "libvirt-user-adopt=true" in (access.user_problem(access_user) or "")
    assert not (home / ".ssh").exists()
    assert access_user not in grp.getgrnam("libvirt").gr_mem


def test_a_name_that_is_an_existing_group_is_refused_before_useradd(access_user: str):
    subprocess.run(["/usr/sbin/groupadd", "--system", access_user], check=True)
    try:
        with pytest.raises(access.VmHostError, match=f"a group named {access_user}"):
            access.ensure_user(access_user)
        assert "a group named" in (access.user_problem(access_user) or "")
        with pytest.raises(KeyError):
            pwd.getpwnam(access_user)
    finally:
        subprocess.run(["/usr/sbin/groupdel", access_user], check=False)


@pytest.mark.parametrize("name", ["root", "ubuntu", "libvirt"])
def test_system_account_names_are_refused(name: str):
    with pytest.raises(InvalidRequestError, match="dedicated name"):
        access.ensure_user(name)

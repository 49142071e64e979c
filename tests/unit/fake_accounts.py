"""The host's account databases for unit tests: what useradd and friends would do, recorded.

A unit test cannot add, lock or delete accounts on this machine, so `RecordedAccounts` records
each such call and nothing else: lookups answer from the calls recorded (an account added here
exists afterwards, its home made under the layout's home_root as `useradd --create-home` would).
Every rule about which account may serve, what is written into its home and when it may be
deleted is vmhost.access's own, run against that temporary home.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from vmhost.access import AccessLayout, AccessUser

HOST_KEY = "ssh-ed25519 AAAAhostkey"
"""The test host's one SSH host key, as published to managers."""


class RecordedAccounts:
    """useradd, usermod and userdel calls recorded; passwd and group reads answered from them."""

    def __init__(self, groups: Iterable[str] = ("libvirt", "libvirt-qemu")):
        self.calls: list[str] = []
        self.groups = list(groups)
        self._users: dict[str, tuple[AccessUser, str]] = {}
        self._members: dict[str, set[str]] = {}

    # -- what the host already has -----------------------------------------------------------

    def existing(self, name: str, home: Path, shell: str = "/bin/sh") -> AccessUser:
        """An account the host has before the test (an operator's own)."""
        home.mkdir(parents=True, exist_ok=True)
        # Never uid 0, which the access rules refuse; the test's own uid owns the files.
        user = AccessUser(name, os.getuid() or 1000, os.getgid(), home)
        self._users[name] = (user, shell)
        return user

    # -- reads -------------------------------------------------------------------------------

    def lookup(self, name: str) -> AccessUser | None:
        entry = self._users.get(name)
        return entry[0] if entry else None

    def login_shell(self, name: str) -> str:
        return self._users[name][1]

    def existing_groups(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if n in self.groups]

    def groups_of(self, name: str) -> set[str]:
        return set(self._members.get(name, set()))

    # -- writes: recorded ---------------------------------------------------------------------

    def add_user(self, name: str, home: Path, shell: str, groups: Sequence[str]) -> None:
        self.calls.append(f"useradd:{name}:{home}:{shell}:{','.join(groups)}")
        self.existing(name, home, shell)
        self._members[name] = set(groups)

    def lock(self, name: str) -> None:
        self.calls.append(f"lock:{name}")

    def add_to_groups(self, name: str, groups: Sequence[str]) -> None:
        self.calls.append(f"usermod:{name}:{','.join(groups)}")
        self._members.setdefault(name, set()).update(groups)

    def delete_user(self, name: str) -> None:
        self.calls.append(f"userdel:{name}")
        self._users.pop(name, None)


def access_layout(root: Path, accounts: RecordedAccounts | None = None) -> AccessLayout:
    """Libvirt access under `root`: homes, the sshd drop-in, the host key, virt-ssh-helper."""
    etc_ssh = root / "etc" / "ssh"
    etc_ssh.mkdir(parents=True, exist_ok=True)
    (etc_ssh / "ssh_host_ed25519_key.pub").write_text(f"{HOST_KEY} root@test-host\n")
    helper = root / "usr" / "bin" / "virt-ssh-helper"
    helper.parent.mkdir(parents=True, exist_ok=True)
    helper.write_text("#!/bin/sh\nexit 1\n")
    helper.chmod(0o755)
    return AccessLayout(
        accounts=accounts or RecordedAccounts(),
        home_root=root / "home",
        sshd_drop_in=etc_ssh / "sshd_config.d" / "vm-host.conf",
        ssh_dir=etc_ssh,
        virt_ssh_helper=str(helper),
    )

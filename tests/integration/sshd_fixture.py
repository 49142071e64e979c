"""Fixtures for the libvirt-over-SSH tests: a loopback sshd, libvirtd, a throwaway access user.

Imported explicitly by the test modules that need them. The daemons are started by the test
command (tests/bin/ensure-*.sh); the fixtures run those scripts themselves only when the daemon
does not answer, so the tests also work when run alone.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

REPO = Path(__file__).resolve().parents[2]
SSHD_PORT = int(os.environ.get("VMHOST_TEST_SSHD_PORT", "2222"))
TEST_USER = "vmhost-test-virsh"
USERDEL = "/usr/sbin/userdel"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _quiet_libvirt_errors() -> None:
    """Keep libvirt's default handler from printing errors the tests expect."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@pytest.fixture(scope="session")
def sshd() -> int:
    """Return the port of an sshd on 127.0.0.1, started by ensure-sshd.sh when needed."""
    if not _listening(SSHD_PORT):
        subprocess.run(
            ["/usr/bin/bash", str(REPO / "tests/bin/ensure-sshd.sh"), str(SSHD_PORT)], check=True
        )
    assert _listening(SSHD_PORT), f"sshd is not listening on 127.0.0.1:{SSHD_PORT}"
    return SSHD_PORT


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """Return the local URI of a running libvirtd, started by ensure-libvirt.sh when needed."""
    _quiet_libvirt_errors()
    uri = "qemu:///system"
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        subprocess.run(["/usr/bin/bash", str(REPO / "tests/bin/ensure-libvirt.sh")], check=True)
        libvirt.open(uri).close()
    return uri


def remove_test_user(name: str = TEST_USER) -> None:
    """Delete the throwaway user and its home, or a leftover group of that name."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["/usr/sbin/groupdel", name], check=False, capture_output=True)
        return
    subprocess.run([USERDEL, "--remove", name], check=False, capture_output=True)


@pytest.fixture
def access_user() -> Iterator[str]:
    """A clean slate: remove a leftover test user first, and the user afterwards."""
    remove_test_user()
    yield TEST_USER
    remove_test_user()


@dataclass(frozen=True)
class KeyPair:
    """An SSH key pair made by ssh-keygen for one test."""

    private: Path
    public_text: str


def make_key_pair(directory: Path, name: str) -> KeyPair:
    """Generate an ed25519 key pair with ssh-keygen (private key file 0600)."""
    private = directory / name
    subprocess.run(
        [
            "/usr/bin/ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            f"{name}@test",
            "-f",
            str(private),
        ],
        check=True,
    )
    return KeyPair(private=private, public_text=(directory / f"{name}.pub").read_text())


def qemu_ssh_uri(user: str, port: int, key: Path) -> str:
    """The URI a manager would use, with this test's key and no interactive prompts."""
    return f"qemu+ssh://{user}@127.0.0.1:{port}/system?keyfile={key}&no_verify=1&no_tty=1"


def ssh(
    user: str, port: int, key: Path, known_hosts: Path, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the OpenSSH client with only this key, pinned host keys and no prompts."""
    return subprocess.run(
        [
            "/usr/bin/ssh",
            "-p",
            str(port),
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "ConnectTimeout=10",
            f"{user}@127.0.0.1",
            *args,
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )

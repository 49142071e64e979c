"""Fixtures for the LXD trust tests: a running LXD, HTTPS on loopback, client certificates.

Imported explicitly by the test modules that need them. LXD is started by the test command
(tests/bin/ensure-lxd.sh); the fixture runs the script itself only when LXD does not answer.
Clients pin the server certificate; TLS verification is never turned off.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmhost.lxd_trust import LxdError, LxdTrust

REPO = Path(__file__).resolve().parents[2]
HTTPS_PORT = int(os.environ.get("VMHOST_TEST_LXD_PORT", "8443"))
PREFIX = "vmhost-test-"


def cleanup(trust: LxdTrust) -> None:
    """Remove what an earlier (maybe interrupted) run left: test certificates and projects."""
    for cert in trust.trusted():
        if cert.name.startswith(f"vm-host:{PREFIX}"):
            trust.untrust(cert.name)
    for project in trust.projects():
        if project.startswith(PREFIX):
            for profile in trust.request("GET", f"/1.0/profiles?project={project}"):
                name = profile.rsplit("/", 1)[1].split("?")[0]
                if name != "default":
                    trust.request("DELETE", f"/1.0/profiles/{name}?project={project}")
            trust.delete_project(project)


@pytest.fixture(scope="session")
def lxd() -> Iterator[LxdTrust]:
    """LXD with HTTPS on 127.0.0.1; the previous listen address is put back afterwards."""
    try:
        trust = LxdTrust()
        trust.server_info()
    except LxdError:
        subprocess.run(["/usr/bin/bash", str(REPO / "tests/bin/ensure-lxd.sh")], check=True)
        trust = LxdTrust()
    previous = trust.https_address()
    cleanup(trust)
    trust.ensure_https("127.0.0.1", HTTPS_PORT)
    yield trust
    cleanup(trust)
    if not previous:
        trust.disable_https()
    elif previous != trust.https_address():
        trust.request("PATCH", "/1.0", {"config": {"core.https_address": previous}})


@dataclass(frozen=True)
class Client:
    """An HTTPS client of LXD with its own certificate, pinning the server certificate."""

    cert: Path
    key: Path
    server_cert: Path
    port: int = HTTPS_PORT

    @property
    def pem(self) -> str:
        return self.cert.read_text()

    def request(self, method: str, path: str, body: Any = None) -> requests.Response:
        # trust_env off: a REQUESTS_CA_BUNDLE in the environment must not replace the pin.
        with requests.Session() as session:
            session.trust_env = False
            return session.request(
                method,
                f"https://127.0.0.1:{self.port}{path}",
                json=body,
                cert=(str(self.cert), str(self.key)),
                verify=str(self.server_cert),
                timeout=30,
            )

    def auth(self) -> str:
        """What LXD thinks of this client: "trusted" or "untrusted"."""
        response = self.request("GET", "/1.0")
        response.raise_for_status()
        return response.json()["metadata"]["auth"]


def make_certificate(
    directory: Path,
    name: str,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Write a self-signed client certificate and its key (0600); return their paths."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA384())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def make_client(directory: Path, name: str, trust: LxdTrust) -> Client:
    """A fresh client that pins the server certificate LXD reports on its local socket."""
    server_cert = directory / "server.crt"
    server_cert.write_text(trust.server_certificate())
    cert, key = make_certificate(directory, name)
    return Client(cert=cert, key=key, server_cert=server_cert)

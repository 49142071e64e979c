"""Real key material for unit tests, made fresh by cryptography (never checked in)."""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

DAY = datetime.timedelta(days=1)


def self_signed_pem(
    cn: str = "vmhost-test",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> str:
    """A self-signed EC certificate in PEM, valid from yesterday to tomorrow by default."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + DAY)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def ed25519_public_key() -> str:
    """A fresh OpenSSH ed25519 public key line ("ssh-ed25519 AAAA...")."""
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode()

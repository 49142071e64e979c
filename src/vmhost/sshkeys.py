"""OpenSSH public key lines: the one parser for authorized_keys entries and VM requests.

A key is checked down to its wire format (type string, then the fields of that key type, and
nothing after), so a truncated, padded or mislabelled key is refused where it is given, not
at the first login that fails.
"""

from __future__ import annotations

import base64
import binascii
import re

from vmhost.model import InvalidRequestError

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
MIN_RSA_BITS = 2048
MAX_KEY_BLOB_BYTES = 16384

CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _read_string(data: bytes, offset: int, what: str) -> tuple[bytes, int]:
    if offset + 4 > len(data):
        raise ValueError(f"the key data ends before its {what}")
    length = int.from_bytes(data[offset : offset + 4], "big")
    start = offset + 4
    if start + length > len(data):
        raise ValueError(f"the key data ends inside its {what}")
    return data[start : start + length], start + length


def _check_rsa(data: bytes, offset: int) -> int:
    exponent, offset = _read_string(data, offset, "RSA exponent")
    modulus, offset = _read_string(data, offset, "RSA modulus")
    if not exponent or not modulus:
        raise ValueError("the RSA key has an empty exponent or modulus")
    bits = int.from_bytes(modulus, "big").bit_length()
    if bits < MIN_RSA_BITS:
        raise ValueError(f"the RSA key has {bits} bits; use at least {MIN_RSA_BITS}")
    return offset


def _check_ed25519(data: bytes, offset: int) -> int:
    point, offset = _read_string(data, offset, "ed25519 public key")
    if len(point) != 32:
        raise ValueError(f"the ed25519 public key is {len(point)} bytes, not 32")
    return offset


def _check_ecdsa(key_type: str, data: bytes, offset: int) -> int:
    curve = key_type.removeprefix("sk-").removesuffix("@openssh.com").rsplit("-", 1)[1]
    named, offset = _read_string(data, offset, "curve name")
    if named != curve.encode():
        raise ValueError(f"the key names curve {named[:20]!r}, not {curve!r}")
    point, offset = _read_string(data, offset, "curve point")
    if not point or point[0] != 4:
        raise ValueError("the ECDSA point is not an uncompressed curve point")
    return offset


def _check_blob(key_type: str, data: bytes) -> None:
    """Walk the wire-format key so truncated or padded blobs are refused, not just mislabeled."""
    name, offset = _read_string(data, 0, "type")
    if name != key_type.encode():
        shown = name.decode("ascii", "replace")[:40]
        raise ValueError(f"the key data says it is {shown!r}, not {key_type!r}")
    if key_type == "ssh-rsa":
        offset = _check_rsa(data, offset)
    elif key_type in ("ssh-ed25519", "sk-ssh-ed25519@openssh.com"):
        offset = _check_ed25519(data, offset)
    else:
        offset = _check_ecdsa(key_type, data, offset)
    if key_type.startswith("sk-"):
        application, offset = _read_string(data, offset, "security key application")
        if not application:
            raise ValueError("the security key has an empty application")
    if offset != len(data):
        raise ValueError(f"the key data has {len(data) - offset} unexpected trailing bytes")


SSH_OPTIONS = frozenset(
    {
        "agent-forwarding",
        "cert-authority",
        "command",
        "environment",
        "expiry-time",
        "from",
        "no-agent-forwarding",
        "no-port-forwarding",
        "no-pty",
        "no-touch-required",
        "no-user-rc",
        "no-x11-forwarding",
        "permitlisten",
        "permitopen",
        "port-forwarding",
        "principals",
        "pty",
        "restrict",
        "tunnel",
        "user-rc",
        "verify-required",
        "x11-forwarding",
    }
)


def parse_key_line(text: object, field: str) -> tuple[str, str, str]:
    """Validate one "<type> <base64> [comment]" line; return (type, base64, comment).

    Raises:
        InvalidRequestError: under `field`, saying what is wrong with the key.
    """
    if not isinstance(text, str):
        raise InvalidRequestError(field, "the key must be text")
    stripped = text.strip()
    if not stripped:
        raise InvalidRequestError(field, "the key is empty; give '<type> <base64> [comment]'")
    if CONTROL_RE.search(stripped):
        raise InvalidRequestError(
            field, "the key contains a newline or control character; give exactly one key line"
        )
    tokens = stripped.split(None, 2)
    key_type = tokens[0]
    if key_type not in KEY_TYPES:
        if "=" in key_type or "," in key_type or '"' in stripped or key_type in SSH_OPTIONS:
            raise InvalidRequestError(
                field,
                f"key options are not allowed (found {key_type[:40]!r}); give only "
                "'<type> <base64> [comment]': vm-host sets the options itself",
            )
        raise InvalidRequestError(
            field,
            f"unknown key type {key_type[:40]!r}; use one of {', '.join(sorted(KEY_TYPES))}",
        )
    if len(tokens) < 2:
        raise InvalidRequestError(field, f"the {key_type} key has no base64 body")
    blob = tokens[1]
    if len(blob) > MAX_KEY_BLOB_BYTES * 4 // 3 + 4:
        raise InvalidRequestError(field, "the key body is too long to be a public key")
    try:
        data = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(field, "the key body is not valid base64") from None
    try:
        _check_blob(key_type, data)
    except ValueError as exc:
        raise InvalidRequestError(field, str(exc)) from None
    return key_type, blob, tokens[2] if len(tokens) > 2 else ""

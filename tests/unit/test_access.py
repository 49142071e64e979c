"""Key and certificate validation, and the managed authorized_keys block (pure functions)."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from vmhost import access, lxd_trust
from vmhost.access import (
    BLOCK_BEGIN,
    BLOCK_END,
    AuthorizedKey,
    managed_keys,
    parse_public_key,
    parse_public_keys,
    render_authorized_keys,
)
from vmhost.model import InvalidRequestError

COMMAND = "/usr/bin/virt-ssh-helper qemu:///system"


def _openssh(public_key) -> str:
    return public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def _ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


@pytest.fixture(scope="module")
def ed25519_key() -> str:
    return _openssh(ed25519.Ed25519PrivateKey.generate().public_key()) + " alice@laptop"


@pytest.fixture(scope="module")
def other_key() -> str:
    return _openssh(ed25519.Ed25519PrivateKey.generate().public_key())


def _valid_keys() -> dict[str, str]:
    keys = {
        "ssh-ed25519": _openssh(ed25519.Ed25519PrivateKey.generate().public_key()),
        "ssh-rsa": _openssh(rsa.generate_private_key(65537, 2048).public_key()),
        "ecdsa-sha2-nistp256": _openssh(ec.generate_private_key(ec.SECP256R1()).public_key()),
        "ecdsa-sha2-nistp384": _openssh(ec.generate_private_key(ec.SECP384R1()).public_key()),
        "ecdsa-sha2-nistp521": _openssh(ec.generate_private_key(ec.SECP521R1()).public_key()),
    }
    point = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    sk_type = b"sk-ssh-ed25519@openssh.com"
    blob = _ssh_string(sk_type) + _ssh_string(point) + _ssh_string(b"ssh:")
    keys[sk_type.decode()] = f"{sk_type.decode()} {base64.b64encode(blob).decode()}"
    ec_point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    sk_ec = b"sk-ecdsa-sha2-nistp256@openssh.com"
    blob = _ssh_string(sk_ec) + _ssh_string(b"nistp256") + _ssh_string(ec_point)
    blob += _ssh_string(b"ssh:")
    keys[sk_ec.decode()] = f"{sk_ec.decode()} {base64.b64encode(blob).decode()}"
    return keys


VALID_KEYS = _valid_keys()


# ---------------------------------------------------------------------------------------------
# Key parsing


@pytest.mark.parametrize("key_type", sorted(VALID_KEYS))
def test_every_known_key_type_is_accepted(key_type: str):
    key = parse_public_key(VALID_KEYS[key_type] + " some comment", "config")

    assert key.key_type == key_type
    assert key.public_key == " ".join(VALID_KEYS[key_type].split()[:2])
    assert key.source == "config"
    assert key.fingerprint.startswith("SHA256:")
    assert len(key.fingerprint) == len("SHA256:") + 43


def test_fingerprint_matches_ssh_keygen_notation():
    key = parse_public_key(VALID_KEYS["ssh-ed25519"], "config")
    blob = base64.b64decode(key.blob)
    import hashlib

    expected = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert key.fingerprint == f"SHA256:{expected}"


def _blob_of(key_type: str) -> str:
    return VALID_KEYS[key_type].split()[1]


def _tamper(key_type: str, mutate) -> str:
    data = base64.b64decode(_blob_of(key_type))
    return base64.b64encode(mutate(data)).decode()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP", "unknown key type 'ssh-dss'"),
        ("ssh-ed25519", "no base64 body"),
        ("ssh-ed25519 not*base64!", "not valid base64"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI", "not valid base64"),
        (f"ssh-rsa {_blob_of('ssh-ed25519')}", "says it is 'ssh-ed25519', not 'ssh-rsa'"),
        (
            f"ecdsa-sha2-nistp384 {_blob_of('ecdsa-sha2-nistp256')}",
            "says it is 'ecdsa-sha2-nistp256'",
        ),
        (f'command="/bin/sh" {VALID_KEYS["ssh-ed25519"]}', "options are not allowed"),
        (f"restrict {VALID_KEYS['ssh-ed25519']}", "options are not allowed"),
        (f"no-pty,permitopen=x:1 {VALID_KEYS['ssh-ed25519']}", "options are not allowed"),
        (f"{VALID_KEYS['ssh-ed25519']}\n{VALID_KEYS['ssh-rsa']}", "newline"),
        (f"{VALID_KEYS['ssh-ed25519']} c\x00mment", "control character"),
        (f"{VALID_KEYS['ssh-ed25519']} a\rb", "control character"),
        (
            f"ssh-ed25519 {_tamper('ssh-ed25519', lambda d: d + b'xx')}",
            "2 unexpected trailing bytes",
        ),
        (f"ssh-ed25519 {_tamper('ssh-ed25519', lambda d: d[:-3])}", "ends inside"),
        (
            "ssh-rsa "
            + base64.b64encode(
                _ssh_string(b"ssh-rsa") + _ssh_string(b"\x01\x00\x01") + _ssh_string(b"\xff" * 128)
            ).decode(),
            "1024 bits; use at least 2048",
        ),
    ],
)
def test_bad_keys_are_refused_with_the_reason(text: str, reason: str):
    with pytest.raises(InvalidRequestError) as info:
        parse_public_key(text, "action:laptop")

    assert info.value.field == "key"
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("source", "field"),
    [
        ("config", "ssh-authorized-keys"),
        ("relation:4:maas/0", "ssh-public-key"),
        ("action:x", "key"),
    ],
)
def test_the_refusal_names_the_field_the_key_came_from(source: str, field: str):
    with pytest.raises(InvalidRequestError) as info:
        parse_public_key("ssh-ed25519 !!!", source)

    assert info.value.field == field


@pytest.mark.parametrize(
    "source", ["", "operator", "relation:x:maas/0", "action:", "action:bad name", "config\n"]
)
def test_bad_sources_are_refused(source: str):
    with pytest.raises(InvalidRequestError, match="source"):
        parse_public_key(VALID_KEYS["ssh-ed25519"], source)


def test_quotes_in_the_comment_are_dropped_with_it():
    key = parse_public_key(VALID_KEYS["ssh-ed25519"] + ' evil" ,command="/bin/sh', "config")

    line = access.render_key_line(key, COMMAND)
    assert line.count('"') == 2
    assert line.endswith(" vm-host:config")


def test_config_text_is_parsed_line_by_line(ed25519_key: str, other_key: str):
    text = f"# team keys\n\n{ed25519_key}\n{other_key}\n{ed25519_key}\n"

    keys = parse_public_keys(text, "config")

    assert [k.public_key for k in keys] == [
        " ".join(ed25519_key.split()[:2]),
        " ".join(other_key.split()[:2]),
    ]


def test_config_text_refusal_names_the_line(ed25519_key: str):
    with pytest.raises(InvalidRequestError) as info:
        parse_public_keys(f"{ed25519_key}\nssh-ed25519 ???\n", "config")

    assert info.value.field == "ssh-authorized-keys"
    assert "line 2" in str(info.value)


@given(st.text(max_size=300))
def test_parser_only_ever_refuses_with_invalid_request(text: str):
    try:
        key = parse_public_key(text, "config")
    except InvalidRequestError:
        return
    line = access.render_key_line(key, COMMAND)
    assert "\n" not in line
    assert managed_keys(render_authorized_keys("", [key], COMMAND)) == [key]


@pytest.mark.parametrize("name", ["virsh", "vmhost-test-virsh", "_libvirt", "a"])
def test_valid_user_names(name: str):
    assert access.validate_user_name(name) == name


@pytest.mark.parametrize("name", ["", "Root", "1abc", "a b", "a/b", "x" * 40, "-rf", "virsh\n"])
def test_bad_user_names_are_refused(name: str):
    with pytest.raises(InvalidRequestError, match="libvirt-user"):
        access.validate_user_name(name)


# ---------------------------------------------------------------------------------------------
# The managed block


def _key(text: str, source: str) -> AuthorizedKey:
    return parse_public_key(text, source)


def test_block_is_added_after_operator_lines(ed25519_key: str):
    existing = "# operator\nssh-ed25519 AAAAoperator me@host\n"

    text = render_authorized_keys(existing, [_key(ed25519_key, "config")], COMMAND)

    lines = text.splitlines()
    assert lines[:2] == ["# operator", "ssh-ed25519 AAAAoperator me@host"]
    assert lines[2] == BLOCK_BEGIN
    assert lines[-1] == BLOCK_END
    blob = ed25519_key.split()[1]
    assert f'restrict,command="{COMMAND}" ssh-ed25519 {blob} vm-host:config' in lines
    assert text.endswith("\n")


def test_block_is_replaced_wholesale_and_lines_around_it_survive(ed25519_key: str, other_key: str):
    first = render_authorized_keys(
        "before\n", [_key(ed25519_key, "config"), _key(other_key, "action:ci")], COMMAND
    )
    first += "after\n"

    second = render_authorized_keys(first, [_key(other_key, "relation:3:maas/0")], COMMAND)

    lines = second.splitlines()
    assert lines[0] == "before"
    assert lines[-1] == "after"
    assert lines.count(BLOCK_BEGIN) == 1
    assert [k.source for k in managed_keys(second)] == ["relation:3:maas/0"]
    assert ed25519_key.split()[1] not in second


def test_empty_key_list_removes_the_block(ed25519_key: str):
    with_block = render_authorized_keys("mine\n", [_key(ed25519_key, "config")], COMMAND)

    assert render_authorized_keys(with_block, [], COMMAND) == "mine\n"
    assert render_authorized_keys("", [], COMMAND) == ""


def test_order_is_stable_whatever_the_input_order(ed25519_key: str, other_key: str):
    keys = [
        _key(other_key, "relation:7:maas/1"),
        _key(ed25519_key, "action:laptop"),
        _key(other_key, "config"),
        _key(ed25519_key, "config"),
    ]

    forward = render_authorized_keys("", keys, COMMAND)
    backward = render_authorized_keys("", list(reversed(keys)), COMMAND)

    assert forward == backward
    sources = [k.source for k in managed_keys(forward)]
    assert sources == ["action:laptop", "config", "config", "relation:7:maas/1"]


def test_same_key_from_one_source_is_written_once(ed25519_key: str):
    key = _key(ed25519_key, "config")

    text = render_authorized_keys("", [key, key], COMMAND)

    assert len(managed_keys(text)) == 1


def test_rendering_is_idempotent(ed25519_key: str):
    keys = [_key(ed25519_key, "config")]
    once = render_authorized_keys("x\n", keys, COMMAND)

    assert render_authorized_keys(once, keys, COMMAND) == once


def test_dangling_begin_marker_keeps_operator_lines_after_it(ed25519_key: str, other_key: str):
    managed = access.render_key_line(_key(ed25519_key, "config"), COMMAND)
    broken = f"top\n{BLOCK_BEGIN}\n{managed}\nssh-ed25519 AAAAoperator me@host\n"

    text = render_authorized_keys(broken, [_key(other_key, "config")], COMMAND)

    lines = text.splitlines()
    assert lines[0] == "top"
    assert "ssh-ed25519 AAAAoperator me@host" in lines
    assert lines.count(BLOCK_BEGIN) == 1
    assert [k.public_key for k in managed_keys(text)] == [" ".join(other_key.split()[:2])]


def test_forced_command_with_quotes_is_refused(ed25519_key: str):
    with pytest.raises(access.VmHostError):
        access.render_key_line(_key(ed25519_key, "config"), '/bin/sh -c "x"')


def test_forced_command_prefers_virt_ssh_helper():
    command = access.forced_command()

    assert command in (
        f"{access.VIRT_SSH_HELPER} qemu:///system",
        f"{access.NETCAT} -q 0 -U {access.LIBVIRT_SOCKET}",
    )


@pytest.mark.parametrize(
    ("user", "address", "port", "uri"),
    [
        ("virsh", "10.0.0.5", 22, "qemu+ssh://virsh@10.0.0.5/system"),
        ("virsh", "10.0.0.5", 2222, "qemu+ssh://virsh@10.0.0.5:2222/system"),
        ("virsh", "fd00::5", 22, "qemu+ssh://virsh@[fd00::5]/system"),
        ("virsh", "host.example", 22, "qemu+ssh://virsh@host.example/system"),
    ],
)
def test_libvirt_uri(user: str, address: str, port: int, uri: str):
    assert access.libvirt_uri(user, address, port) == uri


@pytest.mark.parametrize("address", ["", "a/b", "x@y", "a b", "[::1]"])
def test_libvirt_uri_refuses_bad_addresses(address: str):
    with pytest.raises(InvalidRequestError, match="address"):
        access.libvirt_uri("virsh", address)


def test_ssh_host_public_keys_reads_pub_files_only(tmp_path, ed25519_key: str):
    (tmp_path / "ssh_host_ed25519_key.pub").write_text(ed25519_key + "\n")
    (tmp_path / "ssh_host_ed25519_key").write_text("PRIVATE\n")
    (tmp_path / "ssh_host_bogus_key.pub").write_text("garbage\n")

    keys = access.ssh_host_public_keys(tmp_path)

    assert keys == [" ".join(ed25519_key.split()[:2])]


def test_sshd_drop_in_confines_the_user():
    text = access.render_sshd_drop_in("virsh", COMMAND)

    assert "Match User virsh\n" in text
    assert f"ForceCommand {COMMAND}" in text
    for setting in ("PermitTTY no", "AllowTcpForwarding no", "X11Forwarding no"):
        assert setting in text


# ---------------------------------------------------------------------------------------------
# Certificates


def _certificate(
    not_before: datetime.datetime, not_after: datetime.datetime, cn: str = "vmhost-test"
) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def test_valid_certificate_is_accepted():
    pem = _certificate(NOW - DAY, NOW + DAY, cn="maas")

    cert = lxd_trust.parse_certificate(pem)

    assert cert.subject == "CN=maas"
    assert len(cert.fingerprint) == 64
    assert cert.pem.startswith("-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize(
    ("pem", "reason"),
    [
        (_certificate(NOW - 3 * DAY, NOW - DAY), "expired on"),
        (_certificate(NOW + DAY, NOW + 3 * DAY), "not valid before"),
        ("hello", "not a PEM certificate"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid X.509"),
        (_certificate(NOW - DAY, NOW + DAY) * 2, "exactly one certificate"),
        (
            _certificate(NOW - DAY, NOW + DAY)
            + "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "private key",
        ),
    ],
)
def test_bad_certificates_are_refused_with_the_reason(pem: str, reason: str):
    with pytest.raises(InvalidRequestError) as info:
        lxd_trust.parse_certificate(pem)

    assert info.value.field == "certificate"
    assert reason in str(info.value)


@pytest.mark.parametrize("name", ["", "Default", "a_b", "-x", "x" * 64, "a/b"])
def test_bad_project_names_are_refused(name: str):
    with pytest.raises(InvalidRequestError, match="lxd-project"):
        lxd_trust.validate_project(name)


def test_certificate_names_carry_the_prefix():
    assert lxd_trust.certificate_name("maas/0") == "vm-host:maas/0"
    with pytest.raises(InvalidRequestError):
        lxd_trust.certificate_name("bad name")


def test_missing_socket_is_reported(tmp_path):
    with pytest.raises(lxd_trust.LxdError, match="not running"):
        lxd_trust.find_socket([str(tmp_path / "nope.socket")])


def test_relation_and_action_certificate_names_do_not_overlap():
    assert lxd_trust.relation_certificate_name("maas/0") == "vm-host:maas/0"
    assert lxd_trust.action_certificate_name("terraform") == "vm-host:terraform"
    with pytest.raises(InvalidRequestError, match="unit"):
        lxd_trust.relation_certificate_name("maas")
    with pytest.raises(InvalidRequestError, match="no '/'"):
        lxd_trust.action_certificate_name("maas/0")

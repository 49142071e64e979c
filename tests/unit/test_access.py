"""Key and certificate validation, and the managed authorized_keys block (pure functions)."""

from __future__ import annotations

import base64
import datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from credentials import self_signed_pem
from fake_accounts import RecordedAccounts, access_layout
from fake_lxd import FakeLxd, serving
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
    return self_signed_pem(cn, not_before, not_after)


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


# ---------------------------------------------------------------------------------------------
# authorized_keys on disk (a user whose home is a temporary directory; no root needed)


@pytest.fixture
def home_user(tmp_path) -> access.AccessUser:
    import os

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    return access.AccessUser("virsh", os.getuid(), os.getgid(), home)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_sync_writes_only_on_change_with_private_mode(home_user, ed25519_key: str):
    key = _key(ed25519_key, "config")

    assert access.sync_authorized_keys(home_user, [key]) is True
    first = home_user.authorized_keys.stat().st_mtime_ns
    assert access.sync_authorized_keys(home_user, [key]) is False

    assert home_user.authorized_keys.stat().st_mtime_ns == first
    assert _mode(home_user.authorized_keys) == 0o600
    assert access.current_keys(home_user) == [key]


def test_sync_keys_keeps_action_keys_and_replaces_the_rest(
    home_user, ed25519_key: str, other_key: str
):
    home_user.authorized_keys.write_text("operator line\n")
    action_key = access.authorize_key(home_user, ed25519_key, "laptop")
    access.sync_keys(home_user, [_key(other_key, "config")])

    access.sync_keys(home_user, [_key(other_key, "relation:2:maas/0")])

    sources = [k.source for k in access.current_keys(home_user)]
    assert sources == ["action:laptop", "relation:2:maas/0"]
    assert home_user.authorized_keys.read_text().startswith("operator line\n")
    assert action_key in access.current_keys(home_user)
    with pytest.raises(InvalidRequestError, match="authorize_key"):
        access.sync_keys(home_user, [_key(other_key, "action:x")])


def test_authorize_is_idempotent_and_refuses_clashes(home_user, ed25519_key: str, other_key: str):
    key = access.authorize_key(home_user, ed25519_key, "laptop")

    assert access.authorize_key(home_user, ed25519_key, "laptop") == key
    with pytest.raises(InvalidRequestError, match="already names another key"):
        access.authorize_key(home_user, other_key, "laptop")
    with pytest.raises(InvalidRequestError, match="already authorized as 'laptop'"):
        access.authorize_key(home_user, ed25519_key, "desktop")
    with pytest.raises(InvalidRequestError, match="name"):
        access.authorize_key(home_user, other_key, "bad name")
    assert access.current_keys(home_user) == [key]


def test_revoke_by_name_or_fingerprint(home_user, ed25519_key: str, other_key: str):
    laptop = access.authorize_key(home_user, ed25519_key, "laptop")
    ci = access.authorize_key(home_user, other_key, "ci")

    assert access.revoke_key(home_user, "laptop") == [laptop]
    assert access.revoke_key(home_user, ci.fingerprint) == [ci]
    assert access.current_keys(home_user) == []
    with pytest.raises(InvalidRequestError, match="no key authorized by action"):
        access.revoke_key(home_user, "laptop")


def test_revoke_refuses_keys_that_come_from_config(home_user, ed25519_key: str):
    access.sync_keys(home_user, [_key(ed25519_key, "config")])
    fingerprint = _key(ed25519_key, "config").fingerprint

    with pytest.raises(InvalidRequestError, match="comes from config"):
        access.revoke_key(home_user, fingerprint)
    assert len(access.current_keys(home_user)) == 1


def test_remove_access_drops_the_block_and_keeps_an_adopted_user(home_user, ed25519_key: str):
    home_user.authorized_keys.write_text("operator line\n")
    access.authorize_key(home_user, ed25519_key, "laptop")

    assert access.remove_access(home_user) is False

    assert home_user.authorized_keys.read_text() == "operator line\n"


def test_symlinked_authorized_keys_is_refused(home_user, tmp_path, ed25519_key: str):
    target = tmp_path / "elsewhere"
    target.write_text("")
    home_user.authorized_keys.symlink_to(target)

    with pytest.raises(access.VmHostError, match="symlink"):
        access.sync_authorized_keys(home_user, [_key(ed25519_key, "config")])
    assert target.read_text() == ""


def test_unknown_user_is_reported():
    with pytest.raises(access.VmHostError, match="does not exist"):
        access.current_keys("vmhost-no-such-user")
    assert access.remove_access("vmhost-no-such-user") is False


def test_sshd_drop_in_is_written_once_and_removed(tmp_path):
    path = tmp_path / "sshd_config.d" / "vm-host.conf"

    assert access.ensure_sshd_drop_in("virsh", path) is True
    assert access.ensure_sshd_drop_in("virsh", path) is False
    assert _mode(path) == 0o644
    assert access.remove_sshd_drop_in(path) is True
    assert access.remove_sshd_drop_in(path) is False


# ---------------------------------------------------------------------------------------------
# LXD trust against an in-memory LXD API on a unix socket (the real daemon is exercised in
# tests/integration/test_access_lxd.py)


@pytest.fixture
def fake_lxd(tmp_path):
    path = str(tmp_path / "unix.socket")
    with serving(FakeLxd(_certificate(NOW - DAY, NOW + DAY, cn="server")), path) as fake:
        yield fake, lxd_trust.LxdTrust(path, timeout=5)


def test_fake_lxd_https_address_is_set_once_and_cleared(fake_lxd):
    fake, trust = fake_lxd

    assert trust.ensure_https("10.0.0.5", 8443) is True
    assert trust.ensure_https("10.0.0.5", 8443) is False
    assert trust.ensure_https("fd00::5", 8443) is True
    assert fake.config["core.https_address"] == "[fd00::5]:8443"
    assert trust.disable_https() is True
    assert trust.disable_https() is False
    with pytest.raises(InvalidRequestError, match="https-port"):
        trust.ensure_https("10.0.0.5", 0)
    with pytest.raises(InvalidRequestError, match="address"):
        trust.ensure_https("a/b", 8443)


def test_fake_lxd_project_is_created_with_a_root_disk(fake_lxd):
    fake, trust = fake_lxd

    assert trust.ensure_project("vm-host", storage_pool="default") is True
    assert trust.ensure_project("vm-host", storage_pool="default") is False

    assert fake.projects["vm-host"]["config"] == lxd_trust.PROJECT_FEATURES
    assert fake.profiles["vm-host"]["devices"]["root"] == {
        "type": "disk",
        "path": "/",
        "pool": "default",
    }
    trust.delete_project("vm-host")
    assert "vm-host" not in fake.projects


def test_fake_lxd_trust_rotate_and_untrust(fake_lxd):
    _fake, trust = fake_lxd
    trust.ensure_project("vm-host")
    first = _certificate(NOW - DAY, NOW + DAY, cn="a")
    second = _certificate(NOW - DAY, NOW + DAY, cn="b")

    assert trust.trust_certificate(first, "vm-host:maas/0", ["vm-host"]) is True
    assert trust.trust_certificate(first, "vm-host:maas/0", ["vm-host"]) is False
    assert trust.trust_certificate(first, "vm-host:maas/0", ["vm-host", "default"]) is True
    assert trust.trust_certificate(second, "vm-host:maas/0", ["vm-host"]) is True

    (only,) = trust.trusted()
    assert only.fingerprint == lxd_trust.parse_certificate(second).fingerprint
    assert only.restricted
    assert only.projects == ("vm-host",)
    assert only.from_relation
    assert trust.untrust("vm-host:maas/0") is True
    assert trust.trusted() == []
    with pytest.raises(InvalidRequestError, match="no such LXD project"):
        trust.trust_certificate(first, "vm-host:maas/0", ["nope"])
    with pytest.raises(InvalidRequestError, match="must start with"):
        trust.untrust("maas/0")


def test_fake_lxd_relation_sync_and_remove_managed(fake_lxd):
    fake, trust = fake_lxd
    trust.ensure_project("vm-host")
    trust.ensure_https("127.0.0.1", 8443)
    a = _certificate(NOW - DAY, NOW + DAY, cn="a")
    b = _certificate(NOW - DAY, NOW + DAY, cn="b")
    trust.trust_certificate(b, "vm-host:terraform", ["vm-host"])

    refused = trust.sync_relation_certificates(
        {"maas/0": (a, ["vm-host"]), "maas/1": ("garbage", ["vm-host"])}
    )

    assert list(refused) == ["maas/1"]
    assert sorted(c.name for c in trust.trusted()) == ["vm-host:maas/0", "vm-host:terraform"]
    assert trust.sync_relation_certificates({}) == {}
    assert [c.name for c in trust.trusted()] == ["vm-host:terraform"]
    trust.issue_trust_token("pending", ["vm-host"])
    assert trust.remove_managed() == ["vm-host:pending", "vm-host:terraform"]
    assert trust.trusted() == []
    assert fake.operations == {}


def test_fake_lxd_token_is_the_lxd_5_0_format(fake_lxd):
    _fake, trust = fake_lxd
    trust.ensure_project("vm-host")

    with pytest.raises(lxd_trust.LxdError, match="refused the token request"):
        trust.issue_trust_token("maas", ["vm-host"])
    trust.ensure_https("127.0.0.1", 8443)
    token = trust.issue_trust_token("maas", ["vm-host"])

    import json as json_module

    decoded = json_module.loads(base64.b64decode(token))
    assert decoded["client_name"] == "vm-host:maas"
    assert decoded["secret"] == "s"
    assert decoded["addresses"] == ["127.0.0.1:8443"]
    with pytest.raises(InvalidRequestError, match="no '/'"):
        trust.issue_trust_token("maas/0", ["vm-host"])
    with pytest.raises(InvalidRequestError, match="at least one project"):
        trust.issue_trust_token("maas", [])


def test_fake_lxd_errors_become_lxd_errors(fake_lxd, tmp_path):
    fake, trust = fake_lxd
    fake.fail_next = "disk full"

    with pytest.raises(lxd_trust.LxdError, match="disk full"):
        trust.projects()
    with pytest.raises(lxd_trust.LxdError, match="cannot be reached"):
        lxd_trust.LxdTrust(str(tmp_path / "gone.socket")).projects()


@pytest.mark.parametrize("name", sorted(access.SYSTEM_ACCOUNTS))
def test_system_and_login_accounts_are_refused(name: str):
    with pytest.raises(InvalidRequestError, match="dedicated name such as 'virsh'"):
        access.validate_user_name(name)


def test_an_existing_account_is_adopted_only_when_asked(tmp_path, monkeypatch):
    import os

    user = access.AccessUser("operator1", os.getuid() or 1000, os.getgid(), tmp_path)
    assert "libvirt-user-adopt=true" in (access._account_problem("operator1", user, False) or "")
    assert access._account_problem("operator1", user, True) is None
    (tmp_path / access.CREATED_MARKER).write_text("made by vm-host\n")
    assert access._account_problem("operator1", user, False) is None


def test_uid_zero_is_never_the_access_user(tmp_path):
    user = access.AccessUser("toor", 0, 0, tmp_path)
    assert "uid 0" in (access._account_problem("toor", user, True) or "")


def test_a_missing_account_whose_name_is_a_group_cannot_be_created(tmp_path):
    accounts = RecordedAccounts(groups=["libvirt", "web"])
    layout = access_layout(tmp_path, accounts)
    assert "a group named web" in (access._account_problem("web", None, False, layout) or "")
    with pytest.raises(access.VmHostError, match="a group named web"):
        access.ensure_user("web", layout=layout)
    assert accounts.calls == []


def test_a_created_access_user_is_locked_marked_and_in_the_libvirt_groups(tmp_path):
    accounts = RecordedAccounts(groups=["libvirt", "libvirt-qemu"])
    layout = access_layout(tmp_path, accounts)

    user = access.ensure_user("virsh", layout=layout)

    home = tmp_path / "home" / "virsh"
    assert accounts.calls == [f"useradd:virsh:{home}:/bin/sh:libvirt,libvirt-qemu", "lock:virsh"]
    assert (home / access.CREATED_MARKER).exists()
    assert _mode(home / ".ssh") == 0o700
    assert _mode(user.authorized_keys) == 0o600
    assert access.user_problem("virsh", layout=layout) is None
    # Again: nothing more is asked of the account databases.
    access.ensure_user("virsh", layout=layout)
    assert len(accounts.calls) == 2


def test_an_adopted_account_joins_the_groups_and_is_never_deleted(tmp_path):
    accounts = RecordedAccounts(groups=["libvirt"])
    layout = access_layout(tmp_path, accounts)
    accounts.existing("operator1", tmp_path / "op")
    with pytest.raises(access.VmHostError, match="libvirt-user-adopt=true"):
        access.ensure_user("operator1", layout=layout)

    access.ensure_user("operator1", adopt=True, layout=layout)
    assert accounts.calls == ["usermod:operator1:libvirt"]
    assert access.remove_access("operator1", layout) is False
    assert accounts.calls == ["usermod:operator1:libvirt"]


def test_an_account_without_a_login_shell_is_not_adopted(tmp_path):
    accounts = RecordedAccounts()
    layout = access_layout(tmp_path, accounts)
    accounts.existing("operator1", tmp_path / "op", "/usr/sbin/nologin")
    assert "login shell /usr/sbin/nologin" in (
        access.user_problem("operator1", True, layout) or ""
    )
    with pytest.raises(access.VmHostError, match="usermod --shell"):
        access.ensure_user("operator1", adopt=True, layout=layout)
    assert accounts.calls == []

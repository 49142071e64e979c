"""User data: vm-host's own #cloud-config (hostname, keys) joined to the requester's as MIME."""

from __future__ import annotations

import pytest
import yaml
from mime import mime_parts

from credentials import ed25519_public_key
from vmhost import cloudinit, userdata
from vmhost.constraints import build_spec, spec_hash, validate_hostname
from vmhost.model import InvalidRequestError


def spec(**kw: object):
    return build_spec(name="web-0", memory_mib=512, **kw)  # type: ignore[arg-type]


def test_without_user_data_it_is_vm_hosts_cloud_config_alone() -> None:
    key = ed25519_public_key() + " me@laptop"
    text = cloudinit.user_data(spec(ssh_public_keys=[key], hostname="Web-0.Example.com."))
    assert text.startswith("#cloud-config\n")
    assert yaml.safe_load(text) == {
        "hostname": "web-0",
        "fqdn": "web-0.example.com",
        "ssh_authorized_keys": [key],
    }
    assert key in text  # one line, never wrapped


def test_the_vm_name_is_the_default_hostname() -> None:
    assert yaml.safe_load(cloudinit.user_data(spec())) == {"hostname": "web-0"}


def test_requesters_cloud_config_comes_first_unchanged_and_vm_hosts_part_is_merged() -> None:
    key = ed25519_public_key()
    theirs = "#cloud-config\nssh_authorized_keys: [their-key]\npackages: [htop]\n"
    (first, second) = mime_parts(
        cloudinit.user_data(spec(user_data=theirs, ssh_public_keys=[key]))
    )
    assert first[:2] == ("text/cloud-config", theirs)
    assert second[0] == "text/cloud-config"
    assert yaml.safe_load(second[1]) == {"hostname": "web-0", "ssh_authorized_keys": [key]}
    # Lists append (both sets of keys stay), the requester's values win.
    assert second[2]["Merge-Type"] == "list(append)+dict(no_replace,recurse_list)+str()"
    assert second[2]["Merge-Type"] == userdata.CHARM_MERGE_TYPE


@pytest.mark.parametrize(
    ("text", "content_type"),
    [
        ("#!/bin/sh\necho hi\n", "text/x-shellscript"),
        ("#include\nhttps://example.com/cfg\n", "text/x-include-url"),
        ("#include-once\nhttps://example.com/cfg\n", "text/x-include-once-url"),
        ("#cloud-boothook\n#!/bin/sh\ntrue\n", "text/cloud-boothook"),
        ("#cloud-config-archive\n- content: '#cloud-config'\n", "text/cloud-config-archive"),
        (
            '#cloud-config-jsonp\n[{"op": "add", "path": "/a", "value": 1}]',
            "text/cloud-config-jsonp",
        ),
        ("## template: jinja\n#cloud-config\na: 1\n", "text/jinja2"),
        ("#part-handler\ndef list_types(): return []\n", "text/part-handler"),
    ],
)
def test_every_kind_cloud_init_acts_on_is_kept_as_its_own_part(text, content_type) -> None:
    parts = mime_parts(cloudinit.user_data(spec(user_data=text)))
    assert [(t, body) for t, body, _ in parts[:-1]] == [(content_type, text)]
    assert yaml.safe_load(parts[-1][1]) == {"hostname": "web-0"}


def test_mime_user_data_keeps_every_part_and_types_plain_parts_by_their_first_line() -> None:
    theirs = (
        'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
        "--XX\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho one\n"
        "--XX\nContent-Type: text/plain\nX-Merge-Type: list(append)\n\n"
        "#cloud-config\nruncmd: [ls]\n"
        "--XX--\n"
    )
    parts = mime_parts(cloudinit.user_data(spec(user_data=theirs)))
    assert [(t, body.strip()) for t, body, _ in parts] == [
        ("text/x-shellscript", "#!/bin/sh\necho one"),
        ("text/cloud-config", "#cloud-config\nruncmd: [ls]"),
        ("text/cloud-config", "#cloud-config\nhostname: web-0"),
    ]
    assert parts[1][2]["Merge-Type"] == "list(append)"


def test_non_ascii_user_data_survives() -> None:
    theirs = "#cloud-config\nwrite_files:\n- path: /etc/motd\n  content: 'Grüße ☃'\n"
    (first, _) = mime_parts(cloudinit.user_data(spec(user_data=theirs)))
    assert first[1] == theirs


def test_the_same_request_gives_the_same_user_data() -> None:
    one = cloudinit.user_data(spec(user_data="#!/bin/sh\ntrue\n"))
    assert one == cloudinit.user_data(spec(user_data="#!/bin/sh\ntrue\n"))
    assert one != cloudinit.user_data(spec(user_data="#!/bin/sh\nfalse\n"))


def test_a_hostname_in_the_requesters_cloud_config_is_theirs_whole() -> None:
    theirs = "#cloud-config\nhostname: mine\n"
    (_, ours) = mime_parts(cloudinit.user_data(spec(user_data=theirs)))
    assert yaml.safe_load(ours[1]) is None or "hostname" not in yaml.safe_load(ours[1])


@pytest.mark.parametrize(
    ("kw", "field", "phrase"),
    [
        ({"user_data": "hello world"}, "user-data", "cloud-init would ignore user data"),
        ({"user_data": "#cloud-config\n- a\n"}, "user-data", "must be a YAML mapping"),
        ({"user_data": "#cloud-config\na: [\n"}, "user-data", "not valid YAML at line 3"),
        ({"user_data": "Content-Type: text/html\n\n<p>"}, "user-data", "must be multipart"),
        (
            {
                "user_data": 'Content-Type: multipart/mixed; boundary="XX"\n\n'
                "--XX\nContent-Type: text/html\n\n<p>\n--XX--\n"
            },
            "user-data",
            "MIME part 1 has type 'text/html', which cloud-init ignores",
        ),
        (
            {
                "user_data": 'Content-Type: multipart/mixed; boundary="XX"\n\n'
                "--XX\nContent-Type: text/plain\n\nhello\n--XX--\n"
            },
            "user-data",
            "MIME part 1 has type 'text/plain'",
        ),
        ({"user_data": "#!/bin/sh\n" + "x" * 65536}, "user-data", "the limit is 65536"),
        ({"hostname": "-web"}, "hostname", "is not a hostname"),
        ({"hostname": "web_0"}, "hostname", "is not a hostname"),
        ({"hostname": "a" * 64}, "hostname", "is not a hostname"),
        ({"hostname": ".".join(["abcdefgh"] * 29)}, "hostname", "253 characters at most"),
        ({"hostname": 7}, "hostname", "must be a string"),
        (
            {"hostname": "web-1", "user_data": "#cloud-config\nfqdn: a.example.com\n"},
            "hostname",
            "the user-data sets hostname or fqdn too",
        ),
        ({"ssh_public_keys": "ssh-ed25519 AAAA, me"}, "ssh-public-keys", ""),
    ],
)
def test_bad_inputs_are_refused_naming_the_field(kw, field, phrase) -> None:
    with pytest.raises(InvalidRequestError) as err:
        spec(**kw)
    assert err.value.field == field
    assert phrase in str(err.value)


def test_action_keys_may_be_comma_or_newline_separated() -> None:
    keys = [ed25519_public_key() + f" k{i}" for i in range(3)]
    text = f"{keys[0]}, {keys[1]}\n{keys[2]}\n"
    assert spec(ssh_public_keys=text).ssh_public_keys == tuple(keys)


def test_hostnames_fold_to_lower_case_and_lose_a_trailing_dot() -> None:
    assert validate_hostname("DB-0.Example.COM.") == "db-0.example.com"
    assert validate_hostname("x") == "x"


def test_a_new_hostname_field_leaves_existing_spec_hashes_alone() -> None:
    # The hash of this request before VmSpec had a hostname: VMs composed then are unchanged.
    assert spec_hash(spec()) == "b86abb0b50fd3418"
    assert spec_hash(spec(hostname="other")) != "b86abb0b50fd3418"

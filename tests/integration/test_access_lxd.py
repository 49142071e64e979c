"""LXD HTTPS trust against the real LXD daemon of this machine.

A client certificate is untrusted before, trusted for its project only after trust_certificate,
untrusted again after untrust; a trust token admits one fresh client once. Every client pins
the server certificate.
"""

from __future__ import annotations

import base64
import datetime
import json
from pathlib import Path

import pytest
from tests.integration import lxd_fixture
from tests.integration.lxd_fixture import PREFIX, make_certificate, make_client

from vmhost.lxd_trust import LxdTrust
from vmhost.model import InvalidRequestError

pytestmark = pytest.mark.integration

lxd = lxd_fixture.lxd

PROJECT = f"{PREFIX}access"
OTHER = f"{PREFIX}other"


@pytest.fixture
def projects(lxd: LxdTrust):
    assert lxd.ensure_project(PROJECT, storage_pool="default") is True
    assert lxd.ensure_project(PROJECT, storage_pool="default") is False
    lxd.ensure_project(OTHER)
    yield PROJECT, OTHER
    lxd_fixture.cleanup(lxd)


def test_https_listens_where_asked_and_serves_the_pinned_certificate(lxd: LxdTrust):
    assert lxd.https_address() == f"127.0.0.1:{lxd_fixture.HTTPS_PORT}"
    assert lxd.ensure_https("127.0.0.1", lxd_fixture.HTTPS_PORT) is False
    assert lxd.server_certificate().startswith("-----BEGIN CERTIFICATE-----")


def test_trusted_for_its_project_only_then_untrusted(
    lxd: LxdTrust, projects: tuple[str, str], tmp_path: Path
):
    client = make_client(tmp_path, f"{PREFIX}client", lxd)
    name = f"vm-host:{PREFIX}client"

    assert client.auth() == "untrusted"

    assert lxd.trust_certificate(client.pem, name, [PROJECT]) is True
    assert lxd.trust_certificate(client.pem, name, [PROJECT]) is False
    entry = [c for c in lxd.trusted() if c.name == name]
    assert len(entry) == 1
    assert entry[0].restricted
    assert entry[0].projects == (PROJECT,)
    assert client.auth() == "trusted"

    # It can use its project: list instances, create and delete a profile.
    listed = client.request("GET", f"/1.0/instances?project={PROJECT}")
    assert listed.status_code == 200, listed.text
    assert listed.json()["metadata"] == []
    created = client.request(
        "POST", f"/1.0/profiles?project={PROJECT}", {"name": f"{PREFIX}profile", "config": {}}
    )
    assert created.status_code in (200, 201), created.text
    deleted = client.request("DELETE", f"/1.0/profiles/{PREFIX}profile?project={PROJECT}")
    assert deleted.status_code == 200, deleted.text

    # It is refused on another project, and on server-wide settings.
    refused = client.request("GET", f"/1.0/instances?project={OTHER}")
    assert refused.status_code == 403, refused.text
    patched = client.request("PATCH", "/1.0", {"config": {"core.https_address": ":1"}})
    assert patched.status_code == 403, patched.text

    assert lxd.untrust(name) is True
    assert client.auth() == "untrusted"
    assert lxd.untrust(name) is False
    assert client.request("GET", f"/1.0/instances?project={PROJECT}").status_code == 403


def test_a_new_certificate_under_the_same_name_replaces_the_old_one(
    lxd: LxdTrust, projects: tuple[str, str], tmp_path: Path
):
    name = f"vm-host:{PREFIX}rotating"
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = make_client(tmp_path / "old", "old", lxd)
    new = make_client(tmp_path / "new", "new", lxd)

    lxd.trust_certificate(old.pem, name, [PROJECT])
    lxd.trust_certificate(new.pem, name, [PROJECT, OTHER])

    assert old.auth() == "untrusted"
    assert new.auth() == "trusted"
    assert [c.projects for c in lxd.trusted() if c.name == name] == [
        tuple(sorted([PROJECT, OTHER]))
    ]
    with pytest.raises(InvalidRequestError, match="already trusted as"):
        lxd.trust_certificate(new.pem, f"vm-host:{PREFIX}thief", [PROJECT])
    lxd.untrust(name)


def test_bad_requests_change_nothing(lxd: LxdTrust, projects: tuple[str, str], tmp_path: Path):
    now = datetime.datetime.now(datetime.UTC)
    expired, _ = make_certificate(
        tmp_path, "expired", now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)
    )
    good, _ = make_certificate(tmp_path, "good")
    before = lxd.trusted()

    with pytest.raises(InvalidRequestError, match="expired on"):
        lxd.trust_certificate(expired.read_text(), f"vm-host:{PREFIX}x", [PROJECT])
    with pytest.raises(InvalidRequestError, match="no such LXD project"):
        lxd.trust_certificate(good.read_text(), f"vm-host:{PREFIX}x", [f"{PREFIX}missing"])
    with pytest.raises(InvalidRequestError, match="at least one project"):
        lxd.trust_certificate(good.read_text(), f"vm-host:{PREFIX}x", [])
    with pytest.raises(InvalidRequestError, match="must start with"):
        lxd.trust_certificate(good.read_text(), f"{PREFIX}x", [PROJECT])

    assert lxd.trusted() == before


def test_a_trust_token_admits_one_client_once(
    lxd: LxdTrust, projects: tuple[str, str], tmp_path: Path
):
    token = lxd.issue_trust_token(f"{PREFIX}fresh", [PROJECT])
    decoded = json.loads(base64.b64decode(token))
    assert decoded["client_name"] == f"vm-host:{PREFIX}fresh"
    assert f"127.0.0.1:{lxd_fixture.HTTPS_PORT}" in decoded["addresses"]
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = make_client(tmp_path / "first", "first", lxd)
    second = make_client(tmp_path / "second", "second", lxd)

    # LXD 5.0 takes the whole token as the password of an untrusted client's POST.
    joined = first.request("POST", "/1.0/certificates", {"type": "client", "password": token})
    assert joined.status_code in (200, 201), joined.text
    assert first.auth() == "trusted"
    entry = [c for c in lxd.trusted() if c.name == f"vm-host:{PREFIX}fresh"]
    assert len(entry) == 1
    assert entry[0].restricted
    assert entry[0].projects == (PROJECT,)
    assert first.request("GET", f"/1.0/instances?project={OTHER}").status_code == 403

    again = second.request("POST", "/1.0/certificates", {"type": "client", "password": token})
    assert again.status_code == 403, again.text
    assert second.auth() == "untrusted"

    assert lxd.untrust(f"vm-host:{PREFIX}fresh") is True
    assert first.auth() == "untrusted"


def test_an_unused_token_is_withdrawn_by_untrust(
    lxd: LxdTrust, projects: tuple[str, str], tmp_path: Path
):
    token = lxd.issue_trust_token(f"{PREFIX}never", [PROJECT])
    client = make_client(tmp_path, "never", lxd)

    assert lxd.untrust(f"vm-host:{PREFIX}never") is True

    refused = client.request("POST", "/1.0/certificates", {"type": "client", "password": token})
    assert refused.status_code == 403, refused.text
    assert client.auth() == "untrusted"


def test_relation_sync_trusts_live_units_and_drops_departed_ones(
    lxd: LxdTrust, projects: tuple[str, str], tmp_path: Path
):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unit_a = make_client(tmp_path / "a", "a", lxd)
    unit_b = make_client(tmp_path / "b", "b", lxd)
    by_action = make_client(tmp_path, "action", lxd)
    lxd.trust_certificate(by_action.pem, f"vm-host:{PREFIX}by-action", [PROJECT])
    app = f"{PREFIX}manager"
    now = datetime.datetime.now(datetime.UTC)
    expired, _ = make_certificate(
        tmp_path, "stale", now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)
    )

    refused = lxd.sync_relation_certificates(
        {
            f"{app}/0": (unit_a.pem, [PROJECT]),
            f"{app}/1": (unit_b.pem, [PROJECT]),
            f"{app}/2": (expired.read_text(), [PROJECT]),
        }
    )

    assert list(refused) == [f"{app}/2"]
    assert "expired" in refused[f"{app}/2"]
    assert unit_a.auth() == "trusted"
    assert unit_b.auth() == "trusted"

    # Unit 1 departs, then the relation is broken: each loses exactly its own access.
    assert lxd.sync_relation_certificates({f"{app}/0": (unit_a.pem, [PROJECT])}) == {}
    assert unit_a.auth() == "trusted"
    assert unit_b.auth() == "untrusted"
    assert lxd.sync_relation_certificates({}) == {}
    assert unit_a.auth() == "untrusted"
    assert by_action.auth() == "trusted"
    lxd.untrust(f"vm-host:{PREFIX}by-action")


def test_remove_managed_takes_only_vm_hosts_certificates_and_tokens(
    lxd: LxdTrust, projects: tuple[str, str], tmp_path: Path
):
    client = make_client(tmp_path, "managed", lxd)
    lxd.trust_certificate(client.pem, f"vm-host:{PREFIX}managed", [PROJECT])
    token = lxd.issue_trust_token(f"{PREFIX}pending", [PROJECT])
    (tmp_path / "late").mkdir()
    late = make_client(tmp_path / "late", "late", lxd)
    others = [c for c in lxd.trusted() if not c.name.startswith(f"vm-host:{PREFIX}")]

    removed = lxd.remove_managed(f"vm-host:{PREFIX}")

    assert removed == [f"vm-host:{PREFIX}managed", f"vm-host:{PREFIX}pending"]
    assert client.auth() == "untrusted"
    refused = late.request("POST", "/1.0/certificates", {"type": "client", "password": token})
    assert refused.status_code == 403, refused.text
    assert [c for c in lxd.trusted() if not c.name.startswith(f"vm-host:{PREFIX}")] == others
    with pytest.raises(InvalidRequestError, match="must start with"):
        lxd.remove_managed("")


def test_describe_lists_clients_with_source_and_pending_tokens(
    lxd: LxdTrust, projects: tuple[str, str], tmp_path: Path
):
    action = make_client(tmp_path, f"{PREFIX}listed", lxd)
    lxd.trust_certificate(action.pem, f"vm-host:{PREFIX}listed", [PROJECT])
    unit = make_client(tmp_path, f"{PREFIX}unit", lxd)
    lxd.sync_relation_certificates({f"{PREFIX}mgr/0": (unit.pem, [PROJECT])})
    token = lxd.issue_trust_token(f"{PREFIX}later", [PROJECT])
    rows = {r["name"]: r for r in lxd.describe()}
    listed = rows[f"{PREFIX}listed"]
    assert (listed["source"], listed["projects"]) == ("action", PROJECT)
    assert listed["fingerprint"] in {c.fingerprint for c in lxd.trusted()}
    assert rows[f"{PREFIX}mgr/0"]["source"] == "relation"
    assert rows[f"{PREFIX}later"]["source"] == "token"
    assert token not in json.dumps(list(rows.values()))  # the secret is never listed
    lxd.untrust(f"vm-host:{PREFIX}later")

"""The charm's images: default-image, background fetches for relations, the image actions.

ops.testing with the in-memory backend and its FakeImageStore; fetches are recorded (no
network), their real behaviour is tested in test_imagecache and on the real libvirtd.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ops import testing

import charms.vm_host.v0.vm_host as vm_lib
from fake_backend import FakeBackend, FakeImageStore
from vmhost import imagecache
from vmhost.constraints import build_spec, spec_hash
from vmhost.images import ImageFetchError
from vmhost.layout import HostLayout

pytestmark = pytest.mark.usefixtures("fake_host")

WEB = {"id": "web-0", "cores": 1, "memory": 512}


@pytest.fixture
def store(backend: FakeBackend, tmp_path: Path) -> FakeImageStore:
    backend.images = FakeImageStore(tmp_path / "pool")
    (tmp_path / "pool").mkdir()
    return backend.images


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    calls: list[tuple[str, bool]] = []

    def launch(settings: imagecache.Settings, name: str, *, refresh: bool = False) -> str:
        calls.append((name, refresh))
        return "recorded"

    monkeypatch.setattr(imagecache, "start_background", launch)
    return calls


def answer(out: testing.State, relation: testing.Relation, request_id: str) -> vm_lib.VmAnswer:
    return {a.id: a for a in vm_lib.answers_from(out.get_relation(relation.id))}[request_id]


def test_a_relation_request_waits_pending_for_its_image_then_is_composed(
    ctx, backend: FakeBackend, store: FakeImageStore, launched
):
    relation = vm_lib.requirer_relation([WEB], remote_app_name="web")
    state = testing.State(leader=True, relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation), state)
    got = answer(out, relation, "web-0")
    assert (got.state, got.error) == ("pending", "fetching ubuntu@24.04: started")
    assert launched == [("ubuntu@24.04", False)]
    assert backend.vms == {}

    store.cache("ubuntu@24.04")  # the background fetch finished
    out = ctx.run(ctx.on.update_status(), out)
    got = answer(out, relation, "web-0")
    assert got.state == "running"
    spec = backend.composed[got.name or ""][0]
    assert (spec.image, spec.image_from_default) == ("ubuntu@24.04", True)
    assert len(launched) == 1


def test_a_failed_fetch_fails_the_request_with_its_reason(
    ctx, backend: FakeBackend, store: FakeImageStore, launched, layout: HostLayout
):
    settings = imagecache.Settings(state_dir=layout.image_state_dir)
    imagecache.write_state(
        settings,
        imagecache.FetchState(
            "ubuntu@22.04", "failed", reason="signature", error="BAD signature", updated=1e12
        ),
    )
    relation = vm_lib.requirer_relation([WEB | {"image": "jammy"}], remote_app_name="web")
    out = ctx.run(
        ctx.on.relation_changed(relation), testing.State(leader=True, relations={relation})
    )
    got = answer(out, relation, "web-0")
    assert got.state == "failed"
    assert got.error is not None
    assert "[signature]" in got.error
    assert launched == []
    assert backend.vms == {}


def test_the_default_image_never_makes_an_existing_vm_look_changed():
    without = build_spec(name="vm", memory_mib=512)
    defaulted = build_spec(name="vm", memory_mib=512, default_image="ubuntu@24.04")
    assert defaulted.image == "ubuntu@24.04"
    assert spec_hash(defaulted) == spec_hash(without)
    named = build_spec(name="vm", memory_mib=512, image="ubuntu@24.04")
    assert not named.image_from_default
    assert spec_hash(named) != spec_hash(without)


def test_empty_default_image_boots_from_the_network(ctx, backend: FakeBackend, store):
    state = testing.State(leader=True, config={"default-image": ""})
    ctx.run(ctx.on.action("compose-vm", params={"name": "pxe-0", "memory": 512}), state)
    assert backend.composed["pxe-0"][0].image is None


def test_compose_vm_fetches_in_the_foreground_and_fails_with_the_reason(
    ctx, backend: FakeBackend, store: FakeImageStore, monkeypatch: pytest.MonkeyPatch
):
    fetched: list[str] = []

    def ensure(s, name, settings, *, log=None, **_kw):
        fetched.append(name)
        assert log is not None
        log("downloading ubuntu@24.04: 10/20 MB")
        raise ImageFetchError("checksum", "sha256 0000 is not the abcd the index says")

    monkeypatch.setattr(imagecache, "ensure", ensure)
    with pytest.raises(testing.ActionFailed) as failed:
        ctx.run(
            ctx.on.action("compose-vm", params={"name": "web-0", "memory": 512}),
            testing.State(leader=True),
        )
    assert failed.value.message.startswith("image not available, nothing done: ")
    assert "sha256" in failed.value.message
    assert fetched == ["ubuntu@24.04"]
    assert "downloading ubuntu@24.04: 10/20 MB" in ctx.action_logs
    assert backend.vms == {}


def test_compose_vm_from_a_cached_image_fetches_nothing(
    ctx, backend: FakeBackend, store: FakeImageStore, monkeypatch: pytest.MonkeyPatch
):
    store.cache("ubuntu@22.04")
    out = ctx.run(
        ctx.on.action("compose-vm", params={"name": "web-0", "memory": 512, "image": "jammy"}),
        testing.State(leader=True),
    )
    assert out.unit_status is not None
    assert backend.composed["web-0"][0].image == "ubuntu@22.04"
    assert not any(c.startswith("add:") for c in store.calls)


def test_sync_images_defaults_to_default_image_and_images(
    ctx, backend: FakeBackend, store: FakeImageStore, monkeypatch: pytest.MonkeyPatch
):
    synced: list[tuple[str, bool]] = []

    def ensure(s, name, settings, *, refresh=False, log=None, **_kw):
        synced.append((name, refresh))
        store.cache(name)
        return store.cached_images()[-1]

    monkeypatch.setattr(imagecache, "ensure", ensure)
    state = testing.State(leader=True, config={"images": "jammy, local:web"})
    ctx.run(ctx.on.action("sync-images"), state)
    assert synced == [("ubuntu@24.04", True), ("ubuntu@22.04", True), ("local:web", True)]
    assert "ubuntu@22.04" in ctx.action_results["table"]


def test_list_images_shows_versions_and_users(ctx, backend: FakeBackend, store: FakeImageStore):
    store.cache("ubuntu@24.04", sha256="d" * 64)
    store.users = {next(iter(store.bases)): ["web-0"]}
    ctx.run(ctx.on.action("list-images"), testing.State(leader=True))
    listed = json.loads(ctx.action_results["json"])
    assert [(i["name"], i["version"], i["vms"]) for i in listed] == [
        ("ubuntu@24.04", "20261201", ["web-0"])
    ]
    assert "web-0" in ctx.action_results["table"]


def test_update_status_keeps_the_images_option_fetched(
    ctx, backend: FakeBackend, store: FakeImageStore, launched
):
    store.cache("ubuntu@24.04")
    state = testing.State(leader=True, config={"images": "ubuntu@24.04,ubuntu@22.04"})
    ctx.run(ctx.on.update_status(), state)
    assert launched == [("ubuntu@24.04", True), ("ubuntu@22.04", False)]


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("default-image", "/etc/shadow", "host path"),
        ("default-image", "bogus", "not an image name"),
        ("images", "noble,/srv/x.img", "host path"),
        ("image-source", "ftp://mirror/", "http://, https:// or file://"),
        ("image-keyring", "keyring.gpg", "absolute path"),
    ],
)
def test_bad_image_options_block_naming_the_option(ctx, backend, option, value, words):
    out = ctx.run(ctx.on.config_changed(), testing.State(config={option: value}))
    assert isinstance(out.unit_status, testing.BlockedStatus)
    assert words in out.unit_status.message


# -- a backend without vm-host's cache (LXD pulls into its own store)


def test_on_lxd_the_default_image_is_pulled_apart_and_the_request_answered_pending(
    ctx, backend: FakeBackend
):
    assert backend.images is None  # like LxdBackend: image_store() is None
    backend.image_waits["ubuntu@24.04"] = "downloading ubuntu@24.04 20261201 into LXD"
    relation = vm_lib.requirer_relation([WEB], remote_app_name="web")
    state = testing.State(leader=True, relations={relation})
    out = ctx.run(ctx.on.relation_changed(relation), state)
    got = answer(out, relation, "web-0")
    assert (got.state, got.error) == ("pending", "downloading ubuntu@24.04 20261201 into LXD")
    assert "prepare_image:ubuntu@24.04:background" in backend.calls
    assert backend.vms == {}

    del backend.image_waits["ubuntu@24.04"]  # LXD's pull finished
    out = ctx.run(ctx.on.update_status(), out)
    got = answer(out, relation, "web-0")
    assert got.state == "running"
    assert backend.composed[got.name or ""][0].image == "ubuntu@24.04"


def test_on_lxd_compose_vm_and_sync_images_wait_for_the_pull(ctx, backend: FakeBackend):
    ctx.run(
        ctx.on.action("compose-vm", params={"name": "web-0", "memory": 512}),
        testing.State(leader=True),
    )
    assert "prepare_image:ubuntu@24.04:wait" in backend.calls
    assert backend.composed["web-0"][0].image == "ubuntu@24.04"

    backend.calls.clear()
    ctx.run(
        ctx.on.action("sync-images", params={"names": "ubuntu@22.04,local:web"}),
        testing.State(leader=True),
    )
    assert ctx.action_results == {"synced": "ubuntu@22.04, local:web"}
    assert [c for c in backend.calls if c.startswith("prepare_image")] == [
        "prepare_image:ubuntu@22.04:wait",
        "prepare_image:local:web:wait",
    ]

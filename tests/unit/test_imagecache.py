"""imagecache: one base per image version, fetched once, pruned when replaced, in the background.

The pool is a FakeImageStore (a dict that records calls); the fetches are real, from the signed
test mirror (tests/guest/mirror.py) over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_images import mirror, pytestmark, qcow2, resign_products, signed_home, tree

from fake_backend import FakeImageStore
from vmhost import imagecache, images
from vmhost.images import ImageFetchError, Source
from vmhost.model import InvalidRequestError

__all__ = ["pytestmark", "signed_home", "tree"]  # needs gpg; the mirror fixtures

ITEM_SUFFIX = ".img"


@pytest.fixture
def served_log(tree: tuple[Path, Path]) -> Iterator[tuple[Path, Source, list[str]]]:
    directory, keyring = tree
    requests: list[str] = []
    with mirror.serve(directory, requests=requests) as url:
        yield directory, Source(url=url, keyring=str(keyring)), requests


@pytest.fixture
def store(tmp_path: Path) -> FakeImageStore:
    (tmp_path / "pool").mkdir()
    return FakeImageStore(tmp_path / "pool")


def settings_for(source: Source, tmp_path: Path) -> imagecache.Settings:
    return imagecache.Settings(
        source=source,
        arch="x86_64",
        local_dir=str(tmp_path / "local"),
        state_dir=str(tmp_path / "state"),
    )


def downloads(requests: list[str]) -> int:
    return sum(1 for r in requests if r.endswith(ITEM_SUFFIX))


def test_an_image_is_fetched_once_and_recorded_in_its_volume_name(
    served_log: tuple[Path, Source, list[str]], store: FakeImageStore, tmp_path: Path
) -> None:
    _, source, requests = served_log
    settings = settings_for(source, tmp_path)
    lines: list[str] = []
    base = imagecache.ensure(store, "noble", settings, log=lines.append)
    assert (base.name, base.version, base.product) == (
        "ubuntu@24.04",
        "20261201",
        "com.ubuntu.cloud:server:24.04:amd64",
    )
    assert base.sha256 == images.file_sha256(Path(base.path))
    assert base.volume == f"ubuntu-24.04-amd64_20261201_{base.sha256}.qcow2"
    assert any(line.startswith("downloading ubuntu@24.04") for line in lines)
    assert downloads(requests) == 1

    again = imagecache.ensure(store, "ubuntu@24.04", settings)
    assert again == base
    assert downloads(requests) == 1  # cached: no download, not even the index
    refreshed = imagecache.ensure(store, "ubuntu@24.04", settings, refresh=True)
    assert refreshed == base
    assert downloads(requests) == 1  # the index says it is current
    assert store.calls == [f"add:{base.volume}"]
    assert list(store.staging_dir().iterdir()) == []


def test_a_newer_version_replaces_an_unused_base_and_keeps_a_used_one(
    served_log: tuple[Path, Source, list[str]], store: FakeImageStore, tmp_path: Path
) -> None:
    directory, source, _ = served_log
    settings = settings_for(source, tmp_path)
    first = imagecache.ensure(store, "ubuntu@24.04", settings)
    mirror.publish(qcow2(tmp_path / "v2.qcow2", "32M"), directory, version="20261215")
    store.users = {first.volume: ["web-0"]}
    second = imagecache.ensure(store, "ubuntu@24.04", settings, refresh=True)
    assert second.version == "20261215"
    assert {b.volume for b in store.cached_images()} == {first.volume, second.volume}
    assert images.newest(store.cached_images(), "ubuntu@24.04") == second

    store.users = {}
    mirror.publish(qcow2(tmp_path / "v3.qcow2", "16M"), directory, version="20261215.1")
    third = imagecache.ensure(store, "ubuntu@24.04", settings, refresh=True)
    assert [b.volume for b in store.cached_images()] == [third.volume]
    assert f"remove:{first.volume}" in store.calls
    assert f"remove:{second.volume}" in store.calls


@pytest.mark.parametrize("failure", ["signature", "checksum", "truncated", "unreachable"])
def test_a_failed_fetch_adds_nothing_and_leaves_no_file(
    tree: tuple[Path, Path], store: FakeImageStore, tmp_path: Path, failure: str
) -> None:
    directory, keyring = tree
    if failure == "signature":
        signed = directory / "streams/v1/com.ubuntu.cloud:released:download.sjson"
        signed.write_text(signed.read_text().replace('"size": ', '"size": 1'))
    elif failure == "checksum":

        def wrong(versions: dict) -> None:
            versions["20261201"]["items"]["disk1.img"]["sha256"] = "0" * 64

        resign_products(directory, wrong)
    elif failure == "truncated":
        item = next((directory / "server").rglob("*.img"))
        item.write_bytes(item.read_bytes()[:1000])
    with contextlib.ExitStack() as stack:
        if failure == "unreachable":
            with mirror.serve(directory) as url:
                pass  # a stopped server: nothing listens on its port any more
        else:
            url = stack.enter_context(mirror.serve(directory))
        source = Source(url=url, keyring=str(keyring))
        with pytest.raises(ImageFetchError) as error:
            imagecache.ensure(store, "ubuntu@24.04", settings_for(source, tmp_path))
    assert error.value.reason == failure
    assert store.bases == {}
    assert not any(c.startswith("add:") for c in store.calls)
    assert list(store.staging_dir().iterdir()) == []


def test_a_local_image_is_converted_once_and_again_when_the_file_changes(
    store: FakeImageStore, tmp_path: Path
) -> None:
    settings = settings_for(Source(), tmp_path)
    local = Path(settings.local_dir)
    local.mkdir()
    raw = local / "web.raw"
    raw.write_bytes(b"local image\n" + b"\0" * 1_048_564)
    first = imagecache.ensure(store, "local:web", settings)
    assert first.name == "local:web"
    assert first.product == "local:web"
    info = images.check_image_file(Path(first.path), "qcow2", "base")
    assert info == raw.stat().st_size
    assert imagecache.ensure(store, "local:web", settings) == first
    os.utime(raw, (time.time() + 10, time.time() + 10))
    second = imagecache.ensure(store, "local:web", settings)
    assert second.version != first.version
    assert [b.volume for b in store.cached_images()] == [second.volume]


def test_background_starts_one_fetch_and_reports_its_progress(
    store: FakeImageStore, tmp_path: Path
) -> None:
    settings = settings_for(Source(), tmp_path)
    launched: list[tuple[str, bool]] = []

    def launch(s: imagecache.Settings, name: str, *, refresh: bool = False) -> str:
        launched.append((name, refresh))
        return "recorded"

    assert imagecache.background(store, settings, "noble", launch=launch) == (
        "fetching ubuntu@24.04: started"
    )
    assert launched == [("ubuntu@24.04", False)]
    # The worker (this process, alive) writes its progress: no second fetch is started.
    imagecache.write_state(
        settings,
        imagecache.FetchState(
            "ubuntu@24.04", done=312_000_000, total=598_000_000, pid=os.getpid(),
            updated=time.time(),
        ),
    )  # fmt: skip
    message = imagecache.background(store, settings, "ubuntu@24.04", launch=launch)
    assert message == "downloading ubuntu@24.04: 312/598 MB"
    assert len(launched) == 1
    # It failed: the reason is the answer until RETRY_AFTER_S has passed, then it is retried.
    failed = imagecache.FetchState(
        "ubuntu@24.04", "failed", reason="checksum", error="sha256 differs", updated=time.time()
    )
    imagecache.write_state(settings, failed)
    with pytest.raises(ImageFetchError) as error:
        imagecache.background(store, settings, "ubuntu@24.04", launch=launch)
    assert error.value.reason == "checksum"
    assert "[checksum]" in str(error.value)
    imagecache.write_state(settings, failed.__class__(**{**failed.__dict__, "updated": 0.0}))
    imagecache.background(store, settings, "ubuntu@24.04", launch=launch)
    assert len(launched) == 2
    store.cache("ubuntu@24.04")
    assert imagecache.background(store, settings, "ubuntu@24.04", launch=launch) is None
    with pytest.raises(InvalidRequestError):
        imagecache.background(store, settings, "/etc/shadow", launch=launch)


def test_the_background_worker_writes_done_or_the_failure(
    served_log: tuple[Path, Source, list[str]], store: FakeImageStore, tmp_path: Path
) -> None:
    _, source, _ = served_log
    settings = settings_for(source, tmp_path)
    assert imagecache.run_fetch(store, settings, "ubuntu@24.04") == 0
    state = imagecache.read_state(settings, "ubuntu@24.04")
    assert state is not None
    assert state.state == "done"
    bad = settings_for(Source(url=source.url, keyring=str(tmp_path / "none.gpg")), tmp_path)
    assert imagecache.run_fetch(store, bad, "ubuntu@22.04") == 1
    failed = imagecache.read_state(bad, "ubuntu@22.04")
    assert failed is not None
    assert (failed.state, failed.reason) == ("failed", "signature")
    assert "image-keyring" in failed.message
    assert json.loads((Path(settings.state_dir) / "ubuntu-24.04.json").read_text())["state"]


def test_listing_names_the_vms_on_each_base(store: FakeImageStore) -> None:
    store.cache("ubuntu@24.04", sha256="b" * 64)
    volume = next(iter(store.bases))
    store.users = {volume: ["web-1", "web-0"]}
    listed = imagecache.listing(store)
    assert listed == [
        {
            "name": "ubuntu@24.04",
            "product": "com.ubuntu.cloud:server:24.04:amd64",
            "version": "20261201",
            "size": 10_000_000,
            "sha256": "b" * 64,
            "volume": volume,
            "vms": ["web-0", "web-1"],
        }
    ]
    table = imagecache.listing_table(listed)
    assert "ubuntu@24.04  20261201  10 MB" in table
    assert "web-0, web-1" in table
    assert imagecache.listing_table([]) == "no cached images"


def test_base_volume_names_round_trip_and_other_files_are_not_bases() -> None:
    image = images.parse_name("local:web.v2_x")
    volume = images.base_volume_name(image, "", "20261201120000.5", "c" * 64)
    base = images.parse_base_volume(volume)
    assert base is not None
    assert (base.name, base.version, base.sha256) == (
        "local:web.v2_x",
        "20261201120000.5",
        "c" * 64,
    )
    for other in ("web-0-root", ".fetch-x", "ubuntu-24.04-amd64_1_short.qcow2", "x.qcow2"):
        assert images.parse_base_volume(other) is None
    assert images.version_key("20240423.1") > images.version_key("20240423")
    assert images.version_key("20241001") > images.version_key("20240423.1")


def test_a_missing_or_undeclared_local_image_is_refused(store: FakeImageStore, tmp_path: Path):
    settings = settings_for(Source(), tmp_path)
    Path(settings.local_dir).mkdir()
    (Path(settings.local_dir) / "dir.qcow2").mkdir()
    with pytest.raises(InvalidRequestError, match="put exactly one"):
        imagecache.ensure(store, "local:nope", settings)
    with pytest.raises(InvalidRequestError, match="not a regular file"):
        imagecache.ensure(store, "local:dir", settings)
    assert store.calls == []


@pytest.mark.parametrize(("unsigned", "refresh"), [(False, False), (True, True)])
def test_the_worker_reads_back_the_command_the_cache_writes(
    tmp_path: Path, unsigned: bool, refresh: bool
) -> None:
    from vmhost.backends import fetch

    settings = imagecache.Settings(
        source=Source("http://mirror.test/streams/", str(tmp_path / "keyring.gpg"), unsigned),
        arch="aarch64",
        local_dir=str(tmp_path / "local"),
        state_dir=str(tmp_path / "state"),
        pool="images-test",
        pool_path=str(tmp_path / "pool"),
    )
    command = imagecache.worker_command(settings, "ubuntu@24.04", refresh=refresh)
    assert command[1:3] == ["-m", "vmhost.backends.fetch"]
    assert fetch.parse(command[3:]) == (settings, "ubuntu@24.04", refresh)

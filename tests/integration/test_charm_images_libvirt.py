"""Images by name through the charm (ops.testing) on the real libvirtd: boots, fetches, refusals.

image-source and image-keyring point at the signed test mirror on 127.0.0.1 serving the tiny
test guest as com.ubuntu.cloud:server:24.04:amd64 (tests/guest); virt-type=qemu (this
machine's /dev/kvm cannot boot a guest). The charm runs with the tests' HostLayout (conftest
`layout`): its image pool is vmhost-test-images in a temporary directory and its fetch state
and journal are temporary too (the only difference from a deployed charm), removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ops import testing
from tests.integration.test_guest_boot import mirror, report, tiny_image

import charm
import charms.vm_host.v0.vm_host as vm_lib
from vmhost import imagecache, images
from vmhost.backends.libvirt import LibvirtBackend
from vmhost.layout import HostLayout

__all__ = ["tiny_image"]
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_host")]

BOOT_TIMEOUT_S = 180
FETCH_TIMEOUT_S = 120
ITEM = ".img"


@pytest.fixture
def charm_pool(layout: HostLayout, image_pool: imagecache.Settings) -> Iterator[LibvirtBackend]:
    """A backend on the charm's image pool (vmhost-test-images, fresh for the test).

    The charm, and the background worker it starts, get the pool's name and directory and the
    fetch state directory from its HostLayout, so the whole path is the charm's own.
    """
    with LibvirtBackend(
        image_pool=layout.image_pool, image_pool_path=layout.image_pool_path
    ) as charm_backend:
        yield charm_backend
        for vm in charm_backend.list_vms():
            if vm.name.startswith("vmhost-test-"):
                charm_backend.delete(vm.name)


@pytest.fixture
def published(tiny_image: Path) -> Iterator[Path]:
    """A fresh mirror directory per test (a test may break it)."""
    directory = Path(tempfile.mkdtemp(prefix="vmhost-test-mirror-"))
    mirror.publish(tiny_image, directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def config(test_pool: str, url: str, directory: Path, bridge: str) -> dict[str, str | bool]:
    return {
        "default-storage-pool": test_pool,
        "default-network": bridge,
        "image-source": url,
        "image-keyring": str(directory / "keyring.gpg"),
        "virt-type": "qemu",
    }


def run(ctx, state, action, **params):
    ctx.run(ctx.on.action(action, params=params), state)
    return ctx.action_results or {}


def wait_report(backend: LibvirtBackend, name: str) -> dict:
    dom = backend.conn.lookupByName(name)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while dom.isActive():
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not power off:\n{backend.console_log(name, 50)}")
        time.sleep(0.5)
    return report.parse(backend.console_log(name, 1000))


def bases(backend: LibvirtBackend) -> list[images.CachedImage]:
    return backend.cached_images()


def staging_files(layout: HostLayout) -> list[Path]:
    staging = Path(layout.image_pool_path).parent / "image-staging"
    return list(staging.iterdir()) if staging.is_dir() else []


def test_compose_vm_by_name_boots_and_a_second_vm_downloads_nothing(
    charm_type: type[charm.VmHostCharm],
    charm_pool: LibvirtBackend,
    test_pool: str,
    test_bridge: str,
    published: Path,
) -> None:
    ctx = testing.Context(charm_type)
    requests: list[str] = []
    with mirror.serve(published, requests=requests) as url:
        state = testing.State(config=config(test_pool, url, published, test_bridge), leader=True)
        started = time.monotonic()
        first = run(ctx, state, "compose-vm", name="vmhost-test-img-0", memory=256, cores=1,
                    image="ubuntu@24.04", storage="root:1")  # fmt: skip
        first_s = time.monotonic() - started
        assert any("downloading ubuntu@24.04" in line for line in ctx.action_logs)
        assert sum(r.endswith(ITEM) for r in requests) == 1
        guest = wait_report(charm_pool, "vmhost-test-img-0")
        print(f"composed in {first_s:.1f} s (download included); guest report: {guest}")
        assert guest["cpus"] == 1
        assert "local-hostname: vmhost-test-img-0" in guest["seed"]["meta-data"]
        macs = {i["mac"] for i in json.loads(first["interfaces"])}
        assert macs
        assert set(guest["nics"].values()) == macs

        ctx = testing.Context(charm_type)
        started = time.monotonic()
        run(ctx, state, "compose-vm", name="vmhost-test-img-1", memory=256, image="noble",
            storage="root:1")  # fmt: skip
        print(f"second VM composed in {time.monotonic() - started:.1f} s from the cache")
        assert sum(r.endswith(ITEM) for r in requests) == 1  # downloads nothing
        assert wait_report(charm_pool, "vmhost-test-img-1")["cpus"] == 1

        listed = json.loads(run(ctx, state, "list-images")["json"])
        mine = [i for i in listed if i["name"] == "ubuntu@24.04" and i["version"] == "20261201"]
        assert len(mine) == 1
        assert mine[0]["vms"] == ["vmhost-test-img-0", "vmhost-test-img-1"]
        assert mine[0]["product"] == "com.ubuntu.cloud:server:24.04:amd64"
        assert first["volumes"]


def test_a_relation_request_is_pending_while_its_image_downloads_then_boots(
    charm_type: type[charm.VmHostCharm],
    layout: HostLayout,
    charm_pool: LibvirtBackend,
    test_pool: str,
    test_bridge: str,
    published: Path,
) -> None:
    ctx = testing.Context(charm_type)
    relation = vm_lib.requirer_relation(
        [{"id": "web-0", "memory": 256, "cores": 1, "storage": "root:1"}],
        remote_app_name="vmhost-test",
    )
    with mirror.serve(published) as url:
        state = testing.State(
            config=config(test_pool, url, published, test_bridge),
            leader=True,
            relations={relation},
        )
        out = ctx.run(ctx.on.relation_changed(relation), state)
        (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
        assert answer.state == "pending"
        assert answer.error is not None
        assert "ubuntu@24.04" in answer.error  # the default image, fetched in the background
        settings = imagecache.Settings(state_dir=layout.image_state_dir)
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        while (done := imagecache.read_state(settings, "ubuntu@24.04")) is None or (
            done.state == "running"
        ):
            assert time.monotonic() < deadline, "the background fetch did not finish"
            time.sleep(0.5)
        assert done.state == "done", done
        out = ctx.run(ctx.on.update_status(), out)
    (answer,) = vm_lib.answers_from(out.get_relation(relation.id))
    assert answer.state == "running", answer
    assert answer.name is not None
    guest = wait_report(charm_pool, answer.name)
    print(f"guest report of {answer.name}, composed by relation: {guest}")
    assert guest["cpus"] == 1
    assert f"local-hostname: {answer.name}" in guest["seed"]["meta-data"]


def _break(directory: Path, how: str) -> None:
    products = "streams/v1/com.ubuntu.cloud:released:download"
    signed, plain = directory / f"{products}.sjson", directory / f"{products}.json"
    if how == "signature":
        signed.write_text(signed.read_text().replace('"size": ', '"size": 1'))
    elif how == "checksum":
        document = json.loads(plain.read_text())
        for version in document["products"]["com.ubuntu.cloud:server:24.04:amd64"]["versions"]:
            items = document["products"]["com.ubuntu.cloud:server:24.04:amd64"]["versions"]
            items[version]["items"]["disk1.img"]["sha256"] = "0" * 64
        plain.write_text(json.dumps(document))
        mirror.sign(directory / ".gnupg", plain)
    elif how == "truncated":
        item = next((directory / "server").rglob("*.img"))
        item.write_bytes(item.read_bytes()[:4096])


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("signature", "[signature]"),
        ("checksum", "[checksum]"),
        ("truncated", "[truncated]"),
        ("unreachable", "[unreachable]"),
    ],
)
def test_a_broken_source_is_refused_with_its_reason_and_leaves_nothing(
    charm_type: type[charm.VmHostCharm],
    layout: HostLayout,
    charm_pool: LibvirtBackend,
    test_pool: str,
    test_bridge: str,
    published: Path,
    how: str,
    words: str,
) -> None:
    ctx = testing.Context(charm_type)
    _break(published, how)
    before_bases = bases(charm_pool)
    before_volumes = set(charm_pool.conn.storagePoolLookupByName(test_pool).listVolumes())
    with contextlib.ExitStack() as stack:
        if how == "unreachable":
            with mirror.serve(published) as url:
                pass  # stopped: nothing listens there any more
        else:
            url = stack.enter_context(mirror.serve(published))
        state = testing.State(config=config(test_pool, url, published, test_bridge), leader=True)
        with pytest.raises(testing.ActionFailed) as failed:
            run(ctx, state, "compose-vm", name="vmhost-test-img-bad", memory=256,
                image="ubuntu@24.04", storage="root:1")  # fmt: skip
    message = failed.value.message
    print(f"{how}: {message}")
    assert message.startswith("image not available, nothing done: ubuntu@24.04: fetch failed")
    assert words in message
    assert bases(charm_pool) == before_bases
    assert staging_files(layout) == []
    pool = charm_pool.conn.storagePoolLookupByName(test_pool)
    pool.refresh(0)
    assert set(pool.listVolumes()) == before_volumes
    assert "vmhost-test-img-bad" not in {d.name() for d in charm_pool.conn.listAllDomains(0)}

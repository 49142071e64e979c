"""images: names, a signed mirror (tests/guest/mirror.py) over http and file, refusals.

Each refused fetch names its reason and leaves nothing behind.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from vmhost import images
from vmhost.images import ImageFetchError, LocalImage, Source, StreamImage
from vmhost.model import InvalidRequestError

pytestmark = pytest.mark.skipif(
    not (shutil.which("gpg") and Path(images.GPGV).exists() and Path(images.QEMU_IMG).exists()),
    reason="needs gpg, gpgv and qemu-img (tests/bin/ensure-libvirt.sh installs them)",
)

PRODUCTS = "streams/v1/com.ubuntu.cloud:released:download"


def _load_mirror() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "guest" / "mirror.py"
    spec = importlib.util.spec_from_file_location("vmhost_test_mirror", path)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mirror = _load_mirror()


def qcow2(path: Path, size: str = "64M", *extra: str) -> Path:
    subprocess.run([images.QEMU_IMG, "create", "-q", "-f", "qcow2", *extra, str(path), size],
                   check=True)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def signed_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One throwaway key for the module (making a key costs a second)."""
    return mirror.signing_home(tmp_path_factory.mktemp("gnupg-owner"))


@pytest.fixture
def tree(tmp_path: Path, signed_home: Path) -> tuple[Path, Path]:
    """A published mirror (directory, keyring) of a small qcow2."""
    directory = tmp_path / "mirror"
    directory.mkdir()
    shutil.copytree(signed_home, directory / ".gnupg", ignore=shutil.ignore_patterns("S.*"))
    keyring = mirror.publish(qcow2(tmp_path / "tiny.qcow2"), directory)
    return directory, keyring


@pytest.fixture
def served(tree: tuple[Path, Path]) -> Iterator[tuple[Path, Source]]:
    directory, keyring = tree
    with mirror.serve(directory) as url:
        yield directory, Source(url=url, keyring=str(keyring))


def resign_products(directory: Path, change) -> None:
    path = directory / f"{PRODUCTS}.json"
    document = json.loads(path.read_text())
    change(document["products"]["com.ubuntu.cloud:server:24.04:amd64"]["versions"])
    path.write_text(json.dumps(document))
    mirror.sign(directory / ".gnupg", path)


def fetch(source: Source, dest: Path) -> Path:
    item = images.resolve(source, StreamImage("24.04"), "x86_64")
    return images.download(item, dest)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ubuntu@24.04", StreamImage("24.04")),
        ("24.04", StreamImage("24.04")),
        ("noble", StreamImage("24.04")),
        ("Ubuntu@22.04", StreamImage("22.04")),
        ("jammy", StreamImage("22.04")),
        ("local:my-image.v2", LocalImage("my-image.v2")),
    ],
)
def test_names(name: str, expected: object) -> None:
    assert images.parse_name(name) == expected


@pytest.mark.parametrize("name", ["/etc/shadow", "ubuntu@latest", "local:../x", "local:", "x y"])
def test_bad_names_are_refused_with_the_forms(name: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        images.parse_name(name)
    assert e.value.field == "image"


def test_product_id_follows_the_host_architecture() -> None:
    assert StreamImage("24.04").product_id("x86_64") == "com.ubuntu.cloud:server:24.04:amd64"
    assert StreamImage("24.04").product_id("aarch64") == "com.ubuntu.cloud:server:24.04:arm64"


def test_http_mirror_resolves_and_downloads_the_verified_item(
    served: tuple[Path, Source], tmp_path: Path
) -> None:
    _, source = served
    item = images.resolve(source, StreamImage("24.04"), "x86_64")
    assert (item.product, item.version, item.ftype) == (
        "com.ubuntu.cloud:server:24.04:amd64",
        "20261201",
        "disk1.img",
    )
    seen: list[tuple[int, int]] = []
    path = images.download(item, tmp_path / "cache", lambda d, t: seen.append((d, t)))
    assert images.file_sha256(path) == item.sha256
    assert path.stat().st_size == item.size
    assert seen[-1] == (item.size, item.size)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]


def test_file_source_works(tree: tuple[Path, Path], tmp_path: Path) -> None:
    directory, keyring = tree
    path = fetch(Source(url=directory.as_uri(), keyring=str(keyring)), tmp_path / "cache")
    assert path.exists()


def test_newest_version_wins(tree: tuple[Path, Path], tmp_path: Path) -> None:
    directory, keyring = tree

    def add_old(versions: dict) -> None:
        versions["20200101"] = json.loads(json.dumps(versions["20261201"]))

    resign_products(directory, add_old)
    source = Source(url=directory.as_uri(), keyring=str(keyring))
    assert images.resolve(source, StreamImage("24.04"), "x86_64").version == "20261201"


def expect_refused(source: Source, dest: Path, reason: str, words: str) -> None:
    with pytest.raises(ImageFetchError) as e:
        fetch(source, dest)
    assert e.value.reason == reason
    assert words in str(e.value)
    assert not dest.exists() or list(dest.iterdir()) == []


def test_bad_signature_is_refused(served: tuple[Path, Source], tmp_path: Path) -> None:
    directory, source = served
    signed = directory / f"{PRODUCTS}.sjson"
    signed.write_text(signed.read_text().replace('"size": ', '"size": 1'))
    expect_refused(source, tmp_path / "cache", "signature", "signature check failed")


def test_a_key_not_in_the_keyring_is_refused(served: tuple[Path, Source], tmp_path: Path) -> None:
    _, source = served
    other = tmp_path / "other"
    other.mkdir()
    other_keyring = mirror.publish(qcow2(tmp_path / "o.qcow2"), other)
    refused = Source(url=source.url, keyring=str(other_keyring))
    expect_refused(refused, tmp_path / "cache", "signature", "signature check failed")


def test_missing_keyring_names_the_option(served: tuple[Path, Source], tmp_path: Path) -> None:
    _, source = served
    missing = Source(url=source.url, keyring=str(tmp_path / "nope.gpg"))
    expect_refused(missing, tmp_path / "cache", "signature", "image-keyring")


def test_wrong_sha256_is_refused_and_deleted(served: tuple[Path, Source], tmp_path: Path) -> None:
    directory, source = served

    def wrong(versions: dict) -> None:
        versions["20261201"]["items"]["disk1.img"]["sha256"] = "0" * 64

    resign_products(directory, wrong)
    expect_refused(source, tmp_path / "cache", "checksum", "sha256")


def test_truncated_item_is_refused_and_deleted(
    served: tuple[Path, Source], tmp_path: Path
) -> None:
    directory, source = served
    item = next((directory / "server").rglob("*.img"))
    item.write_bytes(item.read_bytes()[:1000])
    expect_refused(source, tmp_path / "cache", "truncated", "of the")


def test_stopped_server_is_unreachable(tree: tuple[Path, Path], tmp_path: Path) -> None:
    directory, keyring = tree
    with mirror.serve(directory) as url:
        pass
    expect_refused(Source(url=url, keyring=str(keyring)), tmp_path / "cache", "unreachable", url)


def test_unsigned_source_only_when_allowed(tree: tuple[Path, Path], tmp_path: Path) -> None:
    directory, keyring = tree
    for signed in (directory / "streams" / "v1").glob("*.sjson"):
        signed.unlink()
    source = Source(url=directory.as_uri(), keyring=str(keyring))
    expect_refused(source, tmp_path / "cache", "unsigned", "image-source-unsigned=true")
    allowed = Source(url=directory.as_uri(), keyring=str(keyring), allow_unsigned=True)
    assert fetch(allowed, tmp_path / "cache").exists()


def test_item_with_a_backing_file_is_refused(tmp_path: Path, signed_home: Path) -> None:
    directory = tmp_path / "mirror"
    directory.mkdir()
    shutil.copytree(signed_home, directory / ".gnupg", ignore=shutil.ignore_patterns("S.*"))
    base = qcow2(tmp_path / "base.qcow2")
    image = qcow2(tmp_path / "overlay.qcow2", "64M", "-b", str(base), "-F", "qcow2")
    keyring = mirror.publish(image, directory)
    source = Source(url=directory.as_uri(), keyring=str(keyring))
    expect_refused(source, tmp_path / "cache", "unsafe", "backing file")


def test_unknown_product_is_not_found(tree: tuple[Path, Path], tmp_path: Path) -> None:
    directory, keyring = tree
    source = Source(url=directory.as_uri(), keyring=str(keyring))
    with pytest.raises(ImageFetchError) as e:
        images.resolve(source, StreamImage("22.04"), "x86_64")
    assert e.value.reason == "not-found"
    assert "com.ubuntu.cloud:server:22.04:amd64" in str(e.value)


# -- local images


def test_local_image_by_extension_and_sidecar(tmp_path: Path) -> None:
    qcow2(tmp_path / "a.qcow2")
    subprocess.run(["truncate", "-s", "1M", str(tmp_path / "b.img")], check=True)
    (tmp_path / "b.format").write_text("raw\n")
    assert images.local_image_file(str(tmp_path), LocalImage("a")) == (
        tmp_path / "a.qcow2",
        "qcow2",
    )
    assert images.local_image_file(str(tmp_path), LocalImage("b")) == (tmp_path / "b.img", "raw")


def test_local_image_links_out_of_the_dir_are_refused(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "shadow.raw").symlink_to("/etc/shadow")
    with pytest.raises(InvalidRequestError, match="links out of"):
        images.local_image_file(str(local), LocalImage("shadow"))


def test_local_image_missing_or_undeclared(tmp_path: Path) -> None:
    (tmp_path / "c.img").write_bytes(b"\0" * 512)
    with pytest.raises(InvalidRequestError, match=r"c\.qcow2 or c\.raw"):
        images.local_image_file(str(tmp_path), LocalImage("c"))
    with pytest.raises(InvalidRequestError, match="does not exist"):
        images.local_image_file(str(tmp_path / "none"), LocalImage("c"))


def test_local_qcow2_with_data_file_or_encryption_is_refused(tmp_path: Path) -> None:
    data = qcow2(tmp_path / "d.qcow2", "16M", "-o", f"data_file={tmp_path / 'd.data'}")
    with pytest.raises(ImageFetchError, match="external data file"):
        images.flatten_local(data, "qcow2", tmp_path / "out", "local:d")
    enc = tmp_path / "e.qcow2"
    luks = ["--object", "secret,id=s0,data=x", "-o", "encrypt.format=luks,encrypt.key-secret=s0"]
    made = None
    for _ in range(5):  # qemu-img's PBKDF benchmark fails now and then on a busy machine
        made = subprocess.run(
            [images.QEMU_IMG, "create", "-q", "-f", "qcow2", *luks, str(enc), "16M"],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode == 0 or "accurate CPU usage" not in made.stderr:
            break
    assert made is not None
    assert made.returncode == 0, made.stderr
    with pytest.raises(ImageFetchError, match="encrypted"):
        images.flatten_local(enc, "qcow2", tmp_path / "out", "local:e")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_raw_declared_qcow2_is_copied_as_raw_bytes_never_probed(tmp_path: Path) -> None:
    """A qcow2 whose header names a backing file, declared raw, stays opaque raw data."""
    base = qcow2(tmp_path / "base.qcow2")
    sneaky = qcow2(tmp_path / "s.raw", "16M", "-b", str(base), "-F", "qcow2")
    flat = images.flatten_local(sneaky, "raw", tmp_path / "out", "local:s")
    info = json.loads(
        subprocess.run(
            [images.QEMU_IMG, "info", "-f", "qcow2", "--output=json", str(flat)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert "backing-filename" not in info
    # The raw bytes, rounded up to whole 512-byte sectors.
    assert 0 <= info["virtual-size"] - sneaky.stat().st_size < 512

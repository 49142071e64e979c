"""Images by name: simplestreams resolve, gpgv verification, verified downloads, local images.

`ubuntu@24.04` (the Juju base syntax; `24.04` and `noble` too) names the product
`com.ubuntu.cloud:server:24.04:<arch>` of a simplestreams source such as
https://cloud-images.ubuntu.com/releases/. The newest version's qcow2 disk item (`disk1.img`,
else `disk-kvm.img`) is the image. Trust rests on three checks that are always on:
- the index and products files are the clearsigned `.sjson`, verified with `gpgv` against the
  configured keyring; the unsigned `.json` is read only when the operator allowed it;
- the downloaded item's size and sha256 must equal the signed index's, or it is deleted;
- the file is opened with `qemu-img info -f <declared format>` and refused when it has a
  backing file, an external data file or encryption (each would make QEMU open another file).

A failed fetch leaves no partial file behind and says which check failed (ImageFetchError.reason).

`local:NAME` is an operator's file in one directory (config `local-image-dir`): nothing outside
it is read, whatever the name says; its format comes from its extension (`.qcow2`, `.raw`) or a
sidecar `NAME.format`, never from probing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import platform
import re
import stat
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vmhost.model import InvalidRequestError, VmHostError

GPGV = "/usr/bin/gpgv"
QEMU_IMG = "/usr/bin/qemu-img"
DEFAULT_SOURCE = "https://cloud-images.ubuntu.com/releases/"
DEFAULT_KEYRING = "/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg"
DEFAULT_LOCAL_DIR = "/var/lib/vm-host/local-images"
INDEX_PATH = "streams/v1/index"
DISK_ITEMS = ("disk1.img", "disk-kvm.img")
"""The qcow2 disk items of a version, in order of preference."""
TIMEOUT_S = 60.0
CHUNK = 1 << 20

RELEASES = {
    "20.04": "focal",
    "22.04": "jammy",
    "24.04": "noble",
    "24.10": "oracular",
    "25.04": "plucky",
    "25.10": "questing",
}
"""Ubuntu releases by version, for names given as a codename."""
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x"}
"""Host architecture (libvirt's spelling) -> the architecture in simplestreams product ids."""

_LOCAL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
LOCAL_FORMATS = {".qcow2": "qcow2", ".raw": "raw"}

Progress = Callable[[int, int], None]
"""progress(bytes done, bytes total) while an item downloads."""


class ImageFetchError(VmHostError):
    """Fetching an image failed; `reason` says which check (no partial file is left).

    reason: "unreachable" (the source or item could not be read), "signature" (gpgv refused an
    index), "unsigned" (no signed index and unsigned sources are not allowed), "not-found" (no
    such product or no disk item), "truncated" (fewer or more bytes than the index says),
    "checksum" (sha256 differs), "unsafe" (backing file, data file or encryption).
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class StreamImage:
    """A named image of a simplestreams source: `ubuntu@<release>`."""

    release: str
    os: str = "ubuntu"

    @property
    def name(self) -> str:
        """Return the canonical name, `ubuntu@24.04`."""
        return f"{self.os}@{self.release}"

    def product_id(self, arch: str) -> str:
        """Return the product id for a host architecture (libvirt's spelling)."""
        return f"com.ubuntu.cloud:server:{self.release}:{ARCHES.get(arch, arch)}"


@dataclasses.dataclass(frozen=True)
class LocalImage:
    """An operator-supplied file of `local-image-dir`: `local:NAME`."""

    local_name: str

    @property
    def name(self) -> str:
        """Return the canonical name, `local:NAME`."""
        return f"local:{self.local_name}"


@dataclasses.dataclass(frozen=True)
class Source:
    """A simplestreams source and how it is trusted."""

    url: str = DEFAULT_SOURCE
    keyring: str = DEFAULT_KEYRING
    allow_unsigned: bool = False


@dataclasses.dataclass(frozen=True)
class StreamItem:
    """One downloadable disk item of a product version, as the (verified) index lists it."""

    product: str
    version: str
    ftype: str
    url: str
    sha256: str
    size: int


def host_arch() -> str:
    """Return this host's architecture in libvirt's spelling (x86_64, aarch64)."""
    machine = platform.machine()
    return "aarch64" if machine in ("aarch64", "arm64") else machine


def parse_name(name: str) -> StreamImage | LocalImage:
    """Parse an image name: `ubuntu@24.04`, `24.04`, `noble`, or `local:NAME`.

    Raises:
        InvalidRequestError: naming the forms that are accepted.
    """
    text = name.strip().lower()
    if text.startswith("local:"):
        local = text.removeprefix("local:")
        if not _LOCAL_NAME.fullmatch(local):
            raise InvalidRequestError(
                "image",
                f"{name!r}: a local image name is letters, digits, '.', '_' or '-' (at most "
                "63, not starting with '.'), the file's name in local-image-dir without its "
                "extension",
            )
        return LocalImage(local)
    release = text.removeprefix("ubuntu@")
    by_codename = {v: k for k, v in RELEASES.items()}
    release = by_codename.get(release, release)
    if not re.fullmatch(r"\d{2}\.\d{2}", release):
        known = ", ".join(f"ubuntu@{r}" for r in RELEASES)
        raise InvalidRequestError(
            "image",
            f"{name!r} is not an image name; use ubuntu@<release> ({known}), the release or "
            "its codename (24.04, noble), or local:NAME for a file in local-image-dir",
        )
    return StreamImage(release)


# ---------------------------------------------------------------------------------------------
# simplestreams


def _join(base: str, path: str) -> str:
    return urllib.parse.urljoin(base if base.endswith("/") else base + "/", path)


def _open(url: str) -> Any:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise ImageFetchError(
            "unreachable", f"{url}: only http://, https:// and file:// sources are supported"
        )
    return urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 - scheme checked above


def _read(url: str) -> bytes | None:
    """Return a document's bytes, or None when the source says it does not exist."""
    try:
        with _open(url) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise ImageFetchError("unreachable", f"{url}: HTTP {e.code} {e.reason}") from e
    except FileNotFoundError:
        return None
    except urllib.error.URLError as e:
        if isinstance(e.reason, FileNotFoundError):
            return None
        raise ImageFetchError("unreachable", f"{url}: {e.reason}") from e
    except OSError as e:
        raise ImageFetchError("unreachable", f"{url}: {e}") from e


def verify_clearsigned(signed: bytes, keyring: str, what: str) -> bytes:
    """Return the content of a clearsigned document once gpgv accepts its signature.

    The content returned is gpgv's own output, so what is used is exactly what was verified.
    """
    if not os.path.isfile(keyring):
        raise ImageFetchError(
            "signature",
            f"{what}: keyring {keyring} does not exist; install it or set image-keyring",
        )
    with tempfile.TemporaryDirectory(prefix="vm-host-gpgv-") as tmp:
        doc = Path(tmp) / "doc.sjson"
        out = Path(tmp) / "doc.json"
        doc.write_bytes(signed)
        result = subprocess.run(
            [GPGV, "--keyring", os.path.abspath(keyring), "--output", str(out), str(doc)],
            check=False,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        if result.returncode != 0 or not out.exists():
            detail = " ".join(
                line.removeprefix("gpgv: ")
                for line in result.stderr.splitlines()
                if "BAD signature" in line or "No public key" in line or "no valid" in line
            )
            raise ImageFetchError(
                "signature",
                f"{what}: signature check failed against {keyring}"
                + (f" ({detail})" if detail else ""),
            )
        return out.read_bytes()


def read_stream(source: Source, path: str) -> dict[str, Any]:
    """Read `<path>.sjson` verified (or `<path>.json` when unsigned sources are allowed)."""
    signed_url = _join(source.url, f"{path}.sjson")
    signed = _read(signed_url)
    if signed is not None:
        content = verify_clearsigned(signed, source.keyring, signed_url)
    else:
        if not source.allow_unsigned:
            raise ImageFetchError(
                "unsigned",
                f"{signed_url} does not exist: the source is not signed; sign it, or set "
                "image-source-unsigned=true to trust it without a signature",
            )
        plain_url = _join(source.url, f"{path}.json")
        plain = _read(plain_url)
        if plain is None:
            raise ImageFetchError(
                "unreachable", f"{plain_url} does not exist; is {source.url} a simplestreams tree?"
            )
        content = plain
    try:
        document = json.loads(content)
    except ValueError as e:
        raise ImageFetchError("unreachable", f"{signed_url}: not JSON ({e})") from e
    if not isinstance(document, dict):
        raise ImageFetchError("unreachable", f"{signed_url}: not a simplestreams document")
    return document  # pyright: ignore[reportUnknownVariableType]


def _versions(
    source: Source, image: StreamImage, arch: str
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield (product, version, items) of an image's product, newest first.

    From the verified index; ImageFetchError("not-found") when the source has no such product.
    """
    product = image.product_id(arch)
    index = read_stream(source, INDEX_PATH).get("index") or {}
    for content in index.values():
        if content.get("datatype") != "image-downloads" or product not in content.get(
            "products", []
        ):
            continue
        path = str(content["path"]).removesuffix(".sjson").removesuffix(".json")
        products = read_stream(source, path).get("products") or {}
        versions: dict[str, Any] = (products.get(product) or {}).get("versions") or {}
        for version in sorted(versions, key=version_key, reverse=True):
            yield product, version, versions[version].get("items") or {}
        return
    raise ImageFetchError(
        "not-found", f"{image.name}: {source.url} has no product {product} (image-downloads)"
    )


def resolve(source: Source, image: StreamImage, arch: str) -> StreamItem:
    """Return the newest version's disk item of an image's product, from the verified index."""
    product = image.product_id(arch)
    for product, version, items in _versions(source, image, arch):
        for ftype in DISK_ITEMS:
            item = items.get(ftype)
            if item and item.get("sha256") and item.get("path"):
                return StreamItem(
                    product=product,
                    version=version,
                    ftype=ftype,
                    url=_join(source.url, str(item["path"])),
                    sha256=str(item["sha256"]).lower(),
                    size=int(item["size"]),
                )
    raise ImageFetchError(
        "not-found", f"{product} in {source.url} has no version with a qcow2 disk item"
    )


LXD_VM_COMBINED = ("combined_disk-kvm-img_sha256", "combined_uefi1-img_sha256")
"""The lxd.tar.xz item's keys naming an LXD VM image's fingerprint (metadata + disk)."""


@dataclasses.dataclass(frozen=True)
class LxdStreamImage:
    """The LXD VM image of a product version, as the (verified) index names it."""

    product: str
    version: str
    fingerprint: str


def resolve_lxd(source: Source, image: StreamImage, arch: str) -> LxdStreamImage:
    """Return the newest version's LXD VM image fingerprint, from the verified index.

    LXD then pulls exactly that fingerprint and checks the download against it, so the
    signature of the index vm-host verified covers what LXD boots.
    """
    product = image.product_id(arch)
    for product, version, items in _versions(source, image, arch):
        meta = items.get("lxd.tar.xz") or {}
        for key in LXD_VM_COMBINED:
            fingerprint = str(meta.get(key) or "").lower()
            if re.fullmatch(r"[0-9a-f]{64}", fingerprint):
                return LxdStreamImage(product, version, fingerprint)
    raise ImageFetchError(
        "not-found", f"{product} in {source.url} has no version with an LXD VM image"
    )


def _copy_checked(response: Any, out: Any, item: StreamItem, progress: Progress | None) -> str:
    """Copy a response into a file, never past the item's size; return the sha256 (hex)."""
    digest = hashlib.sha256()
    done = 0
    while True:
        try:
            block = response.read(CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise ImageFetchError(
                "truncated", f"{item.url}: download broke after {done} bytes: {e}"
            ) from e
        if not block:
            break
        done += len(block)
        if done > item.size:
            raise ImageFetchError(
                "truncated", f"{item.url}: more than the {item.size} bytes the index says"
            )
        digest.update(block)
        out.write(block)
        if progress:
            progress(done, item.size)
    if done != item.size:
        raise ImageFetchError(
            "truncated", f"{item.url}: got {done} of the {item.size} bytes the index says"
        )
    return digest.hexdigest()


def download(item: StreamItem, directory: Path, progress: Progress | None = None) -> Path:
    """Download an item into `directory`, checking size and sha256; return the file.

    The bytes go to a private temporary file that is renamed only once every check passed;
    on any failure it is deleted, so nothing partial is ever left.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".fetch-", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = _open(item.url)
            except urllib.error.URLError as e:
                raise ImageFetchError("unreachable", f"{item.url}: {e.reason}") from e
            except OSError as e:
                raise ImageFetchError("unreachable", f"{item.url}: {e}") from e
            with response:
                sha256 = _copy_checked(response, out, item, progress)
        if sha256 != item.sha256:
            raise ImageFetchError(
                "checksum", f"{item.url}: sha256 {sha256} is not the {item.sha256} the index says"
            )
        check_image_file(tmp, "qcow2", item.url)
        final = directory / f"{item.sha256}.qcow2"
        tmp.replace(final)
        return final
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# ---------------------------------------------------------------------------------------------
# image files


def check_image_file(path: Path, fmt: str, what: str) -> int:
    """Open a file as `fmt` (never probed); refuse backing/data files and encryption.

    Returns:
        The virtual size in bytes.
    """
    result = subprocess.run(
        [QEMU_IMG, "info", "-f", fmt, "--output=json", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if result.returncode != 0:
        raise ImageFetchError("unsafe", f"{what} is not a {fmt} image: {result.stderr.strip()}")
    info = json.loads(result.stdout)
    data = ((info.get("format-specific") or {}).get("data")) or {}
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageFetchError("unsafe", f"{what} has a backing file; flatten it first")
    if data.get("data-file"):
        raise ImageFetchError("unsafe", f"{what} has an external data file; flatten it first")
    if info.get("encrypted") or data.get("encrypt"):
        raise ImageFetchError("unsafe", f"{what} is encrypted; give an unencrypted image")
    return int(info["virtual-size"])


def local_image_file(directory: str, image: LocalImage) -> tuple[Path, str]:
    """Return (real path, declared format) of `local:NAME`, refusing anything outside the dir.

    The file is NAME.qcow2 or NAME.raw, or any NAME.* with a sidecar NAME.format holding
    "qcow2" or "raw". Its real path (links resolved) must be a regular file inside the
    directory's real path.
    """
    root = Path(os.path.realpath(directory))
    if not root.is_dir():
        raise InvalidRequestError(
            "image", f"{image.name}: local-image-dir {directory} does not exist"
        )
    candidates: list[tuple[Path, str]] = []
    for ext, fmt in LOCAL_FORMATS.items():
        if (root / f"{image.local_name}{ext}").exists():
            candidates.append((root / f"{image.local_name}{ext}", fmt))
    sidecar = root / f"{image.local_name}.format"
    if not candidates and sidecar.is_file():
        fmt = sidecar.read_text().strip()
        if fmt not in LOCAL_FORMATS.values():
            raise InvalidRequestError(
                "image", f"{sidecar} says {fmt!r}; write qcow2 or raw into it"
            )
        candidates = [
            (p, fmt)
            for p in sorted(root.glob(f"{image.local_name}.*"))
            if p.suffix not in (".format", *LOCAL_FORMATS)
        ]
    if len(candidates) != 1:
        raise InvalidRequestError(
            "image",
            f"{image.name}: put exactly one {image.local_name}.qcow2 or {image.local_name}.raw "
            f"(or a file with a {image.local_name}.format sidecar) in {root}"
            + (f"; found {len(candidates)}" if candidates else ""),
        )
    path, fmt = candidates[0]
    real = Path(os.path.realpath(path))
    if real.parent != root and root not in real.parents:
        raise InvalidRequestError(
            "image", f"{image.name}: {path} links out of {root}; copy the file in instead"
        )
    try:
        mode = real.stat().st_mode
    except OSError as e:
        raise InvalidRequestError("image", f"{image.name}: {real}: {e.strerror}") from e
    if not stat.S_ISREG(mode):
        raise InvalidRequestError("image", f"{image.name}: {real} is not a regular file")
    return real, fmt


def flatten_local(path: Path, fmt: str, directory: Path, what: str) -> Path:
    """Check a local file and convert it to a standalone qcow2 in `directory` (no raw copy)."""
    check_image_file(path, fmt, what)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".local-", suffix=".qcow2", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        subprocess.run(
            [QEMU_IMG, "convert", "-q", "-f", fmt, "-O", "qcow2", str(path), str(tmp)],
            check=True,
            capture_output=True,
            timeout=3600,
        )
        return tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def file_sha256(path: Path) -> str:
    """Return a file's sha256 (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The image cache: one base volume per image version, in a pool of its own


IMAGE_POOL = "vm-host-images"
IMAGE_POOL_PATH = "/var/lib/vm-host/image-cache"
"""The pool's directory; the exporter's vmhost_image_cache_bytes reads the same one."""
STAGING_DIR = "/var/lib/vm-host/image-staging"
"""Where downloads and conversions are written before they become a base (same filesystem as
the pool, so the move is a rename: a base is whole or absent)."""
_BASE_RE = re.compile(
    r"^(?P<slug>(ubuntu-\d{2}\.\d{2}-[a-z0-9]+|local-[a-z0-9][a-z0-9._-]{0,62}))"
    r"_(?P<version>[A-Za-z0-9.+-]{1,64})_(?P<sha256>[0-9a-f]{64})\.qcow2$"
)
_VERSION_RE = re.compile(r"^[A-Za-z0-9.+-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class CachedImage:
    """A base volume of the image pool; its name records image, version and sha256.

    The pool is the ledger: nothing about a base is kept anywhere but its volume name, so a
    lost unit state or a re-run hook cannot disagree with what is on disk.
    """

    name: str
    """`ubuntu@24.04` or `local:NAME`."""
    arch: str
    """The simplestreams architecture (amd64) for stream images, "" for local ones."""
    version: str
    sha256: str
    """sha256 of the base file as it was verified (the index's, or of the converted copy)."""
    volume: str
    path: str = ""
    size: int = 0
    """Bytes on disk."""

    @property
    def product(self) -> str:
        """The simplestreams product id, or `local:NAME`."""
        if self.name.startswith("local:"):
            return self.name
        release = self.name.removeprefix("ubuntu@")
        return f"com.ubuntu.cloud:server:{release}:{self.arch}"


def base_volume_name(image: StreamImage | LocalImage, arch: str, version: str, sha256: str) -> str:
    """Return the volume name recording an image, its version and its sha256."""
    if not _VERSION_RE.fullmatch(version):
        raise ImageFetchError("not-found", f"{image.name}: version {version!r} is not usable")
    if isinstance(image, LocalImage):
        slug = f"local-{image.local_name}"
    else:
        slug = f"ubuntu-{image.release}-{ARCHES.get(arch, arch)}"
    return f"{slug}_{version}_{sha256}.qcow2"


def parse_base_volume(volume: str, path: str = "", size: int = 0) -> CachedImage | None:
    """Read a base volume's name back; None for any other file in the pool."""
    match = _BASE_RE.fullmatch(volume)
    if match is None:
        return None
    slug = match["slug"]
    if slug.startswith("local-"):
        name, arch = f"local:{slug.removeprefix('local-')}", ""
    else:
        _, release, arch = slug.split("-", 2)
        name = f"ubuntu@{release}"
    return CachedImage(
        name=name,
        arch=arch,
        version=match["version"],
        sha256=match["sha256"],
        volume=volume,
        path=path,
        size=size,
    )


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order versions as simplestreams serials compare: 20240423.1 after 20240423."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version))


def newest(cached: Sequence[CachedImage], name: str) -> CachedImage | None:
    """Return the newest cached base of an image, or None."""
    mine = [c for c in cached if c.name == name]
    return max(mine, key=lambda c: version_key(c.version)) if mine else None

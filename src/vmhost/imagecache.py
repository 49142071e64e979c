"""The host's image cache: fetch once, keep one base per image, compose from overlays.

Each image lives once per host as a base volume of the `vm-host-images` pool (the name records
image, version and sha256: images.parse_base_volume); a root disk is a qcow2 overlay on it, so
composing from a cached image copies nothing. `ensure` makes an image cached: from its
simplestreams source (verified: images.resolve/download) or from local-image-dir (flattened:
images.flatten_local). When a newer version arrives, older bases no VM uses are removed.

Hooks never wait on a download: `start_background` runs the same `ensure` in a transient
systemd unit (or a detached process where systemd is not PID 1) and its progress is read back
from a small state file (`fetch_state`), so a relation request is answered pending with
"downloading ubuntu@24.04: 312/598 MB" until a later hook finds the base and composes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vmhost import images
from vmhost.images import CachedImage, ImageFetchError, LocalImage, Source, StreamImage
from vmhost.model import InvalidRequestError, VmHostError

if TYPE_CHECKING:
    from vmhost.backends import Backend

logger = logging.getLogger(__name__)

STATE_DIR = "/var/lib/vm-host/image-fetch"
"""One `<slug>.json` progress file and `<slug>.lock` per image being fetched."""
SYSTEMD_RUN = "/usr/bin/systemd-run"
SETSID = "/usr/bin/setsid"
RETRY_AFTER_S = 300.0
"""A failed background fetch is tried again by a hook this long after it failed."""
MB = 10**6

Log = Callable[[str], None]


class ImageStore(Protocol):
    """Where bases live (the libvirt backend's `vm-host-images` pool)."""

    def cached_images(self) -> list[CachedImage]:
        """Return every base volume of the pool."""
        ...

    def staging_dir(self) -> Path:
        """Return a private directory on the pool's filesystem for files being made."""
        ...

    def add_image(self, file: Path, volume: str) -> CachedImage:
        """Move a verified file into the pool as the base volume `volume`."""
        ...

    def remove_image(self, volume: str) -> None:
        """Delete a base volume."""
        ...

    def image_users(self) -> dict[str, list[str]]:
        """Return base volume -> names of the VMs whose disks are overlays on it."""
        ...


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where images come from (charm config) and where fetch state is kept."""

    source: Source = dataclasses.field(default_factory=Source)
    arch: str = "x86_64"
    local_dir: str = images.DEFAULT_LOCAL_DIR
    state_dir: str = STATE_DIR
    pool: str = images.IMAGE_POOL
    pool_path: str = images.IMAGE_POOL_PATH
    """The image pool a background worker fills (the backend's own when in a hook)."""


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.-]", "-", name.lower())


@contextlib.contextmanager
def _locked(settings: Settings, name: str, *, wait: bool = True) -> Iterator[bool]:
    """Hold the image's fetch lock (one fetch per image at a time, across processes)."""
    directory = Path(settings.state_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with (directory / f"{_slug(name)}.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _local_version(path: Path) -> str:
    """The version of a local file: its modification time and size (a changed file is new)."""
    st = path.stat()
    return f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(st.st_mtime))}.{st.st_size}"


def ensure(
    store: ImageStore,
    name: str,
    settings: Settings,
    *,
    refresh: bool = False,
    log: Log | None = None,
    progress: images.Progress | None = None,
) -> CachedImage:
    """Return the cached base of an image, fetching or converting it first when needed.

    Without `refresh` a cached image is used as it is (no network at all); with it, the
    source is asked for its newest version and that is fetched when it is not cached yet.

    Raises:
        InvalidRequestError: not an image name, or no such local image.
        ImageFetchError: the fetch failed; its reason says which check (nothing is left).
    """
    image = images.parse_name(name)
    say = log or (lambda _text: None)
    with _locked(settings, image.name):
        cached = images.newest(store.cached_images(), image.name)
        if cached is not None and not refresh and isinstance(image, StreamImage):
            return cached
        if isinstance(image, StreamImage):
            base = _fetch_stream(store, image, settings, cached, say, progress)
        else:
            base = _convert_local(store, image, settings, cached, say)
        if cached is None or base.volume != cached.volume:
            for removed in prune(store, image.name, keep=base.volume):
                say(f"removed {removed}: replaced by {base.version} and used by no VM")
        return base


def _fetch_stream(
    store: ImageStore,
    image: StreamImage,
    settings: Settings,
    cached: CachedImage | None,
    say: Log,
    progress: images.Progress | None,
) -> CachedImage:
    item = images.resolve(settings.source, image, settings.arch)
    if cached is not None and (cached.version, cached.sha256) == (item.version, item.sha256):
        say(f"{image.name} {item.version} is cached and current")
        return cached
    volume = images.base_volume_name(image, settings.arch, item.version, item.sha256)
    say(f"downloading {image.name} {item.version} ({item.size / MB:.0f} MB) from {item.url}")
    reporter = _ProgressLog(image.name, say, progress)
    staging = store.staging_dir()
    file = images.download(item, staging, reporter)
    try:
        base = store.add_image(file, volume)
    finally:
        with contextlib.suppress(FileNotFoundError):
            file.unlink()
    say(f"{image.name} {item.version} cached as {volume}")
    return base


def _convert_local(
    store: ImageStore,
    image: LocalImage,
    settings: Settings,
    cached: CachedImage | None,
    say: Log,
) -> CachedImage:
    path, fmt = images.local_image_file(settings.local_dir, image)
    version = _local_version(path)
    if cached is not None and cached.version == version:
        return cached
    say(f"converting {image.name} ({path}, {fmt}) into a flattened qcow2")
    flat = images.flatten_local(path, fmt, store.staging_dir(), image.name)
    try:
        sha256 = images.file_sha256(flat)
        base = store.add_image(flat, images.base_volume_name(image, "", version, sha256))
    finally:
        with contextlib.suppress(FileNotFoundError):
            flat.unlink()
    return base


class _ProgressLog:
    """Say how far a download got, every 10%."""

    def __init__(self, name: str, say: Log, also: images.Progress | None = None):
        self.name = name
        self.say = say
        self.also = also
        self.next = 0.0

    def __call__(self, done: int, total: int) -> None:
        if self.also is not None:
            self.also(done, total)
        if total and done / total >= self.next:
            self.say(f"downloading {self.name}: {done / MB:.0f}/{total / MB:.0f} MB")
            self.next = done / total + 0.1


def prune(store: ImageStore, name: str, *, keep: str) -> list[str]:
    """Remove the bases of `name` other than `keep` that no VM uses; return their volumes."""
    users = store.image_users()
    removed: list[str] = []
    for base in store.cached_images():
        if base.name != name or base.volume == keep or users.get(base.volume):
            continue
        try:
            store.remove_image(base.volume)
        except VmHostError as exc:
            logger.warning("could not remove unused base %s: %s", base.volume, exc)
            continue
        removed.append(base.volume)
    return removed


# ---------------------------------------------------------------------------------------------
# Fetching in the background (hooks never wait on a download)


@dataclasses.dataclass(frozen=True)
class FetchState:
    """What a background fetch of one image last wrote."""

    name: str
    state: str = "running"
    """"running", "failed" or "done"."""
    done: int = 0
    total: int = 0
    reason: str = ""
    error: str = ""
    pid: int = 0
    updated: float = 0.0

    @property
    def message(self) -> str:
        """One line for a pending answer or an error."""
        if self.state == "failed":
            return f"image {self.name} could not be fetched [{self.reason}]: {self.error}"
        if self.total:
            return f"downloading {self.name}: {self.done / MB:.0f}/{self.total / MB:.0f} MB"
        return f"fetching {self.name}: started"


def _state_path(settings: Settings, name: str) -> Path:
    return Path(settings.state_dir) / f"{_slug(name)}.json"


def read_state(settings: Settings, name: str) -> FetchState | None:
    """Return the last state a background fetch of `name` wrote, or None."""
    try:
        data = json.loads(_state_path(settings, name).read_text())
        fields = {f.name for f in dataclasses.fields(FetchState)}
        return FetchState(**{k: v for k, v in data.items() if k in fields})
    except (OSError, ValueError, TypeError):
        return None


def write_state(settings: Settings, state: FetchState) -> None:
    """Replace the state file atomically (readers never see half a document)."""
    path = _state_path(settings, state.name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(state)))
    tmp.replace(path)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_command(settings: Settings, name: str, *, refresh: bool = False) -> list[str]:
    """The command that fetches one image into the cache (vmhost.backends.fetch, its parser)."""
    source = settings.source
    return [
        sys.executable,
        "-m",
        "vmhost.backends.fetch",
        "fetch",
        name,
        "--source",
        source.url,
        "--keyring",
        source.keyring,
        "--arch",
        settings.arch,
        "--local-dir",
        settings.local_dir,
        "--state-dir",
        settings.state_dir,
        "--pool",
        settings.pool,
        "--pool-path",
        settings.pool_path,
        *(["--unsigned"] if source.allow_unsigned else []),
        *(["--refresh"] if refresh else []),
    ]


def start_background(settings: Settings, name: str, *, refresh: bool = False) -> str:
    """Start fetching an image apart from the hook; return how it was started.

    A transient systemd unit where systemd runs (it outlives the hook and is logged in the
    journal), otherwise a detached process in its own session. Its output goes to
    `<state-dir>/<image>.log`.
    """
    command = worker_command(settings, name, refresh=refresh)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    write_state(settings, FetchState(name=name, updated=time.time()))
    log_path = Path(settings.state_dir) / f"{_slug(name)}.log"
    if Path("/run/systemd/system").is_dir() and Path(SYSTEMD_RUN).exists():
        unit = f"vm-host-image-{_slug(name)}-{int(time.time())}"
        subprocess.run(
            [
                SYSTEMD_RUN,
                "--unit",
                unit,
                "--collect",
                "--quiet",
                f"--setenv=PYTHONPATH={env['PYTHONPATH']}",
                *command,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return f"systemd unit {unit}"
    # setsid -f forks the worker into a session of its own and returns at once (a double
    # fork): the worker outlives the hook, and nothing is left for this process to reap.
    with log_path.open("ab") as out:
        subprocess.run(
            [SETSID, "-f", *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=True,
            timeout=60,
        )
    return "detached process (setsid)"


def background(
    store: ImageStore,
    settings: Settings,
    name: str,
    *,
    launch: Callable[..., str] | None = None,
) -> str | None:
    """None when `name` is cached; otherwise what it waits for, starting a fetch if none runs.

    Raises:
        InvalidRequestError: not an image name.
        ImageFetchError: the last fetch failed less than RETRY_AFTER_S ago (its reason).
    """
    image = images.parse_name(name)
    if images.newest(store.cached_images(), image.name) is not None:
        return None
    running = _running(settings, image.name)
    if running is not None:
        return running.message
    failed = _recently_failed(settings, image.name)
    if failed is not None:
        raise ImageFetchError(failed.reason, failed.message)
    how = (launch or start_background)(settings, image.name)
    logger.info("fetching %s in the background (%s)", image.name, how)
    return f"fetching {image.name}: started"


def _running(settings: Settings, name: str) -> FetchState | None:
    """The state of a fetch of `name` that is still running, or None."""
    state = read_state(settings, name)
    if state is None or state.state != "running":
        return None
    fresh = time.time() - state.updated < 60  # started; the worker has not written its pid
    return state if _alive(state.pid) or (state.pid == 0 and fresh) else None


def _recently_failed(settings: Settings, name: str) -> FetchState | None:
    """The state of a fetch of `name` that failed less than RETRY_AFTER_S ago, or None."""
    state = read_state(settings, name)
    if state is None or state.state != "failed":
        return None
    return state if time.time() - state.updated < RETRY_AFTER_S else None


def refresh_in_background(
    store: ImageStore,
    settings: Settings,
    name: str,
    *,
    launch: Callable[..., str] | None = None,
) -> str | None:
    """Start a background refresh of `name` (option `images`) unless one runs; say how."""
    image = images.parse_name(name)
    if _running(settings, image.name) is not None:
        return None
    if _recently_failed(settings, image.name) is not None:
        return None
    cached = images.newest(store.cached_images(), image.name) is not None
    return (launch or start_background)(settings, image.name, refresh=cached)


def probe(store: ImageStore | None, name: str, settings: Settings) -> str:
    """Where a compose would get an image from, checked without fetching it (dry runs).

    Cached: used as it is. Not cached: the verified index of the configured source must list
    it (a local image: its file must be in local-image-dir). LXD (no store here) pulls stream
    images itself from the same verified index.

    Raises:
        InvalidRequestError: not an image name, or no such local image.
        VmHostError: the source cannot give it (which check failed, and the fix).
    """
    image = images.parse_name(name)
    if store is not None:
        cached = images.newest(store.cached_images(), image.name)
        if cached is not None and isinstance(image, StreamImage):
            return f"{image.name} {cached.version}: cached"
    if isinstance(image, LocalImage):
        path, fmt = images.local_image_file(settings.local_dir, image)
        return f"{image.name}: {path} ({fmt}), converted when composed"
    try:
        if store is None:
            found = images.resolve_lxd(settings.source, image, settings.arch)
            return f"{image.name} {found.version}: LXD pulls it from {settings.source.url}"
        item = images.resolve(settings.source, image, settings.arch)
    except ImageFetchError as exc:
        raise VmHostError(
            f"{failure_text(image.name, exc)}; check image-source and image-keyring with "
            "juju config, or put the image in local-image-dir and name it local:NAME"
        ) from exc
    return (
        f"{image.name} {item.version}: not cached, fetched from {settings.source.url} "
        f"({item.size / MB:.0f} MB) when composed"
    )


def failure_text(name: str, exc: ImageFetchError) -> str:
    """One line naming the image and the check that refused it ([checksum], ...)."""
    return f"{name}: fetch failed [{exc.reason}]: {exc}"


class Preparer(Protocol):
    """A backend that gets images ready itself (LXD pulls into its own store)."""

    def prepare_image(
        self, name: str, settings: Settings, *, wait: bool, log: Log | None = None
    ) -> str | None:
        """See vmhost.backends.Backend.prepare_image."""
        ...


def sync_elsewhere(
    backend: Preparer, settings: Settings, names: Sequence[str], log: Log | None = None
) -> list[str]:
    """sync-images where the hypervisor keeps its own store: each image got and waited for.

    Returns the failures, one line per image naming the check; one failing stops no other.
    """
    failed: list[str] = []
    for name in names:
        try:
            backend.prepare_image(name, settings, wait=True, log=log)
        except ImageFetchError as exc:
            failed.append(failure_text(name, exc))
        except VmHostError as exc:
            failed.append(f"{name}: {exc}")
    return failed


def sync(
    store: ImageStore, settings: Settings, names: Sequence[str], *, log: Log | None = None
) -> tuple[list[CachedImage], list[str]]:
    """Fetch or refresh each image now (sync-images); return (cached bases, failures).

    One image failing does not stop the others; each failure names the image and the check.
    """
    synced: list[CachedImage] = []
    failed: list[str] = []
    for name in dict.fromkeys(names):
        try:
            synced.append(ensure(store, name, settings, refresh=True, log=log))
        except ImageFetchError as exc:
            failed.append(failure_text(name, exc))
        except InvalidRequestError as exc:
            failed.append(str(exc))
    return synced, failed


def listing(store: ImageStore) -> list[dict[str, object]]:
    """Every cached base with the VMs using it (list-images), oldest version first."""
    users = store.image_users()
    return [
        {
            "name": base.name,
            "product": base.product,
            "version": base.version,
            "size": base.size,
            "sha256": base.sha256,
            "volume": base.volume,
            "vms": sorted(users.get(base.volume, [])),
        }
        for base in store.cached_images()
    ]


def listing_table(listed: Sequence[dict[str, object]]) -> str:
    """list-images as a table: name, version, size, sha256 (short), VMs using it."""
    if not listed:
        return "no cached images"
    rows = [("NAME", "VERSION", "SIZE", "SHA256", "VMS")]
    for item in listed:
        vms = item["vms"]
        assert isinstance(vms, list)
        size = item["size"]
        assert isinstance(size, int)
        rows.append(
            (
                str(item["name"]),
                str(item["version"]),
                f"{size / MB:.0f} MB",
                str(item["sha256"])[:16],
                ", ".join(str(v) for v in vms) or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    return "\n".join(line.rstrip() for line in lines)


def run_fetch(store: ImageStore, settings: Settings, name: str, *, refresh: bool = False) -> int:
    """The background worker's body: fetch, writing progress; 0 when the image is cached."""
    image = images.parse_name(name)
    pid = os.getpid()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            write_state(
                settings,
                FetchState(image.name, done=done, total=total, pid=pid, updated=time.time()),
            )

    write_state(settings, FetchState(image.name, pid=pid, updated=time.time()))
    try:
        base = ensure(store, image.name, settings, refresh=refresh, log=_say, progress=progress)
    except (ImageFetchError, InvalidRequestError) as exc:
        reason = exc.reason if isinstance(exc, ImageFetchError) else "not-found"
        write_state(
            settings,
            FetchState(image.name, "failed", reason=reason, error=str(exc), updated=time.time()),
        )
        _say(f"failed [{reason}]: {exc}")
        return 1
    write_state(
        settings,
        FetchState(image.name, "done", done=base.size, total=base.size, updated=time.time()),
    )
    return 0


def _say(text: str) -> None:
    print(text, flush=True)  # the worker's log (journal or <state-dir>/<image>.log)


def keep_fresh(backend: Backend, settings: Settings, names: Sequence[str]) -> None:
    """Keep the images of option `images` fetched and current, in the background (logged)."""
    store = backend.image_store()
    for name in names:
        try:
            how = (
                refresh_in_background(store, settings, name)
                if store is not None
                else backend.prepare_image(name, settings, wait=False)
            )
        except VmHostError as exc:
            logger.warning("images: %s: %s", name, exc)
            continue
        if how:
            logger.info("images: refreshing %s (%s)", name, how)

"""Compose time from a cached image (a qcow2 overlay) against the old full copy, on libvirtd.

Makes a base image of SIZE MiB with every cluster allocated (written with qemu-io, as a
cloud image's data would be), caches it once in a test image pool through vmhost.imagecache
(local:NAME, qemu-img convert), then times K times each:

- overlay: the root disk as vm-host makes it now, a qcow2 volume with `<backingStore>` on
  the base, grown to the requested size (nothing copied);
- full copy: what vm-host did before, a new volume the size of the image whose content is
  streamed in through libvirt's upload API, then resized;
- compose: the whole LibvirtBackend.compose of a VM from the cached image (volume, seed ISO,
  define, start; the VM is not booted far), for scale.

It reports the fastest and median of each and the ratio, deletes what it made, and writes
JSON. Run it as root on a libvirt host, under the daemon lock here:

    flock /tmp/vmhost-daemons.lock uv run python -m bench.images --size-mib 600 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from vmhost import imagecache
from vmhost.backends.libvirt import GB, LibvirtBackend
from vmhost.model import DiskSpec, Placement, VmSpec

POOL = "vmhost-test-bench-pool"
IMAGES = "vmhost-test-bench-images"
QEMU_IMG = "/usr/bin/qemu-img"
QEMU_IO = "/usr/bin/qemu-io"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(samples: list[float]) -> dict[str, float]:
    return {"fastest_s": min(samples), "median_s": statistics.median(samples)}


def _remove_pool(conn: libvirt.virConnect, name: str) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        pool = conn.storagePoolLookupByName(name)
        if pool.isActive():
            pool.refresh(0)
            for vol in pool.listAllVolumes(0):
                vol.delete(0)
            pool.destroy()
        pool.undefine()


def make_image(path: Path, size_mib: int) -> None:
    """A qcow2 whose every cluster holds data (a pattern), so a copy has to move it all."""
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"],
                   check=True)  # fmt: skip
    subprocess.run([QEMU_IO, "-f", "qcow2", "-c", f"write -P 0x5a 0 {size_mib}M",
                    str(path)], check=True, capture_output=True)  # fmt: skip


def run(size_mib: int, repeats: int, root_gb: int) -> dict[str, Any]:
    """Measure; return the results (see the module docstring)."""
    work = Path(tempfile.mkdtemp(prefix="vmhost-test-bench-"))
    work.chmod(0o755)
    backend = LibvirtBackend(
        virt_type="qemu",
        console_log_dir=str(work / "console"),
        image_pool=IMAGES,
        image_pool_path=str(work / "image-cache"),
    )
    conn = backend.conn
    try:
        _remove_pool(conn, POOL)
        _remove_pool(conn, IMAGES)
        backend.ensure_pool(POOL, str(work / "pool"))
        (work / "local").mkdir()
        make_image(work / "local" / "bench.qcow2", size_mib)
        settings = imagecache.Settings(local_dir=str(work / "local"), state_dir=str(work / "st"))
        cache_s = _timed(lambda: imagecache.ensure(backend, "local:bench", settings))
        base = imagecache.ensure(backend, "local:bench", settings)
        base_bytes = Path(base.path).stat().st_size
        pool = conn.storagePoolLookupByName(POOL)
        size = root_gb * GB

        def overlay(i: int) -> None:
            vol = backend._overlay_volume(pool, f"vmhost-test-bench-o{i}", base, size)
            vol.delete(0)

        def full_copy(i: int) -> None:
            vol = backend._create_volume(pool, f"vmhost-test-bench-c{i}", base_bytes, "qcow2")
            backend._upload(vol, Path(base.path))
            vol.resize(size, 0)
            vol.delete(0)

        def compose(i: int) -> None:
            name = f"vmhost-test-bench-vm{i}"
            spec = VmSpec(name=name, vcpus=1, memory_mib=64, disks=(DiskSpec("root", root_gb),),
                          image="local:bench")  # fmt: skip
            backend.compose(spec, Placement(vcpus=1, memory_mib=64), (), POOL)
            backend.delete(name)

        overlay_s = [_timed(lambda i=i: overlay(i)) for i in range(repeats)]
        copy_s = [_timed(lambda i=i: full_copy(i)) for i in range(repeats)]
        compose_s = [_timed(lambda i=i: compose(i)) for i in range(repeats)]
        result = {
            "image_mib": size_mib,
            "base_bytes": base_bytes,
            "root_gb": root_gb,
            "repeats": repeats,
            "cache_once_s": cache_s,
            "overlay": _summary(overlay_s),
            "full_copy": _summary(copy_s),
            "compose_from_cache": _summary(compose_s),
        }
        result["full_copy_over_overlay"] = (
            result["full_copy"]["median_s"] / result["overlay"]["median_s"]
        )
        return result
    finally:
        for dom in conn.listAllDomains(0):
            if dom.name().startswith("vmhost-test-bench"):
                with contextlib.suppress(libvirt.libvirtError):
                    backend.delete(dom.name())
        _remove_pool(conn, POOL)
        _remove_pool(conn, IMAGES)
        backend.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--root-gb", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/images.json"))
    args = parser.parse_args()
    result = run(args.size_mib, args.repeats, args.root_gb)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The background fetch of one image into the libvirt image pool, as a process of its own.

vmhost.imagecache starts it (`worker_command` writes the command this parses) so that a hook
never waits for a download. It lives beside the backend it drives: the image cache never
imports a backend, and the import graph stays acyclic.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vmhost import images
from vmhost.backends.libvirt import LibvirtBackend
from vmhost.imagecache import STATE_DIR, Settings, run_fetch
from vmhost.images import Source


def parse(argv: Sequence[str] | None = None) -> tuple[Settings, str, bool]:
    """The settings, image name and refresh flag of a worker command's arguments."""
    parser = argparse.ArgumentParser(prog="vmhost.backends.fetch")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch")
    fetch.add_argument("name")
    fetch.add_argument("--source", default=images.DEFAULT_SOURCE)
    fetch.add_argument("--keyring", default=images.DEFAULT_KEYRING)
    fetch.add_argument("--unsigned", action="store_true")
    fetch.add_argument("--arch", default="x86_64")
    fetch.add_argument("--local-dir", default=images.DEFAULT_LOCAL_DIR)
    fetch.add_argument("--state-dir", default=STATE_DIR)
    fetch.add_argument("--refresh", action="store_true")
    fetch.add_argument("--pool", default=images.IMAGE_POOL)
    fetch.add_argument("--pool-path", default=images.IMAGE_POOL_PATH)
    args = parser.parse_args(argv)
    settings = Settings(
        source=Source(args.source, args.keyring, args.unsigned),
        arch=args.arch,
        local_dir=args.local_dir,
        state_dir=args.state_dir,
        pool=args.pool,
        pool_path=args.pool_path,
    )
    return settings, args.name, args.refresh


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vmhost.backends.fetch fetch NAME ...`: the background fetch of one image."""
    settings, name, refresh = parse(argv)
    with LibvirtBackend(
        image_pool=settings.pool,
        image_pool_path=settings.pool_path,
    ) as backend:
        return run_fetch(backend, settings, name, refresh=refresh)


if __name__ == "__main__":  # pragma: nocover
    sys.exit(main())

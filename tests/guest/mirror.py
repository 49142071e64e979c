"""Publish a disk image as a signed simplestreams mirror, and serve it on 127.0.0.1.

    python3 tests/guest/mirror.py publish IMAGE DIR [--product ID] [--version SERIAL]
        writes DIR/streams/v1/{index,com.ubuntu.cloud:released:download}.{json,sjson}, the
        item under DIR/server/..., and DIR/keyring.gpg (the throwaway public key that verifies
        the signed indexes); prints the path of the keyring
    python3 tests/guest/mirror.py serve DIR [--port N]
        serves DIR over HTTP on 127.0.0.1 (port 0: any free port) and prints the URL

The product defaults to com.ubuntu.cloud:server:24.04:amd64 (what `ubuntu@24.04` resolves to on
amd64); the item is `disk1.img` with the image's sha256 and size, as on cloud-images.ubuntu.com.
Tests import publish() and serve() directly; the signing key lives in a private GNUPGHOME under
DIR/.gnupg that is made on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

GPG = "/usr/bin/gpg"
GPGCONF = "/usr/bin/gpgconf"
CONTENT_ID = "com.ubuntu.cloud:released:download"
DEFAULT_PRODUCT = "com.ubuntu.cloud:server:24.04:amd64"
UPDATED = "Mon, 01 Dec 2026 00:00:00 +0000"
RELEASES = {"20.04": "focal", "22.04": "jammy", "24.04": "noble"}


def _gpg(home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    try:
        options = ("--homedir", str(home), "--batch", "--quiet", "--pinentry-mode", "loopback")
        return subprocess.run(
            [GPG, *options, *args],
            input=stdin,
            check=True,
            capture_output=True,
        ).stdout
    finally:
        # gpg starts an agent per home that outlives the test run: stop it again.
        subprocess.run(
            [GPGCONF, "--homedir", str(home), "--kill", "gpg-agent"],
            check=False,
            capture_output=True,
        )


def signing_home(directory: Path) -> Path:
    """Return the GNUPGHOME holding the mirror's throwaway key, making the key on first use."""
    home = directory / ".gnupg"
    if not (home / "pubring.kbx").exists():
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        _gpg(
            home,
            "--passphrase",
            "",
            "--quick-generate-key",
            "vm-host test mirror <mirror@vm-host.invalid>",
            "ed25519",
            "sign",
            "never",
        )
    return home


def sign(home: Path, path: Path) -> Path:
    """Clearsign a JSON file into the .sjson next to it."""
    signed = path.with_suffix(".sjson")
    signed.write_bytes(_gpg(home, "--clearsign", stdin=path.read_bytes()))
    return signed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(
    image: Path,
    directory: Path,
    product: str = DEFAULT_PRODUCT,
    version: str = "20261201",
) -> Path:
    """Write the mirror (indexes signed, item copied) and return the path of its keyring."""
    _, _, release, arch = product.split(":")
    codename = RELEASES.get(release, release)
    rel_path = (
        f"server/releases/{codename}/release-{version}/ubuntu-{release}-server-cloudimg-{arch}.img"
    )
    item = directory / rel_path
    item.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(image, item)
    streams = directory / "streams" / "v1"
    streams.mkdir(parents=True, exist_ok=True)
    products = {
        "content_id": CONTENT_ID,
        "datatype": "image-downloads",
        "format": "products:1.0",
        "updated": UPDATED,
        "products": {
            product: {
                "arch": arch,
                "os": "ubuntu",
                "release": codename,
                "version": release,
                "release_title": f"{release} LTS",
                "versions": {
                    version: {
                        "items": {
                            "disk1.img": {
                                "ftype": "disk1.img",
                                "path": rel_path,
                                "sha256": _sha256(item),
                                "size": item.stat().st_size,
                            }
                        }
                    }
                },
            }
        },
    }
    products_path = streams / f"{CONTENT_ID}.json"
    products_path.write_text(json.dumps(products, indent=1))
    index = {
        "format": "index:1.0",
        "updated": UPDATED,
        "index": {
            CONTENT_ID: {
                "datatype": "image-downloads",
                "format": "products:1.0",
                "path": f"streams/v1/{CONTENT_ID}.json",
                "products": [product],
                "updated": UPDATED,
            }
        },
    }
    index_path = streams / "index.json"
    index_path.write_text(json.dumps(index, indent=1))
    home = signing_home(directory)
    sign(home, products_path)
    sign(home, index_path)
    keyring = directory / "keyring.gpg"
    keyring.write_bytes(_gpg(home, "--export"))
    return keyring


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.requests is not None:
            self.requests.append(self.path)
        super().do_GET()


@contextlib.contextmanager
def serve(directory: Path, port: int = 0, requests: list[str] | None = None) -> Iterator[str]:
    """Serve a directory over HTTP on 127.0.0.1 while the context is open; yield its URL.

    With `requests`, the path of every GET is appended to it (tests count downloads).
    """
    handler_class = type("_Handler", (_QuietHandler,), {"requests": requests})
    handler = functools.partial(handler_class, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Publish or serve a signed simplestreams mirror.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish")
    p.add_argument("image", type=Path)
    p.add_argument("directory", type=Path)
    p.add_argument("--product", default=DEFAULT_PRODUCT)
    p.add_argument("--version", default="20261201")
    s = sub.add_parser("serve")
    s.add_argument("directory", type=Path)
    s.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.command == "publish":
        print(publish(args.image, args.directory, args.product, args.version))
        return
    with serve(args.directory, args.port) as url:
        print(url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    os._exit(0)


if __name__ == "__main__":
    main()

"""Just enough of LXD 5.0's REST API on a unix socket, for the real vmhost.lxd_trust code.

LXD's daemon cannot run in a unit test; this stands in for it at the socket, so every rule of
vm-host's (names, project restriction, rotation, departed units, tokens) runs as deployed and is
judged by what reached LXD. It keeps what it was sent (certificates, projects, config,
operations) and records each request; it decides nothing of vm-host's. The real daemon is
exercised in tests/integration/test_access_lxd.py.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socketserver
import threading
import urllib.parse
import uuid
from collections.abc import Iterator

from vmhost import lxd_trust


class FakeLxd:
    """Just enough of LXD 5.0's REST API, with its sync/async/error envelopes."""

    def __init__(self, server_pem: str):
        self.config: dict[str, str] = {}
        self.server_pem = server_pem
        self.projects: dict[str, dict] = {"default": {}}
        self.profiles: dict[str, dict] = {"default": {"devices": {}}}
        self.certs: dict[str, dict] = {}
        self.operations: dict[str, dict] = {}
        self.fail_next: str | None = None
        self.requests: list[tuple[str, str]] = []
        """Every request as it came: (method, path)."""

    def handle(self, method: str, path: str, body):  # noqa: C901 - a router, flat on purpose
        self.requests.append((method, path))
        url = urllib.parse.urlparse(path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.strip("/").split("/")
        if self.fail_next:
            reason, self.fail_next = self.fail_next, None
            return 500, {"type": "error", "error": reason, "error_code": 500}
        if parts == ["1.0"]:
            if method == "PATCH":
                self.config.update(body["config"])
                self.config = {k: v for k, v in self.config.items() if v}
                return 200, _sync({})
            return 200, _sync(
                {"config": self.config, "environment": {"certificate": self.server_pem}}
            )
        if parts[:2] == ["1.0", "projects"]:
            if method == "POST":
                self.projects[body["name"]] = body
                return 201, _sync({})
            if method == "DELETE":
                self.projects.pop(parts[2], None)
                return 200, _sync({})
            return 200, _sync([f"/1.0/projects/{p}" for p in self.projects])
        if parts[:2] == ["1.0", "profiles"]:
            key = query.get("project", "default")
            profile = self.profiles.setdefault(key, {"devices": {}})
            if method == "PATCH":
                profile.update(body)
            return 200, _sync(profile)
        if parts[:2] == ["1.0", "certificates"]:
            if len(parts) == 3:
                if method == "DELETE":
                    del self.certs[parts[2]]
                else:
                    self.certs[parts[2]].update(body)
                return 200, _sync({})
            if method == "POST" and body.get("token"):
                if not self.config.get("core.https_address"):
                    return 400, {"type": "error", "error": "not listening", "error_code": 400}
                op = str(uuid.uuid4())
                meta = {"fingerprint": "f" * 64, "addresses": ["127.0.0.1:8443"], "secret": "s"}
                self.operations[op] = {
                    "id": op,
                    "class": "token",
                    "metadata": {**meta, "request": body},
                }
                return 202, {
                    "type": "async",
                    "operation": f"/1.0/operations/{op}",
                    "metadata": {"metadata": meta},
                }
            if method == "POST":
                cert = lxd_trust.parse_certificate(
                    "-----BEGIN CERTIFICATE-----\n"
                    + body["certificate"]
                    + "\n-----END CERTIFICATE-----\n"
                )
                self.certs[cert.fingerprint] = {**body, "fingerprint": cert.fingerprint}
                return 201, _sync({})
            return 200, _sync(list(self.certs.values()))
        if parts[:2] == ["1.0", "operations"]:
            if len(parts) == 4 and parts[3] == "wait":
                return 200, _sync({"status": "Success"})
            if len(parts) == 3 and method == "DELETE":
                del self.operations[parts[2]]
                return 200, _sync({})
            return 200, _sync({"running": list(self.operations.values())})
        return 404, {"type": "error", "error": "not found", "error_code": 404}


def _sync(metadata):
    return {"type": "sync", "status": "Success", "metadata": metadata}


@contextlib.contextmanager
def serving(fake: FakeLxd, path: str) -> Iterator[FakeLxd]:
    """Serve `fake` on a unix socket at `path` until the block ends."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, payload = fake.handle(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve  # noqa: N815 - http.server names

        def address_string(self):
            return "unix"

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    server = Server(path, Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()

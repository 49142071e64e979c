"""LXD access over HTTPS: listen address, the managers' project, and client certificate trust.

vm-host talks to LXD on its local unix socket (where it is trusted as root) and makes LXD's
HTTPS API usable by managers: it sets core.https_address, creates the project managers work
in, and trusts each manager's client certificate restricted to that project. Certificates are
named `vm-host:<app or unit>` so each can be found and removed exactly; LXD's trust store is
the ledger, no charm state is needed.

Nothing here turns TLS verification off: clients pin the server certificate that
`server_certificate()` returns.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from vmhost.constraints import validate_project
from vmhost.model import InvalidRequestError, VmHostError

logger = logging.getLogger(__name__)

SOCKET_PATHS = (
    "/var/snap/lxd/common/lxd/unix.socket",
    "/var/lib/lxd/unix.socket",
)
"""The snap's socket first, then Debian's lxd package."""
NAME_PREFIX = "vm-host:"
PROJECT_FEATURES = {
    "features.images": "true",
    "features.profiles": "true",
    "features.storage.volumes": "true",
}
"""What LXD 5.0 can keep per project: each manager's images, profiles and volumes apart."""

_CLIENT_RE = re.compile(r"^[a-z0-9][a-z0-9./_-]{0,99}$")


class LxdError(VmHostError):
    """LXD refused a request or could not be reached."""


# ---------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class Certificate:
    """A validated client certificate."""

    pem: str
    fingerprint: str
    """SHA-256 of the DER, lower-case hex, as LXD names certificates."""
    subject: str
    not_after: datetime.datetime


def parse_certificate(
    pem: str, now: datetime.datetime | None = None, field: str = "certificate"
) -> Certificate:
    """Validate one PEM X.509 certificate that is valid now.

    Raises:
        InvalidRequestError: not PEM, not X.509, more than one certificate, expired or not
            yet valid; the message says which.
    """
    if not isinstance(pem, str) or "-----BEGIN CERTIFICATE-----" not in pem:
        raise InvalidRequestError(
            field, "not a PEM certificate: expected '-----BEGIN CERTIFICATE-----'"
        )
    if pem.count("-----BEGIN CERTIFICATE-----") != 1:
        raise InvalidRequestError(field, "give exactly one certificate, not a chain")
    if "PRIVATE KEY" in pem:
        raise InvalidRequestError(
            field, "the text contains a private key; send only the certificate"
        )
    try:
        cert = x509.load_pem_x509_certificate(pem.strip().encode())
    except ValueError:
        raise InvalidRequestError(
            field, "the PEM block is not a valid X.509 certificate"
        ) from None
    now = now or datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise InvalidRequestError(
            field, f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    if cert.not_valid_before_utc > now:
        raise InvalidRequestError(
            field,
            f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
        )
    canonical = cert.public_bytes(serialization.Encoding.PEM).decode()
    return Certificate(
        pem=canonical,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        subject=cert.subject.rfc4514_string(),
        not_after=cert.not_valid_after_utc,
    )


def certificate_name(client: str) -> str:
    """Return the trust-store name for a client (an application or unit name)."""
    if not isinstance(client, str) or not _CLIENT_RE.fullmatch(client):
        raise InvalidRequestError(
            "name",
            f"{client!r} is not a valid client name: use a-z, 0-9, '.', '/', '_' and '-'",
        )
    return NAME_PREFIX + client


def relation_certificate_name(unit: str) -> str:
    """Return the trust-store name for a related unit ("vm-host:maas/0").

    Relation names always hold a '/', action names never do, so a reconcile can tell which
    certificates a departed unit left behind without touching those an operator added.
    """
    if "/" not in unit:
        raise InvalidRequestError("unit", f"{unit!r} is not a unit name ('<app>/<number>')")
    return certificate_name(unit)


def action_certificate_name(client: str) -> str:
    """Return the trust-store name for a client added by action ("vm-host:<client>")."""
    if isinstance(client, str) and "/" in client:
        raise InvalidRequestError("name", f"{client!r}: client names added by action have no '/'")
    return certificate_name(client)


@dataclass(frozen=True)
class TrustedCertificate:
    """A client certificate in LXD's trust store."""

    name: str
    fingerprint: str
    restricted: bool
    projects: tuple[str, ...]
    type: str = "client"

    @property
    def managed(self) -> bool:
        """Whether vm-host added it (its name carries vm-host's prefix)."""
        return self.name.startswith(NAME_PREFIX)

    @property
    def from_relation(self) -> bool:
        """Whether vm-host added it for a related unit (see `relation_certificate_name`)."""
        return self.managed and "/" in self.name


# ---------------------------------------------------------------------------------------------
# The local API


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("lxd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def find_socket(candidates: Sequence[str] = SOCKET_PATHS) -> str:
    """Return LXD's unix socket: $LXD_DIR's, else the snap's, else Debian's package's.

    Raises:
        LxdError: no socket exists (LXD is not installed or not running).
    """
    lxd_dir = os.environ.get("LXD_DIR")
    paths = [os.path.join(lxd_dir, "unix.socket")] if lxd_dir else []
    for path in [*paths, *candidates]:
        if os.path.exists(path):
            return path
    raise LxdError(f"LXD is not running: no unix socket at {', '.join([*paths, *candidates])}")


class LxdTrust:
    """Manage LXD's HTTPS access through the local unix socket."""

    def __init__(self, socket_path: str | None = None, timeout: float = 60.0):
        self.socket_path = socket_path or find_socket()
        self.timeout = timeout

    # -- transport ---------------------------------------------------------------------------

    def _call(self, method: str, path: str, payload: str | None = None) -> tuple[int, bytes]:
        """One HTTP exchange with LXD over the unix socket: (status, body)."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError as exc:
            raise LxdError(f"LXD at {self.socket_path} cannot be reached: {exc}") from exc
        finally:
            conn.close()

    def request(self, method: str, path: str, body: Any = None, *, wait: bool = True) -> Any:
        """Call LXD's API over the unix socket; return the response metadata (LxdError on failure).

        Shared with the LXD backend, so there is one LXD client in vm-host. An asynchronous
        call is waited for, unless `wait=False`: then its operation (id, status) is returned.
        """
        status, raw = self._call(method, path, json.dumps(body) if body is not None else None)
        try:
            data = json.loads(raw)
        except ValueError:
            raise LxdError(f"LXD answered {method} {path} with non-JSON") from None
        if data.get("type") == "error" or status >= 400:
            raise LxdError(f"LXD refused {method} {path}: {data.get('error') or status}")
        if data.get("type") == "async":
            return self._wait(data["operation"]) if wait else data.get("metadata")
        return data.get("metadata")

    def request_text(self, path: str) -> str:
        """GET a non-JSON endpoint (LXD's /1.0/metrics is Prometheus text) over the socket."""
        status, raw = self._call("GET", path)
        if status >= 400:
            raise LxdError(f"LXD refused GET {path}: {status}")
        return raw.decode("utf-8", "replace")

    def _wait(self, operation: str) -> Any:
        meta = self.request("GET", f"{operation}/wait?timeout={int(self.timeout)}")
        if meta.get("status") != "Success":
            raise LxdError(f"LXD operation failed: {meta.get('err') or meta.get('status')}")
        return meta

    # -- server ------------------------------------------------------------------------------

    def server_info(self) -> dict[str, Any]:
        """Return GET /1.0 (config, environment, api extensions)."""
        return self.request("GET", "/1.0")

    def server_certificate(self) -> str:
        """Return the server's PEM certificate, for clients to pin."""
        return self.server_info()["environment"]["certificate"]

    def ensure_https(self, address: str, port: int = 8443) -> bool:
        """Make LXD listen for HTTPS on address:port; returns whether it changed.

        Only core.https_address is sent (PATCH), so other server settings stay as they are.
        """
        if not 0 < int(port) < 65536:
            raise InvalidRequestError("https-port", f"{port} is not a TCP port")
        if not address or any(c in address for c in "/@?#[] \t\n"):
            raise InvalidRequestError("address", f"{address!r} is not an IP address")
        wanted = f"[{address}]:{int(port)}" if ":" in address else f"{address}:{int(port)}"
        current = self.server_info().get("config", {}).get("core.https_address")
        if current == wanted:
            return False
        self.request("PATCH", "/1.0", {"config": {"core.https_address": wanted}})
        logger.info("LXD now listens for HTTPS on %s", wanted)
        return True

    def https_address(self) -> str:
        """Return core.https_address ("" when LXD does not listen on the network)."""
        return self.server_info().get("config", {}).get("core.https_address", "")

    def disable_https(self) -> bool:
        """Stop listening on the network (on removal); returns whether it changed."""
        if not self.https_address():
            return False
        self.request("PATCH", "/1.0", {"config": {"core.https_address": ""}})
        return True

    # -- projects ----------------------------------------------------------------------------

    def projects(self) -> list[str]:
        """Return the names of LXD's projects."""
        return [url.rsplit("/", 1)[1] for url in self.request("GET", "/1.0/projects")]

    def ensure_project(self, name: str, storage_pool: str | None = None) -> bool:
        """Create the project when missing; returns whether it was created.

        With its own profiles a new project's default profile is empty, so when a storage pool
        is given a root disk on it is added there, and instances can be created right away.
        """
        validate_project(name)
        created = False
        if name not in self.projects():
            self.request(
                "POST",
                "/1.0/projects",
                {"name": name, "description": "vm-host managers", "config": PROJECT_FEATURES},
            )
            created = True
            logger.info("created LXD project %s", name)
        if storage_pool:
            self.ensure_root_disk(name, storage_pool)
        return created

    def ensure_root_disk(self, project: str, pool: str) -> None:
        """Give the project's default profile a root disk on `pool` when it has none."""
        path = f"/1.0/profiles/default?project={urllib.parse.quote(project)}"
        profile = self.request("GET", path)
        devices = profile.get("devices") or {}
        if any(d.get("type") == "disk" and d.get("path") == "/" for d in devices.values()):
            return
        devices["root"] = {"type": "disk", "path": "/", "pool": pool}
        self.request("PATCH", path, {"devices": devices})

    def delete_project(self, name: str) -> None:
        """Delete an (empty) project; used by tests and on removal of an unused project."""
        validate_project(name)
        if name in self.projects():
            self.request("DELETE", f"/1.0/projects/{name}")

    # -- trust -------------------------------------------------------------------------------

    def trusted(self) -> list[TrustedCertificate]:
        """Return every certificate in LXD's trust store."""
        found = []
        for item in self.request("GET", "/1.0/certificates?recursion=1"):
            found.append(
                TrustedCertificate(
                    name=item.get("name", ""),
                    fingerprint=item["fingerprint"],
                    restricted=bool(item.get("restricted")),
                    projects=tuple(item.get("projects") or ()),
                    type=item.get("type", "client"),
                )
            )
        return found

    def trust_certificate(self, pem: str, name: str, projects: Sequence[str]) -> bool:
        """Trust a client certificate restricted to `projects`, under `name`.

        One name holds one certificate: a client that sends a new certificate has the old one
        removed. A certificate already trusted under another name is refused.

        Args:
            pem: the client certificate (validated here).
            name: "vm-host:<app or unit>" (see `certificate_name`).
            projects: projects it may use; at least one.

        Returns:
            Whether the trust store changed.
        """
        if not name.startswith(NAME_PREFIX):
            raise InvalidRequestError("name", f"{name!r} must start with {NAME_PREFIX!r}")
        certificate_name(name.removeprefix(NAME_PREFIX))
        if not projects:
            raise InvalidRequestError("projects", "give at least one project")
        wanted_projects = sorted({validate_project(p, "projects") for p in projects})
        missing = [p for p in wanted_projects if p not in self.projects()]
        if missing:
            raise InvalidRequestError("projects", f"no such LXD project: {', '.join(missing)}")
        cert = parse_certificate(pem)
        changed = False
        existing = self.trusted()
        for other in existing:
            if other.fingerprint == cert.fingerprint and other.name != name:
                raise InvalidRequestError(
                    "certificate", f"this certificate is already trusted as {other.name!r}"
                )
            if other.name == name and other.fingerprint != cert.fingerprint:
                self.request("DELETE", f"/1.0/certificates/{other.fingerprint}")
                changed = True
        same = [c for c in existing if c.fingerprint == cert.fingerprint]
        if same:
            current = same[0]
            if current.restricted and sorted(current.projects) == wanted_projects:
                return changed
            self.request(
                "PATCH",
                f"/1.0/certificates/{cert.fingerprint}",
                {"restricted": True, "projects": wanted_projects},
            )
            return True
        self.request(
            "POST",
            "/1.0/certificates",
            {
                "type": "client",
                "name": name,
                "certificate": _pem_body(cert.pem),
                "restricted": True,
                "projects": wanted_projects,
            },
        )
        logger.info("trusted %s (%s) for %s", name, cert.fingerprint[:12], wanted_projects)
        return True

    def sync_relation_certificates(
        self, wanted: dict[str, tuple[str, Sequence[str]]]
    ) -> dict[str, str]:
        """Trust exactly the related units' certificates; drop those of departed units.

        Certificates added by action (names without '/') and by anyone else are left alone. A
        unit whose new certificate is refused loses the one trusted before: access follows what
        the unit sends now.

        Args:
            wanted: unit name -> (PEM certificate, projects) for every live related unit.

        Returns:
            unit name -> reason, for each certificate refused (the others are applied).
        """
        refused: dict[str, str] = {}
        keep: set[str] = set()
        for unit, (pem, projects) in sorted(wanted.items()):
            try:
                name = relation_certificate_name(unit)
                self.trust_certificate(pem, name, projects)
                keep.add(name)
            except InvalidRequestError as exc:
                refused[unit] = str(exc)
        for cert in self.trusted():
            if cert.from_relation and cert.name not in keep:
                self.untrust(cert.name)
        return refused

    def trust_action_client(self, client: str, pem: str, projects: Sequence[str]) -> str:
        """Trust a client added by the add-trusted-client action; return its trust-store name."""
        name = action_certificate_name(client)
        self.trust_certificate(pem, name, projects)
        return name

    def untrust_action_client(self, client: str) -> str | None:
        """Remove a client added by action; return its trust-store name, None if unknown."""
        name = action_certificate_name(client)
        return name if self.untrust(name) else None

    def untrust(self, name: str) -> bool:
        """Remove every certificate named `name` and its pending tokens; returns whether any."""
        if not name.startswith(NAME_PREFIX):
            raise InvalidRequestError("name", f"{name!r} must start with {NAME_PREFIX!r}")
        removed = False
        for cert in self.trusted():
            if cert.name == name:
                self.request("DELETE", f"/1.0/certificates/{cert.fingerprint}")
                removed = True
        for token in self._pending_tokens():
            if token.get("name") == name:
                self.request("DELETE", f"/1.0/operations/{token['id']}")
                removed = True
        if removed:
            logger.info("removed trust for %s", name)
        return removed

    def remove_managed(self, prefix: str = NAME_PREFIX) -> list[str]:
        """Untrust every certificate (and pending token) vm-host added, on removal.

        Args:
            prefix: names to remove start with this; it must start with vm-host's own prefix,
                so certificates others added are never touched.

        Returns:
            The names removed.
        """
        if not prefix.startswith(NAME_PREFIX):
            raise InvalidRequestError("prefix", f"{prefix!r} must start with {NAME_PREFIX!r}")
        names = {c.name for c in self.trusted() if c.name.startswith(prefix)}
        names |= {
            t["name"] for t in self._pending_tokens() if (t.get("name") or "").startswith(prefix)
        }
        for name in sorted(names):
            self.untrust(name)
        return sorted(names)

    def describe(self) -> list[dict[str, str]]:
        """Every trusted client and pending token, as list-access shows them.

        Name (without vm-host's prefix for those it added), fingerprint, projects ("all" for an
        unrestricted certificate) and source: "action" (add-trusted-client or a used token),
        "relation" (the access relation), "token" (issued, not used yet), "other" (added
        outside vm-host; vm-host never removes those).
        """
        out = []
        for cert in sorted(self.trusted(), key=lambda c: c.name):
            if cert.type != "client":
                continue
            if cert.from_relation:
                source = "relation"
            elif cert.managed:
                source = "action"
            else:
                source = "other"
            out.append(
                {
                    "name": cert.name.removeprefix(NAME_PREFIX) if cert.managed else cert.name,
                    "fingerprint": cert.fingerprint,
                    "projects": ",".join(cert.projects) if cert.restricted else "all",
                    "source": source,
                }
            )
        for token in sorted(self._pending_tokens(), key=lambda t: str(t.get("name") or "")):
            name = str(token.get("name") or "")
            out.append(
                {
                    "name": name.removeprefix(NAME_PREFIX),
                    "fingerprint": "",
                    "projects": "",
                    "source": "token",
                }
            )
        return out

    def _pending_tokens(self) -> list[dict[str, Any]]:
        ops = self.request("GET", "/1.0/operations?recursion=1") or {}
        found = []
        for op in ops.get("running", []) or []:
            meta = op.get("metadata") or {}
            if op.get("class") == "token" and meta.get("request", {}).get("type") == "client":
                found.append({"id": op["id"], "name": meta["request"].get("name")})
        return found

    def issue_trust_token(self, client_name: str, projects: Sequence[str]) -> str:
        """Return a one-time token that lets `client_name` add its own certificate.

        The certificate added with the token is restricted to `projects` and named
        "vm-host:<client_name>". The token is a secret: return it to the operator only.
        """
        name = action_certificate_name(client_name)
        if not projects:
            raise InvalidRequestError("projects", "give at least one project")
        wanted_projects = sorted({validate_project(p, "projects") for p in projects})
        missing = [p for p in wanted_projects if p not in self.projects()]
        if missing:
            raise InvalidRequestError("projects", f"no such LXD project: {', '.join(missing)}")
        if any(c.name == name for c in self.trusted()):
            raise InvalidRequestError(
                "name", f"{name!r} is already trusted; remove it first or pick another name"
            )
        conn = _UnixConnection(self.socket_path, self.timeout)
        body = {
            "type": "client",
            "name": name,
            "token": True,
            "restricted": True,
            "projects": wanted_projects,
        }
        try:
            conn.request(
                "POST",
                "/1.0/certificates",
                body=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            data = json.loads(conn.getresponse().read())
        except OSError as exc:
            raise LxdError(f"LXD at {self.socket_path} cannot be reached: {exc}") from exc
        finally:
            conn.close()
        if data.get("type") != "async":
            raise LxdError(f"LXD refused the token request: {data.get('error')}")
        meta = data["metadata"]["metadata"]
        token = {
            "client_name": name,
            "fingerprint": meta["fingerprint"],
            "addresses": meta["addresses"],
            "secret": meta["secret"],
            "expires_at": meta.get("expiresAt", "0001-01-01T00:00:00Z"),
        }
        logger.info("issued a trust token for %s", name)
        return base64.b64encode(json.dumps(token).encode()).decode()


def _pem_body(pem: str) -> str:
    """Return the base64 DER LXD's API takes in its `certificate` field."""
    lines = [line for line in pem.strip().splitlines() if not line.startswith("-----")]
    return "".join(lines)

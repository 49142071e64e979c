"""The naming and ownership contract of relation VMs: it must never change between revisions.

Ownership and isolation. Every VM composed for a relation carries the owner
``relation:<relation id>:<app>:<vm-host app>:<model uuid>`` and the request id in the
hypervisor's own metadata (see `vmhost.backends.libvirt`): the requiring application and
relation, and the vm-host application and model that composed it (its `Scope`). The relation
round only ever touches a VM whose owner parses as a relation owner of its own scope, and it
matches VMs to requests by (owner, request id), so one application's requests can never
reach another application's VMs, nor VMs of the compose-vm action (owner "action"), nor VMs
of another vm-host application or model on the same host, nor domains vm-host did not
create. A request whose VM name is already taken by any other VM is refused, never matched
by name. A VM released under release-policy keep is re-owned
``released:<app>:<vm-host app>:<model uuid>``: no relation touches it again, and delete-vm
of that vm-host application may delete it.

Upgrade path. Revisions before scoped owners wrote ``relation:<relation id>:<app>``
(`relation_owner` without a scope still gives that form). Such a legacy owner names no
vm-host application or model; it is read as this application's only where that is certain
enough: relation ids are unique within a model, so a legacy VM whose relation id is a live
relation of this application (with the same app name) is that relation's, and one whose
relation this unit saw broken was its own. Any other legacy VM is reported as orphaned and
never deleted (`read_owner`, `serve.plan_changes`).

VM names. A relation request gets ``<app>-<relation id>-<request id>`` ("pg-7-db-0"). Juju
application names are hyphen-joined segments that each hold a letter, and relation ids are
all digits, so the first all-digit segment marks where the app ends: two different
(relation, app, request id) triples never give the same plain name, and the relation id
keeps a re-related application's names apart from VMs its old relation left behind under
release-policy keep. When the plain name would be longer than `VM_NAME_MAX` characters, would
break the VM name rules, or the app name is not a Juju application name, the name becomes a
readable stem cut short plus 10 hex digits of SHA-256 over the triple. `VM_NAME_MAX` is 48,
not the 63 a name may have, so disk volumes (``<vm>-<label>``) keep room for labels of up to
14 characters. The output of `vm_name` for a given triple must never change between charm
revisions (VMs are found by owner and request id, so a rename would not lose them, but the
names are what operators and power drivers see). A hashed name could in theory equal another
request's plain name; like any other clash with an existing name, compose refuses it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from vmhost.constraints import NAME_PATTERN, REQUEST_ID_PATTERN
from vmhost.model import VmRecord

__all__ = [
    "ACTION_OWNER",
    "VM_NAME_MAX",
    "Owner",
    "RequestKey",
    "Scope",
    "composed_keys",
    "parse_owner",
    "read_owner",
    "relation_owner",
    "released_owner",
    "request_key_of",
    "vm_name",
]

ACTION_OWNER = "action"
"""Owner of VMs made by the compose-vm action; no relation ever touches them."""
VM_NAME_MAX = 48

_OWNER_PREFIX = "relation:"
_RELEASED_PREFIX = "released:"
_UUID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_APP_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
"""What an owner string may carry as app (loose: parsing must not depend on Juju's rule)."""
_JUJU_APP_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]*[a-z][a-z0-9]*)*$")
"""Juju application names: every hyphen-separated segment holds a letter."""
_DIGEST_CHARS = 10


@dataclass(frozen=True, order=True)
class Scope:
    """The vm-host application and the model whose VMs these are."""

    app: str
    model_uuid: str

    def __post_init__(self) -> None:
        if not isinstance(self.app, str) or not _APP_PATTERN.fullmatch(self.app):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"application name {self.app!r} is not a Juju application name")
        if not isinstance(self.model_uuid, str) or not _UUID_PATTERN.fullmatch(  # pyright: ignore[reportUnnecessaryIsInstance]
            self.model_uuid
        ):
            raise ValueError(f"model uuid {self.model_uuid!r} is not a lower-case UUID")

    def __str__(self) -> str:
        return f"{self.app}:{self.model_uuid}"


def _check_app(app: str) -> None:
    if not isinstance(app, str) or not _APP_PATTERN.fullmatch(app):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"application name {app!r} is not a Juju application name")


def relation_owner(relation_id: int, app: str, scope: Scope | None = None) -> str:
    """Return the owner string of VMs composed for an application over one relation.

    Without a scope this is the legacy form ``relation:<id>:<app>`` (read, never written, by
    a charm that knows its scope).

    Raises:
        ValueError: the relation id is not a non-negative integer or the app name is not
            lower-case letters, digits and hyphens (a bug in the caller: Juju gives both).
    """
    if isinstance(relation_id, bool) or not isinstance(relation_id, int) or relation_id < 0:
        raise ValueError(f"relation id must be a non-negative integer, got {relation_id!r}")
    _check_app(app)
    legacy = f"{_OWNER_PREFIX}{relation_id}:{app}"
    return legacy if scope is None else f"{legacy}:{scope}"


def released_owner(app: str, scope: Scope) -> str:
    """Return the owner of a VM released under release-policy keep (operator-deletable)."""
    _check_app(app)
    return f"{_RELEASED_PREFIX}{app}:{scope}"


@dataclass(frozen=True)
class Owner:
    """A parsed relation or released owner."""

    app: str
    """The requiring application."""
    relation_id: int | None = None
    """None for a released VM."""
    scope: Scope | None = None
    """None for a legacy owner (written before owners carried their scope)."""

    @property
    def released(self) -> bool:
        """Whether the VM was released (release-policy keep) and is no relation's now."""
        return self.relation_id is None


def _scope_of(parts: list[str]) -> Scope | bool | None:
    """Scope from [app, uuid]; None when absent; False when malformed."""
    if not parts:
        return None
    if len(parts) != 2:
        return False
    try:
        return Scope(parts[0], parts[1])
    except ValueError:
        return False


def read_owner(owner: str) -> Owner | None:
    """Parse a relation owner (scoped or legacy) or a released owner; None for any other.

    "action", "" (domains vm-host did not create) and anything malformed give None, so they
    are never mistaken for a relation's VMs.
    """
    if owner.startswith(_RELEASED_PREFIX):
        app, *rest = owner[len(_RELEASED_PREFIX) :].split(":")
        scope = _scope_of(rest)
        if not isinstance(scope, Scope) or not _APP_PATTERN.fullmatch(app):
            return None
        return Owner(app, None, scope)
    if not owner.startswith(_OWNER_PREFIX):
        return None
    number, *parts = owner[len(_OWNER_PREFIX) :].split(":")
    if not parts or not number.isascii() or not number.isdigit() or len(number) > 18:
        return None
    app, rest = parts[0], parts[1:]
    scope = _scope_of(rest)
    if scope is False or number != str(int(number)) or not _APP_PATTERN.fullmatch(app):
        return None
    return Owner(app, int(number), scope if isinstance(scope, Scope) else None)


def parse_owner(owner: str) -> tuple[int, str] | None:
    """Return (relation id, app) of a relation owner string, None for any other owner.

    Scoped and legacy relation owners alike; released, "action", "" and anything malformed
    give None. Whose scope it is, is `read_owner`'s to say.
    """
    parsed = read_owner(owner)
    if parsed is None or parsed.relation_id is None:
        return None
    return parsed.relation_id, parsed.app


@dataclass(frozen=True, order=True)
class RequestKey:
    """One request of one application on one relation; orders by relation, app, id."""

    relation_id: int
    app: str
    request_id: str

    def __post_init__(self) -> None:
        relation_owner(self.relation_id, self.app)
        if not isinstance(self.request_id, str) or not REQUEST_ID_PATTERN.fullmatch(  # pyright: ignore[reportUnnecessaryIsInstance]
            self.request_id
        ):
            raise ValueError(f"request id {self.request_id!r} is not [a-z0-9-]{{1,40}}")

    @property
    def owner(self) -> str:
        """The legacy owner string of this request (no scope); see `owner_in`."""
        return relation_owner(self.relation_id, self.app)

    def owner_in(self, scope: Scope | None) -> str:
        """The owner string VMs of this request carry when composed by `scope`."""
        return relation_owner(self.relation_id, self.app, scope)

    def __str__(self) -> str:
        return f"{self.app}/{self.request_id} (relation {self.relation_id})"


def request_key_of(vm: VmRecord, scope: Scope | None = None) -> RequestKey | None:
    """Return the request a VM was composed for, or None for action and foreign VMs.

    With a scope, a VM whose owner names another vm-host application or model is foreign
    too (legacy owners, which name none, still give their key).
    """
    if not vm.managed:
        return None
    parsed = read_owner(vm.owner)
    if parsed is None or parsed.relation_id is None:
        return None
    if scope is not None and parsed.scope not in (None, scope):
        return None
    if not REQUEST_ID_PATTERN.fullmatch(vm.request_id):
        return None
    return RequestKey(parsed.relation_id, parsed.app, vm.request_id)


def composed_keys(vms: Iterable[VmRecord], scope: Scope | None = None) -> frozenset[RequestKey]:
    """The relation requests these VMs were composed for (for this unit's host report)."""
    return frozenset(k for vm in vms if (k := request_key_of(vm, scope)) is not None)


def vm_name(key: RequestKey, *, max_length: int = VM_NAME_MAX) -> str:
    """Return the VM name of a relation request (see the module docstring for the scheme).

    The result always passes `constraints.validate_name` and has at most `max_length`
    characters.

    Raises:
        ValueError: max_length is outside 16-63.
    """
    if not 16 <= max_length <= 63:
        raise ValueError(f"max_length must be 16-63, got {max_length}")
    plain = f"{key.app}-{key.relation_id}-{key.request_id}"
    if (
        len(plain) <= max_length
        and _JUJU_APP_PATTERN.fullmatch(key.app)
        and NAME_PATTERN.fullmatch(plain)
    ):
        return plain
    triple = f"{key.relation_id}\0{key.app}\0{key.request_id}"
    digest = hashlib.sha256(triple.encode()).hexdigest()[:_DIGEST_CHARS]
    stem = re.sub(r"[^a-z0-9]+", "-", plain.lower()).strip("-")
    stem = stem[: max_length - _DIGEST_CHARS - 1].rstrip("-")
    return f"{stem}-{digest}" if stem else digest

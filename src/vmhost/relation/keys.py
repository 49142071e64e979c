"""The naming and ownership contract of relation VMs: it must never change between revisions.

Ownership and isolation. Every VM composed for a relation carries the owner
``relation:<relation id>:<app>`` and the request id in the hypervisor's own metadata (see
`vmhost.backends.libvirt`). The relation round only ever touches a VM whose owner parses as a
relation owner, and it matches VMs to requests by (owner, request id), so one application's
requests can never reach another application's VMs, nor VMs of the compose-vm action (owner
"action"), nor domains vm-host did not create. A request whose VM name is already taken by
any other VM is refused, never matched by name.

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
    "RequestKey",
    "composed_keys",
    "parse_owner",
    "relation_owner",
    "request_key_of",
    "vm_name",
]

ACTION_OWNER = "action"
"""Owner of VMs made by the compose-vm action; no relation ever touches them."""
VM_NAME_MAX = 48

_OWNER_PREFIX = "relation:"
_APP_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
"""What an owner string may carry as app (loose: parsing must not depend on Juju's rule)."""
_JUJU_APP_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]*[a-z][a-z0-9]*)*$")
"""Juju application names: every hyphen-separated segment holds a letter."""
_DIGEST_CHARS = 10


def relation_owner(relation_id: int, app: str) -> str:
    """Return the owner string of VMs composed for an application over one relation.

    Raises:
        ValueError: the relation id is not a non-negative integer or the app name is not
            lower-case letters, digits and hyphens (a bug in the caller: Juju gives both).
    """
    if isinstance(relation_id, bool) or not isinstance(relation_id, int) or relation_id < 0:
        raise ValueError(f"relation id must be a non-negative integer, got {relation_id!r}")
    if not isinstance(app, str) or not _APP_PATTERN.fullmatch(app):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"application name {app!r} is not a Juju application name")
    return f"{_OWNER_PREFIX}{relation_id}:{app}"


def parse_owner(owner: str) -> tuple[int, str] | None:
    """Return (relation id, app) of a relation owner string, None for any other owner.

    "action", "" (domains vm-host did not create) and anything malformed give None, so they
    are never mistaken for a relation's VMs.
    """
    if not owner.startswith(_OWNER_PREFIX):
        return None
    rest = owner[len(_OWNER_PREFIX) :]
    number, sep, app = rest.partition(":")
    if not sep or not number.isascii() or not number.isdigit() or len(number) > 18:
        return None
    if number != str(int(number)) or not _APP_PATTERN.fullmatch(app):
        return None
    return int(number), app


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
        """The owner string VMs of this request carry."""
        return relation_owner(self.relation_id, self.app)

    def __str__(self) -> str:
        return f"{self.app}/{self.request_id} (relation {self.relation_id})"


def request_key_of(vm: VmRecord) -> RequestKey | None:
    """Return the request a VM was composed for, or None for action and foreign VMs."""
    if not vm.managed:
        return None
    parsed = parse_owner(vm.owner)
    if parsed is None or not REQUEST_ID_PATTERN.fullmatch(vm.request_id):
        return None
    return RequestKey(parsed[0], parsed[1], vm.request_id)


def composed_keys(vms: Iterable[VmRecord]) -> frozenset[RequestKey]:
    """The relation requests these VMs were composed for (for this unit's host report)."""
    return frozenset(k for k in map(request_key_of, vms) if k is not None)


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

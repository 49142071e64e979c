"""Decisions for VMs requested over relations, and which vm-host unit hosts each request.

Pure and deterministic (no I/O, no clock, no ops): the charm gathers the requests, the
hypervisor's VM list and the peer data, calls these functions, and carries out what they
return. Equal inputs give equal outputs, in a stable order.

Ownership and isolation. Every VM composed for a relation carries the owner
``relation:<relation id>:<app>`` and the request id in the hypervisor's own metadata (see
`vmhost.backends.libvirt`). `plan_changes` only ever touches a VM whose owner parses as a
relation owner, and it matches VMs to requests by (owner, request id), so one application's
requests can never reach another application's VMs, nor VMs of the compose-vm action (owner
"action"), nor domains vm-host did not create. A request whose VM name is already taken by
any other VM is refused, never matched by name.

VM names. A relation request gets ``<app>-<relation id>-<request id>`` ("pg-7-db-0"). Juju
application names are hyphen-joined segments that each hold a letter, and relation ids are
all digits, so the first all-digit segment marks where the app ends: two different
(relation, app, request id) triples never give the same plain name, and the relation id
keeps a re-related application's names apart from VMs its old relation left behind under
release-policy keep. When the plain name
would be longer than `VM_NAME_MAX` characters, would break the VM name rules, or the app
name is not a Juju application name, the name becomes a readable stem cut short plus 10 hex
digits of SHA-256 over the triple. `VM_NAME_MAX` is 48, not the 63 a name may have, so disk
volumes (``<vm>-<label>``) keep room for labels of up to 14 characters. The output of
`vm_name` for a given triple must never change between charm revisions (VMs are found by
owner and request id, so a rename would not lose them, but the names are what operators and
power drivers see). A hashed name could in theory equal another request's plain name; like
any other clash with an existing name, `plan_changes` refuses it rather than compose.

Multi-unit assignment. Every unit publishes a host report (topology, the placements of all
its VMs, the requests it has composed) in its peer unit databag; the leader runs `assign` and
writes the result to the peer application databag; each unit composes what is assigned to
it. Assignments of composed requests never move; a request not yet composed moves only when
its unit left, its `host` pin no longer names that unit, or it no longer fits there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from vmhost.codec import (
    CodecError,
    placement_from_dict,
    placement_to_dict,
    topology_from_dict,
    topology_to_dict,
)
from vmhost.constraints import NAME_PATTERN, REQUEST_ID_PATTERN, spec_hash
from vmhost.model import (
    HostTopology,
    Placement,
    Policy,
    Rejection,
    VmRecord,
    VmSpec,
    page_label,
)
from vmhost.placement import plan, usage

__all__ = [
    "ACTION_OWNER",
    "CHANGED_ERROR",
    "RELEASE_POLICIES",
    "VM_NAME_MAX",
    "WIRE_VERSION",
    "Assignment",
    "Changes",
    "Desired",
    "HostReport",
    "RequestKey",
    "answer_for",
    "answers_by_relation",
    "assign",
    "assignment_from_json",
    "assignment_to_json",
    "collect_reports",
    "composed_keys",
    "host_report",
    "parse_host_report",
    "parse_owner",
    "plan_changes",
    "relation_owner",
    "request_key_of",
    "vm_name",
]

ACTION_OWNER = "action"
"""Owner of VMs made by the compose-vm action; no relation ever touches them."""
RELEASE_POLICIES = ("delete", "keep")
VM_NAME_MAX = 48
WIRE_VERSION = "0"
"""Schema version of the peer data written here (host reports and assignments)."""
CHANGED_ERROR = (
    "request changed after the VM was composed; withdraw it and request again under a new id"
)

_OWNER_PREFIX = "relation:"
_APP_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
"""What an owner string may carry as app (loose: parsing must not depend on Juju's rule)."""
_JUJU_APP_PATTERN = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]*[a-z][a-z0-9]*)*$")
"""Juju application names: every hyphen-separated segment holds a letter."""
_DIGEST_CHARS = 10
_REASON_PER_UNIT = 200
_REASON_MAX = 1000


# ---------------------------------------------------------------------------------------------
# Owners, keys and names


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


Desired = Mapping[RequestKey, VmSpec]
"""The valid requests a unit should host, each with its built VmSpec."""


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


# ---------------------------------------------------------------------------------------------
# What to compose and delete on this unit


@dataclass(frozen=True)
class Changes:
    """What `plan_changes` decided; every collection in a stable order."""

    to_compose: tuple[tuple[RequestKey, VmSpec], ...] = ()
    """Requested here and not on the host yet, by key."""
    to_delete: tuple[VmRecord, ...] = ()
    """VMs of live relations whose request is gone, and (release-policy delete) VMs of
    relations that are gone; by name."""
    released: tuple[VmRecord, ...] = ()
    """VMs of relations that are gone, left on the host by release-policy keep; by name."""
    changed: tuple[tuple[RequestKey, VmRecord], ...] = ()
    """Requests whose VM exists but whose spec changed since: the VM is left as it is and
    the request is answered with CHANGED_ERROR; by key."""
    unchanged: tuple[tuple[RequestKey, VmRecord], ...] = ()
    """Requests whose VM exists as requested; by key."""
    retained: tuple[tuple[RequestKey, VmRecord], ...] = ()
    """VMs of requests still present but not desired here (invalid now, or assigned to
    another unit): left alone; by key."""
    conflicts: tuple[tuple[RequestKey, str], ...] = ()
    """Requests that cannot be composed because their VM name is taken; by key."""
    duplicates: tuple[VmRecord, ...] = ()
    """Further VMs carrying the same request as the one matched: left alone; by name."""

    @property
    def errors(self) -> dict[RequestKey, str]:
        """The error to answer for each request that has one (changed or conflicting)."""
        out = {key: CHANGED_ERROR for key, _ in self.changed}
        out.update(self.conflicts)
        return dict(sorted(out.items()))

    @property
    def existing(self) -> dict[RequestKey, VmRecord]:
        """Every request that has a VM on this host (changed, unchanged or retained)."""
        return dict(sorted([*self.changed, *self.unchanged, *self.retained], key=lambda kv: kv[0]))


def _check_desired(desired: Mapping[RequestKey, VmSpec]) -> None:
    for key, spec in desired.items():
        if spec.owner != key.owner or spec.request_id != key.request_id:
            raise ValueError(
                f"spec {spec.name!r} carries owner {spec.owner!r} and request id "
                f"{spec.request_id!r}, not those of {key}; build it with owner=key.owner"
            )


def plan_changes(
    desired: Desired,
    existing: Sequence[VmRecord],
    *,
    release_policy: str,
    live_relation_ids: AbstractSet[int],
    retain: AbstractSet[RequestKey] = frozenset(),
) -> Changes:
    """Decide what to compose and delete so the host matches the relation requests.

    Only VMs whose owner is a relation owner are considered; everything else on the host
    (action VMs, foreign domains) is never in any result.

    Args:
        desired: the valid requests this unit should host, each with the VmSpec built by
            constraints.build_spec (owner=key.owner, request_id=key.request_id,
            name=vm_name(key)).
        existing: every VM on this host (backend.list_vms()).
        release_policy: "delete" or "keep": what happens to VMs of relations that are gone.
        live_relation_ids: ids of the relations of the provider endpoint that still exist
            (during relation-broken, without the broken one).
        retain: requests still present on a live relation but not in `desired` (invalid
            now, or assigned to another unit); their VMs are kept, never deleted.

    Returns:
        The Changes; a changed spec is never deleted or recreated, only reported.

    Raises:
        ValueError: an unknown release policy, or a spec whose owner or request id does not
            match its key (bugs in the caller).
    """
    if release_policy not in RELEASE_POLICIES:
        raise ValueError(f"release policy {release_policy!r} is not one of delete, keep")
    _check_desired(desired)
    sorted_vms = _SortedVms(desired, retain, live_relation_ids, release_policy == "delete")
    for vm in sorted(existing, key=lambda v: v.name):
        sorted_vms.add(vm)

    changed: list[tuple[RequestKey, VmRecord]] = []
    unchanged: list[tuple[RequestKey, VmRecord]] = []
    for key in sorted(sorted_vms.matched):
        vm = sorted_vms.matched[key]
        # The name is vm-host's choice, not the requester's: compare what the VM is.
        wanted = spec_hash(dataclasses.replace(desired[key], name=vm.name))
        (unchanged if wanted == vm.spec_hash else changed).append((key, vm))

    to_compose, conflicts = _check_names(
        {k: v for k, v in desired.items() if k not in sorted_vms.matched},
        {vm.name for vm in existing},
    )
    return Changes(
        to_compose=to_compose,
        to_delete=tuple(sorted_vms.to_delete),
        released=tuple(sorted_vms.released),
        changed=tuple(changed),
        unchanged=tuple(unchanged),
        retained=tuple(sorted(sorted_vms.retained.items())),
        conflicts=conflicts,
        duplicates=tuple(sorted_vms.duplicates),
    )


@dataclass
class _SortedVms:
    """Sorts the host's relation VMs into what plan_changes does with each."""

    desired: Mapping[RequestKey, VmSpec]
    retain: AbstractSet[RequestKey]
    live: AbstractSet[int]
    release_deletes: bool
    matched: dict[RequestKey, VmRecord] = field(default_factory=dict[RequestKey, VmRecord])
    to_delete: list[VmRecord] = field(default_factory=list[VmRecord])
    released: list[VmRecord] = field(default_factory=list[VmRecord])
    retained: dict[RequestKey, VmRecord] = field(default_factory=dict[RequestKey, VmRecord])
    duplicates: list[VmRecord] = field(default_factory=list[VmRecord])

    def add(self, vm: VmRecord) -> None:
        parsed = parse_owner(vm.owner) if vm.managed else None
        if parsed is None:
            return  # an action VM or a domain vm-host did not create: never touched here
        key = request_key_of(vm)
        if parsed[0] not in self.live:
            (self.to_delete if self.release_deletes else self.released).append(vm)
        elif key is None:
            self.to_delete.append(vm)  # a relation's VM without a usable request id
        elif key in self.desired or key in self.retain:
            found = self.matched if key in self.desired else self.retained
            if key in found:
                self.duplicates.append(vm)
            else:
                found[key] = vm
        else:
            self.to_delete.append(vm)


def _check_names(
    wanted: Mapping[RequestKey, VmSpec], taken: AbstractSet[str]
) -> tuple[tuple[tuple[RequestKey, VmSpec], ...], tuple[tuple[RequestKey, str], ...]]:
    """Split requests to compose into those whose name is free and those whose is not."""
    to_compose: list[tuple[RequestKey, VmSpec]] = []
    conflicts: list[tuple[RequestKey, str]] = []
    claimed: dict[str, RequestKey] = {}
    for key in sorted(wanted):
        spec = wanted[key]
        if spec.name in taken:
            conflicts.append(
                (
                    key,
                    f"VM name {spec.name!r} is already taken on this host by a VM of another "
                    "owner; request it under another id",
                )
            )
        elif spec.name in claimed:
            conflicts.append(
                (
                    key,
                    f"VM name {spec.name!r} is also the name of request {claimed[spec.name]}; "
                    "request it under another id",
                )
            )
        else:
            claimed[spec.name] = key
            to_compose.append((key, spec))
    return tuple(to_compose), tuple(conflicts)


# ---------------------------------------------------------------------------------------------
# Answers


def answer_for(
    key: RequestKey,
    vm: VmRecord | None,
    error: str | None = None,
    *,
    spec: VmSpec | None = None,
    power_type: str = "virsh",
    power_address: str | None = None,
) -> dict[str, Any]:
    """Return one answer in the wire shape of the vm_host interface (DESIGN.md).

    No VM and no error: "pending" (assigned here, not composed yet). No VM and an error:
    "failed". A VM keeps its real state even with an error (a changed request): the VM still
    runs, only the change is refused. Keys whose value would be null are left out, as the
    library writes them.

    Args:
        key: the request.
        vm: its VM on this host, if any.
        error: why the request failed or was refused, for the requester to read.
        spec: the request's spec, when there is one: gives the name before the VM exists and
            the static address of each interface.
        power_type: "virsh" (libvirt) or "lxd".
        power_address: the libvirt URI or LXD URL managers use (the caller knows it).
    """
    answer: dict[str, Any] = {"id": key.request_id}
    name = vm.name if vm is not None else (spec.name if spec is not None else None)
    if name is not None:
        answer["name"] = name
    if vm is None:
        answer["state"] = "failed" if error else "pending"
    else:
        answer["state"] = vm.state.value
    if error:
        answer["error"] = error
    if vm is not None:
        answer.update(_vm_details(vm, spec, power_type, power_address))
    return answer


def answers_by_relation(
    keys: Iterable[RequestKey],
    vms: Mapping[RequestKey, VmRecord],
    *,
    specs: Mapping[RequestKey, VmSpec] | None = None,
    errors: Mapping[RequestKey, str] | None = None,
    power_type: str = "virsh",
    power_address: str | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Build every answer this unit publishes, grouped by relation id, each list by id.

    Args:
        keys: the requests to answer: those assigned to this unit, plus (leader) those with an
            error that no unit hosts (unplaced or invalid).
        vms: request -> its VM on this host (Changes.existing after composing, or
            `request_key_of` over the refreshed VM list).
        specs: request -> its spec, for names of pending requests and static addresses.
        errors: request -> error text (Changes.errors, compose failures, assignment reasons).
        power_type: "virsh" or "lxd".
        power_address: the libvirt URI or LXD URL managers use.
    """
    specs = specs or {}
    errors = errors or {}
    out: dict[int, list[dict[str, Any]]] = {}
    for key in sorted(set(keys)):
        out.setdefault(key.relation_id, []).append(
            answer_for(
                key,
                vms.get(key),
                errors.get(key),
                spec=specs.get(key),
                power_type=power_type,
                power_address=power_address,
            )
        )
    return out


def _vm_details(
    vm: VmRecord, spec: VmSpec | None, power_type: str, power_address: str | None
) -> dict[str, Any]:
    details: dict[str, Any] = {"uuid": vm.uuid} if vm.uuid else {}
    ips = {i.label: i.ip for i in spec.interfaces} if spec is not None else {}
    interfaces: list[dict[str, str]] = []
    for nic in vm.interfaces:
        item = {k: nic[k] for k in ("label", "mac", "attached-to") if nic.get(k)}
        ip = ips.get(nic.get("label", ""))
        if ip:
            item["ip"] = ip
        if "label" in item:
            interfaces.append(item)
    details["interfaces"] = interfaces
    placement: dict[str, Any] = {
        "numa-nodes": list(vm.placement.host_nodes),
        "cpus": list(vm.placement.pinned_cpus),
    }
    sizes = sorted(
        {c.hugepage_size_kib for c in vm.placement.cells if c.hugepages and c.hugepage_size_kib}
    )
    if sizes:
        placement["hugepages"] = page_label(sizes[0])
    details["placement"] = placement
    power = {"type": power_type, "id": vm.name}
    if power_address:
        power["address"] = power_address
    details["power"] = power
    return details


# ---------------------------------------------------------------------------------------------
# Host reports (peer unit data)


@dataclass(frozen=True)
class HostReport:
    """What one vm-host unit tells the leader about itself."""

    topology: HostTopology
    allocations: tuple[Placement, ...] = ()
    """Placements of every VM on the unit's host (all owners, foreign domains included)."""
    hostname: str | None = None
    """The machine's hostname, so a request's `host` may name it instead of the unit."""
    composed: frozenset[RequestKey] = frozenset()
    """Relation requests whose VM exists on this host."""


def _key_to_list(key: RequestKey) -> list[Any]:
    return [key.relation_id, key.app, key.request_id]


def _key_from_list(value: object, path: str) -> RequestKey:
    if not isinstance(value, list) or len(value) != 3:  # pyright: ignore[reportUnknownArgumentType]
        raise CodecError(path, "expected [relation id, app, request id]")
    rel, app, rid = value  # pyright: ignore[reportUnknownVariableType]
    if isinstance(rel, bool) or not isinstance(rel, int):
        raise CodecError(f"{path}[0]", "expected an integer relation id")
    if not isinstance(app, str) or not isinstance(rid, str):
        raise CodecError(path, "expected strings for app and request id")
    try:
        return RequestKey(rel, app, rid)
    except ValueError as exc:
        raise CodecError(path, str(exc)) from None


def _dumps(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def host_report(
    topology: HostTopology,
    allocations: Sequence[Placement],
    *,
    hostname: str | None = None,
    composed: AbstractSet[RequestKey] = frozenset(),
) -> str:
    """Return a unit's host report as the JSON text for its peer unit databag.

    Allocations are sorted by their JSON form, so the same host gives the same text whatever
    order the hypervisor listed its VMs in (no needless relation-changed events).
    """
    placements = sorted((placement_to_dict(p) for p in allocations), key=_dumps)
    return _dumps(
        {
            "version": WIRE_VERSION,
            "topology": topology_to_dict(topology),
            "allocations": placements,
            "hostname": hostname,
            "composed": [_key_to_list(k) for k in sorted(composed)],
        }
    )


def parse_host_report(text: str | None) -> tuple[HostReport | None, str | None]:
    """Read a host report; never raises.

    Returns:
        (report, None), or (None, reason) when the text is missing, not JSON, of another
        version or of the wrong shape; the reason names the bad field, never its value.
    """
    if not text:
        return None, "no host report yet"
    try:
        data = json.loads(text)
    except ValueError:
        return None, "host report is not JSON"
    if not isinstance(data, dict):
        return None, "host report is not a JSON object"
    version = data.get("version")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    if version != WIRE_VERSION:
        return None, f"host report version is not {WIRE_VERSION!r}"
    try:
        topology = topology_from_dict(data.get("topology"))  # pyright: ignore[reportUnknownMemberType]
        raw_allocations = data.get("allocations", [])  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if not isinstance(raw_allocations, list):
            raise CodecError("allocations", "expected an array")
        allocations = tuple(
            placement_from_dict(p, f"allocations[{i}]")
            for i, p in enumerate(raw_allocations)  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]
        )
        hostname = data.get("hostname")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if hostname is not None and not isinstance(hostname, str):
            raise CodecError("hostname", "expected a string")
        raw_composed = data.get("composed", [])  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if not isinstance(raw_composed, list):
            raise CodecError("composed", "expected an array")
        composed = frozenset(
            _key_from_list(k, f"composed[{i}]")
            for i, k in enumerate(raw_composed)  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]
        )
    except CodecError as exc:
        return None, f"host report: {exc}"
    return HostReport(topology, allocations, hostname or None, composed), None


def collect_reports(
    texts: Mapping[str, str | None],
) -> tuple[dict[str, HostReport], dict[str, str]]:
    """Read every unit's host report.

    Args:
        texts: unit name -> the text of its `topology` report (None when absent).

    Returns:
        (unit -> report) for the usable ones and (unit -> reason) for the others, both
        sorted by unit name.
    """
    reports: dict[str, HostReport] = {}
    problems: dict[str, str] = {}
    for unit in sorted(texts):
        report, reason = parse_host_report(texts[unit])
        if report is not None:
            reports[unit] = report
        else:
            problems[unit] = reason or "unusable host report"
    return reports, problems


# ---------------------------------------------------------------------------------------------
# Assignment (leader)


@dataclass(frozen=True)
class Assignment:
    """Which unit hosts each request, and why the others have none."""

    units: Mapping[RequestKey, str] = field(default_factory=dict[RequestKey, str])
    """Request -> unit name."""
    unplaced: Mapping[RequestKey, str] = field(default_factory=dict[RequestKey, str])
    """Request -> why no unit can host it (the per-unit rejections, shortened)."""

    def for_unit(self, unit: str) -> frozenset[RequestKey]:
        """The requests assigned to one unit."""
        return frozenset(k for k, u in self.units.items() if u == unit)


Eligibility = Callable[[str, HostReport, VmSpec], str | None]
"""(unit, report, spec) -> None when the unit may host the spec, else why not (for checks
`assign` cannot make itself, such as whether the unit's networks reach a requested space)."""


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _matches_host(unit: str, report: HostReport, host: str | None) -> bool:
    return host is None or host in (unit, report.hostname)


def _fit_score(
    report: HostReport, allocations: Sequence[Placement], placement: Placement, policy: Policy
) -> tuple[int, int]:
    """How much room is left where the placement landed (less is a better fit)."""
    use = usage(report.topology, allocations, policy)
    nodes = {n.node: n for n in use.nodes}
    chosen = [nodes[n] for n in placement.host_nodes if n in nodes]
    if placement.pinned:
        cpus = sum(n.cpus_free_for_pinning for n in chosen)
    else:
        cpus = use.shared_vcpus_capacity - use.shared_vcpus_allocated
    if placement.hugepage_backed:
        size = next(c.hugepage_size_kib for c in placement.cells if c.hugepages)
        memory = sum(
            h.free * h.size_kib // 1024 for n in chosen for h in n.hugepages if h.size_kib == size
        )
    elif placement.cells:
        memory = sum(n.memory_free_mib for n in chosen)
    else:
        memory = use.memory_capacity_mib - use.memory_allocated_mib
    return cpus, memory


def assign(
    requests: Sequence[tuple[RequestKey, VmSpec, str | None]],
    reports: Mapping[str, HostReport],
    current: Mapping[RequestKey, str],
    composed: AbstractSet[RequestKey],
    policy: Policy,
    *,
    eligible: Eligibility | None = None,
    present: AbstractSet[str] | None = None,
) -> Assignment:
    """Assign each request to the vm-host unit that hosts it best.

    Rules, in order:

    1. A composed request (in any report's `composed`, or in `composed`) stays where it
       is: on its current unit when that unit reports it composed (or no unit reports it),
       else on the first unit reporting it. A request composed on a unit that left is not
       in any report, so it is placed anew (its VM went with its unit).
    2. A request assigned to a unit that is still a member of the peer relation but whose
       report is unusable stays there: it cannot be checked, and moving it could give the
       requester a second VM.
    3. A request already assigned, not composed, whose unit is still reporting, still
       matches the request's `host` and still fits there, stays.
    4. Every other request (new, its unit left, or it no longer fits) goes, in key order,
       to the unit where `placement.plan` fits best: the fewest CPUs left free on the nodes
       it takes (pinned CPUs for pinned VMs, shared vCPU headroom for shared ones), then
       the least memory left there, then the unit name. A `host` pins it to the unit of
       that name or hostname.

    The placements of rules 3 and 4 are added to their unit's allocations as they are made,
    so two requests never count the same free CPUs.

    Args:
        requests: (key, spec, host) for every valid request of every relation.
        reports: unit name -> its host report (units whose report is unusable left out).
        current: the assignment in force (peer application data).
        composed: requests known to have a VM besides what the reports say (usually
            empty: the reports carry it).
        policy: the placement rules (the same config on every unit).
        eligible: an extra per-unit check (see Eligibility).
        present: every unit in the peer relation, readable or not (default: the units of
            `reports`).

    Returns:
        The new Assignment; every request is either assigned or has a reason.

    Raises:
        ValueError: two requests share a key (a bug in the caller).
    """
    ordered = sorted(requests, key=lambda r: r[0])
    keys = [r[0] for r in ordered]
    if len(set(keys)) != len(keys):
        raise ValueError("two requests share a key")
    fleet = _Fleet(reports, policy, eligible, set(reports) if present is None else set(present))
    pending: list[tuple[RequestKey, VmSpec, str | None]] = []
    for key, spec, host in ordered:
        if not fleet.keep(key, spec, host, current.get(key), key in composed):
            pending.append((key, spec, host))
    for key, spec, host in pending:
        fleet.place(key, spec, host)
    return Assignment(
        units=dict(sorted(fleet.units.items())), unplaced=dict(sorted(fleet.unplaced.items()))
    )


class _Fleet:
    """The leader's working view: every unit's allocations as assignments accumulate."""

    def __init__(
        self,
        reports: Mapping[str, HostReport],
        policy: Policy,
        eligible: Eligibility | None,
        members: set[str],
    ):
        self.reports = reports
        self.policy = policy
        self.eligible = eligible
        self.members = members
        self.simulated = {u: list(reports[u].allocations) for u in sorted(reports)}
        self.composed_at: dict[RequestKey, list[str]] = {}
        for unit in sorted(reports):
            for key in reports[unit].composed:
                self.composed_at.setdefault(key, []).append(unit)
        self.units: dict[RequestKey, str] = {}
        self.unplaced: dict[RequestKey, str] = {}

    def fits(self, unit: str, spec: VmSpec) -> Placement | str:
        """Plan the spec on a unit as it is now; a Placement, or why not."""
        report = self.reports[unit]
        if self.eligible is not None:
            reason = self.eligible(unit, report, spec)
            if reason:
                return reason
        result = plan(report.topology, self.simulated[unit], spec, self.policy)
        return result.reason if isinstance(result, Rejection) else result

    def keep(
        self, key: RequestKey, spec: VmSpec, host: str | None, held: str | None, composed: bool
    ) -> bool:
        """Keep a request where it is when rules 1-3 of `assign` say so."""
        where = self.composed_at.get(key, [])
        if where or composed:
            if held is not None and (held in where or not where):
                self.units[key] = held
                return True
            if where:
                self.units[key] = where[0]
                return True
        if held is None:
            return False
        if held not in self.reports:
            if held in self.members:
                self.units[key] = held  # there but unreadable: moving it could double it
                return True
            return False
        if not _matches_host(held, self.reports[held], host):
            return False
        result = self.fits(held, spec)
        if isinstance(result, str):
            return False
        self.units[key] = held
        self.simulated[held].append(result)
        return True

    def place(self, key: RequestKey, spec: VmSpec, host: str | None) -> None:
        """Put a request on the unit where it fits best, or record why it fits nowhere."""
        candidates = [u for u in sorted(self.reports) if _matches_host(u, self.reports[u], host)]
        if not candidates:
            self.unplaced[key] = self._no_candidate(host)
            return
        best: tuple[tuple[int, int, str], Placement] | None = None
        rejections: list[str] = []
        for unit in candidates:
            result = self.fits(unit, spec)
            if isinstance(result, str):
                rejections.append(f"{unit}: {_shorten(result, _REASON_PER_UNIT)}")
                continue
            after = [*self.simulated[unit], result]
            score = (*_fit_score(self.reports[unit], after, result, self.policy), unit)
            if best is None or score < best[0]:
                best = (score, result)
        if best is None:
            text = "fits on no vm-host unit: " + "; ".join(rejections)
            self.unplaced[key] = _shorten(text, _REASON_MAX)
            return
        unit = best[0][2]
        self.units[key] = unit
        self.simulated[unit].append(best[1])

    def _no_candidate(self, host: str | None) -> str:
        if host is None:
            return "no vm-host unit has reported its host yet"
        offered = ", ".join(
            f"{u} ({self.reports[u].hostname})" if self.reports[u].hostname else u
            for u in sorted(self.reports)
        )
        text = f"host {host!r} names no vm-host unit; units: {offered or 'none reporting'}"
        return _shorten(text, _REASON_MAX)


def assignment_to_json(assignment: Assignment) -> str:
    """Return the assignment as the JSON text for the peer application databag (stable)."""
    return _dumps(
        {
            "version": WIRE_VERSION,
            "assigned": [
                [*_key_to_list(k), assignment.units[k]] for k in sorted(assignment.units)
            ],
            "unplaced": [
                [*_key_to_list(k), assignment.unplaced[k]] for k in sorted(assignment.unplaced)
            ],
        }
    )


def assignment_from_json(text: str | None) -> tuple[Assignment, str | None]:
    """Read an assignment; never raises.

    Returns:
        (assignment, None), or (empty assignment, reason) when the text is unusable; no text
        at all is an empty assignment without a reason (nothing assigned yet).
    """
    if not text:
        return Assignment(), None
    try:
        data = json.loads(text)
    except ValueError:
        return Assignment(), "assignment is not JSON"
    if not isinstance(data, dict) or data.get("version") != WIRE_VERSION:  # pyright: ignore[reportUnknownMemberType]
        return Assignment(), f"assignment is not a version {WIRE_VERSION!r} object"
    parts: list[dict[RequestKey, str]] = []
    for name in ("assigned", "unplaced"):
        rows = data.get(name, [])  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if not isinstance(rows, list):
            return Assignment(), f"assignment: {name} is not an array"
        out: dict[RequestKey, str] = {}
        for i, row in enumerate(rows):  # pyright: ignore[reportUnknownArgumentType, reportUnknownVariableType]
            if not isinstance(row, list) or len(row) != 4 or not isinstance(row[3], str):  # pyright: ignore[reportUnknownArgumentType]
                return Assignment(), f"assignment: {name}[{i}] is not [relation, app, id, text]"
            try:
                key = _key_from_list(row[:3], f"{name}[{i}]")  # pyright: ignore[reportUnknownArgumentType]
            except CodecError as exc:
                return Assignment(), f"assignment: {exc}"
            out[key] = row[3]
        parts.append(dict(sorted(out.items())))
    return Assignment(units=parts[0], unplaced=parts[1]), None

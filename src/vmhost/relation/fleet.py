"""Which vm-host unit hosts each relation request: peer reports and the leader's choice.

Pure and deterministic (no I/O, no clock, no ops): the charm reads and writes the peer
databags; `lead` decides. Every unit publishes a host report (topology, the placements of all
its VMs, the requests it has composed) in its peer unit databag; the leader runs `assign` and
writes the result to the peer application databag; each unit composes what is assigned to
it. Assignments of composed requests never move; a request not yet composed moves only when
its unit left, its `host` pin no longer names that unit, or it no longer fits there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pydantic
from pydantic import StrictInt, StrictStr

from vmhost import networks, pools
from vmhost.codec import (
    placement_from_dict,
    placement_to_dict,
    topology_from_dict,
    topology_to_dict,
)
from vmhost.compose import macs_in_use
from vmhost.model import (
    HostTopology,
    InvalidRequestError,
    NicAttachment,
    Placement,
    Policy,
    Rejection,
    VmRecord,
    VmSpec,
)
from vmhost.placement import plan, usage
from vmhost.pools import Use
from vmhost.relation.keys import RequestKey, Scope, composed_keys
from vmhost.relation.serve import RelationRequest

__all__ = [
    "WIRE_VERSION",
    "Assignment",
    "AssignmentData",
    "Decision",
    "HostReport",
    "Peers",
    "ReportData",
    "assign",
    "assignment_from_json",
    "assignment_to_json",
    "collect_reports",
    "composed_from_json",
    "composed_to_json",
    "host_report",
    "lead",
    "parse_host_report",
    "peer_macs",
    "peer_pool_use",
    "unit_report",
]

WIRE_VERSION = "0"
"""Schema version of the peer data written here (host reports and assignments)."""
MAX_PEER_VALUE_CHARS = 16 << 20
"""The longest peer value decoded: one bad unit cannot make every hook parse more."""
_REASON_PER_UNIT = 200
_REASON_MAX = 1000


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
    macs: frozenset[str] = frozenset()
    """The MACs of every VM's NICs on the unit's host, so no other unit composes one again."""
    pools: Mapping[str, Use] = field(default_factory=dict[str, Use])
    """What the unit's VMs take per resource pool ("": VMs recorded without a pool, which
    count in the default pool); reports older than pools have none (no use)."""


def _checked_key(row: tuple[int, str, str]) -> tuple[int, str, str]:
    RequestKey(*row)  # raises ValueError naming the bad part
    return row


_Key = Annotated[tuple[StrictInt, StrictStr, StrictStr], pydantic.AfterValidator(_checked_key)]
"""A request key on the wire: [relation id, app, request id]."""


def _checked_row(row: tuple[int, str, str, str]) -> tuple[int, str, str, str]:
    _checked_key(row[:3])
    return row


_Row = Annotated[
    tuple[StrictInt, StrictStr, StrictStr, StrictStr], pydantic.AfterValidator(_checked_row)
]
"""[relation id, app, request id, unit or reason]."""
_Topology = Annotated[
    HostTopology,
    pydantic.PlainValidator(lambda v: v if isinstance(v, HostTopology) else topology_from_dict(v)),
    pydantic.PlainSerializer(topology_to_dict),
]
_Use = Annotated[
    pools.Use,
    pydantic.PlainValidator(lambda v: v if isinstance(v, pools.Use) else pools.use_from_dict(v)),
    pydantic.PlainSerializer(pools.use_to_dict),
]
_Placement = Annotated[
    Placement,
    pydantic.PlainValidator(lambda v: v if isinstance(v, Placement) else placement_from_dict(v)),
    pydantic.PlainSerializer(placement_to_dict),
]


class _PeerData(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, defer_build=True)

    version: Literal["0"] = WIRE_VERSION


class ReportData(_PeerData):
    """A unit's `report` in its peer unit databag."""

    topology: _Topology
    allocations: tuple[_Placement, ...] = ()
    hostname: StrictStr | None = None
    composed: tuple[_Key, ...] = ()
    macs: tuple[StrictStr, ...] = ()
    pools: dict[StrictStr, _Use] = {}
    """Resource pool ("" for VMs recorded without one) -> what the unit's VMs take there."""


def _checked_left(row: tuple[int, str, str, str, str]) -> tuple[int, str, str, str, str]:
    _checked_key(row[:3])
    return row


_LeftRow = Annotated[
    tuple[StrictInt, StrictStr, StrictStr, StrictStr, StrictStr],
    pydantic.AfterValidator(_checked_left),
]
"""[relation id, app, request id, the unit that left, the request's `host` then ("" none)]."""


class AssignmentData(_PeerData):
    """The leader's `assignment` in the peer application databag.

    `left` is written only when not empty (older leaders never wrote it, and readers ignore
    what they do not know). Which assigned requests are composed goes under its own key
    (`composed`, `composed_to_json`), so the assignment text changes only when an
    assignment does.
    """

    assigned: tuple[_Row, ...] = ()
    unplaced: tuple[_Row, ...] = ()
    left: tuple[_LeftRow, ...] = ()
    """Requests whose VM went with a unit that left: answered failed until an operator runs
    reassign-vm or the request's `host` changes."""


def _compact(data: object) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _dumps(data: pydantic.BaseModel) -> str:
    return _compact(data.model_dump(mode="json"))


def _why(exc: pydantic.ValidationError) -> str:
    """The first error as "path: what", naming the field, never echoing its value."""
    error = exc.errors()[0]
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if error["type"] in ("list_type", "tuple_type") and len(error["loc"]) == 1:
        return f"{path} is not an array"
    return f"{path}: {error['msg'].removeprefix('Value error, ')}"


def _load(text: str, what: str) -> tuple[dict[str, Any] | None, str | None]:
    """Decode one peer value; never raises (size capped, deep nesting refused)."""
    if len(text) > MAX_PEER_VALUE_CHARS:
        return None, f"{what} is longer than {MAX_PEER_VALUE_CHARS} characters"
    try:
        data = json.loads(text)
    except ValueError:
        return None, f"{what} is not JSON"
    except RecursionError:
        return None, f"{what} is nested too deeply"
    if not isinstance(data, dict):
        return None, f"{what} is not a JSON object"
    return data, None  # pyright: ignore[reportUnknownVariableType]


def host_report(
    topology: HostTopology,
    allocations: Sequence[Placement],
    *,
    hostname: str | None = None,
    composed: AbstractSet[RequestKey] = frozenset(),
    macs: AbstractSet[str] = frozenset(),
    pool_use: Mapping[str, pools.Use] | None = None,
) -> str:
    """Return a unit's host report as the JSON text for its peer unit databag.

    Allocations are sorted by their JSON form, so the same host gives the same text whatever
    order the hypervisor listed its VMs in (no needless relation-changed events).
    """
    ordered = sorted(allocations, key=lambda p: _compact(placement_to_dict(p)))
    return _dumps(
        ReportData(
            topology=topology,
            allocations=tuple(ordered),
            hostname=hostname,
            composed=tuple(_key_row(k) for k in sorted(composed)),
            macs=tuple(sorted(macs)),
            pools=dict(sorted((pool_use or {}).items())),
        )
    )


def unit_report(
    topology: HostTopology,
    vms: Sequence[VmRecord],
    *,
    hostname: str | None,
    scope: Scope | None,
) -> str:
    """This unit's host report from what it read: placements, MACs, composed requests.

    It carries the use per resource pool too: the leader's quotas count the fleet from these.
    """
    return host_report(
        topology,
        [vm.placement for vm in vms],
        hostname=hostname,
        composed=composed_keys(vms, scope),
        macs=macs_in_use(vms),
        pool_use=pools.use_by_pool(vms),
    )


def _macs(reports: Mapping[str, HostReport]) -> frozenset[str]:
    return frozenset(m for r in reports.values() for m in r.macs)


def peer_pool_use(texts: Mapping[str, str | None]) -> dict[str, Use]:
    """What the readable ones of these host reports use per resource pool, added up.

    "" is VMs recorded without a pool; unreadable reports, and reports older than pools,
    add none.
    """
    return pools.total_by_pool(*(r.pools for r in collect_reports(texts)[0].values()), default="")


def peer_macs(texts: Mapping[str, str | None]) -> frozenset[str]:
    """The MACs the readable ones of these host reports list (unreadable ones list none)."""
    return _macs(collect_reports(texts)[0])


def parse_host_report(text: str | None) -> tuple[HostReport | None, str | None]:
    """Read a host report; never raises.

    Returns:
        (report, None), or (None, reason) when the text is missing, not JSON, of another
        version or of the wrong shape; the reason names the bad field, never its value.
    """
    if not text:
        return None, "no host report yet"
    data, problem = _load(text, "host report")
    if data is None:
        return None, problem
    if data.get("version") != WIRE_VERSION:
        return None, f"host report version is not {WIRE_VERSION!r}"
    try:
        got = ReportData.model_validate(data)
    except pydantic.ValidationError as exc:
        return None, f"host report: {_why(exc)}"
    composed = frozenset(RequestKey(*k) for k in got.composed)
    macs = frozenset(m.lower() for m in got.macs)
    return (
        HostReport(got.topology, got.allocations, got.hostname or None, composed, macs, got.pools),
        None,
    )


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
    waiting: frozenset[RequestKey] = frozenset()
    """Unplaced requests that only wait for a unit to report (answered pending, not failed);
    not written to the peer data."""
    composed: frozenset[RequestKey] = frozenset()
    """Assigned requests whose unit reported them composed (`composed_to_json`; not part of
    the assignment text)."""
    left: Mapping[RequestKey, tuple[str, str]] = field(
        default_factory=dict[RequestKey, tuple[str, str]]
    )
    """Request -> (the unit that left with its VM, the request's `host` then, "" for none)."""

    def for_unit(self, unit: str) -> frozenset[RequestKey]:
        """The requests assigned to one unit."""
        return frozenset(k for k, u in self.units.items() if u == unit)


Resolver = Callable[[HostReport, VmSpec], Sequence[NicAttachment] | None]
"""(report, spec) -> the spec's NICs as they would resolve on that unit (for `plan`)."""
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
    previous: Assignment | None = None,
    reassign: AbstractSet[RequestKey] = frozenset(),
    resolve: Resolver | None = None,
    resource_pools: pools.Pools | None = None,
) -> Assignment:
    """Assign each request to the vm-host unit that hosts it best.

    Rules, in order:

    1. A composed request (in any report's `composed`, or in `composed`) stays where it
       is: on its current unit when that unit reports it composed (or no unit reports it),
       else on the first unit reporting it.
    1a. A request whose VM went with a unit that left (`previous.composed` said its unit
       had composed it, and that unit is no member now; or `previous.left` already says
       so) is not placed anew: it is answered "host vm-host/1 left" until an operator asks
       (its key in `reassign`, the reassign-vm action) or the request's `host` changes.
       Placing it anew by itself would give the requester an empty VM under the same name
       while the old one, with its disks, may still run on the departed machine.
    2. A request assigned to a unit that is still a member of the peer relation but whose
       report is unusable stays there: it cannot be checked, and moving it could give the
       requester a second VM.
    3. A request already assigned, not composed, whose unit is still reporting, still
       matches the request's `host` and still fits there, stays.
    4. Every other request (new, its unit left, or it no longer fits) waits while any member
       of the peer relation has no readable report ("waiting for vm-host/1 to report"), else
       goes, in key order, to the unit where `placement.plan` fits best: the fewest CPUs
       left free on the nodes it takes (pinned CPUs for pinned VMs, shared vCPU headroom
       for shared ones), then the least memory left there, then the unit name. A `host`
       pins it to the unit of that name or hostname.

    The placements of rules 3 and 4 are added to their unit's allocations as they are made,
    so two requests never count the same free CPUs.

    Resource pools hold across the fleet: rules 3 and 4 also need the request's pool to have
    room for it, counted over every report's use per pool (a report without any says none)
    plus the placements this round has made; a request refused by its pool's quota on every
    unit is answered with that quota's numbers.

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
        previous: the whole assignment in force (its `composed` and `left`; `current` is
            its `units`).
        reassign: requests an operator asked to place anew (reassign-vm).
        resolve: the NICs a spec resolves to on a unit, so `plan` counts and aligns its
            SR-IOV VFs there (None: plan reads SR-IOV from the request alone).
        resource_pools: the pools and their quotas (None: no quota is checked).

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
    fleet.resolve = resolve
    fleet.count_pools(resource_pools)
    previous = previous or Assignment()
    pending: list[tuple[RequestKey, VmSpec, str | None]] = []
    for key, spec, host in ordered:
        if fleet.keep(key, spec, host, current.get(key), key in composed):
            continue
        gone = None if key in reassign else fleet.lost(key, host, current.get(key), previous)
        if gone is not None:
            fleet.left[key] = (gone, host or "")
            fleet.unplaced[key] = (
                f"host {gone} left; its VM went with it. Run the reassign-vm action on the "
                f"vm-host leader (app={key.app} id={key.request_id}) to compose it on "
                "another unit, or change the request's host"
            )
            continue
        pending.append((key, spec, host))
    for key, spec, host in pending:
        fleet.place(key, spec, host)
    return Assignment(
        units=dict(sorted(fleet.units.items())),
        unplaced=dict(sorted(fleet.unplaced.items())),
        waiting=frozenset(fleet.waiting),
        composed=frozenset(k for k, u in fleet.units.items() if u in fleet.composed_at.get(k, ())),
        left=dict(sorted(fleet.left.items())),
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
        self.waiting: set[RequestKey] = set()
        self.left: dict[RequestKey, tuple[str, str]] = {}
        self.resolve: Resolver | None = None
        self.pools: pools.Pools | None = None
        self.pool_use: dict[str, pools.Use] = {}

    def count_pools(self, config: pools.Pools | None) -> None:
        """Start the pools' use from every report ("" counts in the default pool)."""
        self.pools = config
        if config is None:
            return
        for unit in sorted(self.reports):
            for name, use in self.reports[unit].pools.items():
                pool = name or config.default
                self.pool_use[pool] = self.pool_use.get(pool, pools.Use()) + use

    def _pool_refusal(self, spec: VmSpec, placement: Placement) -> str | None:
        if self.pools is None:
            return None
        pool = spec.pool or self.pools.default
        used = self.pool_use.get(pool, pools.Use())
        return self.pools.refusal(pool, used, pools.use_of(placement))

    def _book(self, unit: str, spec: VmSpec, placement: Placement) -> None:
        """Count a placement made this round on its unit and in its pool."""
        self.simulated[unit].append(placement)
        if self.pools is not None:
            pool = spec.pool or self.pools.default
            self.pool_use[pool] = self.pool_use.get(pool, pools.Use()) + pools.use_of(placement)

    def lost(
        self, key: RequestKey, host: str | None, held: str | None, previous: Assignment
    ) -> str | None:
        """The unit that left with this request's VM (rule 1a of `assign`), or None."""
        if key in previous.left:
            unit, pinned = previous.left[key]
            return unit if pinned == (host or "") else None
        if held is not None and held not in self.members and key in previous.composed:
            return held  # composed there when last seen, and that unit has gone
        return None

    def fits(self, unit: str, spec: VmSpec) -> Placement | str:
        """Plan the spec on a unit as it is now; a Placement, or why not."""
        report = self.reports[unit]
        if self.eligible is not None:
            reason = self.eligible(unit, report, spec)
            if reason:
                return reason
        nics = self.resolve(report, spec) if self.resolve is not None else None
        result = plan(report.topology, self.simulated[unit], spec, self.policy, nics)
        if isinstance(result, Rejection):
            return result.reason
        return self._pool_refusal(spec, result) or result

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
        self._book(held, spec, result)
        return True

    def place(self, key: RequestKey, spec: VmSpec, host: str | None) -> None:
        """Put a request on the unit where it fits best, or record why it fits nowhere.

        Nothing is placed while a member's report is missing or unreadable: that unit may
        already host the request (its report would say so), and placing it elsewhere could
        give the requester a second VM.
        """
        unknown = sorted(self.members - set(self.reports))
        if unknown:
            self.unplaced[key] = _shorten(f"waiting for {', '.join(unknown)} to report", 200)
            self.waiting.add(key)
            return
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
            quota = {r.split(": ", 1)[1] for r in rejections}
            if len(quota) == 1 and next(iter(quota)).startswith("pool "):
                # Its pool is full fleet-wide: the quota's numbers are the whole answer.
                self.unplaced[key] = _shorten(quota.pop(), _REASON_MAX)
                return
            text = "fits on no vm-host unit: " + "; ".join(rejections)
            self.unplaced[key] = _shorten(text, _REASON_MAX)
            return
        unit = best[0][2]
        self.units[key] = unit
        self._book(unit, spec, best[1])

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
    data = AssignmentData(
        assigned=tuple((*_key_row(k), assignment.units[k]) for k in sorted(assignment.units)),
        unplaced=tuple(
            (*_key_row(k), assignment.unplaced[k]) for k in sorted(assignment.unplaced)
        ),
        left=tuple((*_key_row(k), *assignment.left[k]) for k in sorted(assignment.left)),
    ).model_dump(mode="json")
    if not data["left"]:
        del data["left"]
    return _compact(data)


def composed_to_json(assignment: Assignment) -> str:
    """Return which assigned requests are composed, for the peer application key `composed`.

    The leader needs it once a unit has left (its report is gone with it): a request that
    unit had composed is not placed anew by itself (rule 1a of `assign`).
    """
    rows = [[*_key_row(k), assignment.units[k]] for k in sorted(assignment.composed)]
    return _compact({"version": WIRE_VERSION, "composed": rows})


def composed_from_json(text: str | None) -> tuple[dict[RequestKey, str], str | None]:
    """Read the `composed` key: request -> the unit that composed it; never raises."""
    if not text:
        return {}, None
    data, problem = _load(text, "composed")
    if data is None:
        return {}, problem
    problems: list[str] = []
    found = {k: v[0] for k, v in _rows(data, "composed", problems).items()}
    return found, _shorten("composed: " + "; ".join(problems), _REASON_MAX) if problems else None


def _key_row(key: RequestKey) -> tuple[int, str, str]:
    return key.relation_id, key.app, key.request_id


_ROW: pydantic.TypeAdapter[tuple[Any, ...]] = pydantic.TypeAdapter(_Row)
_LEFT_ROW: pydantic.TypeAdapter[tuple[Any, ...]] = pydantic.TypeAdapter(_LeftRow)


def _rows(
    data: Mapping[str, Any],
    name: str,
    problems: list[str],
    adapter: pydantic.TypeAdapter[tuple[Any, ...]] = _ROW,
) -> dict[RequestKey, tuple[Any, ...]]:
    """The readable rows of one table by key, the rest of each row as value.

    Each bad row is skipped and named in `problems`.
    """
    rows = data.get(name, [])
    if not isinstance(rows, list):
        problems.append(f"{name} is not an array")
        return {}
    found: dict[RequestKey, tuple[Any, ...]] = {}
    for i, row in enumerate(rows):  # pyright: ignore[reportUnknownVariableType]
        try:
            good = adapter.validate_python(row)
        except pydantic.ValidationError as exc:
            problems.append(f"{name}[{i}]{_why(exc)} (row skipped)")
            continue
        found[RequestKey(*good[:3])] = tuple(good[3:])
    return dict(sorted(found.items()))


def assignment_from_json(text: str | None) -> tuple[Assignment, str | None]:
    """Read an assignment; never raises, and one bad row never voids the others.

    Rows are read one by one: a malformed row (or a whole table that is not an array) is
    skipped and named in the reason, the readable rows stand. Another `version` is read the
    same way (rows of the version 0 shape are taken, others skipped), so a rolling upgrade
    whose new leader wrote a newer version does not make every follower forget its VMs.

    Returns:
        (assignment, None), or (what could be read, reason) when some or all of the text is
        unusable; no text at all is an empty assignment without a reason (nothing assigned).
    """
    if not text:
        return Assignment(), None
    data, problem = _load(text, "assignment")
    if data is None:
        return Assignment(), problem
    problems: list[str] = []
    if data.get("version") != WIRE_VERSION:
        problems.append(f"assignment is not a version {WIRE_VERSION!r} object")
    units = {k: v[0] for k, v in _rows(data, "assigned", problems).items()}
    unplaced = {k: v[0] for k, v in _rows(data, "unplaced", problems).items()}
    left = {k: (v[0], v[1]) for k, v in _rows(data, "left", problems, _LEFT_ROW).items()}
    reason = None
    if problems:
        reason = _shorten("assignment: " + "; ".join(problems), _REASON_MAX)
    return Assignment(units=units, unplaced=unplaced, left=left), reason


# ---------------------------------------------------------------------------------------------
# One hook's decision


@dataclass(frozen=True)
class Peers:
    """What the charm read from the peer relation (`hosts`)."""

    reports: Mapping[str, str | None]
    """Every other member unit -> the text of its `report` (None when absent)."""
    assignment: str | None
    """The `assignment` text in the peer application databag."""
    composed: str | None = None
    """The `composed` text in the peer application databag (composed_to_json)."""


@dataclass(frozen=True)
class Decision:
    """What this unit does this hook, and what the charm writes back to the peer relation."""

    assignment: Assignment
    mine: frozenset[RequestKey]
    """The requests this unit hosts."""
    answer_errors: Mapping[RequestKey, str]
    """Refusals this unit answers though it hosts nothing for them (the leader answers
    invalid and unplaceable requests, so each is answered exactly once)."""
    report: str
    """This unit's host report, for its peer unit databag."""
    assignment_text: str | None = None
    """The new assignment for the peer application databag (leader only)."""
    composed_text: str | None = None
    """Which assigned requests are composed, for the peer application databag (leader)."""
    peer_macs: frozenset[str] = frozenset()
    """MACs the other units' readable reports list: never given to a new NIC here."""
    problems: tuple[str, ...] = ()
    """Unreadable peer data, for the log."""


def lead(
    unit: str,
    *,
    leader: bool,
    requests: Sequence[RelationRequest],
    topology: HostTopology,
    vms: Sequence[VmRecord],
    hostname: str | None,
    peers: Peers | None,
    policy: Policy,
    mapping: Mapping[str, networks.NetworkMapping],
    scope: Scope | None = None,
    reassign: AbstractSet[RequestKey] = frozenset(),
    resource_pools: pools.Pools | None = None,
) -> Decision:
    """Decide which requests this unit hosts and which refusals it answers.

    Without a peer relation (yet) this unit is the whole fleet. With one, a follower takes the
    assignment in force; the leader assigns every valid request (`assign`), a unit being
    eligible only when its NICs can serve the request's interfaces under `networks`.
    `scope` is this vm-host application and model (only its VMs count as composed here);
    `reassign` (leader) the requests an operator asked to place anew after their unit left;
    `resource_pools` (leader) the quotas the fleet's use is held to.
    """
    here = composed_keys(vms, scope)
    report = unit_report(topology, vms, hostname=hostname, scope=scope)
    invalid = {r.key: r.error for r in requests if r.error is not None} if leader else {}
    valid = [(r.key, r.spec, r.host) for r in requests if r.spec is not None]
    if peers is None:
        alone = Assignment(units={key: unit for key, _, _ in valid})
        return Decision(alone, alone.for_unit(unit), invalid, report)
    current, problem = assignment_from_json(peers.assignment)
    problems = [f"peer assignment unreadable: {problem}"] if problem else []
    if leader:
        was_composed, why = composed_from_json(peers.composed)
        problems += [f"peer data unreadable: {why}"] if why else []
        # Only rows that still name the unit the assignment holds count.
        current = dataclasses.replace(
            current,
            composed=frozenset(k for k, u in was_composed.items() if current.units.get(k) == u),
        )
    # A unit never composes a request another unit's readable report lists as composed
    # (an assignment that was lost or rewritten cannot make a second VM).
    others, _ = collect_reports({u: t for u, t in peers.reports.items() if u != unit})
    elsewhere = {k for r in others.values() for k in r.composed} - here
    macs = _macs(others)
    if not leader:
        mine = current.for_unit(unit) - elsewhere
        return Decision(current, mine, {}, report, problems=tuple(problems), peer_macs=macs)
    reports, bad = collect_reports({**peers.reports, unit: report})
    problems += [f"host report of {u} ignored: {reason}" for u, reason in bad.items()]

    def eligible(_unit: str, host: HostReport, spec: VmSpec) -> str | None:
        try:
            networks.resolve(spec.interfaces, host.topology.nics, mapping)
        except InvalidRequestError as exc:
            return str(exc)
        return None

    def resolve(host: HostReport, spec: VmSpec) -> Sequence[NicAttachment] | None:
        try:
            return networks.resolve(spec.interfaces, host.topology.nics, mapping)
        except InvalidRequestError:
            return None  # eligible() has refused it already

    assignment = assign(
        valid,
        reports,
        current.units,
        frozenset(),
        policy,
        eligible=eligible,
        present={*peers.reports, unit},
        previous=current,
        reassign=reassign,
        resolve=resolve,
        resource_pools=resource_pools,
    )
    return Decision(
        assignment,
        assignment.for_unit(unit) - elsewhere,
        {**invalid, **assignment.unplaced},
        report,
        assignment_to_json(assignment),
        composed_to_json(assignment),
        problems=tuple(problems),
        peer_macs=macs,
    )

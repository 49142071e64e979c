"""Resource pools: quotas on what a group of VMs may take, counted over the whole fleet.

The operator names pools and their quotas (config `resource-pools`), the pool of requests that
name none (`default-pool`) and which pools each related application may use (`app-pools`).
A VM's pool is recorded with it in the hypervisor (like its owner and tags), so use is always
counted from the ledger: a VM recorded without one (composed before pools existed) counts in
the default pool. A request that would take its pool past a quota is refused with the numbers.

Pure: parsing, accounting and the refusal text. The compose path checks one host's VMs, the
leader (vmhost.relation.fleet) the use every unit reports.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic
import yaml
from pydantic import StrictInt

from vmhost.model import (
    HUGEPAGE_LABELS,
    InvalidRequestError,
    Placement,
    VmRecord,
    page_label,
)

__all__ = [
    "DEFAULT_POOL",
    "POOL_NAME",
    "Pools",
    "Quota",
    "Use",
    "load",
    "parse_app_pools",
    "parse_resource_pools",
    "pool_rows",
    "total_by_pool",
    "use_by_pool",
    "use_from_dict",
    "use_of",
    "use_to_dict",
    "validate_pool_name",
    "with_default",
]

DEFAULT_POOL = "default"
POOL_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
"""A pool name: lower-case letters, digits and inner '-', at most 40 characters."""
MAX_POOLS = 256
MAX_QUOTA = 10**12
"""The largest quota number accepted (1 EiB of MiB is far below it)."""
MAX_TEXT = 64 * 1024
"""The longest resource-pools or app-pools text read: a config value, not a data set."""
QUOTA_KEYS = ("vcpus", "pinned-cpus", "memory", "hugepages", "vms")
FIX = "raise the quota with juju config vm-host resource-pools=... or choose another pool"
_EXAMPLE = "{db: {pinned-cpus: 48, memory: 196608, hugepages: {1G: 64}, vms: 10}, test: {vms: 4}}"

_Count = Annotated[StrictInt, pydantic.Field(ge=0, le=MAX_QUOTA)]


class Quota(pydantic.BaseModel):
    """One pool's quotas (config resource-pools); a quota left out is unlimited."""

    model_config = pydantic.ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, defer_build=True
    )

    vcpus: _Count | None = None
    """vCPUs of the pool's VMs, pinned or shared."""
    pinned_cpus: _Count | None = pydantic.Field(None, alias="pinned-cpus")
    """Host CPUs pinned to the pool's VMs."""
    memory: _Count | None = None
    """MiB of memory of the pool's VMs, whatever backs it (huge pages included)."""
    hugepages: Mapping[str, _Count] = pydantic.Field(default_factory=dict[str, int])
    """Page size ("2M", "1G") -> huge pages of that size the pool's VMs may take."""
    vms: _Count | None = None
    """How many VMs the pool may hold (stopped ones included: they keep their place)."""

    @pydantic.field_validator("hugepages", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, dict):
            for size in value:  # pyright: ignore[reportUnknownVariableType]
                if size not in HUGEPAGE_LABELS:
                    raise ValueError(
                        f"page size {str(size)[:20]!r} is not one of "  # pyright: ignore[reportUnknownArgumentType]
                        f"{', '.join(HUGEPAGE_LABELS)}, for example hugepages: {{1G: 16}}"
                    )
        return value  # pyright: ignore[reportUnknownVariableType]

    def hugepage_limits(self) -> dict[int, int]:
        """Page size in KiB -> the pages the pool may take."""
        return {HUGEPAGE_LABELS[label]: n for label, n in self.hugepages.items()}

    @property
    def unlimited(self) -> bool:
        """Whether no quota is set at all."""
        return self == NO_QUOTA


NO_QUOTA = Quota.model_validate({})
"""The quotas of a pool that sets none: unlimited."""


@dataclass(frozen=True)
class Use:
    """What some VMs take, in the units of the quotas."""

    vcpus: int = 0
    pinned_cpus: int = 0
    memory_mib: int = 0
    hugepages: Mapping[int, int] = field(default_factory=dict[int, int])
    """Page size in KiB -> pages."""
    vms: int = 0

    def __add__(self, other: Use) -> Use:
        pages = dict(self.hugepages)
        for size, n in other.hugepages.items():
            pages[size] = pages.get(size, 0) + n
        return Use(
            self.vcpus + other.vcpus,
            self.pinned_cpus + other.pinned_cpus,
            self.memory_mib + other.memory_mib,
            pages,
            self.vms + other.vms,
        )


def use_of(placement: Placement) -> Use:
    """What one VM of this placement takes from its pool."""
    pages: dict[int, int] = {}
    for cell in placement.cells:
        if cell.hugepage_size_kib and cell.hugepages:
            pages[cell.hugepage_size_kib] = pages.get(cell.hugepage_size_kib, 0) + cell.hugepages
    return Use(
        vcpus=placement.vcpus,
        pinned_cpus=len(placement.pinned_cpus),
        memory_mib=placement.memory_mib,
        hugepages=pages,
        vms=1,
    )


def _total(uses: Iterable[Use]) -> Use:
    out = Use()
    for use in uses:
        out = out + use
    return out


def use_by_pool(vms: Sequence[VmRecord], default: str = "") -> dict[str, Use]:
    """What the VMs vm-host composed take, by recorded pool ("" unrecorded -> `default`).

    Domains vm-host did not compose belong to no pool (they still use the host).
    """
    out: dict[str, Use] = {}
    for vm in vms:
        if not vm.managed:
            continue
        name = vm.pool or default
        out[name] = out.get(name, Use()) + use_of(vm.placement)
    return dict(sorted(out.items()))


def with_default(vms: Sequence[VmRecord], default: str) -> list[VmRecord]:
    """The VMs with the default pool filled in where vm-host recorded none (for showing)."""
    return [
        dataclasses.replace(vm, pool=default) if vm.managed and not vm.pool else vm for vm in vms
    ]


def total_by_pool(*uses: Mapping[str, Use], default: str) -> dict[str, Use]:
    """Several use-per-pool maps added up, "" (VMs recorded without a pool) as `default`."""
    out: dict[str, Use] = {}
    for use in uses:
        for name, value in use.items():
            pool = name or default
            out[pool] = out.get(pool, Use()) + value
    return dict(sorted(out.items()))


def use_to_dict(use: Use) -> dict[str, Any]:
    """The JSON form of a use (peer host reports)."""
    return {
        "vcpus": use.vcpus,
        "pinned-cpus": use.pinned_cpus,
        "memory": use.memory_mib,
        "hugepages": {page_label(s): n for s, n in sorted(use.hugepages.items())},
        "vms": use.vms,
    }


class _UseData(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="ignore", frozen=True, populate_by_name=True, defer_build=True
    )

    vcpus: _Count = 0
    pinned_cpus: _Count = pydantic.Field(0, alias="pinned-cpus")
    memory: _Count = 0
    hugepages: Mapping[str, _Count] = pydantic.Field(default_factory=dict[str, int])
    vms: _Count = 0


def use_from_dict(data: object) -> Use:
    """Read a use written by use_to_dict (page sizes this version does not know are skipped).

    Raises:
        pydantic.ValidationError: the data has the wrong shape.
    """
    got = _UseData.model_validate(data)
    pages = {HUGEPAGE_LABELS[k]: n for k, n in got.hugepages.items() if k in HUGEPAGE_LABELS}
    return Use(got.vcpus, got.pinned_cpus, got.memory, pages, got.vms)


# ---------------------------------------------------------------------------------------------
# Config


def validate_pool_name(value: object, field_name: str = "pool") -> str:
    """Check a pool name (POOL_NAME).

    Raises:
        InvalidRequestError: naming `field_name`.
    """
    if not isinstance(value, str) or not POOL_NAME.fullmatch(value):
        shown = repr(value)[:44]
        raise InvalidRequestError(
            field_name,
            f"{shown} is not a pool name (lower-case letters, digits and '-', at most 40 "
            "characters, starting and ending with a letter or digit)",
        )
    return value


def _yaml(option: str, text: str, example: str) -> Any:
    if len(text) > MAX_TEXT:
        raise InvalidRequestError(option, f"is longer than {MAX_TEXT} characters")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InvalidRequestError(
            option, f"is not valid YAML{at}; give a mapping such as {example}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidRequestError(option, f"must be a YAML mapping such as {example}")
    if len(data) > MAX_POOLS:  # pyright: ignore[reportUnknownArgumentType]
        raise InvalidRequestError(option, f"has more than {MAX_POOLS} entries")
    return data  # pyright: ignore[reportUnknownVariableType]


def _quota_problem(exc: pydantic.ValidationError) -> str:
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"]]
    what = ".".join(loc) or "quota"
    kind = error["type"]
    if kind == "extra_forbidden":
        return (
            f"unknown quota key {loc[-1][:40]!r}; quota keys are {', '.join(QUOTA_KEYS)} "
            "(memory in MiB, hugepages per page size)"
        )
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{what} must be a whole number, not {str(error.get('input'))[:40]!r}"
    if kind in ("greater_than_equal", "less_than_equal"):
        return f"{what} must be a whole number from 0 to {MAX_QUOTA}, not {error.get('input')}"
    if kind in ("model_type", "dict_type"):
        return f"{what} must be a mapping"
    return f"{what}: {error['msg'].removeprefix('Value error, ')}"


def parse_resource_pools(text: str) -> dict[str, Quota]:
    """Parse the `resource-pools` option: pool name -> quotas (each optional).

    Raises:
        InvalidRequestError: naming resource-pools, the pool and what to fix.
    """
    data = _yaml("resource-pools", text, _EXAMPLE)
    out: dict[str, Quota] = {}
    for name, value in data.items():
        where = "resource-pools"
        validate_pool_name(name, where)
        try:
            out[name] = Quota.model_validate({} if value is None else value)
        except pydantic.ValidationError as exc:
            raise InvalidRequestError(
                f"{where}[{name}]", f"{_quota_problem(exc)}; for example {_EXAMPLE}"
            ) from None
    return dict(sorted(out.items()))


def parse_app_pools(text: str) -> dict[str, tuple[str, ...]]:
    """Parse the `app-pools` option: application -> the pools its requests may use.

    Raises:
        InvalidRequestError: naming app-pools and what to fix.
    """
    example = "{postgresql: [db], web: [web, default]}"
    data = _yaml("app-pools", text, example)
    out: dict[str, tuple[str, ...]] = {}
    for app, value in data.items():
        if not isinstance(app, str) or not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", app):
            raise InvalidRequestError(
                "app-pools", f"{repr(app)[:44]} is not an application name; for example {example}"
            )
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise InvalidRequestError(
                f"app-pools[{app}]", f"must be a list of one or more pools; for example {example}"
            )
        for name in names:  # pyright: ignore[reportUnknownVariableType]
            validate_pool_name(name, f"app-pools[{app}]")
        out[app] = tuple(dict.fromkeys(names))  # pyright: ignore[reportUnknownArgumentType]
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Pools:
    """The pools as configured: quotas, the default pool, each limited app's pools."""

    quotas: Mapping[str, Quota] = field(default_factory=dict[str, Quota])
    default: str = DEFAULT_POOL
    app_pools: Mapping[str, tuple[str, ...]] = field(default_factory=dict[str, tuple[str, ...]])

    @property
    def names(self) -> list[str]:
        """Every pool a request may name: the configured ones and the default pool."""
        return sorted({*self.quotas, self.default})

    def quota(self, name: str) -> Quota:
        """The pool's quotas (a pool not configured, such as an unset default, has none)."""
        return self.quotas.get(name, NO_QUOTA)

    def pool_for(self, requested: str | None, app: str | None = None) -> str:
        """The pool a request lands in: the one it names, else its default.

        A request naming no pool goes to the default pool; an application that app-pools
        limits to pools without the default one goes to the first of its pools instead (so
        a requirer older than the `pool` field can still be given a pool by the operator).

        Raises:
            InvalidRequestError: naming `pool`: an unknown pool, or one the app may not use.
        """
        allowed = self.app_pools.get(app) if app is not None else None
        if not requested:
            if allowed is not None and self.default not in allowed:
                return allowed[0]
            return self.default
        name = validate_pool_name(requested)
        if name not in self.names:
            raise InvalidRequestError(
                "pool",
                f"no resource pool named {name!r} (pools: {', '.join(self.names)}); name one "
                "of them, or have the operator add it with juju config vm-host "
                "resource-pools=...",
            )
        if allowed is not None and name not in allowed:
            raise InvalidRequestError(
                "pool",
                f"application {app} may use only the pools {', '.join(allowed)} (config "
                f"app-pools), not {name!r}; name one of them, or have the operator change "
                "app-pools",
            )
        return name

    def checks(self, pool: str, used: Use, need: Use) -> list[tuple[str, int | None, int, int]]:
        """Per quota of `pool`: (what, limit or None, used already, what `need` adds)."""
        quota = self.quota(pool)
        checks: list[tuple[str, int | None, int, int]] = [
            ("VMs", quota.vms, used.vms, need.vms),
            ("vCPUs", quota.vcpus, used.vcpus, need.vcpus),
            ("pinned CPUs", quota.pinned_cpus, used.pinned_cpus, need.pinned_cpus),
            ("MiB of memory", quota.memory, used.memory_mib, need.memory_mib),
        ]
        for size, limit in sorted(quota.hugepage_limits().items()):
            checks.append(
                (
                    f"{page_label(size)} huge pages",
                    limit,
                    used.hugepages.get(size, 0),
                    need.hugepages.get(size, 0),
                )
            )
        return checks

    def refusal(self, pool: str, used: Use, need: Use) -> str | None:
        """Why a VM taking `need` cannot join `pool`, which `used` already, or None."""
        for what, limit, have, wanted in self.checks(pool, used, need):
            if limit is not None and wanted and have + wanted > limit:
                return f"pool {pool}: {have} of {limit} {what} used, this VM needs {wanted}; {FIX}"
        return None


@functools.lru_cache(maxsize=8)
def load(resource_pools: str, default_pool: str, app_pools: str) -> Pools:
    """The three pool options as one Pools, checked against each other (cached per text).

    Raises:
        InvalidRequestError: naming the option that is wrong and how to fix it.
    """
    quotas = parse_resource_pools(resource_pools)
    default = validate_pool_name(default_pool.strip(), "default-pool")
    limits = parse_app_pools(app_pools)
    known = {*quotas, default}
    for app, names in limits.items():
        unknown = [n for n in names if n not in known]
        if unknown:
            raise InvalidRequestError(
                f"app-pools[{app}]",
                f"names {', '.join(repr(n) for n in unknown)}, which resource-pools does not "
                f"define (pools: {', '.join(sorted(known))}); add it to resource-pools or "
                "remove it here",
            )
    return Pools(quotas, default, limits)


# ---------------------------------------------------------------------------------------------
# show-resources


def pool_rows(
    pools: Pools, used: Mapping[str, Use], fleet: Mapping[str, Use] | None = None
) -> list[dict[str, Any]]:
    """Per pool (configured, default, or recorded on a VM): quota, used, free.

    `used` is this host's use per pool, `fleet` (when the unit has peers) the whole fleet's,
    this host included; both with unrecorded VMs already counted in the default pool. With a
    fleet, each resource also says `fleet-used` and `fleet-free`: what the leader holds
    relation requests to.
    """
    rows: list[dict[str, Any]] = []
    everywhere_by_pool: Mapping[str, Use] = fleet or {}
    names: set[str] = {*pools.names, *used, *everywhere_by_pool}
    for name in sorted(names):
        quota = pools.quota(name)
        use = used.get(name, Use())
        everywhere = everywhere_by_pool.get(name, Use())
        pages = quota.hugepage_limits()
        resources: list[tuple[str, int | None, int, int]] = [
            ("vms", quota.vms, use.vms, everywhere.vms),
            ("vcpus", quota.vcpus, use.vcpus, everywhere.vcpus),
            ("pinned-cpus", quota.pinned_cpus, use.pinned_cpus, everywhere.pinned_cpus),
            ("memory-mib", quota.memory, use.memory_mib, everywhere.memory_mib),
        ]
        for size in sorted({*pages, *use.hugepages, *everywhere.hugepages}):
            resources.append(
                (
                    f"hugepages-{page_label(size)}",
                    pages.get(size),
                    use.hugepages.get(size, 0),
                    everywhere.hugepages.get(size, 0),
                )
            )
        items: list[dict[str, Any]] = []
        for what, limit, have, total in resources:
            item: dict[str, Any] = {
                "resource": what,
                "quota": limit,
                "used": have,
                "free": None if limit is None else max(0, limit - have),
            }
            if fleet is not None:
                item["fleet-used"] = total
                item["fleet-free"] = None if limit is None else max(0, limit - total)
            items.append(item)
        rows.append(
            {
                "name": name,
                "default": name == pools.default,
                "configured": name in pools.names,
                "resources": items,
            }
        )
    return rows

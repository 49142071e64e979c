"""Operator settings that are not requests: huge page reservations and the placement policy.

The charm's config model calls these so that a bad value is refused with the option's name
and the fix before anything on the host changes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from vmhost.model import HUGEPAGE_LABELS, InvalidRequestError, Policy
from vmhost.topology import parse_cpu_list

_HUGEPAGE_ENTRY = re.compile(r"^(?P<size>2M|1G):(?P<count>\d{1,7})(?:@(?P<node>\d{1,3}))?$")


@dataclass(frozen=True)
class HugepageSetting:
    """Huge pages to reserve: `count` pages of `size_kib`, on one node or spread by the kernel."""

    size_kib: int
    count: int
    node: int | None = None


def parse_hugepages_setting(text: str) -> tuple[HugepageSetting, ...]:
    """Parse the `hugepages` option: "2M:4096,1G:8@0,1G:8@1".

    A size given both host-wide and per node would leave the kernel to guess, so it is refused.
    """
    settings: list[HugepageSetting] = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        match = _HUGEPAGE_ENTRY.match(raw)
        if not match:
            raise InvalidRequestError(
                "hugepages",
                f"{raw!r} is not SIZE:COUNT[@NODE] with SIZE 2M or 1G, for example "
                "'2M:1024' or '1G:4@0'",
            )
        node = match["node"]
        settings.append(
            HugepageSetting(
                size_kib=HUGEPAGE_LABELS[match["size"]],
                count=int(match["count"]),
                node=int(node) if node is not None else None,
            )
        )
    seen: dict[tuple[int, int | None], HugepageSetting] = {}
    for setting in settings:
        key = (setting.size_kib, setting.node)
        if key in seen:
            raise InvalidRequestError(
                "hugepages", "each size may appear once per node; merge the repeated entries"
            )
        seen[key] = setting
    for size, node in seen:
        if node is None and any(s == size and n is not None for s, n in seen):
            raise InvalidRequestError(
                "hugepages",
                "a size is given both host-wide and per node; use either 'SIZE:COUNT' or "
                "'SIZE:COUNT@NODE' entries for it",
            )
    return tuple(sorted(settings, key=lambda s: (s.size_kib, -1 if s.node is None else s.node)))


def parse_reserved_cpus(text: str) -> frozenset[int]:
    """Parse the `reserved-cpus` option (Linux cpu-list syntax)."""
    if not text.strip():
        return frozenset()
    try:
        return frozenset(parse_cpu_list(text))
    except ValueError as exc:
        raise InvalidRequestError(
            "reserved-cpus", f"{exc}; use Linux cpu-list syntax such as '0-1,24-25'"
        ) from exc


def make_policy(
    *,
    cpu_overcommit_ratio: float,
    memory_overcommit_ratio: float,
    reserved_cpus: str,
    reserved_memory_mib: int,
    smt_policy: str,
) -> Policy:
    """Build the placement policy from the charm options."""
    return Policy(
        cpu_overcommit_ratio=cpu_overcommit_ratio,
        memory_overcommit_ratio=memory_overcommit_ratio,
        reserved_cpus=parse_reserved_cpus(reserved_cpus),
        reserved_memory_mib=reserved_memory_mib,
        smt_policy=smt_policy,
    )


PER_HOST_DEFAULT = "*"


def split_names(text: str) -> list[str]:
    """Split a comma- or space-separated list of names (images, host interfaces)."""
    return [n for n in text.replace(",", " ").split() if n]


def for_host(option: str, text: str, unit: str, hostname: str) -> str:
    """Return this host's value of an option that may differ per machine.

    The option is either a plain value, used on every host, or a YAML mapping of unit name
    ("vm-host/0") or hostname to value with a "*" entry for every other host:
    `{vm-host/0: "0-1", big-box: "0-3", "*": ""}`. The unit name wins over the hostname, both
    over "*". The "*" entry is required so that a plain `networks` mapping (space -> attachment)
    is never mistaken for a per-host one. A per-host value may itself be a mapping (`networks`),
    handed on as YAML text.

    Raises:
        InvalidRequestError: a mapping without "*", or with keys or values of the wrong kind.
    """
    table = per_host_table(option, text)
    if table is None:
        return text
    for key in (unit, hostname, PER_HOST_DEFAULT):
        if key in table:
            return table[key]
    return ""  # unreachable: per_host_table requires "*"


def per_host_table(option: str, text: str) -> dict[str, str] | None:
    """Parse the per-host form of an option; None when the text is a plain value."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # not YAML: a plain value, checked by the option's own parser
    if not isinstance(data, dict):
        return None
    if PER_HOST_DEFAULT not in data:
        if option == "networks":
            return None
        raise InvalidRequestError(
            option,
            'a per-host map needs a "*" entry for the other hosts (it may be empty), '
            'for example {vm-host/0: "...", "*": ""}',
        )
    table: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            raise InvalidRequestError(
                option, f"per-host keys are unit names, hostnames or '*', not {key!r}"
            )
        if value is None:
            table[key] = ""
        elif isinstance(value, dict):
            table[key] = yaml.safe_dump(value, sort_keys=True)
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            table[key] = str(value)
        else:
            raise InvalidRequestError(
                f"{option}[{key}]", f"must be text like the plain option, not {value!r}"
            )
    return table


def check_per_host(option: str, text: str, parse: Callable[[str], object]) -> None:
    """Check the plain value, or every value of the per-host map, with the option's parser.

    Raises:
        InvalidRequestError: naming the option and, in a map, the entry ("hugepages[vm-host/1]").
    """
    table = per_host_table(option, text)
    if table is None:
        parse(text)
        return
    for key, value in sorted(table.items()):
        try:
            parse(value)
        except InvalidRequestError as exc:
            detail = str(exc).removeprefix(f"{exc.field}: ")
            raise InvalidRequestError(f"{option}[{key}]", detail) from exc

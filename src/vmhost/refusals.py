"""Placement refusals counted by reason class, for the exporter's counter.

Refusals happen in hooks and actions; the exporter is another process. Each refusal adds one
to a small JSON file under a file lock, and the exporter reads the file on every scrape. The
counts only grow (a Prometheus counter); a lost or unreadable file starts again from zero, which
Prometheus reads as a counter reset. A relation request that stays unplaceable is retried on
every hook; it counts once per distinct reason, not once per hook.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

REFUSALS_PATH = Path("/var/lib/vm-host/refusals.json")

REASON_CLASSES = ("cpu", "memory", "hugepages", "sriov", "other")
"""Every class is always exported (zero included), so rate() and dashboards have a series."""

_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sriov", ("sr-iov", "sriov", " vf", "vfs")),
    ("hugepages", ("huge page", "hugepage")),
    ("memory", ("memory", " mib")),
    ("cpu", ("cpu", "vcpu", "pinned", "numa", "sibling", "smt")),
)


def classify(reason: str) -> str:
    """Return the reason class of a placement refusal ("cpu", "memory", ... or "other").

    The allocator's messages name the resource they ran out of; the first class in the order
    SR-IOV, huge pages, memory, CPUs whose words appear wins (a message about huge pages also
    speaks of memory, one about VFs of NUMA nodes).
    """
    text = f" {reason.lower()}"
    for name, words in _KEYWORDS:
        if any(word in text for word in words):
            return name
    return "other"


_MAX_REMEMBERED = 1000
"""Requests whose last refusal is remembered (oldest forgotten first)."""


def record(reason: str, request: str | None = None, path: Path | None = None) -> None:
    """Count one refusal; never raises (metrics must not break a hook), logs when it cannot.

    Args:
        reason: the allocator's message.
        request: a stable key of a retried request (relation requests); a repeat of its last
            reason is not counted again. None (an action) always counts.
        path: the counts file (default REFUSALS_PATH).
    """
    path = path or REFUSALS_PATH
    name = classify(reason)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _load(path)
            last: dict[str, str] = data["last"]
            if request is not None:
                if last.get(request) == reason:
                    return
                last.pop(request, None)
                last[request] = reason
                while len(last) > _MAX_REMEMBERED:
                    last.pop(next(iter(last)))
            data["counts"][name] = data["counts"].get(name, 0) + 1
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not count a placement refusal in %s: %s", path, exc)


def _load(path: Path) -> dict[str, dict]:
    counts = dict.fromkeys(REASON_CLASSES, 0)
    last: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            for key, value in (data.get("counts") or {}).items():
                if key in counts and isinstance(value, int) and value >= 0:
                    counts[key] = value
            seen = data.get("last") or {}
            if isinstance(seen, dict):
                last = {str(k): str(v) for k, v in seen.items()}
    return {"counts": counts, "last": last}


def read(path: Path | None = None) -> dict[str, int]:
    """Return refusals per reason class; every class is present, missing ones at zero."""
    return dict(_load(path or REFUSALS_PATH)["counts"])

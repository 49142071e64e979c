"""What this unit saw happen to its relations, recorded on the host itself.

Two facts decide whether relation VMs may be released (deleted, or re-owned under
release-policy keep), and neither can be read back from Juju later:

- `broken`: the ids (and requiring apps) of `vms` relations whose relation-broken this unit
  saw while it was not leaving. Only VMs of those relations are ever released; a VM whose
  relation is merely not listed (another vm-host application's relation, a hook that did not
  list every relation, a relation of another model) looks orphaned and is only reported.
- `departing`: units that saw relation-departed with themselves as the departing unit
  (`juju remove-unit`): their relation-broken hooks are the unit leaving, not the relation
  going away, so they delete, re-own and compose nothing.

The record lives on the host (not in unit state) beside the hypervisor it describes, one file
per vm-host application and model, written atomically. An unreadable file reads as empty:
nothing is then released, which loses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pydantic
from pydantic import StrictInt, StrictStr

from vmhost.relation.keys import Scope

__all__ = ["JOURNAL_DIR", "Journal", "read", "record_broken", "record_departing"]

logger = logging.getLogger(__name__)

JOURNAL_DIR = Path("/var/lib/vm-host/relations")
MAX_ENTRIES = 10000
"""Relation ids and unit names kept (the oldest go first); a model has far fewer."""
_MAX_BYTES = 1 << 20


class Journal(pydantic.BaseModel):
    """The file's content."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True, defer_build=True)

    version: StrictInt = 1
    broken: tuple[tuple[StrictInt, StrictStr], ...] = ()
    """(relation id, requiring app), in the order their relation-broken was seen."""
    departing: tuple[StrictStr, ...] = ()
    """Unit names, in the order they were seen leaving."""

    @property
    def broken_apps(self) -> dict[int, str]:
        """Relation id -> requiring app of every relation seen broken."""
        return dict(self.broken)


def _path(scope: Scope, directory: Path | None) -> Path:
    # Scope validates both parts ([a-z0-9-] and a UUID), so the name cannot leave the folder.
    return (directory or JOURNAL_DIR) / f"{scope.model_uuid}.{scope.app}.json"


def read(scope: Scope, directory: Path | None = None) -> Journal:
    """Return the journal of one vm-host application; never raises (unreadable is empty)."""
    path = _path(scope, directory)
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return Journal()
    except OSError as exc:
        logger.warning("relation journal %s unreadable (%s): nothing is released", path, exc)
        return Journal()
    try:
        if len(raw) > _MAX_BYTES:
            raise ValueError("too large")
        return Journal.model_validate(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        logger.warning("relation journal %s unreadable (%s): nothing is released", path, exc)
        return Journal()


def _write(scope: Scope, journal: Journal, directory: Path | None) -> None:
    path = _path(scope, directory)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = journal.model_dump_json()
    fd, tmp = tempfile.mkstemp(prefix=".journal-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_broken(
    scope: Scope,
    relation_id: int,
    app: str,
    directory: Path | None = None,
    *,
    unit: str | None = None,
) -> Journal:
    """Record that this unit saw the relation (with `app`) broken: its VMs may be released.

    Nothing is recorded when `unit` (the unit that saw it) is leaving: its relation-broken
    hooks are the unit going, not the relation.
    """
    journal = read(scope, directory)
    if (relation_id, app) in journal.broken or unit in journal.departing:
        return journal
    broken = (*journal.broken, (relation_id, app))[-MAX_ENTRIES:]
    updated = journal.model_copy(update={"broken": broken})
    _write(scope, updated, directory)
    return updated


def record_departing(scope: Scope, unit: str, directory: Path | None = None) -> Journal:
    """Record that this unit is leaving (remove-unit): it releases nothing from now on."""
    journal = read(scope, directory)
    if unit in journal.departing:
        return journal
    departing = (*journal.departing, unit)[-MAX_ENTRIES:]
    updated = journal.model_copy(update={"departing": departing})
    _write(scope, updated, directory)
    return updated

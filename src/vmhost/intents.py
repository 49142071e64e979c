"""Intent records of composes in progress, so a hook killed mid-compose leaves no orphan.

Before a backend creates the first volume of a VM it writes an intent: the VM's name, the UUID
its domain will get and the volumes it is about to create (each volume's path is added once it
exists). A compose that finishes, or rolls back completely, removes its intent. One that is
killed in between (the hook's process killed, the machine rebooted) leaves it, and the next
hook's `recover` removes the volumes it names that no domain uses, and says so: in the log, in
the status line for a day, and in the result of the action that ran it.

The records are small JSON files, root-only, written atomically; a record that cannot be read
is logged and left for the operator, never acted on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmhost.constraints import validate_name
from vmhost.model import VmHostError

__all__ = ["INTENT_DIR", "Intent", "IntentStore", "IntentVolume"]

logger = logging.getLogger(__name__)

INTENT_DIR = Path("/var/lib/vm-host/composing")
NOTE_FILE = "recovered.json"
NOTE_TTL_S = 24 * 3600
"""How long the status line mentions what a recovery removed."""
_MAX_NOTES = 20


@dataclass(frozen=True)
class IntentVolume:
    """A volume a compose was about to create, with its path once it existed."""

    pool: str
    name: str
    path: str = ""

    @property
    def ref(self) -> str:
        """Return "pool/volume"."""
        return f"{self.pool}/{self.name}"


@dataclass(frozen=True)
class Intent:
    """A compose that started and has not finished (or was killed)."""

    name: str
    uuid: str
    volumes: tuple[IntentVolume, ...]


class IntentStore:
    """Intent records in one directory, one file per VM name."""

    def __init__(self, directory: Path | str = INTENT_DIR):
        self.directory = Path(directory)

    def _path(self, name: str) -> Path:
        validate_name(name, "name")
        return self.directory / f"{name}.json"

    def _write(self, path: Path, data: object) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def begin(self, name: str, uuid: str, volumes: Sequence[tuple[str, str]]) -> Intent:
        """Record that a compose of `name` is about to create `volumes` ((pool, volume))."""
        intent = Intent(name, uuid, tuple(IntentVolume(p, v) for p, v in volumes))
        self._save(intent)
        return intent

    def created(self, intent: Intent, pool: str, volume: str, path: str) -> Intent:
        """Record the path of a volume the compose has just created."""
        updated = Intent(
            intent.name,
            intent.uuid,
            tuple(
                IntentVolume(v.pool, v.name, path) if (v.pool, v.name) == (pool, volume) else v
                for v in intent.volumes
            ),
        )
        self._save(updated)
        return updated

    def _save(self, intent: Intent) -> None:
        self._write(
            self._path(intent.name),
            {
                "name": intent.name,
                "uuid": intent.uuid,
                "volumes": [
                    {"pool": v.pool, "name": v.name, "path": v.path} for v in intent.volumes
                ],
            },
        )

    def done(self, name: str) -> None:
        """Forget the intent of `name` (its compose finished or was fully rolled back)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()

    def pending(self) -> list[Intent]:
        """Every readable intent, by name; unreadable ones are logged and left alone."""
        try:
            files = sorted(self.directory.glob("*.json"))
        except OSError:
            return []
        found = []
        for path in files:
            if path.name == NOTE_FILE:
                continue
            try:
                found.append(_read_intent(path))
            except (OSError, ValueError, TypeError, KeyError, VmHostError) as exc:
                logger.error("compose intent %s is unreadable (%s); left alone", path, exc)
        return found

    def note(self, message: str, now: float | None = None) -> None:
        """Keep what a recovery did, for the status line."""
        now = time.time() if now is None else now
        notes = [n for n in self._notes() if now - n[0] < NOTE_TTL_S]
        notes.append((now, message))
        self._write(self.directory / NOTE_FILE, [list(n) for n in notes[-_MAX_NOTES:]])

    def notes(self, now: float | None = None) -> list[str]:
        """What recoveries did in the last day, oldest first."""
        now = time.time() if now is None else now
        return [m for t, m in self._notes() if now - t < NOTE_TTL_S]

    def _notes(self) -> list[tuple[float, str]]:
        try:
            data = json.loads((self.directory / NOTE_FILE).read_text())
            return [(float(t), str(m)) for t, m in data]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("recovery notes unreadable (%s); starting afresh", exc)
            return []


def _read_intent(path: Path) -> Intent:
    data = json.loads(path.read_text())
    name = validate_name(str(data["name"]), "name")
    if path.name != f"{name}.json":
        raise ValueError(f"names VM {name!r}")
    volumes = []
    for raw in data["volumes"]:
        pool = validate_name(str(raw["pool"]), "pool")
        volume = validate_name(str(raw["name"]), "volume")
        vol_path = str(raw.get("path", ""))
        if vol_path and (not os.path.isabs(vol_path) or os.path.basename(vol_path) != volume):
            raise ValueError(f"path {vol_path!r} is not the volume {volume!r}")
        volumes.append(IntentVolume(pool, volume, vol_path))
    return Intent(name, str(data["uuid"]), tuple(volumes))

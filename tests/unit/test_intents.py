"""Compose intent records: written before the first volume, read back only when sane."""

from __future__ import annotations

import json
from pathlib import Path

from vmhost.intents import NOTE_TTL_S, IntentStore, IntentVolume


def test_an_intent_lives_from_begin_to_done(tmp_path: Path) -> None:
    store = IntentStore(tmp_path / "composing")
    intent = store.begin("vm1", "u-1", [("vm-host", "vm1-root"), ("fast", "vm1-data")])
    assert store.pending() == [intent]
    assert (tmp_path / "composing").stat().st_mode & 0o777 == 0o700

    store.created(intent, "vm-host", "vm1-root", "/var/lib/vm-host/images/vm1-root")
    (read,) = store.pending()
    assert read.volumes == (
        IntentVolume("vm-host", "vm1-root", "/var/lib/vm-host/images/vm1-root"),
        IntentVolume("fast", "vm1-data", ""),
    )
    store.done("vm1")
    assert store.pending() == []
    store.done("vm1")  # twice is fine


def test_a_record_that_names_foreign_paths_or_names_is_never_acted_on(tmp_path: Path) -> None:
    store = IntentStore(tmp_path)
    bad = {
        "escape.json": {
            "name": "escape",
            "uuid": "u",
            "volumes": [{"pool": "p", "name": "escape-root", "path": "/etc/passwd"}],
        },
        "relative.json": {
            "name": "relative",
            "uuid": "u",
            "volumes": [{"pool": "p", "name": "relative-root", "path": "relative-root"}],
        },
        "pool.json": {"name": "pool", "uuid": "u", "volumes": [{"pool": "../x", "name": "v"}]},
        "other.json": {"name": "vm2", "uuid": "u", "volumes": []},
        "junk.json": "not an object",
    }
    for file, data in bad.items():
        (tmp_path / file).write_text(json.dumps(data))
    (tmp_path / "trunc.json").write_text('{"name": ')
    assert store.pending() == []


def test_recovery_notes_last_a_day(tmp_path: Path) -> None:
    store = IntentStore(tmp_path)
    assert store.notes() == []
    store.note("removed a", now=1000.0)
    store.note("removed b", now=2000.0)
    assert store.notes(now=2000.0) == ["removed a", "removed b"]
    assert store.notes(now=1000.0 + NOTE_TTL_S + 1) == ["removed b"]
    assert store.pending() == []  # the notes file is no intent

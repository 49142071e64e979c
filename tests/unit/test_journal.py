"""The host's record of relations this unit saw broken and of units leaving."""

from __future__ import annotations

import stat
from pathlib import Path

from vmhost.relation import journal
from vmhost.relation.keys import Scope

SCOPE = Scope("vm-host", "5f0c1d2e-3a4b-4c5d-8e6f-7a8b9c0d1e2f")
OTHER = Scope("vm-host-b", SCOPE.model_uuid)


def test_records_survive_and_stay_per_application(tmp_path: Path):
    assert journal.read(SCOPE, tmp_path) == journal.Journal()
    journal.record_broken(SCOPE, 7, "pg", tmp_path)
    journal.record_broken(SCOPE, 7, "pg", tmp_path)
    journal.record_departing(SCOPE, "vm-host/1", tmp_path)
    got = journal.read(SCOPE, tmp_path)
    assert got.broken == ((7, "pg"),)
    assert got.broken_apps == {7: "pg"}
    assert got.departing == ("vm-host/1",)
    assert journal.read(OTHER, tmp_path) == journal.Journal()
    (path,) = tmp_path.iterdir()
    assert path.name == f"{SCOPE.model_uuid}.vm-host.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_unreadable_journal_reads_as_empty_so_nothing_is_released(tmp_path: Path, caplog):
    path = tmp_path / f"{SCOPE.model_uuid}.vm-host.json"
    for text in ("{", '{"broken": "x"}', "[" * 5000, "x" * (2 << 20)):
        path.write_text(text)
        assert journal.read(SCOPE, tmp_path) == journal.Journal()
    assert "nothing is released" in caplog.text
    # Recording again starts a fresh, readable file.
    journal.record_broken(SCOPE, 3, "pg", tmp_path)
    assert journal.read(SCOPE, tmp_path).broken == ((3, "pg"),)


def test_entries_are_bounded(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(journal, "MAX_ENTRIES", 3)
    for i in range(5):
        journal.record_broken(SCOPE, i, "pg", tmp_path)
    assert [i for i, _ in journal.read(SCOPE, tmp_path).broken] == [2, 3, 4]


def test_a_leaving_unit_records_no_relation_broken(tmp_path: Path):
    journal.record_departing(SCOPE, "vm-host/1", tmp_path)
    journal.record_broken(SCOPE, 7, "pg", tmp_path, unit="vm-host/1")
    assert journal.read(SCOPE, tmp_path).broken == ()
    # A unit that stays records it.
    journal.record_broken(SCOPE, 7, "pg", tmp_path, unit="vm-host/0")
    assert journal.read(SCOPE, tmp_path).broken == ((7, "pg"),)

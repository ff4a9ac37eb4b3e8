import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from appliance.dicomfile.uids import is_valid_uid
from appliance.store.database import counts, open_database
from appliance.store.datadir import DataDirectory, release_writer_lock, writers_alive
from appliance.store.instances import open_store

from .conftest import need_data


def _first_file(folder):
    return min(folder.glob("*.dcm"))


def test_database_uses_wal_and_migrations_are_idempotent(settings):
    db = open_database(settings.home_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    for table in ("patients", "studies", "series", "instances", "jobs", "results", "quarantine", "audit_log"):
        assert db.table(table).exists(), table
    applied = db.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0]
    db2 = open_database(settings.home_path)
    assert db2.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0] == applied


def test_accepted_instance_is_filed_by_uids_and_indexed(store, synthetic_chest):
    path = _first_file(synthetic_chest)
    with open(path, "rb") as f:
        accepted = store.accept(f, source="test", original_name="x")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    expected = store.home / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert accepted.status == "stored" and accepted.path == expected
    assert expected.read_bytes() == path.read_bytes()  # stored as received, never rewritten
    row = store.db.table("instances").get(ds.SOPInstanceUID)
    assert row["series_instance_uid"] == ds.SeriesInstanceUID and row["size_bytes"] == path.stat().st_size
    assert not any(store.tmp_dir.iterdir())


def test_same_sop_instance_twice_is_stored_once(store, synthetic_chest):
    path = _first_file(synthetic_chest)
    for _ in range(2):
        with open(path, "rb") as f:
            last = store.accept(f, source="test", original_name="x")
    assert last.status == "duplicate"
    assert counts(store.db)["instances"] == 1
    assert store.db.execute("SELECT instance_count FROM series").fetchone()[0] == 1


def test_uid_that_would_escape_the_store_writes_nothing_outside_it(store, synthetic_chest, tmp_path):
    """A UID is never a path: '../../etc/passwd' files under a derived UID inside the store, kept as written."""
    ds = pydicom.dcmread(_first_file(synthetic_chest))
    ds.SOPInstanceUID = "../../../../etc/passwd"
    ds.SeriesInstanceUID = "../../../series"
    buf = io.BytesIO()
    ds.save_as(buf)
    buf.seek(0)
    accepted = store.accept(buf, source="test", original_name="evil.dcm")
    instances = store.home / "instances"
    assert accepted.path.parent.parent.parent == instances
    assert all(is_valid_uid(part) for part in accepted.path.relative_to(instances).with_suffix("").parts)
    assert not (tmp_path / "etc").exists() and not (store.home / "series").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    row = store.db.table("instances").get(accepted.header.sop_instance_uid)
    assert json.loads(row["original_uids"]) == {"SeriesInstanceUID": "../../../series",
                                                "SOPInstanceUID": "../../../../etc/passwd"}


def _crash_leftovers(store, synthetic_chest):
    """What a writer killed mid-write leaves: a scratch file and a file renamed but never committed."""
    path = _first_file(synthetic_chest)
    with open(path, "rb") as f:
        accepted = store.accept(f, source="test", original_name="x")
    dead = DataDirectory(store.home).scratch / "deadbeef"
    dead.mkdir()
    (dead / "x.part").write_bytes(b"half written")
    dead.with_suffix(".lock").touch()  # its owner's lock, free since the owner died
    orphan = accepted.path.with_name("1.2.3.dcm")
    shutil.copy(path, orphan)
    return accepted, dead, orphan


def test_opening_the_store_never_deletes_while_a_writer_is_alive(store, settings, synthetic_chest):
    accepted, dead, orphan = _crash_leftovers(store, synthetic_chest)
    script = ("from appliance import config; from appliance.store.instances import open_store; "
              f"open_store(config.load(environ={{}}, home={str(settings.home_path)!r}))")
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert orphan.exists() and accepted.path.exists()  # this process still holds the lock shared
    assert not dead.exists()  # but the scratch of a writer that is gone is removed


def test_recovery_runs_when_no_writer_is_alive(store, settings, synthetic_chest):
    accepted, dead, orphan = _crash_leftovers(store, synthetic_chest)
    release_writer_lock(DataDirectory(store.home))
    assert not writers_alive(DataDirectory(store.home))
    open_store(settings)  # the first writer after a crash recovers
    assert not orphan.exists() and not dead.exists() and accepted.path.exists()
    assert writers_alive(DataDirectory(store.home))


def test_anonymised_files_without_uids_are_filed_consistently(store):
    folder = need_data("ct", "totalseg-example-j2k")
    results = []
    for path in sorted(folder.iterdir())[:3]:
        with open(path, "rb") as f:
            results.append(store.accept(f, source="test", original_name=path.name))
    assert len({r.header.series_instance_uid for r in results}) == 1
    assert all(r.header.series_instance_uid.startswith("2.25.") for r in results)
    assert "SeriesInstanceUID" in results[0].header.derived_uids


def test_file_written_by_another_process_concurrently_is_not_lost(settings, synthetic_chest):
    """Two stores on one database (receiver and importer) each keep every file."""
    a, b = open_store(settings), open_store(settings)
    files = sorted(synthetic_chest.glob("*.dcm"))[:10]
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            (a if i % 2 else b).accept(f, source="test", original_name=path.name)
    assert counts(a.db)["instances"] == 10
    assert len(list(os.scandir(a.home / "instances"))) == 2  # one study folder + .tmp
    assert a.tmp_dir == b.tmp_dir  # one scratch folder per process


def test_a_first_release_database_upgrades_in_place(tmp_path):
    """A box running the first release (m001-m003) keeps its studies and gains the web and export tables."""
    import sqlite3

    home = tmp_path / "home"
    home.mkdir()
    conn = sqlite3.connect(home / "appliance.sqlite")
    conn.executescript((Path(__file__).parent / "data" / "schema-release-1.sql").read_text())
    conn.execute("INSERT INTO patients VALUES ('k', 'ID1', 'DOE^JANE', '19700101', 'F')")
    conn.execute("INSERT INTO studies VALUES "
                 "('1.2.3', 'k', '20260101', '', 'CT CHEST', 'A1', '2026-01-01', '2026-01-01')")
    conn.commit()
    conn.close()
    db = open_database(home)
    assert {"users", "reviews", "imports", "exports", "login_failures"} <= set(db.table_names())
    row = db.execute("SELECT search_text, flagged FROM studies WHERE study_instance_uid = '1.2.3'").fetchone()
    assert row == ("doe jane id1 a1 ct chest", 0)
    assert "notice" in db.table("results").columns_dict


def test_a_store_that_fails_after_the_rename_keeps_no_unindexed_file(store, synthetic_chest, monkeypatch):
    """A full disk while indexing: the transaction rolls back and the renamed file goes with it."""
    import sqlite3

    from appliance.store import instances

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(instances, "_index", full)
    with open(_first_file(synthetic_chest), "rb") as f, pytest.raises(sqlite3.OperationalError):
        store.accept(f, source="test", original_name="x")
    assert not list((store.home / "instances").rglob("*.dcm"))
    assert not any(store.tmp_dir.iterdir())
    assert not store.db.conn.in_transaction


def test_an_instance_number_beyond_64_bits_reads_as_absent(store, synthetic_chest):
    """It crashed the upload with OverflowError from SQLite."""
    ds = pydicom.dcmread(_first_file(synthetic_chest))
    ds.InstanceNumber = str(2**70)
    ds.SeriesNumber = str(-(2**70))
    buf = io.BytesIO()
    ds.save_as(buf)
    buf.seek(0)
    accepted = store.accept(buf, source="test", original_name="huge.dcm")
    assert accepted.status == "stored"
    assert accepted.header.instance_number is None and accepted.header.series_number is None

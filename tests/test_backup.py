"""Backup and restore through the real command: the same status, worklist, users, reviews and keys after a restore
into an empty data directory; a flipped byte, a cut-short file, another site's backup or the wrong key refused
with nothing written; a kill -9 during a backup leaves the last good one intact."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import backup, signing
from appliance.export import keys
from appliance.jobs.intake import analyze_paths
from appliance.store import reviews
from appliance.store.database import open_database, write_transaction
from appliance.web import create_app
from tests.web_helpers import PASSWORDS, login, make_accounts, web_settings

pytestmark = pytest.mark.slow  # a real analysis and several `appliance` processes: about a minute

APPLIANCE = [sys.executable, "-m", "appliance.cli"]
TBODY = re.compile(r"<tbody>.*?</tbody>", re.DOTALL)


def _run(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    return subprocess.run([*APPLIANCE, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def site(tmp_path, synthetic_chest):
    """A data directory with one analysed study, accounts, a radiologist's review and the site's keys."""
    settings = web_settings(tmp_path)
    analyze_paths([synthetic_chest], settings)
    make_accounts(settings.home_path)
    db = open_database(settings.home_path)
    result = next(db.query("SELECT r.id, a.study_instance_uid FROM results r JOIN analyses a ON a.id = r.analysis_id "
                           "WHERE r.score IS NOT NULL AND a.superseded = 0 LIMIT 1"), None)
    if result is not None:
        with write_transaction(db):
            reviews.add_review(db, result["id"], "confirmed", "seen", "rad", study_uid=result["study_instance_uid"])
    db.conn.close()
    return settings


def _code(home: Path) -> str:
    shown = _run(home, "backup", "--show-key")
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.strip().splitlines()[-1].strip()


def _worklist(settings, user: str = "rad") -> str:
    client = create_app(settings, environ={}).test_client()
    assert login(client, user).status_code == 302
    return TBODY.search(client.get("/").get_data(as_text=True)).group(0)


def _table(home: Path, sql: str) -> list[dict]:
    db = open_database(home, read_only=True)
    try:
        return list(db.query(sql))
    finally:
        db.conn.close()


def test_restore_into_an_empty_data_directory_gives_the_same_appliance(site, tmp_path):
    home = site.home_path
    usb = tmp_path / "usb"
    written = _run(home, "backup", "--out", str(usb), "--instances")
    assert written.returncode == 0, written.stderr
    assert "SAFE TO REMOVE" in written.stdout and "--show-key" in written.stdout
    code = _code(home)
    status = _run(home, "status", "--json").stdout
    worklist = _worklist(site)
    users = _table(home, "SELECT username, password_hash, role FROM users ORDER BY username")
    review_rows = _table(home, "SELECT * FROM reviews ORDER BY id")
    results = _table(home, "SELECT * FROM results ORDER BY id")
    key_files = {p.name: p.read_bytes() for p in (home / "keys").iterdir() if p.is_file()}
    images = {p.relative_to(home): p.read_bytes() for p in (home / "instances").rglob("*.dcm")}
    [made] = list(usb.glob("*.ctb"))
    assert _table(home, "SELECT path FROM backups") == [{"path": str(made)}]

    home.rename(tmp_path / "lost-disk")  # the disk failed; a new one is mounted at the same place
    restored = _run(home, "restore", str(made), "--home", str(home), "--key", code)
    assert restored.returncode == 0, restored.stderr
    assert _run(home, "status", "--json").stdout == status
    assert json.loads(status)["instances"] == len(images) > 0
    assert _worklist(site) == worklist and review_rows
    for user in PASSWORDS:  # every account signs in with its password
        assert login(create_app(site, environ={}).test_client(), user).status_code == 302
    assert _table(home, "SELECT username, password_hash, role FROM users ORDER BY username") == users
    assert _table(home, "SELECT * FROM reviews ORDER BY id") == review_rows
    assert _table(home, "SELECT * FROM results ORDER BY id") == results
    assert {p.name: p.read_bytes() for p in (home / "keys").iterdir() if p.is_file()} == key_files
    assert {p.relative_to(home): p.read_bytes() for p in (home / "instances").rglob("*.dcm")} == images
    assert (home / "keys" / keys.SIGNING_KEY).stat().st_mode & 0o077 == 0
    assert _table(home, "SELECT action FROM audit_log WHERE action = 'backup_restored'") == [
        {"action": "backup_restored"}]

    again = _run(home, "restore", str(made), "--home", str(home), "--key", code)
    assert again.returncode == 1 and "NOT_EMPTY" in again.stderr


def test_a_flipped_byte_anywhere_or_a_cut_is_refused_and_nothing_is_written(site, tmp_path):
    usb = tmp_path / "usb"
    result = backup.write_backup(site, usb)
    key = backup.backup_key(site.home_path)
    data = result.path.read_bytes()
    target = tmp_path / "new" / "home"
    target.parent.mkdir()
    positions = [0, len(backup.MAGIC) + 2, len(backup.MAGIC) + 40, len(data) // 3, len(data) // 2,
                 len(data) - 200, len(data) - 1]
    for position in positions:
        bad = bytearray(data)
        bad[position] ^= 0x01
        damaged = tmp_path / "damaged.ctb"
        damaged.write_bytes(bytes(bad))
        with pytest.raises((backup.BackupRefused, signing.SignatureProblem)) as refused:
            backup.restore(damaged, target, key)
        assert refused.value.reason_code in {"TAMPERED", "NOT_A_BACKUP", "WRONG_KEY"}, position
        assert list(target.parent.iterdir()) == [], position  # nothing restored, nothing left beside it
        with pytest.raises((backup.BackupRefused, signing.SignatureProblem)):
            backup.verify_backup(damaged, key)
    (tmp_path / "cut.ctb").write_bytes(data[:len(data) // 2])
    with pytest.raises(backup.BackupRefused) as cut:
        backup.restore(tmp_path / "cut.ctb", target, key)
    assert cut.value.reason_code == "TRUNCATED" and list(target.parent.iterdir()) == []
    (tmp_path / "bad.ctb").write_bytes(bytes(bad))
    refused_cli = _run(site.home_path, "restore", str(tmp_path / "bad.ctb"), "--home", str(target),
                       "--key", backup.recovery_code(key))
    assert refused_cli.returncode == 1 and "TAMPERED" in refused_cli.stderr and not target.exists()
    assert "Traceback" not in refused_cli.stderr


def test_another_sites_backup_or_key_is_refused(site, tmp_path, monkeypatch):
    other = web_settings(tmp_path / "other")
    other_public = keys.init_site_keys(other.home_path)
    theirs = backup.write_backup(other, tmp_path / "usb")
    keys.init_site_keys(site.home_path)
    ours_key = backup.backup_key(site.home_path, create=True)
    with pytest.raises(backup.BackupRefused) as wrong_key:
        backup.restore(theirs.path, tmp_path / "a", ours_key)
    assert wrong_key.value.reason_code == "WRONG_KEY"
    ours_fingerprint = keys.fingerprint(keys.site_public_key(site.home_path))
    with pytest.raises(backup.BackupRefused) as expected:
        backup.restore(theirs.path, tmp_path / "b", backup.backup_key(other.home_path),
                       expect_fingerprint=ours_fingerprint)
    assert expected.value.reason_code == "FOREIGN" and keys.fingerprint(other_public) in expected.value.reason
    # signed (header and signature) by another key than the site key it carries
    stranger = Ed25519PrivateKey.generate()
    monkeypatch.setattr(backup.keys, "signing_key", lambda home: stranger)
    forged = backup.write_backup(site, tmp_path / "forged")
    monkeypatch.undo()
    with pytest.raises(backup.BackupRefused) as foreign:
        backup.restore(forged.path, tmp_path / "c", ours_key)
    assert foreign.value.reason_code == "FOREIGN"
    assert not any((tmp_path / name).exists() for name in "abc")


def test_kill_9_during_a_backup_leaves_the_last_good_one(site, tmp_path):
    home, usb = site.home_path, tmp_path / "usb"
    first = _run(home, "backup", "--out", str(usb))
    assert first.returncode == 0, first.stderr
    [good] = list(usb.glob("*.ctb"))
    filler = home / "instances" / "filler"
    filler.mkdir()
    for k in range(12):  # enough for the second backup to take a while
        (filler / f"{k}.bin").write_bytes(os.urandom(16 * 2**20))
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    proc = subprocess.Popen([*APPLIANCE, "backup", "--out", str(usb), "--instances"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(usb.glob(".*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    partial_seen = bool(list(usb.glob(".*.partial")))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial_seen and proc.returncode == -signal.SIGKILL
    assert list(usb.glob("*.ctb")) == [good]  # no half backup under a final name
    backup.verify_backup(good, backup.backup_key(home))  # the last good one reads back whole
    shutil.rmtree(filler)
    again = _run(home, "backup", "--out", str(usb))
    assert again.returncode == 0, again.stderr
    assert len(list(usb.glob("*.ctb"))) == 2 and not list(usb.glob(".*.partial"))
    assert [p.name for p in (home / backup.STAGING).iterdir() if p.is_dir()] == []


def test_doctor_and_admin_page_say_how_old_the_last_backup_is(tmp_path):
    import datetime

    from appliance import doctor

    settings = web_settings(tmp_path)
    make_accounts(settings.home_path)

    def backup_row() -> dict:
        ctx = doctor.Context(settings)
        return next(r for r in doctor.run_check("last backup", doctor.check_backup, ctx))

    assert backup_row()["status"] == doctor.WARNING and "no backup" in backup_row()["detail"]
    client = create_app(settings, environ={}).test_client()
    login(client, "admin")
    assert "No backup has been written" in client.get("/admin/").get_data(as_text=True)
    result = backup.write_backup(settings, tmp_path / "usb")
    assert backup_row()["status"] == doctor.OK and str(result.path) in backup_row()["detail"]
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert f"Last backup: {today}" in client.get("/admin/").get_data(as_text=True)
    db = open_database(settings.home_path)
    old = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=9)).isoformat()
    db.execute("UPDATE backups SET finished_at = ?", [old])
    db.conn.close()
    assert backup_row()["status"] == doctor.WARNING and "overdue" in backup_row()["detail"]


def test_a_backup_without_images_restores_the_same_status_and_the_viewer_says_the_images_are_not_here(site, tmp_path):
    home = site.home_path
    result = backup.write_backup(site, tmp_path / "usb")
    status = _run(home, "status", "--json").stdout
    code = _code(home)
    home.rename(tmp_path / "lost-disk")
    restored = _run(home, "restore", str(result.path), "--home", str(home), "--key", code)
    assert restored.returncode == 0 and "images were not in this backup" in restored.stdout, restored.stderr
    assert _run(home, "status", "--json").stdout == status
    assert not (home / "instances").exists()
    series = _table(home, "SELECT series_instance_uid, study_instance_uid FROM series")[0]
    client = create_app(site, environ={}).test_client()
    login(client, "rad")
    assert client.get(f"/study/{series['study_instance_uid']}").status_code == 200
    gone = client.get(f"/series/{series['series_instance_uid']}/slice/0", headers={"Accept": "application/json"})
    assert gone.status_code == 410 and "restored from a backup made without images" in gone.get_json()["message"]

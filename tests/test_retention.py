"""Retention: only images analysed, sent and exported go, oldest first, when free space runs low; the screens say so.

The simulated clock (``bench/retention_sim.py``, run here for 90 days) shows that steady load never takes free
space to the receiver's watermark and that no purge breaks a rule.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.export import keys
from appliance.export.run import export_month
from appliance.jobs.intake import analyze_paths
from appliance.jobs.purge import run_purge
from appliance.store import retention
from appliance.store.database import counts, open_database, write_transaction
from appliance.web import create_app
from tests.web_helpers import login, make_accounts, web_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import retention_sim  # the bench script is the one implementation of the simulation

pytestmark = pytest.mark.slow  # a real analysis, a real export and 90 simulated days: about a minute

NOW = datetime.datetime.now(datetime.timezone.utc)
LATER = NOW + datetime.timedelta(days=31)


def test_ninety_days_of_steady_load_never_reach_the_watermark_and_break_no_rule(tmp_path):
    result = retention_sim.simulate(tmp_path / "home", days=90, studies_per_day=40, capacity_mb=100)
    assert result.studies == 3600
    assert result.series_purged > 100  # the purge did run, for weeks
    assert result.min_free_bytes > result.watermark_bytes, result
    assert result.violations == []
    assert result.files_on_disk_bytes == result.stored_bytes_end  # what was purged is gone from the disk too


@pytest.fixture
def analysed(tmp_path, synthetic_chest):
    """A data directory with one analysed synthetic study, site keys, and a programme hub to export to."""
    hub_key = keys.encode_public(keys.init_hub_keys(tmp_path / "hub"))
    settings = web_settings(tmp_path, hub_public_key=hub_key, retention_days=30, disk_low_watermark_mb=8,
                            purge_free_target_mb=16)
    analyze_paths([synthetic_chest], settings)
    keys.init_site_keys(settings.home_path)
    make_accounts(settings.home_path)
    return settings


def _series(db) -> dict:
    return next(db.query("SELECT * FROM series"))


def test_nothing_is_purged_before_the_month_is_exported_nor_before_retention_days(analysed, tmp_path):
    db = open_database(analysed.home_path)
    low = lambda: 0  # noqa: E731 - a full disk, so only the rules hold the purge back
    report = run_purge(db, analysed, free_bytes=low, now=LATER)
    assert report.purged == [] and report.skipped_reason.startswith("NOTHING_ELIGIBLE")
    export_month(analysed, NOW.strftime("%Y-%m"), tmp_path / "exports")
    assert run_purge(db, analysed, free_bytes=low, now=NOW + datetime.timedelta(days=29)).purged == []
    assert run_purge(db, analysed, free_bytes=lambda: 10**12, now=LATER).skipped_reason.startswith("ENOUGH_SPACE")
    off = analysed.replace(retention_days=0)
    assert run_purge(db, off, free_bytes=low, now=LATER).skipped_reason.startswith("RETENTION_OFF")
    pacs = analysed.replace(pacs_destinations="PACS@192.0.2.1:104")  # results never sent there
    assert run_purge(db, pacs, free_bytes=low, now=LATER).purged == []
    assert counts(db)["instances"] > 0 and _series(db)["purged_at"] is None


def test_a_purge_removes_the_images_keeps_the_results_and_the_screens_say_so(analysed, tmp_path):
    home = analysed.home_path
    db = open_database(home)
    export_month(analysed, NOW.strftime("%Y-%m"), tmp_path / "exports")
    files = sorted((home / "instances").rglob("*.dcm"))
    size = sum(p.stat().st_size for p in files)
    results_before = counts(db)["results"]
    dry = run_purge(db, analysed, free_bytes=lambda: 0, now=LATER, dry_run=True)
    assert len(dry.purged) == 1 and all(p.exists() for p in files)

    report = run_purge(db, analysed, free_bytes=lambda: 0, now=LATER, actor="test")
    assert len(report.purged) == 1 and report.bytes_freed == size > 0
    assert not any(p.exists() for p in files)
    series = _series(db)
    assert series["purged_at"][:10] == LATER.date().isoformat() and series["purged_instances"] == len(files)
    assert counts(db)["instances"] == 0 and counts(db)["results"] == results_before
    audited = list(db.query("SELECT * FROM audit_log WHERE action = 'images_purged'"))
    assert len(audited) == 1 and json.loads(audited[0]["detail"])["instances"] == len(files)
    artefacts = home / "artefacts" / series["study_instance_uid"] / series["series_instance_uid"]
    assert (artefacts / "viewer.json").is_file() and not (artefacts / "volume-int16.npy").exists()

    client = create_app(analysed, environ={}).test_client()
    login(client, "rad")
    page = client.get(f"/study/{series['study_instance_uid']}").get_data(as_text=True)
    assert f"Images purged on {LATER.date().isoformat()}" in page
    gone = client.get(f"/series/{series['series_instance_uid']}/viewer.json", headers={"Accept": "application/json"})
    assert gone.status_code == 410 and "were purged on" in gone.get_json()["message"]
    assert client.get(f"/series/{series['series_instance_uid']}/slice/0").status_code == 410
    report_page = client.get(f"/study/{series['study_instance_uid']}/report")
    assert report_page.status_code == 200
    pdf = client.get(f"/study/{series['study_instance_uid']}/report.pdf")  # key images drawn in: kept
    assert pdf.status_code == 200 and pdf.data.startswith(b"%PDF")
    assert run_purge(db, analysed, free_bytes=lambda: 0, now=LATER).purged == []  # once is enough
    with write_transaction(db):
        db.execute("UPDATE studies SET synthetic = 0")  # as a patient's study would be
    again = export_month(analysed, NOW.strftime("%Y-%m"), tmp_path / "again", images="all")
    assert again.images == 0  # the key images of purged images are left out: their burned-in text is unknown


def test_appliance_purge_cli_says_what_it_would_remove(analysed, tmp_path):
    export_month(analysed, NOW.strftime("%Y-%m"), tmp_path / "exports")
    db = open_database(analysed.home_path)
    for table, column in (("analyses", "created_at"), ("exports", "finished_at")):  # as if two days went by
        db.execute(f"UPDATE {table} SET {column} = ?", [(NOW - datetime.timedelta(days=2)).isoformat()])  # nosec B608
    env = {**os.environ, "APPLIANCE_HOME": str(analysed.home_path), "APPLIANCE_RETENTION_DAYS": "1",
           "APPLIANCE_DISK_LOW_WATERMARK_MB": "1", "APPLIANCE_PURGE_FREE_TARGET_MB": str(2**40),
           "APPLIANCE_HUB_PUBLIC_KEY": analysed.hub_public_key}
    appliance = [sys.executable, "-m", "appliance.cli"]
    dry = subprocess.run([*appliance, "purge", "--dry-run", "--json"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] and doc["series_purged"] == 1 and counts(db)["instances"] > 0
    done = subprocess.run([*appliance, "purge"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "purged 1 series" in done.stdout, done.stdout + done.stderr
    assert counts(db)["instances"] == 0


def test_purge_target_is_above_the_watermark(analysed):
    assert retention.purge_target_bytes(analysed) == 16 * retention.MIB
    assert retention.purge_target_bytes(analysed.replace(purge_free_target_mb=4)) == 16 * retention.MIB
    assert retention.purge_target_bytes(analysed.replace(purge_free_target_mb=0, disk_low_watermark_mb=100)) == \
        200 * retention.MIB

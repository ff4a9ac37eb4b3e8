"""Synthetic and phantom studies (the first-start sample, any series the phantom writer made) are marked on the
study row and left out of every statistic: the monthly export and what the hub builds from it count real
studies only."""

from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from appliance import config, serve
from appliance.export import bundle, keys
from appliance.export.deid import Pseudonymizer
from appliance.export.run import export_month
from appliance.hub import merge
from appliance.hub.store import HubDB, default_url
from appliance.jobs.intake import import_and_queue
from appliance.jobs.worker import Worker
from appliance.store.database import SAMPLE_SOURCE, SYNTHETIC_SERIES_DESCRIPTION, counts, migrations, open_database
from appliance.synth.writer import SynthOptions, write_series

MONTH = datetime.date.today().strftime("%Y-%m")


def _real_looking(source: Path, out: Path, seed: int) -> str:
    """The phantom rewritten as a scanner would write a patient's series (no phantom marker); its study UID."""
    out.mkdir(parents=True)
    study, series = generate_uid(entropy_srcs=[f"study{seed}"]), generate_uid(entropy_srcs=[f"series{seed}"])
    for n, path in enumerate(sorted(source.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"{seed}/{n}"])
        ds.PatientName, ds.PatientID, ds.Manufacturer = f"DOE^JANE{seed}", f"P{seed}", "ACME"
        ds.SeriesDescription, ds.StudyDescription = "CHEST 1.0 B30f", "CT THORAX"
        ds.save_as(out / path.name, enforce_file_format=True)
    return study


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site that received a phantom series, a real-looking series, and a real-looking series imported as the
    first-start sample; all analysed by the worker."""
    tmp = tmp_path_factory.mktemp("site")
    phantom = tmp / "phantom"
    truth = write_series(phantom, SynthOptions(slices=30, size=128, region="chest", seed=31))
    real = _real_looking(phantom, tmp / "real", 1)
    sample = _real_looking(phantom, tmp / "sample", 2)
    settings = config.load(environ={}, home=str(tmp / "home"), quiet_period_seconds=0.0)
    worker = Worker(settings)
    import_and_queue(worker.store, [phantom], settings)
    import_and_queue(worker.store, [tmp / "real"], settings)
    import_and_queue(worker.store, [tmp / "sample"], settings, source=SAMPLE_SOURCE)
    while worker.run_once():
        pass
    worker.store.db.conn.close()
    keys.init_site_keys(settings.home_path)
    return settings, {"phantom": truth["study_instance_uid"], "real": real, "sample": sample}


def test_phantom_and_sample_studies_are_marked_synthetic(site):
    settings, uids = site
    db = open_database(settings.home_path)
    marked = dict(db.execute("SELECT study_instance_uid, synthetic FROM studies").fetchall())
    assert marked == {uids["phantom"]: 1, uids["real"]: 0, uids["sample"]: 1}
    assert counts(db)["studies"] == 3 and counts(db)["synthetic_studies"] == 2
    assert db.execute("SELECT count(*) FROM analyses").fetchone()[0] == 3, "synthetic studies are still analysed"


def test_the_export_and_the_hub_count_only_the_real_study(site, tmp_path):
    settings, uids = site
    hub_dir = tmp_path / "hub"
    hub_key = keys.encode_public(keys.init_hub_keys(hub_dir))
    settings = settings.replace(hub_public_key=hub_key)
    result = export_month(settings, MONTH, tmp_path / "stick")
    assert result.studies == 1
    opened = bundle.open_bundle(result.path.read_bytes(), keys.site_public_key(settings.home_path),
                                keys.hub_private_key(hub_dir))
    pseudo = Pseudonymizer(keys.pseudonym_secret(settings.home_path))
    rows = list(csv.DictReader(io.StringIO(opened.members["results.csv"].decode())))
    assert rows and {r["study"] for r in rows} == {pseudo.uid(uids["real"])}
    stats = json.loads(opened.members["statistics.json"])
    assert stats["studies_received"] == 1 and stats["synthetic_studies_left_out"] == 2
    assert stats["instances_received"] == 30 and stats["series_analysed"] == 1
    assert stats["turnaround_seconds"]["count"] == 1
    fhir = json.loads(opened.members["results.fhir.json"])
    assert [e["resource"]["resourceType"] for e in fhir["entry"]].count("ImagingStudy") == 1
    hub = HubDB(default_url(hub_dir))
    try:
        merge.add_site(hub, keys.encode_public(keys.site_public_key(settings.home_path)), "Clinic S")
        merge.import_bundle(hub, hub_dir, result.path)
        received = hub.rows("SELECT value FROM stats WHERE name = 'studies_received'")
        assert [int(r["value"]) for r in received] == [1]
        assert {r["study"] for r in hub.rows("SELECT DISTINCT study FROM results")} == {pseudo.uid(uids["real"])}
    finally:
        hub.close()


def test_the_first_start_sample_is_synthetic(tmp_path):
    settings = config.load(environ={}, home=str(tmp_path / "home"))
    assert serve.queue_sample(settings) == 1
    db = open_database(settings.home_path)
    assert db.execute("SELECT synthetic FROM studies").fetchall() == [(1,)]
    descriptions = {pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription
                    for p in serve.ensure_sample(settings).glob("*.dcm")}
    assert descriptions == {SYNTHETIC_SERIES_DESCRIPTION}


def test_the_migration_marks_studies_stored_before_it(site, tmp_path):
    settings, uids = site
    db = open_database(settings.home_path)
    db.execute("ALTER TABLE studies DROP COLUMN synthetic")
    db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm010_synthetic_studies'")
    migrations.apply(db)
    marked = dict(db.execute("SELECT study_instance_uid, synthetic FROM studies").fetchall())
    assert marked == {uids["phantom"]: 1, uids["real"]: 0, uids["sample"]: 1}

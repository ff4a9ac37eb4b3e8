"""Monthly export and the hub: same counts and flags at both ends, de-identification (canary), signatures,
encryption, refusals, supersession, kill -9 during an export, PostgreSQL at the hub."""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from appliance import config
from appliance.export import bundle, content, keys
from appliance.export.deid import Pseudonymizer, profile_keywords
from appliance.export.run import export_month
from appliance.hub import merge, report
from appliance.hub.store import HubDB, default_url
from appliance.ingest.importer import import_paths
from appliance.jobs.worker import Worker
from tests.conftest import CT
from tests.postgres import start_or_skip

MONTH = datetime.date.today().strftime("%Y-%m")
CANARY = "CANARY7"
UID_MARKER = "424242424242"
TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"}


def _analyse(settings: config.Settings, folders: list[Path]) -> None:
    """Import and analyse as the appliance does (worker: results, SR, key images, report)."""
    worker = Worker(settings)
    for folder in folders:
        import_paths(worker.store, [folder], settings)
    while worker.run_once():
        pass
    worker.store.db.conn.close()


def _hub(tmp: Path, site_home: Path, url: str | None = None) -> tuple[Path, HubDB, str]:
    hub_dir = tmp / "hub"
    hub_public = keys.init_hub_keys(hub_dir)
    db = HubDB(url or default_url(hub_dir))
    merge.add_site(db, keys.encode_public(keys.site_public_key(site_home)), "Clinic A")
    return hub_dir, db, keys.encode_public(hub_public)


@pytest.fixture(scope="module")
def site(tmp_path_factory, synthetic_chest):
    """A site that received a real chest-abdomen CT and a synthetic study (left out of the export) this month,
    with keys."""
    tmp = tmp_path_factory.mktemp("site")
    settings = config.load(environ={}, home=str(tmp / "home"), quiet_period_seconds=0.0)
    folders = [synthetic_chest]
    if (CT / "tcia-pancreas-ct-chest-abdomen").exists():
        folders.append(CT / "tcia-pancreas-ct-chest-abdomen")
    _analyse(settings, folders)
    keys.init_site_keys(settings.home_path)
    return settings


@pytest.fixture
def hub(tmp_path, site):
    hub_dir, db, hub_key = _hub(tmp_path, site.home_path)
    yield hub_dir, db, site.replace(hub_public_key=hub_key)
    db.close()


def _appliance_results(settings: config.Settings) -> list[tuple]:
    from appliance.store.database import open_database

    db = open_database(settings.home_path)
    try:
        return sorted(db.execute(  # the synthetic study is in no export
            "SELECT r.model, r.flagged, r.score FROM results r JOIN analyses a ON a.id = r.analysis_id "
            "JOIN studies st ON st.study_instance_uid = a.study_instance_uid "
            "WHERE a.superseded = 0 AND st.synthetic = 0").fetchall())
    finally:
        db.conn.close()


def _hub_results(db: HubDB) -> list[tuple]:
    return sorted((r["model"], r["flagged"], r["score"]) for r in db.rows("SELECT model, flagged, score FROM results"))


def _open(hub_dir: Path, site: config.Settings, path: Path) -> bundle.Opened:
    return bundle.open_bundle(path.read_bytes(), keys.site_public_key(site.home_path), keys.hub_private_key(hub_dir))


def test_export_imported_at_the_hub_gives_the_same_counts_and_flags(hub, tmp_path):
    hub_dir, db, settings = hub
    result = export_month(settings, MONTH, tmp_path / "stick")
    assert result.path.is_file() and not list(result.path.parent.glob(".*.partial"))
    summary = merge.import_bundle(db, hub_dir, result.path)
    assert summary["results"] == result.results == len(_appliance_results(settings))
    assert [(m, f) for m, f, _ in _hub_results(db)] == [(m, f) for m, f, _ in _appliance_results(settings)]
    for (_, _, hub_score), (_, _, site_score) in zip(_hub_results(db), _appliance_results(settings)):
        assert hub_score == pytest.approx(site_score)
    opened = _open(hub_dir, settings, result.path)
    fhir = json.loads(opened.members["results.fhir.json"])
    kinds = [e["resource"]["resourceType"] for e in fhir["entry"]]
    assert fhir["resourceType"] == "Bundle" and kinds.count("Observation") == result.results
    assert kinds.count("ImagingStudy") == kinds.count("DiagnosticReport") == result.studies
    assert content.validate_fhir(fhir) == fhir  # FHIR R4 (4.0.1) models accept it as it is
    assert all(isinstance(e["resource"]["modality"], list) for e in fhir["entry"]  # R4: Coding, not R5's concept
               if e["resource"]["resourceType"] == "ImagingStudy")
    urls = {e["fullUrl"] for e in fhir["entry"]}
    for entry in fhir["entry"]:
        for ref in entry["resource"].get("result", []) + entry["resource"].get("derivedFrom", []):
            assert ref["reference"] in urls  # every reference resolves inside the Bundle
    stats = json.loads(opened.members["statistics.json"])
    assert stats["studies_received"] == result.studies and stats["turnaround_seconds"]["count"] >= 1
    inventory = json.loads(opened.members["inventory.json"])
    assert {m["id"] for m in inventory["models"]} >= {"chest-covid19", "abdomen-pancreas"}
    paths = report.write_report(db, tmp_path / "report")
    page = paths[0].read_text()
    assert "Clinic A" in page and "chest-covid19" in page and "<svg" in page and "http" not in page.split("<svg")[0]
    volumes = list(csv.DictReader((tmp_path / "report" / "volumes.csv").open()))
    assert int(volumes[0]["studies"]) == result.studies


def test_same_bundle_twice_adds_nothing_and_a_corrected_reexport_supersedes(hub, tmp_path):
    hub_dir, db, settings = hub
    first = export_month(settings, MONTH, tmp_path / "stick")
    merge.import_bundle(db, hub_dir, first.path)
    count = len(_hub_results(db))
    with pytest.raises(bundle.BundleRefused) as refused:
        merge.import_bundle(db, hub_dir, first.path)
    assert refused.value.reason_code == "REPLAYED" and len(_hub_results(db)) == count
    again = export_month(settings, MONTH, tmp_path / "stick")
    assert again.reused and again.path == first.path  # nothing changed: no second bundle
    _review_one(settings, "confirmed")
    corrected = export_month(settings, MONTH, tmp_path / "stick")
    assert corrected.revision == first.revision + 1 and not corrected.reused
    summary = merge.import_bundle(db, hub_dir, corrected.path)
    assert summary["superseded"] and len(_hub_results(db)) == count
    assert db.rows("SELECT count(*) AS n FROM results WHERE review = 'confirmed'")[0]["n"] == 1
    assert {r["revision"] for r in db.rows("SELECT revision FROM results")} == {corrected.revision}
    shutil.copy(first.path, tmp_path / "old.ctx")
    with pytest.raises(bundle.BundleRefused) as stale:  # the older revision cannot come back
        merge.import_bundle(db, hub_dir, tmp_path / "old.ctx")
    assert stale.value.reason_code in ("REPLAYED", "STALE")


def _review_one(settings: config.Settings, decision: str) -> None:
    from appliance.store.database import open_database, utcnow, write_transaction

    db = open_database(settings.home_path)
    with write_transaction(db):
        rid, series, model, study = db.execute(
            "SELECT r.id, r.series_instance_uid, r.model, s.study_instance_uid FROM results r JOIN series s "
            "ON s.series_instance_uid = r.series_instance_uid JOIN studies st ON st.study_instance_uid = "
            "s.study_instance_uid WHERE st.synthetic = 0 ORDER BY r.id DESC LIMIT 1").fetchone()
        db.table("reviews").insert({"result_id": rid, "study_instance_uid": study, "series_instance_uid": series,
                              "model": model, "decision": decision, "comment": "", "reviewer": "rad", "at": utcnow()})
    db.conn.close()


def test_flipping_any_byte_or_truncating_is_refused_and_nothing_is_merged(hub, tmp_path):
    hub_dir, db, settings = hub
    path = export_month(settings, MONTH, tmp_path / "stick").path
    data = path.read_bytes()
    header_end = len(bundle.MAGIC) + 4 + int.from_bytes(data[8:12], "big")
    rng = random.Random(7)
    positions = {0, 5, 9, 12, 20, header_end - 1, header_end, header_end + 1, len(data) // 2, len(data) - 65,
                 len(data) - 64, len(data) - 1} | {rng.randrange(len(data)) for _ in range(40)}
    bad = tmp_path / "bad.ctx"
    codes = set()
    for position in sorted(positions):
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        bad.write_bytes(bytes(damaged))
        with pytest.raises(bundle.BundleRefused) as refused:
            merge.import_bundle(db, hub_dir, bad)
        codes.add(refused.value.reason_code)
    for length in (0, 7, 40, header_end, len(data) - 1):
        bad.write_bytes(data[:length])
        with pytest.raises(bundle.BundleRefused) as refused:
            merge.import_bundle(db, hub_dir, bad)
        codes.add(refused.value.reason_code)
    assert codes <= {"NOT_A_BUNDLE", "TRUNCATED", "TAMPERED", "UNKNOWN_SITE", "WRONG_SITE_KEY"}
    assert db.rows("SELECT count(*) AS n FROM results")[0]["n"] == 0
    assert db.rows("SELECT count(*) AS n FROM bundles")[0]["n"] == 0
    merge.import_bundle(db, hub_dir, path)  # the intact bundle still merges


def _broken(doc: dict, kind: str, change) -> dict:
    doc = json.loads(json.dumps(doc))
    change(next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == kind))
    return doc


def test_fhir_r4_validation_refuses_what_r4_does_not_accept():
    from appliance.hub import generate

    rows = generate.month_rows(random.Random(5), "2026-03", 12)
    doc = content.fhir_bundle(rows, "site-a", "2026-03")
    assert content.validate_fhir(doc) is doc
    bad = {
        "R5 modality": _broken(doc, "ImagingStudy", lambda r: r.update(modality=[{"coding": r["modality"]}])),
        "no status": _broken(doc, "Observation", lambda r: r.pop("status")),
        "unknown element": _broken(doc, "DiagnosticReport", lambda r: r.update(aiScore=1)),
        "bad date": _broken(doc, "ImagingStudy", lambda r: r.update(started="15/03/2026")),
        "text for a number": _broken(doc, "ImagingStudy", lambda r: r.update(numberOfSeries="2")),
        "dangling reference": _broken(doc, "DiagnosticReport", lambda r: r["result"].append({"reference": "urn:x"})),
        "same fullUrl twice": {**doc, "entry": doc["entry"] + doc["entry"][:1]},
    }
    for what, broken in bad.items():
        with pytest.raises(content.FhirInvalid) as refused:
            content.validate_fhir(broken)
        assert refused.value.reason_code == "FHIR_INVALID", what


def test_an_export_whose_fhir_does_not_validate_stops_with_a_reason(hub, tmp_path, monkeypatch):
    _hub_dir, _db, settings = hub
    made = content.fhir_bundle
    monkeypatch.setattr(content, "fhir_bundle", lambda *a: _broken(made(*a), "Observation", lambda r: r.pop("code")))
    with pytest.raises(content.FhirInvalid, match="FHIR_INVALID"):
        export_month(settings, MONTH, tmp_path / "stick")
    assert not list((tmp_path / "stick").glob("*.ctx"))


def test_wrong_keys_and_future_dates_are_refused(hub, tmp_path):
    hub_dir, db, settings = hub
    other_hub = keys.encode_public(keys.init_hub_keys(tmp_path / "other-hub"))
    sealed_elsewhere = export_month(settings.replace(hub_public_key=other_hub), MONTH, tmp_path / "a").path
    with pytest.raises(bundle.BundleRefused) as refused:
        merge.import_bundle(db, hub_dir, sealed_elsewhere)
    assert refused.value.reason_code == "WRONG_HUB_KEY"
    # another appliance claiming this site's id, signing with its own key
    impostor = settings.replace(home=str(tmp_path / "impostor"), site_id=merge_site_id(db))
    shutil.copytree(settings.home_path, impostor.home_path, ignore=shutil.ignore_patterns("keys"))
    keys.init_site_keys(impostor.home_path)
    forged = export_month(impostor, MONTH, tmp_path / "b").path
    with pytest.raises(bundle.BundleRefused) as refused:
        merge.import_bundle(db, hub_dir, forged)
    assert refused.value.reason_code == "WRONG_SITE_KEY"
    unknown = settings.replace(home=str(tmp_path / "unknown"))
    shutil.copytree(settings.home_path, unknown.home_path, ignore=shutil.ignore_patterns("keys"))
    keys.init_site_keys(unknown.home_path)
    with pytest.raises(bundle.BundleRefused) as refused:
        merge.import_bundle(db, hub_dir, export_month(unknown, MONTH, tmp_path / "c").path)
    assert refused.value.reason_code == "UNKNOWN_SITE"
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=40)
    dated = export_month(settings, f"{future:%Y-%m}", tmp_path / "d", now=future).path
    with pytest.raises(bundle.BundleRefused) as refused:
        merge.import_bundle(db, hub_dir, dated)
    assert refused.value.reason_code == "FUTURE_DATED"
    assert db.rows("SELECT count(*) AS n FROM bundles")[0]["n"] == 0


def merge_site_id(db: HubDB) -> str:
    return db.rows("SELECT site_id FROM sites")[0]["site_id"]


def test_keys_are_private_and_kept(tmp_path):
    home = tmp_path / "home"
    first = keys.init_site_keys(home)
    assert keys.encode_public(keys.init_site_keys(home)) == keys.encode_public(first)
    for name in (keys.SIGNING_KEY, keys.PSEUDONYM_SECRET):
        assert (home / keys.KEYS_DIR / name).stat().st_mode & 0o777 == 0o600
    os.chmod(home / keys.KEYS_DIR / keys.SIGNING_KEY, 0o644)
    with pytest.raises(keys.KeyProblem):
        keys.signing_key(home)


def test_pseudonyms_are_consistent_and_keyed():
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    assert a.patient("k1") == a.patient("k1") != a.patient("k2") and a.patient("k1") != b.patient("k1")
    assert a.uid("1.2.3") == a.uid("1.2.3") and a.uid("1.2.3").startswith("2.25.") and len(a.uid("1.2.3")) <= 64
    shift = a.day_shift("k1")
    assert 1 <= shift <= 365
    moved = a.shift_date("20260115-20260220", "k1")
    first, second = (datetime.datetime.strptime(d, "%Y%m%d") for d in moved.split("-"))
    assert (datetime.datetime(2026, 1, 15) - first).days == shift and (second - first).days == 36
    assert a.shift_date("20260115101500.5", "k1").endswith("101500.5")


def _canary_series(source: Path, out: Path) -> None:
    """The synthetic series with a canary in every text attribute the profile lists, canary UIDs, a
    canary in a sequence item and in a private attribute."""
    out.mkdir()
    uids = {kw: f"1.2.826.0.1.3680043.9.7.{UID_MARKER}.{n}" for n, kw in enumerate(
        ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"), start=1)}
    for n, path in enumerate(sorted(source.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        for keyword in profile_keywords():
            vr = dictionary_VR(tag_for_keyword(keyword))
            if vr in TEXT_VRS:
                setattr(ds, keyword, CANARY if vr in ("CS", "AE") else f"{CANARY} {keyword}")
            elif vr == "SQ":
                item = Dataset()
                item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "99X", f"{CANARY} item"
                setattr(ds, keyword, [item])
        ds.BurnedInAnnotation = "NO"
        for keyword, uid in uids.items():
            setattr(ds, keyword, uid)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.9.7.{UID_MARKER}.9.{n}"
        block = ds.private_block(0x0011, "CANARY CREATOR", create=True)
        block.add_new(0x01, "LO", f"{CANARY} private")
        ds.save_as(out / path.name, enforce_file_format=True)


def test_canary_every_profile_attribute_leaves_no_trace_in_the_bundle(tmp_path, synthetic_chest):
    settings = config.load(environ={}, home=str(tmp_path / "home"), quiet_period_seconds=0.0)
    series = tmp_path / "canary"
    _canary_series(synthetic_chest, series)
    original = pydicom.dcmread(next(series.glob("*.dcm")))
    _analyse(settings, [series])
    keys.init_site_keys(settings.home_path)
    hub_dir, db, hub_key = _hub(tmp_path, settings.home_path)
    result = export_month(settings.replace(hub_public_key=hub_key), MONTH, tmp_path / "stick", images="all")
    assert result.images >= 1 and result.results >= 1
    opened = _open(hub_dir, settings, result.path)
    everything = [result.path.read_bytes()] + list(opened.members.values())
    for blob in everything:
        assert CANARY.encode() not in blob.upper() and UID_MARKER.encode() not in blob
        assert original.PatientName.family_name.encode() not in blob
    image = pydicom.dcmread(io.BytesIO(next(v for k, v in opened.members.items() if k.startswith("images/"))))
    assert image.PatientIdentityRemoved == "YES" and image.LongitudinalTemporalInformationModified == "MODIFIED"
    shift = (datetime.datetime.strptime(original.StudyDate, "%Y%m%d")
             - datetime.datetime.strptime(image.StudyDate, "%Y%m%d")).days
    assert 1 <= shift <= 365
    assert not any(elem.tag.is_private for elem in image.iterall())
    merge.import_bundle(db, hub_dir, result.path)
    db.close()


def test_kill_9_during_export_then_rerun_gives_one_valid_bundle(hub, tmp_path):
    hub_dir, db, settings = hub
    out = tmp_path / "stick"
    env = {**os.environ, "APPLIANCE_HOME": str(settings.home_path), "APPLIANCE_HUB_PUBLIC_KEY": settings.hub_public_key,
           "APPLIANCE_QUIET_PERIOD_SECONDS": "0"}
    command = [sys.executable, "-m", "appliance.cli", "export", "--month", MONTH, "--out", str(out), "--images", "all"]
    t0 = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)  # how long one takes here
    duration = time.perf_counter() - t0
    for path in out.glob("*.ctx"):
        path.unlink()  # as if that stick was lost: the next runs must write the month again
    rng = random.Random(3)
    for _ in range(4):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "SAFE TO REMOVE" in done.stdout
    bundles = list(out.glob("*.ctx"))
    assert len(bundles) == 1 and not list(out.glob(".*"))
    merge.import_bundle(db, hub_dir, bundles[0])


def test_hub_on_postgresql(site, tmp_path):
    import tempfile

    pg_root = Path(tempfile.mkdtemp(prefix="hub-pg-"))  # outside pytest's 0700 folders: the server runs as postgres
    url, stop = start_or_skip(pg_root)
    try:
        hub_dir, db, hub_key = _hub(tmp_path, site.home_path, url)
        settings = site.replace(hub_public_key=hub_key)
        result = export_month(settings, MONTH, tmp_path / "stick")
        summary = merge.import_bundle(db, hub_dir, result.path)
        assert summary["results"] == len(_appliance_results(settings))
        assert [(m, f) for m, f, _ in _hub_results(db)] == [(m, f) for m, f, _ in _appliance_results(settings)]
        with pytest.raises(bundle.BundleRefused):
            merge.import_bundle(db, hub_dir, result.path)
        assert db.rows("SELECT count(*) AS n FROM bundles")[0]["n"] == 1
        assert "Clinic A" in report.write_report(db, tmp_path / "report")[0].read_text()
        db.close()
    finally:
        stop()
        shutil.rmtree(pg_root, ignore_errors=True)


def test_admin_writes_an_export_from_the_ui(hub, tmp_path):
    from appliance.web import create_app
    from tests.web_helpers import csrf, login, make_accounts

    _hub_dir, _db, settings = hub
    settings = settings.replace(export_dir=str(tmp_path / "exports"))
    if not list((settings.home_path).glob("appliance.sqlite")):
        pytest.skip("no site database")
    from appliance.store import users
    from appliance.store.database import open_database

    site_db = open_database(settings.home_path)
    if not users.has_users(site_db):
        make_accounts(settings.home_path)
    site_db.conn.close()
    client = create_app(settings, environ={}).test_client()
    login(client, "admin")
    page = client.get("/admin/").get_data(as_text=True)
    assert keys.fingerprint(keys.site_public_key(settings.home_path)) in page
    token = csrf(client, "/admin/")
    done = client.post("/admin/export", data={"month": MONTH, "csrf_token": token}, follow_redirects=True)
    assert "written and verified" in done.get_data(as_text=True)
    assert list((tmp_path / "exports").glob("*.ctx"))
    assert MONTH in client.get("/admin/").get_data(as_text=True)


def test_the_commands_end_to_end(site, tmp_path):
    env = {**os.environ, "APPLIANCE_HOME": str(site.home_path)}

    def appliance(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "appliance.cli", *args], env={**env, **extra},
                              capture_output=True, text=True)

    hub_dir = str(tmp_path / "hub")
    shown = appliance("keys", "show")
    assert shown.returncode == 0 and "fingerprint" in shown.stdout
    site_key = shown.stdout.strip().splitlines()[-1].rsplit(": ", 1)[1]
    hub_key = appliance("hub", "init", "--hub", hub_dir).stdout.strip().splitlines()[-1].rsplit(": ", 1)[1]
    assert appliance("hub", "add-site", site_key, "--name", "Clinic B", "--hub", hub_dir).returncode == 0
    no_key = appliance("export", "--month", MONTH, "--out", str(tmp_path / "x"))
    assert no_key.returncode == 1 and "NO_HUB_KEY" in no_key.stderr
    done = appliance("export", "--month", MONTH, "--out", str(tmp_path / "stick"), APPLIANCE_HUB_PUBLIC_KEY=hub_key)
    assert done.returncode == 0 and "SAFE TO REMOVE" in done.stdout, done.stderr
    path = str(next((tmp_path / "stick").glob("*.ctx")))
    merged = appliance("hub", "import", path, "--hub", hub_dir)
    assert merged.returncode == 0 and "merged" in merged.stdout
    again = appliance("hub", "import", path, "--hub", hub_dir)
    assert again.returncode == 1 and "REPLAYED" in again.stdout
    report_run = appliance("hub", "report", "--hub", hub_dir)
    assert report_run.returncode == 0 and (Path(hub_dir) / "report" / "report.html").is_file()


def test_the_audit_summary_counts_the_events_a_row_stands_for(tmp_path):
    from appliance.export.content import audit_summary
    from appliance.store.database import audit, open_database, write_transaction

    db = open_database(tmp_path / "home")
    with write_transaction(db):
        audit(db, "dicom", "dicom_association_refused", "INTRUDER@127.0.0.3", count=199)
        audit(db, "dicom", "dicom_association_refused", "INTRUDER@127.0.0.3", count=1)
        audit(db, "amina", "login")
    month = db.execute("SELECT substr(at, 1, 7) FROM audit_log").fetchone()[0]
    assert audit_summary(db, month) == {"dicom_association_refused": 200, "login": 1}

"""Recalls and outcomes: a confirmed flag puts the patient on the recall list, a rejected one cancels it;
an overdue recall stands out on the worklist; technicians and radiologists record coded outcomes; the
outcome travels de-identified to the hub, whose table gives the PPV with its Wilson interval."""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import pydicom
import pytest

from appliance.export import bundle, keys
from appliance.export.run import export_month
from appliance.hub import merge, report
from appliance.hub.store import HubDB, default_url
from appliance.jobs.intake import analyze_paths
from appliance.metrics import wilson_interval
from appliance.store import recalls
from appliance.store.database import open_database, utcnow, write_transaction
from appliance.web import create_app
from tests.web_helpers import csrf, login, make_accounts, web_settings
from tests.web_helpers import rows as _rows

pytestmark = pytest.mark.slow
COVID = "chest-covid19"
PATIENT_NAME, PATIENT_ID = "RECALLCANARY^JANE", "PIDCANARY77"
DETAIL = "DETAILCANARY adenocarcinoma at St John's, Dr Smith"
MONTH = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m")


def _patient_series(source: Path, out: Path) -> None:
    """The synthetic series as a patient's chest CT (not marked synthetic, so it is exported), named."""
    out.mkdir()
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.SeriesDescription = PATIENT_NAME, PATIENT_ID, "CHEST CT"
        ds.save_as(out / path.name, enforce_file_format=True)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, synthetic_chest) -> Path:
    """A data directory with one patient's chest CT that the classifier flags (site threshold 0.01)."""
    tmp = tmp_path_factory.mktemp("recall-site")
    settings = web_settings(tmp)
    make_accounts(settings.home_path)
    db = open_database(settings.home_path)
    with write_transaction(db):
        db.table("operating_points").insert({"model": COVID, "model_version": "1.0.0", "threshold": 0.01,
                                             "target_sensitivity": 0.9, "evaluation": "{}", "recorded_by": "test",
                                             "recorded_at": utcnow()})
    db.conn.close()
    _patient_series(synthetic_chest, tmp / "patient")
    analyze_paths([tmp / "patient"], settings)
    return settings.home_path


@pytest.fixture
def site(analysed, tmp_path):
    """A fresh copy of the analysed site, and a web app over it."""
    home = tmp_path / "home"
    shutil.copytree(analysed, home, ignore=shutil.ignore_patterns("*.lock"))
    settings = web_settings(tmp_path)
    return settings, create_app(settings, environ={})


def _flag(home: Path) -> dict:
    return _rows(home, "SELECT r.id, a.study_instance_uid FROM results r JOIN analyses a ON a.id = r.analysis_id "
                       "WHERE a.superseded = 0 AND r.model = ? AND r.flagged = 1", [COVID])[0]


def _client(app, name: str):
    client = app.test_client()
    login(client, name)
    return client


def _review(client, uid: str, result_id: int, decision: str):
    token = csrf(client, f"/study/{uid}")
    return client.post(f"/study/{uid}/review", data={"result_id": result_id, "decision": decision,
                                                     "csrf_token": token})


def _outcome(client, recall_id: int, outcome: str, detail: str = "", token: str | None = None):
    token = csrf(client, "/recalls") if token is None else token
    return client.post(f"/recalls/{recall_id}/outcome", data={"outcome": outcome, "detail": detail,
                                                              "csrf_token": token})


def _confirmed(site) -> tuple[dict, dict]:
    settings, app = site
    flag = _flag(settings.home_path)
    assert _review(_client(app, "rad"), flag["study_instance_uid"], flag["id"], "confirmed").status_code == 302
    return flag, _rows(settings.home_path, "SELECT * FROM recalls")[0]


def test_a_confirmed_flag_opens_a_recall_due_in_recall_due_days_and_a_rejection_cancels_it(site):
    settings, app = site
    home = settings.home_path
    flag, recall = _confirmed(site)
    due = recalls.today() + datetime.timedelta(days=settings.recall_due_days)
    assert (recall["study_instance_uid"], recall["result_id"], recall["model"]) == (
        flag["study_instance_uid"], flag["id"], COVID)
    assert recall["due_date"] == due.isoformat() and recall["closed_at"] is None
    tech = _client(app, "tech")
    page = tech.get(f"/study/{flag['study_instance_uid']}").get_data(as_text=True)
    assert f"recall due on {due.isoformat()}" in page and 'data-outcome-form="' in page
    listing = tech.get("/recalls").get_data(as_text=True)
    assert f'data-recall-id="{recall["id"]}"' in listing and "RECALLCANARY" in listing
    # a second confirmation keeps the one open recall; a rejection cancels it, audited
    rad = _client(app, "rad")
    _review(rad, flag["study_instance_uid"], flag["id"], "confirmed")
    assert len(_rows(home, "SELECT * FROM recalls")) == 1
    _review(rad, flag["study_instance_uid"], flag["id"], "rejected")
    closed = _rows(home, "SELECT * FROM recalls")[0]
    assert closed["closed_at"] and closed["closed_reason"] == "flag rejected"
    assert "No open recall." in tech.get("/recalls").get_data(as_text=True)
    assert "the flag was rejected" in tech.get(f"/study/{flag['study_instance_uid']}").get_data(as_text=True)
    actions = [r["action"] for r in _rows(home, "SELECT action FROM audit_log WHERE action LIKE 'recall%' "
                                                "ORDER BY id")]
    assert actions == ["recall_opened", "recall_closed"]


def test_an_overdue_recall_stands_out_on_the_worklist_and_its_filter(site):
    settings, app = site
    flag, recall = _confirmed(site)
    tech = _client(app, "tech")
    assert "recall overdue since" not in tech.get("/").get_data(as_text=True)
    assert "0 studies" in tech.get("/?recall=overdue").get_data(as_text=True)
    past = (recalls.today() - datetime.timedelta(days=3)).isoformat()
    db = open_database(settings.home_path)
    with write_transaction(db):
        db.execute("UPDATE recalls SET due_date = ? WHERE id = ?", [past, recall["id"]])
    db.conn.close()
    page = tech.get("/?recall=overdue").get_data(as_text=True)
    row = re.search(rf'<tr data-study="{re.escape(flag["study_instance_uid"])}"[^>]*>.*?</tr>', page, re.DOTALL)
    assert "1 studies" in page and row and f"recall overdue since {past}" in row.group(0)
    assert 'name="recall" value="overdue" data-filter-recall checked' in page
    listing = tech.get("/recalls").get_data(as_text=True)
    assert f"recall overdue since {past}" in listing


def test_technician_and_radiologist_record_coded_outcomes_others_may_not(site):
    settings, app = site
    home = settings.home_path
    recall = _confirmed(site)[1]
    admin = _client(app, "admin")
    assert _outcome(admin, recall["id"], "biopsy").status_code == 403
    anonymous = app.test_client()
    assert _outcome(anonymous, recall["id"], "biopsy", token="").status_code in (302, 400)
    tech = _client(app, "tech")
    assert _outcome(tech, recall["id"], "biopsy", token="").status_code == 400  # no CSRF token
    assert _outcome(tech, recall["id"], "cured-by-magic").status_code == 400
    assert _outcome(tech, 10**6, "biopsy").status_code == 404
    assert _rows(home, "SELECT * FROM outcomes") == []
    assert _outcome(tech, recall["id"], "biopsy", "sample taken").status_code == 302
    assert _rows(home, "SELECT closed_at FROM recalls")[0]["closed_at"] is None  # a biopsy is not an end
    rad = _client(app, "rad")
    assert _outcome(rad, recall["id"], "malignant", DETAIL).status_code == 302
    outcomes = _rows(home, "SELECT code, system, display, detail, recorded_by FROM outcomes ORDER BY id")
    assert [(o["code"], o["system"], o["recorded_by"]) for o in outcomes] == [
        ("86273004", recalls.SNOMED, "tech"), ("363346000", recalls.SNOMED, "rad")]
    assert _rows(home, "SELECT closed_reason FROM recalls")[0]["closed_reason"] == "outcome"
    response = _outcome(tech, recall["id"], "lost")
    assert response.status_code == 302 and len(_rows(home, "SELECT * FROM outcomes")) == 2
    assert "already closed" in tech.get("/recalls").get_data(as_text=True)
    page = tech.get(f"/study/{recall['study_instance_uid']}").get_data(as_text=True)
    assert "Malignant neoplastic disease" in page and "recall closed on" in page
    actions = [r["action"] for r in _rows(home, "SELECT action FROM audit_log WHERE action IN "
                                                "('outcome_recorded', 'recall_closed') ORDER BY id")]
    assert actions == ["outcome_recorded", "outcome_recorded", "recall_closed"]


def test_the_wilson_interval_matches_published_values():
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(1, 1)
    assert round(low, 4) == 0.2065 and high == 1.0
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(5, 10)
    assert round(low, 4) == 0.2366 and round(high, 4) == 0.7634


def test_an_outcome_travels_deidentified_and_the_hub_reports_its_ppv(site, tmp_path):
    settings, app = site
    home = settings.home_path
    recall = _confirmed(site)[1]
    tech = _client(app, "tech")
    _outcome(tech, recall["id"], "biopsy", DETAIL)
    _outcome(tech, recall["id"], "malignant", DETAIL)
    keys.init_site_keys(home)
    hub_dir = tmp_path / "hub"
    hub_key = keys.encode_public(keys.init_hub_keys(hub_dir))
    db = HubDB(default_url(hub_dir))
    merge.add_site(db, keys.encode_public(keys.site_public_key(home)), "Clinic A")
    result = export_month(settings.replace(hub_public_key=hub_key), MONTH, tmp_path / "stick")
    opened = bundle.open_bundle(result.path.read_bytes(), keys.site_public_key(home), keys.hub_private_key(hub_dir))
    for blob in [result.path.read_bytes(), *opened.members.values()]:
        for canary in (b"RECALLCANARY", PATIENT_ID.encode(), b"DETAILCANARY", b"Smith"):
            assert canary not in blob
    rows = opened.members["recalls.csv"].decode().splitlines()
    assert rows[0].split(",")[:6] == ["study", "patient", "model", "model_version", "screened_month", "state"]
    assert len(rows) == 2 and ",closed,363346000,http://snomed.info/sct," in rows[1]
    fhir = json.loads(opened.members["results.fhir.json"])
    outcome = [e["resource"] for e in fhir["entry"] if e["resource"].get("valueCodeableConcept")]
    assert outcome[0]["valueCodeableConcept"]["coding"][0]["code"] == "363346000"
    assert outcome[0]["derivedFrom"][0]["reference"] in {e["fullUrl"] for e in fhir["entry"]}
    merge.import_bundle(db, hub_dir, result.path)
    table = [r for r in report.outcome_rates(db) if r["model"] == COVID]
    assert len(table) == 1
    row = table[0]
    assert (row["month"], row["screened"], row["recalls"], row["diagnosed"], row["malignant"]) == (MONTH, 1, 1, 1, 1)
    assert (row["ppv_value"], row["ppv_ci_low"], row["ppv_ci_high"]) == (1.0, 0.2065, 1.0)
    assert (row["recall_rate_value"], row["detection_per_1000_value"]) == (1.0, 1000.0)
    out = report.write_report(db, tmp_path / "report")
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["outcomes"] == json.loads(json.dumps(report.outcome_rates(db)))
    assert "positive predictive value" in out[0].read_text().lower()
    db.close()


def test_the_hub_keeps_the_latest_row_of_each_recall_and_leaves_cancelled_ones_out(tmp_path):
    """An outcome recorded in a later month arrives in that month's bundle and replaces the recall's earlier
    row; a recall cancelled later counts as none; an open recall is in no PPV denominator."""
    db = HubDB(default_url(tmp_path))
    columns = ("site_id, month, revision, study, patient, model, model_version, screened_month, state, "
               "outcome_code, outcome_system, diagnosis, malignant, days_to_outcome")
    rows = [("s1", "2026-01", 1, "st1", "p1", COVID, "1", "2026-01", "open", None, None, 0, 0, None),
            ("s1", "2026-02", 1, "st1", "p1", COVID, "1", "2026-01", "closed", "363346000", recalls.SNOMED, 1, 1, 30.0),
            ("s1", "2026-01", 1, "st2", "p2", COVID, "1", "2026-01", "open", None, None, 0, 0, None),
            ("s1", "2026-03", 1, "st2", "p2", COVID, "1", "2026-01", "cancelled", None, None, 0, 0, None),
            ("s1", "2026-01", 1, "st3", "p3", COVID, "1", "2026-01", "open", None, None, 0, 0, None)]
    with db.transaction():
        for row in rows:
            db.execute(f"INSERT INTO recalls ({columns}) VALUES ({', '.join('?' * len(row))})", row)  # nosec B608
        for n in range(10):
            db.execute("INSERT INTO results (site_id, month, revision, study, patient, series, model, flagged) "
                       "VALUES (?, ?, 1, ?, ?, ?, ?, 0)", ["s1", "2026-01", f"st{n}", f"p{n}", f"se{n}", COVID])
    (row,) = report.outcome_rates(db)
    assert (row["screened"], row["recalls"], row["open"], row["diagnosed"], row["malignant"]) == (10, 2, 1, 1, 1)
    assert (row["recall_rate_value"], row["recall_rate_ci_low"], row["recall_rate_ci_high"]) == (0.2, 0.0567, 0.5098)
    assert (row["ppv_value"], row["detection_per_1000_value"]) == (1.0, 100.0)
    db.close()

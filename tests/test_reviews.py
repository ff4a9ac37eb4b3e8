"""Reviews that last and show: carried over a re-analysis when they still apply, "needs re-review" with the
earlier review beside the new result when they do not, and the study's review state on the worklist (its
"flagged, unreviewed" filter), the study page and the report."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path

import pytest
from pypdf import PdfReader

from appliance.jobs.intake import analyze_paths
from appliance.outputs import report
from appliance.store import reviews
from appliance.store.database import open_database, refresh_study, utcnow, write_transaction
from appliance.store.studies import study
from appliance.web import create_app
from tests.web_helpers import csrf, login, make_accounts, web_settings
from tests.web_helpers import rows as _rows

COVID = "chest-covid19"


def _set_threshold(home: Path, threshold: float, model_version: str = "1.0.0") -> None:
    """The site's operating point for the classifier (as `appliance evaluate` records it)."""
    db = open_database(home)
    with write_transaction(db):
        db.table("operating_points").insert({"model": COVID, "model_version": model_version, "threshold": threshold,
                                             "target_sensitivity": 0.9, "evaluation": "{}", "recorded_by": "test",
                                             "recorded_at": utcnow()})
    db.conn.close()


@pytest.fixture
def flagged(tmp_path, synthetic_chest):
    """A synthetic chest study analysed with a site threshold low enough that the classifier flags it."""
    settings = web_settings(tmp_path)
    make_accounts(settings.home_path)
    _set_threshold(settings.home_path, 0.01)
    analyze_paths([synthetic_chest], settings)
    client = create_app(settings, environ={}).test_client()
    login(client, "rad")
    return settings, client, synthetic_chest


def _current(home: Path, model: str = COVID) -> dict:
    db = open_database(home)
    try:
        return next(db.query("SELECT r.* FROM results r JOIN analyses a ON a.id = r.analysis_id "
                             "WHERE a.superseded = 0 AND r.model = ?", [model]))
    finally:
        db.conn.close()


def _study_uid(home: Path) -> str:
    return _rows(home, "SELECT study_instance_uid FROM studies")[0]["study_instance_uid"]


def _review(client, uid: str, result_id: int, decision: str, comment: str = ""):
    token = csrf(client, f"/study/{uid}")
    return client.post(f"/study/{uid}/review", data={"result_id": result_id, "decision": decision,
                                                     "comment": comment, "csrf_token": token})


def _worklist_row(client, uid: str, query: str = "") -> str:
    page = client.get("/" + query).get_data(as_text=True)
    match = re.search(rf'<tr data-study="{re.escape(uid)}"[^>]*>.*?</tr>', page, re.DOTALL)
    return match.group(0) if match else ""


def _pdf_text(client, uid: str) -> str:
    data = client.get(f"/study/{uid}/report.pdf").data
    return re.sub(r"\s+", " ", " ".join(p.extract_text() for p in PdfReader(io.BytesIO(data)).pages))


def test_a_rejection_carries_over_a_reanalysis_and_the_flag_no_longer_shows(flagged):
    settings, client, series = flagged
    home, uid = settings.home_path, _study_uid(settings.home_path)
    first = _current(home)
    assert first["flagged"] == 1
    assert "flagged, not reviewed" in _worklist_row(client, uid)
    assert _review(client, uid, first["id"], "rejected", "motion artefact").status_code == 302

    analyze_paths([series], settings)  # the same folder again: a new analysis supersedes the reviewed one
    second = _current(home)
    assert second["id"] != first["id"] and second["flagged"] == 1
    rows = _rows(home, "SELECT * FROM reviews ORDER BY id")
    assert [(r["result_id"], r["decision"], r["reviewer"], r["carried_from"]) for r in rows] == [
        (first["id"], "rejected", "rad", None), (second["id"], "rejected", "rad", rows[0]["id"])]
    assert rows[1]["comment"] == "motion artefact" and rows[1]["at"] == rows[0]["at"]
    carried = _rows(home, "SELECT * FROM audit_log WHERE action = 'review_carried_over'")
    assert len(carried) == 1 and json.loads(carried[0]["detail"])["carried_from"] == rows[0]["id"]
    assert _rows(home, "SELECT review_state, reviewed_by, unreviewed_flags FROM studies") == [
        {"review_state": "flag rejected", "reviewed_by": "rad", "unreviewed_flags": 0}]

    row = _worklist_row(client, uid)
    assert 'class="flagged"' not in row and "⚑" not in row and "flag on" not in row
    assert "flag rejected by rad" in row and 'data-review="flag rejected"' in row
    progress = client.get(f"/api/progress?study={uid}").get_json()[uid]
    assert progress["review_state"] == "flag rejected" and progress["reviewed_by"] == "rad"
    page = client.get(f"/study/{uid}").get_data(as_text=True)
    assert "carried over from the earlier analysis" in page and "motion artefact" in page
    assert "flag rejected by rad" in page  # the status badge
    report_page = client.get(f"/study/{uid}/report").get_data(as_text=True)
    assert "FLAGGED for review" not in report_page and "flag rejected by the radiologist" in report_page
    assert "Reviewed by rad on" in report_page
    pdf = _pdf_text(client, uid)
    assert "FLAGGED for review" not in pdf and "flag rejected by the radiologist" in pdf


def test_a_review_of_a_replaced_result_or_of_a_measurement_is_refused_with_a_reason(flagged):
    settings, client, series = flagged
    home, uid = settings.home_path, _study_uid(settings.home_path)
    old = _current(home)
    analyze_paths([series], settings)  # re-analysed while the radiologist's page was open
    response = _review(client, uid, old["id"], "confirmed")
    assert response.status_code == 302
    assert "replaced by a new analysis" in client.get(f"/study/{uid}").get_data(as_text=True)
    assert _rows(home, "SELECT * FROM reviews") == []
    measurement = _current(home, "series-qa")
    assert _review(client, uid, measurement["id"], "confirmed").status_code == 400
    assert _review(client, uid, _current(home)["id"], "maybe").status_code == 400
    assert _rows(home, "SELECT * FROM reviews") == []


def test_a_changed_decision_needs_re_review_with_the_earlier_review_beside_it(flagged):
    settings, client, series = flagged
    home, uid = settings.home_path, _study_uid(settings.home_path)
    first = _current(home)
    _review(client, uid, first["id"], "confirmed", "ground glass, both bases")
    assert "confirmed by rad" in _worklist_row(client, uid)
    report_page = client.get(f"/study/{uid}/report").get_data(as_text=True)
    assert "FLAGGED, confirmed by the radiologist" in report_page

    _set_threshold(home, 0.99)  # the site's new operating point: the same score is no longer flagged
    analyze_paths([series], settings)
    second = _current(home)
    assert second["flagged"] == 0
    assert [r["result_id"] for r in _rows(home, "SELECT result_id FROM reviews")] == [first["id"]]  # not carried
    doc = study(open_database(home), uid)
    state = next(r["review"] for s in doc["series"] for r in s["results"] if r["model"] == COVID)
    assert state.state is reviews.ReviewState.NEEDS_REREVIEW and state.why is reviews.NoLongerApplies.DECISION_CHANGED
    assert state.earlier["reviewer"] == "rad" and state.earlier["decision"] == "confirmed"

    page = client.get(f"/study/{uid}").get_data(as_text=True)
    article = re.search(rf'data-model="{COVID}">(.*?)</article>', page, re.DOTALL).group(1)
    assert 'data-review-state="needs re-review"' in article and "the decision (flagged or not) changed" in article
    assert "Earlier review by rad" in article and "ground glass, both bases" in article
    assert "Confirm finding" in article  # the new result can be reviewed
    assert "needs re-review" in _worklist_row(client, uid)
    report_page = client.get(f"/study/{uid}/report").get_data(as_text=True)
    assert "Needs re-review: the earlier review by rad" in report_page

    _review(client, uid, second["id"], "confirmed", "resolved")  # reviewing the new result settles it
    assert _rows(home, "SELECT review_state FROM studies") == [{"review_state": "not flagged"}]


def _fake_study(db, uid: str, flagged: bool, version: str = "1.0.0") -> int:
    """A study with one series and one analysis holding one classifier result, saved as `analysis._save`
    saves one (superseding the last, then carrying reviews over); the result's id."""
    series_uid = uid + ".1"
    with write_transaction(db):
        if not db["studies"].count_where("study_instance_uid = ?", [uid]):
            db.table("patients").insert({"patient_key": uid, "patient_name": f"P^{uid}", "patient_id": uid})
            db.table("studies").insert({"study_instance_uid": uid, "patient_key": uid, "study_date": "20261201",
                                        "created_at": utcnow(), "status": "done"})
            db.table("series").insert({"series_instance_uid": series_uid, "study_instance_uid": uid,
                                       "modality": "CT", "status": "analyzed"})
        db.execute("UPDATE analyses SET superseded = 1 WHERE series_instance_uid = ?", [series_uid])
        analyses = db.table("analyses")
        analyses.insert({"series_instance_uid": series_uid, "study_instance_uid": uid, "status": "analyzed",
                         "superseded": 0, "created_at": utcnow()})
        analysis_id = int(analyses.last_pk)
        results = db.table("results")
        results.insert({"analysis_id": analysis_id, "series_instance_uid": series_uid, "model": COVID,
                        "model_version": version, "validated": 0, "score": 0.8 if flagged else 0.1,
                        "threshold": 0.5, "flagged": int(flagged), "findings": "[]", "created_at": utcnow()})
        reviews.carry_over(db, reviews.previous_analysis(db, analysis_id), analysis_id)
        refresh_study(db, uid)
    return int(results.last_pk)


def _decide(db, uid: str, result_id: int, decision: str) -> None:
    with write_transaction(db):
        reviews.add_review(db, result_id, decision, "", "rad", study_uid=uid)


def test_a_new_model_version_needs_re_review_and_says_why(app_settings):
    db = open_database(app_settings.home_path)
    first = _fake_study(db, "1.9.1", flagged=True)
    _decide(db, "1.9.1", first, "confirmed")
    second = _fake_study(db, "1.9.1", flagged=True, version="2.0.0")
    state = reviews.review_state(db.table("results").get(second), reviews.study_reviews(db, "1.9.1"))
    assert state.state is reviews.ReviewState.NEEDS_REREVIEW and state.why is reviews.NoLongerApplies.NEW_MODEL_VERSION
    assert state.earlier["result_id"] == first and state.review is None
    line = report.review_line(state, report.translations("en"))
    assert line.startswith("Needs re-review: the earlier review by rad") and "model version changed" in line
    assert "version du modèle a changé" in report.review_line(state, report.translations("fr"))
    assert db.execute("SELECT review_state, unreviewed_flags FROM studies").fetchone() == ("needs re-review", 1)
    third = _fake_study(db, "1.9.1", flagged=True, version="2.0.0")  # still unreviewed after one more run
    state = reviews.review_state(db.table("results").get(third), reviews.study_reviews(db, "1.9.1"))
    assert state.state is reviews.ReviewState.NEEDS_REREVIEW and state.earlier["result_id"] == first


def test_the_flagged_unreviewed_filter_lists_exactly_the_flags_no_review_applies_to(app_settings):
    db = open_database(app_settings.home_path)
    _fake_study(db, "1.8.1", flagged=True)  # flagged, never reviewed
    _decide(db, "1.8.2", _fake_study(db, "1.8.2", flagged=True), "rejected")
    _decide(db, "1.8.3", _fake_study(db, "1.8.3", flagged=True), "confirmed")
    _fake_study(db, "1.8.4", flagged=False)  # nothing flagged
    _decide(db, "1.8.5", _fake_study(db, "1.8.5", flagged=True), "confirmed")
    _fake_study(db, "1.8.5", flagged=True, version="2.0.0")  # flagged, needs re-review
    _decide(db, "1.8.6", _fake_study(db, "1.8.6", flagged=True), "confirmed")
    _fake_study(db, "1.8.6", flagged=False)  # needs re-review, but no longer flagged
    _decide(db, "1.8.7", _fake_study(db, "1.8.7", flagged=True), "rejected")
    _fake_study(db, "1.8.7", flagged=True)  # the rejection carried over
    client = create_app(app_settings, environ={}).test_client()
    login(client, "tech")

    def listed(query: str) -> set[str]:
        return set(re.findall(r'<tr data-study="([0-9.]+)"', client.get("/" + query).get_data(as_text=True)))

    assert listed("?unreviewed=1") == {"1.8.1", "1.8.5"}
    assert listed("?unreviewed=1&flagged=1&q=P 1.8.5") == {"1.8.5"}
    assert listed("?flagged=1") == {"1.8.1", "1.8.2", "1.8.3", "1.8.5", "1.8.7"}
    page = client.get("/").get_data(as_text=True)
    assert 'name="unreviewed" value="1"' in page and "flagged, unreviewed" in page
    checked = client.get("/?unreviewed=1").get_data(as_text=True)
    assert re.search(r'name="unreviewed" value="1" data-filter-unreviewed checked', checked)
    words = dict(db.execute("SELECT study_instance_uid, review_state FROM studies"))
    assert words == {"1.8.1": "flagged, not reviewed", "1.8.2": "flag rejected", "1.8.3": "confirmed",
                     "1.8.4": "not flagged", "1.8.5": "needs re-review", "1.8.6": "needs re-review",
                     "1.8.7": "flag rejected"}
    for uid, state in words.items():
        assert f'data-review-state="{state}"' in _worklist_row(client, uid), uid


def test_a_first_release_database_gains_review_states_for_its_flags(tmp_path):
    """The migration fills every study's review state from its results and reviews."""
    home = tmp_path / "home"
    home.mkdir()
    conn = sqlite3.connect(home / "appliance.sqlite")
    conn.executescript((Path(__file__).parent / "data" / "schema-release-1.sql").read_text())
    conn.execute("INSERT INTO studies (study_instance_uid, study_date) VALUES ('1.2.3', '20260101')")
    conn.execute("INSERT INTO series (series_instance_uid, study_instance_uid, status) VALUES ('1.2.3.1', '1.2.3', "
                 "'analyzed')")
    conn.execute("INSERT INTO analyses (id, series_instance_uid, study_instance_uid, status, superseded) "
                 "VALUES (1, '1.2.3.1', '1.2.3', 'analyzed', 0)")
    conn.execute("INSERT INTO results (id, analysis_id, series_instance_uid, model, model_version, score, threshold, "
                 "flagged) VALUES (1, 1, '1.2.3.1', 'chest-covid19', '1.0.0', 0.9, 0.5, 1)")
    conn.commit()
    conn.close()
    db = open_database(home)
    assert "carried_from" in db.table("reviews").columns_dict
    assert db.execute("SELECT review_state, unreviewed_flags FROM studies").fetchone() == ("flagged, not reviewed", 1)

"""One study as the screens and the report show it: patient, series with their state, current results, reviews."""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from appliance.store import reviews as review_states


def study(db: sqlite_utils.Database, study_uid: str) -> dict[str, Any] | None:
    """Everything the study page shows: patient, series with their state, current results, reviews."""
    rows = list(db.query(
        "SELECT st.*, p.patient_name, p.patient_id, p.patient_birth_date, p.patient_sex "
        "FROM studies st LEFT JOIN patients p ON p.patient_key = st.patient_key WHERE st.study_instance_uid = ?",
        [study_uid]))
    if not rows:
        return None
    doc = rows[0]
    doc["series"] = list(db.query(
        "SELECT s.*, (SELECT a.id FROM analyses a WHERE a.series_instance_uid = s.series_instance_uid "
        "AND a.superseded = 0 ORDER BY a.id DESC LIMIT 1) AS analysis_id FROM series s "
        "WHERE s.study_instance_uid = ? ORDER BY s.series_number, s.series_instance_uid", [study_uid]))
    for series in doc["series"]:
        series["results"] = [_result(r) for r in db.query(
            "SELECT * FROM results WHERE analysis_id = ? ORDER BY model", [series["analysis_id"] or -1])]
        analysis = db.table("analyses").get(series["analysis_id"]) if series["analysis_id"] else None
        series["problems"] = json.loads(analysis["problems"]) if analysis and analysis["problems"] else []
        record = json.loads(analysis["record"]) if analysis and analysis.get("record") else {}
        series["skipped_models"] = record.get("skipped_models") or []  # models that did not run, and why
        series["job"] = next(db.query("SELECT state, progress, error, attempts FROM jobs WHERE series_instance_uid = ? "
                                      "AND kind = 'analyze' "
                                      "ORDER BY id DESC LIMIT 1", [series["series_instance_uid"]]), None)
    doc["reviews"] = review_states.study_reviews(db, study_uid)
    for series in doc["series"]:
        for result in series["results"]:
            result["review"] = review_states.review_state(result, doc["reviews"])
    doc["review"] = review_states.summarise([r for s in doc["series"] for r in s["results"] if r["score"] is not None],
                                            doc["reviews"])
    return doc


def _result(row: dict[str, Any]) -> dict[str, Any]:
    row["findings"] = json.loads(row["findings"] or "[]")
    row["key_images"] = [i for i, f in enumerate(row["findings"]) if f.get("key_image")]
    return row


def latest_reviews(reviews: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The last review of each result (earlier ones stay in the history); ``result["review"]`` says whether an
    earlier result's review no longer applies."""
    return {r["result_id"]: r for r in reviews}

"""What one month's bundle says: per-study results (pseudonymised), usage and QA statistics, the model
inventory and an audit summary; results as FHIR R4 JSON and as CSV.

The FHIR Bundle is checked against FHIR R4 (4.0.1) with the SMART on FHIR models (``fhirclient``): every
element known to its resource, of its type, required elements present, dates well formed. A Bundle that
does not pass is an error (:class:`FhirInvalid`, reason code FHIR_INVALID), never a silent bad export.

Nothing here names a patient: studies and patients appear only as HMAC pseudonyms, dates are shifted
per patient, and free text (descriptions, comments, names) stays on the box. Synthetic studies (the first-start
sample, phantom series; ``studies.synthetic``) are in no result and no statistic; only their number is said.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import statistics
import uuid
from collections.abc import Sequence
from typing import Any

import sqlite_utils

from appliance.errors import ApplianceError
from appliance.export.deid import Pseudonymizer
from appliance.store.database import REAL_STUDIES_SQL
from appliance.store.recalls import BY_CODE

SYSTEM = "urn:ct-screening"  # our code systems: models, pseudonyms
FHIR_NAMESPACE = uuid.UUID("3f8a9c1e-6d1b-4c57-9a54-2f1c0b7e4d21")
CSV_COLUMNS = ["study", "patient", "study_date_shifted", "series", "model", "model_version", "validated", "backend",
               "precision", "score", "threshold", "flagged", "review", "turnaround_seconds"]


class FhirInvalid(ApplianceError):
    """A FHIR document that FHIR R4 does not accept; ``problems`` says where and why."""

    reason_code = "FHIR_INVALID"

    def __init__(self, problems: str):
        super().__init__(f"FHIR_INVALID: the FHIR R4 Bundle does not validate: {problems}")
        self.problems = problems


def month_bounds(month: str) -> tuple[str, str]:
    """``YYYY-MM`` -> [first instant, first instant of the next month) as stored ``*_at`` text (UTC)."""
    year, mon = (int(v) for v in month.split("-"))
    start = datetime.datetime(year, mon, 1, tzinfo=datetime.timezone.utc)
    end = datetime.datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=datetime.timezone.utc)
    return start.isoformat(timespec="milliseconds"), end.isoformat(timespec="milliseconds")


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds()


def study_results(db: sqlite_utils.Database, month: str, pseudo: Pseudonymizer) -> list[dict[str, Any]]:
    """One row per current result of every study first received in ``month``, pseudonymised."""
    start, end = month_bounds(month)
    rows = []
    for r in db.query(
            "SELECT st.study_instance_uid, st.patient_key, st.study_date, s.series_instance_uid, s.last_received_at, "
            "a.created_at AS analysed_at, r.id AS result_id, r.model, r.model_version, r.validated, r.backend, "
            "r.precision, r.score, r.threshold, r.flagged, "
            "(SELECT decision FROM reviews v WHERE v.result_id = r.id ORDER BY v.id DESC LIMIT 1) AS review "
            "FROM studies st JOIN series s ON s.study_instance_uid = st.study_instance_uid "
            "JOIN analyses a ON a.series_instance_uid = s.series_instance_uid AND a.superseded = 0 "
            "JOIN results r ON r.analysis_id = a.id "
            "WHERE st.synthetic = 0 AND st.created_at >= ? AND st.created_at < ? "
            "ORDER BY st.study_instance_uid, s.series_instance_uid, r.model", [start, end]):
        key = r["patient_key"]
        turnaround = _seconds(r["last_received_at"], r["analysed_at"])
        rows.append({"study": pseudo.uid(r["study_instance_uid"]), "patient": pseudo.patient(key),
                     "study_date_shifted": pseudo.shift_date(r["study_date"] or "", key),
                     "series": pseudo.uid(r["series_instance_uid"]), "model": r["model"],
                     "model_version": r["model_version"], "validated": bool(r["validated"]), "backend": r["backend"],
                     "precision": r["precision"], "score": r["score"], "threshold": r["threshold"],
                     "flagged": bool(r["flagged"]), "review": r["review"] or "",
                     "turnaround_seconds": None if turnaround is None else round(max(turnaround, 0.0), 1)})
    return rows


def statistics_doc(db: sqlite_utils.Database, month: str) -> dict[str, Any]:
    """Usage and QA of the month: received, analysed, rejected by reason, quarantined by reason, turnaround."""
    start, end = month_bounds(month)

    def one(sql: str) -> int:
        return int(db.execute(sql, [start, end]).fetchone()[0])

    def by(sql: str) -> dict[str, int]:
        return {code or "?": n for code, n in db.execute(sql, [start, end])}

    real = f"study_instance_uid IN ({REAL_STUDIES_SQL})"
    turnarounds = [t for t in (_seconds(a, b) for a, b in db.execute(
        "SELECT s.last_received_at, a.created_at FROM analyses a JOIN series s ON s.series_instance_uid = "  # nosec B608 - fixed SQL text; values bound
        f"a.series_instance_uid WHERE a.superseded = 0 AND a.{real} AND a.created_at >= ? AND a.created_at < ?",
        [start, end])) if t is not None]
    return {
        "month": month,
        "studies_received": one("SELECT count(*) FROM studies WHERE synthetic = 0 AND created_at >= ? "
                                "AND created_at < ?"),
        "synthetic_studies_left_out": one("SELECT count(*) FROM studies WHERE synthetic = 1 AND created_at >= ? "
                                          "AND created_at < ?"),
        "instances_received": one(f"SELECT count(*) FROM instances WHERE {real} AND received_at >= ? "  # nosec B608 - fixed SQL text; values bound
                                  "AND received_at < ?"),
        "series_analysed": one(f"SELECT count(*) FROM analyses WHERE superseded = 0 AND status = 'analyzed' "  # nosec B608 - fixed SQL text; values bound
                               f"AND {real} AND created_at >= ? AND created_at < ?"),
        "series_rejected_by_reason": by("SELECT reason_code, count(*) FROM analyses WHERE superseded = 0 AND "  # nosec B608 - fixed SQL text; values bound
                                        f"status = 'rejected' AND {real} AND created_at >= ? AND created_at < ? "
                                        "GROUP BY 1"),
        "files_quarantined_by_reason": by("SELECT reason_code, count(*) FROM quarantine WHERE created_at >= ? "
                                          "AND created_at < ? GROUP BY 1"),
        "jobs_failed": one(f"SELECT count(*) FROM jobs WHERE state = 'failed' AND {real} AND updated_at >= ? "  # nosec B608 - fixed SQL text; values bound
                           "AND updated_at < ?"),
        "turnaround_seconds": {
            "count": len(turnarounds),
            "median": round(statistics.median(turnarounds), 1) if turnarounds else None,
            "p90": round(statistics.quantiles(turnarounds, n=10)[8], 1) if len(turnarounds) >= 2 else None},
    }


def audit_summary(db: sqlite_utils.Database, month: str) -> dict[str, int]:
    """How many times each audited action happened in the month (who did it stays on the box)."""
    start, end = month_bounds(month)
    # a row may stand for many events (the receiver counts refused associations per minute)
    return dict(db.execute("SELECT action, sum(coalesce(json_extract(detail, '$.count'), 1)) FROM audit_log "
                           "WHERE at >= ? AND at < ? GROUP BY action ORDER BY action", [start, end]))


def _csv(rows: list[dict[str, Any]], columns: Sequence[str]) -> bytes:
    """``rows`` as CSV with ``columns`` in that order, None written as an empty field."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in columns})
    return out.getvalue().encode()


def results_csv(rows: list[dict[str, Any]]) -> bytes:
    return _csv(rows, CSV_COLUMNS)


def _ref(kind: str, key: str) -> str:
    return f"urn:uuid:{uuid.uuid5(FHIR_NAMESPACE, f'{kind}/{key}')}"


def _fhir_date(shifted: str) -> str | None:
    return f"{shifted[:4]}-{shifted[4:6]}-{shifted[6:8]}" if len(shifted) >= 8 else None


def fhir_bundle(rows: list[dict[str, Any]], site_id: str, month: str) -> dict[str, Any]:
    """A FHIR R4 collection Bundle: per study an ImagingStudy, a DiagnosticReport and one Observation per result."""
    entries: list[dict[str, Any]] = []
    studies: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        studies.setdefault(row["study"], []).append(row)
    for study, results in studies.items():
        first = results[0]
        subject = {"identifier": {"system": f"{SYSTEM}:patient-pseudonym:{site_id}", "value": first["patient"]}}
        study_ref = _ref("ImagingStudy", study)
        entries.append({"fullUrl": study_ref, "resource": {
            "resourceType": "ImagingStudy", "status": "available", "subject": subject,
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}],
            **({"started": _fhir_date(first["study_date_shifted"])} if _fhir_date(first["study_date_shifted"]) else {}),
            "numberOfSeries": len({r["series"] for r in results}),
            "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]}})
        observation_refs = []
        for r in results:
            ref = _ref("Observation", f"{r['series']}/{r['model']}")
            observation_refs.append({"reference": ref})
            entries.append({"fullUrl": ref, "resource": _observation(r, subject, study_ref)})
        flagged = sorted({r["model"] for r in results if r["flagged"]})
        reviewed = all(r["review"] for r in results if r["flagged"])
        entries.append({"fullUrl": _ref("DiagnosticReport", study), "resource": {
            "resourceType": "DiagnosticReport", "status": "final" if flagged and reviewed else "preliminary",
            "code": {"coding": [{"system": SYSTEM, "code": "ct-screening", "display": "CT screening (AI)"}]},
            "subject": subject, "imagingStudy": [{"reference": study_ref}], "result": observation_refs,
            "conclusion": ("Flagged for review by: " + ", ".join(flagged)) if flagged else "Not flagged"}})
    return {"resourceType": "Bundle", "type": "collection", "identifier": {"system": f"{SYSTEM}:export",
                                                                           "value": f"{site_id}/{month}"},
            "entry": entries}


def validate_fhir(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` when it is a valid FHIR R4 Bundle (every entry's resource parsed by its R4 model) whose
    references resolve inside it, else :class:`FhirInvalid`."""
    from fhirclient.models.bundle import Bundle
    from fhirclient.models.fhirabstractbase import FHIRValidationError

    try:
        Bundle(doc, strict=True).as_json()
    except (FHIRValidationError, TypeError, ValueError, KeyError) as exc:
        raise FhirInvalid(" ".join(str(exc).split())[:2000]) from None
    return check_references(doc)


def check_references(doc: dict[str, Any]) -> dict[str, Any]:
    """Every entry's fullUrl is unique (bdl-7) and every reference we write resolves to one, else FhirInvalid."""
    urls = [e.get("fullUrl") for e in doc.get("entry", [])]
    if len(set(urls)) != len(urls):
        raise FhirInvalid("two entries have the same fullUrl")
    known = set(urls)
    for entry in doc.get("entry", []):
        resource = entry["resource"]
        for field in ("result", "derivedFrom", "imagingStudy"):
            for ref in resource.get(field, []):
                if ref.get("reference") not in known:
                    raise FhirInvalid(f"{resource['resourceType']}.{field} refers to {ref.get('reference')}, "
                                      "which is not in the Bundle")
    return doc


def _observation(r: dict[str, Any], subject: dict[str, Any], study_ref: str) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging"}]}],
        "code": {"coding": [{"system": f"{SYSTEM}:model", "code": r["model"]}], "text": r["model"]},
        "subject": subject, "derivedFrom": [{"reference": study_ref}],
        "interpretation": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "code": "A" if r["flagged"] else "N"}]}],
        "method": {"text": f"{r['model']} {r['model_version']} on {r['backend']} {r['precision']}"
                           f"{'' if r['validated'] else ' (not validated: research use only)'}"},
    }
    if r["score"] is not None:
        obs["valueQuantity"] = {"value": r["score"]}
    if r["threshold"] is not None:
        obs["referenceRange"] = [{"high": {"value": r["threshold"]}, "text": "flagged at or above"}]
    if r["review"]:
        obs["note"] = [{"text": f"radiologist review: {r['review']}"}]
    return obs


def json_bytes(doc: Any, compact: bool = False) -> bytes:
    """Sorted JSON; indented for people, or ``compact`` for large machine-read documents (the FHIR Bundle:
    a tenth of the time to write, as Python's C encoder serves only unindented output)."""
    if compact:
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return json.dumps(doc, indent=1, sort_keys=True).encode()


RECALL_COLUMNS = ["study", "patient", "model", "model_version", "screened_month", "state", "outcome_code",
                  "outcome_system", "outcome_display", "diagnosis", "malignant", "days_to_outcome"]


def recall_rows(db: sqlite_utils.Database, month: str, pseudo: Pseudonymizer) -> list[dict[str, Any]]:
    """One row per recall opened, closed or given an outcome in ``month``: its state now and its deciding
    outcome (the one that closed it, else the latest), pseudonymised like the results. The hub keeps the
    latest row of each recall. The outcome's free-text detail, dates and who recorded it stay on the box."""
    start, end = month_bounds(month)
    rows = []
    for r in db.query(
            "SELECT rc.*, st.created_at AS received_at FROM recalls rc JOIN studies st "
            "ON st.study_instance_uid = rc.study_instance_uid WHERE st.synthetic = 0 AND ("
            "(rc.created_at >= ? AND rc.created_at < ?) OR (rc.closed_at >= ? AND rc.closed_at < ?) OR EXISTS "
            "(SELECT 1 FROM outcomes o WHERE o.recall_id = rc.id AND o.recorded_at >= ? AND o.recorded_at < ?)) "
            "ORDER BY rc.id", [start, end] * 3):
        last = db.execute("SELECT code, system, recorded_at FROM outcomes WHERE recall_id = ? AND recorded_at < ? "
                          "ORDER BY id DESC LIMIT 1", [r["id"], end]).fetchone()
        kind = BY_CODE.get((last[1], last[0])) if last else None
        days = _seconds(r["created_at"], last[2]) if last else None
        state = "open" if r["closed_at"] is None or r["closed_at"] >= end else (
            "cancelled" if r["closed_reason"] == "flag rejected" else "closed")
        rows.append({"study": pseudo.uid(r["study_instance_uid"]), "patient": pseudo.patient(r["patient_key"]),
                     "model": r["model"], "model_version": r["model_version"],
                     "screened_month": r["received_at"][:7], "state": state,
                     "outcome_code": kind.code if kind else None, "outcome_system": kind.system if kind else None,
                     "outcome_display": kind.display if kind else None,
                     "diagnosis": bool(kind and kind.diagnosis), "malignant": bool(kind and kind.malignant),
                     "days_to_outcome": None if days is None else round(max(days, 0.0) / 86400, 1)})
    return rows


def recalls_csv(rows: list[dict[str, Any]]) -> bytes:
    return _csv(rows, RECALL_COLUMNS)


def fhir_outcomes(rows: list[dict[str, Any]], site_id: str) -> list[dict[str, Any]]:
    """Bundle entries: one Observation per recall with an outcome, its value the coded outcome, on the
    pseudonymised patient and derived from the study's ImagingStudy (the same reference in every month)."""
    entries = []
    for r in rows:
        if not r["outcome_code"]:
            continue
        ref = _ref("Observation", f"recall/{r['study']}/{r['model']}")
        entries.append({"fullUrl": ref, "resource": {
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": f"{SYSTEM}:recall", "code": "recall-outcome",
                                 "display": "Outcome of a recall after a confirmed screening flag"}]},
            "subject": {"identifier": {"system": f"{SYSTEM}:patient-pseudonym:{site_id}", "value": r["patient"]}},
            "derivedFrom": [{"reference": _ref("ImagingStudy", r["study"])}],
            "method": {"text": f"{r['model']} {r['model_version']}"},
            "valueCodeableConcept": {"coding": [{"system": r["outcome_system"], "code": r["outcome_code"],
                                                 "display": r["outcome_display"]}]},
            "component": [{"code": {"coding": [{"system": f"{SYSTEM}:recall", "code": "days-to-outcome"}]},
                           "valueQuantity": {"value": r["days_to_outcome"], "unit": "d",
                                             "system": "http://unitsofmeasure.org", "code": "d"}}]}})
    return entries

"""The hub's merged months as FHIR R4: one collection Bundle per month over every site, made by the same
builder as a site's monthly bundle and validated the same way (FHIR_INVALID refuses to write it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.export import content
from appliance.hub.store import HubDB

_ROW_SQL = ("SELECT site_id, study, patient, study_date, series, model, model_version, validated, backend, "
            "model_precision, score, threshold, flagged, review FROM results WHERE month = ? "
            "ORDER BY site_id, study, series, model")


def _site_rows(db: HubDB, month: str) -> dict[str, list[dict[str, Any]]]:
    """The month's current results per site, in the shape of a site's export rows."""
    sites: dict[str, list[dict[str, Any]]] = {}
    for r in db.rows(_ROW_SQL, [month]):
        sites.setdefault(r["site_id"], []).append({
            "study": r["study"], "patient": r["patient"], "study_date_shifted": r["study_date"] or "",
            "series": r["series"], "model": r["model"], "model_version": r["model_version"],
            "validated": bool(r["validated"]), "backend": r["backend"], "precision": r["model_precision"],
            "score": r["score"], "threshold": r["threshold"], "flagged": bool(r["flagged"]),
            "review": r["review"] or ""})
    return sites


def month_bundle(db: HubDB, month: str) -> dict[str, Any]:
    """A validated FHIR R4 collection Bundle of ``month`` at every site (pseudonyms stay per site);
    BAD_MONTH for a month not written YYYY-MM, FHIR_INVALID for a Bundle FHIR R4 would not accept."""
    from appliance.export.run import check_month

    month = check_month(month)
    entries: list[dict[str, Any]] = []
    for site_id, rows in sorted(_site_rows(db, month).items()):  # validated a site at a time: bounded memory
        entries.extend(content.validate_fhir(content.fhir_bundle(rows, site_id, month))["entry"])
    doc: dict[str, Any] = {"resourceType": "Bundle", "type": "collection",
                           "identifier": {"system": f"{content.SYSTEM}:hub-export", "value": month}, "entry": []}
    content.validate_fhir(doc)
    doc["entry"] = entries
    return content.check_references(doc)


def write_month(db: HubDB, month: str, out: Path) -> int:
    """Write ``month``'s Bundle to ``out`` (JSON); returns the number of entries."""
    doc = month_bundle(db, month)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    tmp.replace(out)
    return len(doc["entry"])

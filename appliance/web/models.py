"""Model cards: what each model is for, whether it is validated, its known limits and its evaluation figures
with 95% confidence intervals (the pack's held-out test, and the site's own evaluations when recorded).

Read from the pack's ``manifest.toml`` and ``training-report.json`` and from ``docs/models/<id>.md``; the
measurements built into the appliance have no pack and are described here. The card's own prose is in English.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, render_template

from appliance import tomlfile
from appliance.web.context import settings_of
from appliance.web.db import get_db

bp = Blueprint("models", __name__)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "models"
MODEL_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
METRICS = ("sensitivity", "specificity", "precision", "accuracy", "f1", "auc", "dice")
# built-in measurements: no pack, versioned with the appliance (docs/models/<id>.md has the method)
BUILT_IN = {
    "series-qa": {"intended_use": "Check every series before the models read it: scan length, field of view, "
                                  "geometry corrections and the scanner's air calibration (air should read -1000 HU).",
                  "known_limits": "Needs air around the patient inside the field of view to measure calibration.",
                  "validated": True, "validation_note": "A physical check of the images, not a diagnostic model."},
    "lungs-classical": {"intended_use": "Lung volumes (right, left, total in mL) from a Hounsfield-unit threshold "
                                        "mask; the fallback and cross-check of the learned lung mask.",
                        "known_limits": "Thresholds miss dense consolidation and include large airways near the "
                                        "hila; volumes are for orientation.",
                        "validated": True, "validation_note": "A measurement, no trained weights."},
    "chest-opacity": {"intended_use": "Percent of lung volume with ground-glass opacity or consolidation, per "
                                      "lung and zone, with key slices.", "validated": False},
    "lung-emphysema": {"intended_use": "Percent of low-attenuation lung (LAA-950 / LAA-910) per lung and zone.",
                       "validated": False},
}


def _documentation(model_id: str) -> str | None:
    path = DOCS / f"{model_id}.md"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _figures(report: dict[str, Any], part: str) -> list[dict[str, Any]]:
    """Rows ``{metric, value, low, high}`` of a training report's ``part`` (test, validation)."""
    rows = []
    for name in METRICS:
        metric = (report.get(part) or {}).get(name)
        if isinstance(metric, dict) and metric.get("value") is not None:
            low, high = (metric.get("ci95") or [None, None])[:2]
            rows.append({"metric": name, "value": metric["value"], "low": low, "high": high})
    return rows


def _pack_card(folder: Path) -> dict[str, Any]:
    manifest = tomlfile.load(folder / "manifest.toml")
    report_path = folder / "training-report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    plain = [{"metric": k.removeprefix("test_"), "value": v, "low": None, "high": None}
             for k, v in (manifest.get("metrics") or {}).items() if isinstance(v, (int, float))]
    return {"version": manifest.get("version"), "kind": manifest.get("kind"),
            "validated": bool(manifest.get("validated")), "validation_note": manifest.get("validation_note"),
            "intended_use": manifest.get("intended_use"), "known_limits": manifest.get("known_limits"),
            "threshold": (manifest.get("decision") or {}).get("threshold"),
            "test": _figures(report, "test") or plain, "validation": _figures(report, "validation"),
            "test_set": (manifest.get("evaluation") or {}).get("description")}


def _site_evaluations(model_id: str) -> list[dict[str, Any]]:
    """The site's recorded evaluations (``appliance evaluate --record``), newest first."""
    rows = get_db().execute("SELECT model_version, threshold, evaluation, recorded_by, recorded_at FROM "
                            "operating_points WHERE model = ? ORDER BY id DESC", [model_id]).fetchall()
    out = []
    for version, threshold, evaluation, by, at in rows:
        doc = json.loads(evaluation or "{}")
        out.append({"version": version, "threshold": threshold, "by": by, "at": (at or "")[:16].replace("T", " "),
                    "cases": doc.get("cases"), "figures": _figures(doc.get("for_sensitivity") or {}, "metrics")})
    return out


def model_card(model_id: str, engines: Path) -> dict[str, Any] | None:
    """Everything the card shows for ``model_id``, or None when no pack or built-in measurement has that id."""
    if not MODEL_ID.fullmatch(model_id):
        return None
    folder = engines / model_id
    if (folder / "manifest.toml").is_file():
        card = _pack_card(folder)
    elif model_id in BUILT_IN:
        card = {"kind": "measurement", "test": [], "validation": [], **BUILT_IN[model_id]}
    else:
        return None
    return {"id": model_id, **card, "documentation": _documentation(model_id),
            "site": _site_evaluations(model_id)}


@bp.route("/models/<model_id>")
def card(model_id: str):
    """The model card of ``model_id``: intended use, validation status, known limits, figures with 95% CIs."""
    doc = model_card(model_id, settings_of().engines_path)
    if doc is None:
        abort(404)
    return render_template("model_card.html", card=doc)

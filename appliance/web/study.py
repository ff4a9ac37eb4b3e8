"""The study page: findings per model, key images, slice viewer data and the radiologist's review."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from flask import Blueprint, Response, abort, flash, g, redirect, render_template, request, send_file, url_for
from flask_babel import gettext as _

from appliance.jobs import queue
from appliance.outputs import report
from appliance.pipelines import overlays
from appliance.store import reviews
from appliance.store.database import audit, write_transaction
from appliance.store.datadir import DataDirectory
from appliance.store.studies import latest_reviews, study
from appliance.web.auth import role_required
from appliance.web.context import settings_of
from appliance.web.db import get_db
from appliance.web.params import bounded_int

bp = Blueprint("study", __name__)
MAX_COMMENT = 2000


def _inside(root: Path, path: Path) -> Path:
    """``path`` resolved, refusing anything outside ``root`` (artefact paths come from the database)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        abort(404)
    return resolved


@bp.route("/study/<uid>")
def page(uid: str):
    db = get_db()
    doc = study(db, uid)
    if doc is None:
        abort(404)
    with write_transaction(db):
        audit(db, g.user["username"], "study_viewed", uid)
    return render_template("study.html", study=doc, reviews=latest_reviews(doc["reviews"]),
                           can_review=g.user["role"] == "radiologist")


@bp.route("/study/<uid>/review", methods=["POST"])
@role_required("radiologist")
def review(uid: str):
    """Confirm or reject one finding, with a comment; every decision is kept and audited."""
    db = get_db()
    result_id = bounded_int(request.form.get("result_id"))
    result = next(db.query("SELECT model, series_instance_uid FROM results WHERE id = ?", [result_id]), None)
    if result_id is None or result is None or not report.is_reviewed(result):
        abort(400)  # measurements carry no decision to confirm or reject
    comment = request.form.get("comment", "").strip()[:MAX_COMMENT]
    try:
        with write_transaction(db):
            reviews.add_review(db, result_id, request.form.get("decision", ""), comment, g.user["username"],
                               study_uid=uid)
    except reviews.ReviewRefused as refused:
        if refused.reason_code != "RESULT_SUPERSEDED":
            abort(400)
        flash(_("This result was replaced by a new analysis while the page was open: review the new result."))
        return redirect(url_for("study.page", uid=uid))
    # the PACS gets the reviewed report
    queue.enqueue_series(db, result["series_instance_uid"], uid, priority=1, kind=queue.REPORT)
    flash(_("Review saved."))
    return redirect(url_for("study.page", uid=uid) + f"#result-{result_id}")


@bp.route("/result/<int:result_id>/key/<int:n>.png")
def key_image(result_id: int, n: int):
    row = get_db().execute("SELECT findings FROM results WHERE id = ?", [result_id]).fetchone()
    if row is None:
        abort(404)
    findings = json.loads(row[0] or "[]")
    path = None
    if 0 <= n < len(findings):
        path = report.key_image_finder(settings_of().home_path)({"findings": findings}, n)
    if path is None:
        abort(404)
    return send_file(path, mimetype="image/png", max_age=3600)


def _series_artefacts(series_uid: str) -> Path:
    row = get_db().execute("SELECT study_instance_uid FROM series WHERE series_instance_uid = ?",
                           [series_uid]).fetchone()
    if row is None:
        abort(404)
    ddir = DataDirectory(settings_of().home_path)
    return _inside(ddir.artefacts, ddir.series_artefacts(row[0], series_uid))


def _viewer_index(series_uid: str) -> dict:
    path = _series_artefacts(series_uid) / "viewer.json"
    if not path.is_file():
        abort(404)
    return json.loads(path.read_text())


@bp.route("/series/<uid>/viewer.json")
def viewer_index(uid: str):
    doc = _viewer_index(uid)
    folder = _series_artefacts(uid)
    models = sorted(p.stem.removeprefix("overlay-") for p in folder.glob("overlay-*.npz"))
    return {"slices": len(doc["frames"]), "rows": doc["frames"][0]["rows"] if doc["frames"] else 0,
            "columns": doc["frames"][0]["columns"] if doc["frames"] else 0,
            "pixel_spacing_mm": doc["pixel_spacing_mm"], "overlays": models}


@bp.route("/series/<uid>/slice/<int:k>")
def slice_pixels(uid: str, k: int):
    """Slice ``k`` (stacking order) in HU as little-endian int16, rows x columns; the browser windows it."""
    from pydicom.pixels import pixel_array

    frames = _viewer_index(uid)["frames"]
    if not 0 <= k < len(frames):
        abort(404)
    frame = frames[k]
    home = settings_of().home_path
    path = _inside(DataDirectory(home).instances, home / frame["path"])
    pixels = pixel_array(str(path), index=frame["frame"]) if frame["frame"] is not None else pixel_array(str(path))
    hu = pixels.astype(np.float32) * frame["slope"] + frame["intercept"]
    data = np.clip(hu, -32768, 32767).astype("<i2").tobytes()
    response = Response(data, mimetype="application/octet-stream")
    response.headers["X-Rows"], response.headers["X-Columns"] = str(hu.shape[0]), str(hu.shape[1])
    return response


@bp.route("/series/<uid>/overlay/<model>/<int:k>.png")
def overlay(uid: str, model: str, k: int):
    """The model's map over slice ``k`` as a red PNG whose alpha is the map (transparent where none)."""
    from PIL import Image

    frames = _viewer_index(uid)["frames"]
    if not 0 <= k < len(frames) or not model.replace("-", "").replace("_", "").isalnum():
        abort(404)
    heat = overlays.load_slice(_series_artefacts(uid) / f"overlay-{model}.npz", frames[k]["volume_index"])
    size = overlays.OVERLAY_SIZE
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1] = 255, 40
    if heat is not None:
        rgba[..., 3] = heat
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return Response(out.getvalue(), mimetype="image/png")

"""The study page: findings per model, key images, slice viewer data and the radiologist's review."""

from __future__ import annotations

import fcntl
import io
import json
from pathlib import Path

import numpy as np
from flask import Blueprint, Response, abort, flash, g, redirect, render_template, request, send_file, url_for
from flask_babel import gettext as _

from appliance.durable import write_bytes_durably
from appliance.jobs import queue
from appliance.outputs import report
from appliance.pipelines import overlays, viewer_volume
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
LEGACY_GEOMETRY = "volume-int16.json"  # geometry of a volume the web built for an older analysis
MAX_SLICE_BATCH = 32  # slices in one answer: 16 MiB of 512 x 512 int16 at most


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
                               study_uid=uid, recall_due_days=settings_of().recall_due_days)
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


def _not_purged(series_uid: str) -> None:
    """410 Gone, in words, for a series whose images the retention purge removed (``store.retention``)."""
    row = get_db().execute("SELECT purged_at FROM series WHERE series_instance_uid = ?", [series_uid]).fetchone()
    if row is not None and row[0]:
        abort(410, description=_("The images of this series were purged on %(date)s under the site's retention "
                                 "rule; its results, report and key images are kept.", date=row[0][:10]))


def _viewer_index(series_uid: str) -> dict:
    _not_purged(series_uid)
    path = _series_artefacts(series_uid) / "viewer.json"
    if not path.is_file():
        abort(404)
    return json.loads(path.read_text())


@bp.route("/series/<uid>/viewer.json")
def viewer_index(uid: str):
    """What the viewer needs before the first image: frame count and size, each frame's volume slice
    index and position (mm), and the reduced volume's geometry when reformatted planes can be cut."""
    doc = _viewer_index(uid)
    folder = _series_artefacts(uid)
    models = sorted(p.stem.removeprefix("overlay-") for p in folder.glob("overlay-*.npz"))
    frames = doc["frames"]
    return {"slices": len(frames), "rows": frames[0]["rows"] if frames else 0,
            "columns": frames[0]["columns"] if frames else 0,
            "pixel_spacing_mm": doc["pixel_spacing_mm"], "overlays": models,
            "volume_index": [f["volume_index"] for f in frames],
            "z_mm": [f.get("z_mm") for f in frames],
            "volume": _volume_geometry(uid, doc, folder)}


def _frame_hu(frame: dict) -> np.ndarray:
    """One stored frame decoded to HU as little-endian int16 (rows x columns)."""
    from pydicom.pixels import pixel_array

    home = settings_of().home_path
    path = _inside(DataDirectory(home).instances, home / frame["path"])
    if not path.is_file():  # restored from a backup made without its images
        abort(410, description=_("The images of this series are not on this appliance (it was restored from a "
                                 "backup made without images); its results, report and key images are kept."))
    pixels = pixel_array(str(path), index=frame["frame"]) if frame["frame"] is not None else pixel_array(str(path))
    hu = pixels.astype(np.float32) * frame["slope"] + frame["intercept"]
    return np.clip(hu, -32768, 32767).astype("<i2")


def _int16_response(data: bytes, rows: int, columns: int) -> Response:
    response = Response(data, mimetype="application/octet-stream")
    response.headers["X-Rows"], response.headers["X-Columns"] = str(rows), str(columns)
    return response


@bp.route("/series/<uid>/slice/<int:k>")
def slice_pixels(uid: str, k: int):
    """Slice ``k`` (stacking order) in HU as little-endian int16, rows x columns; the browser windows it."""
    frames = _viewer_index(uid)["frames"]
    if not 0 <= k < len(frames):
        abort(404)
    hu = _frame_hu(frames[k])
    return _int16_response(hu.tobytes(), hu.shape[0], hu.shape[1])


def _red_png(alpha: np.ndarray) -> Response:
    """A red PNG whose alpha is ``alpha`` (uint8, rows x columns)."""
    from PIL import Image

    rgba = np.zeros((*alpha.shape, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 255, 40, alpha
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return Response(out.getvalue(), mimetype="image/png")


def _model_name(model: str) -> str:
    if not model.replace("-", "").replace("_", "").isalnum():
        abort(404)
    return model


@bp.route("/series/<uid>/overlay/<model>/<int:k>.png")
def overlay(uid: str, model: str, k: int):
    """The model's map over slice ``k`` as a red PNG whose alpha is the map (transparent where none)."""
    frames = _viewer_index(uid)["frames"]
    if not 0 <= k < len(frames):
        abort(404)
    heat = overlays.load_slice(_series_artefacts(uid) / f"overlay-{_model_name(model)}.npz", frames[k]["volume_index"])
    size = overlays.OVERLAY_SIZE
    return _red_png(heat if heat is not None else np.zeros((size, size), dtype=np.uint8))


@bp.route("/series/<uid>/slices/<int:k>/<int:count>")
def slice_batch(uid: str, k: int, count: int):
    """Up to ``count`` consecutive slices from ``k`` (stacking order) in one answer, int16 HU one after
    the other; ``X-Count`` says how many (fewer at the end of the series or where the frame size
    changes), so the viewer fetches a neighbourhood in one round trip instead of one per slice."""
    frames = _viewer_index(uid)["frames"]
    if not 0 <= k < len(frames) or not 1 <= count <= MAX_SLICE_BATCH:
        abort(404)
    first = _frame_hu(frames[k])
    parts = [first.tobytes()]
    for frame in frames[k + 1:k + count]:
        if (frame["rows"], frame["columns"]) != first.shape:
            break
        parts.append(_frame_hu(frame).tobytes())
    response = _int16_response(b"".join(parts), first.shape[0], first.shape[1])
    response.headers["X-Count"] = str(len(parts))
    return response


@bp.route("/series/<uid>/reformat/<plane>/<int:k>")
def reformat(uid: str, plane: str, k: int):
    """Coronal or sagittal plane ``k`` (index along y or x of the reduced volume) as int16 HU, head at the
    top; ``X-Pixel-Spacing`` gives row and column spacing in mm (``row\\column``), for true proportions."""
    if plane not in viewer_volume.PLANES:
        abort(404)
    folder = _series_artefacts(uid)
    doc = _viewer_index(uid)
    geometry = _volume_geometry(uid, doc, folder)
    if geometry is None:
        abort(404)  # resampled and analysed before reformats were kept: analysing it again makes them
    volume = viewer_volume.load(folder / viewer_volume.VOLUME_FILE)
    if volume is None:
        volume = _build_volume(doc["frames"], folder, geometry)
    cut = viewer_volume.plane(volume, plane, k, superior_first=geometry["superior_first"])
    if cut is None:
        abort(404)
    dz, dy, dx = geometry["spacing_mm_zyx"]
    response = _int16_response(np.ascontiguousarray(cut, dtype="<i2").tobytes(), cut.shape[0], cut.shape[1])
    response.headers["X-Pixel-Spacing"] = f"{dz}\\{dx if plane == 'coronal' else dy}"
    return response


@bp.route("/series/<uid>/overlay/<model>/<plane>/<int:k>.png")
def reformat_overlay(uid: str, model: str, plane: str, k: int):
    """The model's map along coronal or sagittal plane ``k``, as the reformat route cuts it (head at the top),
    a red PNG stretched over that plane; transparent where the model drew nothing."""
    geometry = _volume_geometry(uid, _viewer_index(uid), _series_artefacts(uid))
    if plane not in viewer_volume.PLANES or geometry is None:
        abort(404)
    shape = tuple(geometry["shape_zyx"])
    if not 0 <= k < shape[1 if plane == "coronal" else 2]:
        abort(404)
    path = _series_artefacts(uid) / f"overlay-{_model_name(model)}.npz"
    if not path.is_file():
        abort(404)
    with np.load(path) as data:
        alpha = viewer_volume.overlay_plane(data["slices"], data["maps"], plane, k, shape,
                                            superior_first=geometry["superior_first"])
    return _red_png(alpha)


def _volume_geometry(uid: str, doc: dict, folder: Path) -> dict | None:
    """The reduced volume's geometry: as the analysis wrote it, as the web process built it for a series
    analysed before reformats were kept (``volume-int16.json``), or as it would build it now: only where
    the stored frames are the volume's slices one to one (not resampled), else None."""
    if doc.get("volume") and (folder / viewer_volume.VOLUME_FILE).is_file():
        return doc["volume"]
    built = folder / LEGACY_GEOMETRY
    if built.is_file():
        return json.loads(built.read_text())
    frames = doc["frames"]
    row = get_db().execute("SELECT record FROM analyses WHERE series_instance_uid = ? AND superseded = 0 "
                           "ORDER BY id DESC LIMIT 1", [uid]).fetchone()
    record = json.loads(row[0]) if row and row[0] else {}
    shape, spacing = record.get("shape_zyx"), record.get("spacing_mm_zyx")
    if (len(frames) < 2 or not shape or not spacing or shape[0] != len(frames)
            or [f["volume_index"] for f in frames] != list(range(len(frames)))):
        return None
    factor = viewer_volume.reduction(shape[1], shape[2])
    first, last = (_position_z(frames[i]) for i in (0, -1))
    if first is None or last is None:
        return None
    return {"file": viewer_volume.VOLUME_FILE, "shape_zyx": [shape[0], shape[1] // factor, shape[2] // factor],
            "spacing_mm_zyx": [spacing[0], round(spacing[1] * factor, 4), round(spacing[2] * factor, 4)],
            "superior_first": bool(first > last), "factor": factor}


def _position_z(frame: dict) -> float | None:
    """The patient z (mm, LPS: head positive) of a stored frame, read from its header; None if unreadable."""
    from pydicom import dcmread

    home = settings_of().home_path
    path = _inside(DataDirectory(home).instances, home / frame["path"])
    try:
        ds = dcmread(path, stop_before_pixels=True)
        if frame["frame"] is not None and "PerFrameFunctionalGroupsSequence" in ds:
            ds = ds.PerFrameFunctionalGroupsSequence[frame["frame"]].PlanePositionSequence[0]
        return float(ds.ImagePositionPatient[2])
    except (OSError, AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None


def _build_volume(frames: list[dict], folder: Path, geometry: dict) -> np.ndarray:
    """Decode every frame once and keep the reduced volume (a series analysed before the analysis kept it).
    One builder at a time per series (flock); the others wait and then read what it wrote."""
    lock_path = folder / ".volume-int16.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        volume = viewer_volume.load(folder / viewer_volume.VOLUME_FILE)
        if volume is None:
            factor = geometry.get("factor", 1)
            reduced = np.empty(geometry["shape_zyx"], dtype=np.int16)
            for k, frame in enumerate(frames):
                reduced[k] = viewer_volume.reduce_in_plane(_frame_hu(frame)[None], factor)[0]
            viewer_volume.save(reduced, folder / viewer_volume.VOLUME_FILE)
            write_bytes_durably(json.dumps(geometry).encode(), folder / LEGACY_GEOMETRY)
            volume = viewer_volume.load(folder / viewer_volume.VOLUME_FILE)
    if volume is None:
        abort(404)
    return volume

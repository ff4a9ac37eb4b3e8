"""Run every analysis step on a stored series and keep the results.

The flow of ``appliance analyze``: import -> assemble each series -> series
QA and segmentation (and the screening models as they are added) -> results
in SQLite. A new analysis of a series supersedes the earlier one; both stay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from appliance.config import Settings
from appliance.errors import NothingUsable, SeriesRejected
from appliance.ingest.importer import ImportSummary, import_paths
from appliance.inference.registry import Registry
from appliance.pipelines import StepResult, abdomen_pancreas, chest_covid19, lungs, series_qa
from appliance.series.volume import CTVolume, load_series
from appliance.store.database import open_database, refresh_study, site_threshold, utcnow, write_transaction
from appliance.store.files import write_bytes_durably
from appliance.store.instances import InstanceStore

log = logging.getLogger(__name__)

@dataclasses.dataclass
class StepContext:
    """What the steps of one series' analysis share: settings, models, where artefacts go."""

    settings: Settings
    registry: Registry
    artefacts: Path
    db: sqlite_utils.Database
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    _segmentation: lungs.Segmentation | None = None

    def segmentation(self, volume: CTVolume) -> lungs.Segmentation:
        if self._segmentation is None:
            self._segmentation = lungs.segment(volume, self.settings.body_threshold_hu,
                                               self.settings.lung_threshold_hu)
        return self._segmentation


Step = Callable[[CTVolume, StepContext], "StepResult | None"]


def _series_qa(volume: CTVolume, ctx: StepContext) -> StepResult:
    return series_qa.run(volume)


def _lungs(volume: CTVolume, ctx: StepContext) -> StepResult:
    return lungs.run(volume, seg=ctx.segmentation(volume))


NOT_AXIAL = "the series is not axial (a coronal or sagittal reformat); the models read axial slices"


def _chest_covid19(volume: CTVolume, ctx: StepContext) -> StepResult | None:
    if not volume.plan.is_axial:
        ctx.skipped.append({"model": chest_covid19.MODEL_ID, "why": NOT_AXIAL})
        return None
    pack = ctx.registry.pack(chest_covid19.MODEL_ID)
    if pack is None:
        ctx.skipped.append({"model": chest_covid19.MODEL_ID, "why": "model pack not installed or refused"})
        return None
    session, _choice = ctx.registry.session(pack)
    try:
        return chest_covid19.run(volume, ctx.segmentation(volume), session, pack, ctx.artefacts,
                                 site_threshold(ctx.db, pack.id, pack.version))
    except chest_covid19.NotApplicable as exc:
        ctx.skipped.append({"model": pack.id, "why": str(exc)})
        return None


def _abdomen_pancreas(volume: CTVolume, ctx: StepContext) -> StepResult | None:
    if not volume.plan.is_axial:
        ctx.skipped.append({"model": abdomen_pancreas.MODEL_ID, "why": NOT_AXIAL})
        return None
    localizer = ctx.registry.pack(abdomen_pancreas.LOCALIZER_ID)
    pack = ctx.registry.pack(abdomen_pancreas.MODEL_ID)
    if pack is None or localizer is None:
        ctx.skipped.append({"model": abdomen_pancreas.MODEL_ID, "why": "model packs not installed or refused"})
        return None
    localizer_session, _ = ctx.registry.session(localizer)
    session, _ = ctx.registry.session(pack)
    try:
        return abdomen_pancreas.run(volume, localizer_session, localizer, session, pack, ctx.artefacts,
                                    site_threshold(ctx.db, pack.id, pack.version))
    except abdomen_pancreas.NotApplicable as exc:
        ctx.skipped.append({"model": pack.id, "why": str(exc)})
        return None


STEPS: tuple[Step, ...] = (_series_qa, _lungs, _chest_covid19, _abdomen_pancreas)


def open_store(settings: Settings) -> InstanceStore:
    """Open the data directory's database and instance store, sweeping what a crash left."""
    home = settings.home_path
    db = open_database(home)
    store = InstanceStore(home, db, max_bytes=settings.max_instance_bytes,
                          max_rows_columns=settings.max_rows_columns, max_frames=settings.max_frames)
    removed = store.sweep_orphans()
    if removed:
        log.info("removed %d file(s) left by an interrupted write", removed)
    return store


def series_paths(store: InstanceStore, series_instance_uid: str) -> list[Path]:
    rows = store.db.execute("SELECT path FROM instances WHERE series_instance_uid = ? ORDER BY path",
                            [series_instance_uid]).fetchall()
    return [store.home / r[0] for r in rows]


def _run_steps(volume: CTVolume, ctx: StepContext) -> list[StepResult]:
    results = []
    for step in STEPS:
        t0 = time.perf_counter()
        result = step(volume, ctx)
        if result is not None:
            result.seconds = round(time.perf_counter() - t0, 3)
            results.append(result)
    return results


def artefact_dir(store: InstanceStore, series_instance_uid: str) -> Path:
    """``artefacts/<StudyInstanceUID>/<SeriesInstanceUID>/`` (UIDs validated when the series was stored)."""
    study = store.db.execute("SELECT study_instance_uid FROM series WHERE series_instance_uid = ?",
                             [series_instance_uid]).fetchone()[0]
    return store.home / "artefacts" / study / series_instance_uid


def write_viewer_index(volume: CTVolume, artefacts: Path, home: Path) -> None:
    """``viewer.json``: the frames in stacking order, where each lies, and the volume slice nearest to it,
    so the web viewer shows the stored images themselves and puts a model's overlay on the right one."""
    plan = volume.plan
    nearest = np.abs(plan.source_z_mm[:, None] - plan.target_z_mm[None, :]).argmin(axis=1)
    frames = [{"path": str(f.path.relative_to(home)) if f.path.is_relative_to(home) else str(f.path),
               "frame": f.frame_index, "rows": f.rows, "columns": f.columns,
               "slope": f.rescale_slope, "intercept": f.rescale_intercept, "volume_index": int(k)}
              for f, k in zip(volume.frames, nearest)]
    artefacts.mkdir(parents=True, exist_ok=True)
    doc = {"frames": frames, "pixel_spacing_mm": list(volume.frames[0].pixel_spacing) if volume.frames else None}
    write_bytes_durably(json.dumps(doc).encode(), artefacts / "viewer.json")


def analyze_series(store: InstanceStore, series_instance_uid: str, settings: Settings,
                   registry: Registry | None = None) -> dict[str, Any]:
    """Assemble, check and analyse one stored series; store and return its result record."""
    registry = registry or Registry(settings)
    t0 = time.perf_counter()
    paths = series_paths(store, series_instance_uid)
    record: dict[str, Any] = {"series_instance_uid": series_instance_uid, "status": "analyzed", "reason_code": None,
                              "reason": None, "slices": len(paths), "shape_zyx": None, "spacing_mm_zyx": None,
                              "problems": [], "excluded": [], "results": []}
    seconds = {"load": 0.0, "preprocess": 0.0, "infer": 0.0}
    try:
        volume = load_series(paths, settings)
    except SeriesRejected as exc:
        seconds["load"] = time.perf_counter() - t0
        record.update(status="rejected", reason_code=exc.reason_code.value, reason=exc.reason,
                      problems=[p.as_dict() for p in exc.problems])
    else:
        seconds["load"] = volume.seconds["headers"] + volume.seconds["decode"]
        seconds["preprocess"] = volume.seconds["resample"]
        t_infer = time.perf_counter()
        ctx = StepContext(settings, registry, artefact_dir(store, series_instance_uid), store.db)
        write_viewer_index(volume, ctx.artefacts, store.home)
        results = _run_steps(volume, ctx)
        seconds["infer"] = time.perf_counter() - t_infer
        record["skipped_models"] = ctx.skipped
        record.update(slices=volume.slices, shape_zyx=list(volume.hu.shape),
                      spacing_mm_zyx=[round(v, 4) for v in volume.spacing_mm_zyx],
                      problems=[p.as_dict() for p in volume.plan.problems],
                      excluded=[{"sop_instance_uid": uid, "why": why} for uid, why in volume.excluded],
                      results=[r.as_dict() for r in results])
        del volume
    seconds["total"] = time.perf_counter() - t0
    record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    _save(store.db, record)
    return record


def _save(db: sqlite_utils.Database, record: dict[str, Any]) -> None:
    uid = record["series_instance_uid"]
    now = utcnow()
    with write_transaction(db):
        study = db.execute("SELECT study_instance_uid FROM series WHERE series_instance_uid = ?", [uid]).fetchone()[0]
        db.execute("UPDATE analyses SET superseded = 1 WHERE series_instance_uid = ?", [uid])
        analyses = db["analyses"]
        analyses.insert({
            "series_instance_uid": uid, "study_instance_uid": study, "status": record["status"],
            "reason_code": record["reason_code"], "reason": record["reason"], "problems": json.dumps(record["problems"]),
            "slices": record["slices"], "shape_zyx": json.dumps(record["shape_zyx"]),
            "spacing_mm_zyx": json.dumps(record["spacing_mm_zyx"]), "seconds": json.dumps(record["seconds"]),
            "created_at": now, "superseded": 0,
        })
        analysis_id = analyses.last_pk
        for r in record["results"]:
            db["results"].insert({
                "analysis_id": analysis_id, "series_instance_uid": uid, "model": r["model"],
                "model_version": r["model_version"], "validated": int(r["validated"]), "backend": r["backend"],
                "precision": r["precision"], "score": r["score"], "threshold": r["threshold"],
                "flagged": int(r["flagged"]), "findings": json.dumps(r["findings"]), "seconds": r["seconds"],
                "created_at": now, "notice": r.get("notice"),
            })
        db.execute("UPDATE series SET status = ?, reason_code = ?, reason = ?, updated_at = ? "
                   "WHERE series_instance_uid = ?", [record["status"], record["reason_code"], record["reason"], now, uid])
        refresh_study(db, study)


def _run_job(store: InstanceStore, series_uid: str, study_uid: str, settings: Settings,
             registry: Registry) -> dict[str, Any]:
    db = store.db
    with write_transaction(db):
        jobs = db["jobs"]
        jobs.insert({"kind": "analyze", "study_instance_uid": study_uid, "series_instance_uid": series_uid,
                     "state": "running", "priority": 0, "attempts": 1, "progress": 0.0,
                     "created_at": utcnow(), "updated_at": utcnow()})
        job_id = jobs.last_pk
    try:
        record = analyze_series(store, series_uid, settings, registry)
    except BaseException as exc:
        with write_transaction(db):
            db["jobs"].update(job_id, {"state": "failed", "error": repr(exc), "updated_at": utcnow()})
        raise
    with write_transaction(db):
        db["jobs"].update(job_id, {"state": "done", "progress": 1.0, "updated_at": utcnow()})
    return record


def analyze_paths(paths: Iterable[Path], settings: Settings,
                  progress: Callable[[ImportSummary], None] | None = None) -> dict[str, Any]:
    """Import ``paths`` and analyse every series they hold. Returns the ``--json`` document.

    Raises :class:`NothingUsable` when no DICOM instance was found.
    """
    store = open_store(settings)
    summary = import_paths(store, paths, settings, progress=progress)
    if not summary.series:
        raise NothingUsable(f"no DICOM images found ({len(summary.quarantined)} file(s) quarantined)")
    studies: dict[str, list[dict[str, Any]]] = {}
    registry = Registry(settings)
    for series_uid, study_uid in summary.series.items():
        studies.setdefault(study_uid, []).append(_run_job(store, series_uid, study_uid, settings, registry))
    return {"import": summary.as_dict(),
            "studies": [{"study_instance_uid": uid, "series": series} for uid, series in studies.items()]}

"""Run every analysis step on a stored series and keep the results.

Called by the job runner (:mod:`appliance.jobs.runner`) only: assemble the series -> series QA (with the body
regions the series covers) and segmentation -> the screening models -> results in SQLite, the whole record kept
with the analysis. A step runs only on a series covering the body region its model reads (a pack's
``body_region``, a built-in step's ``BODY_REGION``); otherwise it is skipped as not applicable, with the evidence.
A new analysis of a series supersedes the earlier one; both stay. Long steps report progress.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from appliance.config import Settings
from appliance.durable import write_bytes_durably
from appliance.errors import ReasonCode, SeriesRejected
from appliance.inference.policy import why_off
from appliance.inference.registry import Registry
from appliance.jobs import queue
from appliance.pipelines import (
    StepResult,
    abdomen_pancreas,
    body_region,
    chest_covid19,
    chest_opacity,
    lung_emphysema,
    lung_segmentation,
    lungs,
    series_qa,
    viewer_volume,
)
from appliance.pipelines.lung_regions import NotApplicable
from appliance.series.volume import CTVolume, Problem, load_series
from appliance.store import reviews
from appliance.store.database import inserted_id, refresh_study, site_threshold, utcnow, write_transaction
from appliance.store.datadir import DataDirectory
from appliance.store.instances import InstanceStore, series_instances
from appliance.store.states import SeriesStatus

log = logging.getLogger(__name__)

@dataclasses.dataclass
class StepContext:
    """What the steps of one series' analysis share: settings, models, where artefacts go."""

    settings: Settings
    registry: Registry
    artefacts: Path
    db: sqlite_utils.Database
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _segmentation: lungs.Segmentation | None = None
    lung_mask_fallback: str | None = None  # why the classical lung mask stands in for the learned one
    body_regions: body_region.BodyRegions | None = None  # what the series covers, found by series QA (step one)

    def segmentation(self, volume: CTVolume) -> lungs.Segmentation:
        """The lung mask every chest step reads: the learned one, else the classical one (the reason kept)."""
        if self._segmentation is None:
            if volume.plan.is_axial:
                self._segmentation, self.lung_mask_fallback = lung_segmentation.segment_or_fallback(
                    volume, self.registry, body_threshold_hu=self.settings.body_threshold_hu,
                    lung_threshold_hu=self.settings.lung_threshold_hu)
            else:
                self._segmentation = lungs.segment(volume, self.settings.body_threshold_hu,
                                                   self.settings.lung_threshold_hu)
                self.lung_mask_fallback = NOT_AXIAL
        return self._segmentation


Step = Callable[[CTVolume, StepContext], "StepResult | None"]
Progress = Callable[[float, str], None]  # (fraction done 0..1, stage)


def _series_qa(volume: CTVolume, ctx: StepContext) -> StepResult:
    ctx.body_regions = body_region.determine(volume)
    return series_qa.run(volume, ctx.body_regions)


def not_applicable(ctx: StepContext, model_id: str, region: str | None, coverage: str | None = None) -> bool:
    """True, with the model recorded as skipped and the evidence, when the series does not cover the body region
    the model reads (``coverage``: what it needs there, in words). A series whose regions could not be told
    (not axial) is left to the model's own checks."""
    regions = ctx.body_regions
    if region is None or regions is None or not regions.determined or regions.covers(region):
        return False
    needs = f" and needs {coverage}" if coverage and coverage != region else ""
    ctx.skipped.append({"model": model_id, "why": f"not applicable: this series covers {regions.describe()}; "
                                                  f"the model reads the {region}{needs}",
                        "not_applicable": {"reads": region, "covers": list(regions.covered)}})
    return True


NOT_AXIAL = "the series is not axial (a coronal or sagittal reformat); the models read axial slices"


def _lungs(volume: CTVolume, ctx: StepContext) -> StepResult | None:
    """The learned lung mask measured and cross-checked against the classical one (at stride 4, cheap);
    the classical result in its place, with the reason, when the learned mask is unavailable."""
    learned = ctx.registry.pack(lung_segmentation.MODEL_ID)
    if learned is not None and not_applicable(ctx, learned.id, learned.body_region, learned.required_coverage):
        return None
    if learned is None and not_applicable(ctx, lungs.MODEL, lungs.BODY_REGION):
        return None
    seg = ctx.segmentation(volume)
    if seg.source != lung_segmentation.SOURCE:
        ctx.skipped.append({"model": lung_segmentation.MODEL_ID,
                            "why": f"{ctx.lung_mask_fallback}; the classical lung mask was used"})
        result = lungs.run(volume, seg=seg)
        key = lung_segmentation.mask_key_image(volume, seg, ctx.artefacts, None, lungs.MODEL)
        if key is not None:
            result.findings.append(key)
        return result
    pack = ctx.registry.pack(lung_segmentation.MODEL_ID)
    session = ctx.registry.session(pack)[0] if pack is not None else None
    cross_check = lungs.segment(volume, ctx.settings.body_threshold_hu, ctx.settings.lung_threshold_hu,
                                stride=CROSS_CHECK_STRIDE)
    return lung_segmentation.run(volume, seg, cross_check=cross_check, pack=pack, session=session,
                                 artefacts=ctx.artefacts)


def _with_coverage(result: StepResult, volume: CTVolume, seg: lungs.Segmentation) -> StepResult:
    """Every lung measurement says whether the lungs were fully covered (it measures the part that was)."""
    cover = lungs.coverage(seg, volume)
    result.findings.append({"name": "lung coverage", **cover, "lung_mask": seg.source})
    if not cover["fully_covered"]:
        result.notice = f"{result.notice} {cover['note']}" if result.notice else cover["note"]
    return result


def _lung_measurement(module, volume: CTVolume, ctx: StepContext) -> StepResult | None:
    if not_applicable(ctx, module.MODEL_ID, module.BODY_REGION):
        return None
    seg = ctx.segmentation(volume)
    try:
        result = module.run(volume, seg, ctx.artefacts, site_threshold(ctx.db, module.MODEL_ID, module.VERSION))
    except NotApplicable as exc:
        ctx.skipped.append({"model": module.MODEL_ID, "why": str(exc)})
        return None
    return _with_coverage(result, volume, seg)


def _chest_opacity(volume: CTVolume, ctx: StepContext) -> StepResult | None:
    return _lung_measurement(chest_opacity, volume, ctx)


def _lung_emphysema(volume: CTVolume, ctx: StepContext) -> StepResult | None:
    return _lung_measurement(lung_emphysema, volume, ctx)


def _chest_covid19(volume: CTVolume, ctx: StepContext) -> StepResult | None:
    if not volume.plan.is_axial:
        ctx.skipped.append({"model": chest_covid19.MODEL_ID, "why": NOT_AXIAL})
        return None
    pack = ctx.registry.pack(chest_covid19.MODEL_ID)
    if pack is None:
        ctx.skipped.append({"model": chest_covid19.MODEL_ID, "why": "model pack not installed or refused"})
        return None
    if not_applicable(ctx, pack.id, pack.body_region, pack.required_coverage):
        return None
    if (why := why_off(pack, ctx.settings, ctx.db)) is not None:
        ctx.skipped.append({"model": pack.id, "why": why})
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
    if not_applicable(ctx, pack.id, pack.body_region, pack.required_coverage):
        return None
    if (why := why_off(pack, ctx.settings, ctx.db)) is not None:
        ctx.skipped.append({"model": pack.id, "why": why})
        return None
    localizer_session, _ = ctx.registry.session(localizer)
    session, _ = ctx.registry.session(pack)
    try:
        return abdomen_pancreas.run(volume, localizer_session, localizer, session, pack, ctx.artefacts,
                                    site_threshold(ctx.db, pack.id, pack.version))
    except abdomen_pancreas.NotApplicable as exc:
        ctx.skipped.append({"model": pack.id, "why": str(exc)})
        return None


STEPS: tuple[Step, ...] = (_series_qa, _lungs, _chest_opacity, _lung_emphysema, _chest_covid19, _abdomen_pancreas)
CROSS_CHECK_STRIDE = 4


def uid_problems(db: sqlite_utils.Database, series_instance_uid: str) -> list[Problem]:
    """What the store corrected in the UIDs of a series' files (emptied, or not valid UIDs), as
    corrected problems: the technician learns why the results name other UIDs than the images."""
    originals: dict[tuple[str, bool], list[str]] = {}  # (keyword, had a value) -> the values
    for (text,) in db.execute("SELECT original_uids FROM instances WHERE series_instance_uid = ? "
                              "AND original_uids IS NOT NULL", [series_instance_uid]):
        for keyword, value in json.loads(text).items():
            originals.setdefault((keyword, bool(value)), []).append(value)
    invalid = [f"{k} of {len(v)} image(s) (such as '{v[0][:64]}')" for (k, had), v in originals.items() if had]
    emptied = [f"{k} of {len(v)} image(s)" for (k, had), v in originals.items() if not had]
    problems = []
    if invalid:
        problems.append(Problem(ReasonCode.INVALID_UID,
                                f"The {', '.join(invalid)} are not valid DICOM UIDs; valid UIDs derived from them "
                                "were used for this series and its results (the originals are kept).", False))
    if emptied:
        problems.append(Problem(ReasonCode.MISSING_UID,
                                f"The {', '.join(emptied)} were empty; UIDs derived from the images were used for "
                                "this series and its results.", False))
    return problems


def series_paths(store: InstanceStore, series_instance_uid: str) -> list[Path]:
    """The files of a stored series, in the order of their paths."""
    return [i.path for i in series_instances(store.db, store.home, series_instance_uid)]


# share of a job's progress reached once the series is loaded, and once every step has run
LOADED, STEPS_DONE = 0.4, 0.9


def _run_steps(volume: CTVolume, ctx: StepContext, progress: Progress) -> list[StepResult]:
    results = []
    for n, step in enumerate(STEPS):
        progress(LOADED + (STEPS_DONE - LOADED) * n / len(STEPS), step.__name__.strip("_"))
        t0 = time.perf_counter()
        result = step(volume, ctx)
        if result is not None:
            result.seconds = round(time.perf_counter() - t0, 3)
            results.append(result)
    progress(STEPS_DONE, "saving")
    return results


def _no_progress(fraction: float, stage: str) -> None:
    """The default progress report: none."""


def artefact_dir(store: InstanceStore, series_instance_uid: str) -> Path:
    """``artefacts/<StudyInstanceUID>/<SeriesInstanceUID>/`` (UIDs validated when the series was stored)."""
    study = store.db.execute("SELECT study_instance_uid FROM series WHERE series_instance_uid = ?",
                             [series_instance_uid]).fetchone()[0]
    return DataDirectory(store.home).series_artefacts(study, series_instance_uid)


def _relative_key_images(results: list[dict[str, Any]], ddir: DataDirectory) -> None:
    """Key images are kept as paths relative to the data directory, so a moved or restored one still finds them."""
    for result in results:
        for finding in result["findings"]:
            if finding.get("key_image"):
                finding["key_image"] = ddir.relative(Path(finding["key_image"]))


def write_viewer_index(volume: CTVolume, artefacts: Path, home: Path) -> None:
    """``viewer.json``: the frames in stacking order, where each lies, and the volume slice nearest to it,
    so the web viewer shows the stored images themselves and puts a model's overlay on the right one;
    and ``volume-int16.npy``, the volume reduced in-plane, that coronal and sagittal planes are cut from."""
    plan = volume.plan
    nearest = np.abs(plan.source_z_mm[:, None] - plan.target_z_mm[None, :]).argmin(axis=1)
    frames = [{"path": str(f.path.relative_to(home)) if f.path.is_relative_to(home) else str(f.path),
               "frame": f.frame_index, "rows": f.rows, "columns": f.columns,
               "slope": f.rescale_slope, "intercept": f.rescale_intercept, "volume_index": int(k),
               "z_mm": round(float(z), 3)}
              for f, k, z in zip(volume.frames, nearest, plan.source_z_mm)]
    artefacts.mkdir(parents=True, exist_ok=True)
    factor = viewer_volume.reduction(volume.hu.shape[1], volume.hu.shape[2])
    reduced = viewer_volume.reduce_in_plane(volume.hu, factor)
    viewer_volume.save(reduced, artefacts / viewer_volume.VOLUME_FILE)
    dz, dy, dx = plan.spacing_mm_zyx
    doc = {"frames": frames, "pixel_spacing_mm": list(volume.frames[0].pixel_spacing) if volume.frames else None,
           "volume": {"file": viewer_volume.VOLUME_FILE, "shape_zyx": list(reduced.shape),
                      "spacing_mm_zyx": [round(dz, 4), round(dy * factor, 4), round(dx * factor, 4)],
                      "superior_first": bool(plan.direction[2, 2] < 0)}}
    write_bytes_durably(json.dumps(doc).encode(), artefacts / "viewer.json")


def _load(paths: list[Path], settings: Settings, progress: Callable[[float], None],
          series_instance_uid: str) -> CTVolume | SeriesRejected:
    """The series' volume, or why there is none.

    Whatever the files make the reader raise is the series' problem, not the job's: it becomes
    UNREADABLE_SERIES (logged with its traceback, so a fault of this program is still seen) rather than
    a job that fails and is retried to no end. Memory and disk errors are the box's and fail the job.
    """
    try:
        return load_series(paths, settings, progress)
    except SeriesRejected as exc:
        return exc
    except (MemoryError, OSError):
        raise
    except Exception as exc:
        log.exception("series %s could not be read", series_instance_uid)
        return SeriesRejected(ReasonCode.UNREADABLE_SERIES,
                              f"The images of this series could not be read ({type(exc).__name__}: "
                              f"{str(exc)[:200]}). Send the series again; if it is refused again, report it "
                              "with the appliance's log.")


def analyze_series(store: InstanceStore, series_instance_uid: str, settings: Settings, registry: Registry,
                   *, job_id: int | None = None, progress: Progress = _no_progress) -> dict[str, Any]:
    """Assemble, check and analyse one stored series; store and return its result record.

    ``progress(fraction, stage)`` is called as the work goes on; ``job_id`` is the job the analysis
    is recorded against (in the same transaction as the results).
    """
    t0 = time.perf_counter()
    progress(0.0, "loading")
    paths = series_paths(store, series_instance_uid)
    record: dict[str, Any] = {"series_instance_uid": series_instance_uid, "status": SeriesStatus.ANALYZED.value,
                              "reason_code": None, "reason": None, "slices": len(paths), "shape_zyx": None,
                              "spacing_mm_zyx": None, "problems": [], "excluded": [], "results": []}
    seconds = {"load": 0.0, "preprocess": 0.0, "infer": 0.0}
    notes = uid_problems(store.db, series_instance_uid)
    volume = _load(paths, settings, lambda done: progress(LOADED * done, "loading"), series_instance_uid)
    if isinstance(volume, SeriesRejected):
        seconds["load"] = time.perf_counter() - t0
        record.update(status=SeriesStatus.REJECTED.value, reason_code=volume.reason_code.value,
                      reason=volume.reason, problems=[p.as_dict() for p in (*notes, *volume.problems)])
    else:
        seconds["load"] = volume.seconds["headers"] + volume.seconds["decode"]
        seconds["preprocess"] = volume.seconds["resample"]
        t_infer = time.perf_counter()
        ctx = StepContext(settings, registry, artefact_dir(store, series_instance_uid), store.db)
        write_viewer_index(volume, ctx.artefacts, store.home)
        progress(LOADED, "analysing")
        results = _run_steps(volume, ctx, progress)
        seconds["infer"] = time.perf_counter() - t_infer
        record["skipped_models"] = ctx.skipped
        record.update(slices=volume.slices, shape_zyx=list(volume.hu.shape),
                      spacing_mm_zyx=[round(v, 4) for v in volume.spacing_mm_zyx],
                      problems=[p.as_dict() for p in (*notes, *volume.plan.problems)],
                      excluded=[{"sop_instance_uid": uid, "why": why} for uid, why in volume.excluded],
                      results=[r.as_dict() for r in results])
        _relative_key_images(record["results"], DataDirectory(store.home))
        del volume
    seconds["total"] = time.perf_counter() - t0
    record["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    record["analysis_id"] = _save(store.db, record, job_id)
    return record


def stored_record(db: sqlite_utils.Database, analysis_id: int) -> dict[str, Any]:
    """The record an analysis saved, as :func:`analyze_series` returned it."""
    row = db.execute("SELECT record FROM analyses WHERE id = ?", [analysis_id]).fetchone()
    if row is None or not row[0]:
        raise LookupError(f"analysis {analysis_id} has no stored record")
    return dict(json.loads(row[0]), analysis_id=analysis_id)


def _save(db: sqlite_utils.Database, record: dict[str, Any], job_id: int | None) -> int:
    uid = record["series_instance_uid"]
    now = utcnow()
    with write_transaction(db):
        study = db.execute("SELECT study_instance_uid FROM series WHERE series_instance_uid = ?", [uid]).fetchone()[0]
        db.execute("UPDATE analyses SET superseded = 1 WHERE series_instance_uid = ?", [uid])
        analyses = db.table("analyses")
        analyses.insert({
            "series_instance_uid": uid, "study_instance_uid": study, "status": record["status"],
            "reason_code": record["reason_code"], "reason": record["reason"],
            "problems": json.dumps(record["problems"]),
            "slices": record["slices"], "shape_zyx": json.dumps(record["shape_zyx"]),
            "spacing_mm_zyx": json.dumps(record["spacing_mm_zyx"]), "seconds": json.dumps(record["seconds"]),
            "created_at": now, "superseded": 0, "record": json.dumps(record),
        })
        analysis_id = inserted_id(analyses)
        if job_id is not None:
            queue.record_analysis(db, job_id, analysis_id)
        for r in record["results"]:
            db.table("results").insert({
                "analysis_id": analysis_id, "series_instance_uid": uid, "model": r["model"],
                "model_version": r["model_version"], "validated": int(r["validated"]), "backend": r["backend"],
                "precision": r["precision"], "score": r["score"], "threshold": r["threshold"],
                "flagged": int(r["flagged"]), "findings": json.dumps(r["findings"]), "seconds": r["seconds"],
                "created_at": now, "notice": r.get("notice"),
            })
        db.execute("UPDATE series SET status = ?, reason_code = ?, reason = ?, updated_at = ? "
                   "WHERE series_instance_uid = ?",
                   [record["status"], record["reason_code"], record["reason"], now, uid])
        reviews.carry_over(db, reviews.previous_analysis(db, analysis_id), analysis_id)
        refresh_study(db, study)
    return analysis_id

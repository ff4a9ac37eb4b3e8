"""Local validation before go-live: score a model on the site's own labelled cases.

DATA is a folder with one sub-folder per class (names such as ``covid`` /
``non-covid`` or ``positive`` / ``negative``) holding image slices (PNG, JPEG)
or DICOM studies (one sub-folder or loose files per study), or a CSV of
``study_instance_uid,label`` whose studies were already analysed here.
Reports sensitivity, specificity, accuracy, F1 and AUC with 95% confidence
intervals at the threshold in force, and the threshold that would reach a
chosen sensitivity; the admin may record that as the site's operating point.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from appliance.config import Settings
from appliance.errors import ApplianceError, SeriesRejected
from appliance.inference.registry import shared_registry
from appliance.metrics import binary_metrics, threshold_for_sensitivity
from appliance.pipelines import chest_covid19, chest_opacity, lung_emphysema
from appliance.pipelines.lung_regions import NotApplicable
from appliance.pipelines.lung_segmentation import segment_or_fallback
from appliance.series.volume import CTVolume, load_series
from appliance.store.database import audit, open_database, site_threshold, utcnow, write_transaction

POSITIVE = {"covid", "covid19", "positive", "abnormal", "lesion", "cancer", "1", "yes"}
NEGATIVE = {"non-covid", "noncovid", "normal", "negative", "0", "no"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SCORERS = {chest_covid19.MODEL_ID}  # classifier packs
MEASUREMENTS = {chest_opacity.MODEL_ID: chest_opacity, lung_emphysema.MODEL_ID: lung_emphysema}


class EvaluationError(ApplianceError):
    """The evaluation data cannot be used (one sentence says why)."""


def _label(name: str) -> int:
    key = name.strip().lower()
    if key in POSITIVE:
        return 1
    if key in NEGATIVE:
        return 0
    raise EvaluationError(f"class folder {name!r} is neither positive ({', '.join(sorted(POSITIVE))}) "
                          f"nor negative ({', '.join(sorted(NEGATIVE))})")


@dataclasses.dataclass
class Scorer:
    """How one model scores a case: its identity, its default threshold, and its scoring of a CT volume
    (and of a 2-D image slice, for classifiers trained on such slices)."""

    model: str
    version: str
    validated: bool
    notice: str
    default_threshold: float
    backend: str
    precision: str
    score_volume: Callable[[CTVolume], float]
    score_image: Callable[[Path], float] | None = None
    default_source: str = "manifest"  # where the default threshold comes from


def _image_scorer(session, pack) -> Callable[[Path], float]:
    def score(path: Path) -> float:
        from PIL import Image

        from appliance.pipelines.chest_preprocess import prepare_gray

        x = prepare_gray(np.asarray(Image.open(path).convert("L")))[None, None].astype(np.float32)
        return float(session.run({pack.input_name: x})["probability"][0, 0])
    return score


def _scorer(model: str, settings: Settings) -> Scorer:
    """The scorer of ``model``: a classifier pack, or one of the appliance's lung measurements."""
    registry = shared_registry(settings)

    def lung_mask(volume: CTVolume):
        return segment_or_fallback(volume, registry, body_threshold_hu=settings.body_threshold_hu,
                                   lung_threshold_hu=settings.lung_threshold_hu)[0]

    if model in MEASUREMENTS:
        step = MEASUREMENTS[model]

        def measure(volume: CTVolume) -> float:
            score = step.run(volume, lung_mask(volume), None).score
            if score is None:
                raise EvaluationError(f"{model} gave no score for the series")
            return float(score)
        return Scorer(model, step.VERSION, False, step.NOTICE, float(step.DEFAULT_THRESHOLD_PERCENT), "numpy", "fp32",
                      measure, default_source="published default")
    pack = registry.pack(model)
    if pack is None or model not in SCORERS:
        known = sorted({p.id for p in registry.packs if p.id in SCORERS} | set(MEASUREMENTS))
        raise EvaluationError(f"no model {model!r} to evaluate (known here: {', '.join(known)})")
    session, choice = registry.session(pack)

    def classify(volume: CTVolume) -> float:
        score = chest_covid19.run(volume, lung_mask(volume), session, pack, None).score
        if score is None:
            raise EvaluationError("the model gave no score for the series")
        return float(score)
    return Scorer(pack.id, pack.version, pack.validated, pack.notice, pack.threshold, choice.backend,
                  choice.precision, classify, _image_scorer(session, pack))


def _score_study(files: list[Path], scorer: Scorer, settings: Settings) -> float:
    """Score the largest CT series among ``files`` with the model's volume pipeline."""
    series: dict[str, list[Path]] = collections.defaultdict(list)
    for f in files:
        try:
            series[str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)].append(f)
        except Exception:  # nosec B112 - a file that is not DICOM is not part of any series
            continue
    errors = []
    for _, paths in sorted(series.items(), key=lambda kv: -len(kv[1])):
        try:
            return scorer.score_volume(load_series(paths, settings))
        except (SeriesRejected, NotApplicable, chest_covid19.NotApplicable) as exc:
            errors.append(str(exc))
    raise EvaluationError("; ".join(errors) or "no DICOM series")


def _folder_items(data: Path) -> list[tuple[str, int, list[Path]]]:
    """(name, label, files) per case: one image, one study folder, or the loose DICOM files of a class."""
    items = []
    for class_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        label = _label(class_dir.name)
        loose = []
        for entry in sorted(class_dir.iterdir()):
            if entry.is_dir():
                files = sorted(p for p in entry.rglob("*") if p.is_file())
                items.append((f"{class_dir.name}/{entry.name}", label, files))
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                items.append((f"{class_dir.name}/{entry.name}", label, [entry]))
            elif entry.is_file():
                loose.append(entry)
        if loose:
            items.append((f"{class_dir.name}/*", label, loose))
    if not items:
        raise EvaluationError(f"{data} holds no class folders with cases")
    return items


def _csv_scores(path: Path, settings: Settings, model: str) -> tuple[list[int], list[float], list[dict]]:
    db = open_database(settings.home_path)
    labels, scores, skipped = [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            uid, label = row["study_instance_uid"].strip(), row["label"].strip()
            found = db.execute(
                "SELECT max(r.score) FROM results r JOIN analyses a ON a.id = r.analysis_id "
                "WHERE a.study_instance_uid = ? AND a.superseded = 0 AND r.model = ?", [uid, model]).fetchone()
            if found is None or found[0] is None:
                skipped.append({"case": uid, "why": f"no {model} result stored for this study"})
                continue
            labels.append(_label(label))
            scores.append(float(found[0]))
    return labels, scores, skipped


def evaluate(model: str, data: Path, settings: Settings, sensitivity: float = 0.9) -> dict[str, Any]:
    """Score every case of ``data`` and return the evaluation document."""
    scorer = _scorer(model, settings)
    labels: list[int] = []
    scores: list[float] = []
    skipped: list[dict] = []
    if data.is_file() and data.suffix.lower() == ".csv":
        labels, scores, skipped = _csv_scores(data, settings, model)
    else:
        for name, label, files in _folder_items(data):
            try:
                if len(files) == 1 and files[0].suffix.lower() in IMAGE_SUFFIXES:
                    if scorer.score_image is None:
                        raise EvaluationError(f"{model} measures Hounsfield units: it needs DICOM CT, not a picture")
                    score = scorer.score_image(files[0])
                else:
                    score = _score_study(files, scorer, settings)
            except (EvaluationError, OSError) as exc:
                skipped.append({"case": name, "why": str(exc)})
                continue
            labels.append(label)
            scores.append(score)
    if not labels or len(set(labels)) < 2:
        raise EvaluationError("evaluation needs scored cases of both classes")
    y, s = np.array(labels), np.array(scores)
    site = site_threshold(open_database(settings.home_path), scorer.model, scorer.version)
    threshold = site if site is not None else scorer.default_threshold
    suggested = threshold_for_sensitivity(y, s, sensitivity)
    return {
        "model": scorer.model, "model_version": scorer.version, "validated": scorer.validated,
        "notice": scorer.notice, "backend": scorer.backend, "precision": scorer.precision, "cases": len(labels),
        "positives": int(y.sum()),
        "threshold": {"value": threshold,
                      "source": "site operating point" if site is not None else scorer.default_source},
        "metrics": binary_metrics(y, s, threshold),
        "for_sensitivity": {"target": sensitivity, "threshold": suggested, "metrics": binary_metrics(y, s, suggested)},
        "skipped": skipped,
    }


def record_operating_point(settings: Settings, doc: dict[str, Any], actor: str) -> None:
    """Make the threshold that reached the target sensitivity the site's operating point (audited)."""
    db = open_database(settings.home_path)
    point = doc["for_sensitivity"]
    with write_transaction(db):
        db.table("operating_points").insert({
            "model": doc["model"], "model_version": doc["model_version"], "threshold": point["threshold"],
            "target_sensitivity": point["target"], "evaluation": json.dumps(doc), "recorded_by": actor,
            "recorded_at": utcnow()})
        audit(db, actor, "record_operating_point", doc["model"], version=doc["model_version"],
              threshold=point["threshold"], target_sensitivity=point["target"], cases=doc["cases"])

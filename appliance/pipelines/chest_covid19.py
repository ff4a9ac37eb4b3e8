"""Chest COVID-19 screening on a CT volume with the ``chest-covid19`` model pack (research use only).

A classifier: off on a real deployment until the site evaluated it (:mod:`appliance.inference.policy`).
Lung-window axial slices covering the lungs (from the lung mask) ->
cropped to the lungs on each slice -> the same preparation as in training
(crop to the body, resize, standardise) -> per-slice probability and class activation map -> study
score -> flag against the manifest threshold -> key slices with heatmaps.

Study score (documented aggregation): the mean of the highest quarter of
slice probabilities (at least ``MIN_TOP_SLICES`` slices). COVID-19 pneumonia is
multifocal, so several slices carry it; averaging the top quarter is steadier
than the single highest slice and is not diluted by the many normal slices at
the apices and bases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from appliance.pipelines import StepResult, overlays
from appliance.pipelines.chest_preprocess import INPUT_SIZE, body_box, standardise, window_to_gray
from appliance.pipelines.key_images import save_key_image
from appliance.pipelines.lungs import Segmentation
from appliance.series.volume import CTVolume

MODEL_ID = "chest-covid19"
MAX_SLICES = 48
MIN_LUNG_AREA_FRACTION = 0.25  # of the largest lung cross-section, for a slice to count as covering lung
MIN_TOP_SLICES = 3
KEY_SLICES = 3
OVERLAY_DILATION = 3  # pixels of the half-resolution lung mask
BATCH = 16
LUNG_CROP_MARGIN = 0.3  # of the lungs' box on each side: about the field of the training images


def lung_slices(seg: Segmentation, max_slices: int = MAX_SLICES) -> np.ndarray:
    """Indices of axial slices with substantial lung, evenly thinned to at most ``max_slices``."""
    area = (seg.lungs > 0).sum(axis=(1, 2))
    if area.max() == 0:
        return np.array([], dtype=int)
    candidates = np.flatnonzero(area >= MIN_LUNG_AREA_FRACTION * area.max())
    if len(candidates) > max_slices:
        candidates = candidates[np.linspace(0, len(candidates) - 1, max_slices).round().astype(int)]
    return candidates


def lung_box(seg: Segmentation, k: int, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of both lungs on slice ``k`` in full-resolution pixels, with a margin of
    ``LUNG_CROP_MARGIN`` of the box's size: the field the training images show (cropped chest slices)."""
    rows, cols = np.nonzero(seg.lungs[k])
    if len(rows) == 0:
        return None
    s = seg.stride
    top, bottom, left, right = rows.min() * s, (rows.max() + 1) * s, cols.min() * s, (cols.max() + 1) * s
    mr, mc = int(LUNG_CROP_MARGIN * (bottom - top)), int(LUNG_CROP_MARGIN * (right - left))
    return max(0, top - mr), min(shape[0], bottom + mr), max(0, left - mc), min(shape[1], right + mc)


def input_region(gray: np.ndarray, box: tuple[int, int, int, int] | None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the slice that the model input shows: the lung crop ``box`` (or the whole
    slice) narrowed to the body as :func:`~appliance.pipelines.chest_preprocess.prepare_gray` narrows it."""
    top, bottom, left, right = box or (0, gray.shape[0], 0, gray.shape[1])
    inner = body_box(gray[top:bottom, left:right])
    if inner is None:
        return top, bottom, left, right
    return top + inner[0], top + inner[1], left + inner[2], left + inner[3]


def model_inputs(volume: CTVolume, indices: np.ndarray, seg: Segmentation | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int, int, int]]]:
    """(N, 1, size, size) prepared inputs, the lung-window grey slices they came from, and the region of
    each slice the input shows.

    With ``seg``, each slice is first cropped to its lungs (:func:`lung_box`), so the model reads the lung
    fields as its training images (cropped chest slices) show them; the crop is then prepared as a training
    image is.
    """
    grays = [window_to_gray(volume.hu[k]) for k in indices]
    regions = [input_region(g, lung_box(seg, int(k), g.shape) if seg is not None else None)
               for k, g in zip(indices, grays)]
    x = [prepare_region(g, r)[None] for g, r in zip(grays, regions)]
    return np.stack(x).astype(np.float32), grays, regions


def prepare_region(gray: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    top, bottom, left, right = region
    crop = Image.fromarray(gray[top:bottom, left:right])
    return standardise(np.asarray(crop.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR), dtype=np.float32))


def aggregate(probabilities: np.ndarray) -> float:
    """Study score: mean of the highest quarter of slice probabilities (at least 3 slices)."""
    k = max(MIN_TOP_SLICES, int(np.ceil(len(probabilities) / 4)))
    return float(np.sort(probabilities)[::-1][:k].mean())


def _lung_overlay_mask(seg: Segmentation, k: int, shape: tuple[int, int]) -> np.ndarray:
    """Where the heatmap may be drawn on slice ``k``: the lungs, a little dilated (the model reads lung)."""
    from scipy import ndimage

    small = ndimage.binary_dilation(seg.lungs[k] > 0, iterations=OVERLAY_DILATION)
    full = np.repeat(np.repeat(small, seg.stride, axis=0), seg.stride, axis=1)
    out = np.zeros(shape, dtype=bool)
    out[: min(shape[0], full.shape[0]), : min(shape[1], full.shape[1])] = full[: shape[0], : shape[1]]
    return out


def _heat(gray: np.ndarray, cam: np.ndarray, region: tuple[int, int, int, int],
          where: np.ndarray | None = None) -> np.ndarray:
    """The activation map (logits) as 0..1 over the region the input showed, zero outside ``where`` (the lungs)."""
    heat = np.zeros(gray.shape, dtype=np.float32)
    top, bottom, left, right = region
    level = 1 / (1 + np.exp(-cam))  # logits -> 0..1
    heat[top:bottom, left:right] = np.asarray(
        Image.fromarray(level.astype(np.float32)).resize((right - left, bottom - top), Image.Resampling.BILINEAR))
    if where is not None:
        heat[~where] = 0
    return heat


def _heatmap_png(gray: np.ndarray, heat: np.ndarray, path: Path, notice: str | None) -> None:
    """Key image: lung-window slice with the activation map in red."""
    rgb: np.ndarray = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    alpha = np.clip((heat - 0.5) * 2, 0, 1)[..., None] * 0.6
    rgb = rgb * (1 - alpha) + np.array([255.0, 40.0, 0.0]) * alpha
    save_key_image(rgb, path, notice)


def run(volume: CTVolume, seg: Segmentation, session, pack, artefacts: Path | None,
        threshold: float | None = None) -> StepResult:
    """Score ``volume`` for COVID-19 pneumonia; key slices with heatmaps go to ``artefacts``.

    ``threshold`` is the site's recorded operating point, when there is one; else the manifest's.
    """
    threshold = pack.threshold if threshold is None else threshold
    indices = lung_slices(seg)
    if len(indices) == 0:
        raise NotApplicable("no lungs found in this series")
    x, grays, regions = model_inputs(volume, indices, seg)
    probs, cams = [], []
    for i in range(0, len(x), BATCH):
        out = session.run({pack.input_name: x[i:i + BATCH]})
        probs.append(out["probability"][:, 0])
        cams.append(out["cam"][:, 0])
    probabilities, maps = np.concatenate(probs), np.concatenate(cams)
    score = aggregate(probabilities)
    findings: list[dict[str, Any]] = []
    heats = [_heat(grays[j], maps[j], regions[j], _lung_overlay_mask(seg, int(k), grays[j].shape))
             for j, k in enumerate(indices)]
    if artefacts is not None:
        overlays.save(artefacts / f"overlay-{MODEL_ID}.npz", [int(k) for k in indices],
                      [overlays.shrink(np.clip((h - 0.5) * 2, 0, 1)) for h in heats])
    for rank, j in enumerate(np.argsort(probabilities)[::-1][:KEY_SLICES]):
        k = int(indices[j])
        centre = volume.world(np.array([k, volume.hu.shape[1] / 2, volume.hu.shape[2] / 2]))
        finding = {"name": "key slice", "rank": rank + 1, "slice_index": k,
                   "probability": round(float(probabilities[j]), 4), "z_mm": round(float(centre[2]), 1)}
        if artefacts is not None:
            path = artefacts / f"{MODEL_ID}-key{rank + 1}-slice{k:04d}.png"
            _heatmap_png(grays[j], heats[j], path, None if pack.validated else "Not validated: research use only")
            finding["key_image"] = str(path)
        findings.append(finding)
    findings.append({"name": "slices scored", "count": int(len(indices)),
                     "slice_range": [int(indices.min()), int(indices.max())],
                     "input_size": INPUT_SIZE, "aggregation": "mean of the highest quarter of slice probabilities"})
    return StepResult(pack.id, pack.version, pack.validated, session.backend, session.precision, round(score, 4),
                      threshold, score >= threshold, findings, notice=pack.notice)


class NotApplicable(Exception):
    """The model does not apply to this series (the reason is shown instead of a result)."""


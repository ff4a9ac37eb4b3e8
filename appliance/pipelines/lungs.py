"""Body and lung segmentation by HU thresholds, connected components and morphology.

Classical and deterministic: the body is the largest connected component
above ``body_threshold_hu`` with its holes filled slice by slice; lungs are
connected regions inside it below ``lung_threshold_hu`` whose mean density
is that of aerated lung (bowel gas is denser-free air, near -1000 HU, and
is left out). Lungs are split left/right at the body's midline. Runs at half
in-plane resolution: volumes change by well under 1% and it is 4x faster.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from appliance.pipelines import StepResult
from appliance.series.volume import CTVolume

MODEL = "lungs-classical"
VERSION = "1.0.0"
BODY_REGION = "chest"  # the analysis runs it only on a series covering the chest
IN_PLANE_STRIDE = 2
LUNG_MEAN_HU = (-970.0, -600.0)  # mean density of aerated lung parenchyma
MIN_LUNG_ML = 30.0
ADULT_LUNG_ML = (2000.0, 8000.0)  # plausible total adult lung volume at inspiration


@dataclasses.dataclass
class Segmentation:
    """Masks on the subsampled grid ``hu[:, ::stride, ::stride]``."""

    body: np.ndarray
    lungs: np.ndarray  # 0 none, 1 right lung, 2 left lung (patient's sides)
    stride: int
    source: str = MODEL  # the step that made the lung mask: "lungs-classical" or "lung-segmentation"


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def segment(volume: CTVolume, body_threshold_hu: int = -500, lung_threshold_hu: int = -400,
            stride: int = IN_PLANE_STRIDE) -> Segmentation:
    """Segment body and lungs of ``volume`` on the grid ``hu[:, ::stride, ::stride]``."""
    s = stride
    hu = volume.hu[:, ::s, ::s]
    body = _fill_slices(_largest_component(ndimage.binary_opening(hu > body_threshold_hu, iterations=1)))
    candidates = body & (hu < lung_threshold_hu)
    candidates = ndimage.binary_opening(candidates, iterations=1)
    labels, count = ndimage.label(candidates)
    voxel_ml = volume.voxel_volume_ml * s * s
    lungs = np.zeros(hu.shape, dtype=np.uint8)
    if count:
        index = np.arange(1, count + 1)
        flat = labels.ravel()
        voxels = np.bincount(flat, minlength=count + 1)[1:]  # one pass each; ndimage's stats take 10x longer
        means = np.bincount(flat, weights=hu.ravel(), minlength=count + 1)[1:] / np.maximum(voxels, 1)
        sizes = voxels * voxel_ml
        keep = index[(sizes >= MIN_LUNG_ML) & (means > LUNG_MEAN_HU[0]) & (means < LUNG_MEAN_HU[1])]
        lung_mask = np.isin(labels, keep)
        lungs = _split_sides(lung_mask, body, volume, s)
    return Segmentation(body=body, lungs=lungs, stride=s)


def _split_sides(lung_mask: np.ndarray, body: np.ndarray, volume: CTVolume, stride: int) -> np.ndarray:
    """1 = patient's right, 2 = patient's left, split at the body's centre along patient x (LPS)."""
    out = np.zeros(lung_mask.shape, dtype=np.uint8)
    if not lung_mask.any():
        return out
    x_axis = volume.plan.direction[:, 0]
    y_axis = volume.plan.direction[:, 1]
    dy, dx = volume.spacing_mm_zyx[1] * stride, volume.spacing_mm_zyx[2] * stride
    rows, cols = lung_mask.shape[1:]
    # patient-x (LPS: +x is the patient's left) of every in-plane pixel
    patient_x = (np.arange(cols)[None, :] * dx * x_axis[0] + np.arange(rows)[:, None] * dy * y_axis[0])
    body_pixels = body.sum(axis=0) > 0
    midline = float(np.median(patient_x[body_pixels])) if body_pixels.any() else float(patient_x.mean())
    left = patient_x > midline
    out[lung_mask & ~left[None]] = 1
    out[lung_mask & left[None]] = 2
    return out


def coverage(seg: Segmentation, volume: CTVolume) -> dict:
    """Whether the lung apices and bases lie inside the scanned range.

    Lungs on the series' first or last slice run on beyond it. Which end is cranial is decided by the
    patient z of the end slices (LPS: +z towards the head), not by the slice index. Returns
    ``apex_covered``, ``base_covered``, ``fully_covered`` and a one-line ``note``.
    """
    lung_slices = np.flatnonzero(seg.lungs.any(axis=(1, 2)))
    if len(lung_slices) == 0:
        return {"apex_covered": False, "base_covered": False, "fully_covered": False,
                "note": "No lung found in this series."}
    last = seg.lungs.shape[0] - 1
    centre = np.array([seg.lungs.shape[1] / 2 * seg.stride, seg.lungs.shape[2] / 2 * seg.stride])
    first_is_cranial = volume.world(np.array([0, *centre]))[2] >= volume.world(np.array([last, *centre]))[2]
    touches_first, touches_last = bool(lung_slices[0] == 0), bool(lung_slices[-1] == last)
    apex_cut, base_cut = (touches_first, touches_last) if first_is_cranial else (touches_last, touches_first)
    if apex_cut and base_cut:
        note = "The lungs run beyond both ends of the series: apices and bases are not covered."
    elif apex_cut:
        note = "The lung apices are cut off at the top of the series; volumes are partial."
    elif base_cut:
        note = "The lung bases are cut off at the bottom of the series; volumes are partial."
    else:
        note = "Both lungs are covered from apex to base."
    return {"apex_covered": not apex_cut, "base_covered": not base_cut,
            "fully_covered": not (apex_cut or base_cut), "note": note}


def _region(mask: np.ndarray, volume: CTVolume, stride: int, name: str) -> dict:
    zyx = np.argwhere(mask)
    voxel_ml = volume.voxel_volume_ml * stride * stride
    centroid = zyx.mean(axis=0) * np.array([1, stride, stride])
    return {"name": name, "volume_ml": round(float(len(zyx) * voxel_ml), 1),
            "slice_range": [int(zyx[:, 0].min()), int(zyx[:, 0].max())],
            "centroid_mm": [round(float(v), 1) for v in volume.world(centroid)]}


def run(volume: CTVolume, body_threshold_hu: int = -500, lung_threshold_hu: int = -400,
        seg: Segmentation | None = None) -> StepResult:
    """Segment (unless ``seg`` is given) and measure body and lungs (mL).

    A measurement, never a flag: when the lungs are fully covered but their volume is outside the adult
    range, the finding and the notice say so.
    """
    seg = seg if seg is not None else segment(volume, body_threshold_hu, lung_threshold_hu)
    findings = []
    if seg.body.any():
        findings.append(_region(seg.body, volume, seg.stride, "body"))
    for label, name in ((1, "right lung"), (2, "left lung")):
        if (seg.lungs == label).any():
            findings.append(_region(seg.lungs == label, volume, seg.stride, name))
    total = sum(f["volume_ml"] for f in findings if f["name"].endswith("lung"))
    lung_slices = np.flatnonzero(seg.lungs.any(axis=(1, 2)))
    covered = len(lung_slices) > 0 and lung_slices[0] > 0 and lung_slices[-1] < seg.lungs.shape[0] - 1
    outside = bool(covered and not (ADULT_LUNG_ML[0] <= total <= ADULT_LUNG_ML[1]))
    findings.append({"name": "lungs", "total_volume_ml": round(total, 1), "fully_covered": bool(covered),
                     "outside_adult_range": outside})
    # a volume is a measurement, not a flag: out of range, it says so in words
    return StepResult(MODEL, VERSION, True, "numpy", "fp32", round(total, 1), None, False, findings,
                      notice="Volumes from HU thresholds; an adult at full inspiration has 2-8 L of lung."
                      + (f" The total, {total:.0f} mL, is outside that range." if outside else ""))

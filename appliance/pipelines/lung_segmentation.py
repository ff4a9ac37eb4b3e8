"""Learned lung segmentation with the ``lung-segmentation`` model pack (a small 2-D U-Net).

Axial slices -> stored pixel values (HU + 1024), 2x2 mean-pooled to the half-resolution grid the
classical step uses, cropped to the body's bounding box (the network pads with zeros, which is air,
so the crop changes nothing but the cost) -> lung probability on every ``slice_step``-th slice, linearly
interpolated along z between them -> threshold -> post-processing on the grid ``hu[:, ::2, ::2]``:
outside-body false positives dropped, trachea and main bronchi removed, the two largest plausible 3-D
components kept and split into the patient's right (1) and left (2) lung, small holes filled.

The classical step (:mod:`appliance.pipelines.lungs`) stays the fallback when the pack is missing or
refused, and serves as a cross-check of the learned mask.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.pipelines import StepResult, lung_regions, lungs, overlays
from appliance.pipelines.chest_preprocess import window_to_gray
from appliance.pipelines.key_images import save_key_image
from appliance.series.volume import CTVolume

MODEL_ID = "lung-segmentation"
SOURCE = "lung-segmentation"
IN_PLANE_STRIDE = 2  # network input 256x256 for a 512x512 slice; the classical step's grid
STORED_OFFSET = 1024.0  # network input = HU + 1024 (the stored value for the usual rescale intercept)
COARSE_STEP_MM = 12.0  # first pass: where along z is there lung
SLICE_STEP_MM = 5.0  # run the network about every 5 mm along z, interpolate between (bench/lung_mask_options.py)
CROP_MARGIN = 8  # half-resolution pixels of air kept around the body box
CROP_MULTIPLE = 8  # the U-Net pools three times
BATCH = 8  # as fast as 16 on 2 cores, about 120 MiB less peak memory (ONNX Runtime arena)
BODY_THRESHOLD_HU = -500
COARSE_STRIDE = 4  # body box and candidate slices are found on hu[:, ::4, ::4]
MIN_AIR_CM2 = 1.0  # a slice may hold lung when it has this much air inside the body
AIRWAY_HU = -900  # trachea and main bronchi lumen
TRACHEA_AREA_CM2 = (0.8, 8.0)  # cross-section of an adult trachea
MIN_COMPONENT_ML = 20.0
JUNCTION_SEARCH_MM = 40.0  # where to look for the anterior junction line either side of the midline
DICE_DISAGREE = 0.8
RIGHT_RGB = (40.0, 120.0, 255.0)
LEFT_RGB = (40.0, 220.0, 80.0)
KEY_NOTICE = "Not validated: research lung mask"
IN_PLANE = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)  # 2-D cross: never erodes the end slices


# --- preparing the network input ------------------------------------------------------------------

def slice_step(volume: CTVolume, step_mm: float = SLICE_STEP_MM) -> int:
    """Every how many slices the network runs: about ``step_mm`` apart, every slice when slices are thick."""
    return max(1, int(math.floor(step_mm / max(volume.spacing_mm_zyx[0], 1e-3) + 1e-6)))


def pooled(hu: np.ndarray, stride: int = IN_PLANE_STRIDE) -> np.ndarray:
    """(k, H/stride, W/stride) float32 network input of HU slices (k, H, W): HU + 1024, mean-pooled."""
    k, h, w = hu.shape
    h, w = h - h % stride, w - w % stride
    x = hu[:, :h, :w].astype(np.float32).reshape(k, h // stride, stride, w // stride, stride).mean(axis=(2, 4))
    return x + np.float32(STORED_OFFSET)


def coarse_body(volume: CTVolume, threshold_hu: int = BODY_THRESHOLD_HU) -> np.ndarray:
    """Body mask on ``hu[:, ::4, ::4]``: the largest component above ``threshold_hu``, holes filled per slice.

    The opening is in-plane so the first and last slices keep their body (a 3-D opening erodes them).
    """
    hu = volume.hu[:, ::COARSE_STRIDE, ::COARSE_STRIDE]
    body = lungs._largest_component(ndimage.binary_opening(hu > threshold_hu, structure=IN_PLANE, iterations=1))
    return lungs._fill_slices(body)


def candidate_slices(volume: CTVolume, body4: np.ndarray) -> np.ndarray:
    """Indices of slices with at least ``MIN_AIR_CM2`` of air inside the body (lungs can be there)."""
    hu = volume.hu[:, ::COARSE_STRIDE, ::COARSE_STRIDE]
    dy, dx = (s * COARSE_STRIDE for s in volume.spacing_mm_zyx[1:])
    inside = ndimage.binary_erosion(body4, structure=IN_PLANE, iterations=1)
    air = ((hu < -400) & inside).sum(axis=(1, 2)) * dy * dx / 100.0
    return np.flatnonzero(air >= MIN_AIR_CM2)


def crop_box(body4: np.ndarray, shape: tuple[int, int], stride: int = IN_PLANE_STRIDE) -> tuple[slice, slice]:
    """The body's in-plane bounding box on the grid ``hu[:, ::stride, ::stride]`` of ``shape``, with a margin,
    as slices whose lengths are multiples of 8 (the whole grid when there is no body)."""
    rows, cols = np.flatnonzero(body4.any(axis=(0, 2))), np.flatnonzero(body4.any(axis=(0, 1)))
    if len(rows) == 0:
        return slice(0, shape[0]), slice(0, shape[1])
    scale = COARSE_STRIDE / stride
    margin = max(2, CROP_MARGIN * IN_PLANE_STRIDE // stride)
    box = []
    for found, size in ((rows, shape[0]), (cols, shape[1])):
        lo = max(0, int(found[0] * scale) - margin)
        hi = min(size, int((found[-1] + 1) * scale) + margin)
        length = min(size - size % CROP_MULTIPLE, -(-(hi - lo) // CROP_MULTIPLE) * CROP_MULTIPLE)
        lo = max(0, min(lo, size - length))
        box.append(slice(lo, lo + length))
    return box[0], box[1]


# --- running the network --------------------------------------------------------------------------

def predict(volume: CTVolume, session, pack, indices: np.ndarray, box: tuple[slice, slice] | None,
            stride: int = IN_PLANE_STRIDE) -> np.ndarray:
    """Lung probability (len(indices), H', W') float32 of the slices ``indices``, on the stride grid (box crop)."""
    out = []
    for i in range(0, len(indices), BATCH):
        x = pooled(volume.hu[indices[i:i + BATCH]], stride)
        if box is not None:
            x = x[:, box[0], box[1]]
        out.append(session.run({pack.input_name: np.ascontiguousarray(x[:, None])})[pack.manifest["decision"]
                                                                                     ["output"]][:, 0])
    h, w = (out[0].shape[1:] if out else (0, 0))
    return np.concatenate(out) if out else np.zeros((0, h, w), np.float32)


def _run_indices(candidates: np.ndarray, step: int) -> np.ndarray:
    """Every ``step``-th candidate slice, always with the first and last candidate."""
    if len(candidates) == 0:
        return candidates
    picks = candidates[::step]
    return np.union1d(picks, candidates[[-1]])


def interpolate_mask(probs: np.ndarray, indices: np.ndarray, slices: int, threshold: float,
                     upscale: int = 1) -> np.ndarray:
    """Mask (slices, H*upscale, W*upscale) from probabilities known at ``indices``: linear interpolation
    along z between neighbouring run slices (and bilinear in-plane when ``upscale`` > 1), thresholded;
    slices outside the run range are empty."""
    shape = (probs.shape[1] * upscale, probs.shape[2] * upscale)
    mask = np.zeros((slices,) + shape, dtype=bool)
    if len(indices) == 0:
        return mask

    def at(p: np.ndarray) -> np.ndarray:
        return p if upscale == 1 else ndimage.zoom(p, upscale, order=1, grid_mode=True, mode="nearest")

    mask[indices[0]] = at(probs[0]) >= threshold
    for j in range(1, len(indices)):
        a, b = int(indices[j - 1]), int(indices[j])
        for k in range(a + 1, b + 1):
            t = np.float32((k - a) / (b - a))
            mask[k] = at(probs[j - 1] * (1 - t) + probs[j] * t) >= threshold
    return mask


def _refine_ends(volume, session, pack, candidates, indices, probs, box, threshold, stride):
    """Run the network on every candidate slice next to the lung's first and last run slice, so the apex
    and base are found to the slice (coverage depends on them), not to the step."""
    if len(probs) == 0:
        return indices, probs
    positive = np.flatnonzero((probs >= threshold).reshape(len(probs), -1).sum(axis=1) > 0)
    if len(positive) == 0:
        return indices, probs
    extra = []
    for j, direction in ((positive[0], -1), (positive[-1], 1)):
        neighbour = j + direction
        if 0 <= neighbour < len(indices):
            lo, hi = sorted((int(indices[j]), int(indices[neighbour])))
            extra += [k for k in candidates if lo < k < hi]
    extra = np.setdiff1d(np.array(extra, dtype=int), indices)
    if len(extra) == 0:
        return indices, probs
    return _merge(indices, probs, extra, predict(volume, session, pack, extra, box, stride))


def _lung_range(candidates: np.ndarray, indices: np.ndarray, probs: np.ndarray, threshold: float,
                coarse: int) -> np.ndarray:
    """Candidate slices within one coarse step of the slices where the coarse pass found lung."""
    if len(probs) == 0:
        return indices[:0]
    positive = indices[(probs >= threshold).reshape(len(probs), -1).any(axis=1)]
    if len(positive) == 0:
        return positive
    lo, hi = positive.min(), positive.max()
    before, after = indices[indices < lo], indices[indices > hi]
    lo = before.max() if len(before) else lo
    hi = after.min() if len(after) else hi
    return candidates[(candidates >= lo) & (candidates <= hi)]


def lung_probability_mask(volume: CTVolume, session, pack, *, step: int | None = None,
                          body4: np.ndarray | None = None, stride: int | None = None) -> np.ndarray:
    """The raw network mask on the grid ``hu[:, ::2, ::2]`` (bool), before post-processing.

    A coarse pass (every ``COARSE_STEP_MM``) finds the slices with lung; the network then runs every
    ``step``-th slice of that range and on every slice next to its ends; probabilities are interpolated
    along z in between. ``stride`` is the network's in-plane stride (the manifest's, 2 by default).
    """
    stride = int(pack.manifest["input"].get("in_plane_stride", IN_PLANE_STRIDE)) if stride is None else stride
    body4 = coarse_body(volume) if body4 is None else body4
    step = slice_step(volume) if step is None else step
    net_grid = (volume.hu.shape[1] // stride, volume.hu.shape[2] // stride)
    box = crop_box(body4, net_grid, stride)
    candidates = candidate_slices(volume, body4)
    coarse = max(step, slice_step(volume, COARSE_STEP_MM))
    indices = _run_indices(candidates, coarse)
    probs = predict(volume, session, pack, indices, box, stride)
    span = _lung_range(candidates, indices, probs, pack.threshold, coarse)
    fine = np.setdiff1d(_run_indices(span, step), indices)
    if len(fine):
        indices, probs = _merge(indices, probs, fine, predict(volume, session, pack, fine, box, stride))
    keep = np.isin(indices, span)
    indices, probs = indices[keep], probs[keep]
    indices, probs = _refine_ends(volume, session, pack, candidates, indices, probs, box, pack.threshold, stride)
    net_mask = interpolate_mask(probs, indices, volume.hu.shape[0], pack.threshold, stride // IN_PLANE_STRIDE)
    grid = (-(-volume.hu.shape[1] // IN_PLANE_STRIDE), -(-volume.hu.shape[2] // IN_PLANE_STRIDE))
    mask = np.zeros((volume.hu.shape[0],) + grid, dtype=bool)
    scale = stride // IN_PLANE_STRIDE
    rows = slice(box[0].start * scale, box[0].start * scale + net_mask.shape[1])
    cols = slice(box[1].start * scale, box[1].start * scale + net_mask.shape[2])
    mask[:, rows, cols] = net_mask
    return mask


def _merge(indices, probs, more_indices, more_probs):
    order = np.argsort(np.concatenate([indices, more_indices]))
    return np.concatenate([indices, more_indices])[order], np.concatenate([probs, more_probs])[order]


# --- post-processing ------------------------------------------------------------------------------

def upsample_body(body4: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The coarse body mask on the half-resolution grid ``shape``."""
    scale = COARSE_STRIDE // IN_PLANE_STRIDE
    body = np.repeat(np.repeat(body4, scale, axis=1), scale, axis=2)
    out = np.zeros(shape, dtype=bool)
    out[:, :min(shape[1], body.shape[1]), :min(shape[2], body.shape[2])] = body[:, :shape[1], :shape[2]]
    return out


def airway(hu: np.ndarray, body: np.ndarray, lung_mask: np.ndarray, volume: CTVolume) -> np.ndarray:
    """Trachea and main bronchi on the half-resolution grid: region-grown in air (< -900 HU) from the
    trachea, the air tube at the top centre of the body, outside the lung mask's core (so the growth
    cannot run into aerated parenchyma)."""
    cranial_first = _cranial_first(volume)
    order = range(hu.shape[0]) if cranial_first else range(hu.shape[0] - 1, -1, -1)
    dy, dx = (s * IN_PLANE_STRIDE for s in volume.spacing_mm_zyx[1:])
    seed: tuple[int, int, int] | None = None
    for k in list(order)[: max(1, hu.shape[0] // 4)]:
        found = _trachea_seed(hu[k] < AIRWAY_HU, body[k], dy * dx / 100.0)
        if found is not None:
            seed = (k, *found)
            break
    if seed is None:
        return np.zeros(hu.shape, dtype=bool)
    core = ndimage.binary_erosion(lung_mask, structure=IN_PLANE, iterations=2)
    labels, _ = ndimage.label((hu < AIRWAY_HU) & body & ~core)
    return labels == labels[seed] if labels[seed] else np.zeros(hu.shape, dtype=bool)


def _trachea_seed(air: np.ndarray, body: np.ndarray, pixel_cm2: float) -> tuple[int, int] | None:
    """A pixel of a trachea-sized air blob inside the body, near its centre column, on one slice."""
    rows, cols = np.nonzero(body)
    if len(rows) == 0:
        return None
    labels, count = ndimage.label(air & ndimage.binary_erosion(body, iterations=2))
    if count == 0:
        return None
    centre_col, width = cols.mean(), cols.max() - cols.min() + 1
    best: tuple[float, tuple[int, int]] | None = None
    for index, blob in enumerate(ndimage.find_objects(labels), start=1):
        area = float((labels[blob] == index).sum()) * pixel_cm2
        offset = abs((blob[1].start + blob[1].stop) / 2 - centre_col)
        plausible = TRACHEA_AREA_CM2[0] <= area <= TRACHEA_AREA_CM2[1] and offset < 0.15 * width
        if plausible and (best is None or offset < best[0]):
            pixel = np.argwhere(labels[blob] == index)[0]
            best = (offset, (int(pixel[0] + blob[0].start), int(pixel[1] + blob[1].start)))
    return None if best is None else best[1]


def _cranial_first(volume: CTVolume) -> bool:
    """Whether slice 0 is the most cranial (patient +z in LPS is towards the head)."""
    last = volume.hu.shape[0] - 1
    centre = (volume.hu.shape[1] / 2, volume.hu.shape[2] / 2)
    return bool(volume.world(np.array([0, *centre]))[2] > volume.world(np.array([last, *centre]))[2])


def _patient_x(volume: CTVolume, shape: tuple[int, int], stride: int) -> np.ndarray:
    """Patient x (LPS mm, + is the patient's left) of every pixel of the stride grid."""
    x_axis, y_axis = volume.plan.direction[:, 0], volume.plan.direction[:, 1]
    dy, dx = volume.spacing_mm_zyx[1] * stride, volume.spacing_mm_zyx[2] * stride
    return np.arange(shape[1])[None, :] * dx * x_axis[0] + np.arange(shape[0])[:, None] * dy * y_axis[0]


def _midline(patient_x: np.ndarray, body: np.ndarray) -> float:
    pixels = body.any(axis=0)
    return float(np.median(patient_x[pixels])) if pixels.any() else float(patient_x.mean())


def _split_slice(section: np.ndarray, patient_x: np.ndarray, midline: float, search: float) -> np.ndarray:
    """One axial section of lungs that touch: 2-D components on either side of the midline keep their
    side; a component straddling it is cut at its narrowest column near the midline (the junction line)."""
    out = np.zeros(section.shape, dtype=np.uint8)
    labels, count = ndimage.label(section)
    for index in range(1, count + 1):
        part = labels == index
        px = patient_x[part]
        left_share = float((px > midline).mean())
        if 0.1 < left_share < 0.9:
            cut = _junction(part, patient_x, midline, search)
            out[part & (patient_x <= cut)] = 1
            out[part & (patient_x > cut)] = 2
        else:
            out[part] = 2 if left_share >= 0.9 else 1
    return out


def _junction(part: np.ndarray, patient_x: np.ndarray, midline: float, search: float) -> float:
    """Patient x of the narrowest column of ``part`` within ``search`` mm of the midline: where two lungs
    touch, the anterior junction line is the thinnest place of the joined section."""
    along_columns = np.ptp(patient_x[0]) >= np.ptp(patient_x[:, 0])  # patient x changes across the columns
    xs = patient_x[0] if along_columns else patient_x[:, 0]
    thickness = part.sum(axis=0 if along_columns else 1).astype(float)
    near = (np.abs(xs - midline) <= search) & (thickness > 0)
    if not near.any():
        return midline
    thickness[~near] = np.inf
    return float(xs[int(np.argmin(thickness))])


def split_lungs(mask: np.ndarray, hu: np.ndarray, patient_x: np.ndarray, midline: float,
                voxel_ml: float) -> np.ndarray:
    """Label map 1 right / 2 left lung from a lung mask: the two largest plausible 3-D components, each
    assigned its side by its centroid; when one component holds both lungs (they touch at the anterior
    junction), it is split slice by slice at the junction line (midline as the fallback).

    ``patient_x`` is the patient x (mm, + = patient's left) of every in-plane pixel, ``midline`` the body's.
    """
    out = np.zeros(mask.shape, dtype=np.uint8)
    labels, count = ndimage.label(mask)
    if count == 0:
        return out
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count + 1)[1:]
    means = np.bincount(flat, weights=hu.ravel(), minlength=count + 1)[1:] / np.maximum(sizes, 1)
    plausible = np.flatnonzero((sizes * voxel_ml >= MIN_COMPONENT_ML) & (means < lungs.LUNG_MEAN_HU[1]))
    keep = plausible[np.argsort(sizes[plausible])[::-1][:2]] + 1
    left = patient_x > midline
    for index in keep:
        component = labels == index
        side_share = float(left[np.nonzero(component)[1:]].mean())
        if len(keep) == 1 or 0.25 < side_share < 0.75:
            for k in np.flatnonzero(component.any(axis=(1, 2))):
                split = _split_slice(component[k], patient_x, midline, JUNCTION_SEARCH_MM)
                out[k][split > 0] = split[split > 0]
        else:
            out[component] = 2 if side_share >= 0.5 else 1
    return out


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice, slice] | None:
    """The bounding box of ``mask`` grown by ``margin`` in-plane (not along z), or None when it is empty."""
    box = []
    for axis in range(3):
        found = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(found) == 0:
            return None
        m = 0 if axis == 0 else margin
        box.append(slice(max(0, found[0] - m), min(mask.shape[axis], found[-1] + 1 + m)))
    return box[0], box[1], box[2]


def fill_holes(label_map: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Fill the holes of each lung (vessels, nodules, enclosed opacities) but not the dome of the diaphragm,
    which the lung surrounds on the slices above it and which opens onto the abdomen below
    (:func:`~appliance.pipelines.lung_regions.fill_enclosed_holes`)."""
    return lung_regions.fill_enclosed_holes(label_map, pixel_mm)


def postprocess(raw: np.ndarray, body: np.ndarray, volume: CTVolume) -> np.ndarray:
    """Lung label map (1 right, 2 left) from the raw network mask, on the half-resolution grid.

    Works inside the mask's bounding box: the cost follows the lungs, not the scan length or field of view.
    """
    out = np.zeros(raw.shape, dtype=np.uint8)
    box = _bounding_box(raw & body, margin=4)
    if box is None:
        return out
    hu = volume.hu[box[0], IN_PLANE_STRIDE * box[1].start:IN_PLANE_STRIDE * box[1].stop:IN_PLANE_STRIDE,
                   IN_PLANE_STRIDE * box[2].start:IN_PLANE_STRIDE * box[2].stop:IN_PLANE_STRIDE]
    mask = raw[box] & body[box]
    mask &= ~airway(hu, body[box], mask, volume)
    patient_x = _patient_x(volume, raw.shape[1:], IN_PLANE_STRIDE)
    midline = _midline(patient_x, body)
    voxel_ml = volume.voxel_volume_ml * IN_PLANE_STRIDE ** 2
    pixel_mm = float(volume.spacing_mm_zyx[1]) * IN_PLANE_STRIDE
    out[box] = fill_holes(split_lungs(mask, hu, patient_x[box[1], box[2]], midline, voxel_ml), pixel_mm)
    return out


def segment(volume: CTVolume, session, pack, *, step: int | None = None) -> lungs.Segmentation:
    """Lungs of ``volume`` with the ``lung-segmentation`` pack: a :class:`lungs.Segmentation` on the grid
    ``hu[:, ::2, ::2]`` (lungs 1 right, 2 left; body from the coarse body mask) with ``source`` set.

    ``step`` overrides how many slices apart the network runs (default: about 5 mm).
    """
    body4 = coarse_body(volume)
    raw = lung_probability_mask(volume, session, pack, step=step, body4=body4)
    body = upsample_body(body4, raw.shape)
    return lungs.Segmentation(body=body, lungs=postprocess(raw, body, volume), stride=IN_PLANE_STRIDE,
                              source=SOURCE)


# --- coverage and the step's result ---------------------------------------------------------------

def coverage(seg: lungs.Segmentation, volume: CTVolume) -> dict[str, Any]:
    """Whether the lung apices and bases are inside the scanned range.

    Lungs touching the series' first or last slice run on beyond it; which end is the apex is decided by
    the patient z of the slices (LPS: +z towards the head), not by the slice index.
    """
    return lungs.coverage(seg, volume)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def cross_check_findings(seg: lungs.Segmentation, other: lungs.Segmentation) -> tuple[dict[str, Any], str | None]:
    """Dice per lung between two segmentations on the same grid, and a note when they disagree badly."""
    other_lungs = _regrid(other, seg) if other.lungs.shape != seg.lungs.shape else other.lungs
    per_lung = {name: round(dice(seg.lungs == label, other_lungs == label), 4)
                for label, name in ((1, "right lung"), (2, "left lung"))}
    bad = [f"{name} {d:.2f}" for name, d in per_lung.items() if d < DICE_DISAGREE]
    note = None
    if bad:
        note = (f"The learned and the classical lung masks disagree (Dice {', '.join(bad)}, below {DICE_DISAGREE}): "
                "check the key slices before relying on lung measurements.")
    return {"name": "cross-check", "against": getattr(other, "source", lungs.MODEL), "dice": per_lung}, note


def _regrid(other: lungs.Segmentation, seg: lungs.Segmentation) -> np.ndarray:
    """``other``'s lung labels on ``seg``'s grid (nearest neighbour; both grids start at pixel 0)."""
    ratio = seg.stride / other.stride
    rows = np.minimum((np.arange(seg.lungs.shape[1]) * ratio).astype(int), other.lungs.shape[1] - 1)
    cols = np.minimum((np.arange(seg.lungs.shape[2]) * ratio).astype(int), other.lungs.shape[2] - 1)
    return other.lungs[:, rows][:, :, cols]


def mask_key_image(volume: CTVolume, seg: lungs.Segmentation, artefacts: Path, notice: str | None,
                   model_id: str = MODEL_ID) -> dict[str, Any] | None:
    """Key image of the lung mask on the slice where the lungs are largest (right lung blue, left green), and
    the mask as the viewer's overlay: the reader sees what every lung measurement was made on."""
    area = (seg.lungs > 0).sum(axis=(1, 2))
    if not area.any():
        return None
    k = int(np.argmax(area))
    gray = window_to_gray(volume.hu[k]).astype(np.float32)
    s = seg.stride
    label = np.repeat(np.repeat(seg.lungs[k], s, axis=0), s, axis=1)[: gray.shape[0], : gray.shape[1]]
    edge = label != ndimage.grey_erosion(label, size=(3, 3))
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for value, colour in ((1, RIGHT_RGB), (2, LEFT_RGB)):
        where = edge & (label == value)
        rgb[where] = np.array(colour)
    path = artefacts / f"{model_id}-key1-slice{k:04d}.png"
    save_key_image(rgb, path, notice)
    step = max(1, len(area) // 64)  # the mask on every few slices is enough for the viewer
    shown = [int(i) for i in np.flatnonzero(area)[::step]]
    overlays.save(artefacts / f"overlay-{model_id}.npz", shown,
                  [overlays.shrink((seg.lungs[i] > 0).astype(np.float32) * 0.5) for i in shown])
    centre = volume.world(np.array([k, volume.hu.shape[1] / 2, volume.hu.shape[2] / 2]))
    return {"name": "key slice", "rank": 1, "slice_index": k, "z_mm": round(float(centre[2]), 1),
            "key_image": str(path)}


def run(volume: CTVolume, seg: lungs.Segmentation, *, cross_check: lungs.Segmentation | None = None,
        pack=None, session=None, artefacts: Path | None = None) -> StepResult:
    """Measure the learned lung mask: volume (mL), slice range and centroid per lung, the total, the
    coverage, and the Dice against ``cross_check`` (the classical mask) when one is given."""
    findings: list[dict[str, Any]] = []
    for label, name in ((1, "right lung"), (2, "left lung")):
        if (seg.lungs == label).any():
            findings.append(lungs._region(seg.lungs == label, volume, seg.stride, name))
    total = round(sum(f["volume_ml"] for f in findings), 1)
    cover = coverage(seg, volume)
    outside = bool(cover["fully_covered"] and not (lungs.ADULT_LUNG_ML[0] <= total <= lungs.ADULT_LUNG_ML[1]))
    findings.append({"name": "lungs", "total_volume_ml": total, **cover, "outside_adult_range": outside})
    notices = [cover["note"]]
    if outside:
        notices.append(f"The total lung volume, {total:.0f} mL, is outside the 2-8 L of an adult at full inspiration.")
    flagged = False  # a volume is a measurement, not a flag
    if cross_check is not None:
        finding, note = cross_check_findings(seg, cross_check)
        findings.append(finding)
        if note:
            notices.append(note)
    if pack is not None and not pack.validated:
        notices.append(pack.notice)
    if artefacts is not None:
        key = mask_key_image(volume, seg, artefacts, KEY_NOTICE if pack is None or not pack.validated else None)
        if key is not None:
            findings.append(key)
    version = pack.version if pack is not None else "unknown"
    backend = getattr(session, "backend", "onnxruntime")
    precision = getattr(session, "precision", "fp32")
    validated = bool(pack.validated) if pack is not None else False
    return StepResult(MODEL_ID, version, validated, backend, precision, total, None, flagged, findings,
                      notice=" ".join(notices))


def segment_or_fallback(volume: CTVolume, registry, *, body_threshold_hu: int = -500,
                        lung_threshold_hu: int = -400) -> tuple[lungs.Segmentation, str | None]:
    """The learned lung mask when the pack is installed and loads, else the classical one, with the reason
    for the fallback (None when the learned mask was used)."""
    pack = registry.pack(MODEL_ID) if registry is not None else None
    if pack is None:
        refused = [r for r in getattr(registry, "refused", []) if MODEL_ID in str(r)]
        why = f"model pack refused: {refused[0].reason}" if refused else "model pack not installed"
        return lungs.segment(volume, body_threshold_hu, lung_threshold_hu), why
    try:
        session, _choice = registry.session(pack)
        learned = segment(volume, session, pack)
    except Exception as exc:  # a broken model file must not stop the study: the classical mask is there
        return lungs.segment(volume, body_threshold_hu, lung_threshold_hu), f"learned lung mask failed: {exc}"
    if learned.lungs.any():
        return learned, None
    classical = lungs.segment(volume, body_threshold_hu, lung_threshold_hu)
    found_ml = float((classical.lungs > 0).sum()) * volume.voxel_volume_ml * classical.stride ** 2
    if found_ml < lungs.MIN_LUNG_ML:
        return learned, None  # no lung in this series by either mask
    return classical, (f"the learned lung mask found no lung where the classical mask found {found_ml:.0f} mL "
                       "(images unlike the chest CT it was trained on, e.g. a small matrix or thick slices)")

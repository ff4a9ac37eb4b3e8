"""Lung regions shared by the lung density measurements: the analysed mask, its pleural rim, zones and slice positions.

All arrays are on the segmentation's grid ``hu[:, ::stride, ::stride]`` and cropped to the lungs' bounding box
(:class:`LungCrop`), so a 300-slice chest costs a few tens of MB in float32.

Zones: each lung's craniocaudal extent (patient z, LPS: +z is cranial, whatever the slice order) is cut into
thirds, upper / middle / lower.
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.pipelines.lungs import Segmentation
from appliance.series.volume import CTVolume

SIDES = ((1, "right"), (2, "left"))  # Segmentation.lungs labels, patient's sides
ZONES = ("upper", "middle", "lower")
MAX_HOLE_CONTACT_MM2 = 200.0  # a slice-hole stack opening this widely onto the next slice is the diaphragm dome
RIM_MM = 3.0  # pleural partial-volume rim: the chest wall blurs into the first ~1-2 voxels of lung
IN_PLANE = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]],
                     [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                     [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], dtype=bool)  # 2-D connectivity, slice by slice


class NotApplicable(Exception):
    """The measurement does not apply to this series (the reason is shown instead of a result)."""


@dataclasses.dataclass
class LungCrop:
    """The lungs' bounding box on the stride grid: HU, side labels (holes filled), rim, zone per voxel."""

    z0: int
    y0: int
    x0: int
    hu: np.ndarray  # float32 HU of the box
    sides: np.ndarray  # uint8 0 / 1 right / 2 left, with holes enclosed in a slice filled
    rim: np.ndarray  # bool, lung voxels within RIM_MM of the lung surface (in-plane or through-plane)
    zones: np.ndarray  # int8 per voxel: -1 outside, 0 upper, 1 middle, 2 lower
    pixel_mm: float  # in-plane spacing of the stride grid
    voxel_ml: float  # volume of one stride-grid voxel
    margin: int = 0  # pixels of non-lung around the lungs in the box

    def lung(self) -> np.ndarray:
        return self.sides > 0


def slice_positions_mm(volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: (position along the slice normal in patient coordinates, patient z (LPS, +z cranial)), mm.

    Both are taken at the slice centre; for an axial series they are the same number (the DICOM patient z).
    """
    n = volume.hu.shape[0]
    centres = np.stack([np.arange(n), np.full(n, volume.hu.shape[1] / 2), np.full(n, volume.hu.shape[2] / 2)], axis=1)
    world = volume.world(centres)
    normal = np.asarray(volume.plan.direction)[:, 2]
    return world @ normal, world[:, 2]


def _slice_holes(lung: np.ndarray) -> np.ndarray:
    """Non-lung voxels enclosed by lung within their slice (vessels, airway walls, enclosed opacities)."""
    padded = np.pad(~lung, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    outside, count = ndimage.label(padded, structure=IN_PLANE)
    border = np.zeros(count + 1, dtype=bool)
    border[np.unique(np.concatenate([outside[:, 0].ravel(), outside[:, -1].ravel()]))] = True
    return (~border[outside] & padded)[:, 1:-1, 1:-1]


def _enclosed_holes(holes: np.ndarray, outside: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, int]:
    """Labels of the hole stacks (3-D connected) that open onto the next slice's outside over less than
    MAX_HOLE_CONTACT_MM2 (0 elsewhere), and the number of labels.

    A vessel or an opacity enclosed by aerated lung opens onto the slices above and below at most through a
    vessel's cross-section; the dome of the diaphragm, a hole in the slices just above it, opens with its whole
    cross-section onto the abdomen below.
    """
    labels, count = ndimage.label(holes)
    if count == 0:
        return labels, 0
    below = labels[1:][outside[:-1]]  # hole voxels whose lower neighbour is outside, and upper
    above = labels[:-1][outside[1:]]
    touching = np.concatenate([below[below > 0], above[above > 0]])
    area = np.bincount(touching, minlength=count + 1) * pixel_mm ** 2
    keep = area < MAX_HOLE_CONTACT_MM2
    keep[0] = False
    return labels * keep[labels], count


def fill_enclosed_holes(box: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Side labels with the lungs' enclosed holes filled (see _enclosed_holes), each hole taking the side of
    most of the lung around it."""
    holes = _slice_holes(box > 0)
    labels, count = _enclosed_holes(holes, (box == 0) & ~holes, pixel_mm)
    sides = box.copy()
    if count == 0 or not labels.any():
        return sides
    around = ndimage.maximum_filter(labels, size=(1, 3, 3))
    ring = (around > 0) & (box > 0)
    votes = np.bincount(around[ring].astype(np.int64) * 3 + box[ring], minlength=(count + 1) * 3).reshape(-1, 3)
    side_of = np.argmax(votes[:, 1:], axis=1).astype(np.uint8) + 1
    filled = labels > 0
    sides[filled] = side_of[labels[filled]]
    return sides


def _rim(lung: np.ndarray, pixel_mm: float, slice_mm: float) -> np.ndarray:
    """Lung voxels within RIM_MM of a non-lung voxel, in-plane and through-plane."""
    width = 2 * max(1, int(round(RIM_MM / pixel_mm))) + 1
    inner = ndimage.minimum_filter(lung.view(np.uint8), size=(1, width, width), mode="constant", cval=0) > 0
    if slice_mm <= RIM_MM * 1.5:  # through-plane partial volume: the slices next to the lung's top and base
        up_down = np.zeros_like(lung)
        up_down[1:-1] = lung[:-2] & lung[2:]
        inner &= up_down
    return lung & ~inner


def _zones(sides: np.ndarray, patient_z: np.ndarray) -> np.ndarray:
    """Upper/middle/lower third of each lung's craniocaudal extent, by patient z."""
    zones = np.full(sides.shape, -1, dtype=np.int8)
    for side, _ in SIDES:
        present = np.flatnonzero((sides == side).any(axis=(1, 2)))
        if len(present) == 0:
            continue
        z = patient_z[present]
        top, bottom = float(z.max()), float(z.min())
        span = max(top - bottom, 1e-6)
        third = np.minimum(((top - z) / span * 3).astype(int), 2)  # 0 = most cranial third
        for k, zone in zip(present, third):
            zones[k][sides[k] == side] = zone
    return zones


_last: list[tuple[tuple[weakref.ref, ...], LungCrop]] = []  # the latest crop, while its volume and mask live


def crop_lungs(volume: CTVolume, seg: Segmentation, margin: int = 4) -> LungCrop:
    """The lungs' box on the stride grid with holes filled, rim and zones; NotApplicable without lungs.

    The latest crop is kept while its volume and lung mask exist, so the measurements of one series share it;
    callers must not modify it.
    """
    key = (volume.hu, volume.plan, seg.lungs)
    if _last and all(ref() is obj for ref, obj in zip(_last[0][0], key)) and _last[0][1].margin == margin:
        return _last[0][1]
    crop = _crop_lungs(volume, seg, margin)
    _last[:] = [(tuple(weakref.ref(obj) for obj in key), crop)]
    return crop


def _crop_lungs(volume: CTVolume, seg: Segmentation, margin: int) -> LungCrop:
    lungs = seg.lungs
    if not lungs.any():
        raise NotApplicable("No lung was found in this series, so lung density cannot be measured.")
    zs, ys, xs = (np.flatnonzero(lungs.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    z0, z1 = zs[0], zs[-1] + 1
    y0, y1 = max(0, ys[0] - margin), min(lungs.shape[1], ys[-1] + 1 + margin)
    x0, x1 = max(0, xs[0] - margin), min(lungs.shape[2], xs[-1] + 1 + margin)
    s = seg.stride
    box = lungs[z0:z1, y0:y1, x0:x1]
    hu = volume.hu[z0:z1, y0 * s:y1 * s:s, x0 * s:x1 * s:s].astype(np.float32)
    dz, dy, dx = volume.spacing_mm_zyx
    pixel_mm = float(np.sqrt(dy * dx)) * s
    _, patient_z = slice_positions_mm(volume)
    sides = fill_enclosed_holes(box, pixel_mm)
    return LungCrop(int(z0), int(y0), int(x0), hu, sides, _rim(sides > 0, pixel_mm, dz),
                    _zones(sides, patient_z[z0:z1]), pixel_mm, volume.voxel_volume_ml * s * s, margin)


def posterior_mm(volume: CTVolume, crop: LungCrop, stride: int) -> np.ndarray:
    """Patient y (LPS: +y posterior) of each in-plane pixel of the box, mm, shape (rows, cols)."""
    direction = np.asarray(volume.plan.direction)
    dy, dx = volume.spacing_mm_zyx[1] * stride, volume.spacing_mm_zyx[2] * stride
    rows, cols = crop.hu.shape[1:]
    r = (np.arange(rows) + crop.y0)[:, None] * dy
    c = (np.arange(cols) + crop.x0)[None, :] * dx
    return r * direction[1, 1] + c * direction[1, 0]


def region_rows(crop: LungCrop, counts: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per lung and zone, and per lung: lung_ml and, for every named voxel mask in ``counts``, its percent."""
    cell = np.where(crop.sides > 0, (crop.sides.astype(np.int64) - 1) * 3 + crop.zones + 1, 0)
    cells = len(SIDES) * len(ZONES) + 1
    lung = np.bincount(cell.ravel(), minlength=cells)[1:].reshape(len(SIDES), len(ZONES))
    hits = {key: np.bincount(cell[mask], minlength=cells)[1:].reshape(len(SIDES), len(ZONES))
            for key, mask in counts.items()}
    by_zone, by_lung = [], []
    for i, (_, name) in enumerate(SIDES):
        for j, zone in enumerate(ZONES):
            zone_hits = {k: int(v[i, j]) for k, v in hits.items()}
            by_zone.append(_row({"lung": name, "zone": zone}, int(lung[i, j]), zone_hits, crop.voxel_ml))
        by_lung.append(_row({"lung": name}, int(lung[i].sum()), {k: int(v[i].sum()) for k, v in hits.items()},
                            crop.voxel_ml))
    return by_zone, by_lung


def _row(head: dict[str, Any], n: int, hits: dict[str, int], voxel_ml: float) -> dict[str, Any]:
    row = dict(head, lung_ml=round(n * voxel_ml, 1))
    for key, count in hits.items():
        row[key] = round(100.0 * count / n, 2) if n else 0.0
    return row


@dataclasses.dataclass
class Acquisition:
    """Acquisition attributes of the series that decide whether a density measurement is comparable."""

    slice_thickness_mm: float | None  # SliceThickness of the frames, None when absent
    contrast_bolus_agent: str | None  # ContrastBolusAgent, None when absent or empty
    patient_position: str | None  # PatientPosition (HFS, FFS, HFP, FFP, ...)


def read_acquisition(volume: CTVolume) -> Acquisition:
    """Read SliceThickness, ContrastBolusAgent and PatientPosition from the series' first frame header."""
    if not volume.frames:
        return Acquisition(None, None, None)
    import pydicom

    path: Path = volume.frames[0].path
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SliceThickness", "ContrastBolusAgent", "PatientPosition"])
    except (OSError, pydicom.errors.InvalidDicomError):
        return Acquisition(None, None, None)
    thickness = ds.get("SliceThickness")
    try:
        thickness_mm = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None
    agent = str(ds.get("ContrastBolusAgent") or "").strip() or None
    position = str(ds.get("PatientPosition") or "").strip() or None
    return Acquisition(thickness_mm if thickness_mm and thickness_mm > 0 else None, agent, position)

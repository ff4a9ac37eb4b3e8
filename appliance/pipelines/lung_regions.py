"""Lung regions shared by the lung density measurements: the analysed mask, its pleural rim, zones and slice positions.

All arrays are on the segmentation's grid ``hu[:, ::stride, ::stride]`` and cropped to the lungs' bounding box
(:class:`LungCrop`), so a 300-slice chest costs a few tens of MB in float32.

Zones: each lung's craniocaudal extent (patient z, LPS: +z is cranial, whatever the slice order) is cut into
thirds, upper / middle / lower.
"""

from __future__ import annotations

import dataclasses
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


def _fill_side_holes(labels: np.ndarray, side: int) -> np.ndarray:
    """Slice-by-slice holes of one lung (vessels, airway walls, consolidation enclosed by aerated lung)."""
    outside, _ = ndimage.label(labels != side, structure=IN_PLANE)
    border = np.unique(np.concatenate([outside[:, 0].ravel(), outside[:, -1].ravel(),
                                       outside[:, :, 0].ravel(), outside[:, :, -1].ravel()]))
    holes = (labels != side) & ~np.isin(outside, border)
    return holes & (labels == 0)


def _enclosed_holes(holes: np.ndarray, outside: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Hole stacks (3-D connected) that open onto the next slice's outside over less than MAX_HOLE_CONTACT_MM2.

    A vessel or an opacity enclosed by aerated lung opens onto the slices above and below at most through a
    vessel's cross-section; the dome of the diaphragm, a hole in the slices just above it, opens with its whole
    cross-section onto the abdomen below.
    """
    labels, count = ndimage.label(holes)
    if count == 0:
        return holes
    contact = np.zeros_like(holes)
    contact[1:] |= holes[1:] & outside[:-1]
    contact[:-1] |= holes[:-1] & outside[1:]
    area = np.bincount(labels.ravel(), weights=contact.ravel(), minlength=count + 1) * pixel_mm ** 2
    keep = area < MAX_HOLE_CONTACT_MM2
    keep[0] = False
    return keep[labels]


def _fill(box: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Side labels with each lung's enclosed holes filled (see _enclosed_holes)."""
    padded = np.pad(box, ((0, 0), (1, 1), (1, 1)))
    holes = {side: _fill_side_holes(padded, side)[:, 1:-1, 1:-1] for side, _ in SIDES}
    outside = (box == 0) & ~holes[1] & ~holes[2]
    sides = box.copy()
    for side, _ in SIDES:
        sides[_enclosed_holes(holes[side], outside, pixel_mm)] = side
    return sides


def _rim(lung: np.ndarray, pixel_mm: float, slice_mm: float) -> np.ndarray:
    """Lung voxels within RIM_MM of a non-lung voxel, in-plane and through-plane."""
    steps = max(1, int(round(RIM_MM / pixel_mm)))
    inner = ndimage.binary_erosion(lung, structure=IN_PLANE, iterations=steps, border_value=0)
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


def crop_lungs(volume: CTVolume, seg: Segmentation, margin: int = 4) -> LungCrop:
    """The lungs' box on the stride grid with holes filled, rim and zones; NotApplicable without lungs."""
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
    sides = _fill(box, pixel_mm)
    return LungCrop(int(z0), int(y0), int(x0), hu, sides, _rim(sides > 0, pixel_mm, dz),
                    _zones(sides, patient_z[z0:z1]), pixel_mm, volume.voxel_volume_ml * s * s)


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
    by_zone, by_lung = [], []
    for side, name in SIDES:
        in_lung = crop.sides == side
        lung_rows = []
        for zi, zone in enumerate(ZONES):
            where = in_lung & (crop.zones == zi)
            lung_rows.append(_row({"lung": name, "zone": zone}, where, counts, crop.voxel_ml))
        by_zone.extend(lung_rows)
        by_lung.append(_row({"lung": name}, in_lung, counts, crop.voxel_ml))
    return by_zone, by_lung


def _row(head: dict[str, Any], where: np.ndarray, counts: dict[str, np.ndarray], voxel_ml: float) -> dict[str, Any]:
    n = int(where.sum())
    row = dict(head, lung_ml=round(n * voxel_ml, 1))
    for key, mask in counts.items():
        row[key] = round(100.0 * int((mask & where).sum()) / n, 2) if n else 0.0
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

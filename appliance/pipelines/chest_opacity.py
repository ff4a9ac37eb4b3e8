"""Ground-glass opacity and consolidation as a percent of lung volume, from Hounsfield units.

A plain attenuation band inside the lung mask counts vessels, airway walls, partial volume at the pleura and the
normal dependent density of a supine patient as disease. This measurement removes each before applying the bands,
on the segmentation's stride grid, in-plane slice by slice (so it does not depend on the slice thickness):

1. Noise: a 3x3 in-plane mean over lung voxels only.
2. Vessels, fissures and airway walls: a grey-scale opening restricted to the lung (minimum then maximum over a
   ``VESSEL_MM`` square, lung voxels only) gives the density of the surroundings; a voxel more than
   ``VESSEL_TOPHAT_HU`` above it lies on a structure narrower than the square (a vessel in or across the plane, a
   wall) and takes the surroundings' density instead. Hazier regions wider than the square (opacities) keep their
   own density, and a vessel running through ground glass reads as the ground glass around it. Voxels within
   ``AIRWAY_WALL_MM`` of an air tube (lumen below ``AIR_HU``) are not counted.
3. Dependent density: normal lung grows denser toward the dependent side (posterior when supine, anterior when
   prone, from PatientPosition). Per lung and ``BAND_MM`` band of height above the dependent side, the normal
   density is the ``BASELINE_PERCENTILE`` of the band, at most ``MAX_CORRECTION_HU`` above the least dense band
   (itself at most ``REFERENCE_MAX_HU``), so disease filling a band or a lung cannot hide itself. Ground glass
   must stand ``EXCESS_HU`` above that normal density as well as above the band's -600 HU.
4. Pleural partial volume: voxels within ``RIM_MM`` of the lung surface (in-plane and through-plane) are kept
   only as part of an opacity region with at most ``RIM_MAX_SHARE`` of its voxels in the rim and at least
   ``MIN_REGION_ML`` off it: a subpleural opacity reaches into the lung, a blurred chest wall does not.
5. Bands (HU): ground glass -600 to -200 (the lower bound of the high-attenuation areas of Podolanczuk et al.
   2016), consolidation -200 to +100 (the high-opacity threshold of Chaganti et al. 2020); see ``BANDS_HU``.

The lung mask's holes within a slice (vessels, consolidation enclosed by aerated lung) are part of the lung; a
lung mask that leaves out consolidation touching the chest wall leaves it out of this measurement too.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.pipelines import StepResult, overlays
from appliance.pipelines.chest_preprocess import window_to_gray
from appliance.pipelines.key_images import save_key_image
from appliance.pipelines.lung_regions import (
    RIM_MM,
    SIDES,
    LungCrop,
    NotApplicable,
    crop_lungs,
    posterior_mm,
    read_acquisition,
    region_rows,
    slice_positions_mm,
)
from appliance.pipelines.lungs import Segmentation
from appliance.series.volume import CTVolume

MODEL_ID = "chest-opacity"
VERSION = "1.0.0"
BODY_REGION = "chest"  # the analysis runs it only on a series covering the chest
NOTICE = ("Not validated: a Hounsfield-unit measurement of lung opacity, not validated on this site's patients; "
          "research use only.")
KEY_NOTICE = "Not validated: HU opacity measurement, research use only"
BANDS_HU = {"ground_glass": (-600.0, -200.0), "consolidation": (-200.0, 100.0)}
DEFAULT_THRESHOLD_PERCENT = 5.0  # more than minimal involvement: the CT severity score's first step ends at 5%
VESSEL_MM = 16.0  # bright structures narrower than this are vessels (hilar ones included), fissures or walls
AIR_HU = -950.0
AIRWAY_WALL_MM = 3.0
BAND_MM = 10.0
BASELINE_PERCENTILE = 30.0
MAX_CORRECTION_HU = 150.0  # the most a band's normal baseline may sit above the non-dependent lung's
REFERENCE_MAX_HU = -800.0  # the least dense band's baseline, no denser than normal inspiratory parenchyma
EXCESS_HU = 150.0  # ground glass stands at least this far above the normal parenchyma at its height
VESSEL_TOPHAT_HU = 100.0  # brighter than the opened surroundings by this much: a thin structure (vessel, wall)
MIN_BAND_VOXELS = 200
MIN_REGION_ML = 0.1
RIM_MAX_SHARE = 0.7  # an opacity lying mostly in the pleural rim is partial volume of the chest wall
KEY_SLICES = 3
CHUNK = 32  # slices processed together: float32 temporaries stay a few MB
GROUND_GLASS_RGB = (255.0, 210.0, 0.0)
CONSOLIDATION_RGB = (255.0, 40.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Suppression:
    """Which confounders are removed (all by default; switching one off shows what it buys)."""

    vessels: bool = True
    airway_walls: bool = True
    dependent: bool = True
    rim: bool = True


@dataclasses.dataclass
class OpacityMaps:
    """Ground-glass and consolidation voxels on the crop of the stride grid."""

    crop: LungCrop
    ground_glass: np.ndarray
    consolidation: np.ndarray

    def opacity(self) -> np.ndarray:
        return self.ground_glass | self.consolidation


def _odd(mm: float, pixel_mm: float) -> int:
    return max(3, int(round(mm / pixel_mm)) // 2 * 2 + 1)


def _in_plane_mean(hu: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """3x3 in-plane mean over lung voxels only (noise down, no chest wall mixed in)."""
    weight = ndimage.uniform_filter(lung.astype(np.float32), size=(1, 3, 3))
    total = ndimage.uniform_filter(np.where(lung, hu, 0).astype(np.float32), size=(1, 3, 3))
    return np.where(lung, total / np.maximum(weight, 1e-6), hu).astype(np.float32)


def lung_opening(hu: np.ndarray, lung: np.ndarray, width: int) -> np.ndarray:
    """Grey opening over lung voxels only: removes bright structures narrower than ``width`` pixels."""
    eroded = ndimage.minimum_filter(np.where(lung, hu, np.float32(3000)), size=(1, width, width))
    return ndimage.maximum_filter(np.where(lung, eroded, np.float32(-3000)), size=(1, width, width))


def _airway_walls(smooth: np.ndarray, lung: np.ndarray, pixel_mm: float) -> np.ndarray:
    air = lung & (smooth < AIR_HU)
    width = 2 * max(1, int(round(AIRWAY_WALL_MM / pixel_mm))) + 1
    return (ndimage.maximum_filter(air.view(np.uint8), size=(1, width, width)) > 0) & ~air


def _band_baselines(density: np.ndarray, band: np.ndarray, bands: int) -> np.ndarray:
    """BASELINE_PERCENTILE of ``density`` per band (NaN where a band has under MIN_BAND_VOXELS voxels)."""
    if len(density) == 0:
        return np.full(bands, np.nan)
    order = np.lexsort((density, band))
    band, density = band[order], density[order]
    counts = np.bincount(band, minlength=bands)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    picks = starts + np.floor((counts - 1) * BASELINE_PERCENTILE / 100.0).astype(int)
    return np.where(counts >= MIN_BAND_VOXELS, density[np.clip(picks, 0, len(density) - 1)], np.nan)


def normal_baseline(density: np.ndarray, crop: LungCrop, height_mm: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Density (HU) of normal parenchyma at each height above the dependent side, as a (side label, row, col)
    table: ``table[crop.sides, row, col]`` is a voxel's.

    Per lung and BAND_MM height band: the BASELINE_PERCENTILE of ``density`` over ``usable`` voxels, at most
    MAX_CORRECTION_HU above the least dense band's, itself at most REFERENCE_MAX_HU (so disease filling a
    band, or the whole lung, cannot raise its own baseline much).
    ``height_mm`` (rows, cols) is the in-plane height above the dependent side. -1000 HU outside the lungs.
    """
    table = np.full((len(SIDES) + 1, *density.shape[1:]), -1000.0, dtype=np.float32)  # by side label, row, col
    for side, _ in SIDES:
        in_lung = crop.sides == side
        footprint = in_lung.any(axis=0)
        if not footprint.any():
            continue
        band2d = np.maximum((height_mm - height_mm[footprint].min()) // BAND_MM, 0).astype(np.int64)
        bands = int(band2d[footprint].max()) + 1
        band2d = np.minimum(band2d, bands - 1)
        step = max(1, len(density) // 64)  # every few slices: a sample is plenty for a percentile
        where = usable[::step] & in_lung[::step]
        z, y, x = np.nonzero(where)
        z = z * step
        baselines = _band_baselines(density[z, y, x], band2d[y, x], bands)
        if np.all(np.isnan(baselines)):
            continue
        reference = min(float(np.nanmin(baselines)), REFERENCE_MAX_HU)
        level = (reference + np.clip(np.nan_to_num(baselines - reference, nan=0.0), 0.0, MAX_CORRECTION_HU))
        table[side] = level.astype(np.float32)[band2d]
    return table


def _height_above_dependent(volume: CTVolume, crop: LungCrop, stride: int) -> np.ndarray:
    """(rows, cols) height in mm above the dependent side: posterior when supine, anterior when prone."""
    posterior = posterior_mm(volume, crop, stride)
    position = read_acquisition(volume).patient_position or "HFS"
    prone = position.upper().endswith("P") and position.upper() in ("HFP", "FFP")
    return (posterior - posterior.min()) if prone else (posterior.max() - posterior)


def _keep_mostly_inside(opacity: np.ndarray, rim: np.ndarray, min_voxels: int) -> np.ndarray:
    """Opacity regions with at least ``min_voxels`` voxels off the pleural rim, at most RIM_MAX_SHARE in it."""
    labels, count = ndimage.label(opacity)
    if count == 0:
        return opacity
    total = np.bincount(labels[opacity], minlength=count + 1)
    in_rim = np.bincount(labels[rim & opacity], minlength=count + 1)
    keep = (in_rim <= RIM_MAX_SHARE * total) & (total - in_rim >= min_voxels)
    keep[0] = False
    kept = np.zeros_like(opacity)
    kept[opacity] = keep[labels[opacity]]
    return kept


def _drop_small(opacity: np.ndarray, min_voxels: int) -> np.ndarray:
    labels, count = ndimage.label(opacity)
    if count == 0:
        return opacity
    keep = np.bincount(labels[opacity], minlength=count + 1) >= min_voxels
    keep[0] = False
    kept = np.zeros_like(opacity)
    kept[opacity] = keep[labels[opacity]]
    return kept


def _density(crop: LungCrop, lung: np.ndarray, suppression: Suppression) -> tuple[np.ndarray, np.ndarray]:
    """(density with thin bright structures replaced by their surroundings, air-tube walls), CHUNK slices at
    a time (every step is in-plane)."""
    density = np.empty(crop.hu.shape, dtype=np.float32)
    walls = np.zeros(crop.hu.shape, dtype=bool)
    width = _odd(VESSEL_MM, crop.pixel_mm)
    for z in range(0, crop.hu.shape[0], CHUNK):
        part = slice(z, z + CHUNK)
        smooth = _in_plane_mean(crop.hu[part], lung[part])
        if suppression.vessels:
            opened = lung_opening(smooth, lung[part], width)
            density[part] = np.where(smooth - opened > VESSEL_TOPHAT_HU, opened, smooth)
        else:
            density[part] = smooth
        if suppression.airway_walls:
            walls[part] = _airway_walls(smooth, lung[part], crop.pixel_mm)
    return density, walls


def _in_bands(density: np.ndarray, counted: np.ndarray, crop: LungCrop, table: np.ndarray | None) -> np.ndarray:
    """Voxels in the ground-glass or consolidation band, ground glass also EXCESS_HU above ``table``'s normal."""
    opacity = np.zeros(density.shape, dtype=bool)
    rows, cols = density.shape[1:]
    r, c = np.arange(rows)[:, None], np.arange(cols)[None, :]
    for z in range(0, density.shape[0], CHUNK):
        part = slice(z, z + CHUNK)
        low = np.float32(BANDS_HU["ground_glass"][0])
        if table is not None:
            low = np.maximum(low, table[crop.sides[part], r, c] + np.float32(EXCESS_HU))
        d = density[part]
        opacity[part] = counted[part] & (d >= low) & (d <= BANDS_HU["consolidation"][1])
    return opacity


def opacity_maps(volume: CTVolume, seg: Segmentation, suppression: Suppression = Suppression()) -> OpacityMaps:
    """Ground-glass and consolidation voxels in the lungs of ``volume`` (stride grid, lung box)."""
    crop = crop_lungs(volume, seg)
    lung = crop.lung()
    density, excluded = _density(crop, lung, suppression)
    counted = lung & ~excluded
    table = None
    if suppression.dependent:
        height = _height_above_dependent(volume, crop, seg.stride)
        table = normal_baseline(density, crop, height, counted & ~crop.rim)
    opacity = _in_bands(density, counted, crop, table)
    min_voxels = max(1, int(np.ceil(MIN_REGION_ML / crop.voxel_ml)))
    if suppression.rim:
        opacity = _keep_mostly_inside(opacity, crop.rim, min_voxels)
    else:
        opacity = _drop_small(opacity, min_voxels)
    consolidation = opacity & (density >= BANDS_HU["consolidation"][0])
    return OpacityMaps(crop, opacity & ~consolidation, consolidation)


def slice_fractions(maps: OpacityMaps, n_slices: int) -> np.ndarray:
    """Opacity fraction of the lung on every slice of the volume (0 where a slice has no lung)."""
    lung_area = maps.crop.lung().sum(axis=(1, 2))
    opaque = maps.opacity().sum(axis=(1, 2))
    fractions = np.zeros(n_slices)
    z0 = maps.crop.z0
    fractions[z0:z0 + len(lung_area)] = np.where(lung_area > 0, opaque / np.maximum(lung_area, 1), 0)
    return np.clip(fractions, 0.0, 1.0)


def _full_slice_label(maps: OpacityMaps, k: int, grid_shape: tuple[int, int]) -> np.ndarray:
    """Slice ``k`` on the whole stride grid: 0 none, 1 ground glass, 2 consolidation."""
    out = np.zeros(grid_shape, dtype=np.uint8)
    j = k - maps.crop.z0
    rows, cols = maps.ground_glass.shape[1:]
    box = out[maps.crop.y0:maps.crop.y0 + rows, maps.crop.x0:maps.crop.x0 + cols]
    box[maps.ground_glass[j]] = 1
    box[maps.consolidation[j]] = 2
    return out


def _key_png(volume: CTVolume, label: np.ndarray, stride: int, k: int, path: Path) -> None:
    """Lung-window slice with ground glass in yellow and consolidation in red."""
    gray = window_to_gray(volume.hu[k]).astype(np.float32)
    full = np.repeat(np.repeat(label, stride, axis=0), stride, axis=1)[: gray.shape[0], : gray.shape[1]]
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for value, colour in ((1, GROUND_GLASS_RGB), (2, CONSOLIDATION_RGB)):
        where = full == value
        rgb[where] = rgb[where] * 0.45 + np.array(colour) * 0.55
    save_key_image(rgb, path, KEY_NOTICE)


def _slice_findings(volume: CTVolume, maps: OpacityMaps, seg: Segmentation,
                    artefacts: Path | None) -> list[dict[str, Any]]:
    n = volume.hu.shape[0]
    fractions = slice_fractions(maps, n)
    normal_mm, _ = slice_positions_mm(volume)
    findings: list[dict[str, Any]] = [{"name": "opacity by slice", "slices": [
        {"index": k, "z_mm": round(float(normal_mm[k]), 1), "opacity_fraction": round(float(fractions[k]), 4)}
        for k in range(n)]}]
    grid = seg.lungs.shape[1:]
    with_opacity = [int(k) for k in np.flatnonzero(fractions > 0)]
    if artefacts is not None and with_opacity:
        labels = [_full_slice_label(maps, k, grid) for k in with_opacity]
        overlays.save(artefacts / f"overlay-{MODEL_ID}.npz", with_opacity,
                      [overlays.shrink(label.astype(np.float32) / 2.0) for label in labels])
    for rank, k in enumerate(sorted(with_opacity, key=lambda k: -fractions[k])[:KEY_SLICES]):
        finding = {"name": "key slice", "rank": rank + 1, "slice_index": k, "z_mm": round(float(normal_mm[k]), 1),
                   "opacity_fraction": round(float(fractions[k]), 4)}
        if artefacts is not None:
            path = artefacts / f"{MODEL_ID}-key{rank + 1}-slice{k:04d}.png"
            _key_png(volume, _full_slice_label(maps, k, grid), seg.stride, k, path)
            finding["key_image"] = str(path)
        findings.append(finding)
    return findings


def _method() -> dict[str, Any]:
    return {"name": "method", "bands_hu": {k: list(v) for k, v in BANDS_HU.items()},
            "excluded": (f"vessels, fissures and airway walls (structures narrower than {VESSEL_MM:g} mm and "
                         f"{VESSEL_TOPHAT_HU:g} HU above their surroundings read as the surroundings), voxels within "
                         f"{AIRWAY_WALL_MM:g} mm of air tubes (< {AIR_HU:g} HU), pleural-rim partial volume "
                         f"(regions with over {RIM_MAX_SHARE:.0%} of their voxels within {RIM_MM:g} mm of the "
                         "lung surface)"),
            "dependent_correction": (f"ground glass at least {EXCESS_HU:g} HU above the normal density at its "
                                     f"height: per lung, the {BASELINE_PERCENTILE:g}th percentile of each "
                                     f"{BAND_MM:g} mm band above the dependent side, at most "
                                     f"{MAX_CORRECTION_HU:g} HU above the least dense band"),
            "min_region_ml": MIN_REGION_ML,
            "z_mm": "slice centre's position along the slice normal in patient coordinates (LPS z for axial series)"}


def run(volume: CTVolume, seg: Segmentation, artefacts: Path | None, threshold: float | None = None) -> StepResult:
    """Percent of lung volume with ground-glass opacity or consolidation; flagged at ``threshold`` percent.

    ``threshold`` is the site's operating point when it has one, else DEFAULT_THRESHOLD_PERCENT.
    Raises NotApplicable when the series has no lung.
    """
    t0 = time.perf_counter()
    threshold = DEFAULT_THRESHOLD_PERCENT if threshold is None else float(threshold)
    maps = opacity_maps(volume, seg)
    crop = maps.crop
    counts = {"opacity_percent": maps.opacity(), "ground_glass_percent": maps.ground_glass,
              "consolidation_percent": maps.consolidation}
    by_zone, by_lung = region_rows(crop, counts)
    lung_voxels = int(crop.lung().sum())
    score = round(100.0 * int(maps.opacity().sum()) / max(lung_voxels, 1), 2)
    findings: list[dict[str, Any]] = [{"name": "opacity by zone", "rows": by_zone},
                                      {"name": "opacity by lung", "rows": by_lung}]
    findings += _slice_findings(volume, maps, seg, artefacts)
    findings.append(_method())
    return StepResult(MODEL_ID, VERSION, False, "numpy", "fp32", score, threshold, bool(score >= threshold), findings,
                      seconds=round(time.perf_counter() - t0, 3), notice=NOTICE)


__all__ = ["NotApplicable", "OpacityMaps", "Suppression", "opacity_maps", "run", "slice_fractions"]

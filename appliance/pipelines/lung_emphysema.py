"""Emphysema as the percent of low-attenuation lung (%LAA), from Hounsfield units.

%LAA-950 (voxels below -950 HU) is the thin-section standard: it matched microscopic emphysema on 1 mm
inspiratory sections (Gevenois et al. 1996). Thicker sections average each voxel over more tissue, so fewer fall
below -950 HU; the thick-section "density mask" used -910 HU on 10 mm sections (Muller et al. 1988). The slice
thickness (SliceThickness, else the slice spacing) is checked before anything is reported:

- up to ``THIN_MM``: -950 HU is the primary threshold, flagged at ``DEFAULT_THRESHOLD_PERCENT``;
- up to ``THICK_MM``: -910 HU is primary, with a caveat; no published cut-off applies, so nothing is flagged
  unless the site sets a threshold;
- thicker: not applicable.

Both percentages are given where applicable. Air tubes (the trachea and bronchi: long runs of air whose
cross-section in a slice is under ``AIRWAY_MAX_CROSS_SECTION_CM2``) and the pleural rim (blurred chest wall, and
any air outside the lung that the mask took in) are left out of numerator and denominator. Contrast enhancement
(ContrastBolusAgent) and a lung denser than full inspiration are reported as caveats: both lower %LAA.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.pipelines import StepResult
from appliance.pipelines.lung_regions import (
    IN_PLANE,
    Acquisition,
    LungCrop,
    NotApplicable,
    crop_lungs,
    read_acquisition,
    region_rows,
)
from appliance.pipelines.lungs import Segmentation
from appliance.series.volume import CTVolume

MODEL_ID = "lung-emphysema"
VERSION = "1.0.0"
BODY_REGION = "chest"  # the analysis runs it only on a series covering the chest
NOTICE = ("Not validated: a Hounsfield-unit measurement of low-attenuation lung, not validated on this site's "
          "patients or scanners; research use only.")
LAA_HU = (-950, -910)
THIN_MM = 1.5  # sections up to this are thin (the -950 HU standard was set on 1 mm sections)
THICK_MM = 5.0  # beyond this no threshold is reported
DEFAULT_THRESHOLD_PERCENT = 5.0  # %LAA-950 at or above which CT emphysema is reported
AIRWAY_MIN_LENGTH_MM = 30.0
AIRWAY_MAX_CROSS_SECTION_CM2 = 4.0  # in one slice, about the trachea's
INSPIRATION_MAX_MEAN_HU = -750.0  # a lung denser than this on average is probably not at full inspiration


def slice_thickness_mm(volume: CTVolume, acquisition: Acquisition) -> tuple[float, str]:
    """(thickness, where it came from): SliceThickness of the frames, else the slice spacing."""
    if acquisition.slice_thickness_mm is not None:
        return acquisition.slice_thickness_mm, "SliceThickness"
    return float(volume.spacing_mm_zyx[0]), "slice spacing (no SliceThickness)"


def primary_threshold_hu(thickness_mm: float) -> int:
    """-950 HU for thin sections, -910 HU up to THICK_MM; NotApplicable beyond."""
    if thickness_mm <= THIN_MM:
        return LAA_HU[0]
    if thickness_mm <= THICK_MM:
        return LAA_HU[1]
    raise NotApplicable(f"Slices are {thickness_mm:g} mm thick; low-attenuation percentages are only defined "
                        f"on sections up to {THICK_MM:g} mm.")


def airways(hu: np.ndarray, lung: np.ndarray, slice_mm: float, pixel_mm: float) -> np.ndarray:
    """Air tubes in the lung: runs of air (< -950 HU after a 3x3 mean) at least AIRWAY_MIN_LENGTH_MM long whose
    cross-section in every slice is at most AIRWAY_MAX_CROSS_SECTION_CM2.

    Emphysema joined to a bronchus widens the run's cross-section somewhere, so the run is counted as lung."""
    air = lung & (ndimage.uniform_filter(hu, size=(1, 3, 3)) < LAA_HU[0])
    runs, count = ndimage.label(air)
    if count == 0:
        return air
    extent = np.array([s[0].stop - s[0].start for s in ndimage.find_objects(runs)]) * slice_mm
    sections, n_sections = ndimage.label(air, structure=IN_PLANE)
    area_cm2 = np.bincount(sections.ravel(), minlength=n_sections + 1) * pixel_mm ** 2 / 100.0
    run_of_section = np.zeros(n_sections + 1, dtype=np.int64)
    run_of_section[sections[air]] = runs[air]
    widest = np.zeros(count + 1)
    np.maximum.at(widest, run_of_section[1:], area_cm2[1:])
    tube = np.concatenate([[False], extent >= AIRWAY_MIN_LENGTH_MM]) & (widest <= AIRWAY_MAX_CROSS_SECTION_CM2)
    return ndimage.maximum_filter(tube[runs].view(np.uint8), size=(1, 3, 3)) > 0


def _caveats(thickness_mm: float, source: str, primary: int, acquisition: Acquisition, mean_hu: float) -> list[str]:
    caveats = [f"Slice thickness {thickness_mm:g} mm ({source})."]
    if primary == LAA_HU[1]:
        caveats.append(f"Sections thicker than {THIN_MM:g} mm: -950 HU under-reads them, so -910 HU (the thick-section "
                       "density mask) is primary and not comparable with thin-section %LAA-950; no published "
                       "cut-off is applied.")
    if acquisition.contrast_bolus_agent:
        caveats.append(f"Contrast-enhanced ({acquisition.contrast_bolus_agent}): enhancement raises lung density and "
                       "lowers %LAA.")
    if mean_hu > INSPIRATION_MAX_MEAN_HU:
        caveats.append(f"Mean lung density {mean_hu:.0f} HU is denser than full inspiration usually gives: an "
                       "expiratory or shallow-breath scan lowers %LAA.")
    return caveats


def laa_masks(crop: LungCrop, slice_mm: float) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(measured lung: lung without airways and rim, {threshold HU: voxels below it within the measured lung})."""
    lung = crop.lung()
    measured = lung & ~crop.rim & ~airways(crop.hu, lung, slice_mm, crop.pixel_mm)
    return measured, {t: measured & (crop.hu < t) for t in LAA_HU}


def run(volume: CTVolume, seg: Segmentation, artefacts: Path | None, threshold: float | None = None) -> StepResult:
    """%LAA at the threshold the slice thickness allows, per lung and zone; flagged at ``threshold`` percent.

    ``threshold`` is the site's operating point; without one, DEFAULT_THRESHOLD_PERCENT applies to %LAA-950 and
    nothing is flagged at -910 HU. Raises NotApplicable without lungs or on slices thicker than THICK_MM.
    """
    t0 = time.perf_counter()
    acquisition = read_acquisition(volume)
    thickness, source = slice_thickness_mm(volume, acquisition)
    primary = primary_threshold_hu(thickness)
    crop = crop_lungs(volume, seg)
    measured, below = laa_masks(crop, float(volume.spacing_mm_zyx[0]))
    n = int(measured.sum())
    if n == 0:
        raise NotApplicable("No lung remained once the airways and the pleural rim were left out.")
    measured_crop = dataclasses.replace(crop, sides=np.where(measured, crop.sides, 0).astype(np.uint8))
    by_zone, _ = region_rows(measured_crop, {"laa950_percent": below[-950], "laa910_percent": below[-910]})
    percent = round(100.0 * int(below[primary].sum()) / n, 2)
    if threshold is None and primary == LAA_HU[0]:
        threshold = DEFAULT_THRESHOLD_PERCENT
    mean_hu = float(crop.hu[measured].mean())
    findings: list[dict[str, Any]] = [
        {"name": "emphysema by zone", "rows": by_zone},
        {"name": "emphysema", "threshold_hu": primary, "percent": percent, "slice_thickness_mm": round(thickness, 2),
         "laa950_percent": round(100.0 * int(below[-950].sum()) / n, 2),
         "laa910_percent": round(100.0 * int(below[-910].sum()) / n, 2),
         "mean_lung_hu": round(mean_hu, 1), "caveats": _caveats(thickness, source, primary, acquisition, mean_hu)}]
    flagged = threshold is not None and percent >= threshold
    return StepResult(MODEL_ID, VERSION, False, "numpy", "fp32", percent, threshold, bool(flagged), findings,
                      seconds=round(time.perf_counter() - t0, 3), notice=NOTICE)


__all__ = ["NotApplicable", "airways", "laa_masks", "primary_threshold_hu", "run", "slice_thickness_mm"]

"""Series quality assurance measured on the volume: body region, coverage, air calibration and noise.

The body region (:mod:`appliance.pipelines.body_region`) says what the series covers, with the evidence;
the analysis runs a model only on a series covering the region it reads. Air outside the patient should
read -1000 HU; a scanner whose air reading is off by more than ``AIR_CALIBRATION_TOLERANCE_HU`` needs its
daily calibration checked before its images are trusted by any model. Noise is the standard deviation of HU
in that air, a proxy of image noise. Series QA is a measurement: it never flags a study, it says so in words.
"""

from __future__ import annotations

import numpy as np

from appliance.pipelines import StepResult, body_region
from appliance.series.volume import CTVolume

MODEL = "series-qa"
VERSION = "1.1.0"
BODY_REGION = None  # any region: series QA measures every series
AIR_HU = -1000.0
AIR_CALIBRATION_TOLERANCE_HU = 50.0
AIR_WINDOW_HU = (-1100, -900)  # what counts as air when sampling it
FIELD_OF_VIEW_FRACTION = 0.9  # sample inside this fraction of the reconstruction circle
SAMPLED_SLICES = 32


def _air_samples(hu: np.ndarray) -> np.ndarray:
    """Air around the patient: inside the reconstruction circle (outside it is padding), in the air window."""
    z, rows, cols = hu.shape
    yy, xx = np.ogrid[:rows, :cols]
    radius = FIELD_OF_VIEW_FRACTION * min(rows, cols) / 2
    inside = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < radius ** 2
    values = hu[:: max(1, z // SAMPLED_SLICES)][:, inside].astype(np.float32).ravel()
    return values[(values > AIR_WINDOW_HU[0]) & (values < AIR_WINDOW_HU[1])]


def run(volume: CTVolume, regions: body_region.BodyRegions | None = None) -> StepResult:
    """Measure body region (``regions`` when the caller determined them already), coverage, air HU and noise."""
    dz, dy, dx = volume.spacing_mm_zyx
    z, rows, cols = volume.hu.shape
    regions = body_region.determine(volume) if regions is None else regions
    air = _air_samples(volume.hu)
    findings = [regions.as_finding(),
                {"name": "coverage", "length_mm": round(dz * (z - 1), 1),
                 "field_of_view_mm": [round(dy * rows, 1), round(dx * cols, 1)]}]
    for problem in volume.plan.problems:
        findings.append({"name": "geometry", **problem.as_dict()})
    if air.size < 100 or float(np.std(air)) == 0.0:
        findings.append({"name": "air calibration", "result": "not measurable: no air around the patient"})
        return StepResult(MODEL, VERSION, True, "numpy", "fp32", None, AIR_CALIBRATION_TOLERANCE_HU, False, findings)
    air_hu, noise = float(np.median(air)), float(np.std(air))
    deviation = abs(air_hu - AIR_HU)
    findings.append({"name": "air calibration", "air_hu": round(air_hu, 1), "noise_hu": round(noise, 1),
                     "samples": int(air.size)})
    notice = None
    if deviation > AIR_CALIBRATION_TOLERANCE_HU:
        notice = (f"Air reads {air_hu:.0f} HU, {deviation:.0f} HU from {AIR_HU:.0f} HU (tolerance "
                  f"{AIR_CALIBRATION_TOLERANCE_HU:.0f} HU): check the scanner's daily air calibration.")
    return StepResult(MODEL, VERSION, True, "numpy", "fp32", round(deviation, 1), AIR_CALIBRATION_TOLERANCE_HU,
                      False, findings, notice=notice)

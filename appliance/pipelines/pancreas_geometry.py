"""Grids and intensity scaling of the two-stage pancreas pipeline, shared by training and inference.

Stage 1 sees the whole scan on a 6 mm grid in an abdominal window; stage 2 a
48 x 64 x 160 mm box (z, y, x) around the pancreas on a 2 mm grid in a narrow
pancreatic window, where a subtle lesion differs by 10-40 HU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LOCALIZER_SPACING_MM = 6.0
PHANTOM_FIELD_OF_VIEW_MM = 500.0
ABDOMEN_WINDOW = (50.0, 250.0)  # centre, half-width (HU)
CROP_SPACING_MM = 2.0
CROP_SIZE_MM = (48.0, 64.0, 160.0)  # z, y, x
CROP_SHAPE = tuple(int(s / CROP_SPACING_MM) for s in CROP_SIZE_MM)
PANCREAS_WINDOW = (40.0, 80.0)  # centre, scale (HU)
SCORE_POOL = 3  # lesion score: largest 3x3x3 mean of the lesion map


def localizer_axes(z0: float, z1: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World z, y, x (mm) of a 6 mm grid over a phantom's field of view from z0 to z1."""
    half = PHANTOM_FIELD_OF_VIEW_MM / 2
    xy = np.arange(-half, half, LOCALIZER_SPACING_MM)
    return np.arange(z0, z1, LOCALIZER_SPACING_MM), xy.copy(), xy


def crop_axes(centre_xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World z, y, x (mm) of the stage-2 crop grid centred on ``centre_xyz`` (LPS)."""
    axes = []
    for size, shape, c in zip(CROP_SIZE_MM, CROP_SHAPE, (centre_xyz[2], centre_xyz[1], centre_xyz[0])):
        axes.append(c - size / 2 + CROP_SPACING_MM * (np.arange(shape) + 0.5))
    return axes[0], axes[1], axes[2]


LOCALIZER_SMOOTHING_VOXELS = 1.0


def localizer_input(hu: np.ndarray) -> np.ndarray:
    """Smooth (Gaussian, 1 voxel = 6 mm) and window: at this scale noise and resampling differences
    between scanners (and between phantoms and scans) are texture the localiser must not learn."""
    centre, half = ABDOMEN_WINDOW
    smooth = ndimage.gaussian_filter(hu.astype(np.float32), LOCALIZER_SMOOTHING_VOXELS)
    return np.clip((smooth - centre) / half, -1, 1)


def crop_input(hu: np.ndarray) -> np.ndarray:
    centre, scale = PANCREAS_WINDOW
    return np.clip((hu.astype(np.float32) - centre) / scale, -3, 3)


def lesion_score(lesion_map: np.ndarray) -> float:
    """Study score: the largest local mean of the lesion probability map (robust to single voxels)."""
    return float(ndimage.uniform_filter(lesion_map.astype(np.float32), SCORE_POOL, mode="constant").max())


def pad_to_multiple(a: np.ndarray, multiple: int = 4, value: float = -1.0) -> np.ndarray:
    return np.pad(a, [(0, (-s) % multiple) for s in a.shape], constant_values=value)

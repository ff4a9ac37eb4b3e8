"""Two-stage pancreas screening shaped like PANDA, with the ``pancreas-localizer`` and
``abdomen-pancreas`` packs: a synthetic-data demonstration, not for clinical use.

Stage 1 resamples the scan to 6 mm, and a 3-D U-Net finds the pancreas (largest
component of its map at 0.5). Stage 2 samples a 48 x 64 x 160 mm box around it at
2 mm, and a 3-D fully convolutional network outputs a lesion probability map;
the study score is the map's largest 3x3x3 mean, flagged against the threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.pipelines import StepResult
from appliance.pipelines import pancreas_geometry as geo
from appliance.series.volume import CTVolume

MODEL_ID = "abdomen-pancreas"
LOCALIZER_ID = "pancreas-localizer"
PANCREAS_THRESHOLD = 0.5
MIN_PANCREAS_ML = 5.0  # smaller blobs are noise: an adult pancreas is 50-100 mL
AIR_HU = -1000.0
LESION_OVERLAY_LEVEL = 0.3


class NotApplicable(Exception):
    """The pipeline does not apply to this series (no pancreas found, or no abdomen in the scan)."""


def _to_localizer_grid(volume: CTVolume) -> tuple[np.ndarray, np.ndarray]:
    factors = np.array(volume.spacing_mm_zyx) / geo.LOCALIZER_SPACING_MM
    small = ndimage.zoom(volume.hu, factors, order=1, output=np.float32, prefilter=False)
    return small, factors


def localize(volume: CTVolume, session) -> tuple[np.ndarray, np.ndarray]:
    """(pancreas mask on the 6 mm grid, zoom factors). Raises NotApplicable when none is found."""
    small, factors = _to_localizer_grid(volume)
    x = geo.pad_to_multiple(geo.localizer_input(small))[None, None]
    prob = session.run({"volume": x})["pancreas"][0, 0][: small.shape[0], : small.shape[1], : small.shape[2]]
    labels, count = ndimage.label(prob >= PANCREAS_THRESHOLD)
    if count == 0:
        raise NotApplicable("no pancreas found in this series (is the upper abdomen covered?)")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    if sizes.max() * geo.LOCALIZER_SPACING_MM ** 3 / 1000 < MIN_PANCREAS_ML:
        raise NotApplicable("no pancreas found in this series (is the upper abdomen covered?)")
    return labels == int(np.argmax(sizes)), factors


def _world_to_index(volume: CTVolume, zyx_world: list[np.ndarray]) -> np.ndarray:
    """Fractional voxel indices (z, y, x) of world points given as broadcastable z, y, x arrays."""
    z, y, x = np.broadcast_arrays(*zyx_world)
    points = np.stack([x.ravel(), y.ravel(), z.ravel(), np.ones(x.size)])
    ijk = np.linalg.inv(volume.plan.affine()) @ points
    return ijk[2::-1].reshape((3, *x.shape))


def sample_crop(volume: CTVolume, centre_xyz: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """HU on the stage-2 grid around ``centre_xyz`` (air outside the scan), and the grid's axes."""
    zs, ys, xs = geo.crop_axes(centre_xyz)
    index = _world_to_index(volume, [zs[:, None, None], ys[None, :, None], xs[None, None, :]])
    crop = ndimage.map_coordinates(volume.hu, index, order=1, cval=AIR_HU, output=np.float32)
    return crop, (zs, ys, xs)


def _lesion_alpha(volume: CTVolume, lesion_map: np.ndarray, axes, k: int, rows: np.ndarray,
                  cols: np.ndarray) -> np.ndarray:
    """How strongly the lesion map shows (0..1) at voxel rows/cols of volume slice ``k``."""
    world = volume.world(np.stack([np.full(rows.shape, k), rows, cols], axis=-1))
    zs, ys, xs = axes
    step = geo.CROP_SPACING_MM
    coords = [(world[..., 2] - zs[0]) / step, (world[..., 1] - ys[0]) / step, (world[..., 0] - xs[0]) / step]
    heat = ndimage.map_coordinates(lesion_map, coords, order=1, cval=0.0)
    return np.clip((heat - LESION_OVERLAY_LEVEL) / (1 - LESION_OVERLAY_LEVEL), 0, 1)


def _save_overlay(volume: CTVolume, lesion_map: np.ndarray, axes, path: Path) -> None:
    """The lesion map on every volume slice it reaches, for the viewer."""
    from appliance.pipelines import overlays

    size = overlays.OVERLAY_SIZE
    rows, cols = np.meshgrid(np.arange(size) * volume.hu.shape[1] / size,
                             np.arange(size) * volume.hu.shape[2] / size, indexing="ij")
    centres = volume.world(np.stack([np.arange(volume.hu.shape[0]), np.full(volume.hu.shape[0], volume.hu.shape[1] / 2),
                                     np.full(volume.hu.shape[0], volume.hu.shape[2] / 2)], axis=-1))
    zs = axes[0]
    near = np.abs(centres[:, 2] - (zs[0] + zs[-1]) / 2) <= abs(zs[-1] - zs[0]) / 2 + 50.0  # mm; slack for oblique
    slices, maps = [], []
    for k in np.flatnonzero(near):
        alpha = _lesion_alpha(volume, lesion_map, axes, int(k), rows, cols)
        if alpha.max() > 0:
            slices.append(int(k))
            maps.append(np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8))
    overlays.save(path, slices, maps)


def _key_image(volume: CTVolume, lesion_map: np.ndarray, axes, centre_xyz: np.ndarray, path: Path,
               notice: str | None) -> int:
    """Axial slice through ``centre_xyz`` in an abdominal window with the lesion map in red; returns its index."""
    from appliance.pipelines.chest_preprocess import window_to_gray
    from appliance.pipelines.key_images import save_key_image

    k = int(np.clip(np.rint(_world_to_index(volume, [np.array(centre_xyz[2]), np.array(centre_xyz[1]),
                                                      np.array(centre_xyz[0])])[0]), 0, volume.hu.shape[0] - 1))
    gray = window_to_gray(volume.hu[k], level=40, width=400)
    grid = np.indices(gray.shape)  # (2, rows, cols): row and column index of every pixel
    alpha = _lesion_alpha(volume, lesion_map, axes, k, grid[0], grid[1])[..., None] * 0.7
    rgb = np.repeat(gray[..., None], 3, axis=2) * (1 - alpha) + np.array([255.0, 30.0, 0.0]) * alpha
    save_key_image(rgb, path, notice)
    return k


def run(volume: CTVolume, localizer_session, localizer_pack, session, pack, artefacts: Path | None,
        threshold: float | None = None) -> StepResult:
    """Localise the pancreas, score the region for a lesion, and describe what was found."""
    threshold = pack.threshold if threshold is None else threshold
    mask, factors = localize(volume, localizer_session)
    centroid_small = np.argwhere(mask).mean(axis=0)
    centre = volume.world(centroid_small / factors)
    crop, axes = sample_crop(volume, centre)
    lesion_map = session.run({"volume": geo.crop_input(crop)[None, None]})["lesion"][0, 0]
    score = geo.lesion_score(lesion_map)
    z_slices = np.flatnonzero(mask.any(axis=(1, 2))) / factors[0]
    findings: list[dict[str, Any]] = [{
        "name": "pancreas (localised)", "centroid_mm": [round(float(v), 1) for v in centre],
        "volume_ml": round(float(mask.sum() * geo.LOCALIZER_SPACING_MM ** 3 / 1000), 1),
        "slice_range": [int(z_slices.min()), int(z_slices.max())],
        "localizer": f"{localizer_pack.id} {localizer_pack.version}"}]
    smoothed = ndimage.uniform_filter(lesion_map, geo.SCORE_POOL, mode="constant")
    peak = np.unravel_index(int(np.argmax(smoothed)), smoothed.shape)
    peak_world = np.array([axes[2][peak[2]], axes[1][peak[1]], axes[0][peak[0]]])
    lesion: dict[str, Any] = {"name": "lesion candidate" if score >= threshold else "most suspicious region",
                              "probability": round(score, 4), "centre_mm": [round(float(v), 1) for v in peak_world]}
    labels, _ = ndimage.label(lesion_map >= 0.5)
    if labels[peak]:
        voxels = int((labels == labels[peak]).sum())
        lesion["diameter_mm"] = round(float(2 * (3 * voxels * geo.CROP_SPACING_MM ** 3 / (4 * np.pi)) ** (1 / 3)), 1)
    if artefacts is not None:
        path = artefacts / f"{MODEL_ID}-key1.png"
        lesion["slice_index"] = _key_image(volume, lesion_map, axes, peak_world, path,
                                           None if pack.validated else pack.notice)
        lesion["key_image"] = str(path)
        _save_overlay(volume, lesion_map, axes, artefacts / f"overlay-{MODEL_ID}.npz")
    findings.append(lesion)
    return StepResult(pack.id, pack.version, pack.validated, session.backend, session.precision, round(score, 4),
                      threshold, score >= threshold, findings, notice=pack.notice)


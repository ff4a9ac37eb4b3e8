"""Per-slice overlays for the web viewer: a model's heat map on the volume's slices, small and in uint8.

Stored beside the key images as ``overlay-<model>.npz`` with ``slices`` (volume slice indices) and
``maps`` (n, OVERLAY_SIZE, OVERLAY_SIZE), 0..255; the viewer stretches them over the slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OVERLAY_SIZE = 128


def shrink(heat: np.ndarray, size: int = OVERLAY_SIZE) -> np.ndarray:
    """``heat`` (rows, cols) in 0..1 resampled to size x size uint8 (nearest, cheap and faithful enough)."""
    rows = (np.arange(size) * heat.shape[0] / size).astype(int)
    cols = (np.arange(size) * heat.shape[1] / size).astype(int)
    return np.clip(heat[np.ix_(rows, cols)] * 255.0 + 0.5, 0, 255).astype(np.uint8)


def save(path: Path, slices: list[int], maps: list[np.ndarray]) -> None:
    """Write the overlay file (nothing when no slice has one)."""
    if not slices:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, slices=np.asarray(slices, dtype=np.int32), maps=np.stack(maps).astype(np.uint8))


def load_slice(path: Path, k: int) -> np.ndarray | None:
    """The overlay of volume slice ``k``, or None when the model drew none there."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        hits = np.flatnonzero(data["slices"] == k)
        return data["maps"][hits[0]] if len(hits) else None

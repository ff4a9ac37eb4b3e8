"""The volume the web viewer cuts coronal and sagittal planes from: int16 HU, reduced in-plane.

Written once per analysis beside ``viewer.json`` as ``volume-int16.npy`` and memory-mapped by the web
process, so a reformatted plane costs one strided read instead of decoding every stored frame. The
in-plane size is reduced to at most :data:`REFORMAT_MAX_SIZE` pixels by averaging blocks: a 300-slice
512 x 512 series is 39 MB on disk instead of 157 MB, and a coronal plane (300 x 256) still has finer
pixels than its slice spacing. Slices are kept whole, so plane rows are volume slice indices, the
index the findings and overlays use.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

import numpy as np

from appliance.durable import durable_rename

VOLUME_FILE = "volume-int16.npy"
REFORMAT_MAX_SIZE = 256  # pixels along the longer in-plane side of the stored volume
PLANES = ("coronal", "sagittal")
SLAB = 16  # slices reduced at a time, to bound the float copy on a large series


def reduction(rows: int, columns: int, max_size: int = REFORMAT_MAX_SIZE) -> int:
    """The whole-number factor that brings ``rows`` x ``columns`` to at most ``max_size`` pixels a side."""
    return max(1, math.ceil(max(rows, columns) / max_size))


def reduce_in_plane(hu: np.ndarray, factor: int) -> np.ndarray:
    """``hu[z, y, x]`` with each ``factor`` x ``factor`` block averaged (edges cropped), int16."""
    if factor == 1:
        return np.ascontiguousarray(hu, dtype=np.int16)
    z, y, x = hu.shape[0], hu.shape[1] // factor, hu.shape[2] // factor
    out = np.empty((z, y, x), dtype=np.int16)
    total = np.empty((min(SLAB, z), y, x), dtype=np.int32)
    for start in range(0, z, SLAB):
        slab = hu[start:start + SLAB]
        acc = total[:len(slab)]
        acc.fill(0)
        for i in range(factor):  # strided sums: several times faster than a mean over a reshaped view
            for j in range(factor):
                acc += slab[:, i:y * factor:factor, j:x * factor:factor]
        out[start:start + SLAB] = np.floor_divide(acc + factor * factor // 2, factor * factor)
    return out


def save(hu: np.ndarray, path: Path) -> None:
    """Write ``hu`` as ``.npy`` durably (temporary name, fsync, rename): readers never see a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    with open(tmp, "xb") as out:
        np.save(out, hu, allow_pickle=False)
        out.flush()
        os.fsync(out.fileno())
    durable_rename(tmp, path)


def load(path: Path) -> np.ndarray | None:
    """The stored volume memory-mapped read-only, or None when the series has none."""
    if not path.is_file():
        return None
    return np.load(path, mmap_mode="r", allow_pickle=False)


def plane(volume: np.ndarray, name: str, k: int, *, superior_first: bool) -> np.ndarray | None:
    """Plane ``k`` of ``volume[z, y, x]`` as rows x columns with the head at the top, or None if out of range.

    Coronal: rows along z, columns along x (index ``k`` along y); sagittal: rows along z, columns along y.
    """
    axis = {"coronal": 1, "sagittal": 2}[name]
    if not 0 <= k < volume.shape[axis]:
        return None
    cut = np.asarray(volume[:, k, :] if axis == 1 else volume[:, :, k])
    return cut if superior_first else cut[::-1]


def overlay_plane(slices: np.ndarray, maps: np.ndarray, name: str, k: int, shape_zyx: tuple[int, int, int], *,
                  superior_first: bool) -> np.ndarray:
    """A model's overlay along plane ``k`` of the reduced volume: (slices x overlay size) uint8, head at the top.

    ``slices``/``maps`` are an overlay file's volume slice indices and per-slice maps (square, stretched
    over the slice). A model that drew its map on every few slices only is filled in between, up to half
    its usual step, so a sampled mask reads as a mask rather than stripes; real gaps stay empty.
    """
    nz, ny, nx = shape_zyx
    size = maps.shape[1]
    axis_length = ny if name == "coronal" else nx
    line = min(size - 1, int((k + 0.5) * size / axis_length))
    profiles = maps[:, line, :] if name == "coronal" else maps[:, :, line]
    out = np.zeros((nz, size), dtype=np.uint8)
    order = np.argsort(slices)
    slices, profiles = slices[order], profiles[order]
    inside = (slices >= 0) & (slices < nz)
    slices, profiles = slices[inside], profiles[inside]
    if len(slices) == 0:
        return out
    reach = int(np.median(np.diff(slices))) // 2 if len(slices) > 1 else 0
    z = np.arange(nz)
    nearest = np.clip(np.searchsorted(slices, z), 0, len(slices) - 1)
    before = np.clip(nearest - 1, 0, len(slices) - 1)
    pick = np.where(np.abs(slices[before] - z) < np.abs(slices[nearest] - z), before, nearest)
    near = np.abs(slices[pick] - z) <= reach
    out[near] = profiles[pick[near]]
    return out if superior_first else out[::-1]

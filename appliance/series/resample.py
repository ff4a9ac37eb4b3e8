"""Resample a stack of slices onto regular slice positions, correcting gantry-tilt shear.

Linear interpolation along the stacking direction only, one output slice at a
time: it fills a few missing slices or evens out spacing without the
overshoot of cubic splines (which would invent HU values at tissue edges) and
costs two slices of memory per output slice. Measured for orientation:
scipy ``zoom(order=1)`` of 400x512x512 took 0.56 s, ``order=3`` 8.5 s.
"""

from __future__ import annotations

import numpy as np

AIR_HU = -1024


def resample_slices(volume: np.ndarray, source_z: np.ndarray, target_z: np.ndarray,
                    shear_per_row: float = 0.0, shear_per_column: float = 0.0,
                    fill: int = AIR_HU) -> np.ndarray:
    """Sample ``volume`` (slices at ``source_z`` mm, increasing) at ``target_z`` mm.

    With gantry tilt, the pixel in row j and column i of a source slice lies
    ``j * shear_per_row + i * shear_per_column`` mm further along the stack; the
    output puts every pixel of an output slice at the same position. Points
    outside the scanned range get ``fill``.
    """
    n, rows, columns = volume.shape
    out = np.empty((len(target_z), rows, columns), dtype=volume.dtype)
    sheared = shear_per_row != 0 or shear_per_column != 0
    if sheared:
        shear = (np.arange(rows, dtype=np.float64)[:, None] * shear_per_row
                 + np.arange(columns, dtype=np.float64)[None, :] * shear_per_column)
        jj, ii = np.indices((rows, columns))
    index = np.arange(n, dtype=np.float64)
    for k, z in enumerate(target_z):
        if not sheared:
            f = float(np.interp(z, source_z, index))
            i0 = min(int(np.floor(f)), n - 1)
            w = f - i0
            if w < 1e-6 or i0 == n - 1:
                out[k] = volume[i0]
            else:
                out[k] = np.rint((1 - w) * volume[i0] + w * volume[i0 + 1])
            continue
        zz = z - shear
        f = np.interp(zz, source_z, index)
        inside = (zz >= source_z[0] - 1e-6) & (zz <= source_z[-1] + 1e-6)
        i0 = np.minimum(np.floor(f).astype(np.intp), n - 2 if n > 1 else 0)
        w = f - i0
        lower = volume[i0, jj, ii].astype(np.float32)
        upper = volume[np.minimum(i0 + 1, n - 1), jj, ii].astype(np.float32)
        out[k] = np.where(inside, np.rint((1 - w) * lower + w * upper), fill)
    return out

"""Assemble one stored series into a checked CT volume in Hounsfield units."""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from appliance.config import Settings
from appliance.errors import ReasonCode, SeriesRejected
from appliance.series.geometry import (
    PRIORITY,
    GeometryTolerances,
    Problem,
    VolumePlan,
    plan_volume,
    positions_from_slice_location,
    reject,
)
from appliance.series.headers import Frame, SeriesFrames, read_frames
from appliance.series.pixels import decode_volume
from appliance.series.resample import resample_slices


@dataclasses.dataclass
class CTVolume:
    """A regular CT volume: ``hu[z, y, x]`` int16 with its geometry (LPS, mm)."""

    hu: np.ndarray
    plan: VolumePlan
    slices: int  # frames that went into it
    excluded: list[tuple[str, str]]
    seconds: dict[str, float]
    frames: list[Frame] = dataclasses.field(default_factory=list)  # the frames in stacking order

    @property
    def spacing_mm_zyx(self) -> tuple[float, float, float]:
        return self.plan.spacing_mm_zyx

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.plan.spacing_mm_zyx
        return dz * dy * dx / 1000.0

    def world(self, zyx: np.ndarray) -> np.ndarray:
        """Patient positions (LPS, mm) of voxel indices given as (..., 3) in z, y, x order."""
        xyz = np.asarray(zyx, dtype=np.float64)[..., ::-1]
        affine = self.plan.affine()
        return xyz @ affine[:3, :3].T + affine[:3, 3]


def _not_ct(series: SeriesFrames) -> SeriesRejected:
    modalities = ", ".join(sorted(m for m in series.modalities if m)) or "unknown"
    why = sorted({w for _, w in series.excluded})
    return SeriesRejected(ReasonCode.NOT_CT,
                          f"This series holds no CT images (modality {modalities}; {', '.join(why)}), "
                          "so it is kept but not analysed.")


def _positions(frames: list[Frame], orientation: np.ndarray) -> tuple[np.ndarray, list[Problem]]:
    """ImagePositionPatient of every frame (n, 3); a missing one of a single-frame image is taken from its
    Slice Location when the rest of the series agrees (a corrected problem), else MISSING_POSITION."""
    positions = [f.image_position for f in frames]
    known = [p for p in positions if p is not None]
    if len(known) == len(frames):
        return np.stack(known), []
    multi_frame = next((f for f in frames if f.image_position is None and f.frame_index is not None), None)
    if multi_frame is not None:
        raise reject([Problem(ReasonCode.MISSING_POSITION,
                              f"Instance {multi_frame.sop_instance_uid}: frames of this multi-frame image have no "
                              "position, so the volume cannot be built.", True)])
    filled, problem = positions_from_slice_location(positions, orientation, [f.slice_location for f in frames])
    return filled, [problem]


def _geometry_arrays(frames: list[Frame]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Problem]]:
    orientations = []
    for f in frames:
        if f.image_orientation is None:
            raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                                 f"Instance {f.sop_instance_uid} has no Image Orientation (Patient), so the volume "
                                 "cannot be built.")
        orientations.append(f.image_orientation)
    positions, problems = _positions(frames, orientations[0])
    spacing = np.array([f.pixel_spacing for f in frames], dtype=np.float64)
    return positions, np.stack(orientations), spacing, problems


def _image_size(frames: list[Frame]) -> tuple[int, int]:
    """The (rows, columns) every frame has; CORRUPT_PIXEL_DATA naming an odd one out otherwise."""
    sizes = collections.Counter((f.rows, f.columns) for f in frames)
    (rows, columns), _ = sizes.most_common(1)[0]
    if len(sizes) > 1:
        odd = next(f for f in frames if (f.rows, f.columns) != (rows, columns))
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                             f"The images of this series differ in size: instance {odd.sop_instance_uid} has "
                             f"{odd.rows} x {odd.columns} pixels, most have {rows} x {columns}.")
    return rows, columns


def _plan_frames(frames: list[Frame], tolerances: GeometryTolerances) -> VolumePlan:
    positions, orientations, spacing, corrected = _geometry_arrays(frames)
    rows, columns = _image_size(frames)
    try:
        plan = plan_volume(positions, orientations, spacing, rows, columns, tolerances=tolerances)
    except SeriesRejected as exc:
        exc.problems = (*corrected, *exc.problems)
        raise
    return dataclasses.replace(plan, problems=(*corrected, *plan.problems))


def plan_series(series: SeriesFrames, tolerances: GeometryTolerances) -> VolumePlan:
    """Geometry checks for a series' CT frames, within ``tolerances``.

    A series of another modality is rejected as NOT_CT; its geometry problems,
    if any, are listed too (and, being more specific, come first).
    """
    if series.frames:
        return _plan_frames(series.frames, tolerances)
    not_ct = _not_ct(series)
    problems = [Problem(ReasonCode.NOT_CT, not_ct.reason, True)]
    if series.other_frames:
        try:
            _plan_frames(series.other_frames, tolerances)
        except SeriesRejected as exc:
            problems = [p for p in getattr(exc, "problems", ()) if p.fatal] + problems
    raise reject(problems)


def load_series(paths: Iterable[Path], settings: Settings,
                progress: Callable[[float], None] | None = None) -> CTVolume:
    """Read, check, decode and (if needed) resample the series stored at ``paths``.

    ``progress(fraction)`` reports how much of the pixel data is decoded.

    The geometry checks apply the site's tolerances (:meth:`GeometryTolerances.from_settings`);
    ``settings.decode_workers`` processes decode compressed pixel data.

    Raises :class:`SeriesRejected` with a reason code when no usable CT volume results.
    """
    t0 = time.perf_counter()
    series = read_frames(paths)
    t_headers = time.perf_counter()
    try:
        plan = plan_series(series, GeometryTolerances.from_settings(settings))
    except SeriesRejected as exc:
        exc.problems = (*series.notes, *exc.problems)
        raise
    plan = dataclasses.replace(plan, problems=(*series.notes, *plan.problems))
    ordered = [series.frames[i] for i in plan.order]
    hu = decode_volume(ordered, settings.decode_workers, progress)
    t_decode = time.perf_counter()
    if plan.needs_resampling:
        hu = resample_slices(hu, plan.source_z_mm, plan.target_z_mm, plan.shear_mm_per_row,
                             plan.shear_mm_per_column)
    t_end = time.perf_counter()
    return CTVolume(hu=hu, plan=plan, slices=len(ordered), excluded=series.excluded, frames=ordered,
                    seconds={"headers": t_headers - t0, "decode": t_decode - t_headers, "resample": t_end - t_decode})


__all__ = ["CTVolume", "GeometryTolerances", "Problem", "PRIORITY", "load_series", "plan_series"]

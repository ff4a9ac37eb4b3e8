"""Geometry checks of a CT series, each failure a reason code and one plain sentence.

Pure functions over positions and direction cosines (LPS, mm): no files, no
pixels. The result is a :class:`VolumePlan` that says how the frames become a
regular volume (order, target slice positions, gantry-tilt shear), or a
:class:`~appliance.errors.SeriesRejected` listing every problem found.

Every number the checks depend on is a named field of :class:`GeometryTolerances`
(like highdicom's ``get_volume_positions(rtol=..., atol=...)``); its defaults are
those of the settings of the same names (``appliance.config``), and
:meth:`GeometryTolerances.from_settings` takes the site's values.

A tilt below ``TILT_TOLERANCE_DEG`` is rounding in the scanner's header, not a tilt.
``SLICE_LOCATION_TOLERANCE_MM`` is how closely the rest of a series must agree before a missing
Image Position (Patient) is taken from Slice Location (:func:`positions_from_slice_location`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from appliance.errors import ReasonCode, SeriesRejected

if TYPE_CHECKING:
    from appliance.config import Settings

TILT_TOLERANCE_DEG = 0.5
AXIAL_MIN_COSINE = 0.9  # cos(~25 degrees) between the stacking direction and the head-feet axis
COMPOUND_TILT_TOLERANCE = 1e-3
SLICE_LOCATION_TOLERANCE_MM = 0.1

# When several problems are found, the first in this order is the series' reason code:
# problems that stop the frames forming a volume at all come before the policy limits.
PRIORITY = (
    ReasonCode.MIXED_ORIENTATION, ReasonCode.MISSING_POSITION, ReasonCode.DUPLICATE_POSITIONS,
    ReasonCode.MISSING_SLICES, ReasonCode.IRREGULAR_SPACING, ReasonCode.GANTRY_TILT, ReasonCode.TOO_FEW_SLICES,
    ReasonCode.NOT_CT, ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX, ReasonCode.CORRUPT_PIXEL_DATA,
    ReasonCode.UNREADABLE_SERIES, ReasonCode.MALFORMED_NUMBER,
)


@dataclasses.dataclass(frozen=True)
class GeometryTolerances:
    """The limits the geometry checks apply; defaults are those of the settings of the same names."""

    orientation_tolerance: float = 0.01
    """Largest difference of direction cosines (unitless) within one series (MIXED_ORIENTATION beyond)."""
    duplicate_position_tolerance_mm: float = 0.05
    """Two frames closer than this along the slice normal (mm) share a position (DUPLICATE_POSITIONS)."""
    slice_spacing_tolerance: float = 0.05
    """Relative deviation of a gap from the nominal spacing still counted as regular (0.05 = 5%)."""
    max_missing_slices_fraction: float = 0.05
    """Missing slices are interpolated when at most this fraction of positions is missing ..."""
    max_missing_run: int = 2
    """... and no gap lacks more than this many slices in a row (MISSING_SLICES otherwise)."""
    max_irregular_gap_ratio: float = 2.0
    """Irregular spacing is resampled when the largest gap is at most this many times the smallest."""
    gantry_tilt_correction: bool = True
    """Resample a tilted series onto an upright grid (True) or reject it (False, GANTRY_TILT)."""
    max_gantry_tilt_deg: float = 30.0
    """A tilt beyond this (degrees) is rejected (GANTRY_TILT)."""
    min_slices: int = 10
    """A series with fewer frames is rejected (TOO_FEW_SLICES)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> GeometryTolerances:
        """The site's tolerances, from the settings of the same names."""
        return cls(orientation_tolerance=settings.orientation_tolerance,
                   duplicate_position_tolerance_mm=settings.duplicate_position_tolerance_mm,
                   slice_spacing_tolerance=settings.slice_spacing_tolerance,
                   max_missing_slices_fraction=settings.max_missing_slices_fraction,
                   max_missing_run=settings.max_missing_run,
                   max_irregular_gap_ratio=settings.max_irregular_gap_ratio,
                   gantry_tilt_correction=settings.gantry_tilt_correction,
                   max_gantry_tilt_deg=settings.max_gantry_tilt_deg,
                   min_slices=settings.min_slices)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding of the checks: ``fatal`` rejects the series, otherwise it was corrected."""

    reason_code: ReasonCode
    reason: str
    fatal: bool

    def as_dict(self) -> dict[str, object]:
        return {"reason_code": self.reason_code.value, "reason": self.reason,
                "action": "rejected" if self.fatal else "corrected"}


@dataclasses.dataclass(frozen=True)
class VolumePlan:
    """How to turn the frames into a regular volume.

    ``order`` lists frame indices by position along the stacking direction;
    ``source_z_mm`` their positions along it (first = 0); ``target_z_mm`` the
    positions of the output slices; ``shear_mm_per_row``/``_per_column`` the
    shift along the stacking direction per image row/column caused by gantry
    tilt (0 without tilt). The output volume has ``spacing_mm_zyx``, its first
    voxel at ``origin`` and axes ``direction`` (columns: x, y, z unit vectors, LPS).
    """

    order: np.ndarray
    source_z_mm: np.ndarray
    target_z_mm: np.ndarray
    shear_mm_per_row: float
    shear_mm_per_column: float
    shape_zyx: tuple[int, int, int]
    spacing_mm_zyx: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    tilt_deg: float
    problems: tuple[Problem, ...]

    @property
    def needs_resampling(self) -> bool:
        regular = (len(self.target_z_mm) == len(self.source_z_mm)
                   and np.allclose(self.target_z_mm, self.source_z_mm, atol=1e-3))
        return not regular or self.shear_mm_per_row != 0 or self.shear_mm_per_column != 0

    @property
    def is_axial(self) -> bool:
        """Slices stacked along the patient's head-feet axis (within ~25 degrees): what the models expect."""
        return abs(float(self.direction[2, 2])) >= AXIAL_MIN_COSINE

    def affine(self) -> np.ndarray:
        """4x4 matrix from voxel index (x, y, z) to patient position (LPS, mm)."""
        out = np.eye(4)
        out[:3, :3] = self.direction * np.array(self.spacing_mm_zyx[::-1])
        out[:3, 3] = self.origin
        return out


def reject(problems: list[Problem]) -> SeriesRejected:
    """One rejection for the fatal ``problems``: the first by :data:`PRIORITY` names it, all are kept."""
    fatal = sorted((p for p in problems if p.fatal), key=lambda p: PRIORITY.index(p.reason_code))
    first = fatal[0]
    others = [p.reason for p in fatal[1:]]
    reason = first.reason + (" Also: " + " ".join(others) if others else "")
    error = SeriesRejected(first.reason_code, reason)
    error.problems = tuple(problems)
    return error


def positions_from_slice_location(positions: list[np.ndarray | None], orientation: np.ndarray,
                                  slice_locations: list[float | None], *,
                                  tolerance_mm: float = SLICE_LOCATION_TOLERANCE_MM) -> tuple[np.ndarray, Problem]:
    """Fill in the missing ``positions`` (None) of single-frame images from their Slice Location (mm): the
    tolerance ``position_from_slice_location`` of docs/series-checks.md.

    Taken only where the rest of the series vouches for it: at least two images, and at least half of
    them, have both a position and a Slice Location; their positions share one in-plane point (an upright
    stack, no tilt) and their Slice Locations are their distances along the normal ``orientation`` gives,
    less one common offset, all within ``tolerance_mm``. A missing position is then that point plus
    (Slice Location + offset) along the normal. Returns the (n, 3) positions and a corrected problem;
    raises MISSING_POSITION when the series does not vouch for it.
    """
    count = sum(p is None for p in positions)
    cannot = reject([Problem(ReasonCode.MISSING_POSITION,
                             f"{count} image(s) have no Image Position (Patient), and the rest of the series "
                             "does not say where they lie, so the volume cannot be built.", True)])
    missing: dict[int, float] = {}  # index -> Slice Location of the images without a position
    known: list[tuple[np.ndarray, float]] = []  # (position, Slice Location) of those with both
    for i, (position, location) in enumerate(zip(positions, slice_locations)):
        if position is not None:
            if location is not None:
                known.append((position, location))
        elif location is None:
            raise cannot
        else:
            missing[i] = location
    if len(known) < max(2, len(positions) / 2):
        raise cannot
    normal = np.cross(orientation[:3], orientation[3:])
    normal /= np.linalg.norm(normal)
    along = np.array([p @ normal for p, _ in known])
    in_plane = np.array([p - a * normal for (p, _), a in zip(known, along)])
    offsets = along - np.array([loc for _, loc in known])
    point, offset = in_plane.mean(axis=0), float(np.median(offsets))
    if np.abs(in_plane - point).max() > tolerance_mm or np.abs(offsets - offset).max() > tolerance_mm:
        raise cannot
    filled = np.array([point if p is None else p for p in positions], dtype=np.float64)
    for i, location in missing.items():
        filled[i] += (location + offset) * normal
    return filled, Problem(ReasonCode.MISSING_POSITION,
                           f"{count} image(s) have no Image Position (Patient); it was taken from their Slice "
                           "Location, where the rest of the series agrees.", False)


def _check_orientation(orientations: np.ndarray, tolerance: float) -> Problem | None:
    spread = np.abs(orientations - orientations[0]).max()
    if spread > tolerance:
        return Problem(ReasonCode.MIXED_ORIENTATION,
                       "The images of this series are not all in the same plane orientation, "
                       "so they cannot be stacked into one volume.", True)
    return None


def _spacing_plan(z: np.ndarray, tolerances: GeometryTolerances) -> tuple[np.ndarray, Problem | None]:
    """Target slice positions for sorted positions ``z`` (mm), and what was wrong if anything."""
    gaps = np.diff(z)
    nominal = float(np.median(gaps))
    tol = tolerances.slice_spacing_tolerance
    if np.all(np.abs(gaps - nominal) <= tol * nominal):
        return z.copy(), None
    multiples = gaps / nominal
    rounded = np.round(multiples)
    if np.all(rounded >= 1) and np.all(np.abs(multiples - rounded) <= tol * rounded):
        return _missing_slices_plan(z, nominal, rounded, tolerances)
    return _irregular_spacing_plan(z, gaps, tolerances.max_irregular_gap_ratio)


def _missing_slices_plan(z: np.ndarray, nominal: float, rounded: np.ndarray,
                         tolerances: GeometryTolerances) -> tuple[np.ndarray, Problem]:
    """Positions ``z`` (mm) whose gaps are whole multiples ``rounded`` of ``nominal``: fill them in, or reject."""
    missing = int((rounded - 1).sum())
    fraction = missing / (len(z) + missing)
    run = int((rounded - 1).max())
    where = f"{missing} slice(s) are missing from this series (gaps of up to {run + 1} x {nominal:.2f} mm)"
    if fraction <= tolerances.max_missing_slices_fraction and run <= tolerances.max_missing_run:
        target = z[0] + nominal * np.arange(len(z) + missing)
        return target, Problem(ReasonCode.MISSING_SLICES, where + "; they were filled by linear interpolation.", False)
    return z, Problem(ReasonCode.MISSING_SLICES,
                      where + "; too many to fill in safely. Send the complete series again.", True)


def _irregular_spacing_plan(z: np.ndarray, gaps: np.ndarray, max_gap_ratio: float) -> tuple[np.ndarray, Problem]:
    """Positions ``z`` (mm) with uneven ``gaps``: resample at the smallest gap, or reject past ``max_gap_ratio``."""
    smallest, largest = float(gaps.min()), float(gaps.max())
    text = f"The distance between slices varies from {smallest:.2f} to {largest:.2f} mm"
    if largest / smallest <= max_gap_ratio:
        count = int(math.floor((z[-1] - z[0]) / smallest + 1e-6)) + 1
        return z[0] + smallest * np.arange(count), Problem(
            ReasonCode.IRREGULAR_SPACING, text + f"; it was resampled to a regular {smallest:.2f} mm.", False)
    return z, Problem(ReasonCode.IRREGULAR_SPACING,
                      text + ", too irregular to resample safely. Reconstruct the series with even spacing.", True)


def _check_duplicates(along_normal: np.ndarray, tolerance_mm: float) -> Problem | None:
    """Sorted positions along the slice normal (mm): frames closer than ``tolerance_mm`` share a position."""
    shared = int(np.sum(np.diff(along_normal) < tolerance_mm))
    if shared:
        return Problem(ReasonCode.DUPLICATE_POSITIONS,
                       f"{shared + 1} images share the same slice position, so this is not one volume "
                       "(a repeated or merged acquisition). Send each acquisition as its own series.", True)
    return None


def plan_volume(positions: np.ndarray, orientations: np.ndarray, pixel_spacing: np.ndarray,
                rows: int, columns: int, *, tolerances: GeometryTolerances) -> VolumePlan:
    """Check the geometry of one series' frames and plan its regular volume.

    ``positions`` (n, 3) are ImagePositionPatient, ``orientations`` (n, 6)
    ImageOrientationPatient, ``pixel_spacing`` (n, 2) PixelSpacing (row, column), mm;
    ``rows`` and ``columns`` the image size. ``tolerances`` are the limits the checks apply.
    Raises :class:`SeriesRejected` carrying every problem found.
    """
    n = len(positions)
    too_few = _count_problem(n, tolerances.min_slices)
    orientation_problem = _check_orientation(orientations, tolerances.orientation_tolerance)
    if orientation_problem:
        raise reject([orientation_problem, *too_few])
    row = orientations[0, :3] / np.linalg.norm(orientations[0, :3])
    col = orientations[0, 3:] / np.linalg.norm(orientations[0, 3:])
    along_normal = positions @ np.cross(row, col)
    order = np.argsort(along_normal, kind="stable")
    sorted_positions = positions[order]
    duplicate_problem = _check_duplicates(along_normal[order], tolerances.duplicate_position_tolerance_mm)
    if duplicate_problem:
        raise reject([duplicate_problem, *too_few])
    if n < 2:
        raise reject(too_few)
    stack = sorted_positions[-1] - sorted_positions[0]
    stack /= np.linalg.norm(stack)
    z = (sorted_positions - sorted_positions[0]) @ stack
    target, spacing_problem = _spacing_plan(z, tolerances)
    tilt = _tilt(row, col, stack, pixel_spacing[0], rows, columns)
    tilt_problem = _tilt_problem(tilt, float(z[-1]), tolerances)
    problems = [p for p in (spacing_problem, tilt_problem) if p is not None] + too_few
    if any(p.fatal for p in problems):
        raise reject(problems)
    dz = float(target[1] - target[0]) if len(target) > 1 else float(np.median(np.diff(z)))
    return VolumePlan(order=order, source_z_mm=z, target_z_mm=target, shear_mm_per_row=tilt.shear_mm_per_row,
                      shear_mm_per_column=tilt.shear_mm_per_column, shape_zyx=(len(target), rows, columns),
                      spacing_mm_zyx=(dz, tilt.row_spacing_mm, tilt.column_spacing_mm),
                      origin=sorted_positions[0].copy(), direction=tilt.direction, tilt_deg=tilt.deg,
                      problems=tuple(problems))


def _count_problem(n: int, min_slices: int) -> list[Problem]:
    needed = max(min_slices, 2)  # one image has no slice spacing, whatever the setting says
    if n < needed:
        return [Problem(ReasonCode.TOO_FEW_SLICES,
                        f"The series has {n} image(s); at least {needed} are needed for a CT volume.", True)]
    return []


class _Tilt(NamedTuple):
    """Gantry tilt of a stack of images, and the upright grid that corrects it."""

    deg: float
    shear_mm_per_row: float  # shift along the stacking direction per image row (mm)
    shear_mm_per_column: float  # ... per image column (mm)
    direction: np.ndarray  # output axes (columns: x, y, z unit vectors, LPS)
    row_spacing_mm: float  # in-plane spacing of the upright grid (mm)
    column_spacing_mm: float
    compound: bool  # tilted about both image axes at once
    displacement_mm: float  # how far along the stack the tilt shifts one image's far corner


def _tilt(row: np.ndarray, col: np.ndarray, stack: np.ndarray, spacing: np.ndarray, rows: int, columns: int) -> _Tilt:
    """The tilt between the image axes ``row``, ``col`` and the stacking direction ``stack`` (unit vectors)."""
    row_spacing, col_spacing = float(spacing[0]), float(spacing[1])
    b_row, b_col = float(row @ stack), float(col @ stack)  # components of the image axes along the stack
    deg = math.degrees(math.asin(min(1.0, math.hypot(b_row, b_col))))
    if deg < TILT_TOLERANCE_DEG:
        return _Tilt(deg, 0.0, 0.0, np.column_stack([row, col, np.cross(row, col)]), row_spacing, col_spacing,
                     compound=False, displacement_mm=0.0)
    row_perp = row - b_row * stack
    col_perp = col - b_col * stack
    direction = np.column_stack([row_perp / np.linalg.norm(row_perp), col_perp / np.linalg.norm(col_perp), stack])
    # a pixel in row j of a tilted slice lies j * row_spacing * b_col further along the stack
    return _Tilt(deg, row_spacing * b_col, col_spacing * b_row, direction,
                 row_spacing * float(np.linalg.norm(col_perp)), col_spacing * float(np.linalg.norm(row_perp)),
                 compound=min(abs(b_row), abs(b_col)) > COMPOUND_TILT_TOLERANCE,
                 displacement_mm=abs(b_col) * row_spacing * rows + abs(b_row) * col_spacing * columns)


def _tilt_problem(tilt: _Tilt, extent_mm: float, tolerances: GeometryTolerances) -> Problem | None:
    """Whether a tilt over a stack ``extent_mm`` long is corrected or rejected, and why; None for no tilt."""
    if tilt.deg < TILT_TOLERANCE_DEG:
        return None
    text = f"The gantry was tilted by {tilt.deg:.1f} degrees"
    limit = tolerances.max_gantry_tilt_deg
    if not tolerances.gantry_tilt_correction:
        return Problem(ReasonCode.GANTRY_TILT, text + "; tilted series are not accepted on this appliance.", True)
    if tilt.deg > limit:
        return Problem(ReasonCode.GANTRY_TILT,
                       text + f", more than the {limit:.0f} degrees that can be corrected.", True)
    if tilt.compound:
        return Problem(ReasonCode.GANTRY_TILT, text + " about two axes at once, which cannot be corrected.", True)
    if tilt.displacement_mm >= extent_mm:
        return Problem(ReasonCode.GANTRY_TILT,
                       text + f"; the series covers only {extent_mm:.0f} mm, less than the "
                       f"{tilt.displacement_mm:.0f} mm the tilt shifts each image by, so it cannot be corrected.", True)
    return Problem(ReasonCode.GANTRY_TILT,
                   text + "; the images were resampled onto an upright grid (tilt corrected).", False)

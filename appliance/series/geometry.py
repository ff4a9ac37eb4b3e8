"""Geometry checks of a CT series, each failure a reason code and one plain sentence.

Pure functions over positions and direction cosines (LPS, mm): no files, no
pixels. The result is a :class:`VolumePlan` that says how the frames become a
regular volume (order, target slice positions, gantry-tilt shear), or a
:class:`~appliance.errors.SeriesRejected` listing every problem found.

Tolerances (named settings, see ``appliance.config``):

- ``orientation_tolerance``: largest difference of direction cosines within one series;
- ``duplicate_position_tolerance_mm``: two frames closer than this share a position;
- ``slice_spacing_tolerance``: relative deviation of a gap still counted as regular;
- ``max_missing_slices_fraction`` and ``max_missing_run``: when missing slices are interpolated;
- ``max_irregular_gap_ratio``: when irregular spacing is resampled rather than rejected;
- ``gantry_tilt_correction`` and ``max_gantry_tilt_deg``: tilt correction policy.

A tilt below ``TILT_TOLERANCE_DEG`` is rounding in the scanner's header, not a tilt.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from appliance.errors import ReasonCode, SeriesRejected

TILT_TOLERANCE_DEG = 0.5
AXIAL_MIN_COSINE = 0.9  # cos(~25 degrees) between the stacking direction and the head-feet axis
COMPOUND_TILT_TOLERANCE = 1e-3

# When several problems are found, the first in this order is the series' reason code:
# problems that stop the frames forming a volume at all come before the policy limits.
PRIORITY = (
    ReasonCode.MIXED_ORIENTATION, ReasonCode.DUPLICATE_POSITIONS, ReasonCode.MISSING_SLICES,
    ReasonCode.IRREGULAR_SPACING, ReasonCode.GANTRY_TILT, ReasonCode.TOO_FEW_SLICES, ReasonCode.NOT_CT,
    ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX, ReasonCode.CORRUPT_PIXEL_DATA,
)


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


def _check_orientation(orientations: np.ndarray, tolerance: float) -> Problem | None:
    spread = np.abs(orientations - orientations[0]).max()
    if spread > tolerance:
        return Problem(ReasonCode.MIXED_ORIENTATION,
                       "The images of this series are not all in the same plane orientation, "
                       "so they cannot be stacked into one volume.", True)
    return None


def _spacing_plan(z: np.ndarray, settings) -> tuple[np.ndarray, Problem | None]:
    """Target slice positions for sorted positions ``z`` (mm), and what was wrong if anything."""
    gaps = np.diff(z)
    nominal = float(np.median(gaps))
    tol = settings.slice_spacing_tolerance
    if np.all(np.abs(gaps - nominal) <= tol * nominal):
        return z.copy(), None
    multiples = gaps / nominal
    rounded = np.round(multiples)
    if np.all(rounded >= 1) and np.all(np.abs(multiples - rounded) <= tol * rounded):
        missing = int((rounded - 1).sum())
        fraction = missing / (len(z) + missing)
        run = int((rounded - 1).max())
        where = f"{missing} slice(s) are missing from this series (gaps of up to {run + 1} x {nominal:.2f} mm)"
        if fraction <= settings.max_missing_slices_fraction and run <= settings.max_missing_run:
            target = z[0] + nominal * np.arange(len(z) + missing)
            return target, Problem(ReasonCode.MISSING_SLICES, where + "; they were filled by linear interpolation.", False)
        return z, Problem(ReasonCode.MISSING_SLICES,
                          where + "; too many to fill in safely. Send the complete series again.", True)
    smallest, largest = float(gaps.min()), float(gaps.max())
    text = f"The distance between slices varies from {smallest:.2f} to {largest:.2f} mm"
    if largest / smallest <= settings.max_irregular_gap_ratio:
        count = int(math.floor((z[-1] - z[0]) / smallest + 1e-6)) + 1
        return z[0] + smallest * np.arange(count), Problem(
            ReasonCode.IRREGULAR_SPACING, text + f"; it was resampled to a regular {smallest:.2f} mm.", False)
    return z, Problem(ReasonCode.IRREGULAR_SPACING,
                      text + ", too irregular to resample safely. Reconstruct the series with even spacing.", True)


def plan_volume(positions: np.ndarray, orientations: np.ndarray, pixel_spacing: np.ndarray,
                rows: int, columns: int, settings) -> VolumePlan:
    """Check the geometry of one series' frames and plan its regular volume.

    ``positions`` (n, 3) are ImagePositionPatient, ``orientations`` (n, 6)
    ImageOrientationPatient, ``pixel_spacing`` (n, 2) PixelSpacing (row, column), mm.
    Raises :class:`SeriesRejected` carrying every problem found.
    """
    problems: list[Problem] = []
    n = len(positions)
    orientation_problem = _check_orientation(orientations, settings.orientation_tolerance)
    if orientation_problem:
        problems.append(orientation_problem)
        raise reject(problems + _count_problem(n, settings))
    row = orientations[0, :3] / np.linalg.norm(orientations[0, :3])
    col = orientations[0, 3:] / np.linalg.norm(orientations[0, 3:])
    normal = np.cross(row, col)
    along_normal = positions @ normal
    order = np.argsort(along_normal, kind="stable")
    sorted_positions = positions[order]
    d = along_normal[order]
    if n > 1 and np.any(np.diff(d) < settings.duplicate_position_tolerance_mm):
        shared = int(np.sum(np.diff(d) < settings.duplicate_position_tolerance_mm)) + 1
        problems.append(Problem(ReasonCode.DUPLICATE_POSITIONS,
                                f"{shared} images share the same slice position, so this is not one volume "
                                "(a repeated or merged acquisition). Send each acquisition as its own series.", True))
        raise reject(problems + _count_problem(n, settings))
    if n < 2:
        raise reject(problems + _count_problem(n, settings))
    stack = sorted_positions[-1] - sorted_positions[0]
    stack /= np.linalg.norm(stack)
    z = (sorted_positions - sorted_positions[0]) @ stack
    target, spacing_problem = _spacing_plan(z, settings)
    if spacing_problem:
        problems.append(spacing_problem)
    shear_row, shear_col, tilt_deg, direction, dy, dx = _tilt(row, col, stack, pixel_spacing[0], rows, columns,
                                                              z[-1], settings, problems)
    problems.extend(_count_problem(n, settings))
    if any(p.fatal for p in problems):
        raise reject(problems)
    dz = float(target[1] - target[0]) if len(target) > 1 else float(np.median(np.diff(z)))
    return VolumePlan(order=order, source_z_mm=z, target_z_mm=target, shear_mm_per_row=shear_row,
                      shear_mm_per_column=shear_col, shape_zyx=(len(target), rows, columns),
                      spacing_mm_zyx=(dz, dy, dx), origin=sorted_positions[0].copy(), direction=direction,
                      tilt_deg=tilt_deg, problems=tuple(problems))


def _count_problem(n: int, settings) -> list[Problem]:
    if n < settings.min_slices:
        return [Problem(ReasonCode.TOO_FEW_SLICES,
                        f"The series has {n} image(s); at least {settings.min_slices} are needed for a CT volume.", True)]
    return []


def _tilt(row, col, stack, spacing, rows, columns, extent_mm, settings, problems):
    """Shear per row/column (mm) from gantry tilt, output direction and in-plane spacing."""
    row_spacing, col_spacing = float(spacing[0]), float(spacing[1])
    b_row, b_col = float(row @ stack), float(col @ stack)  # components of the image axes along the stack
    tilt_deg = math.degrees(math.asin(min(1.0, math.hypot(b_row, b_col))))
    direction = np.column_stack([row, col, stack])
    if tilt_deg < TILT_TOLERANCE_DEG:
        direction[:, 2] = np.cross(row, col)
        return 0.0, 0.0, tilt_deg, direction, row_spacing, col_spacing
    displacement = abs(b_col) * row_spacing * rows + abs(b_row) * col_spacing * columns
    text = f"The gantry was tilted by {tilt_deg:.1f} degrees"
    if not settings.gantry_tilt_correction:
        problems.append(Problem(ReasonCode.GANTRY_TILT, text + "; tilted series are not accepted on this appliance.", True))
    elif tilt_deg > settings.max_gantry_tilt_deg:
        problems.append(Problem(ReasonCode.GANTRY_TILT,
                                text + f", more than the {settings.max_gantry_tilt_deg:.0f} degrees that can be corrected.", True))
    elif min(abs(b_row), abs(b_col)) > COMPOUND_TILT_TOLERANCE:
        problems.append(Problem(ReasonCode.GANTRY_TILT, text + " about two axes at once, which cannot be corrected.", True))
    elif displacement >= extent_mm:
        problems.append(Problem(ReasonCode.GANTRY_TILT,
                                text + f"; the series covers only {extent_mm:.0f} mm, less than the {displacement:.0f} mm "
                                "the tilt shifts each image by, so it cannot be corrected.", True))
    else:
        problems.append(Problem(ReasonCode.GANTRY_TILT,
                                text + "; the images were resampled onto an upright grid (tilt corrected).", False))
    row_perp = row - b_row * stack
    col_perp = col - b_col * stack
    direction = np.column_stack([row_perp / np.linalg.norm(row_perp), col_perp / np.linalg.norm(col_perp), stack])
    dy = row_spacing * float(np.linalg.norm(col_perp))
    dx = col_spacing * float(np.linalg.norm(row_perp))
    # a pixel in row j of a tilted slice lies j * row_spacing * b_col further along the stack
    return row_spacing * b_col, col_spacing * b_row, tilt_deg, direction, dy, dx

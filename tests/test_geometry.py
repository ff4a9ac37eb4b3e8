"""Geometry checks on positions and orientations alone: each failure its reason code."""

import dataclasses
import math

import numpy as np
import pytest

from appliance import config
from appliance.errors import ReasonCode, SeriesRejected
from appliance.series.geometry import GeometryTolerances, plan_volume
from appliance.series.resample import resample_slices

AXIAL = [1, 0, 0, 0, 1, 0]
DEFAULT = GeometryTolerances()


def plan(z, orientation=AXIAL, rows=64, columns=64, spacing=(0.8, 0.8), positions=None, tolerances=DEFAULT):
    z = np.asarray(z, dtype=float)
    if positions is None:
        positions = np.column_stack([np.full_like(z, -100.0), np.full_like(z, -120.0), z])
    orientations = np.tile(np.asarray(orientation, dtype=float), (len(positions), 1))
    return plan_volume(positions, orientations, np.tile(spacing, (len(positions), 1)), rows, columns,
                       tolerances=tolerances)


def rejection(*args, **kwargs) -> SeriesRejected:
    with pytest.raises(SeriesRejected) as info:
        plan(*args, **kwargs)
    return info.value


def test_slices_are_ordered_by_position_not_by_file_order():
    z = np.array([30.0, 0.0, 10.0, 20.0] + [40.0 + 10 * k for k in range(8)])
    p = plan(z)
    assert list(z[p.order]) == sorted(z)
    assert p.spacing_mm_zyx == (10.0, 0.8, 0.8)
    assert not p.needs_resampling and p.problems == ()


def test_descending_positions_give_a_volume_along_the_normal():
    p = plan(np.arange(12)[::-1] * 2.5)
    assert np.allclose(p.direction, np.eye(3)) and p.origin[2] == 0.0


def test_too_few_slices():
    assert rejection([0, 1, 2]).reason_code == ReasonCode.TOO_FEW_SLICES
    assert plan([0, 1, 2], tolerances=GeometryTolerances(min_slices=3)).shape_zyx == (3, 64, 64)


def test_one_image_is_too_few_whatever_the_minimum():
    error = rejection([0.0], tolerances=GeometryTolerances(min_slices=1))
    assert error.reason_code == ReasonCode.TOO_FEW_SLICES and "at least 2" in error.reason


def test_default_tolerances_are_the_settings_defaults():
    defaults = config.Settings()
    assert GeometryTolerances.from_settings(defaults) == GeometryTolerances()
    for field in dataclasses.fields(GeometryTolerances):
        assert getattr(GeometryTolerances(), field.name) == getattr(defaults, field.name), field.name
    assert GeometryTolerances.from_settings(defaults.replace(min_slices=3)).min_slices == 3


def test_each_spacing_tolerance_is_the_one_applied():
    close = list(range(12)) + [5.02]
    assert rejection(close).reason_code == ReasonCode.DUPLICATE_POSITIONS
    assert rejection(close, tolerances=GeometryTolerances(duplicate_position_tolerance_mm=0.01)).reason_code == (
        ReasonCode.IRREGULAR_SPACING)
    uneven = np.cumsum([0] + [2.0, 2.4] * 6)
    assert plan(uneven, tolerances=GeometryTolerances(slice_spacing_tolerance=0.1)).problems == ()
    assert plan(uneven).problems[0].reason_code == ReasonCode.IRREGULAR_SPACING
    two_missing = [2.5 * k for k in range(41) if k not in (20, 21)]
    assert not plan(two_missing).problems[0].fatal
    assert rejection(two_missing, tolerances=GeometryTolerances(max_missing_run=1)).reason_code == (
        ReasonCode.MISSING_SLICES)


def test_duplicate_positions():
    z = list(range(12)) + [5.0]
    assert rejection(z).reason_code == ReasonCode.DUPLICATE_POSITIONS


def test_mixed_orientation():
    positions = np.column_stack([np.zeros(12), np.zeros(12), np.arange(12.0)])
    orientations = np.tile(np.array(AXIAL, dtype=float), (12, 1))
    orientations[5] = [1, 0, 0, 0, 0, -1]
    with pytest.raises(SeriesRejected) as info:
        plan_volume(positions, orientations, np.ones((12, 2)), 64, 64, tolerances=DEFAULT)
    assert info.value.reason_code == ReasonCode.MIXED_ORIENTATION


def test_one_missing_slice_in_forty_is_interpolated():
    z = [2.5 * k for k in range(41) if k != 20]
    p = plan(z)
    assert [pr.reason_code for pr in p.problems] == [ReasonCode.MISSING_SLICES]
    assert not p.problems[0].fatal and len(p.target_z_mm) == 41 and p.needs_resampling


def test_many_missing_slices_are_rejected():
    z = [2.5 * k for k in range(30) if k % 4 != 1]
    error = rejection(z)
    assert error.reason_code == ReasonCode.MISSING_SLICES and "too many" in error.reason


def test_mildly_irregular_spacing_is_resampled_and_wild_spacing_rejected():
    mild = np.cumsum([0] + [3.0, 4.0] * 8)
    p = plan(mild)
    assert p.problems[0].reason_code == ReasonCode.IRREGULAR_SPACING and not p.problems[0].fatal
    assert p.spacing_mm_zyx[0] == pytest.approx(3.0)
    wild = np.cumsum([0] + [1.0, 7.0] * 8)
    assert rejection(wild).reason_code == ReasonCode.IRREGULAR_SPACING


def _tilted(tilt_deg, n=40, dz=2.0, rows=64, spacing=0.8):
    t = math.radians(tilt_deg)
    orientation = [1, 0, 0, 0, math.cos(t), -math.sin(t)]
    positions = np.column_stack([np.zeros(n), np.zeros(n), dz * np.arange(n)])
    return orientation, positions, rows, spacing


def test_gantry_tilt_is_corrected_when_covered_and_rejected_when_not():
    orientation, positions, rows, spacing = _tilted(15)
    p = plan(None, orientation=orientation, positions=positions, rows=rows, spacing=(spacing, spacing))
    assert p.problems[0].reason_code == ReasonCode.GANTRY_TILT and not p.problems[0].fatal
    assert p.tilt_deg == pytest.approx(15, abs=0.01)
    assert p.spacing_mm_zyx[1] == pytest.approx(spacing * math.cos(math.radians(15)))
    assert p.shear_mm_per_row == pytest.approx(-spacing * math.sin(math.radians(15)))
    assert np.allclose(p.direction[:, 1], [0, 1, 0])
    orientation, positions, rows, spacing = _tilted(15, n=12, dz=0.5, rows=512)
    error = rejection(None, orientation=orientation, positions=positions, rows=rows, spacing=(spacing, spacing))
    assert error.reason_code == ReasonCode.GANTRY_TILT and "cannot be corrected" in error.reason


def test_gantry_tilt_policy_and_limit_reject():
    orientation, positions, _, _ = _tilted(15)
    off = GeometryTolerances(gantry_tilt_correction=False)
    assert (rejection(None, orientation=orientation, positions=positions, tolerances=off).reason_code
            == ReasonCode.GANTRY_TILT)
    strict = GeometryTolerances(max_gantry_tilt_deg=10)
    assert "more than the 10 degrees" in rejection(None, orientation=orientation, positions=positions,
                                                   tolerances=strict).reason
    orientation, positions, _, _ = _tilted(35)
    assert rejection(None, orientation=orientation, positions=positions).reason_code == ReasonCode.GANTRY_TILT


def test_every_problem_is_listed_and_the_first_by_priority_named():
    z = [5.0 * k for k in range(5) if k != 2]  # missing slice and too few slices
    error = rejection(z)
    assert error.reason_code == ReasonCode.MISSING_SLICES
    assert {p.reason_code for p in error.problems} == {ReasonCode.MISSING_SLICES, ReasonCode.TOO_FEW_SLICES}
    assert "Also:" in error.reason


def test_resampling_fills_a_missing_slice_linearly():
    volume = np.stack([np.full((4, 4), 10 * k, dtype=np.int16) for k in (0, 1, 3, 4)])
    out = resample_slices(volume, np.array([0.0, 1.0, 3.0, 4.0]), np.arange(5.0))
    assert [int(s[0, 0]) for s in out] == [0, 10, 20, 30, 40]


def test_shear_correction_moves_rows_back_into_their_plane():
    # a structure at z = 10 mm appears in a sheared stack in slice 10 - j * shear for row j
    n, rows, shear = 30, 8, -1.0
    z = np.arange(n, dtype=float)
    volume = np.zeros((n, rows, 4), dtype=np.int16)
    for j in range(rows):
        volume[int(10 - j * shear), j, :] = 100
    out = resample_slices(volume, z, z, shear_per_row=shear, fill=0)
    assert (out[10] == 100).all()


def test_axial_and_reformatted_series_are_told_apart():
    assert plan(np.arange(12) * 2.0).is_axial
    z = np.arange(12) * 2.0
    sagittal = plan(None, orientation=[0, 1, 0, 0, 0, -1],
                    positions=np.column_stack([z, np.zeros(12), np.zeros(12)]))
    assert not sagittal.is_axial
    orientation, positions, _, _ = _tilted(15)
    assert plan(None, orientation=orientation, positions=positions).is_axial  # a tilted axial is still axial


def test_a_pixel_spacing_that_is_not_two_numbers_rejects_the_series():
    import pydicom

    from appliance.series.headers import _Numbers, _pixel_spacing

    def spacing(value):
        ds = pydicom.Dataset()
        if value is not None:
            ds.PixelSpacing = value
        return _pixel_spacing(_Numbers("1.2.3", []), ds)

    assert spacing(None) == (1.0, 1.0) and spacing(["0.7", "0.8"]) == (0.7, 0.8)
    for bad in (["0.7"], ["0", "0.7"], 0.7):
        with pytest.raises(SeriesRejected) as info:
            spacing(bad)
        assert info.value.reason_code == ReasonCode.CORRUPT_PIXEL_DATA and "Instance 1.2.3" in info.value.reason

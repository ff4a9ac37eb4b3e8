"""Series assembly on the real CT data: reason codes, and geometry that agrees with dcm2niix."""

import shutil
import subprocess
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from appliance.jobs.intake import analyze_paths
from appliance.series.volume import load_series

from .conftest import need_data

BROKEN = {
    "gantrytilting": {"GANTRY_TILT"},
    "notavolume": {"DUPLICATE_POSITIONS"},
    "slicecount": {"TOO_FEW_SLICES"},
    "sliceincrement": {"MISSING_SLICES"},
    "sliceorientation": {"MIXED_ORIENTATION"},
    "duplicate-positions": {"DUPLICATE_POSITIONS"},
}
# what the tolerances of odd input note when they read past a defect (docs/series-checks.md)
TOLERANCE_CODES = {"MALFORMED_NUMBER", "MISSING_POSITION", "INVALID_UID", "MISSING_UID"}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_series_get_their_reason_code(name, settings):
    folder = need_data("ct", "broken", name)
    doc = analyze_paths([folder], settings)
    series = [s for st in doc["studies"] for s in st["series"]]
    assert series
    for s in series:
        assert s["status"] == "rejected"
        assert s["reason_code"] in BROKEN[name], (s["reason_code"], s["reason"])
        assert s["reason"] and s["problems"]
        assert not [p for p in s["problems"] if p["reason_code"] in TOLERANCE_CODES], "a tolerance repaired it"


def test_chest_abdomen_series_loads_in_hounsfield_units(settings):
    folder = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    volume = load_series(sorted(folder.glob("*.dcm")), settings)
    assert volume.hu.shape == (134, 512, 512) and volume.hu.dtype == np.int16
    assert volume.spacing_mm_zyx[0] == pytest.approx(3.0)
    air = volume.hu[:, :20, :20]
    assert -1030 < np.median(air) < -950  # air outside the patient
    assert volume.hu.max() > 1000  # bone


def test_file_order_does_not_matter(settings):
    folder = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    files = sorted(folder.glob("*.dcm"))[:30]
    a = load_series(files, settings)
    b = load_series(files[::-1][10:] + files[::-1][:10], settings)
    assert np.array_equal(a.hu, b.hu)


def test_ge_series_with_two_spacings_is_rejected_with_its_spacing(settings):
    folder = need_data("ct", "dcm-qa-ct-ge")
    doc = analyze_paths([folder], settings)
    s = doc["studies"][0]["series"][0]
    assert s["reason_code"] == "IRREGULAR_SPACING" and "mm" in s["reason"]
    assert {p["reason_code"] for p in s["problems"]} >= {"IRREGULAR_SPACING", "GANTRY_TILT"}


# --- agreement with dcm2niix ---------------------------------------------------------------

DCM2NIIX = shutil.which("dcm2niix")


def _dcm2niix(folder: Path, out: Path) -> nibabel.Nifti1Image:
    out.mkdir()
    subprocess.run([DCM2NIIX, "-z", "n", "-f", "%s", "-o", str(out), str(folder)], check=True,
                   capture_output=True)
    images = sorted(out.glob("*.nii"))
    assert len(images) == 1, images
    return nibabel.load(images[0])


def _compare_with_dcm2niix(files, settings, tmp_path):
    staging = tmp_path / "dicom"
    staging.mkdir()
    for f in files:
        shutil.copy(f, staging / f.name)
    ours = load_series(files, settings)
    ref = _dcm2niix(staging, tmp_path / "nii")
    ref_data = np.asanyarray(ref.dataobj)
    # our voxel (x, y, z) -> LPS; NIfTI affine maps its (i, j, k) -> RAS
    ras_from_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    ours_to_ref = np.linalg.inv(ref.affine) @ ras_from_lps @ ours.plan.affine()
    permutation = np.abs(np.round(ours_to_ref[:3, :3])).argmax(axis=0)
    assert sorted(ref_data.shape[:3]) == sorted(ours.hu.shape)
    assert np.allclose(np.abs(ours_to_ref[:3, :3]).sum(axis=0), 1, atol=1e-3), "orientation differs"
    spacing_ours = np.array(ours.spacing_mm_zyx[::-1])
    spacing_ref = np.array(ref.header.get_zooms()[:3])[permutation]
    assert np.allclose(spacing_ours, spacing_ref, atol=1e-3)
    rng = np.random.default_rng(0)
    zyx = np.column_stack([rng.integers(0, n, 2000) for n in ours.hu.shape])
    xyz1 = np.column_stack([zyx[:, ::-1], np.ones(len(zyx))])
    ijk = np.rint(xyz1 @ ours_to_ref.T)[:, :3].astype(int)
    theirs = ref_data[ijk[:, 0], ijk[:, 1], ijk[:, 2]]  # nibabel applies scl_slope/scl_inter
    assert np.array_equal(np.rint(theirs).astype(int), ours.hu[zyx[:, 0], zyx[:, 1], zyx[:, 2]].astype(int))


@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix is not installed (Debian package dcm2niix)")
@pytest.mark.parametrize("name", ["tcia-pancreas-ct-chest-abdomen", "totalseg-example-j2k", "dcmqi-ct-3slice"])
def test_geometry_and_voxels_agree_with_dcm2niix(name, settings, tmp_path):
    folder = need_data("ct", name)
    files = [f for f in sorted(folder.iterdir()) if f.is_file() and pydicom.misc.is_dicom(f)
             and pydicom.dcmread(f, stop_before_pixels=True).Modality == "CT"]
    _compare_with_dcm2niix(files, settings.replace(min_slices=3), tmp_path)


@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix is not installed (Debian package dcm2niix)")
def test_real_gantry_tilt_correction_agrees_with_dcm2niix(settings, tmp_path):
    """The regular 7.38 mm half of the tilted (18.5 degrees) GE series: our upright volume and
    dcm2niix's tilt-corrected one show the same anatomy at the same patient positions."""
    folder = need_data("ct", "dcm-qa-ct-ge")
    staging = tmp_path / "dicom"
    staging.mkdir()
    files = []
    for i in range(15, 29):
        shutil.copy(folder / f"{i:02d}.dcm", staging / f"{i:02d}.dcm")
        files.append(staging / f"{i:02d}.dcm")
    ours = load_series(files, settings)
    assert ours.plan.problems[0].reason_code.value == "GANTRY_TILT" and not ours.plan.problems[0].fatal
    out = tmp_path / "nii"
    out.mkdir()
    subprocess.run([DCM2NIIX, "-z", "n", "-f", "%s", "-o", str(out), str(staging)], check=True, capture_output=True)
    ref = nibabel.load(next(out.glob("*_Tilt_*.nii")))
    ref_data = np.asanyarray(ref.dataobj)
    to_ref = np.linalg.inv(ref.affine) @ np.diag([-1.0, -1.0, 1.0, 1.0]) @ ours.plan.affine()
    rng = np.random.default_rng(0)
    zyx = np.column_stack([rng.integers(2, 12, 4000), rng.integers(100, 400, 4000), rng.integers(100, 400, 4000)])
    ijk = np.rint(np.column_stack([zyx[:, ::-1], np.ones(len(zyx))]) @ to_ref.T)[:, :3].astype(int)
    inside = (ijk >= 0).all(axis=1) & (ijk < np.array(ref_data.shape)).all(axis=1)
    theirs = ref_data[tuple(ijk[inside].T)].astype(float)
    mine = ours.hu[tuple(zyx[inside].T)].astype(float)
    assert inside.mean() > 0.5
    assert np.median(np.abs(theirs - mine)) < 20
    assert np.corrcoef(theirs, mine)[0, 1] > 0.9

"""The pancreas localiser against TotalSegmentator's pancreas on two real anatomies: the check runs and measures."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("nibabel", reason="nibabel (test extras) reads the NIfTI label maps")


def need_files(*paths) -> None:
    for path in paths:
        if not path.exists():
            pytest.skip(f"real test data not found at {path} (it lives in ../shared/data beside the repository)")


def test_real_anatomy_check_gives_dice_and_centroid_distance_for_both_scans():
    from appliance import config
    from appliance.inference.registry import Registry
    from training import pancreas_real_check as check

    need_files(check.J2K_SERIES, check.J2K_LABELS, check.NIFTI_CT, check.NIFTI_LABELS)
    settings = config.load(environ={}, min_slices=1)
    results = check.real_anatomies(Registry(settings), settings)
    assert set(results) == {"j2k", "3mm"}
    for name, found in results.items():
        assert 0.0 <= found["dice"] <= 1.0, name
        assert math.isfinite(found["centroid_error_mm"]) and found["centroid_error_mm"] >= 0, name
        assert found["reference_ml"] > 0, f"{name}: TotalSegmentator's pancreas did not land on the scan's grid"
        assert found["pipeline"]
    lines = check.doc_text({"tcia": {"not_applicable": "not run here"}, **results})
    assert any("3 mm" in line and "Dice" in line for line in lines)


def test_nifti_volume_has_the_voxel_order_of_an_axial_dicom_series():
    import numpy as np

    from training import pancreas_real_check as check

    need_files(check.NIFTI_CT, check.NIFTI_LABELS)
    volume = check.volume_from_nifti(check.NIFTI_CT)
    assert np.allclose(volume.plan.direction, np.eye(3)) and volume.plan.is_axial
    liver = check.centroid_mm(volume, check.label_on_volume(volume, check.NIFTI_LABELS, 5))
    spleen = check.centroid_mm(volume, check.label_on_volume(volume, check.NIFTI_LABELS, 1))
    assert liver[0] < 0 < spleen[0]  # liver on the patient's right (LPS x < 0), spleen on the left

"""Lung opacity and emphysema measurements: synthetic lungs for the rules, the real chest CT for the figures.

The real-CT tests insert lesions of known volume (bench/opacity_checks.py does the blending: the scan's own noise
is kept, ground glass keeps its vessels) and measure them back.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.pipelines import chest_opacity, lung_emphysema, lungs
from appliance.pipelines.lung_regions import Acquisition, NotApplicable, crop_lungs
from appliance.series.geometry import VolumePlan
from appliance.series.volume import CTVolume

from .conftest import REPO, need_data

CHECKS = REPO / "bench" / "opacity_checks.py"
# Inserted ground glass of 20 mL adds 0.65-1.1x its volume to the opacity measured on the clean series: the soft
# 2 mm partial-volume edge of the insert falls partly below -600 HU (bench/opacity_checks.py: 0.78-0.88x for
# 20-60 mL inserts, central or subpleural).
GGO_RECOVERY = (0.65, 1.1)
CLEAN_MAX_PERCENT = 1.0  # normal lungs read 0-1 % opacity
LAA_RECOVERY = (0.8, 1.2)  # inserted -980 HU regions against the measured rise of LAA-910 volume


def _checks():
    spec = importlib.util.spec_from_file_location("opacity_checks", CHECKS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def synthetic_chest(slices: int = 24, size: int = 96, z_step_mm: float = 5.0) -> tuple[CTVolume, lungs.Segmentation]:
    """Two box lungs of -850 HU in soft tissue; patient z runs along ``z_step_mm`` (negative: feet first stack)."""
    hu = np.full((slices, size, size), 40, dtype=np.int16)
    hu[:, 20:76, 10:44] = -850  # image left = patient right
    hu[:, 20:76, 52:86] = -850
    rng = np.random.default_rng(0)
    hu = (hu + rng.normal(0, 15, hu.shape)).astype(np.int16)
    direction = np.eye(3)
    direction[2, 2] = np.sign(z_step_mm)
    plan = VolumePlan(order=np.arange(slices), source_z_mm=np.arange(slices) * abs(z_step_mm),
                      target_z_mm=np.arange(slices) * abs(z_step_mm), shear_mm_per_row=0.0, shear_mm_per_column=0.0,
                      shape_zyx=hu.shape, spacing_mm_zyx=(abs(z_step_mm), 2.0, 2.0), origin=np.zeros(3),
                      direction=direction, tilt_deg=0.0, problems=())
    volume = CTVolume(hu=hu, plan=plan, slices=slices, excluded=[], seconds={})
    side = np.zeros(hu.shape, dtype=np.uint8)
    side[:, 20:76, 10:44] = 1
    side[:, 20:76, 52:86] = 2
    return volume, lungs.Segmentation(body=np.ones(hu.shape, bool), lungs=side, stride=1)


def _with_patch(volume: CTVolume, zs: slice, hu_value: int, cols: slice = slice(14, 40)) -> CTVolume:
    hu = volume.hu.copy()
    hu[zs, 30:66, cols] = hu_value + (hu[zs, 30:66, cols] - (-850))  # the same noise around the new level
    return dataclasses.replace(volume, hu=hu)


def _opacity_ml(result) -> float:
    return sum(r["lung_ml"] * r["opacity_percent"] / 100 for r in _finding(result, "opacity by lung")["rows"])


def _finding(result, name: str) -> dict:
    return next(f for f in result.findings if f["name"] == name)


# --- rules, on synthetic lungs -----------------------------------------------------------------------------------

def test_no_lung_is_not_applicable():
    volume, seg = synthetic_chest()
    empty = dataclasses.replace(seg, lungs=np.zeros_like(seg.lungs))
    for module in (chest_opacity, lung_emphysema):
        with pytest.raises(NotApplicable, match="No lung"):
            module.run(volume, empty, None)
    assert chest_opacity.NotApplicable is lung_emphysema.NotApplicable is NotApplicable


def test_clean_synthetic_lungs_read_no_opacity():
    volume, seg = synthetic_chest()
    result = chest_opacity.run(volume, seg, None)
    assert result.score == 0.0 and not result.flagged
    assert result.model == "chest-opacity" and result.model_version == "1.0.0" and result.validated is False
    assert "not validated" in (result.notice or "").lower()


@pytest.mark.parametrize("z_step_mm", [5.0, -5.0])
def test_zones_follow_patient_z_and_lungs_patient_sides(z_step_mm: float, tmp_path: Path):
    """Ground glass in the cranial third of the patient's right lung, whichever way the slices are stacked."""
    volume, seg = synthetic_chest(z_step_mm=z_step_mm)
    cranial = slice(17, 24) if z_step_mm > 0 else slice(0, 7)  # +z (LPS) is cranial
    result = chest_opacity.run(_with_patch(volume, cranial, -450), seg, tmp_path)
    rows = {(r["lung"], r["zone"]): r for r in _finding(result, "opacity by zone")["rows"]}
    assert len(rows) == 6
    assert rows[("right", "upper")]["opacity_percent"] > 20
    assert all(r["opacity_percent"] == 0 for key, r in rows.items() if key != ("right", "upper"))
    assert rows[("right", "upper")]["ground_glass_percent"] == rows[("right", "upper")]["opacity_percent"]
    by_lung = {r["lung"]: r for r in _finding(result, "opacity by lung")["rows"]}
    assert by_lung["left"]["opacity_percent"] == 0 and by_lung["right"]["opacity_percent"] > 5
    assert abs(sum(r["lung_ml"] for r in rows.values()) - sum(r["lung_ml"] for r in by_lung.values())) < 0.5


def test_slice_list_complete_and_key_images_written(tmp_path: Path):
    volume, seg = synthetic_chest()
    result = chest_opacity.run(_with_patch(volume, slice(8, 14), -100), seg, tmp_path)
    slices = _finding(result, "opacity by slice")["slices"]
    assert [s["index"] for s in slices] == list(range(volume.hu.shape[0]))
    assert all(0.0 <= s["opacity_fraction"] <= 1.0 for s in slices)
    z = [s["z_mm"] for s in slices]
    assert z == sorted(z) and z[1] - z[0] == pytest.approx(5.0)
    assert max(s["opacity_fraction"] for s in slices) > 0 and slices[0]["opacity_fraction"] == 0
    keys = [f for f in result.findings if f["name"] == "key slice"]
    assert [k["rank"] for k in keys] == [1, 2, 3]
    assert all(8 <= k["slice_index"] < 14 and Path(k["key_image"]).is_file() for k in keys)
    assert (tmp_path / "overlay-chest-opacity.npz").is_file()
    rows = _finding(result, "opacity by lung")["rows"]
    right = next(r for r in rows if r["lung"] == "right")
    assert right["consolidation_percent"] > 5 and right["ground_glass_percent"] < right["consolidation_percent"]


def test_threshold_default_and_site_override():
    volume, seg = synthetic_chest()
    patched = _with_patch(volume, slice(0, 24), -450)
    default = chest_opacity.run(patched, seg, None)
    assert default.threshold == chest_opacity.DEFAULT_THRESHOLD_PERCENT and default.flagged
    site = chest_opacity.run(patched, seg, None, threshold=99.0)
    assert site.threshold == 99.0 and not site.flagged and site.score == default.score


def test_emphysema_thickness_rule():
    assert lung_emphysema.primary_threshold_hu(1.0) == -950
    assert lung_emphysema.primary_threshold_hu(1.5) == -950
    assert lung_emphysema.primary_threshold_hu(3.0) == -910
    assert lung_emphysema.primary_threshold_hu(5.0) == -910
    with pytest.raises(NotApplicable, match="thick"):
        lung_emphysema.primary_threshold_hu(7.5)
    volume, _ = synthetic_chest(z_step_mm=5.0)
    assert lung_emphysema.slice_thickness_mm(volume, Acquisition(1.25, None, None)) == (1.25, "SliceThickness")
    assert lung_emphysema.slice_thickness_mm(volume, Acquisition(None, None, None))[0] == 5.0


def test_emphysema_on_synthetic_lungs():
    volume, seg = synthetic_chest(z_step_mm=1.0)
    hu = volume.hu.copy()
    hu[:, 30:50, 14:40] = -990  # about a quarter of the right lung
    result = lung_emphysema.run(dataclasses.replace(volume, hu=hu), seg, None)
    summary = _finding(result, "emphysema")
    assert summary["threshold_hu"] == -950 and result.threshold == lung_emphysema.DEFAULT_THRESHOLD_PERCENT
    assert result.flagged and 5 < result.score < 30
    rows = {(r["lung"], r["zone"]): r for r in _finding(result, "emphysema by zone")["rows"]}
    assert all(rows[("left", z)]["laa950_percent"] < 1 for z in ("upper", "middle", "lower"))
    assert all(rows[("right", z)]["laa950_percent"] > 5 for z in ("upper", "middle", "lower"))


# --- the real chest CT --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_chest():
    folder = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    checks = _checks()
    volume = checks.load_ct(folder)
    return checks, volume, lungs.segment(volume)


def test_real_clean_lungs_read_low(real_chest):
    _, volume, seg = real_chest
    result = chest_opacity.run(volume, seg, None)
    assert result.score is not None and result.score < CLEAN_MAX_PERCENT
    assert len(_finding(result, "opacity by slice")["slices"]) == volume.hu.shape[0]


def test_real_inserted_ground_glass_measured(real_chest, tmp_path: Path):
    checks, volume, seg = real_chest
    lung = checks.full_res_lung(volume, seg)
    rng = np.random.default_rng(5)
    centre = checks.pick_centre(volume, lung, 17.0, "central", rng)
    moved, mask, inserted_ml = checks.insert_lesion(volume, lung, centre, 20.0, -500.0, rng, keep_vessels=True)
    moved_seg = lungs.segment(moved)
    result = chest_opacity.run(moved, moved_seg, tmp_path)
    measured_ml = _opacity_ml(result) - _opacity_ml(chest_opacity.run(volume, seg, None))
    assert GGO_RECOVERY[0] * inserted_ml <= measured_ml <= GGO_RECOVERY[1] * inserted_ml
    side = "right" if seg.lungs[centre[0], centre[1] // 2, centre[2] // 2] == 1 else "left"
    by_lung = {r["lung"]: r["opacity_percent"] for r in _finding(result, "opacity by lung")["rows"]}
    assert by_lung[side] > by_lung["left" if side == "right" else "right"]
    keys = [f for f in result.findings if f["name"] == "key slice"]
    assert keys and all(mask[k["slice_index"]].any() for k in keys)


def test_real_emphysema_thick_slices_and_inserted_laa(real_chest):
    checks, volume, seg = real_chest
    clean = lung_emphysema.run(volume, seg, None)
    summary = _finding(clean, "emphysema")
    assert summary["slice_thickness_mm"] == 3.0 and summary["threshold_hu"] == -910
    assert clean.threshold is None and not clean.flagged
    assert any("thicker" in c for c in summary["caveats"])
    lung = checks.full_res_lung(volume, seg)
    rng = np.random.default_rng(9)
    centre = checks.pick_centre(volume, lung, 18.0, "central", rng)
    moved, _, inserted_ml = checks.insert_lesion(volume, lung, centre, 25.0, -980.0, rng, keep_vessels=True)
    crop, moved_crop = crop_lungs(volume, seg), crop_lungs(moved, lungs.segment(moved))
    _, before = lung_emphysema.laa_masks(crop, 3.0)
    _, after = lung_emphysema.laa_masks(moved_crop, 3.0)
    rise_ml = (int(after[-910].sum()) - int(before[-910].sum())) * crop.voxel_ml
    assert LAA_RECOVERY[0] * inserted_ml <= rise_ml <= LAA_RECOVERY[1] * inserted_ml

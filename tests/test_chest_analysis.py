"""The chest analysis on real CT: the learned lung mask leads, opacity and emphysema read it, every lung result
says whether the lungs were covered, and the classical mask stands in when the learned one is unavailable."""

from __future__ import annotations

import shutil

import pytest

from appliance import config
from appliance.jobs.intake import analyze_paths
from tests.conftest import need_data

pytestmark = pytest.mark.slow


def _series(paths, settings) -> dict:
    return analyze_paths(paths, settings)["studies"][0]["series"][0]


@pytest.fixture(scope="module")
def real_chest(tmp_path_factory) -> dict:
    folder = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    settings = config.load(environ={}, home=str(tmp_path_factory.mktemp("chest") / "home"))
    return _series([folder], settings)


def test_the_learned_mask_leads_and_is_cross_checked(real_chest):
    results = {r["model"]: r for r in real_chest["results"]}
    assert "lungs-classical" not in results, "the classical mask is the cross-check, not a second result"
    lungs = {f["name"]: f for f in results["lung-segmentation"]["findings"]}
    assert 2000 < lungs["lungs"]["total_volume_ml"] < 4500  # lungs below the cut-off apices of an adult
    assert lungs["cross-check"]["against"] == "lungs-classical"
    assert all(d > 0.85 for d in lungs["cross-check"]["dice"].values())


def test_opacity_reports_every_slice_zones_and_coverage(real_chest):
    opacity = next(r for r in real_chest["results"] if r["model"] == "chest-opacity")
    found = {f["name"]: f for f in opacity["findings"]}
    slices = found["opacity by slice"]["slices"]
    assert [s["index"] for s in slices] == list(range(real_chest["shape_zyx"][0]))
    assert all(0.0 <= s["opacity_fraction"] <= 1.0 for s in slices)
    z = [s["z_mm"] for s in slices]
    assert z == sorted(z) or z == sorted(z, reverse=True)  # one position per slice along the axis
    assert len(found["opacity by zone"]["rows"]) == 6
    assert opacity["score"] < 2.0, "a normal chest reads almost no opacity"  # 0.5% measured
    assert not opacity["flagged"]
    cover = found["lung coverage"]
    assert cover["lung_mask"] == "lung-segmentation" and cover["fully_covered"] is False
    assert "apices" in opacity["notice"]


def test_emphysema_is_reported_at_the_thick_section_threshold(real_chest):
    emphysema = next(r for r in real_chest["results"] if r["model"] == "lung-emphysema")
    found = {f["name"]: f for f in emphysema["findings"]}
    assert found["emphysema"]["slice_thickness_mm"] == 3.0 and found["emphysema"]["threshold_hu"] == -910
    assert emphysema["score"] < 5.0 and not emphysema["flagged"]
    assert found["lung coverage"]["fully_covered"] is False


def test_the_classical_mask_stands_in_when_the_pack_is_missing(tmp_path):
    folder = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    engines = tmp_path / "engines"
    shipped = config.load(environ={}).engines_path
    for pack in ("chest-covid19",):
        shutil.copytree(shipped / pack, engines / pack)
    settings = config.load(environ={}, home=str(tmp_path / "home"), engines_dir=str(engines))
    series = _series([folder], settings)
    results = {r["model"]: r for r in series["results"]}
    why = {s["model"]: s["why"] for s in series["skipped_models"]}
    assert "lung-segmentation" not in results and "not installed" in why["lung-segmentation"]
    assert "classical lung mask was used" in why["lung-segmentation"]
    assert "lungs-classical" in results
    cover = next(f for f in results["chest-opacity"]["findings"] if f["name"] == "lung coverage")
    assert cover["lung_mask"] == "lungs-classical"


def test_a_coronal_reformat_is_measured_on_the_classical_mask_and_says_why(tmp_path, synthetic_chest, settings):
    import pydicom

    out = tmp_path / "coronal"
    out.mkdir()
    for n, path in enumerate(sorted(synthetic_chest.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # rows along patient x, columns downwards: coronal
        ds.ImagePositionPatient = [-100.0, -80.0 + 4.0 * n, 200.0]
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
        ds.save_as(out / path.name, enforce_file_format=True)
    series = _series([out], settings.replace(min_slices=1))
    assert series["status"] == "analyzed", series["reason"]
    why = {s["model"]: s["why"] for s in series["skipped_models"]}
    assert "not axial" in why["lung-segmentation"]
    assert "lung-segmentation" not in {r["model"] for r in series["results"]}

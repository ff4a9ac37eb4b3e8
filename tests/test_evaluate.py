"""Local validation: `appliance evaluate` on labelled cases, and recording the site's operating point."""

import shutil

import pytest

from appliance.evaluate import EvaluationError, evaluate, record_operating_point
from appliance.store.database import open_database, site_threshold

from .conftest import need_data


@pytest.fixture
def slice_cases(tmp_path):
    """40 labelled slices of the training source, in the folder layout a site would use."""
    source = need_data("covid-ct", "sars-cov-2-ct-scan")
    root = tmp_path / "cases"
    for cls in ("covid", "non-covid"):
        (root / cls).mkdir(parents=True)
        for f in sorted((source / cls).glob("*.jpg"))[-20:]:
            shutil.copy(f, root / cls / f.name)
    return root


def test_evaluate_reports_metrics_with_confidence_intervals(slice_cases, settings):
    doc = evaluate("chest-covid19", slice_cases, settings, sensitivity=0.9)
    assert doc["cases"] == 40 and doc["positives"] == 20
    for key in ("sensitivity", "specificity", "accuracy", "f1", "auc"):
        value, (lo, hi) = doc["metrics"][key]["value"], doc["metrics"][key]["ci95"]
        assert lo <= value <= hi, key
    assert doc["for_sensitivity"]["metrics"]["sensitivity"]["value"] >= 0.9
    assert doc["threshold"]["source"] == "manifest" and not doc["validated"]


def test_recorded_operating_point_is_used_and_audited(slice_cases, settings):
    doc = evaluate("chest-covid19", slice_cases, settings, sensitivity=0.95)
    record_operating_point(settings, doc, actor="admin")
    db = open_database(settings.home_path)
    assert site_threshold(db, "chest-covid19", doc["model_version"]) == doc["for_sensitivity"]["threshold"]
    assert db.execute("SELECT action FROM audit_log").fetchone()[0] == "record_operating_point"
    again = evaluate("chest-covid19", slice_cases, settings)
    assert again["threshold"] == {"value": doc["for_sensitivity"]["threshold"], "source": "site operating point"}


def test_dicom_studies_are_scored_through_the_volume_pipeline(settings, tmp_path):
    from appliance.synth.writer import SynthOptions, write_series

    for cls, seed in (("positive", 1), ("negative", 2)):
        write_series(tmp_path / "cases" / cls / f"study{seed}", SynthOptions(slices=30, size=128, region="chest",
                                                                              seed=seed))
    doc = evaluate("chest-covid19", tmp_path / "cases", settings)
    assert doc["cases"] == 2 and not doc["skipped"]


def test_unknown_class_folder_is_a_clear_error(tmp_path, settings):
    (tmp_path / "cases" / "maybe").mkdir(parents=True)
    (tmp_path / "cases" / "maybe" / "a.png").write_bytes(b"")
    with pytest.raises(EvaluationError, match="neither positive"):
        evaluate("chest-covid19", tmp_path / "cases", settings)


def test_lung_opacity_is_evaluated_on_ct_studies_and_its_site_threshold_recorded(settings, tmp_path):
    from appliance.evaluate import record_operating_point
    from appliance.store.database import open_database, site_threshold
    from appliance.synth.writer import SynthOptions, write_series

    for cls, seed in (("positive", 11), ("negative", 12)):
        write_series(tmp_path / "cases" / cls / f"study{seed}", SynthOptions(slices=30, size=128, region="chest",
                                                                              seed=seed))
    (tmp_path / "cases" / "negative" / "picture.png").write_bytes((tmp_path / "cases" / "negative").name.encode())
    doc = evaluate("chest-opacity", tmp_path / "cases", settings)
    assert doc["model"] == "chest-opacity" and doc["cases"] == 2 and not doc["validated"]
    assert doc["threshold"]["source"] == "published default" and doc["threshold"]["value"] == 5.0
    assert [s["case"] for s in doc["skipped"]] == ["negative/picture.png"]
    assert "needs DICOM CT" in doc["skipped"][0]["why"]
    record_operating_point(settings, doc, actor="admin")
    recorded = site_threshold(open_database(settings.home_path), "chest-opacity", doc["model_version"])
    assert recorded == doc["for_sensitivity"]["threshold"]
    again = evaluate("chest-opacity", tmp_path / "cases", settings)
    assert again["threshold"] == {"value": recorded, "source": "site operating point"}

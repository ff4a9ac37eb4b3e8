"""The ``appliance`` command as a user runs it: a real process, a real data directory."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import need_data

RESULT_KEYS = {"model", "model_version", "validated", "backend", "precision", "score", "threshold", "flagged",
               "findings", "seconds"}
SERIES_KEYS = {"series_instance_uid", "status", "reason_code", "reason", "slices", "shape_zyx", "spacing_mm_zyx",
               "results", "seconds"}


def appliance(*args, home):
    env = dict(os.environ, APPLIANCE_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "appliance.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_analyze_json_has_the_contract_shape(synthetic_chest, tmp_path):
    run = appliance("analyze", synthetic_chest, "--json", home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    series = doc["studies"][0]["series"][0]
    assert SERIES_KEYS <= series.keys()
    assert series["status"] == "analyzed" and series["slices"] == 40 and series["shape_zyx"] == [40, 128, 128]
    assert set(series["seconds"]) >= {"load", "preprocess", "infer", "total"}
    for result in series["results"]:
        assert RESULT_KEYS <= result.keys()
    lungs = next(r for r in series["results"] if r["model"] == "lungs-classical")
    assert lungs["score"] > 500  # mL of lung in the phantom's chest part


def test_status_counts_what_was_stored(synthetic_chest, tmp_path):
    appliance("analyze", synthetic_chest, home=tmp_path / "home")
    run = appliance("status", "--json", home=tmp_path / "home")
    doc = json.loads(run.stdout)
    assert doc["studies"] == 1 and doc["series"] == 1 and doc["instances"] == 40
    assert doc["jobs"]["done"] == 1 and doc["outbox"] == {"queued": 0, "sent": 0, "set_aside": 0, "discarded": 0}
    assert doc["quarantined"] == 1  # the ground_truth.json beside the phantom is not DICOM


def test_nothing_usable_exits_non_zero_with_one_line(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    run = appliance("analyze", folder, home=tmp_path / "home")
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and "NOTHING_USABLE" in run.stderr and "Traceback" not in run.stderr


def test_rejected_only_input_exits_non_zero_naming_the_reason(tmp_path):
    folder = need_data("ct", "broken", "gantrytilting")
    run = appliance("analyze", folder, home=tmp_path / "home")
    assert run.returncode == 1 and "GANTRY_TILT" in run.stdout + run.stderr


def test_reanalysis_supersedes_and_keeps_history(synthetic_chest, tmp_path):
    from appliance import config
    from appliance.analysis import analyze_series
    from appliance.inference.registry import shared_registry
    from appliance.store.instances import open_store

    appliance("analyze", synthetic_chest, home=tmp_path / "home")
    settings = config.load(environ={}, home=str(tmp_path / "home"))
    store = open_store(settings)
    uid = store.db.execute("SELECT series_instance_uid FROM series").fetchone()[0]
    analyze_series(store, uid, settings, shared_registry(settings))
    rows = store.db.execute("SELECT superseded FROM analyses ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [1, 0]


def test_synth_command_writes_a_series_with_ground_truth(tmp_path):
    run = appliance("synth", "--out", tmp_path / "s", "--slices", 8, "--size", 64, "--region", "abdomen",
                    "--lesion", "pancreas-hypo", home=tmp_path / "home")
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "s").glob("*.dcm"))) == 8
    truth = json.loads((tmp_path / "s" / "ground_truth.json").read_text())
    assert truth["lesions"][0]["kind"] == "pancreas-hypo"


@pytest.mark.slow
def test_real_series_analysis_measures_lungs_inside_the_body(tmp_path):
    folder = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    run = appliance("analyze", folder, "--json", home=tmp_path / "home")
    doc = json.loads(run.stdout)
    series = doc["studies"][0]["series"][0]
    lungs = {f["name"]: f for r in series["results"] if r["model"] == "lung-segmentation" for f in r["findings"]}
    right, left = lungs["right lung"], lungs["left lung"]
    assert right["centroid_mm"][0] + 100 < left["centroid_mm"][0]  # LPS: +x is the patient's left
    assert 500 < right["volume_ml"] < 4000 and 500 < left["volume_ml"] < 4000
    assert min(lungs["cross-check"]["dice"].values()) > 0.8  # the classical mask agrees
    assert lungs["lungs"]["apex_covered"] is False and lungs["lungs"]["base_covered"] is True
    assert right["slice_range"][0] > 40  # lungs are in the upper part of a chest-abdomen scan
    assert doc["import"]["quarantined"] and all(q["reason_code"] == "NOT_DICOM" for q in doc["import"]["quarantined"])


def test_serve_analyses_what_is_dropped_into_incoming(synthetic_chest, tmp_path):
    home = tmp_path / "home"
    (home / "incoming").mkdir(parents=True)
    (home / "studies").mkdir()
    import shutil

    shutil.copytree(synthetic_chest, home / "incoming" / "usb-copy")
    # a study already in the store: the first-start sample is not made
    appliance("analyze", next(synthetic_chest.glob("*.dcm")), home=home)
    run = appliance("serve", "--once", home=home)
    assert run.returncode == 0, run.stderr
    assert "Imported 39 new image(s), 1 already stored" in run.stdout
    assert not any((home / "incoming").iterdir())
    status = json.loads(appliance("status", "--json", home=home).stdout)
    assert status["instances"] == 40


def test_install_systemd_writes_into_the_folder_given_and_names_every_unit_to_enable(tmp_path):
    run = appliance("install-systemd", tmp_path / "units", home=tmp_path / "home")
    written = sorted(p.name for p in (tmp_path / "units").iterdir())
    assert "appliance-web.service" in written and "99-appliance-usb.rules" in written
    for unit in ("appliance-build-engines.service", "appliance-dicom.service", "appliance-export.timer",
                 "appliance-web.service", "appliance-worker.service"):
        assert unit in run.stdout.splitlines()[-1], unit
    assert "--install" in run.stdout
    refused = subprocess.run([sys.executable, "-m", "appliance.cli", "install-systemd"], capture_output=True,
                             text=True, env=dict(os.environ, APPLIANCE_HOME=str(tmp_path / "home")))
    assert refused.returncode == 2 and "--install" in refused.stderr

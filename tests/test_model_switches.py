"""Classifiers are off on a real deployment until the site evaluated them and the admin switched them on."""

from __future__ import annotations

import json

import pytest

from appliance import config
from appliance.evaluate import record_operating_point
from appliance.inference.packs import load_packs
from appliance.jobs.intake import analyze_paths
from appliance.store import model_switches
from appliance.store.database import open_database
from appliance.web import create_app
from tests.web_helpers import csrf, login, make_accounts

COVID = "chest-covid19"


@pytest.fixture
def deployed(tmp_path):
    """Settings of a real deployment: demonstration mode off (the default)."""
    settings = config.load(environ={}, home=str(tmp_path / "home"))
    assert settings.demonstration is False
    return settings


def _version(settings, model: str) -> str:
    packs, _ = load_packs(settings.engines_path)
    return next(p.version for p in packs if p.id == model)


def _record_evaluation(settings, model: str, version: str) -> None:
    doc = {"model": model, "model_version": version, "cases": 20,
           "for_sensitivity": {"target": 0.9, "threshold": 0.5}}
    record_operating_point(settings, doc, actor="admin")


def test_every_pack_declares_measurement_or_classifier(deployed):
    packs, refused = load_packs(deployed.engines_path)
    assert not refused
    kinds = {p.id: p.kind for p in packs}
    assert kinds[COVID] == "classifier" and kinds["abdomen-pancreas"] == "classifier"
    assert kinds["pancreas-localizer"] == "measurement"


def test_a_classifier_is_skipped_with_its_reason_on_a_real_deployment(deployed, synthetic_chest):
    series = analyze_paths([synthetic_chest], deployed)["studies"][0]["series"][0]
    models = {r["model"] for r in series["results"]}
    assert COVID not in models and "abdomen-pancreas" not in models
    why = {s["model"]: s["why"] for s in series["skipped_models"]}
    assert "off at this site" in why[COVID]
    assert "appliance evaluate --model chest-covid19 DATA --record" in why[COVID]
    assert models, "the measurements still run"


def test_switching_on_needs_the_sites_evaluation_and_is_audited(deployed, synthetic_chest):
    version = _version(deployed, COVID)
    db = open_database(deployed.home_path)
    with pytest.raises(model_switches.NotEvaluatedHere):
        model_switches.set_switch(db, COVID, version, True, "admin")
    assert not model_switches.is_switched_on(db, COVID, version)
    _record_evaluation(deployed, COVID, version)
    model_switches.set_switch(db, COVID, version, True, "admin")
    assert model_switches.is_switched_on(db, COVID, version)
    assert not model_switches.is_switched_on(db, COVID, "0.0.1"), "a switch holds for its version only"
    series = analyze_paths([synthetic_chest], deployed)["studies"][0]["series"][0]
    assert COVID in {r["model"] for r in series["results"]}
    model_switches.set_switch(db, COVID, version, False, "admin")
    assert not model_switches.is_switched_on(db, COVID, version)
    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE object = ? ORDER BY id", [COVID])]
    assert actions[-2:] == ["classifier_switched_on", "classifier_switched_off"]


def test_the_admin_page_switches_a_classifier_only_after_evaluation(deployed):
    make_accounts(deployed.home_path)
    client = create_app(deployed, environ={}).test_client()
    version = _version(deployed, COVID)
    login(client, "tech")
    token = csrf(client, "/")
    assert client.post("/admin/models/switch", data={"model": COVID, "version": version, "enabled": "1",
                                                     "csrf_token": token}).status_code == 403
    client = create_app(deployed, environ={}).test_client()
    login(client, "admin")
    page = client.get("/admin/").get_data(as_text=True)
    assert "classifier: off" in page and "measurement: always runs" in page and "Demonstration mode" not in page
    token = csrf(client, "/admin/")
    refused = client.post("/admin/models/switch", data={"model": COVID, "version": version, "enabled": "1",
                                                        "csrf_token": token}, follow_redirects=True)
    assert "Not switched on" in refused.get_data(as_text=True)
    db = open_database(deployed.home_path)
    assert not model_switches.is_switched_on(db, COVID, version)
    assert client.post("/admin/models/switch", data={"model": "pancreas-localizer", "version": "0.1.0",
                                                     "enabled": "1", "csrf_token": token}).status_code == 404
    _record_evaluation(deployed, COVID, version)
    done = client.post("/admin/models/switch", data={"model": COVID, "version": version, "enabled": "1",
                                                     "csrf_token": token}, follow_redirects=True)
    assert "switched on" in done.get_data(as_text=True)
    assert model_switches.is_switched_on(db, COVID, version)
    row = db.execute("SELECT detail FROM audit_log WHERE action = 'classifier_switched_on'").fetchone()
    detail = json.loads(row[0])
    assert detail["version"] == version and detail["operating_point_id"]


def test_demonstration_mode_runs_every_pack_under_a_banner(settings, synthetic_chest, tmp_path):
    assert settings.demonstration
    series = analyze_paths([synthetic_chest], settings)["studies"][0]["series"][0]
    assert COVID in {r["model"] for r in series["results"]}
    make_accounts(settings.home_path)
    client = create_app(settings, environ={}).test_client()
    login(client, "tech")
    assert "Demonstration mode" in client.get("/").get_data(as_text=True)

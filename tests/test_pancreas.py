"""The two-stage abdomen-pancreas pipeline on synthetic phantoms with known ground truth."""

import json

import numpy as np
import pytest

from appliance import config
from appliance.inference.registry import Registry
from appliance.pipelines import abdomen_pancreas
from appliance.series.volume import load_series
from appliance.synth.writer import SynthOptions, write_series


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """The same anatomy without and with a hypo-attenuating pancreatic lesion."""
    root = tmp_path_factory.mktemp("pancreas")
    out = {}
    for name, lesions in (("normal", ()), ("lesion", ("pancreas-hypo",))):
        write_series(root / name, SynthOptions(slices=64, size=256, region="abdomen", seed=4242, lesions=lesions))
        out[name] = root / name
    return out


def _run(folder, tmp_path):
    settings = config.load(environ={}, home=str(tmp_path / "home"))
    registry = Registry(settings)
    volume = load_series(sorted(folder.glob("*.dcm")), settings)
    loc, pack = registry.pack("pancreas-localizer"), registry.pack("abdomen-pancreas")
    (loc_session, _), (session, _) = registry.session(loc), registry.session(pack)
    return abdomen_pancreas.run(volume, loc_session, loc, session, pack, tmp_path / "artefacts")


def test_pancreas_is_localised_near_the_ground_truth(phantoms, tmp_path):
    result = _run(phantoms["normal"], tmp_path)
    truth = json.loads((phantoms["normal"] / "ground_truth.json").read_text())
    pancreas = next(o for o in truth["organs"] if o["name"] == "pancreas")
    found = next(f for f in result.findings if f["name"] == "pancreas (localised)")
    # the localised centre lies inside the true (140 mm long) pancreas
    offset = (np.array(found["centroid_mm"]) - np.array(pancreas["center_mm"])) / np.array(pancreas["radii_mm"])
    assert np.linalg.norm(offset) < 1.0
    assert not result.validated and result.notice == "synthetic-data demonstration, not for clinical use"


def test_a_lesion_raises_the_score_and_is_located(phantoms, tmp_path):
    normal = _run(phantoms["normal"], tmp_path / "a")
    lesion = _run(phantoms["lesion"], tmp_path / "b")
    assert lesion.score > normal.score
    truth = json.loads((phantoms["lesion"] / "ground_truth.json").read_text())["lesions"][0]
    region = next(f for f in lesion.findings if "centre_mm" in f)
    assert np.linalg.norm(np.array(region["centre_mm"]) - np.array(truth["center_mm"])) < 2 * truth["radius_mm"] + 10
    assert (tmp_path / "b" / "artefacts" / "abdomen-pancreas-key1.png").exists()


def test_chest_only_series_is_not_applicable(tmp_path):
    write_series(tmp_path / "chest", SynthOptions(slices=30, size=128, region="chest", seed=5))
    settings = config.load(environ={}, home=str(tmp_path / "home"))
    registry = Registry(settings)
    volume = load_series(sorted((tmp_path / "chest").glob("*.dcm")), settings)
    loc = registry.pack("pancreas-localizer")
    with pytest.raises(abdomen_pancreas.NotApplicable):
        abdomen_pancreas.localize(volume, registry.session(loc)[0])

"""Body region found by series QA, with its evidence and extent, and models run only on the region they read:
a head CT gets no lung result and no flag; the synthetic and the real chest-abdomen series are still chest."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

from appliance import config
from appliance.jobs.intake import analyze_paths
from appliance.pipelines import body_region, series_qa
from appliance.series.volume import CTVolume, load_series
from appliance.store.database import open_database
from appliance.synth.writer import SynthOptions, write_series
from tests.conftest import need_data

CHEST_MODELS = ("lung-segmentation", "chest-opacity", "lung-emphysema", "chest-covid19")


def _volume(folder: Path) -> CTVolume:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".json")
    return load_series(paths, config.load(environ={}), lambda done: None)


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head") / "head"
    write_series(out, SynthOptions(slices=60, size=128, region="head", seed=1))
    return out


@pytest.fixture(scope="module")
def tilted_head(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head") / "tilted"
    write_series(out, SynthOptions(slices=60, size=128, region="head", seed=2, tilt_deg=15))
    return out


@pytest.mark.parametrize("which", ["head", "tilted_head"])
def test_a_head_phantom_is_the_head_with_its_skull_ring_and_no_chest(which, request):
    volume = _volume(request.getfixturevalue(which))
    regions = body_region.determine(volume)
    assert regions.covers("head") and not regions.covers("chest") and not regions.covers("abdomen")
    head = next(e for e in regions.extents if e.region == "head")
    assert "bone ring" in head.evidence and "brain-density" in head.evidence
    assert head.length_mm > 100  # skull base to vertex
    assert 0 <= head.first_slice < head.last_slice < volume.hu.shape[0]
    z = body_region.slice_z_mm(volume)
    assert min(z[head.first_slice], z[head.last_slice]) == pytest.approx(head.from_mm, abs=0.1)
    neck = [e for e in regions.extents if e.region == "neck"]
    assert all(e.to_mm < head.from_mm + 1 for e in neck), "the neck lies below the head"


def test_the_synthetic_chest_abdomen_is_chest_above_abdomen(synthetic_chest):
    volume = _volume(synthetic_chest)
    regions = body_region.determine(volume)
    assert regions.covered == ["chest", "abdomen"]
    chest = next(e for e in regions.extents if e.region == "chest")
    abdomen = next(e for e in regions.extents if e.region == "abdomen")
    assert chest.from_mm >= abdomen.to_mm and "aerated lung" in chest.evidence
    assert 250 < chest.from_mm < 350  # the lung bases of the phantom lie at 285 +- 10 mm


def test_the_synthetic_abdomen_is_abdomen_only(tmp_path):
    write_series(tmp_path / "abdomen", SynthOptions(slices=40, size=128, region="abdomen", seed=4))
    regions = body_region.determine(_volume(tmp_path / "abdomen"))
    assert regions.covered == ["abdomen"]


@pytest.fixture(scope="module")
def real_chest_abdomen() -> CTVolume:
    return _volume(need_data("ct", "tcia-pancreas-ct-chest-abdomen"))


def test_the_real_chest_abdomen_series_is_chest_and_abdomen(real_chest_abdomen):
    regions = body_region.determine(real_chest_abdomen)
    assert regions.covers("chest") and regions.covers("abdomen") and not regions.covers("head")
    chest = next(e for e in regions.extents if e.region == "chest")
    assert chest.to_mm == max(e.to_mm for e in regions.extents), "the lungs are the top of this series"
    assert chest.length_mm > 80


def test_a_300_slice_512_volume_takes_a_few_hundred_ms(real_chest_abdomen):
    reps = -(-300 // real_chest_abdomen.hu.shape[0])
    hu = np.concatenate([real_chest_abdomen.hu] * reps)[:300]
    volume = dataclasses.replace(real_chest_abdomen, hu=hu)
    t0 = time.perf_counter()
    regions = body_region.determine(volume)
    seconds = time.perf_counter() - t0
    assert regions.covers("chest")
    assert seconds < 1.0, f"{seconds:.2f} s"  # ~0.1 s measured; the CPUs are shared with other work


def test_series_qa_reports_the_regions_and_never_flags(head):
    result = series_qa.run(_volume(head))
    finding = next(f for f in result.findings if f["name"] == "body region")
    assert finding["covers"][0] == "head"
    assert {"region", "from_mm", "to_mm", "slices", "evidence"} <= set(finding["regions"][0])
    assert result.flagged is False


def test_a_coronal_reformat_leaves_the_region_undetermined(head):
    volume = _volume(head)
    direction = volume.plan.direction[:, [0, 2, 1]]  # slices stacked front to back
    plan = dataclasses.replace(volume.plan, direction=direction)
    regions = body_region.determine(dataclasses.replace(volume, plan=plan))
    assert not regions.determined and regions.covered == []
    assert "not axial" in regions.as_finding()["result"]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["head", "tilted_head"])
def test_a_head_ct_gets_no_lung_result_and_no_flag(which, request, settings):
    record = analyze_paths([request.getfixturevalue(which)], settings)
    series = record["studies"][0]["series"][0]
    assert series["status"] == "analyzed"
    assert [r["model"] for r in series["results"]] == ["series-qa"], "no lung volume, no chest model"
    assert not any(r["flagged"] for r in series["results"])
    why = {s["model"]: s["why"] for s in series["skipped_models"]}
    for model in (*CHEST_MODELS, "abdomen-pancreas"):
        assert why[model].startswith("not applicable: this series covers the head (")
    assert why["chest-opacity"].endswith("the model reads the chest")
    assert why["chest-covid19"].endswith("reads the chest and needs lungs (at least 3 axial slices with lung)")
    assert why["abdomen-pancreas"].endswith("the model reads the abdomen and needs upper abdomen (pancreas)")
    db = open_database(settings.home_path)
    assert db.execute("SELECT flagged FROM studies").fetchall() == [(0,)]


@pytest.mark.slow
def test_the_synthetic_chest_still_runs_the_chest_models(synthetic_chest, settings):
    series = analyze_paths([synthetic_chest], settings)["studies"][0]["series"][0]
    models = {r["model"] for r in series["results"]}
    assert {"series-qa", "chest-opacity", "chest-covid19"} <= models
    assert models & {"lung-segmentation", "lungs-classical"}
    assert not any(s["why"].startswith("not applicable") for s in series["skipped_models"]
                   if s["model"] in CHEST_MODELS)

"""The viewer's reduced volume: block averages in-plane, whole slices, planes with the head at the top, and the
analysis writing it beside viewer.json with the geometry the reformat route answers with."""

from __future__ import annotations

import json

import numpy as np

from appliance.jobs.intake import analyze_paths
from appliance.pipelines import viewer_volume
from appliance.store.datadir import DataDirectory
from appliance.web import create_app
from tests.web_helpers import login


def test_reduction_keeps_at_most_256_pixels_a_side():
    assert viewer_volume.reduction(512, 512) == 2
    assert viewer_volume.reduction(128, 128) == 1
    assert viewer_volume.reduction(768, 512) == 3


def test_reduce_in_plane_averages_blocks_and_keeps_every_slice():
    hu = np.arange(3 * 4 * 6, dtype=np.int16).reshape(3, 4, 6)
    reduced = viewer_volume.reduce_in_plane(hu, 2)
    assert reduced.shape == (3, 2, 3) and reduced.dtype == np.int16
    assert reduced[1, 1, 2] == np.floor(hu[1, 2:4, 4:6].mean() + 0.5)  # 43.5 -> 44: halves round up


def test_planes_put_the_head_at_the_top(tmp_path):
    volume = np.zeros((5, 4, 3), dtype=np.int16)
    volume[0] = 100  # slice 0 is the most inferior when the stack runs feet to head
    viewer_volume.save(volume, tmp_path / viewer_volume.VOLUME_FILE)
    stored = viewer_volume.load(tmp_path / viewer_volume.VOLUME_FILE)
    coronal = viewer_volume.plane(stored, "coronal", 1, superior_first=False)
    assert coronal.shape == (5, 3) and (coronal[-1] == 100).all() and (coronal[0] == 0).all()
    sagittal = viewer_volume.plane(stored, "sagittal", 2, superior_first=True)
    assert sagittal.shape == (5, 4) and (sagittal[0] == 100).all()
    assert viewer_volume.plane(stored, "coronal", 4, superior_first=True) is None
    assert viewer_volume.load(tmp_path / "missing.npy") is None


def test_an_overlay_drawn_on_every_few_slices_reads_whole_along_a_plane():
    maps = np.zeros((3, 8, 8), dtype=np.uint8)
    maps[:, 3, 5] = 200  # row 3 (y), column 5 (x) of each overlay map: where planes 1 and 2 of 4 cross it
    slices = np.array([10, 4, 7])  # every third slice, in any order; slice 20 far from them
    coronal = viewer_volume.overlay_plane(slices, maps, "coronal", 1, (21, 4, 4), superior_first=True)
    assert coronal.shape == (21, 8) and coronal[:, 5].tolist() == [0] * 3 + [200] * 9 + [0] * 9
    sagittal = viewer_volume.overlay_plane(slices, maps, "sagittal", 2, (21, 4, 4), superior_first=False)
    assert sagittal[::-1][:, 3].tolist() == coronal[:, 5].tolist()


def test_the_analysis_writes_the_volume_and_the_routes_cut_it(tmp_path, synthetic_chest, app_settings):
    record = analyze_paths([synthetic_chest], app_settings)
    study = record["studies"][0]
    series = study["series"][0]["series_instance_uid"]
    folder = DataDirectory(app_settings.home_path).series_artefacts(study["study_instance_uid"], series)
    doc = json.loads((folder / "viewer.json").read_text())
    volume = np.load(folder / viewer_volume.VOLUME_FILE)
    assert list(volume.shape) == doc["volume"]["shape_zyx"] == [40, 128, 128]
    assert [f["z_mm"] for f in doc["frames"]] == sorted(f["z_mm"] for f in doc["frames"])
    client = create_app(app_settings, environ={}).test_client()
    login(client, "rad")
    answer = client.get(f"/series/{series}/reformat/coronal/64")
    rows, columns = int(answer.headers["X-Rows"]), int(answer.headers["X-Columns"])
    dz, _dy, dx = doc["volume"]["spacing_mm_zyx"]
    assert (rows, columns) == (40, 128) and answer.headers["X-Pixel-Spacing"] == f"{dz}\\{dx}"
    plane = np.frombuffer(answer.data, dtype="<i2").reshape(rows, columns)
    expected = volume[:, 64, :] if doc["volume"]["superior_first"] else volume[::-1, 64, :]
    assert (plane == expected).all()
    batch = client.get(f"/series/{series}/slices/38/8")  # two left at the end of the series
    assert batch.headers["X-Count"] == "2" and len(batch.data) == 2 * 128 * 128 * 2
    single = client.get(f"/series/{series}/slice/39")
    assert batch.data[128 * 128 * 2:] == single.data
    mask = client.get(f"/series/{series}/overlay/lungs-classical/coronal/64.png")
    assert mask.status_code == 200 and mask.mimetype == "image/png"
    for bad in ("reformat/axial/1", "reformat/coronal/128", "slices/0/33", "slices/40/1",
                "overlay/lungs-classical/axial/1.png", "overlay/no-such-model/coronal/1.png"):
        assert client.get(f"/series/{series}/{bad}").status_code == 404, bad


def test_a_series_analysed_before_the_volume_was_kept_gets_it_on_first_use(tmp_path, synthetic_chest, app_settings):
    record = analyze_paths([synthetic_chest], app_settings)
    study = record["studies"][0]
    series = study["series"][0]["series_instance_uid"]
    folder = DataDirectory(app_settings.home_path).series_artefacts(study["study_instance_uid"], series)
    written = np.load(folder / viewer_volume.VOLUME_FILE)
    doc = json.loads((folder / "viewer.json").read_text())
    geometry = doc.pop("volume")
    for frame in doc["frames"]:
        del frame["z_mm"]
    (folder / "viewer.json").write_text(json.dumps(doc))  # viewer.json as the previous version wrote it
    (folder / viewer_volume.VOLUME_FILE).unlink()
    client = create_app(app_settings, environ={}).test_client()
    login(client, "rad")
    answered = client.get(f"/series/{series}/viewer.json").json["volume"]
    assert {k: answered[k] for k in geometry} == geometry
    plane = client.get(f"/series/{series}/reformat/sagittal/30")
    rows, columns = int(plane.headers["X-Rows"]), int(plane.headers["X-Columns"])
    expected = written[:, :, 30] if geometry["superior_first"] else written[::-1, :, 30]
    assert (np.frombuffer(plane.data, dtype="<i2").reshape(rows, columns) == expected).all()
    assert (np.load(folder / viewer_volume.VOLUME_FILE) == written).all()
    assert client.get(f"/series/{series}/viewer.json").json["volume"] == answered  # kept beside it

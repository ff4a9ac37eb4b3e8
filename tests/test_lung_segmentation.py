"""The learned lung mask: network definition, model pack, segmentation on real CT, coverage, fallback."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
from scipy import ndimage

from appliance import config
from appliance.inference.backends.onnxruntime import OnnxRuntimeSession
from appliance.inference.packs import PackRefused, load_pack
from appliance.pipelines import lung_segmentation as ls
from appliance.pipelines import lungs
from appliance.series.volume import load_series
from appliance.synth import phantom
from appliance.synth.writer import SynthOptions, write_series
from tests.conftest import REPO, need_data

PACK_DIR = REPO / "engines" / "lung-segmentation"
REAL = ("ct", "tcia-pancreas-ct-chest-abdomen")


@pytest.fixture(scope="module")
def pack():
    return load_pack(PACK_DIR)


@pytest.fixture(scope="module")
def session(pack):
    return OnnxRuntimeSession(pack.file("model.onnx"), "fp32", 2)


@pytest.fixture(scope="module")
def real_volume(tmp_path_factory):
    folder = need_data(*REAL)
    settings = config.load(environ={}, home=str(tmp_path_factory.mktemp("home")))
    return load_series(sorted(folder.glob("*.dcm")), settings)


@pytest.fixture(scope="module")
def real_seg(real_volume, session, pack):
    return ls.segment(real_volume, session, pack)


def test_network_definition_reproduces_the_published_onnx_export(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is the optional training extra: pip install torch==2.13.0")
    source = need_data("models", "lung-unet-small")
    from training import lung_unet

    ours = tmp_path / "model.onnx"
    lung_unet.export(lung_unet.load(source), ours)
    diff = lung_unet.max_abs_diff(ours, source / lung_unet.REFERENCE_ONNX, lung_unet.reference_slices(count=2))
    assert diff < 1e-5


def test_pack_loads_verifies_and_refuses_a_changed_file(pack, tmp_path):
    assert pack.manifest["task"] == "segmentation" and pack.manifest["kind"] == "measurement"
    assert {"model.onnx", "evaluation.npz", "calibration.npz", "LICENSE"} <= set(pack.manifest["files"])
    assert "MIT" in pack.file("LICENSE").read_text() and "MIT" in pack.manifest["training"]["licence"]
    with np.load(pack.file("calibration.npz")) as calibration, np.load(pack.file("evaluation.npz")) as evaluation:
        assert calibration["inputs"].shape[1:] == tuple(pack.input_shape)
        assert evaluation["x"].shape[1:] == tuple(pack.input_shape) and evaluation["y"].any()
    copy = tmp_path / "lung-segmentation"
    shutil.copytree(PACK_DIR, copy, ignore=shutil.ignore_patterns("model.int8*", "build.json", "parity.*"))
    (copy / "LICENSE").write_text("changed")
    with pytest.raises(PackRefused) as refused:
        load_pack(copy)
    assert refused.value.reason_code == "PACK_TAMPERED"


def _volume_ml(seg, volume, label):
    return float((seg.lungs == label).sum()) * volume.voxel_volume_ml * seg.stride ** 2


def test_real_series_gives_two_lungs_on_the_patients_sides(real_seg, real_volume):
    right, left = (_volume_ml(real_seg, real_volume, k) for k in (1, 2))
    # chest-abdomen series cut at the upper chest: partial lungs, each well over half a litre, under 4 L
    assert 500 < right < 4000 and 500 < left < 4000
    assert 0.5 < right / left < 2.0
    findings = {f["name"]: f for f in ls.run(real_volume, real_seg).findings}
    assert findings["right lung"]["centroid_mm"][0] < 0 < findings["left lung"]["centroid_mm"][0]  # LPS: +x left
    assert real_seg.source == "lung-segmentation" and real_seg.stride == 2


def test_real_series_coverage_follows_the_slices_patient_z(real_seg, real_volume):
    cover = ls.coverage(real_seg, real_volume)
    top = int(np.argmax([real_volume.world(np.array([k, 0, 0]))[2] for k in (0, real_volume.hu.shape[0] - 1)]))
    top_slice = 0 if top == 0 else real_volume.hu.shape[0] - 1
    assert cover["apex_covered"] == (not real_seg.lungs[top_slice].any())
    assert cover["base_covered"] and not cover["fully_covered"] and "apices" in cover["note"]


def test_trachea_is_not_lung(real_seg, real_volume):
    """The trachea: the air tube near the centre of the most cranial slice."""
    hu = real_volume.hu[:, ::2, ::2]
    k = hu.shape[0] - 1 if ls._cranial_first(real_volume) is False else 0
    body = ls.upsample_body(ls.coarse_body(real_volume), hu.shape)[k]
    seed = ls._trachea_seed(hu[k] < ls.AIRWAY_HU, body, 4 * real_volume.spacing_mm_zyx[1] ** 2 / 100)
    assert seed is not None, "no trachea found on the top slice"
    labels, _ = ndimage.label(hu[k] < ls.AIRWAY_HU)
    trachea = labels == labels[seed]
    assert trachea.sum() > 20
    assert not (real_seg.lungs[k][trachea]).any()


def test_chosen_option_matches_full_resolution_fp32(real_seg, real_volume, session, pack):
    """Dice >= 0.97 against the network at 512x512 on every lung slice, with the same post-processing."""
    body4 = ls.coarse_body(real_volume)
    grid = (real_volume.hu.shape[1] // 2, real_volume.hu.shape[2] // 2)
    found = np.flatnonzero(real_seg.lungs.any(axis=(1, 2)))
    indices = np.arange(max(0, found.min() - 3), min(real_volume.hu.shape[0], found.max() + 4))
    box = ls.crop_box(body4, (grid[0] * 2, grid[1] * 2), 1)
    probs = ls.predict(real_volume, session, pack, indices, box, 1)
    full = np.zeros((len(indices), grid[0] * 2, grid[1] * 2), np.float32)
    full[:, box[0], box[1]] = probs
    raw = np.zeros((real_volume.hu.shape[0],) + grid, dtype=bool)
    raw[indices] = full.reshape(len(indices), grid[0], 2, grid[1], 2).mean(axis=(2, 4)) >= pack.threshold
    reference = ls.postprocess(raw, ls.upsample_body(body4, raw.shape), real_volume)
    assert ls.dice(real_seg.lungs > 0, reference > 0) >= 0.97
    for label in (1, 2):
        assert ls.dice(real_seg.lungs == label, reference == label) >= 0.95


def _generated_chest(tmp_path, monkeypatch, z_mm: tuple[float, float], slices: int):
    monkeypatch.setitem(phantom.REGIONS_MM, "chest-test", z_mm)
    folder = tmp_path / f"chest-{z_mm[0]:.0f}-{z_mm[1]:.0f}"
    write_series(folder, SynthOptions(slices=slices, size=512, region="chest-test", seed=5))
    settings = config.load(environ={}, home=str(tmp_path / "home"))
    return load_series(sorted(folder.glob("*.dcm")), settings)


@pytest.mark.parametrize(("z_mm", "apex", "base"), [((200.0, 650.0), True, True),   # whole lungs (285-600 mm)
                                              ((200.0, 400.0), False, True),  # cut below the apices
                                              ((320.0, 650.0), True, False)])  # cut above the bases
def test_coverage_of_generated_chests(tmp_path, monkeypatch, session, pack, z_mm, apex, base):
    volume = _generated_chest(tmp_path, monkeypatch, z_mm, slices=24)
    seg = ls.segment(volume, session, pack)
    assert (seg.lungs == 1).any() and (seg.lungs == 2).any()
    cover = ls.coverage(seg, volume)
    assert (cover["apex_covered"], cover["base_covered"], cover["fully_covered"]) == (apex, base, apex and base)
    flipped = types.SimpleNamespace(world=lambda zyx: volume.world(
        np.array([volume.hu.shape[0] - 1 - zyx[0], *zyx[1:]])))  # same anatomy, slices stored head first
    reversed_seg = lungs.Segmentation(seg.body[::-1], seg.lungs[::-1], seg.stride, seg.source)
    assert ls.coverage(reversed_seg, flipped)["apex_covered"] == apex  # type: ignore[arg-type]


def test_step_result_with_cross_check(real_seg, real_volume, pack, session):
    classical = lungs.segment(real_volume, stride=4)
    result = ls.run(real_volume, real_seg, cross_check=classical, pack=pack, session=session)
    names = [f["name"] for f in result.findings]
    assert names[:3] == ["right lung", "left lung", "lungs"] and result.model == "lung-segmentation"
    check = next(f for f in result.findings if f["name"] == "cross-check")
    assert all(0.8 <= d <= 1.0 for d in check["dice"].values())
    assert result.score == pytest.approx(sum(f["volume_ml"] for f in result.findings[:2]), abs=0.2)
    shifted = lungs.Segmentation(classical.body, np.roll(classical.lungs, 15, axis=2), 4)
    assert "disagree" in ls.run(real_volume, real_seg, cross_check=shifted).notice


class _Registry:
    def __init__(self, pack=None, refused=(), broken=False):
        self._pack, self.refused, self._broken = pack, list(refused), broken

    def pack(self, model_id):
        return self._pack

    def session(self, pack):
        if self._broken:
            raise RuntimeError("model file unreadable")
        return OnnxRuntimeSession(pack.file("model.onnx"), "fp32", 2), None


def test_falls_back_to_the_classical_mask(tmp_path, monkeypatch, pack):
    volume = _generated_chest(tmp_path, monkeypatch, (300.0, 450.0), slices=12)
    refusal = PackRefused("PACK_TAMPERED", "lung-segmentation: model.onnx does not match its SHA-256")
    for registry, why in ((_Registry(), "not installed"), (_Registry(refused=[refusal]), "SHA-256"),
                          (_Registry(pack, broken=True), "unreadable")):
        seg, reason = ls.segment_or_fallback(volume, registry)
        assert seg.source == lungs.MODEL and why in reason
        assert (seg.lungs > 0).any()
    seg, reason = ls.segment_or_fallback(volume, _Registry(pack))
    assert seg.source == ls.SOURCE and reason is None


def test_lungs_touching_at_the_anterior_junction_are_split_there():
    """Two lungs joined by a thin anterior bridge left of the body's midline: cut at the bridge, not the midline."""
    rows, cols = np.mgrid[0:100, 0:120]
    right = ((cols - 33) / 25.0) ** 2 + ((rows - 50) / 40.0) ** 2 <= 1  # patient's right: low patient x
    left = ((cols - 90) / 28.0) ** 2 + ((rows - 50) / 40.0) ** 2 <= 1
    bridge = (rows >= 40) & (rows < 45) & (cols >= 55) & (cols <= 66)
    mask = np.repeat((right | left | bridge)[None], 10, axis=0)
    assert ndimage.label(mask)[1] == 1  # one joined component
    patient_x = np.broadcast_to((cols[0] - 60) * 2.0, (100, 120))  # mm, + = patient's left (LPS)
    hu = np.full(mask.shape, -850, dtype=np.int16)
    labels = ls.split_lungs(mask, hu, patient_x, midline=8.0, voxel_ml=0.01)
    assert (labels[:, right] == 1).all() and (labels[:, left] == 2).all()
    assert set(np.unique(labels[:, bridge])) <= {1, 2} and (labels[:, bridge] == 2).any()


def test_int8_from_the_shipped_calibration_passes_the_parity_gate(pack, tmp_path):
    from appliance.inference.build import build_pack

    copy = tmp_path / "lung-segmentation"
    shutil.copytree(PACK_DIR, copy, ignore=shutil.ignore_patterns("model.int8*", "build.json", "parity.*"))
    copied = load_pack(copy)

    def shipped(settings):
        with np.load(copied.file(copied.manifest["calibration"]["file"])) as data:
            return data["inputs"].astype(np.float32)

    settings = config.load(environ={}, home=str(tmp_path / "home"))
    record = build_pack(copied, settings, calibration={"lung-segmentation": shipped}, say=lambda m: None)
    cpu = [r for r in record["parity"]["results"] if r["backend"] == "onnxruntime"]
    assert len(cpu) == 2 and all(r["enabled"] for r in cpu)
    assert all(r["candidate_metric"] >= 0.97 for r in cpu)  # Dice against FP32 on the parity set

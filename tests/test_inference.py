"""Model packs, backend choice and fallbacks, engine cache keys, the parity gate, INT8 build."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance import config
from appliance.inference import packs, parity
from appliance.inference.backends import Availability
from appliance.inference.backends import onnxruntime as ort_backend
from appliance.inference.backends import tensorrt as trt_backend
from appliance.inference.engine_cache import BuilderSettings, EngineKey, profile_shapes, stale_engines
from appliance.inference.registry import choose

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "engines" / "chest-covid19"


@pytest.fixture
def pack_copy(tmp_path) -> Path:
    """A private copy of the shipped pack, safe to tamper with or build into."""
    target = tmp_path / "engines" / "chest-covid19"
    shutil.copytree(PACK, target, ignore=shutil.ignore_patterns("model.int8*.onnx", "build.json", "parity.*"))
    return target


def test_shipped_pack_verifies_and_says_it_is_not_validated():
    pack = packs.load_pack(PACK)
    assert pack.id == "chest-covid19" and not pack.validated
    assert "Research use only" in pack.notice
    assert 0 < pack.threshold < 1 and pack.manifest["decision"]["operating_point"]
    assert pack.file("model.onnx").stat().st_size < 30 * 2**20


def test_tampered_model_is_refused(pack_copy):
    model = pack_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(packs.PackRefused) as info:
        packs.load_pack(pack_copy)
    assert info.value.reason_code == "PACK_TAMPERED" and "model.onnx" in info.value.reason
    found, refused = packs.load_packs(pack_copy.parent)
    assert found == [] and refused[0].reason_code == "PACK_TAMPERED"


def test_inconsistent_or_incomplete_packs_are_refused(pack_copy):
    manifest = (pack_copy / "manifest.toml").read_text()
    (pack_copy / "manifest.toml").write_text(manifest.replace('validation_note = "', 'validation_note = " " #'))
    with pytest.raises(packs.PackRefused, match="PACK_INCONSISTENT"):
        packs.load_pack(pack_copy)
    (pack_copy / "manifest.toml").write_text(manifest)
    (pack_copy / "evaluation.npz").unlink()
    with pytest.raises(packs.PackRefused, match="PACK_MISSING_FILE"):
        packs.load_pack(pack_copy)


def test_build_record_of_another_model_version_is_ignored(pack_copy):
    (pack_copy / "build.json").write_text(json.dumps({"model_sha256": "0" * 64, "files": {}}))
    assert packs.load_pack(pack_copy).build_record() == {}


def test_onnxruntime_runs_the_real_network_with_dynamic_batch():
    pack = packs.load_pack(PACK)
    session = ort_backend.OnnxRuntimeSession(pack.file("model.onnx"), "fp32", threads=1)
    x, _ = parity.load_evaluation_set(pack)
    for batch in (1, 5):
        out = session.run({"image": x[:batch]})
        assert out["probability"].shape == (batch, 1) and out["cam"].shape == (batch, 1, 8, 8)
    out = session.run({"image": x[:40]})["probability"][:, 0]
    assert out.std() > 0.01 and ((out > 0) & (out < 1)).all()  # a real classifier, not a constant


# --- choice of backend and precision (pure) -------------------------------------------------

def _record(enabled=True, speedup=2.5):
    return {"parity": {"results": [{"backend": "onnxruntime", "precision": "int8", "enabled": enabled,
                                    "why": "within" if enabled else "decision agreement 0.90 < 0.97",
                                    "speedup": speedup}]}}


def test_no_tensorrt_falls_back_to_onnxruntime_saying_why():
    pack = packs.load_pack(PACK)
    choice = choose(pack, _record(), Availability(False, "TensorRT is not installed"), lambda p: None)
    assert (choice.backend, choice.precision) == ("onnxruntime", "int8")
    assert "TensorRT unavailable: TensorRT is not installed" in choice.log_line(pack.id)


def test_cpu_int8_needs_parity_and_a_speedup():
    pack = packs.load_pack(PACK)
    no = Availability(False, "no GPU")
    assert choose(pack, _record(enabled=False), no, lambda p: None).precision == "fp32"
    slow = choose(pack, _record(speedup=0.9), no, lambda p: None, min_int8_speedup=1.2)
    assert slow.precision == "fp32" and "0.90x" in slow.reason
    assert choose(pack, {}, no, lambda p: None).precision == "fp32"


def test_tensorrt_engine_that_passed_parity_is_preferred(tmp_path):
    pack = packs.load_pack(PACK)
    engines = {"int8": (tmp_path / "a.engine", {"enabled": False, "why": "AUC drop 0.03 > 0.01"}),
               "fp16": (tmp_path / "b.engine", {"enabled": True})}
    choice = choose(pack, _record(), Availability(True), engines.get)
    assert (choice.backend, choice.precision) == ("tensorrt", "fp16")


def test_tensorrt_without_engines_for_this_gpu_falls_back():
    pack = packs.load_pack(PACK)
    choice = choose(pack, _record(), Availability(True), lambda p: None)
    assert choice.backend == "onnxruntime"
    assert "no int8 engine for this GPU and TensorRT version" in choice.reason


def test_backend_setting_forces_onnxruntime(tmp_path):
    pack = packs.load_pack(PACK)
    choice = choose(pack, _record(), Availability(True), lambda p: (tmp_path / "e", {"enabled": True}),
                    backend="onnxruntime")
    assert choice.backend == "onnxruntime"


def test_stub_only_tensorrt_is_not_taken_for_the_real_thing(monkeypatch, tmp_path):
    fake = tmp_path / "tensorrt"
    fake.mkdir()
    (fake / "__init__.pyi").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not trt_backend.is_available()


# --- engine cache -------------------------------------------------------------------------

KEY = EngineKey("chest-covid19", "a" * 64, "10.3.0", "NVIDIA Jetson Orin", (8, 7), "fp16", BuilderSettings())


@pytest.mark.parametrize("change", [
    {"model_sha256": "b" * 64}, {"tensorrt_version": "8.6.2"}, {"gpu_name": "NVIDIA RTX A2000"},
    {"compute_capability": (8, 6)}, {"precision": "int8"}, {"builder": BuilderSettings(max_batch=16)},
])
def test_engine_key_changes_with_everything_that_changes_the_engine(change):
    import dataclasses

    other = dataclasses.replace(KEY, **change)
    assert other.filename() != KEY.filename()


def test_engine_file_name_is_safe_and_readable():
    name = KEY.filename()
    assert name.startswith("chest-covid19.fp16.nvidia-jetson-orin.sm87.trt10.3.0.") and name.endswith(".engine")
    assert "/" not in name and " " not in name


def test_stale_engines_are_found_for_removal(tmp_path):
    import dataclasses

    current = KEY.path(tmp_path)
    old = dataclasses.replace(KEY, tensorrt_version="8.6.2").path(tmp_path)
    other_precision = dataclasses.replace(KEY, precision="int8").path(tmp_path)
    for p in (current, old, other_precision):
        p.write_bytes(b"x")
    assert stale_engines(tmp_path, KEY) == [old]


def test_profile_shapes_have_a_dynamic_batch():
    assert profile_shapes([1, 128, 128], BuilderSettings(max_batch=32, opt_batch=8)) == (
        (1, 1, 128, 128), (8, 1, 128, 128), (32, 1, 128, 128))
    with pytest.raises(ValueError, match=r"must lie in 1\.\.max_batch"):
        profile_shapes([1, 128, 128], BuilderSettings(max_batch=4, opt_batch=8))
    with pytest.raises(ValueError, match="must be positive"):
        profile_shapes([1, -1, 128], BuilderSettings())
    dynamic = profile_shapes([1, 64, 84, 84], BuilderSettings(max_batch=1, opt_batch=1), [1, 8, 32, 32],
                             [1, 128, 96, 96])
    assert dynamic == ((1, 1, 8, 32, 32), (1, 1, 64, 84, 84), (1, 1, 128, 96, 96))
    with pytest.raises(ValueError, match="must satisfy min"):
        profile_shapes([1, 64, 84, 84], BuilderSettings(max_batch=1, opt_batch=1), [1, 80, 32, 32])


# --- parity gate --------------------------------------------------------------------------

def test_parity_gate_refuses_a_precision_that_changes_decisions():
    tol = packs.Tolerance(max_abs_diff=0.05, min_decision_agreement=0.99, max_metric_drop=0.01)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    reference = np.clip(labels * 0.5 + rng.normal(0.25, 0.15, 400), 0, 1)
    close = reference + rng.normal(0, 0.002, 400)
    assert parity.compare(reference, close, labels, 0.5, "classification", tol)["enabled"]
    far = reference + rng.normal(0, 0.1, 400)
    verdict = parity.compare(reference, far, labels, 0.5, "classification", tol)
    assert not verdict["enabled"] and "decision agreement" in verdict["why"]


def test_every_shipped_pack_ships_its_calibration_inputs_or_names_a_set_the_appliance_has():
    from appliance.calibration import CALIBRATION_SETS
    from appliance.inference.build import calibration_set, shipped_calibration_file

    found, refused = packs.load_packs(REPO / "engines")
    assert found and not refused
    for pack in found:
        if shipped_calibration_file(pack) is None:
            assert calibration_set(pack, CALIBRATION_SETS) is CALIBRATION_SETS[pack.manifest["calibration"]["inputs"]]
        else:
            assert shipped_calibration_file(pack) in pack.manifest["files"] and pack.manifest["calibration"]["licence"]


def test_unknown_calibration_set_builds_no_int8_model_and_says_why(pack_copy, tmp_path):
    from appliance import tomlfile
    from appliance.inference.build import build_pack, calibration_set

    manifest = tomlfile.loads((pack_copy / "manifest.toml").read_text())
    del manifest["calibration"]["file"]  # a pack shipping no calibration inputs: only the named set can serve
    (pack_copy / "manifest.toml").write_text(tomlfile.dumps(manifest))
    pack = packs.load_pack(pack_copy)
    with pytest.raises(packs.PackRefused, match="calibration set 'chest-covid19'"):
        calibration_set(pack, {"other": lambda settings: np.zeros((1, 1, 128, 128), np.float32)})
    settings = config.load(environ={}, home=str(tmp_path / "home"), engines_dir=str(pack_copy.parent))
    record = build_pack(pack, settings, calibration={}, say=lambda m: None)
    assert not (pack_copy / "model.int8.onnx").exists() and record["parity"]["results"] == []
    skipped = [s for s in record["parity"]["skipped"] if s["backend"] == "onnxruntime"]
    assert skipped[0]["precision"] == "int8" and "does not have" in skipped[0]["why"]
    assert "does not have" in (pack_copy / "parity.md").read_text()


@pytest.mark.skipif(not trt_backend.is_available(), reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_fp16_engine_builds_and_matches_fp32(pack_copy, tmp_path):
    from appliance.calibration import CALIBRATION_SETS
    from appliance.inference.build import build_pack

    settings = config.load(environ={}, home=str(tmp_path / "home"), engines_dir=str(pack_copy.parent))
    record = build_pack(packs.load_pack(pack_copy), settings, calibration=CALIBRATION_SETS, say=lambda m: None)
    fp16 = next(r for r in record["parity"]["results"] if r["backend"] == "tensorrt" and r["precision"] == "fp16")
    assert fp16["max_abs_diff"] < 0.05


def test_one_registry_per_process_reloaded_only_when_packs_or_their_settings_change(tmp_path):
    import os
    import shutil

    from appliance import config
    from appliance.inference.registry import shared_registry

    engines = tmp_path / "engines"
    shutil.copytree(config.load(environ={}).engines_path / "chest-covid19", engines / "chest-covid19")
    settings = config.load(environ={}, home=str(tmp_path / "home"), engines_dir=str(engines))
    first = shared_registry(settings)
    assert shared_registry(settings) is first  # jobs share its sessions
    assert shared_registry(settings.replace(site_name="Another name")) is first  # unrelated setting
    manifest = engines / "chest-covid19" / "manifest.toml"
    os.utime(manifest, ns=(manifest.stat().st_atime_ns, manifest.stat().st_mtime_ns + 10**9))
    second = shared_registry(settings)
    assert second is not first  # a pack changed on disk
    assert shared_registry(settings.replace(inference_backend="onnxruntime")) is not second

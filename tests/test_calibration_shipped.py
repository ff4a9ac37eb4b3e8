"""Model packs ship their INT8 calibration inputs: a box without the developer data builds the same
INT8 model and gets the same parity report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance import calibration, config, tomlfile
from appliance.inference import build, packs, parity
from appliance.inference.backends import onnxruntime as ort_backend
from appliance.inference.backends import tensorrt as trt_backend

REPO = Path(__file__).resolve().parents[1]
ENGINES = REPO / "engines"
SHIPPED = ("chest-covid19", "pancreas-localizer", "abdomen-pancreas")
SMALLEST = "chest-covid19"  # the quickest pack to build (a 2-D CNN on 128x128 slices)
TIMINGS = ("seconds_per_item", "reference_seconds_per_item", "speedup")
MAX_CALIBRATION_BYTES = 5 * 2**20


def _copy_pack(name: str, engines: Path) -> Path:
    target = engines / name
    shutil.copytree(ENGINES / name, target, ignore=shutil.ignore_patterns("model.int8*.onnx", "build.json", "parity.*"))
    return target


def _rewrite_manifest(folder: Path, change) -> None:
    manifest = tomlfile.loads((folder / packs.MANIFEST).read_text())
    change(manifest)
    (folder / packs.MANIFEST).write_text(tomlfile.dumps(manifest))


def _cpu_results(record: dict) -> list[dict]:
    """The build's ONNX Runtime parity results without their timings (deterministic for the same models)."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in record["parity"]["results"]
            if r["backend"] == "onnxruntime"]


def _hide_developer_data(monkeypatch, missing: Path) -> dict[str, build.CalibrationSet]:
    """Make the developer data unavailable; the returned calibration mapping fails the test if used."""
    monkeypatch.setattr(calibration, "SHARED_DATA", missing)
    monkeypatch.setattr(calibration, "CHEST_CT", missing / "ct")
    monkeypatch.setattr(calibration, "COVID_CT_IMAGES", missing / "covid-ct")

    def refuse(settings: config.Settings) -> np.ndarray:
        raise AssertionError("the build made calibration inputs although the pack ships them")

    return dict.fromkeys(calibration.CALIBRATION_SETS, refuse)


def _build(folder: Path, home: Path, calibration_sets) -> dict:
    settings = config.load(environ={}, home=str(home), engines_dir=str(folder.parent))
    return build.build_pack(packs.load_pack(folder), settings, calibration=calibration_sets, say=lambda m: None)


def _check_build_artefacts(folder: Path, record: dict) -> None:
    """The INT8 models and reports exist, the build record reloads, skipped engines say why."""
    assert (folder / packs.INT8_MODEL).exists() and (folder / "parity.md").exists()
    int8 = record["parity"]["results"][0]
    assert (int8["backend"], int8["precision"]) == ("onnxruntime", "int8")
    assert int8["decision_agreement"] is not None and int8["speedup"] > 0
    skipped = {s["precision"]: s["why"] for s in record["parity"]["skipped"]}
    if not trt_backend.is_available():
        assert set(skipped) == {"fp16", "int8"} and all(skipped.values())
    rebuilt = packs.load_pack(folder).build_record()
    assert rebuilt["files"][packs.INT8_MODEL] == packs.sha256_file(folder / packs.INT8_MODEL)
    pack = packs.load_pack(folder)
    x, _ = parity.load_evaluation_set(pack)
    session = ort_backend.OnnxRuntimeSession(folder / packs.INT8_MODEL, "int8", threads=1)
    assert session.run({pack.input_name: x[:4]})[pack.manifest["decision"]["output"]].shape == (4, 1)


def test_build_without_developer_data_equals_the_build_with_it_and_passes_the_gate(tmp_path, monkeypatch):
    # as in the repository, with the developer data where it is on a development machine (if it is there at all)
    lab_folder = _copy_pack(SMALLEST, tmp_path / "lab")
    lab = _build(lab_folder, tmp_path / "home-lab", calibration.CALIBRATION_SETS)
    _check_build_artefacts(lab_folder, lab)
    # as on a deployed box: a copy of the engines folder, no developer data
    field_sets = _hide_developer_data(monkeypatch, tmp_path / "no-developer-data")
    field = _build(_copy_pack(SMALLEST, tmp_path / "field"), tmp_path / "home-field", field_sets)
    shipped = packs.load_pack(ENGINES / SMALLEST)
    assert field["calibration"]["source"] == "file" and field["calibration"]["file"] == calibration.CALIBRATION_FILE
    assert field["calibration"]["sha256"] == shipped.manifest["files"][calibration.CALIBRATION_FILE]
    int8 = [r for r in field["parity"]["results"] if r["backend"] == "onnxruntime"]
    assert len(int8) == 2 and all(r["enabled"] for r in int8), [r["why"] for r in int8]
    assert {k: field["files"][k] for k in (packs.INT8_MODEL, packs.INT8_CPU_MODEL)} == \
           {k: lab["files"][k] for k in (packs.INT8_MODEL, packs.INT8_CPU_MODEL)}
    assert _cpu_results(field) == _cpu_results(lab)
    report = (tmp_path / "field" / SMALLEST / "parity.md").read_text()
    assert f"shipped {calibration.CALIBRATION_FILE}" in report and "CC BY-NC-SA 4.0" in report


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_calibration_file_loads_with_its_checksum_shape_and_licence(name):
    pack = packs.load_pack(ENGINES / name)
    section = pack.manifest["calibration"]
    assert section["file"] == calibration.CALIBRATION_FILE and section["description"]
    path = pack.file(section["file"])
    assert packs.sha256_file(path) == pack.manifest["files"][section["file"]]
    assert 0 < path.stat().st_size <= MAX_CALIBRATION_BYTES
    with np.load(path) as data:
        assert data[build.CALIBRATION_ARRAY].dtype == calibration.CALIBRATION_DTYPE
    x = build.load_shipped_calibration(pack)
    assert x.dtype == np.float32 and len(x) >= 8 and np.isfinite(x).all()
    spec = pack.manifest["input"]
    for size, low, high in zip(x.shape[1:], spec.get("min_shape", spec["shape"]), spec.get("max_shape", spec["shape"]),
                               strict=True):
        assert low <= size <= high
    licence = section["licence"]
    if name == "chest-covid19":
        assert "CC BY-NC-SA 4.0" in licence and "CC BY 4.0" in licence and "TCIA" in licence
    else:
        assert "Apache-2.0" in licence


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_inputs_are_what_the_calibration_functions_make(name):
    if name == "chest-covid19":  # made from the developer data
        for path in (calibration.CHEST_CT, calibration.COVID_CT_IMAGES):
            if not path.exists():
                pytest.skip(f"developer data not found at {path} (../shared/data beside the repository)")
    pack = packs.load_pack(ENGINES / name)
    made = calibration.CALIBRATION_SETS[pack.manifest["calibration"]["inputs"]](config.load(environ={}))
    np.testing.assert_array_equal(build.load_shipped_calibration(pack),
                                  made.astype(calibration.CALIBRATION_DTYPE).astype(np.float32))


def test_a_pack_shipping_its_inputs_needs_no_calibration_function(tmp_path):
    folder = _copy_pack("pancreas-localizer", tmp_path / "engines")
    _rewrite_manifest(folder, lambda m: m["calibration"].update(inputs="a-set-this-appliance-lacks"))
    settings = config.load(environ={}, home=str(tmp_path / "home"))
    inputs = build.calibration_inputs(packs.load_pack(folder), settings, {})
    assert inputs.source["source"] == "file" and inputs.inputs.dtype == np.float32 and len(inputs.inputs) > 0


def test_a_calibration_file_that_does_not_match_its_checksum_is_refused(tmp_path):
    folder = _copy_pack(SMALLEST, tmp_path / "engines")
    data = bytearray((folder / calibration.CALIBRATION_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / calibration.CALIBRATION_FILE).write_bytes(bytes(data))
    with pytest.raises(packs.PackRefused) as info:
        packs.load_pack(folder)
    assert info.value.reason_code == "PACK_TAMPERED" and calibration.CALIBRATION_FILE in info.value.reason


def test_a_calibration_file_without_checksum_or_licence_is_refused(tmp_path):
    folder = _copy_pack(SMALLEST, tmp_path / "engines")
    _rewrite_manifest(folder, lambda m: m["files"].pop(calibration.CALIBRATION_FILE))
    with pytest.raises(packs.PackRefused, match="no checksum") as info:
        packs.load_pack(folder)
    assert info.value.reason_code == "PACK_INCONSISTENT"
    shutil.rmtree(folder)
    folder = _copy_pack(SMALLEST, tmp_path / "engines")
    _rewrite_manifest(folder, lambda m: m["calibration"].pop("licence"))
    with pytest.raises(packs.PackRefused, match="states no licence"):
        packs.load_pack(folder)


def test_calibration_inputs_of_the_wrong_shape_are_refused(tmp_path):
    folder = _copy_pack(SMALLEST, tmp_path / "engines")
    np.savez_compressed(folder / calibration.CALIBRATION_FILE, inputs=np.zeros((4, 1, 64, 64), np.float16))
    _rewrite_manifest(folder, lambda m: m["files"].update(
        {calibration.CALIBRATION_FILE: packs.sha256_file(folder / calibration.CALIBRATION_FILE)}))
    with pytest.raises(packs.PackRefused, match="do not fit the model input"):
        build.load_shipped_calibration(packs.load_pack(folder))

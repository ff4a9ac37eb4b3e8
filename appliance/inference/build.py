"""Build what each model pack needs on this device: the QDQ INT8 model, TensorRT engines, parity.

For every pack: calibrate and write ``model.int8.onnx`` (when INT8 is allowed),
gate it against FP32 on ONNX Runtime, build TensorRT FP16/INT8 engines into the
engine cache when TensorRT and a GPU exist (reusing cached engines and the
timing cache, removing stale ones) and gate those too; then write
``parity.json``/``parity.md`` and ``build.json`` into the pack. Without
TensorRT the CPU artefacts are still built and the skipped engines are named
with the reason.

INT8 calibration needs representative inputs made the way a pipeline makes
them. A pack ships them (``[calibration] file``, an ``.npz`` whose ``inputs``
array holds the prepared model inputs in any numeric dtype, checksummed in
``[files]``), so a box without the developer data calibrates on exactly the
same inputs and gets the same INT8 model and parity results. Only a pack
without that file falls back to a function: the manifest names a calibration
set (``[calibration] inputs``) and the caller passes ``calibration``, a mapping
from those names to functions (``appliance.calibration.CALIBRATION_SETS``);
this layer does not know the pipelines. The build record and the parity
report say which was used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from appliance.config import Settings
from appliance.durable import write_bytes_durably
from appliance.inference import packs, parity
from appliance.inference.backends import onnxruntime as ort_backend
from appliance.inference.backends import tensorrt as trt_backend
from appliance.inference.engine_cache import TIMING_CACHE_NAME, BuilderSettings, stale_engines
from appliance.inference.quantize import quantize_qdq
from appliance.inference.registry import available_packs, engine_key
from appliance.store.datadir import DataDirectory

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
# representative model inputs (N, ...) float32, prepared as the pipeline prepares them
CalibrationSet = Callable[[Settings], np.ndarray]
CALIBRATION_ARRAY = "inputs"  # the array a pack's calibration file holds


@dataclasses.dataclass(frozen=True)
class Calibration:
    """INT8 calibration inputs (N, ...) float32 and where they came from (for the build record)."""

    inputs: np.ndarray
    source: dict[str, Any]

    def describe(self) -> str:
        if self.source["source"] == "file":
            return f"the pack's {self.source['file']} ({len(self.inputs)} inputs)"
        return f"calibration set {self.source['inputs']!r} made on this box ({len(self.inputs)} inputs)"


def calibration_set(pack: packs.ModelPack, calibration: Mapping[str, CalibrationSet]) -> CalibrationSet:
    """The function making this pack's calibration inputs, by the name in ``[calibration] inputs``.

    Raises :class:`packs.PackRefused` (``PACK_INCONSISTENT``) when the manifest names none, or one
    that ``calibration`` does not hold.
    """
    name = pack.manifest.get("calibration", {}).get("inputs")
    if not isinstance(name, str):
        raise packs.PackRefused("PACK_INCONSISTENT", f"{pack.id}: the manifest names no calibration set "
                                                     "([calibration] inputs).")
    if name not in calibration:
        raise packs.PackRefused("PACK_INCONSISTENT", f"{pack.id}: the manifest names calibration set {name!r}, "
                                                     f"which this appliance does not have "
                                                     f"(known: {', '.join(sorted(calibration))}).")
    return calibration[name]


def shipped_calibration_file(pack: packs.ModelPack) -> str | None:
    """The name of the calibration file the pack ships (``[calibration] file``), or None."""
    name = pack.manifest.get("calibration", {}).get("file")
    return name if isinstance(name, str) else None


def _check_item_shape(pack: packs.ModelPack, shape: tuple[int, ...]) -> None:
    spec = pack.manifest["input"]
    low, high = spec.get("min_shape", spec["shape"]), spec.get("max_shape", spec["shape"])
    fits = len(shape) == len(low) == len(high) and all(lo <= s <= hi for s, lo, hi in zip(shape, low, high))
    if not fits:
        raise packs.PackRefused("PACK_INCONSISTENT", f"{pack.id}: calibration inputs of shape {list(shape)} do not "
                                                     f"fit the model input {spec['shape']} (without the batch axis).")


def load_shipped_calibration(pack: packs.ModelPack) -> np.ndarray:
    """The pack's shipped calibration inputs (N, ...) cast to float32.

    Raises :class:`packs.PackRefused` (``PACK_INCONSISTENT``) when the pack ships none, or a file without a
    numeric ``inputs`` array of the model's input shape. Its checksum was verified when the pack loaded.
    """
    name = shipped_calibration_file(pack)
    if name is None:
        raise packs.PackRefused("PACK_INCONSISTENT", f"{pack.id}: the pack ships no calibration file.")
    with np.load(pack.file(name), allow_pickle=False) as data:
        if CALIBRATION_ARRAY not in data.files:
            raise packs.PackRefused("PACK_INCONSISTENT", f"{pack.id}: {name} has no {CALIBRATION_ARRAY!r} array.")
        x = data[CALIBRATION_ARRAY]
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or len(x) == 0:
        raise packs.PackRefused("PACK_INCONSISTENT", f"{pack.id}: {name} holds no numeric calibration inputs.")
    _check_item_shape(pack, x.shape[1:])
    return x.astype(np.float32)


def calibration_inputs(pack: packs.ModelPack, settings: Settings,
                       calibration: Mapping[str, CalibrationSet]) -> Calibration:
    """The pack's INT8 calibration inputs: its shipped file when it has one, else the function that
    ``[calibration] inputs`` names in ``calibration``.

    Raises :class:`packs.PackRefused` (``PACK_INCONSISTENT``) when there are none to be had.
    """
    section = pack.manifest.get("calibration", {})
    name = shipped_calibration_file(pack)
    if name is not None:
        source = {"source": "file", "file": name, "sha256": pack.manifest["files"][name],
                  "licence": section.get("licence", "")}
        return Calibration(load_shipped_calibration(pack), source)
    make_inputs = calibration_set(pack, calibration)
    x = np.asarray(make_inputs(settings), dtype=np.float32)
    return Calibration(x, {"source": "function", "inputs": section["inputs"]})


def _build_int8(pack: packs.ModelPack, settings: Settings, inputs: Calibration, record: dict[str, Any],
                say: Progress) -> None:
    say(f"calibrating INT8 on {inputs.describe()}")
    for name, symmetric in ((packs.INT8_MODEL, True), (packs.INT8_CPU_MODEL, False)):
        quantize_qdq(pack.file(packs.MODEL), pack.file(name), pack.input_name, inputs.inputs,
                     symmetric_activations=symmetric)
        record["files"][name] = packs.sha256_file(pack.file(name))
    record["calibration"] = {"items": int(len(inputs.inputs)),
                             "description": pack.manifest["calibration"].get("description", ""), **inputs.source}


def _build_tensorrt(pack: packs.ModelPack, settings: Settings, record: dict[str, Any], reference, x, labels,
                    say: Progress) -> tuple[list[parity.ParityResult], list[dict[str, str]]]:
    results: list[parity.ParityResult] = []
    skipped: list[dict[str, str]] = []
    wanted = [p for p in ("fp16", "int8") if p in pack.allowed_precisions]
    available = trt_backend.is_available()
    if not available:
        return [], [{"backend": "tensorrt", "precision": p, "why": available.why} for p in wanted]
    cache = DataDirectory(settings.home_path).engines_cache
    gpu, version = trt_backend.gpu_identity(), trt_backend.tensorrt_version()
    builder = BuilderSettings()
    for precision in wanted:
        if precision == "int8" and packs.INT8_MODEL not in record["files"]:
            skipped.append({"backend": "tensorrt", "precision": precision, "why": "no QDQ INT8 model"})
            continue
        key = engine_key(pack, record, precision, gpu, version, builder)
        path = key.path(cache)
        for old in stale_engines(cache, key):
            say(f"removing stale engine {old.name}")
            old.unlink()
            old.with_suffix(".parity.json").unlink(missing_ok=True)
        if path.exists():
            say(f"TensorRT {precision} engine cached: {path.name}")
        else:
            say(f"building TensorRT {precision} engine for {gpu[0]} (TensorRT {version})")
            onnx = pack.file(packs.INT8_MODEL if precision == "int8" else packs.MODEL)
            trt_backend.build_engine(onnx, path, precision, pack.input_shape, builder, cache / TIMING_CACHE_NAME,
                                     pack.manifest["input"].get("min_shape"), pack.manifest["input"].get("max_shape"))
        result = parity.evaluate(pack, reference, trt_backend.TensorRTSession(path, precision), x, labels)
        write_bytes_durably(json.dumps(result.as_dict(), indent=2).encode(), path.with_suffix(".parity.json"))
        results.append(result)
    return results, skipped


def build_pack(pack: packs.ModelPack, settings: Settings, *, calibration: Mapping[str, CalibrationSet],
               say: Progress = log.info) -> dict[str, Any]:
    """Build and gate every precision of one pack; returns its build record.

    The pack's shipped calibration file is used when it has one; otherwise ``calibration`` maps the
    calibration-set names manifests use to the functions making them. A pack with neither gets no INT8
    model; the parity report says why.
    """
    record: dict[str, Any] = {"model": pack.id, "model_sha256": pack.model_sha256, "files": {}}
    reference = ort_backend.OnnxRuntimeSession(pack.file(packs.MODEL), "fp32", settings.inference_threads)
    x, labels = parity.load_evaluation_set(pack)
    results: list[parity.ParityResult] = []
    skipped: list[dict[str, str]] = []
    if "int8" in pack.allowed_precisions:
        try:
            inputs = calibration_inputs(pack, settings, calibration)
        except packs.PackRefused as exc:
            say(f"no INT8 model: {exc.reason}")
            skipped.append({"backend": "onnxruntime", "precision": "int8", "why": exc.reason})
        else:
            _build_int8(pack, settings, inputs, record, say)
            say("checking INT8 parity on ONNX Runtime")
            for name in (packs.INT8_MODEL, packs.INT8_CPU_MODEL):
                int8 = ort_backend.OnnxRuntimeSession(pack.file(name), "int8", settings.inference_threads)
                results.append(parity.evaluate(pack, reference, int8, x, labels))
    trt_results, trt_skipped = _build_tensorrt(pack, settings, record, reference, x, labels, say)
    results += trt_results
    skipped += trt_skipped
    record["parity"] = {"results": [r.as_dict() for r in results], "skipped": skipped}
    parity.write_reports(pack.path, pack, results, skipped, record.get("calibration"))
    write_bytes_durably(json.dumps(record, indent=2).encode(), pack.file(packs.BUILD_RECORD))
    return record


def build_all(settings: Settings, *, calibration: Mapping[str, CalibrationSet],
              say: Progress = print) -> list[dict[str, Any]]:
    """Build every pack: shipped under the engines folder and imported by the site (``<home>/packs``);
    refused packs are reported, never built.

    ``calibration`` maps the calibration-set names manifests use to the functions making them
    (``appliance.calibration.CALIBRATION_SETS``), for packs that ship no calibration file.
    """
    found, refused = available_packs(settings)
    for refusal in refused:
        say(f"REFUSED {refusal}")
    records = []
    bar: Iterable[packs.ModelPack] = found
    write = say  # lines go above the progress bar when there is one
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; plain lines without it
        pass
    else:
        bar = progress = tqdm(found, desc="model packs", unit="pack")
        write = progress.write
    for pack in bar:
        def step(message: str, pack: packs.ModelPack = pack) -> None:
            write(f"{pack.id}: {message}")

        records.append(build_pack(pack, settings, calibration=calibration, say=step))
    return records

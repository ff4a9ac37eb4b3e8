"""Pick the best backend and precision per model, and fall back to ONNX Runtime saying why.

The choice is a pure function of the pack, its build record (parity on ONNX
Runtime), TensorRT's availability and the engines built on this device (with
their own parity results), so every fallback path is unit-tested without a GPU.
Sessions are opened once per process and reused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance import signing
from appliance.config import Settings
from appliance.inference import packs, policy, trust
from appliance.inference.backends import Availability, Session
from appliance.inference.backends import onnxruntime as ort_backend
from appliance.inference.backends import tensorrt as trt_backend
from appliance.inference.engine_cache import BuilderSettings, EngineKey
from appliance.store.datadir import DataDirectory

log = logging.getLogger(__name__)

TRT_PREFERENCE = ("int8", "fp16")  # fastest first; FP32 on a GPU gains little over the ORT reference


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    precision: str
    path: Path  # ONNX model for ONNX Runtime, engine for TensorRT
    reason: str

    def log_line(self, model_id: str) -> str:
        return f"{model_id}: {self.backend} {self.precision} ({self.reason})"


def choose_cpu(pack: packs.ModelPack, record: dict, min_int8_speedup: float) -> tuple[str, Path, str]:
    """(precision, model file, why) on ONNX Runtime: the fastest INT8 model that passed parity and
    pays for itself, else FP32."""
    if "int8" not in pack.allowed_precisions:
        return "fp32", pack.file(packs.MODEL), "INT8 not allowed by the manifest"
    results = [r for r in record.get("parity", {}).get("results", [])
               if r["backend"] == "onnxruntime" and r["precision"] == "int8"]
    if not results:
        return "fp32", pack.file(packs.MODEL), "no INT8 model built for this pack (run build_engines.py)"
    passed = [r for r in results if r["enabled"]]
    if not passed:
        return "fp32", pack.file(packs.MODEL), f"INT8 failed parity: {results[0]['why']}"
    best = max(passed, key=lambda r: r.get("speedup") or 0.0)
    speedup = best.get("speedup") or 0.0
    if speedup < min_int8_speedup:
        return "fp32", pack.file(packs.MODEL), f"INT8 measured only {speedup:.2f}x FP32 on this CPU"
    name = best.get("model_file") or packs.INT8_MODEL
    return "int8", pack.file(name), f"INT8 ({name}) passed parity and ran {speedup:.2f}x FP32"


def choose(pack: packs.ModelPack, record: dict, tensorrt: Availability,
           engine_for: Callable[[str], tuple[Path, dict] | None], min_int8_speedup: float = 1.2,
           backend: str = "auto") -> Choice:
    """The backend and precision for ``pack``.

    ``engine_for(precision)`` returns the cached engine for this GPU and TensorRT version with its
    parity result, or None when none was built.
    """
    why_not_trt = "ONNX Runtime chosen by the inference_backend setting"
    if backend == "auto" and not tensorrt:
        why_not_trt = f"TensorRT unavailable: {tensorrt.why}"
    elif backend == "auto":
        reasons = []
        for precision in TRT_PREFERENCE:
            if precision not in pack.allowed_precisions:
                continue
            found = engine_for(precision)
            if found is None:
                reasons.append(f"no {precision} engine for this GPU and TensorRT version")
            elif not found[1].get("enabled"):
                reasons.append(f"{precision} engine failed parity: {found[1].get('why')}")
            else:
                return Choice("tensorrt", precision, found[0], "engine built on this device passed parity")
        why_not_trt = "; ".join(reasons) or "no TensorRT precision allowed"
    precision, path, why = choose_cpu(pack, record, min_int8_speedup)
    return Choice("onnxruntime", precision, path, f"{why_not_trt}; {why}")


def engine_key(pack: packs.ModelPack, record: dict, precision: str, gpu: tuple[str, tuple[int, int]],
               version: str, builder: BuilderSettings) -> EngineKey:
    source = record.get("files", {}).get(packs.INT8_MODEL) if precision == "int8" else pack.model_sha256
    return EngineKey(pack.id, source or pack.model_sha256, version, gpu[0], gpu[1], precision, builder)


def _engine_lookup(pack: packs.ModelPack, record: dict, cache_dir: Path) -> Callable[[str], tuple[Path, dict] | None]:
    gpu, version = trt_backend.gpu_identity(), trt_backend.tensorrt_version()

    def lookup(precision: str) -> tuple[Path, dict] | None:
        path = engine_key(pack, record, precision, gpu, version, BuilderSettings()).path(cache_dir)
        parity = path.with_suffix(".parity.json")
        if not path.exists() or not parity.exists():
            return None
        return path, json.loads(parity.read_text())

    return lookup


def available_packs(settings: Settings) -> tuple[list[packs.ModelPack], list[packs.PackRefused]]:
    """Every version of every pack: shipped with the installed version (``engines_dir``) and imported by the
    site (``<home>/packs/<id>/<version>/``); the refused ones apart."""
    shipped, refused = packs.load_packs(settings.engines_path)
    imported, refused_imported = packs.load_imported(DataDirectory(settings.home_path).packs)
    return shipped + imported, refused + refused_imported


class Registry:
    """Loaded packs and their open sessions, for one process.

    ``packs`` holds the version of each pack in use (the newest); ``all_packs`` every version found.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.all_packs, self.refused = available_packs(settings)
        self.packs = packs.newest(self.all_packs)
        for refusal in self.refused:
            log.error("model pack refused: %s", refusal)
        self._sessions: dict[str, tuple[Session, Choice]] = {}

    def pack(self, model_id: str) -> packs.ModelPack | None:
        return next((p for p in self.packs if p.id == model_id), None)

    def session(self, pack: packs.ModelPack) -> tuple[Session, Choice]:
        if pack.id not in self._sessions:
            self._sessions[pack.id] = self._open(pack)
        return self._sessions[pack.id]

    def _open(self, pack: packs.ModelPack) -> tuple[Session, Choice]:
        record = pack.build_record()
        tensorrt = trt_backend.is_available() if self.settings.inference_backend == "auto" else Availability(False)
        cache = DataDirectory(self.settings.home_path).engines_cache
        lookup = _engine_lookup(pack, record, cache) if tensorrt else (lambda p: None)
        choice = choose(pack, record, tensorrt, lookup, self.settings.min_cpu_int8_speedup,
                        self.settings.inference_backend)
        if choice.backend == "tensorrt":
            try:
                session: Session = trt_backend.TensorRTSession(choice.path, choice.precision)
                log.info("model %s", choice.log_line(pack.id))
                return session, choice
            except Exception as exc:  # engine unusable here: fall back, saying why
                precision, path, why = choose_cpu(pack, record, self.settings.min_cpu_int8_speedup)
                choice = Choice("onnxruntime", precision, path, f"TensorRT engine failed to load: {exc}; {why}")
        log.info("model %s", choice.log_line(pack.id))
        return ort_backend.OnnxRuntimeSession(choice.path, choice.precision, self.settings.inference_threads), choice


def _no_engine(precision: str) -> None:
    return None


def inventory(settings: Settings) -> tuple[list[dict[str, Any]], list[packs.PackRefused], Availability]:
    """Every model pack with the backend and precision it would run on here, and its parity results
    (for the admin page and the monthly export); also the refused packs and TensorRT's availability."""
    loaded, refused = available_packs(settings)
    in_use = {(p.id, p.version, p.origin) for p in packs.newest(loaded)}
    availability = trt_backend.is_available()
    rows = []
    for pack in loaded:
        record = pack.build_record()
        # without TensorRT there is no GPU identity and nothing cached to look up
        cache = DataDirectory(settings.home_path).engines_cache
        lookup = _engine_lookup(pack, record, cache) if availability else _no_engine
        choice = choose(pack, record, availability, lookup, settings.min_cpu_int8_speedup, settings.inference_backend)
        rows.append({"id": pack.id, "version": pack.version, "kind": pack.kind, "validated": pack.validated,
                     "threshold": pack.threshold,
                     "model_sha256": pack.model_sha256, "precisions": ", ".join(pack.allowed_precisions),
                     "choice": choice, "parity": record.get("parity", {}).get("results", []),
                     "built_at": record.get("built_at"), "origin": pack.origin,
                     "in_use": (pack.id, pack.version, pack.origin) in in_use})
    return rows, refused, availability


# --- one registry per process --------------------------------------------------------------------

_shared: dict[str, Any] = {"key": None, "registry": None}
_shared_guard = threading.Lock()


def _switches(settings: Settings) -> tuple[Any, ...]:
    """The settings a registry's choices depend on."""
    cache = DataDirectory(settings.home_path).engines_cache
    return (str(settings.engines_path), str(cache), settings.inference_backend,
            settings.min_cpu_int8_speedup, settings.inference_threads)


def packs_fingerprint(engines_dir: Path, pattern: str = "*/*") -> tuple[tuple[str, int, int], ...]:
    """Name, size and modification time of every file of every pack: changes when a pack is added,
    replaced, rebuilt (its build record) or removed. ``pattern``: ``*/*/*`` for the imported packs."""
    if not engines_dir.is_dir():
        return ()
    found = []
    for path in sorted(engines_dir.glob(pattern)):
        if path.is_file():
            st = path.stat()
            found.append((str(path.relative_to(engines_dir)), st.st_size, st.st_mtime_ns))
    return tuple(found)


def shared_registry(settings: Settings) -> Registry:
    """This process's registry: loaded once, reloaded only when the packs or the settings they depend on change.

    Model sessions (and their memory) are kept across jobs; two registries never sit in one process.
    """
    key = (_switches(settings), packs_fingerprint(settings.engines_path),
           packs_fingerprint(DataDirectory(settings.home_path).packs, "*/*/*"))
    with _shared_guard:
        if _shared["key"] != key:
            if _shared["registry"] is not None:
                log.info("model packs or their settings changed: reloading the registry")
            _shared["registry"] = Registry(settings)
            _shared["key"] = key
        registry: Registry = _shared["registry"]
        return registry


# --- what `appliance packs list` and the doctor show ---------------------------------------------

def signer_of(pack: packs.ModelPack, keys: list[trust.TrustedKey]) -> tuple[str, str | None]:
    """(who signed ``pack``, in words; the reason code when its signature does not hold, else None)."""
    if not trust.is_signed(pack.path):
        if pack.origin == packs.SHIPPED:
            return "unsigned (shipped with this version)", None
        return "unsigned", signing.UNSIGNED
    try:
        verified = trust.verify_pack(pack.path, keys)
    except signing.SignatureProblem as exc:
        return f"signature does not hold: {exc.reason}", exc.reason_code
    return f"{verified.signer} ({verified.fingerprint})", None


def pack_list(settings: Settings, db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every version of every pack with its signer, validation, whether it runs here and where it came from."""
    found, _ = available_packs(settings)
    keys = trust.trusted_keys(settings.home_path, settings.engines_path)
    in_use = {(p.id, p.version, p.origin) for p in packs.newest(found)}
    rows = []
    for pack in sorted(found, key=lambda p: (p.id, packs.version_key(p.version))):
        signer, problem = signer_of(pack, keys)
        used = (pack.id, pack.version, pack.origin) in in_use
        why_not = policy.why_off(pack, settings, db)
        enabled = ("not in use: a newer version is installed" if not used
                   else "on" if why_not is None else "off: not switched on at this site")
        rows.append({"id": pack.id, "version": pack.version, "kind": pack.kind, "signer": signer,
                     "signature_problem": problem, "validated": pack.validated, "enabled": enabled,
                     "in_use": used, "origin": pack.origin, "path": str(pack.path)})
    return rows

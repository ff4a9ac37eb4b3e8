"""Model packs: ``engines/<model-id>/`` with ``model.onnx`` and ``manifest.toml``.

The manifest names the model, its task, the body region it reads (``body_region``, one of
:data:`BODY_REGIONS`; the analysis skips it on a series that does not cover that region), the series it
needs, its input and outputs, its decision threshold and where that came from, whether it is
validated, where its training data came from and under which licence, the
precisions it may run in with their parity tolerances, the calibration set
of its INT8 model (``[calibration] file``, the shipped inputs, with their
``licence``; else ``inputs``, a name in ``appliance.calibration.CALIBRATION_SETS``),
and the SHA-256 of every file (a shipped calibration file included).
Loading verifies all of it: a tampered or inconsistent pack is refused with a
reason.

Files made by ``build_engines.py`` (the QDQ INT8 model, the parity report)
are recorded in ``build.json`` with the SHA-256 of the ``model.onnx`` they
were made from, so a stale artefact is never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from appliance import tomlfile
from appliance.errors import ApplianceError

MANIFEST = "manifest.toml"
BUILD_RECORD = "build.json"
MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"  # symmetric QDQ: TensorRT and CPU
INT8_CPU_MODEL = "model.int8-u8s8.onnx"  # UINT8 activations: faster on many CPUs
PRECISIONS = ("fp32", "fp16", "int8")
KINDS = ("measurement", "classifier")
BODY_REGIONS = ("head", "neck", "chest", "abdomen", "pelvis")  # head to feet; a pack's body_region is one
REQUIRED_KEYS = ("id", "version", "task", "body_region", "validated", "validation_note", "series", "input",
                 "outputs", "decision", "training", "precisions", "files")


class PackRefused(ApplianceError):
    """A model pack failed verification; ``reason_code`` says how."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code = reason_code
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a faster precision may stray from the FP32 reference on the evaluation set."""

    max_abs_diff: float
    min_decision_agreement: float
    max_metric_drop: float  # AUC for classifiers, Dice for segmentation


@dataclasses.dataclass(frozen=True)
class ModelPack:
    path: Path
    manifest: dict[str, Any]
    model_sha256: str

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def validated(self) -> bool:
        return bool(self.manifest["validated"])

    @property
    def kind(self) -> str:
        """``measurement`` (segmentation, a quantity) or ``classifier`` (a yes/no call whose evaluation may
        not hold across sources); manifests without ``kind`` take it from their task."""
        return str(self.manifest.get("kind") or ("classifier" if self.manifest["task"] == "classification"
                                                   else "measurement"))

    @property
    def body_region(self) -> str:
        """The region the model reads (one of :data:`BODY_REGIONS`); a series must cover it for the model to run."""
        return str(self.manifest["body_region"])

    @property
    def required_coverage(self) -> str:
        """The coverage the model needs, in words (``[series] required_coverage``)."""
        return str(self.manifest["series"].get("required_coverage", self.body_region))

    @property
    def notice(self) -> str:
        return self.manifest["validation_note"]

    @property
    def threshold(self) -> float:
        return float(self.manifest["decision"]["threshold"])

    @property
    def input_name(self) -> str:
        return self.manifest["input"]["name"]

    @property
    def input_shape(self) -> list[int]:
        """Shape of one item, without the batch axis."""
        return list(self.manifest["input"]["shape"])

    @property
    def allowed_precisions(self) -> tuple[str, ...]:
        return tuple(self.manifest["precisions"]["allowed"])

    def tolerance(self) -> Tolerance:
        t = self.manifest["precisions"]["tolerance"]
        return Tolerance(float(t["max_abs_diff"]), float(t["min_decision_agreement"]), float(t["max_metric_drop"]))

    def file(self, name: str) -> Path:
        return self.path / name

    def build_record(self) -> dict[str, Any]:
        """What ``build_engines.py`` made for this exact model, or {} when nothing or stale."""
        path = self.path / BUILD_RECORD
        if not path.exists():
            return {}
        record = json.loads(path.read_text())
        if record.get("model_sha256") != self.model_sha256:
            return {}
        for name, digest in record.get("files", {}).items():
            if not (self.path / name).exists() or sha256_file(self.path / name) != digest:
                return {}
        return record


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_consistent(manifest: dict[str, Any], folder: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the manifest lacks {', '.join(missing)}.")
    if manifest["id"] != folder.name:
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the manifest names model {manifest['id']!r}.")
    unknown = set(manifest["precisions"]["allowed"]) - set(PRECISIONS)
    if unknown or "fp32" not in manifest["precisions"]["allowed"]:
        raise PackRefused("PACK_INCONSISTENT",
                          f"{folder.name}: precisions must include fp32 and be among {PRECISIONS}.")
    if not manifest["validated"] and not str(manifest["validation_note"]).strip():
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: an unvalidated model must say why in validation_note.")
    if MODEL not in manifest["files"]:
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the manifest lists no checksum for {MODEL}.")
    if manifest["body_region"] not in BODY_REGIONS:
        raise PackRefused("PACK_INCONSISTENT",
                          f"{folder.name}: body_region must be one of {', '.join(BODY_REGIONS)}.")
    if manifest.get("kind", "measurement") not in KINDS:
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: kind must be one of {', '.join(KINDS)}.")
    threshold = manifest["decision"].get("threshold")
    if not isinstance(threshold, (int, float)) or not manifest["decision"].get("operating_point"):
        raise PackRefused("PACK_INCONSISTENT",
                          f"{folder.name}: the decision threshold or its operating point is missing.")


def _check_calibration_file(manifest: dict[str, Any], folder: Path) -> None:
    calibration = manifest.get("calibration", {})
    name = calibration.get("file")
    if name is None:
        return
    if not isinstance(name, str) or name not in manifest["files"]:
        raise PackRefused("PACK_INCONSISTENT",
                          f"{folder.name}: the calibration file {name!r} has no checksum in the manifest's [files].")
    if not str(calibration.get("licence", "")).strip():
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the calibration file {name} states no licence.")


def load_pack(folder: Path) -> ModelPack:
    """Read and verify the pack in ``folder``; raise :class:`PackRefused` with a reason otherwise."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise PackRefused("PACK_MISSING_FILE", f"{folder.name}: no {MANIFEST}.")
    try:
        manifest = tomlfile.loads(manifest_path.read_text())
    except tomlfile.TOMLDecodeError as exc:
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the manifest is not valid TOML ({exc}).") from exc
    _check_consistent(manifest, folder)
    _check_calibration_file(manifest, folder)
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise PackRefused("PACK_MISSING_FILE", f"{folder.name}: {name} is missing.")
        if sha256_file(path) != expected:
            raise PackRefused("PACK_TAMPERED", f"{folder.name}: {name} does not match its SHA-256 in the manifest; "
                                               "the file was changed or damaged. Reinstall the model pack.")
    return ModelPack(path=folder, manifest=manifest, model_sha256=manifest["files"][MODEL])


def load_packs(engines_dir: Path) -> tuple[list[ModelPack], list[PackRefused]]:
    """Every pack under ``engines_dir``; refused ones are returned apart, never loaded."""
    packs, refused = [], []
    for folder in sorted(p for p in engines_dir.iterdir() if p.is_dir()) if engines_dir.is_dir() else []:
        if not (folder / MANIFEST).exists():
            continue
        try:
            packs.append(load_pack(folder))
        except PackRefused as exc:
            refused.append(exc)
    return packs, refused


def write_pack(folder: Path, manifest: dict[str, Any], files: list[str]) -> ModelPack:
    """Record the SHA-256 of ``files`` in ``manifest``, write it, and load the pack back (verifying it)."""
    manifest = dict(manifest, files={name: sha256_file(folder / name) for name in files})
    (folder / MANIFEST).write_text(tomlfile.dumps(manifest))
    return load_pack(folder)

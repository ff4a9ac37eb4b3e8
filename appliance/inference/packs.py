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
were made from, so a stale artefact is never used. They are made on the device
(:data:`DEVICE_MADE`), so a pack's signature leaves them out.

Packs come from two places: the ``engines/`` folder shipped with the installed
version (``engines/<id>/``) and the packs the site imported
(``<home>/packs/<id>/<version>/``, :mod:`appliance.inference.pack_import`).
Several versions of one pack may sit side by side; the newest is used
(:func:`newest`), the older ones stay for a rollback.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from appliance import tomlfile
from appliance.errors import Refused

MANIFEST = "manifest.toml"
BUILD_RECORD = "build.json"
MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"  # symmetric QDQ: TensorRT and CPU
INT8_CPU_MODEL = "model.int8-u8s8.onnx"  # UINT8 activations: faster on many CPUs
PRECISIONS = ("fp32", "fp16", "int8")
KINDS = ("measurement", "classifier")
BODY_REGIONS = ("head", "neck", "chest", "abdomen", "pelvis")  # head to feet; a pack's body_region is one
# written into a pack by build_engines.py on the device: never part of a pack's signature
DEVICE_MADE = (BUILD_RECORD, INT8_MODEL, INT8_CPU_MODEL, "parity.json", "parity.md")
SHIPPED, IMPORTED = "shipped", "imported"  # where a pack came from (ModelPack.origin)
PACK_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}\Z")  # used as a folder name: no dots, no slashes
PACK_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,31}\Z")
REQUIRED_KEYS = ("id", "version", "task", "body_region", "validated", "validation_note", "series", "input",
                 "outputs", "decision", "training", "precisions", "files")


class PackRefused(Refused):
    """A model pack failed verification; ``reason_code`` says how."""


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
    origin: str = SHIPPED  # SHIPPED with the installed version, or IMPORTED by the site

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


def _check_consistent(manifest: dict[str, Any], folder: Path, expected_id: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the manifest lacks {', '.join(missing)}.")
    if manifest["id"] != expected_id:
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


def _check_file_names(manifest: dict[str, Any], folder: Path) -> None:
    """Every file the manifest lists lies inside the pack: a plain relative path, no ``..``."""
    for name, digest in manifest["files"].items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or not isinstance(digest, str):
            raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the manifest lists {name!r}, which is not a "
                                                   "file inside the pack.")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the pack in ``folder``, parsed but not checked."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise PackRefused("PACK_MISSING_FILE", f"{folder.name}: no {MANIFEST}.")
    try:
        return tomlfile.loads(manifest_path.read_text())
    except (tomlfile.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the manifest is not valid TOML ({exc}).") from exc


def load_pack(folder: Path, expected_id: str | None = None, origin: str = SHIPPED) -> ModelPack:
    """Read and verify the pack in ``folder``; raise :class:`PackRefused` with a reason otherwise.

    The manifest's id must be ``expected_id`` (default: the folder's name, as in ``engines/<id>/``).
    """
    manifest = read_manifest(folder)
    try:
        _check_consistent(manifest, folder, expected_id or folder.name)
        _check_calibration_file(manifest, folder)
        _check_file_names(manifest, folder)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a field of the wrong shape
        raise PackRefused("PACK_INCONSISTENT", f"{folder.name}: the manifest is malformed ({exc!r}).") from exc
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise PackRefused("PACK_MISSING_FILE", f"{folder.name}: {name} is missing.")
        if sha256_file(path) != expected:
            raise PackRefused("PACK_TAMPERED", f"{folder.name}: {name} does not match its SHA-256 in the manifest; "
                                               "the file was changed or damaged. Reinstall the model pack.")
    return ModelPack(path=folder, manifest=manifest, model_sha256=manifest["files"][MODEL], origin=origin)


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


def load_imported(packs_dir: Path) -> tuple[list[ModelPack], list[PackRefused]]:
    """Every pack the site imported, ``<packs_dir>/<id>/<version>/``; refused ones are returned apart."""
    packs, refused = [], []
    for id_dir in sorted(p for p in packs_dir.iterdir() if p.is_dir()) if packs_dir.is_dir() else []:
        if not PACK_ID.match(id_dir.name):
            continue  # the import's staging folder, or something that is not a pack
        for folder in sorted(p for p in id_dir.iterdir() if p.is_dir()):
            try:
                pack = load_pack(folder, expected_id=id_dir.name, origin=IMPORTED)
                if pack.version != folder.name:
                    raise PackRefused("PACK_INCONSISTENT", f"{id_dir.name}/{folder.name}: the manifest names "
                                                           f"version {pack.version!r}.")
                packs.append(pack)
            except PackRefused as exc:  # its reason names the version folder: say which pack too
                refused.append(PackRefused(exc.reason_code, f"{id_dir.name} {exc.reason}"))
    return packs, refused


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key of a pack version: its parts split at ``.``, ``-`` and ``+``, numbers compared as numbers
    (``1.10.0`` is newer than ``1.9.2``) and before words."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"[.+-]", version))


def newest(found: Iterable[ModelPack]) -> list[ModelPack]:
    """The newest version of each pack id, in id order; on a tie the shipped pack wins."""
    best: dict[str, ModelPack] = {}
    for pack in found:
        held = best.get(pack.id)
        if held is None or version_key(pack.version) > version_key(held.version):
            best[pack.id] = pack
    return [best[k] for k in sorted(best)]


def write_pack(folder: Path, manifest: dict[str, Any], files: list[str]) -> ModelPack:
    """Record the SHA-256 of ``files`` in ``manifest``, write it, and load the pack back (verifying it)."""
    manifest = dict(manifest, files={name: sha256_file(folder / name) for name in files})
    (folder / MANIFEST).write_text(tomlfile.dumps(manifest))
    return load_pack(folder)

"""Write a phantom as a CT Image Storage series, one slice at a time (bounded memory)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from appliance.store.database import SYNTHETIC_SERIES_DESCRIPTION
from appliance.synth.phantom import REGIONS_MM, Phantom, make_head_phantom, make_phantom

TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
}
FIELD_OF_VIEW_MM = 500.0
HEAD_FIELD_OF_VIEW_MM = 250.0
RESCALE_INTERCEPT = -1024
GROUND_TRUTH_NAME = "ground_truth.json"
SYNTHETIC_NOTICE = SYNTHETIC_SERIES_DESCRIPTION  # every series written here says so: the store marks it synthetic


@dataclasses.dataclass(frozen=True)
class SynthOptions:
    slices: int = 120
    size: int = 512
    region: str = "chest-abdomen"
    lesions: tuple[str, ...] = ()
    tilt_deg: float = 0.0
    missing_slices: int = 0
    transfer_syntax: str = "explicit"
    seed: int = 0


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["ct-appliance-synth", str(seed), *map(str, parts)]))


def _base_dataset(opts: SynthOptions, study_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    today = datetime.date.today().strftime("%Y%m%d")
    ds.PatientName = f"PHANTOM^SYNTHETIC{opts.seed}"
    ds.PatientID = f"SYN-{opts.seed:06d}"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = _uid(opts.seed, "frame", opts.region)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber = "1", f"SYN{opts.seed:06d}"
    ds.StudyDescription = f"Synthetic {opts.region} CT"
    ds.SeriesDescription = SYNTHETIC_NOTICE
    ds.Modality, ds.SeriesNumber, ds.Manufacturer = "CT", 1, "ct-appliance synthetic phantom"
    ds.BodyPartExamined = {"chest": "CHEST", "abdomen": "ABDOMEN", "head": "HEAD"}.get(opts.region, "CHESTABDOMEN")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = opts.size
    spacing = field_of_view_mm(opts) / opts.size
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = RESCALE_INTERCEPT, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.KVP, ds.GantryDetectorTilt = 120, f"{opts.tilt_deg:.2f}"
    return ds


def field_of_view_mm(opts: SynthOptions) -> float:
    """The reconstruction diameter: a head is reconstructed on a smaller field than a trunk."""
    return HEAD_FIELD_OF_VIEW_MM if opts.region == "head" else FIELD_OF_VIEW_MM


def _phantom(opts: SynthOptions) -> Phantom:
    if opts.region == "head":
        if opts.lesions:
            raise ValueError("the head phantom has no lesion kinds")
        return make_head_phantom(opts.seed)
    return make_phantom(opts.seed, opts.lesions)


def _kept_indices(count: int, missing: int) -> list[int]:
    """Slice indices left after dropping ``missing`` single slices spread over the middle half."""
    if missing <= 0:
        return list(range(count))
    drop = set(np.linspace(count * 0.25, count * 0.75, missing).astype(int).tolist())
    return [k for k in range(count) if k not in drop]


def write_series(out: Path, opts: SynthOptions) -> dict:
    """Write the series into ``out`` (created); returns the ground truth that is also written there."""
    out.mkdir(parents=True, exist_ok=True)
    phantom = _phantom(opts)
    z0, z1 = REGIONS_MM[opts.region]
    dz = (z1 - z0) / opts.slices
    fov = field_of_view_mm(opts)
    spacing = fov / opts.size
    tilt = math.radians(opts.tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, math.cos(tilt), -math.sin(tilt)])  # gantry tilt about the patient's x axis
    study_uid = _uid(opts.seed, "study", opts.region, opts.slices, opts.size)
    series_uid = _uid(opts.seed, "series", opts.region, opts.slices, opts.size, opts.tilt_deg, opts.missing_slices,
                      opts.transfer_syntax, opts.lesions)
    base = _base_dataset(opts, study_uid, series_uid)
    base.SliceThickness = f"{dz:.4f}"
    base.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
    syntax = TRANSFER_SYNTAXES[opts.transfer_syntax]
    rng = np.random.default_rng(opts.seed + 1)
    half = fov / 2
    i = np.arange(opts.size)
    x = (-half + i * spacing)[None, :]
    for number, k in enumerate(_kept_indices(opts.slices, opts.missing_slices), start=1):
        origin = np.array([-half, -half, z0 + k * dz])
        y = (origin[1] + i * spacing * col_dir[1])[:, None]
        z = (origin[2] + i * spacing * col_dir[2])[:, None]
        hu = phantom.sample(x, y, z, rng)
        ds = base.copy()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = _uid(opts.seed, series_uid, k)
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.SliceLocation = f"{origin[2]:.4f}"
        stored = np.clip(np.rint(hu) - RESCALE_INTERCEPT, -32768, 32767).astype(np.int16)
        _write(ds, stored, syntax, out / f"CT{number:05d}.dcm")
    truth = {
        "notice": SYNTHETIC_NOTICE, "options": dataclasses.asdict(opts),
        "study_instance_uid": study_uid, "series_instance_uid": series_uid,
        "lesions": [{"kind": e.name.split(": ", 1)[1], "center_mm": list(e.center), "radius_mm": e.radii[0],
                     "hu_delta": e.hu} for e in phantom.lesions],
        "organs": [{"name": e.name, "center_mm": list(e.center), "radii_mm": list(e.radii), "hu": e.hu}
                   for e in phantom.structures if not e.name.startswith(("rib", "intercostal", "bowel"))],
    }
    (out / GROUND_TRUTH_NAME).write_text(json.dumps(truth, indent=2))
    return truth


def _write(ds: Dataset, pixels: np.ndarray, syntax: pydicom.uid.UID, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.PixelData = pixels.tobytes()
    if syntax.is_compressed:
        ds.compress(syntax, pixels)
    else:
        meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)

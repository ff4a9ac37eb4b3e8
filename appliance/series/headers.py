"""Read the geometry of every CT frame of a series from headers alone.

Single-frame CT Image Storage gives one frame per file; Enhanced (and Legacy
Converted Enhanced) CT gives one frame per item of the Per-frame Functional
Groups Sequence. Localizers, secondary captures and dose reports are left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import TypedDict

import numpy as np
import pydicom
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from appliance.dicomfile.uids import sop_uid
from appliance.errors import ReasonCode, SeriesRejected

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
PIXEL_DATA = Tag(0x7FE0, 0x0010)
# the only attributes assembly reads: parsing just these is a third faster than the whole header
HEADER_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "Modality", "ImageType", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "Rows", "Columns", "RescaleSlope", "RescaleIntercept", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "InstanceNumber", "PixelData", "NumberOfFrames", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
)


@dataclasses.dataclass(frozen=True)
class Frame:
    """One CT image plane: where its pixels are and where it lies in patient space (LPS, mm)."""

    path: Path
    frame_index: int | None  # None for single-frame files
    sop_instance_uid: str
    image_position: np.ndarray | None  # (3,) ImagePositionPatient of the first voxel, mm (None: absent or bad)
    image_orientation: np.ndarray | None  # (6,) ImageOrientationPatient: row then column direction cosines
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm: between rows, between columns
    rows: int
    columns: int
    rescale_slope: float
    rescale_intercept: float
    transfer_syntax_uid: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    pixel_data_offset: int | None  # byte offset of native (uncompressed) pixel data in the file
    instance_number: int | None


@dataclasses.dataclass
class SeriesFrames:
    """The CT frames of one series and what was left out, with why."""

    frames: list[Frame]
    excluded: list[tuple[str, str]]  # (SOPInstanceUID, why)
    modalities: set[str]
    other_frames: list[Frame] = dataclasses.field(default_factory=list)  # images of other modalities


class _ImageAttributes(TypedDict):
    """What every frame of one file shares."""

    rows: int
    columns: int
    transfer_syntax_uid: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int


def _floats(value: object, n: int) -> np.ndarray | None:
    if not isinstance(value, Iterable):
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) else None


def _pixel_spacing(value: object) -> tuple[float, float]:
    """PixelSpacing (row, column spacing, mm); 1 mm each when absent."""
    if value is None:
        return (1.0, 1.0)
    spacing = _floats(value, 2)
    if spacing is None:
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                             "Some images have a pixel spacing that is not two numbers, so the volume cannot be built.")
    return (float(spacing[0]), float(spacing[1]))


def _why_excluded(ds: pydicom.Dataset) -> str | None:
    sop_class = sop_uid(ds, "SOPClassUID")
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary capture"
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer"
    if "SCREEN SAVE" in image_type or "DOSE_INFO" in image_type or "DOSE REPORT" in image_type:
        return "dose report"
    if sop_class not in CT_SOP_CLASSES:
        return f"not a CT image ({ds.get('Modality', '?')})"
    return None


def _is_plain_image(ds: pydicom.Dataset) -> bool:
    """A single-frame image of another modality (MR, PT ...) whose geometry can still be checked."""
    return "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds


def _pixel_offset(ds: pydicom.Dataset, transfer_syntax: pydicom.uid.UID) -> int | None:
    if transfer_syntax.is_encapsulated or transfer_syntax.is_deflated:
        return None
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if isinstance(element, pydicom.dataelem.RawDataElement):
        return element.value_tell
    return None


def _first(seq_parent: pydicom.Dataset | None, sequence: str) -> pydicom.Dataset | None:
    if seq_parent is None or sequence not in seq_parent:
        return None
    items = seq_parent[sequence].value
    return items[0] if items else None


def _functional_group(per_frame: pydicom.Dataset, shared: pydicom.Dataset | None,
                      name: str) -> pydicom.Dataset | None:
    """Functional group ``name`` of one frame of an enhanced image: its own, else the shared one."""
    return _first(per_frame, name) or _first(shared, name)


def _enhanced_frames(ds: pydicom.Dataset, path: Path, common: _ImageAttributes) -> list[Frame]:
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    frames = []
    for index, per_frame in enumerate(ds.get("PerFrameFunctionalGroupsSequence", [])):
        position = _functional_group(per_frame, shared, "PlanePositionSequence")
        orientation = _functional_group(per_frame, shared, "PlaneOrientationSequence")
        measures = _functional_group(per_frame, shared, "PixelMeasuresSequence")
        rescale = _functional_group(per_frame, shared, "PixelValueTransformationSequence")
        frames.append(Frame(
            path=path, frame_index=index, sop_instance_uid=sop_uid(ds, "SOPInstanceUID"),
            image_position=_floats(position.get("ImagePositionPatient") if position else None, 3),
            image_orientation=_floats(orientation.get("ImageOrientationPatient") if orientation else None, 6),
            pixel_spacing=_pixel_spacing(measures.get("PixelSpacing") if measures else None),
            rescale_slope=float(rescale.get("RescaleSlope", 1) if rescale else 1),
            rescale_intercept=float(rescale.get("RescaleIntercept", 0) if rescale else 0),
            pixel_data_offset=None, instance_number=index + 1, **common,
        ))
    return frames


def read_frames(paths: Iterable[Path]) -> SeriesFrames:
    """Read the headers of ``paths`` (one series) and return its CT frames."""
    result = SeriesFrames(frames=[], excluded=[], modalities=set())
    for path in paths:
        ds = pydicom.dcmread(path, defer_size=4096, force=True, specific_tags=list(HEADER_KEYWORDS))
        result.modalities.add(str(ds.get("Modality", "")))
        why = _why_excluded(ds)
        if why:
            result.excluded.append((sop_uid(ds, "SOPInstanceUID") or path.name, why))
            if not why.startswith("not a CT image") or not _is_plain_image(ds):
                continue
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = pydicom.uid.UID(str((meta or {}).get("TransferSyntaxUID", ImplicitVRLittleEndian)))
        common = _ImageAttributes(
            rows=int(ds.Rows), columns=int(ds.Columns), transfer_syntax_uid=str(transfer_syntax),
            bits_allocated=int(ds.get("BitsAllocated", 16)), bits_stored=int(ds.get("BitsStored", 16)),
            pixel_representation=int(ds.get("PixelRepresentation", 0)),
        )
        if "PerFrameFunctionalGroupsSequence" in ds:
            result.frames.extend(_enhanced_frames(ds, path, common))
            continue
        number = ds.get("InstanceNumber")
        (result.other_frames if why else result.frames).append(Frame(
            path=path, frame_index=None, sop_instance_uid=sop_uid(ds, "SOPInstanceUID"),
            image_position=_floats(ds.get("ImagePositionPatient"), 3),
            image_orientation=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=_pixel_spacing(ds.get("PixelSpacing")),
            rescale_slope=float(ds.get("RescaleSlope", 1) or 1),
            rescale_intercept=float(ds.get("RescaleIntercept", 0) or 0),
            pixel_data_offset=_pixel_offset(ds, transfer_syntax),
            instance_number=int(number) if number not in (None, "") else None, **common,
        ))
    return result

"""Read the geometry of every CT frame of a series from headers alone.

Single-frame CT Image Storage gives one frame per file; Enhanced (and Legacy
Converted Enhanced) CT gives one frame per item of the Per-frame Functional
Groups Sequence. Localizers, secondary captures and dose reports are left out.

Numbers (DS, IS) are read from the bytes the file holds, as other readers read them
(:mod:`appliance.series.values`); each one taken past a defect becomes a note on the series
(MALFORMED_NUMBER, corrected). An image whose size, bits, rescale, spacing or orientation cannot
be used rejects its series (CORRUPT_PIXEL_DATA), naming the instance.
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

from appliance.dicomfile.uids import is_valid_uid, sop_uid
from appliance.errors import ReasonCode, SeriesRejected
from appliance.series.geometry import Problem
from appliance.series.values import Number, parse_number, shown, value_texts

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
    "SharedFunctionalGroupsSequence", "SliceLocation",
)
UNIT_VECTOR_TOLERANCE = 0.05  # direction cosines: length 1 and at right angles, within this


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
    slice_location: float | None = None  # SliceLocation (mm): stands in for a missing position along the normal


@dataclasses.dataclass
class SeriesFrames:
    """The CT frames of one series and what was left out, with why."""

    frames: list[Frame]
    excluded: list[tuple[str, str]]  # (SOPInstanceUID, why)
    modalities: set[str]
    other_frames: list[Frame] = dataclasses.field(default_factory=list)  # images of other modalities
    notes: list[Problem] = dataclasses.field(default_factory=list)  # values read past a defect (corrected)


class _ImageAttributes(TypedDict):
    """What every frame of one file shares."""

    rows: int
    columns: int
    transfer_syntax_uid: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int


@dataclasses.dataclass(frozen=True)
class _Malformed:
    """A number read past a defect: which attribute, of which instance, what the file wrote."""

    keyword: str
    instance: str
    number: Number | None  # None: not a number at all, and the attribute was left out


@dataclasses.dataclass
class _Numbers:
    """Reads the DS and IS values of one file, notes each defect it reads past, and refuses, naming the
    instance, a value an image cannot do without."""

    instance: str
    malformed: list[_Malformed]

    def refuse(self, keyword: str, texts: list[str], what: str) -> SeriesRejected:
        """The rejection of a series for this file's value ``texts`` of ``keyword``, which is not ``what``."""
        written = shown("\\".join(texts).strip(" "))
        return SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                              f"Instance {self.instance}: {keyword} {written} is not {what}, "
                              "so the volume cannot be built.")

    def floats(self, ds: pydicom.Dataset | None, keyword: str, n: int) -> np.ndarray | None:
        """``n`` finite numbers; None when absent; refuses anything else."""
        texts = value_texts(ds, keyword)
        if texts is None:
            return None
        numbers = [parse_number(t) for t in texts]
        if len(numbers) != n or any(x is None for x in numbers):
            raise self.refuse(keyword, texts, f"{n} numbers" if n > 1 else "a number")
        self.malformed.extend(_Malformed(keyword, self.instance, x) for x in numbers if x and x.trailing)
        return np.array([x.value for x in numbers if x], dtype=np.float64)

    def number(self, ds: pydicom.Dataset | None, keyword: str, default: float) -> float:
        """One finite number, ``default`` when absent; refuses anything else."""
        value = self.floats(ds, keyword, 1)
        return default if value is None else float(value[0])

    def optional(self, ds: pydicom.Dataset | None, keyword: str) -> float | None:
        """One number that the image can do without: None when absent or not a number (noted; tolerance
        ``optional_number_left_out``)."""
        texts = value_texts(ds, keyword)
        number = parse_number(texts[0]) if texts and len(texts) == 1 else None
        if texts is not None and (number is None or number.trailing):
            self.malformed.append(_Malformed(keyword, self.instance, number))
        return None if number is None else number.value


def _malformed_notes(malformed: list[_Malformed]) -> list[Problem]:
    """One note per attribute read past a defect, with how many images and one example."""
    notes = []
    for keyword in dict.fromkeys(m.keyword for m in malformed):
        these = [m for m in malformed if m.keyword == keyword]
        read = [(m.instance, m.number) for m in these if m.number is not None]
        if read:
            instance, number = read[0]
            notes.append(Problem(ReasonCode.MALFORMED_NUMBER,
                                 f"{keyword} of {len(read)} image(s) has characters after its number (such as "
                                 f"{shown(number.text.strip(' '))} in instance {instance}); the number "
                                 f"({number.value:g}) was read, as other DICOM readers do.", False))
        if len(read) < len(these):
            notes.append(Problem(ReasonCode.MALFORMED_NUMBER,
                                 f"{keyword} of {len(these) - len(read)} image(s) is not a number (such as in "
                                 f"instance {next(m.instance for m in these if m.number is None)}); it was "
                                 "left out.", False))
    return notes


def _pixel_spacing(numbers: _Numbers, ds: pydicom.Dataset | None) -> tuple[float, float]:
    """PixelSpacing (row, column spacing, mm); 1 mm each when absent."""
    spacing = numbers.floats(ds, "PixelSpacing", 2)
    if spacing is None:
        return (1.0, 1.0)
    if not (spacing > 0).all():
        raise numbers.refuse("PixelSpacing", value_texts(ds, "PixelSpacing") or [], "two positive numbers")
    return (float(spacing[0]), float(spacing[1]))


def _orientation(numbers: _Numbers, ds: pydicom.Dataset | None) -> np.ndarray | None:
    """ImageOrientationPatient: two direction cosines of length 1 at right angles; None when absent."""
    cosines = numbers.floats(ds, "ImageOrientationPatient", 6)
    if cosines is None:
        return None
    row, col = cosines[:3], cosines[3:]
    if (abs(np.linalg.norm(row) - 1) > UNIT_VECTOR_TOLERANCE or abs(np.linalg.norm(col) - 1) > UNIT_VECTOR_TOLERANCE
            or abs(float(row @ col)) > UNIT_VECTOR_TOLERANCE):
        raise numbers.refuse("ImageOrientationPatient", value_texts(ds, "ImageOrientationPatient") or [],
                             "two unit directions at right angles")
    return cosines


def _rescale(numbers: _Numbers, ds: pydicom.Dataset | None) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (1 and 0 when absent); a slope of 0 would erase the image."""
    slope = numbers.number(ds, "RescaleSlope", 1.0)
    if slope == 0:
        raise numbers.refuse("RescaleSlope", ["0"], "a usable slope (it would make every pixel the same)")
    return slope, numbers.number(ds, "RescaleIntercept", 0.0)


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


def _enhanced_frames(ds: pydicom.Dataset, path: Path, common: _ImageAttributes, numbers: _Numbers) -> list[Frame]:
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    frames = []
    for index, per_frame in enumerate(ds.get("PerFrameFunctionalGroupsSequence", [])):
        position = _functional_group(per_frame, shared, "PlanePositionSequence")
        orientation = _functional_group(per_frame, shared, "PlaneOrientationSequence")
        measures = _functional_group(per_frame, shared, "PixelMeasuresSequence")
        slope, intercept = _rescale(numbers, _functional_group(per_frame, shared,
                                                               "PixelValueTransformationSequence"))
        frames.append(Frame(
            path=path, frame_index=index, sop_instance_uid=numbers.instance,
            image_position=numbers.floats(position, "ImagePositionPatient", 3),
            image_orientation=_orientation(numbers, orientation),
            pixel_spacing=_pixel_spacing(numbers, measures), rescale_slope=slope, rescale_intercept=intercept,
            pixel_data_offset=None, instance_number=index + 1, **common,
        ))
    return frames


def _instance_name(ds: pydicom.Dataset, path: Path) -> str:
    """How a file is named to the technician: its SOP Instance UID, or (emptied or not a UID, as anonymisers
    leave them) the file's name, which in the instance store is the UID it was filed under."""
    uid = sop_uid(ds, "SOPInstanceUID")
    return uid if is_valid_uid(uid) else path.stem


def _image_attributes(ds: pydicom.Dataset, instance: str) -> _ImageAttributes:
    """What every frame of the file shares; refuses sizes and bit depths no image can have."""
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = pydicom.uid.UID(str((meta or {}).get("TransferSyntaxUID", ImplicitVRLittleEndian)))
    common = _ImageAttributes(
        rows=int(ds.get("Rows") or 0), columns=int(ds.get("Columns") or 0), transfer_syntax_uid=str(transfer_syntax),
        bits_allocated=int(ds.get("BitsAllocated", 16)), bits_stored=int(ds.get("BitsStored", 16)),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
    )
    why = None
    if common["rows"] < 1 or common["columns"] < 1:
        why = f"declares {common['rows']} x {common['columns']} pixels"
    elif not 1 <= common["bits_stored"] <= common["bits_allocated"]:
        why = f"stores {common['bits_stored']} bits in {common['bits_allocated']}-bit pixels"
    elif common["pixel_representation"] not in (0, 1):
        why = f"has a PixelRepresentation of {common['pixel_representation']} (0 or 1 are the only ones)"
    if why:
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                             f"Instance {instance} {why}, so its pixels cannot be read.")
    return common


def _read_file(path: Path, result: SeriesFrames, malformed: list[_Malformed]) -> None:
    """Add the CT frames of the file at ``path`` to ``result`` (or why it was left out)."""
    ds = pydicom.dcmread(path, defer_size=4096, force=True, specific_tags=list(HEADER_KEYWORDS))
    result.modalities.add(str(ds.get("Modality", "")))
    instance = _instance_name(ds, path)
    why = _why_excluded(ds)
    if why:
        result.excluded.append((instance, why))
        if not why.startswith("not a CT image") or not _is_plain_image(ds):
            return
    numbers = _Numbers(instance, malformed)
    common = _image_attributes(ds, instance)
    if "PerFrameFunctionalGroupsSequence" in ds:
        result.frames.extend(_enhanced_frames(ds, path, common, numbers))
        return
    number = numbers.optional(ds, "InstanceNumber")
    slope, intercept = _rescale(numbers, ds)
    (result.other_frames if why else result.frames).append(Frame(
        path=path, frame_index=None, sop_instance_uid=instance,
        image_position=numbers.floats(ds, "ImagePositionPatient", 3),
        image_orientation=_orientation(numbers, ds), pixel_spacing=_pixel_spacing(numbers, ds),
        rescale_slope=slope, rescale_intercept=intercept,
        pixel_data_offset=_pixel_offset(ds, pydicom.uid.UID(common["transfer_syntax_uid"])),
        instance_number=None if number is None else int(number),
        slice_location=numbers.optional(ds, "SliceLocation"), **common,
    ))


def read_frames(paths: Iterable[Path]) -> SeriesFrames:
    """Read the headers of ``paths`` (one series) and return its CT frames, with a note for each kind of
    value read past a defect."""
    result = SeriesFrames(frames=[], excluded=[], modalities=set())
    malformed: list[_Malformed] = []
    for path in paths:
        _read_file(path, result, malformed)
    result.notes = _malformed_notes(malformed)
    return result

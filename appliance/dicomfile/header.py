"""Check one DICOM file's header before it is accepted, without decoding pixels.

:func:`read_header` returns an :class:`InstanceHeader` or raises :class:`InstanceRejected`, and
nothing else, whatever the file holds. Each reason is true of the file:

- ``EMPTY_FILE``; ``NOT_DICOM`` when neither a DICOM file meta header nor a data set is found;
- ``TRUNCATED`` only when the file ends inside an element, or before the value, items or
  delimiter that its (otherwise sound) elements declare;
- ``INVALID_HEADER`` for elements that are malformed without running off the end: lengths that
  lead to garbage, stray delimiters, image data whose form contradicts the transfer syntax,
  values that do not parse, a damaged Deflate stream;
- ``UNSUPPORTED_TRANSFER_SYNTAX`` for an encoding this appliance does not know;
- ``NO_PIXEL_DATA`` for an image object that holds its header only;
- ``CORRUPT_PIXEL_DATA`` for uncompressed image data shorter than Rows x Columns declare;
- ``IMAGE_TOO_LARGE``, ``FILE_TOO_LARGE`` (a Deflated data set that unpacks beyond the limits),
  ``MISSING_UID``, ``INVALID_UID``.

The element structure is walked first (:mod:`appliance.dicomfile.structure`): that walk tells a file
cut short from a malformed one, and bounds the work a hostile file can cause. A Deflated file is inflated
once under a cap (:mod:`appliance.dicomfile.deflate`) and kept inflated.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pydicom
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian

from appliance.dicomfile.deflate import MAX_INFLATE_RATIO, inflate
from appliance.dicomfile.structure import (
    PIXEL_DATA,
    PIXEL_DATA_TAGS,
    UNDEFINED_LENGTH,
    FileMeta,
    PixelOverrun,
    invalid,
    not_dicom,
    read_meta,
    walk,
)
from appliance.dicomfile.uids import resolve_uids, sop_uid
from appliance.errors import InstanceRejected, ReasonCode

# big enough for any DICOM header value we read; pixel data and large blobs stay on disk
DEFER_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class InstanceHeader:
    """What the store needs to know of one instance (no pixel data)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    instance_number: int | None
    series_number: int | None
    series_description: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    study_description: str
    accession_number: str
    derived_uids: tuple[str, ...] = ()  # keywords of UIDs the file lacked, derived here

# --- attributes ---------------------------------------------------------------------------------------------

def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """A text attribute for the index; one that does not decode is left empty rather than refusing the file."""
    try:
        value = ds.get(keyword, "")
        return "" if value is None else str(value).strip()
    except Exception:  # a damaged descriptive value must not refuse the image
        return ""


def _int_or_none(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        number = None if value in (None, "") else int(value)
    except Exception:  # any damaged value reads as absent
        return None
    return number if number is not None and -(2**63) <= number < 2**63 else None  # SQLite's integer range


def _image_int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """An attribute that sizes the image: absent gives ``default``; present but unreadable refuses the file."""
    if keyword not in ds:
        return default
    try:
        value = ds[keyword].value
        return default if value in (None, "") else int(value)
    except Exception as exc:  # pydicom raises many kinds on damaged values
        raise invalid(f"its {keyword} value cannot be read") from exc


# --- the checks ---------------------------------------------------------------------------------------------

def _syntax(meta: FileMeta | None, ds: pydicom.Dataset) -> UID:
    """The transfer syntax the data set was read with: the meta's, or the encoding found when it names none."""
    if meta is not None and meta.transfer_syntax:
        return UID(meta.transfer_syntax)
    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    return pydicom.uid.ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _check_syntax_known(meta: FileMeta | None) -> None:
    if meta is None or not meta.transfer_syntax:
        return
    syntax = UID(meta.transfer_syntax)
    if not syntax.is_transfer_syntax:
        shown = "".join(c if c.isprintable() else "?" for c in meta.transfer_syntax)[:64]
        raise InstanceRejected(ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
                               f"The file is encoded in transfer syntax '{shown}', which this appliance does not "
                               "know, so it cannot be read. Ask for it to be sent uncompressed or as JPEG 2000.")


def _check_image(ds: pydicom.Dataset, syntax: UID, max_rows_columns: int, max_frames: int,
                 overrun: PixelOverrun | None) -> None:
    sop_class = UID(sop_uid(ds, "SOPClassUID"))
    has_pixels = any(tag in ds for tag in PIXEL_DATA_TAGS)
    if sop_class.name.endswith("Image Storage") and not has_pixels:
        raise InstanceRejected(ReasonCode.NO_PIXEL_DATA,
                               "The file holds an image's header but no image data (Pixel Data is absent).")
    rows, columns = _image_int(ds, "Rows", 0), _image_int(ds, "Columns", 0)
    frames = _image_int(ds, "NumberOfFrames", 1)
    if rows > max_rows_columns or columns > max_rows_columns or frames > max_frames:
        raise InstanceRejected(ReasonCode.IMAGE_TOO_LARGE,
                               f"The image declares {rows} x {columns} pixels and {frames} frame(s), "
                               f"more than this appliance accepts ({max_rows_columns} x {max_rows_columns}, "
                               f"{max_frames} frames).")
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if element is None:
        return
    encapsulated = element.length == UNDEFINED_LENGTH if isinstance(element, pydicom.dataelem.RawDataElement) \
        else bool(getattr(element, "is_undefined_length", False))
    if syntax.is_encapsulated and not encapsulated:
        raise invalid(f"its transfer syntax says the image data is compressed ({syntax.name}) but it is "
                       "stored uncompressed")
    if not syntax.is_encapsulated and encapsulated:
        raise invalid(f"its image data is stored compressed but its transfer syntax ({syntax.name}) says "
                       "uncompressed")
    if not encapsulated:
        _check_native_length(ds, element, rows, columns, frames, overrun)


def _check_native_length(ds: pydicom.Dataset, element, rows: int, columns: int, frames: int,
                         overrun: PixelOverrun | None) -> None:
    samples = _image_int(ds, "SamplesPerPixel", 1)
    bits = _image_int(ds, "BitsAllocated", 16)
    expected = (rows * columns * frames * samples * bits + 7) // 8
    if _text(ds, "PhotometricInterpretation") in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        expected = expected * 2 // 3  # two chroma samples shared by each pair of pixels (PS3.3 C.7.6.3.1.2)
    if overrun is not None:
        if not expected or overrun.declared in (expected, expected + 1):
            raise InstanceRejected(ReasonCode.TRUNCATED,
                                   f"The file ends inside its image data ({overrun.present} of "
                                   f"{overrun.declared} bytes present): it was cut short.")
        raise invalid(f"its image data declares {overrun.declared} bytes, more than the file holds and not "
                       f"the {expected} that its {rows} x {columns} pixels and {frames} frame(s) need")
    length = element.length if isinstance(element, pydicom.dataelem.RawDataElement) else len(element.value or b"")
    if length < expected:
        raise InstanceRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                               f"The image data holds {length} bytes, fewer than the {expected} that its "
                               f"{rows} x {columns} pixels and {frames} frame(s) need: the file is damaged.")


def _looks_like_dataset(ds: pydicom.Dataset) -> bool:
    """A data set read without file meta is taken as DICOM only with a SOP class and an image or a study."""
    return bool(sop_uid(ds, "SOPClassUID")) and (PIXEL_DATA in ds or "StudyInstanceUID" in ds)


def _read(path: Path, meta: FileMeta | None, sha256: str | None, max_rows_columns: int,
          max_frames: int) -> InstanceHeader:
    with open(path, "rb") as f:
        overrun = walk(f, os.path.getsize(path), meta)
    ds = pydicom.dcmread(path, defer_size=DEFER_SIZE, force=True)
    if meta is None and not _looks_like_dataset(ds):
        raise not_dicom()
    syntax = _syntax(meta, ds)
    uids, derived = resolve_uids(ds, sha256)
    _check_image(ds, syntax, max_rows_columns, max_frames, overrun)
    return InstanceHeader(
        sop_instance_uid=uids["SOPInstanceUID"], sop_class_uid=uids["SOPClassUID"],
        study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(syntax), modality=_text(ds, "Modality"),
        instance_number=_int_or_none(ds, "InstanceNumber"), series_number=_int_or_none(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"), patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"), patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"), study_date=_text(ds, "StudyDate"), study_time=_text(ds, "StudyTime"),
        study_description=_text(ds, "StudyDescription"), accession_number=_text(ds, "AccessionNumber"),
        derived_uids=derived,
    )


def read_header(path: Path, *, max_rows_columns: int = 4096, max_frames: int = 4096,
                max_inflated_bytes: int = 2 * 1024**3, max_inflate_ratio: float = MAX_INFLATE_RATIO,
                sha256: str | None = None) -> InstanceHeader:
    """Read and check the header of the DICOM file at ``path``.

    Anonymisers sometimes empty the Study, Series or SOP Instance UID; those are
    derived from the identifying attributes (and, for the instance, the file's
    ``sha256``) so the same file always files the same way.

    A Deflated file is replaced, once its header passed, by its inflated form (Explicit VR Little
    Endian): at most ``max_inflated_bytes``, and at most ``max_inflate_ratio`` times its compressed size.

    Raises :class:`InstanceRejected` with a reason code when the file cannot be accepted, and
    nothing else: an unforeseen failure on a hostile file is INVALID_HEADER.
    """
    inflated = None
    try:
        if os.path.getsize(path) == 0:
            raise InstanceRejected(ReasonCode.EMPTY_FILE, "The file is empty (0 bytes).")
        with open(path, "rb") as f:
            meta = read_meta(f, os.path.getsize(path))
        if meta is not None and meta.transfer_syntax == DeflatedExplicitVRLittleEndian:
            inflated = inflate(path, meta, max_inflated_bytes, max_inflate_ratio)
            with open(inflated, "rb") as f:
                meta = read_meta(f, os.path.getsize(inflated))
        _check_syntax_known(meta)
        header = _read(inflated or path, meta, sha256, max_rows_columns, max_frames)
        if inflated is not None:
            os.replace(inflated, path)
            inflated = None
        return header
    except InstanceRejected:
        raise
    except Exception as exc:  # whatever else a hostile file provokes is a malformed header
        raise InstanceRejected(ReasonCode.INVALID_HEADER, f"The file's DICOM header is malformed and cannot be "
                                                          f"read ({type(exc).__name__}).") from exc
    finally:
        if inflated is not None:
            inflated.unlink(missing_ok=True)

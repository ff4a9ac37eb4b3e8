"""Check one DICOM file's header before it is accepted, without decoding pixels.

A file declaring 65535 x 65535 pixels is refused here from its header alone;
pixel data that ends before its declared length is refused as truncated.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from appliance.dicomfile.uids import resolve_uids, sop_uid
from appliance.errors import InstanceRejected, ReasonCode

PIXEL_DATA = Tag(0x7FE0, 0x0010)
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
UNDEFINED_LENGTH = 0xFFFFFFFF
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


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int_or_none(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _read(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise InstanceRejected(ReasonCode.TRUNCATED,
                               f"The file is damaged or cut short and cannot be read ({type(exc).__name__}).") from exc
    # files without the 128-byte preamble and meta header still occur on old media
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE, force=True)
    except Exception as exc:
        raise InstanceRejected(ReasonCode.NOT_DICOM, "The file is not a DICOM file.") from exc
    if not sop_uid(ds, "SOPClassUID") or ("PixelData" not in ds and "StudyInstanceUID" not in ds):
        raise InstanceRejected(ReasonCode.NOT_DICOM, "The file is not a DICOM file.")
    return ds


def _check_has_pixels(ds: pydicom.Dataset) -> None:
    """An image object without pixel data was cut short (pydicom reads what is there without error)."""
    sop_class = pydicom.uid.UID(sop_uid(ds, "SOPClassUID"))
    if sop_class.name.endswith("Image Storage") and PIXEL_DATA not in ds:
        raise InstanceRejected(ReasonCode.TRUNCATED, "The file ends before its image data: it was cut short.")


def _check_image_size(ds: pydicom.Dataset, max_rows_columns: int, max_frames: int) -> None:
    rows, columns = _int_or_none(ds, "Rows") or 0, _int_or_none(ds, "Columns") or 0
    frames = _int_or_none(ds, "NumberOfFrames") or 1
    if rows > max_rows_columns or columns > max_rows_columns or frames > max_frames:
        raise InstanceRejected(ReasonCode.IMAGE_TOO_LARGE,
                               f"The image declares {rows} x {columns} pixels and {frames} frame(s), "
                               f"more than this appliance accepts ({max_rows_columns} x {max_rows_columns}, "
                               f"{max_frames} frames).")


def _check_pixel_data_length(ds: pydicom.Dataset, path: Path, transfer_syntax: pydicom.uid.UID) -> None:
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if element is None:
        return
    if not isinstance(element, pydicom.dataelem.RawDataElement) or element.value_tell is None:
        return  # small enough to be read already: pydicom checked it while reading
    size = os.path.getsize(path)
    if element.length == UNDEFINED_LENGTH:
        with open(path, "rb") as f:
            f.seek(max(0, size - len(SEQUENCE_DELIMITER)))
            if f.read() != SEQUENCE_DELIMITER:
                raise InstanceRejected(ReasonCode.TRUNCATED,
                                       "The compressed image data ends early: the file was cut short.")
        return
    if element.value_tell + element.length > size:
        raise InstanceRejected(ReasonCode.TRUNCATED, "The image data ends early: the file was cut short.")
    rows, columns = _int_or_none(ds, "Rows") or 0, _int_or_none(ds, "Columns") or 0
    frames = _int_or_none(ds, "NumberOfFrames") or 1
    samples = _int_or_none(ds, "SamplesPerPixel") or 1
    bits = _int_or_none(ds, "BitsAllocated") or 16
    expected = rows * columns * frames * samples * bits // 8
    if not transfer_syntax.is_encapsulated and element.length < expected:
        raise InstanceRejected(ReasonCode.TRUNCATED,
                               f"The image data holds {element.length} bytes but the header declares "
                               f"{expected}: the file is damaged.")


def read_header(path: Path, *, max_rows_columns: int = 4096, max_frames: int = 4096,
                sha256: str | None = None) -> InstanceHeader:
    """Read and check the header of the DICOM file at ``path``.

    Anonymisers sometimes empty the Study, Series or SOP Instance UID; those are
    derived from the identifying attributes (and, for the instance, the file's
    ``sha256``) so the same file always files the same way.

    Raises :class:`InstanceRejected` with a reason code when the file cannot be accepted.
    """
    if os.path.getsize(path) == 0:
        raise InstanceRejected(ReasonCode.EMPTY_FILE, "The file is empty (0 bytes).")
    ds = _read(path)
    _check_has_pixels(ds)
    uids, derived = resolve_uids(ds, sha256)
    _check_image_size(ds, max_rows_columns, max_frames)
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = pydicom.uid.UID(str((meta or {}).get("TransferSyntaxUID", ImplicitVRLittleEndian)))
    _check_pixel_data_length(ds, path, transfer_syntax)
    return InstanceHeader(
        sop_instance_uid=uids["SOPInstanceUID"], sop_class_uid=uids["SOPClassUID"],
        study_instance_uid=uids["StudyInstanceUID"], series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(transfer_syntax), modality=_text(ds, "Modality"),
        instance_number=_int_or_none(ds, "InstanceNumber"), series_number=_int_or_none(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"), patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"), patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"), study_date=_text(ds, "StudyDate"), study_time=_text(ds, "StudyTime"),
        study_description=_text(ds, "StudyDescription"), accession_number=_text(ds, "AccessionNumber"),
        derived_uids=derived,
    )

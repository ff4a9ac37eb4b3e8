"""DICOM UIDs: which are safe to file under, and stable valid ones for files whose UIDs are not.

A UID becomes a file or folder name in the instance store, so only digits and
dots, at most 64 characters (PS3.5 9.1), are used as they are. Anonymisers
write other things too, which other readers (dcm2niix, Orthanc, 3D Slicer)
accept; such a file is filed under a UID derived from it, the same every time:

- an emptied Study or Series Instance UID: from the identifying attributes of
  the study / series, so every file of a series lands in one series;
- an emptied SOP Instance UID: from the file's bytes (its SHA-256);
- a UUID (``3f2a...-...``, also with ``urn:uuid:``): ``2.25.<the UUID's 128-bit
  integer>``, as PS3.5 B.2 turns a UUID into a UID;
- anything else that is not a UID (too long, letters, ``../``): ``2.25.`` and
  the integer of a name-based UUID (version 5) of the value.

The value the file wrote is kept by the store beside the UID it was filed under.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pydicom

from appliance.errors import InstanceRejected, ReasonCode

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64
DERIVED_UID_ROOT = "2.25."  # PS3.5 B.2: a UID from a UUID-sized integer
UUID_PATTERN = re.compile(r"^(?:urn:uuid:)?\{?([0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\}?$", re.IGNORECASE)
# name-based UUIDs (RFC 4122 version 5) of values that are neither UIDs nor UUIDs live in this namespace
INVALID_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "ct-appliance/invalid-uid")
# the UIDs a file is filed under, by keyword
FILED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

# attributes that identify a study / series when an anonymiser emptied its UID
STUDY_IDENTITY = ("PatientID", "PatientName", "PatientBirthDate", "StudyDate", "StudyTime", "StudyID",
                  "AccessionNumber")
SERIES_IDENTITY = STUDY_IDENTITY + ("Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
                                    "FrameOfReferenceUID")


def is_valid_uid(value: object) -> bool:
    """True for a UID that is safe to use as a file or folder name (digits and dots, <= 64)."""
    return (isinstance(value, str) and 0 < len(value) <= UID_MAX_LENGTH
            and UID_PATTERN.match(value) is not None)


def sop_uid(ds: pydicom.Dataset, keyword: str) -> str:
    """SOPClassUID or SOPInstanceUID, falling back to the file meta's Media Storage copy when empty."""
    value = str(ds.get(keyword) or "").strip()
    if not value:
        meta = getattr(ds, "file_meta", None) or {}
        value = str(meta.get("MediaStorage" + keyword, "") or "").strip()
    return value


def derived_uid(ds: pydicom.Dataset, keywords: tuple[str, ...], extra: str = "") -> str:
    """A stable UID (2.25 root) from identifying attributes, for files whose UID was emptied
    (tolerance ``derived_uid``, docs/series-checks.md)."""
    sources = "\x1f".join([f"{k}={ds.get(k, '')}" for k in keywords] + [extra])
    return DERIVED_UID_ROOT + str(int.from_bytes(hashlib.sha256(sources.encode()).digest()[:16], "big"))


def valid_uid(value: str) -> str:
    """The UID a non-empty ``value`` stands for: itself when it is a UID; a UUID as ``2.25.<integer>``
    (PS3.5 B.2); anything else as ``2.25.`` and a name-based UUID of the value. The same value always
    gives the same UID, and the result is always safe as a file name (tolerance ``uid_mapping``)."""
    if is_valid_uid(value):
        return value
    match = UUID_PATTERN.match(value)
    if match:
        return DERIVED_UID_ROOT + str(uuid.UUID(match.group(1)).int)
    return DERIVED_UID_ROOT + str(uuid.uuid5(INVALID_UID_NAMESPACE, value).int)


def resolve_uids(ds: pydicom.Dataset, sha256: str | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """The four UIDs a file is filed under, by keyword, and the keywords of those derived here.

    Empty Study and Series Instance UIDs are derived from the identifying attributes; an empty
    SOP Instance UID from the file's ``sha256`` (refused without it); values that are not UIDs
    (UUIDs, too long, other characters) are mapped by :func:`valid_uid`. The same file always files
    the same way. Raises :class:`InstanceRejected` for a missing or invalid SOP Class UID.
    """
    uids = {"SOPClassUID": sop_uid(ds, "SOPClassUID"), "SOPInstanceUID": sop_uid(ds, "SOPInstanceUID"),
            "StudyInstanceUID": str(ds.get("StudyInstanceUID") or "").strip(),
            "SeriesInstanceUID": str(ds.get("SeriesInstanceUID") or "").strip()}
    if not uids["SOPClassUID"]:
        raise InstanceRejected(ReasonCode.MISSING_UID,
                               "The file does not say what kind of object it is (no SOPClassUID).")
    if not is_valid_uid(uids["SOPClassUID"]):
        raise InstanceRejected(ReasonCode.INVALID_UID, "The file's SOPClassUID is not a valid DICOM UID.")
    derived = [keyword for keyword in FILED_UIDS if not is_valid_uid(uids[keyword])]
    for keyword in derived:
        if uids[keyword]:
            uids[keyword] = valid_uid(uids[keyword])
    if not uids["StudyInstanceUID"]:
        uids["StudyInstanceUID"] = derived_uid(ds, STUDY_IDENTITY)
    if not uids["SeriesInstanceUID"]:
        uids["SeriesInstanceUID"] = derived_uid(ds, SERIES_IDENTITY, uids["StudyInstanceUID"])
    if not uids["SOPInstanceUID"]:
        if sha256 is None:
            raise InstanceRejected(ReasonCode.MISSING_UID, "The file has no SOPInstanceUID.")
        uids["SOPInstanceUID"] = derived_uid(ds, (), sha256)
    return uids, tuple(derived)


def file_uids(path: Path) -> dict[str, str]:
    """The Study, Series and SOP Instance UIDs as the file at ``path`` writes them ('' when absent),
    whether or not they are valid: what the store keeps beside the UIDs it filed the file under."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=list(FILED_UIDS))
    return {"StudyInstanceUID": str(ds.get("StudyInstanceUID") or "").strip(),
            "SeriesInstanceUID": str(ds.get("SeriesInstanceUID") or "").strip(),
            "SOPInstanceUID": sop_uid(ds, "SOPInstanceUID")}

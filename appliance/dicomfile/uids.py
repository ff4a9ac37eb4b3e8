"""DICOM UIDs: which are safe to file under, and stable ones for files whose UID was emptied.

A UID becomes a file or folder name in the instance store, so only digits and
dots, at most 64 characters (PS3.5 9.1), are accepted.
"""

from __future__ import annotations

import hashlib
import re

import pydicom

from appliance.errors import InstanceRejected, ReasonCode

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LENGTH = 64
DERIVED_UID_ROOT = "2.25."  # PS3.5 B.2: a UID from a UUID-sized integer

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
    """A stable UID (2.25 root) from identifying attributes, for files whose UID was emptied."""
    sources = "\x1f".join([f"{k}={ds.get(k, '')}" for k in keywords] + [extra])
    return DERIVED_UID_ROOT + str(int.from_bytes(hashlib.sha256(sources.encode()).digest()[:16], "big"))


def resolve_uids(ds: pydicom.Dataset, sha256: str | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """The four UIDs a file is filed under, by keyword, and the keywords of those derived here.

    Empty Study and Series Instance UIDs are derived from the identifying attributes; an empty
    SOP Instance UID from the file's ``sha256`` (refused without it), so the same file always
    files the same way. Raises :class:`InstanceRejected` for a missing SOP Class UID or an invalid UID.
    """
    uids = {"SOPClassUID": sop_uid(ds, "SOPClassUID"), "SOPInstanceUID": sop_uid(ds, "SOPInstanceUID"),
            "StudyInstanceUID": str(ds.get("StudyInstanceUID") or "").strip(),
            "SeriesInstanceUID": str(ds.get("SeriesInstanceUID") or "").strip()}
    if not uids["SOPClassUID"]:
        raise InstanceRejected(ReasonCode.MISSING_UID,
                               "The file does not say what kind of object it is (no SOPClassUID).")
    derived = []
    if not uids["StudyInstanceUID"]:
        uids["StudyInstanceUID"] = derived_uid(ds, STUDY_IDENTITY)
        derived.append("StudyInstanceUID")
    if not uids["SeriesInstanceUID"]:
        uids["SeriesInstanceUID"] = derived_uid(ds, SERIES_IDENTITY, uids["StudyInstanceUID"])
        derived.append("SeriesInstanceUID")
    if not uids["SOPInstanceUID"]:
        if sha256 is None:
            raise InstanceRejected(ReasonCode.MISSING_UID, "The file has no SOPInstanceUID.")
        uids["SOPInstanceUID"] = derived_uid(ds, (), sha256)
        derived.append("SOPInstanceUID")
    for keyword, value in uids.items():
        if not is_valid_uid(value):
            raise InstanceRejected(ReasonCode.INVALID_UID, f"The file's {keyword} is not a valid DICOM UID.")
    return uids, tuple(derived)

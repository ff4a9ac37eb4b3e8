"""De-identification: DICOM PS3.15 Basic Application Level Confidentiality Profile with the Retain
Longitudinal Temporal Information with Modified Dates option, and the same pseudonyms for results.

The attribute list and its actions (D, Z, X, U and the combined ones) come from the profile's table as
packaged by dicom-anonymizer (``dicomfields_2026c``); applying them here walks every sequence item too.
Pseudonyms, remapped UIDs and date shifts are HMAC-SHA256 of the original under the site's secret, so
the same patient gets the same pseudonym and shift every month and nobody without the secret can
reverse them.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import re
from functools import cached_property

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

PROFILE_TABLE = "dicomfields_2026c"
DEID_METHOD = ("PS3.15 E.1 Basic Application Level Confidentiality Profile; "
               "Retain Longitudinal Temporal Information with Modified Dates Option")
BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")
MODIFIED_DATES = ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option")
MAX_SHIFT_DAYS = 365


def _table() -> tuple[dict[tuple[int, int], str], list[tuple[tuple[int, int, int, int], str]]]:
    """Exact tags and masked tag ranges of the profile, each with its action letter."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tags = dicom_anonymization_database_selector(PROFILE_TABLE)
    action = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z", "X_Z_TAGS": "X",
              "X_D_TAGS": "X", "X_Z_D_TAGS": "X", "X_Z_U_STAR_TAGS": "U"}
    exact: dict[tuple[int, int], str] = {}
    ranges: list[tuple[tuple[int, int, int, int], str]] = []
    for category, letter in action.items():
        for tag in tags[category]:
            if len(tag) == 2:
                exact[tag] = letter
            else:
                ranges.append((tag, letter))
    return exact, ranges


class Pseudonymizer:
    """Pseudonyms, UIDs and date shifts keyed by the site's secret."""

    def __init__(self, secret: bytes):
        self._secret = secret

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{kind}\x1f{value}".encode(), hashlib.sha256).digest()

    def patient(self, patient_key: str) -> str:
        return "P" + base64.b32encode(self._mac("patient", patient_key)[:10]).decode()

    def uid(self, uid: str) -> str:
        """A UID under 2.25 (a UUID-derived root) that stands for ``uid`` in every export of this site."""
        return "2.25." + str(int.from_bytes(self._mac("uid", uid)[:16], "big"))

    def day_shift(self, patient_key: str) -> int:
        """Days every date of this patient moves back (1..365), the same in every export."""
        return 1 + int.from_bytes(self._mac("dates", patient_key)[:4], "big") % MAX_SHIFT_DAYS

    def shift_date(self, value: str, patient_key: str) -> str:
        """A DICOM DA (ranges too) or DT with every date moved back; '' when a date is unreadable."""
        shift = datetime.timedelta(days=self.day_shift(patient_key))

        def moved(match: re.Match) -> str:
            day = datetime.datetime.strptime(match.group(1), "%Y%m%d").date()
            return (day - shift).strftime("%Y%m%d")
        try:
            return re.sub(r"(?<!\d)(\d{8})", moved, str(value).strip())
        except ValueError:
            return ""

    @cached_property
    def _profile(self):
        return _table()

    def _action(self, tag: int) -> str | None:
        group, element = tag >> 16, tag & 0xFFFF
        exact, ranges = self._profile
        if (group, element) in exact:
            return exact[(group, element)]
        for (g, e, gmask, emask), letter in ranges:
            if group & gmask == g & gmask and element & emask == e & emask:
                return letter
        return None

    def deidentify(self, ds: Dataset, patient_key: str) -> None:
        """De-identify ``ds`` in place (every sequence item included) and record how it was done."""
        self._walk(ds, patient_key)
        ds.PatientName = self.patient(patient_key)
        ds.PatientID = self.patient(patient_key)
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
        ds.DeidentificationMethod = DEID_METHOD
        ds.DeidentificationMethodCodeSequence = Sequence([_code(*BASIC_PROFILE), _code(*MODIFIED_DATES)])
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    def _walk(self, ds: Dataset, patient_key: str) -> None:
        for elem in list(ds):
            group = elem.tag.group
            if elem.tag.is_private or group in range(0x5000, 0x5100) or group in range(0x6000, 0x6100):
                del ds[elem.tag]  # private attributes, curves and overlays go
                continue
            action = self._action(int(elem.tag))
            vr = elem.VR
            if action is None:
                if vr == "SQ":
                    for item in elem.value:
                        self._walk(item, patient_key)
                continue
            if action == "X":
                del ds[elem.tag]
            elif vr in ("DA", "DT"):
                values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
                shifted = [self.shift_date(v, patient_key) for v in values if v]
                elem.value = shifted[0] if len(shifted) == 1 else shifted
            elif action == "U" and vr == "UI":
                values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
                mapped = [self.uid(str(v)) for v in values if v]
                elem.value = mapped[0] if len(mapped) == 1 else mapped
            elif vr == "SQ":
                elem.value = Sequence()  # Z or D on a sequence: no item of it is kept
            elif action == "D":
                elem.value = _dummy(vr)
            else:  # Z: present and empty
                elem.value = "" if vr not in _BINARY_VRS else b""


_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def _dummy(vr: str):
    """A value of the VR that carries nothing of the original (action D)."""
    return {"PN": "ANONYMOUS", "DA": "", "TM": "000000", "DT": "", "AS": "000Y", "IS": "0", "DS": "0",
            "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0, "UI": "2.25.0"}.get(
        vr, b"" if vr in _BINARY_VRS else "ANONYMIZED")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def profile_keywords() -> list[str]:
    """Keywords of the profile's exact attributes (for tests that fill every one with a canary)."""
    from pydicom.datadict import keyword_for_tag

    exact, _ranges = _table()
    out = []
    for group, element in exact:
        tag = (group << 16) | element
        keyword = keyword_for_tag(tag)
        if keyword and group != 0x0002:
            try:
                dictionary_VR(tag)
            except KeyError:
                continue
            out.append(keyword)
    return sorted(out)

"""Reason codes and the domain exceptions that carry them.

Every rejection carries a machine-readable reason code and a sentence a
technician understands. Exceptions are translated at each boundary: a
non-zero exit and one line in the CLI, a DICOM status at the receiver.
"""

from __future__ import annotations

import enum


class ReasonCode(str, enum.Enum):
    """Why a file was quarantined or a series rejected."""

    # files (docs/series-checks.md, "Files refused on import")
    EMPTY_FILE = "EMPTY_FILE"
    NOT_DICOM = "NOT_DICOM"
    NOT_REGULAR_FILE = "NOT_REGULAR_FILE"
    UNREADABLE = "UNREADABLE"
    TRUNCATED = "TRUNCATED"
    INVALID_HEADER = "INVALID_HEADER"
    NO_PIXEL_DATA = "NO_PIXEL_DATA"
    MISSING_UID = "MISSING_UID"
    INVALID_UID = "INVALID_UID"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    FILE_TOO_LARGE = "FILE_TOO_LARGE"
    UNSAFE_ARCHIVE = "UNSAFE_ARCHIVE"
    DAMAGED_ARCHIVE = "DAMAGED_ARCHIVE"
    UNSUPPORTED_ARCHIVE = "UNSUPPORTED_ARCHIVE"
    # the appliance itself
    DISK_LOW = "DISK_LOW"
    # series
    NOT_CT = "NOT_CT"
    TOO_FEW_SLICES = "TOO_FEW_SLICES"
    MIXED_ORIENTATION = "MIXED_ORIENTATION"
    DUPLICATE_POSITIONS = "DUPLICATE_POSITIONS"
    MISSING_SLICES = "MISSING_SLICES"
    IRREGULAR_SPACING = "IRREGULAR_SPACING"
    GANTRY_TILT = "GANTRY_TILT"
    UNSUPPORTED_TRANSFER_SYNTAX = "UNSUPPORTED_TRANSFER_SYNTAX"
    CORRUPT_PIXEL_DATA = "CORRUPT_PIXEL_DATA"
    MISSING_POSITION = "MISSING_POSITION"  # no Image Position (Patient): taken from Slice Location, or rejected
    UNREADABLE_SERIES = "UNREADABLE_SERIES"  # reading failed in a way no other code names
    MALFORMED_NUMBER = "MALFORMED_NUMBER"  # a DS/IS value read as other readers read it (corrected, never fatal)


class ApplianceError(Exception):
    """Base class of the appliance's domain errors."""


class Rejected(ApplianceError):
    """Something was refused for a reason a technician can act on."""

    def __init__(self, reason_code: ReasonCode, reason: str):
        super().__init__(f"{reason_code.value}: {reason}")
        self.reason_code = reason_code
        self.reason = reason

    def __reduce__(self):  # cross process boundaries (decoder pool) intact
        return (self.__class__, (self.reason_code, self.reason))


class Refused(ApplianceError):
    """An operation refused, with its reason code (a word a support line can search for) and a sentence."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code = reason_code
        self.reason = reason

    def __reduce__(self):
        return (self.__class__, (self.reason_code, self.reason))


class InstanceRejected(Rejected):
    """A file could not be accepted into the instance store."""


class SeriesRejected(Rejected):
    """A series cannot be assembled into a usable CT volume.

    ``problems`` lists every problem the checks found (geometry ``Problem`` objects), fatal or corrected.
    """

    problems: tuple = ()


class DiskLow(Rejected):
    """Free space in the data directory fell below ``disk_low_watermark_mb``: an import stops here.

    Files already stored stay stored; nothing is quarantined for it (the files are not at fault).
    """

    http_status = 507  # Insufficient Storage, for the browser upload

    def __init__(self, reason: str):
        super().__init__(ReasonCode.DISK_LOW, reason)

    def __reduce__(self):
        return (self.__class__, (self.reason,))


class NothingUsable(ApplianceError):
    """An import or analysis found nothing it could use."""

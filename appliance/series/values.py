"""Decimal String (DS) and Integer String (IS) values as other DICOM readers take them.

The tolerance ``number_with_trailing_characters`` of docs/series-checks.md.

Some writers leave characters after the number: ``0.976562u``, ``120`` padded with a NUL
instead of a space, ``3mm``. dcm2niix, Orthanc and 3D Slicer read the leading number; so does
this module, and says so (the caller notes it on the series). Only characters that cannot change
the number are tolerated: a digit after the number (``1,5``, ``1.2.3``) means another number was
meant, and the value is refused; so are NaN and infinity, which no image attribute can take.
Spaces around a value are its standard padding (PS3.5 6.2), not a defect.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

import pydicom

LEADING_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


@dataclasses.dataclass(frozen=True)
class Number:
    """One value read from a DS or IS string."""

    value: float
    text: str  # as the file wrote it
    trailing: bool  # characters after the number were left out


def parse_number(text: str) -> Number | None:
    """The number ``text`` holds, or None when it holds none that can be trusted."""
    stripped = text.strip(" ")
    match = LEADING_NUMBER.match(stripped)
    if match is None:
        return None
    rest = stripped[match.end():]
    if any(c.isdigit() for c in rest):
        return None
    value = float(match.group())
    if not math.isfinite(value):
        return None
    return Number(value, text, trailing=bool(rest))


def value_texts(ds: pydicom.Dataset | None, keyword: str) -> list[str] | None:
    """The values of attribute ``keyword`` of ``ds`` as the file wrote them (split at backslashes);
    None when the attribute is absent or empty. Reads the raw bytes, so no conversion can fail."""
    element = ds.get_item(keyword) if ds is not None and keyword in ds else None
    value = None if element is None else element.value
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    elif isinstance(value, str) or not isinstance(value, Iterable):
        text = str(value)
    else:  # already converted to several values
        return [str(v) for v in value] or None
    return text.split("\\") if text.strip(" \x00") else None


def shown(text: str) -> str:
    """``text`` quoted for a sentence, with characters that do not print (a NUL) written as escapes."""
    return "'" + "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text) + "'"

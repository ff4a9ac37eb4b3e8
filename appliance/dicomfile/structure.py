"""The element structure of one DICOM file, walked by tags, VRs and lengths without reading values.

pydicom reads what it can of a damaged file without saying so: a value cut short is read short, a
length beyond the end skips past it. This walk finds where the structure fails and says how, so that
a file cut short (TRUNCATED) is told from a malformed one (INVALID_HEADER) and from one that is no
DICOM at all (NOT_DICOM), and it bounds the work a hostile file can cause: elements walked, sequences
nested, bytes of file meta. It mirrors pydicom's tolerance (implicit VR elements inside explicit VR
data sets, unknown VRs read with a 2-byte length, a few stray bytes after the image data), so that
whatever pydicom reads well passes here.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import BinaryIO

from pydicom.datadict import get_entry
from pydicom.tag import Tag
from pydicom.uid import UID

from appliance.errors import InstanceRejected, ReasonCode

PIXEL_DATA = Tag(0x7FE0, 0x0010)
PIXEL_DATA_TAGS = (PIXEL_DATA, Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))  # Pixel, Float, Double Float
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PREAMBLE_LENGTH = 128
MAGIC = b"DICM"
# explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
KNOWN_VRS = LONG_VRS | frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
     b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
# the work a hostile file can cause: elements walked (all levels), nesting depth, bytes of file meta
MAX_ELEMENTS = 500_000
MAX_DEPTH = 32
MAX_META_BYTES = 64 * 1024
# pydicom reads every value inside a sequence of undefined length into memory while it reads the file
MAX_NESTED_VALUE = 64 * 2**20


def invalid(reason: str) -> InstanceRejected:
    """INVALID_HEADER, ``reason`` completing "The file's DICOM header is malformed: ..." ."""
    return InstanceRejected(ReasonCode.INVALID_HEADER, f"The file's DICOM header is malformed: {reason}.")


def cut_short(what: str) -> InstanceRejected:
    """TRUNCATED, ``what`` completing "The file ends before ..." ."""
    return InstanceRejected(ReasonCode.TRUNCATED, f"The file ends before {what}: it was cut short.")


def not_dicom() -> InstanceRejected:
    """NOT_DICOM."""
    return InstanceRejected(ReasonCode.NOT_DICOM, "The file is not a DICOM file.")


# --- file meta information (group 0002), read here so that pydicom never sees a syntax it mishandles ---

@dataclasses.dataclass(frozen=True)
class FileMeta:
    """Where a file's meta group (0002) lies and the transfer syntax it names."""

    start: int  # first meta element: 132 after a preamble, 0 without one
    dataset_offset: int  # where the data set begins
    transfer_syntax: str | None  # None when the meta names none
    transfer_syntax_at: tuple[int, int] | None  # (offset of the element, its value length)
    group_length_at: int | None  # offset of the (0002,0000) value


def read_meta(f: BinaryIO, size: int) -> FileMeta | None:
    """The file meta group, from its raw bytes; None when the file has none (a bare data set or not DICOM)."""
    head = f.read(PREAMBLE_LENGTH + 4)
    if head[PREAMBLE_LENGTH:] == MAGIC:
        start = PREAMBLE_LENGTH + 4
    elif head[:2] == b"\x02\x00":
        start = 0
    else:
        return None
    pos, syntax, syntax_at, group_length_at = start, None, None, None
    while pos < size:
        f.seek(pos)
        header = f.read(8)
        if len(header) < 8 or header[:2] != b"\x02\x00":
            break
        element = struct.unpack("<H", header[2:4])[0]
        vr, length, value_at = _Walk(f, size, little=True).element_header(pos, header, implicit=False)
        if value_at + length > size:
            if _sane(0x00020000 | element, vr, length, set()):
                raise cut_short(f"the end of its file meta header (element (0002,{element:04X}))")
            raise invalid(f"file meta element (0002,{element:04X}) declares {length} bytes, more than the "
                          "file holds")
        if value_at + length - start > MAX_META_BYTES:
            raise invalid(f"its file meta header is longer than {MAX_META_BYTES // 1024} KiB")
        if element == 0x0000:
            group_length_at = value_at
        elif element == 0x0010:
            syntax_at = (pos, length)
            f.seek(value_at)
            syntax = f.read(min(length, 128)).rstrip(b"\0 ").decode("ascii", "replace")
        pos = value_at + length
    return FileMeta(start, pos, syntax, syntax_at, group_length_at)


def _guess_encoding(first: bytes) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a data set whose file names no transfer syntax, as pydicom guesses it
    from its first element (``first``, 8 bytes): explicit VR when a VR is there, big endian for a high group."""
    if len(first) < 6 or first[4:6] not in KNOWN_VRS:
        return True, True
    return False, struct.unpack("<H", first[:2])[0] < 1024


def _is_dataset_start(first: bytes) -> bool:
    """Whether ``first`` (8 bytes) begins a data set written without file meta: such a data set starts with
    group 0008 (SOP Class UID is in it), or 0004 for a DICOMDIR, in either byte order."""
    if len(first) < 8:
        return False
    return (struct.unpack("<H", first[:2])[0] in (0x0004, 0x0008)
            or (struct.unpack(">H", first[:2])[0] in (0x0004, 0x0008) and first[4:6] in KNOWN_VRS))


def _encoding(syntax: UID, first: bytes) -> tuple[bool, bool]:
    """(implicit VR, little endian) as pydicom reads the data set: by its transfer syntax, switching to what
    the first element shows when that contradicts it (as some writers do)."""
    implicit = syntax.is_implicit_VR
    if len(first) >= 6:
        implicit = not (first[4:6].isalpha() and first[4:6].isupper())
    return implicit, syntax.is_little_endian


# --- the element walk -------------------------------------------------------------------------------------

# the longest value of one value of each VR (PS3.5 Table 6.2-1), for telling a cut file from a damaged length
VR_MAX_LENGTH = {"AE": 16, "AS": 4, "AT": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "FD": 8, "FL": 4, "IS": 12,
                 "LO": 64, "LT": 10240, "PN": 324, "SH": 16, "SL": 4, "SS": 2, "ST": 1024, "TM": 16, "UI": 64,
                 "UL": 4, "US": 2}


def _sane(tag: int, vr: bytes | None, length: int, creators: set[tuple[int, int]]) -> bool:
    """Whether an element is what the standard and the data dictionary say it is: a known VR that fits the
    tag, and a length its VR and multiplicity allow. An element running off the end of a file means the
    file was cut short only when the element is sane; a damaged length or tag is something else."""
    group, element = tag >> 16, tag & 0xFFFF
    if vr is not None and vr not in KNOWN_VRS:
        return False
    if group % 2:  # private: a creator (gggg,0010-00FF), or an element whose creator came before it
        return 0x0010 <= element <= 0x00FF or (group, element >> 8) in creators
    if element == 0x0000:
        return length == 4  # a group length
    try:
        dictionary_vr, vm = get_entry(tag)[:2]
    except KeyError:
        return False
    allowed = dictionary_vr.split(" or ")
    name = vr.decode() if vr is not None else allowed[0]
    if vr is not None and name != "UN" and name not in allowed:
        return False
    most = VR_MAX_LENGTH.get(name)
    if most is None or "n" in vm:
        return True
    return length <= (most + 1) * int(vm.split("-")[-1])


@dataclasses.dataclass(frozen=True)
class PixelOverrun:
    """Native Pixel Data that runs off the end of the file: cut short, or a damaged length (decided once
    Rows and Columns are known)."""

    declared: int
    present: int


class _Walk:
    """Walks elements by their tags, VRs and lengths, without reading values (bounded work)."""

    def __init__(self, f: BinaryIO, size: int, little: bool):
        self.f, self.size = f, size
        self.endian = "<" if little else ">"
        self.elements = 0
        self.pixel_overrun: PixelOverrun | None = None

    def _read(self, pos: int, count: int) -> bytes:
        self.f.seek(pos)
        return self.f.read(count)

    def _count(self) -> None:
        self.elements += 1
        if self.elements > MAX_ELEMENTS:
            raise invalid(f"it holds more than {MAX_ELEMENTS:,} data elements")

    def dataset(self, pos: int, implicit: bool, *, end: int | None = None, depth: int = 0,
                delimited: bool = False) -> int:
        """Walk a data set from ``pos`` to ``end`` (a sequence item of defined length), to its item delimiter
        (``delimited``) or to the end of the file; returns where it ends."""
        if depth > MAX_DEPTH:
            raise invalid(f"its sequences are nested more than {MAX_DEPTH} deep")
        stop = self.size if end is None else end
        previous, creators = -1, set[tuple[int, int]]()
        while pos < stop:
            self._count()
            header = self._read(pos, 8)
            if len(header) < 8:
                if depth or previous < PIXEL_DATA:
                    raise cut_short("the end of its last data element")
                return self.size  # a few stray bytes after the image data: ignored, as pydicom does
            group, element = struct.unpack(self.endian + "HH", header[:4])
            tag = group << 16 | element
            if tag == ITEM_DELIMITER and delimited:
                return pos + 8
            if group == 0xFFFE:
                raise invalid(f"a stray delimiter ({group:04X},{element:04X}) at byte {pos}")
            vr, length, value_at = self.element_header(pos, header, implicit)
            ascending, previous = tag > previous, tag
            if group % 2 and 0x0010 <= element <= 0x00FF:
                creators.add((group, element))
            if length == UNDEFINED_LENGTH:
                sane = ascending and _sane(tag, vr, length, creators)
                pos = self._undefined(tag, vr, value_at, implicit, depth, sane)
            elif value_at + length > self.size:
                return self._overrun(tag, length, value_at, ascending and _sane(tag, vr, length, creators), depth)
            elif value_at + length > stop:
                raise invalid(f"element ({group:04X},{element:04X}) at byte {pos} declares {length} bytes, more "
                              "than its sequence item holds")
            elif depth and length > MAX_NESTED_VALUE:
                raise invalid(f"element ({group:04X},{element:04X}) inside a sequence holds {length // 2**20} MiB, "
                              f"more than the {MAX_NESTED_VALUE // 2**20} MiB accepted there")
            else:
                pos = value_at + length
        if delimited:
            raise cut_short("the end of a sequence item")
        return pos

    def _overrun(self, tag: int, length: int, value_at: int, sane: bool, depth: int) -> int:
        """An element running off the end of the file: cut short when the element is sane, else malformed."""
        where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        if not sane:
            raise invalid(f"element {where} declares {length} bytes, more than the file holds")
        if tag == PIXEL_DATA and depth == 0:
            self.pixel_overrun = PixelOverrun(length, self.size - value_at)
            return self.size
        raise cut_short(f"the end of element {where} ({length} bytes declared, "
                         f"{self.size - value_at} present)")

    def element_header(self, pos: int, header: bytes, implicit: bool) -> tuple[bytes | None, int, int]:
        """(VR or None for implicit VR, value length, value offset) of the element whose first 8 bytes are
        ``header``."""
        if implicit:
            return None, struct.unpack(self.endian + "L", header[4:8])[0], pos + 8
        vr = header[4:6]
        if vr in LONG_VRS:
            extra = self._read(pos + 8, 4)
            if len(extra) < 4:
                raise cut_short("the end of its last data element")
            return vr, struct.unpack(self.endian + "L", extra)[0], pos + 12
        if vr.isalpha():  # a VR this walk does not know is read with a 2-byte length, as pydicom does
            return vr, struct.unpack(self.endian + "H", header[6:8])[0], pos + 8
        # an implicit VR element inside an explicit VR data set: pydicom reads it so, and so do we
        return None, struct.unpack(self.endian + "L", header[4:8])[0], pos + 8

    def _undefined(self, tag: int, vr: bytes | None, pos: int, implicit: bool, depth: int, sane: bool) -> int:
        """Skip an element of undefined length (a sequence, or encapsulated image data): its end."""
        # encapsulated image data; anything else, UN included (PS3.5 6.2.2), is a sequence, as pydicom reads it
        fragments = vr in (b"OB", b"OW") or (vr is None and tag == PIXEL_DATA)
        what = "the end of its image data" if fragments else "the end of a sequence"
        while True:
            self._count()
            header = self._read(pos, 8)
            if len(header) < 8:
                if sane:
                    raise cut_short(what)
                raise invalid(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of undefined length never ends")
            group, element, length = struct.unpack(self.endian + "HHL", header)
            item = group << 16 | element
            if item == SEQUENCE_DELIMITER:
                return pos + 8
            if item != ITEM:
                raise invalid(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of undefined length holds "
                               f"something other than items at byte {pos}")
            if length == UNDEFINED_LENGTH:
                if fragments:
                    raise invalid("a fragment of its compressed image data has no length")
                pos = self.dataset(pos + 8, self._item_implicit(pos + 8, implicit), depth=depth + 1,
                                   delimited=True)
            elif pos + 8 + length > self.size:
                if sane:
                    raise cut_short(what)
                raise invalid(f"an item at byte {pos} declares {length} bytes, more than the file holds")
            else:
                if not fragments and length:  # pydicom reads what is inside: so must this walk
                    self.dataset(pos + 8, self._item_implicit(pos + 8, implicit), end=pos + 8 + length,
                                 depth=depth + 1)
                pos += 8 + length

    def _item_implicit(self, pos: int, implicit: bool) -> bool:
        """Items of an explicit VR data set may be implicit VR (PS3.5 6.2.2, UN sequences); never the reverse."""
        if implicit:
            return True
        vr = self._read(pos + 4, 2)
        return not (vr.isalpha() and vr.isupper())


def walk(f: BinaryIO, size: int, meta: FileMeta | None) -> PixelOverrun | None:
    """TRUNCATED, INVALID_HEADER or NOT_DICOM from the element structure alone (see :class:`_Walk`); native
    Pixel Data running off the end is returned, to be judged against the image size."""
    start = meta.dataset_offset if meta is not None else 0
    f.seek(start)
    first = f.read(8)
    if meta is None and not _is_dataset_start(first):
        raise not_dicom()
    if meta is None or not meta.transfer_syntax:
        implicit, little = _guess_encoding(first)
    else:
        implicit, little = _encoding(UID(meta.transfer_syntax), first)
    walker = _Walk(f, size, little)
    walker.dataset(start, implicit)
    return walker.pixel_overrun



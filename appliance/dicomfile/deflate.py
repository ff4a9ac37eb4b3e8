"""Deflated Explicit VR Little Endian files inflated once, in bounded memory, under a size and ratio cap.

The inflated file is the same data set without the deflate, labelled Explicit VR Little Endian (PS3.5
A.5: deflate is applied to the Explicit VR Little Endian encoding), so nothing downstream ever inflates
it again and a Deflate bomb never reaches pydicom, which inflates a whole data set in memory.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import ExplicitVRLittleEndian

from appliance.dicomfile.structure import MAGIC, PREAMBLE_LENGTH, FileMeta, cut_short, invalid
from appliance.errors import InstanceRejected, ReasonCode

# a Deflated data set may unpack to this many times its compressed size (real CT deflates 2-5:1), and to at
# least MIN_INFLATE_ALLOWANCE whatever its ratio (small headers compress far better than images)
MAX_INFLATE_RATIO = 200.0
MIN_INFLATE_ALLOWANCE = 64 * 2**20
CHUNK = 1024 * 1024


def inflate(path: Path, meta: FileMeta, max_bytes: int, max_ratio: float) -> Path:
    """Write the data set of the Deflated file ``path`` inflated, as Explicit VR Little Endian, beside it.

    Memory stays at a few MiB whatever the file holds; refused beyond ``max_bytes`` unpacked or a
    compression ratio above ``max_ratio`` (beyond a 64 MiB allowance for small files).
    """
    size = os.path.getsize(path)
    limit = min(max_bytes, max(MIN_INFLATE_ALLOWANCE, int((size - meta.dataset_offset) * max_ratio)))
    out = path.with_name(path.name + ".inflated")
    try:
        with open(path, "rb") as src, open(out, "xb") as dst:
            preamble = src.read(PREAMBLE_LENGTH) if meta.start else b""
            dst.write(preamble.ljust(PREAMBLE_LENGTH, b"\0") + MAGIC + _relabelled_meta(src, meta))
            src.seek(meta.dataset_offset)
            _inflate_stream(src, dst, limit)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _inflate_stream(src: BinaryIO, dst: BinaryIO, limit: int) -> None:
    """Inflate ``src`` (raw Deflate) into ``dst``, one MiB at a time, refusing beyond ``limit`` bytes."""
    inflater, written = zlib.decompressobj(-zlib.MAX_WBITS), 0
    pending = b""
    try:
        while not inflater.eof:
            data = pending or src.read(CHUNK)
            out = inflater.decompress(data, CHUNK)  # b"" drains what zlib still holds once the input is read
            pending = inflater.unconsumed_tail
            if not data and not out:
                break
            written += len(out)
            if written > limit:
                raise InstanceRejected(ReasonCode.FILE_TOO_LARGE,
                                       f"The file is compressed (Deflated) and unpacks to more than the "
                                       f"{limit // 2**20} MiB this appliance accepts for it: a zip bomb or a "
                                       "damaged file.")
            dst.write(out)
    except zlib.error as exc:
        raise InstanceRejected(ReasonCode.INVALID_HEADER, "The file's compressed (Deflated) data set is damaged "
                                                          "and cannot be unpacked.") from exc
    if not inflater.eof:
        raise cut_short("the end of its compressed (Deflated) data set")


def _relabelled_meta(src: BinaryIO, meta: FileMeta) -> bytes:
    """The file meta bytes with the transfer syntax changed to Explicit VR Little Endian, lengths adjusted."""
    src.seek(meta.start)
    raw = bytearray(src.read(meta.dataset_offset - meta.start))
    if meta.transfer_syntax_at is None:
        raise invalid("its file meta header names no transfer syntax")
    at, old_length = (meta.transfer_syntax_at[0] - meta.start, meta.transfer_syntax_at[1])
    value = str(ExplicitVRLittleEndian).encode() + b"\0"  # padded to an even length
    raw[at + 6:at + 8 + old_length] = struct.pack("<H", len(value)) + value
    if meta.group_length_at is not None:
        g = meta.group_length_at - meta.start
        group_length = struct.unpack("<L", raw[g:g + 4])[0] + len(value) - old_length
        raw[g:g + 4] = struct.pack("<L", group_length)
    return bytes(raw)



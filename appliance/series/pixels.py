"""Decode CT frames into Hounsfield units, in parallel where the decoder holds the GIL.

Native (uncompressed) pixel data is read straight from its byte offset in
the file. Compressed transfer syntaxes (JPEG 2000, JPEG Lossless, JPEG-LS,
RLE) are decoded by pydicom's pixel backends (pylibjpeg and its plugins) in a
process pool: those decoders hold the GIL, so threads would not help.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
import pydicom.pixels
from pydicom.uid import UID

from appliance.errors import ReasonCode, SeriesRejected
from appliance.series.headers import Frame

HU_MIN, HU_MAX = -32768, 32767
# below this many compressed frames a process pool costs more than it saves
MIN_FRAMES_FOR_POOL = 8
PROGRESS_CHUNK = 32  # slices decoded between two progress reports when decoding in this process


def _native_dtype(frame: Frame, little_endian: bool) -> np.dtype:
    kind = "i" if frame.pixel_representation else "u"
    if frame.bits_allocated not in (8, 16, 32):
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                             f"Instance {frame.sop_instance_uid} uses {frame.bits_allocated}-bit pixels, "
                             "which CT never does.")
    return np.dtype(f"{'<' if little_endian else '>'}{kind}{frame.bits_allocated // 8}")


def _sign_extend(raw: np.ndarray, frame: Frame) -> np.ndarray:
    if frame.pixel_representation and frame.bits_stored < frame.bits_allocated:
        shift = frame.bits_allocated - frame.bits_stored
        raw = (raw.astype(np.int32) << shift) >> shift
    return raw


def _to_hu(raw: np.ndarray, frame: Frame, out: np.ndarray) -> None:
    """Write ``raw * RescaleSlope + RescaleIntercept`` (HU) into the int16 slice ``out``."""
    raw = _sign_extend(raw, frame)
    slope, intercept = frame.rescale_slope, frame.rescale_intercept
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                             f"Instance {frame.sop_instance_uid}: the rescale slope or intercept is not a finite "
                             "number, so its pixels have no Hounsfield units.")
    if slope == 1 and intercept == int(intercept):
        low, high = int(raw.min()) + int(intercept), int(raw.max()) + int(intercept)
        if HU_MIN <= low and high <= HU_MAX:  # the common case: one pass, no temporary
            np.add(raw, np.int32(intercept), out=out, casting="unsafe")
            return
        hu = raw.astype(np.int32) + int(intercept)
    else:
        hu = np.rint(raw.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    np.clip(hu, HU_MIN, HU_MAX, out=hu)
    out[...] = hu


def _read_native(frame: Frame) -> np.ndarray:
    uid = UID(frame.transfer_syntax_uid)
    dtype = _native_dtype(frame, uid.is_little_endian)
    count = frame.rows * frame.columns
    raw = np.fromfile(frame.path, dtype=dtype, count=count, offset=frame.pixel_data_offset or 0)
    if raw.size != count:
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                             f"Instance {frame.sop_instance_uid}: the image data ends early; the file is damaged.")
    return raw.reshape(frame.rows, frame.columns)


def _decode_compressed(frame: Frame) -> np.ndarray:
    try:
        arr = pydicom.pixels.pixel_array(frame.path, index=frame.frame_index)
    except Exception as exc:  # decoders raise many kinds on damaged data
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                             f"Instance {frame.sop_instance_uid}: the compressed image data cannot be decoded; "
                             f"the file is damaged ({type(exc).__name__}).") from exc
    if arr.shape != (frame.rows, frame.columns):
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA,
                             f"Instance {frame.sop_instance_uid} decodes to {arr.shape}, not the "
                             f"{frame.rows} x {frame.columns} it declares.")
    return arr


def read_frame(frame: Frame) -> np.ndarray:
    """The stored pixel values of one frame (before rescale)."""
    if frame.pixel_data_offset is not None and frame.frame_index is None:
        return _read_native(frame)
    return _decode_compressed(frame)


def _decode_chunk(frames: Sequence[Frame]) -> np.ndarray:
    out = np.empty((len(frames), frames[0].rows, frames[0].columns), dtype=np.int16)
    for k, frame in enumerate(frames):
        _to_hu(read_frame(frame), frame, out[k])
    return out


def check_decodable(transfer_syntax_uids: set[str]) -> None:
    """Raise UNSUPPORTED_TRANSFER_SYNTAX unless every transfer syntax can be decoded here."""
    for uid in map(UID, transfer_syntax_uids):
        if not uid.is_compressed:
            continue
        try:
            decoder = pydicom.pixels.get_decoder(uid)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            raise SeriesRejected(ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX,
                                 f"The images are compressed as '{uid.name}', which this appliance cannot decode. "
                                 "Ask the scanner or PACS to send them uncompressed or as JPEG 2000.")


def decode_volume(frames: Sequence[Frame], workers: int = 0,
                  progress: Callable[[float], None] | None = None) -> np.ndarray:
    """Decode ``frames`` (already in slice order) into one int16 HU array (slices, rows, columns).

    ``progress(fraction)`` is called as chunks of slices are decoded (a long decode keeps its job alive).
    """
    shape = {(f.rows, f.columns) for f in frames}
    if len(shape) != 1:
        raise SeriesRejected(ReasonCode.CORRUPT_PIXEL_DATA, "The images of this series differ in size.")
    check_decodable({f.transfer_syntax_uid for f in frames})
    compressed = sum(1 for f in frames if f.pixel_data_offset is None)
    workers = workers or os.cpu_count() or 1
    volume = np.empty((len(frames), *shape.pop()), dtype=np.int16)
    if compressed < MIN_FRAMES_FOR_POOL or workers == 1:
        for start in range(0, len(frames), PROGRESS_CHUNK):
            volume[start:start + PROGRESS_CHUNK] = _decode_chunk(frames[start:start + PROGRESS_CHUNK])
            if progress is not None:
                progress(min(1.0, (start + PROGRESS_CHUNK) / len(frames)))
        return volume
    step = max(1, -(-len(frames) // (workers * 4)))
    chunks = [(i, frames[i:i + step]) for i in range(0, len(frames), step)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        for (start, chunk), decoded in zip(chunks, pool.map(_decode_chunk, [c for _, c in chunks])):
            volume[start:start + len(chunk)] = decoded
            if progress is not None:
                progress((start + len(chunk)) / len(frames))
    return volume

"""Hostile files through the importer: mutants of real and synthetic CT, counted by what became of them.

Mutants are made from real CT in ../shared/data/ct (when present) and small synthetic series of every
transfer syntax the appliance writes (explicit, implicit, RLE, JPEG 2000, and Deflated made by pydicom):
bit flips, truncations, length-field edits, VR swaps, odd sizes, wrong transfer-syntax labels, "DICM"
junk, broken compressed frames and Deflate damage (bombs included). Each batch runs in a child process
with its own data directory and imports its mutants with good files in between (one good file after every
ninth mutant, from a series that is never mutated); each file's time and peak Python memory (tracemalloc)
are measured, and a child that stops answering is killed and its file counted as a hang.

Prints one table: mutants tried, crashes (unhandled exceptions), hangs over 5 s, peak memory per file,
files stored, files quarantined by reason, good files stored, scratch files left behind.
Run: .venv/bin/python bench/fuzz_import.py --mutants 10000 [--seed 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO.parent / "shared" / "data" / "ct"
HANG_SECONDS = 5.0
MEMORY_LIMIT_MB = 256.0  # peak Python memory one file may cost
STALL_SECONDS = 120.0  # a child with no result for this long is killed; its current file is a hang
BATCH = 100
GOOD_EVERY = 10
KINDS = ("bitflip", "truncate", "length", "vr_swap", "odd_size", "ts_label", "dicm_junk", "broken_frames",
         "deflate")
VRS = (b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
       b"OL", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US",
       b"UT", b"OV", b"SV", b"UV")
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
WRONG_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                  "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80",
                  "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.999", "1.2.3.4.5.6", "\xfe\xffjunk", "")
DEFLATED = "1.2.840.10008.1.2.1.99"


# --- sources ------------------------------------------------------------------------------------------------

def real_sources() -> list[Path]:
    """A few files of each real CT series in ../shared/data/ct; none when it is absent."""
    picks = []
    for folder, count in (("tcia-pancreas-ct-chest-abdomen", 2), ("totalseg-example-j2k", 2),
                          ("dcm-qa-ct-ge", 2), ("dcmqi-ct-3slice", 1)):
        files = sorted(p for p in (REAL_CT / folder).glob("*") if p.is_file() and "LICENSE" not in p.name)
        picks += files[:count]
    return picks


def synthetic_sources(out: Path) -> list[Path]:
    """Three 64 x 64 slices in each transfer syntax the appliance writes, and a Deflated copy of one."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from appliance.synth.writer import SynthOptions, write_series

    files = []
    for seed, syntax in enumerate(("explicit", "implicit", "rle", "jpeg2000"), start=40):
        folder = out / syntax
        write_series(folder, SynthOptions(slices=3, size=64, seed=seed, transfer_syntax=syntax))
        files += sorted(folder.glob("*.dcm"))[:2]
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(out / "deflated.dcm", enforce_file_format=True)
    return [*files, out / "deflated.dcm"]


def good_files(out: Path) -> list[Path]:
    """A synthetic series that is never mutated: every one of its files must be stored."""
    from appliance.synth.writer import SynthOptions, write_series

    write_series(out, SynthOptions(slices=12, size=64, seed=97))
    return sorted(out.glob("*.dcm"))


# --- the structure of a source, for targeted mutations ----------------------------------------------------

def describe(path: Path) -> dict:
    """Offsets of a source's elements: (value offset, length-field offset, length size, VR offset or -1)."""
    import pydicom
    from pydicom.filereader import data_element_generator

    data = path.read_bytes()
    info: dict = {"elements": [], "syntax_at": None, "pixels": None, "meta_end": 0}
    if data[128:132] != b"DICM":
        return info
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    syntax = ds.file_meta.TransferSyntaxUID
    with open(path, "rb") as f:
        f.seek(132)
        for raw in data_element_generator(f, False, True, stop_when=lambda tag, vr, length: tag.group != 2):
            info["elements"].append(_offsets(raw, data))
            if raw.tag == 0x00020010:
                info["syntax_at"] = (raw.value_tell, raw.length)
        info["meta_end"] = f.tell()
        if syntax == DEFLATED:
            return info
        f.seek(info["meta_end"])
        for raw in data_element_generator(f, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=64):
            if not hasattr(raw, "value_tell") or raw.value_tell is None:
                continue
            info["elements"].append(_offsets(raw, data))
            if raw.tag == 0x7FE00010:
                info["pixels"] = (raw.value_tell, raw.length == 0xFFFFFFFF)
    return info


def _offsets(raw, data: bytes) -> tuple[int, int, int, int]:
    tell = raw.value_tell
    if raw.is_implicit_VR:
        return tell, tell - 4, 4, -1
    if data[tell - 8:tell - 6] in LONG_VRS and data[tell - 6:tell - 4] == b"\0\0":
        return tell, tell - 4, 4, tell - 8
    return tell, tell - 2, 2, tell - 4


# --- mutations -----------------------------------------------------------------------------------------------

def _header_end(data: bytes, info: dict) -> int:
    return info["pixels"][0] if info["pixels"] else min(len(data), 4096)


def bitflip(data: bytearray, rng: random.Random, info: dict) -> bytes:
    end = _header_end(data, info) if rng.random() < 0.7 else len(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8, 32))):
        at = rng.randrange(max(end, 1))
        data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


def truncate(data: bytearray, rng: random.Random, info: dict) -> bytes:
    where = rng.random()
    if where < 0.5:
        return bytes(data[:rng.randrange(_header_end(data, info))])
    if where < 0.75:
        return bytes(data[:rng.randrange(_header_end(data, info), len(data))])
    return bytes(data[:len(data) - rng.randrange(1, 64)])


def length(data: bytearray, rng: random.Random, info: dict) -> bytes:
    if not info["elements"]:
        return bitflip(data, rng, info)
    tell, at, size, _ = rng.choice(info["elements"])
    old = int.from_bytes(data[at:at + size], "little")
    new = rng.choice((0, 1, old + 1, max(old - 1, 0), old * 2, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFE,
                      rng.randrange(2**32), len(data), len(data) - tell + 1))
    data[at:at + size] = (new & (2 ** (8 * size) - 1)).to_bytes(size, "little")
    return bytes(data)


def vr_swap(data: bytearray, rng: random.Random, info: dict) -> bytes:
    explicit = [e for e in info["elements"] if e[3] >= 0]
    if not explicit:
        return length(data, rng, info)
    at = rng.choice(explicit)[3]
    data[at:at + 2] = rng.choice((*VRS, b"ZZ", b"\0\0", b"ox", b"\xff\xff"))
    return bytes(data)


def odd_size(data: bytearray, rng: random.Random, info: dict) -> bytes:
    choice, at = rng.randrange(4), rng.randrange(len(data))
    if choice == 0:
        return bytes(data[:at] + rng.randbytes(rng.randrange(1, 4)) + data[at:])
    if choice == 1:
        return bytes(data[:at] + data[at + rng.randrange(1, 4):])
    if choice == 2:
        return bytes(data) + rng.randbytes(rng.choice((1, 3, 7, 4097)))
    return bytes(data[:rng.choice((1, 2, 3, 127, 131, 132, 133, 135, 139))])


def ts_label(data: bytearray, rng: random.Random, info: dict) -> bytes:
    if not info["syntax_at"]:
        return bitflip(data, rng, info)
    return relabel(data, info, rng.choice(WRONG_SYNTAXES))


def relabel(data: bytearray, info: dict, syntax: str) -> bytes:
    """``data`` with its meta's Transfer Syntax UID replaced, element and group lengths kept consistent."""
    tell, old = info["syntax_at"]
    value = syntax.encode("latin-1")
    value += b"\0" * (len(value) % 2)
    out = data[:tell - 2] + struct.pack("<H", len(value)) + value + data[tell + old:]
    if out[132:136] == b"\x02\x00\x00\x00":  # (0002,0000) group length, explicit VR UL
        group = struct.unpack("<L", out[140:144])[0] + len(value) - old
        out[140:144] = struct.pack("<L", group & 0xFFFFFFFF)
    return bytes(out)


def dicm_junk(data: bytearray, rng: random.Random, info: dict) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return bytes(128) + b"DICM" + rng.randbytes(rng.randrange(1, 70_000))
    if choice == 1:
        return bytes(data[:132]) + rng.randbytes(200) + bytes(data[332:])
    if choice == 2:
        return bytes(data[rng.choice((128, 132)):])
    if choice == 3:
        return rng.randbytes(128) + b"DICM" + bytes(data[132:info["meta_end"] or 132]) + rng.randbytes(5000)
    return bytes(128) + b"DICM"


def broken_frames(data: bytearray, rng: random.Random, info: dict) -> bytes:
    if not info["pixels"]:
        return bitflip(data, rng, info)
    start, encapsulated = info["pixels"]
    if not encapsulated:  # garbage pixels in a sound file
        for _ in range(16):
            data[rng.randrange(start, len(data))] = rng.randrange(256)
        return bytes(data)
    items = _items(data, start)
    choice = rng.randrange(5)
    if choice == 0 and items:  # overwrite part of a fragment
        at, size = rng.choice(items)
        for _ in range(min(size, 64)):
            data[at + 8 + rng.randrange(max(size, 1))] = rng.randrange(256)
    elif choice == 1 and items:  # a fragment length that lies
        at, size = rng.choice(items)
        data[at + 4:at + 8] = struct.pack("<L", rng.choice((0, size + 1, size * 4, 0xFFFFFFFF, 7)))
    elif choice == 2:  # no sequence delimiter
        return bytes(data[:-8]) if data.endswith(b"\xfe\xff\xdd\xe0\0\0\0\0") else bytes(data[:-4])
    elif choice == 3 and items:  # a fragment cut out
        at, size = rng.choice(items)
        return bytes(data[:at] + data[at + 8 + size:])
    else:  # an item tag broken
        at = rng.choice(items)[0] if items else start
        data[at:at + 4] = rng.randbytes(4)
    return bytes(data)


def _items(data: bytearray, pos: int) -> list[tuple[int, int]]:
    items = []
    while pos + 8 <= len(data) and data[pos:pos + 4] == b"\xfe\xff\x00\xe0":
        size = struct.unpack("<L", data[pos + 4:pos + 8])[0]
        items.append((pos, size))
        pos += 8 + size
    return items


def deflate(data: bytearray, rng: random.Random, info: dict) -> bytes:
    """Deflate damage and Deflate bombs; the source (any) is deflated here first when it is not already."""
    choice = rng.randrange(5)
    if choice == 0:
        return deflate_bomb(rng.choice((64, 256, 1024)) * 2**20)
    if not info["syntax_at"]:
        return bitflip(data, rng, info)
    meta_end = info["meta_end"]
    if choice == 1 and info["pixels"] is not None:  # a sound file relabelled Deflated: not a Deflate stream
        return relabel(data, info, DEFLATED)
    deflated = bytearray(relabel(data, info, DEFLATED)) if info["pixels"] is not None else bytearray(data)
    start = meta_end + len(deflated) - len(data)
    if info["pixels"] is not None:
        squeeze = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated[start:] = squeeze.compress(bytes(data[meta_end:])) + squeeze.flush()
    if choice == 2:  # bits flipped in the compressed stream
        for _ in range(rng.choice((1, 4, 16))):
            deflated[rng.randrange(start, len(deflated))] ^= 1 << rng.randrange(8)
    elif choice == 3:  # the compressed stream cut short
        return bytes(deflated[:rng.randrange(start, len(deflated))])
    return bytes(deflated)


_BOMBS: dict[int, bytes] = {}


def deflate_bomb(size: int) -> bytes:
    """A Deflated CT header whose pixel data (``size`` bytes of zeros, as declared) compresses ~1000:1."""
    if size in _BOMBS:
        return _BOMBS[size]
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = size // (4096 * 4096 * 2)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 16, 16, 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    header = io.BytesIO()
    ds.save_as(header, enforce_file_format=True)
    raw = header.getvalue()
    meta_end = raw.index(b"\x08\x00\x16\x00")  # the data set starts with (0008,0016)
    info = {"syntax_at": (raw.index(b"1.2.840.10008.1.2.1"), 20), "meta_end": meta_end}
    out = bytearray(relabel(bytearray(raw), info, DEFLATED))
    body = raw[meta_end:] + b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<L", size)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = out[:len(out) - (len(raw) - meta_end)] + squeeze.compress(body)
    zeros = bytes(2**20)
    for _ in range(size // len(zeros)):
        out += squeeze.compress(zeros)
    out += squeeze.flush()
    _BOMBS[size] = bytes(out)
    return _BOMBS[size]


MUTATORS = {"bitflip": bitflip, "truncate": truncate, "length": length, "vr_swap": vr_swap, "odd_size": odd_size,
            "ts_label": ts_label, "dicm_junk": dicm_junk, "broken_frames": broken_frames, "deflate": deflate}


def make_mutant(index: int, seed: int, sources: list[Path], infos: dict, out: Path) -> tuple[Path, str, str]:
    rng = random.Random(seed * 1_000_003 + index)
    source, kind = rng.choice(sources), KINDS[index % len(KINDS)]
    if str(source) not in infos:
        infos[str(source)] = describe(source)
    data = MUTATORS[kind](bytearray(source.read_bytes()), rng, infos[str(source)])
    path = out / f"m{index:06d}-{kind}.dcm"
    path.write_bytes(data)
    return path, kind, source.name


# --- one batch, in a child process ------------------------------------------------------------------------

def run_batch(spec: dict) -> None:
    """Import mutants ``spec['start']``.. with good files in between; one JSON line per file to spec['out']."""
    import logging
    import tracemalloc
    import warnings

    from appliance import config
    from appliance.ingest.importer import import_paths
    from appliance.store.instances import open_store

    warnings.simplefilter("ignore")  # pydicom warns about every odd value; the results say what matters
    logging.basicConfig(level=logging.ERROR)
    work = Path(spec["work"])
    settings = config.load(environ={}, home=str(work / "home"), disk_low_watermark_mb=spec["watermark_mb"])
    store = open_store(settings)
    sources, good, infos = [Path(p) for p in spec["sources"]], [Path(p) for p in spec["good"]], {}
    files = work / "files"
    files.mkdir(exist_ok=True)
    plan = []
    for n, index in enumerate(range(spec["start"], spec["stop"])):
        plan.append(make_mutant(index, spec["seed"], sources, infos, files) + (index,))
        if n % GOOD_EVERY == GOOD_EVERY - 1:
            plan.append((good[(n // GOOD_EVERY) % len(good)], "good", "good", -1))
    with open(spec["out"], "a") as log:
        tracemalloc.start()
        done = 0
        while done < len(plan):
            done = _import_from(store, settings, plan, done, log, import_paths, tracemalloc)
    leftovers = [p.name for p in store.tmp_dir.iterdir()]
    with open(spec["out"], "a") as log:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log.write(json.dumps({"batch_done": True, "scratch_left": leftovers, "peak_rss_mb": rss}) + "\n")


def _import_from(store, settings, plan: list, start: int, log, import_paths, tracemalloc) -> int:
    """Import ``plan[start:]`` as one import; returns where to go on from (past a crash)."""
    position, before = [start], [0, 0, 0]
    clock = [time.perf_counter()]
    tracemalloc.reset_peak()
    log.write(json.dumps({"starting": plan[start][3], "kind": plan[start][1]}) + "\n")
    log.flush()

    def progress(summary) -> None:
        if position[0] >= len(plan):
            return  # a mutant that happened to be a zip archive: its members counted as one file
        path, kind, source, index = plan[position[0]]
        now = time.perf_counter()
        counts = [summary.stored, summary.duplicates, len(summary.quarantined)]
        delta = [a - b for a, b in zip(counts, before, strict=True)]
        outcome = ("stored" if delta[0] else "duplicate" if delta[1]
                   else "quarantined:" + summary.quarantined[-1]["reason_code"] if delta[2] else "skipped")
        record = {"index": index, "kind": kind, "source": source, "seconds": now - clock[0],
                  "peak_mb": tracemalloc.get_traced_memory()[1] / 2**20, "outcome": outcome}
        before[:] = counts
        position[0] += 1
        if position[0] < len(plan):
            record["next"] = plan[position[0]][3]
        log.write(json.dumps(record) + "\n")
        log.flush()
        if kind != "good":
            path.unlink(missing_ok=True)
        tracemalloc.reset_peak()
        clock[0] = time.perf_counter()

    try:
        import_paths(store, [p[0] for p in plan[start:]], settings, progress=progress)
    except Exception as exc:
        _, kind, source, index = plan[position[0]]
        log.write(json.dumps({"index": index, "kind": kind, "source": source, "outcome": "crash",
                              "seconds": time.perf_counter() - clock[0], "peak_mb": 0.0,
                              "error": "".join(traceback.format_exception_only(exc)).strip()[-300:]}) + "\n")
        log.flush()
        return position[0] + 1
    return len(plan)


# --- the parent: batches, stalls, the table -------------------------------------------------------------

def run_child(spec: dict) -> list[dict]:
    """Run one batch; a child with no new result for STALL_SECONDS is killed and its current file is a hang."""
    out = Path(spec["out"])
    with open(Path(spec["work"]) / "stderr.txt", "w+") as errors:  # a file: a full pipe would stall the child
        child = subprocess.Popen([sys.executable, __file__, "--batch", json.dumps(spec)], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=errors)
        last_size, last_change = -1, time.monotonic()
        while child.poll() is None:
            time.sleep(0.2)
            size = out.stat().st_size if out.exists() else 0
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                child.kill()
                child.wait()
                break
        records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
        errors.seek(0)
        if not any(r.get("batch_done") for r in records):
            records.append(_stalled(records, child.returncode, errors.read()))
    return records


def _stalled(records: list[dict], returncode: int | None, stderr: str) -> dict:
    """The record of the file a child was on when it was killed (a hang) or died (a crash)."""
    files = [r for r in records if "index" in r]
    started = [r for r in records if "starting" in r]
    index = files[-1].get("next") if files and "next" in files[-1] else (started[-1]["starting"] if started else None)
    outcome = "hang" if returncode in (-9, None) else "crash"
    return {"index": index, "kind": "?", "outcome": outcome, "seconds": STALL_SECONDS, "peak_mb": 0.0,
            "error": stderr.strip()[-300:], "batch_done": True, "scratch_left": []}


def fuzz(mutants: int, seed: int, watermark_mb: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fuzz-import-") as tmp:
        root = Path(tmp)
        sources = real_sources() + synthetic_sources(root / "sources")
        good = good_files(root / "good")
        records, t0 = [], time.perf_counter()
        start = 0
        while start < mutants:
            stop = min(start + BATCH, mutants)
            work = root / f"batch-{start:06d}"
            work.mkdir()
            spec = {"work": str(work), "out": str(work / "results.jsonl"), "start": start, "stop": stop,
                    "seed": seed, "sources": [str(p) for p in sources], "good": [str(p) for p in good],
                    "watermark_mb": watermark_mb}
            batch = run_child(spec)
            records += batch
            resumed = [r["index"] for r in batch if r.get("outcome") in ("hang", "crash") and "error" in r
                       and r.get("batch_done")]
            start = (resumed[0] + 1) if resumed and resumed[0] is not None and resumed[0] + 1 < stop else stop
            _remove(work)
        return summarise(records, mutants, seed, len(sources), time.perf_counter() - t0)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def summarise(records: list[dict], mutants: int, seed: int, sources: int, seconds: float) -> dict:
    files = [r for r in records if "outcome" in r and "index" in r]
    tried = [r for r in files if r["kind"] != "good"]
    good = [r for r in files if r["kind"] == "good"]
    reasons = Counter(r["outcome"].split(":", 1)[1] for r in tried if r["outcome"].startswith("quarantined:"))
    peaks = sorted(r["peak_mb"] for r in files)
    return {
        "mutants": mutants, "seed": seed, "sources": sources, "tried": len(tried), "seconds": round(seconds, 1),
        "crashes": sum(r["outcome"] == "crash" for r in files),
        "hangs": sum(r["outcome"] == "hang" or r["seconds"] > HANG_SECONDS for r in files),
        "slowest_s": round(max((r["seconds"] for r in files), default=0.0), 2),
        "peak_mb_max": round(peaks[-1], 1) if peaks else 0.0,
        "peak_mb_median": round(peaks[len(peaks) // 2], 2) if peaks else 0.0,
        "peak_rss_mb": round(max((r.get("peak_rss_mb", 0) for r in records), default=0), 0),
        "stored": sum(r["outcome"] == "stored" for r in tried),
        "duplicates": sum(r["outcome"] == "duplicate" for r in tried),
        "quarantined": sum(reasons.values()), "reasons": dict(reasons.most_common()),
        "good": len(good), "good_stored": sum(r["outcome"] == "stored" for r in good),
        "scratch_left": sum(len(r.get("scratch_left", [])) for r in records),
        "failures": [r for r in files if r["outcome"] in ("crash", "hang") or r["seconds"] > HANG_SECONDS
                     or r["peak_mb"] > MEMORY_LIMIT_MB][:20],
        "by_kind": {k: dict(Counter(r["outcome"].split(":")[0] for r in tried if r["kind"] == k)) for k in KINDS},
    }


def table(doc: dict) -> str:
    rows = [("mutants tried", doc["tried"]), ("crashes (unhandled exceptions)", doc["crashes"]),
            (f"hangs (> {HANG_SECONDS:.0f} s)", doc["hangs"]), ("slowest file (s)", doc["slowest_s"]),
            ("peak memory per file, max (MB)", doc["peak_mb_max"]),
            ("peak memory per file, median (MB)", doc["peak_mb_median"]),
            ("peak RSS of a batch process (MB)", doc["peak_rss_mb"]),
            ("stored", doc["stored"]), ("duplicates of a stored file", doc["duplicates"]),
            ("quarantined", doc["quarantined"])]
    rows += [(f"  {code}", n) for code, n in doc["reasons"].items()]
    rows += [("good files stored", f"{doc['good_stored']}/{doc['good']}"),
             ("scratch files left behind", doc["scratch_left"])]
    width = max(len(r[0]) for r in rows) + 2
    title = (f"hostile-file import: {doc['mutants']} mutants (seed {doc['seed']}) of {doc['sources']} sources, "
             f"{doc['seconds']} s")
    lines = [title, "-" * (width + 12)]
    lines += [f"{name:<{width}}{value:>12}" for name, value in rows]
    for failure in doc["failures"]:
        lines.append(f"! mutant {failure['index']} ({failure['kind']}, {failure.get('source', '?')}): "
                     f"{failure['outcome']} {failure['seconds']:.1f} s {failure['peak_mb']:.0f} MB "
                     f"{failure.get('error', '')}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mutants", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--watermark-mb", type=int, default=64,
                        help="disk_low_watermark_mb for the imports (small, so a busy disk does not stop the run)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch:
        run_batch(json.loads(args.batch))
        return 0
    doc = fuzz(args.mutants, args.seed, args.watermark_mb)
    print(json.dumps(doc, indent=2) if args.json else table(doc))
    ok = not doc["crashes"] and not doc["hangs"] and doc["peak_mb_max"] < MEMORY_LIMIT_MB
    return 0 if ok and doc["good_stored"] == doc["good"] and not doc["scratch_left"] else 1


if __name__ == "__main__":
    sys.exit(main())

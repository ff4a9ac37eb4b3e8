"""Hostile and odd files: every bad file is a quarantine row with a reason true of it, the import goes on,
and time and memory stay bounded (mutants from bench/fuzz_import.py, pydicom's and pynetdicom's test files)."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pynetdicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from appliance.dicomfile import header as header_module
from appliance.dicomfile.header import read_header
from appliance.errors import InstanceRejected
from appliance.ingest.importer import import_paths, is_media_directory
from appliance.series.headers import read_frames
from appliance.store import instances

from .conftest import CT, REPO

FUZZ = REPO / "bench" / "fuzz_import.py"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYNETDICOM_FILES = Path(pynetdicom.__file__).parent / "tests" / "dicom_files"


def _bench():
    spec = importlib.util.spec_from_file_location("fuzz_import", FUZZ)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reasons(summary) -> dict[str, str]:
    return {Path(q["file"]).name: q["reason_code"] for q in summary.quarantined}


def _relabel(source: Path, out: Path, syntax: str) -> Path:
    """``source`` with its meta's Transfer Syntax UID replaced, bytes otherwise untouched."""
    data = bytearray(source.read_bytes())
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    old = str(ds.file_meta.TransferSyntaxUID).encode()
    old += b"\0" * (len(old) % 2)
    info = {"syntax_at": (data.index(b"\x02\x00\x10\x00UI") + 8, len(old)), "meta_end": 0}
    out.write_bytes(_bench().relabel(data, info, syntax))
    return out


def _with_vr(source: Path, out: Path, tag: bytes, vr: bytes) -> Path:
    """``source`` (explicit VR) with the VR of the element ``tag`` (its 4 bytes as written) replaced."""
    data = bytearray(source.read_bytes())
    at = data.index(tag) + 4
    data[at:at + 2] = vr
    out.write_bytes(bytes(data))
    return out


# --- the fuzz harness, bounded ------------------------------------------------------------------------------

@pytest.mark.slow
def test_500_seeded_mutants_never_crash_hang_or_exhaust_memory_and_good_files_are_all_stored():
    run = subprocess.run([sys.executable, str(FUZZ), "--mutants", "500", "--seed", "1", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    doc = json.loads(run.stdout)
    assert doc["tried"] == 500 and doc["sources"] >= 9  # 16 with the real CT in ../shared/data
    assert doc["crashes"] == 0 and doc["hangs"] == 0, doc["failures"]
    assert doc["peak_mb_max"] < 256
    assert doc["good"] == 50 and doc["good_stored"] == 50
    assert doc["scratch_left"] == 0
    assert doc["stored"] + doc["duplicates"] + doc["quarantined"] == 500
    assert {"TRUNCATED", "INVALID_HEADER", "UNSUPPORTED_TRANSFER_SYNTAX", "FILE_TOO_LARGE"} <= doc["reasons"].keys()


def test_analyze_with_mutants_among_good_slices_analyses_the_good_series(synthetic_chest, tmp_path):
    """Was: a traceback (exit 1), sometimes with none of the good files stored."""
    bench = _bench()
    sources = bench.synthetic_sources(tmp_path / "sources")
    folder = tmp_path / "in"
    folder.mkdir()
    for path in synthetic_chest.glob("*.dcm"):
        (folder / path.name).write_bytes(path.read_bytes())
    infos: dict = {}
    for index in range(100):
        bench.make_mutant(index, 7, [s for s in sources if "deflated" not in s.name], infos, folder)
    env = dict(os.environ, APPLIANCE_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "analyze", str(folder), "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert "Traceback" not in run.stderr
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    good_series = pydicom.dcmread(next(synthetic_chest.glob("*.dcm"))).SeriesInstanceUID
    series = {s["series_instance_uid"]: s for study in doc["studies"] for s in study["series"]}
    assert series[good_series]["status"] == "analyzed" and series[good_series]["slices"] == 40
    assert all(q["reason_code"] and q["reason"] for q in doc["import"]["quarantined"])


# --- what crashed, one test each --------------------------------------------------------------------------------

def test_transfer_syntax_label_that_is_no_transfer_syntax_is_quarantined(store, settings, synthetic_chest,
                                                                          tmp_path):
    """Was: ValueError "UID is not a transfer syntax"."""
    source = min(synthetic_chest.glob("*.dcm"))
    a = _relabel(source, tmp_path / "sop-class-as-syntax.dcm", "1.2.840.10008.5.1.4.1.1.2")
    b = _relabel(source, tmp_path / "private-syntax.dcm", "1.2.3.4.5")
    summary = import_paths(store, [a, b], settings)
    assert _reasons(summary) == {a.name: "UNSUPPORTED_TRANSFER_SYNTAX", b.name: "UNSUPPORTED_TRANSFER_SYNTAX"}
    assert "1.2.3.4.5" in summary.quarantined[1]["reason"]


def test_unknown_vr_is_quarantined_as_an_invalid_header(store, settings, synthetic_chest, tmp_path):
    """Was: NotImplementedError for an unknown VR."""
    rows = _with_vr(min(synthetic_chest.glob("*.dcm")), tmp_path / "rows-zz.dcm", b"\x28\x00\x10\x00US", b"ZZ")
    summary = import_paths(store, [rows], settings)
    assert _reasons(summary) == {rows.name: "INVALID_HEADER"}
    assert "Rows" in summary.quarantined[0]["reason"]


def test_value_of_the_wrong_length_for_its_vr_is_quarantined_or_ignored(store, settings, synthetic_chest, tmp_path):
    """Was: pydicom's BytesLengthException. An image size that cannot be read refuses the file; a name that
    cannot be read is left empty rather than refusing the image."""
    files = sorted(synthetic_chest.glob("*.dcm"))
    rows = _with_vr(files[0], tmp_path / "rows-fd.dcm", b"\x28\x00\x10\x00US", b"FD")
    name = _with_vr(files[1], tmp_path / "name-fd.dcm", b"\x10\x00\x10\x00PN", b"FD")
    summary = import_paths(store, [rows, name], settings)
    assert _reasons(summary) == {rows.name: "INVALID_HEADER"} and summary.stored == 1
    assert store.db.execute("SELECT patient_name FROM patients").fetchone()[0] == ""


def test_an_unforeseen_reader_failure_is_an_invalid_header_never_a_crash(store, settings, synthetic_chest,
                                                                         monkeypatch):
    def explode(*args, **kwargs):
        raise RecursionError("deeply broken")

    monkeypatch.setattr(header_module.pydicom, "dcmread", explode)
    summary = import_paths(store, sorted(synthetic_chest.glob("*.dcm"))[:2], settings)
    assert [q["reason_code"] for q in summary.quarantined] == ["INVALID_HEADER", "INVALID_HEADER"]
    assert "RecursionError" in summary.quarantined[0]["reason"]
    assert not list(store.tmp_dir.iterdir())


def test_a_failure_while_filing_a_file_leaves_no_part_file(store, settings, synthetic_chest, monkeypatch):
    """Was: every crash left its scratch ``.part`` file behind."""
    def fail(tmp, final):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(instances, "durable_rename", fail)
    with pytest.raises(OSError, match="Input/output"):
        import_paths(store, [min(synthetic_chest.glob("*.dcm"))], settings)
    assert not list(store.tmp_dir.iterdir())


def test_read_header_raises_only_instance_rejected_on_every_mutant(synthetic_chest, tmp_path):
    bench = _bench()
    sources = [*sorted(synthetic_chest.glob("*.dcm"))[:2], *bench.synthetic_sources(tmp_path / "sources")]
    infos: dict = {}
    (tmp_path / "m").mkdir()
    for index in range(300):
        path, kind, _ = bench.make_mutant(index, 3, sources, infos, tmp_path / "m")
        reasons = []
        try:
            read_header(path)
        except InstanceRejected as exc:
            reasons.append(exc.reason)
        assert all(reasons), kind
        path.unlink(missing_ok=True)
        for left in (tmp_path / "m").glob("*.inflated"):
            pytest.fail(f"{left.name} left behind by mutant {index} ({kind})")


# --- Deflated Explicit VR Little Endian ---------------------------------------------------------------------

def _deflated(source: Path, out: Path) -> Path:
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    return out


def test_valid_deflated_ct_is_accepted_and_stored_inflated(store, settings, synthetic_chest, tmp_path):
    """Was: refused as TRUNCATED."""
    source = min(synthetic_chest.glob("*.dcm"))
    deflated = _deflated(source, tmp_path / "deflated.dcm")
    assert deflated.stat().st_size < source.stat().st_size
    summary = import_paths(store, [deflated], settings)
    assert summary.stored == 1 and not summary.quarantined
    path = store.home / store.db.execute("SELECT path FROM instances").fetchone()[0]
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(stored.pixel_array, pydicom.dcmread(source).pixel_array)
    assert read_frames([path]).frames[0].pixel_data_offset is not None  # read natively from now on


def test_deflate_bomb_is_refused_fast_in_bounded_memory(store, settings, tmp_path):
    """Was: a 2 MB file peaked at 4.27 GB of memory; a 1 MB one took 187 s."""
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(_bench().deflate_bomb(1024 * 2**20))
    assert bomb.stat().st_size < 2 * 2**20
    tracemalloc.start()
    t0 = time.perf_counter()
    summary = import_paths(store, [bomb], settings)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert _reasons(summary) == {"bomb.dcm": "FILE_TOO_LARGE"}
    assert seconds < 10 and peak < 32 * 2**20
    assert not list(store.tmp_dir.iterdir())


def test_deflated_data_cut_short_or_damaged_has_its_own_reason(store, settings, synthetic_chest, tmp_path):
    deflated = _deflated(min(synthetic_chest.glob("*.dcm")), tmp_path / "whole.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(deflated[:len(deflated) // 2])
    damaged = tmp_path / "damaged.dcm"
    meta_end = deflated.index(b"\x02\x00\x10\x00") + 40
    damaged.write_bytes(deflated[:meta_end] + b"\xff" * 64 + deflated[meta_end + 64:])
    relabelled = _relabel(min(synthetic_chest.glob("*.dcm")), tmp_path / "not-deflated.dcm",
                          str(DeflatedExplicitVRLittleEndian))
    summary = import_paths(store, [cut, damaged, relabelled], settings)
    assert _reasons(summary) == {"cut.dcm": "TRUNCATED", "damaged.dcm": "INVALID_HEADER",
                                 "not-deflated.dcm": "INVALID_HEADER"}


# --- reason codes are true: pydicom's and pynetdicom's own test files ----------------------------------------

# every file of those sets that is refused, and why; every other file must be stored
REFUSED = {
    "test_files/README.txt": "NOT_DICOM", "test_files/crayons.icc": "NOT_DICOM",
    "test_files/rtplan.dump": "NOT_DICOM", "test_files/rtstruct.dump": "NOT_DICOM",
    "test_files/test1.json": "NOT_DICOM", "test_files/test_PN.json": "NOT_DICOM",
    "test_files/zipMR.gz": "NOT_DICOM", "test_files/dicomdirtests/README.txt": "NOT_DICOM",
    "test_files/dicomdirtests/TINY_ALPHA/README": "NOT_DICOM",
    "test_files/no_meta.dcm": "NOT_DICOM",  # a stray byte before the first element: no DICOM structure found
    "test_files/MR_truncated.dcm": "TRUNCATED", "test_files/rtplan_truncated.dcm": "TRUNCATED",
    "test_files/badVR.dcm": "INVALID_HEADER",  # Number of Frames '1A'
    "test_files/empty_charset_LEI.dcm": "MISSING_UID", "test_files/meta_missing_tsyntax.dcm": "MISSING_UID",
    "test_files/nested_priv_SQ.dcm": "MISSING_UID",
    "test_files/UN_sequence.dcm": "NO_PIXEL_DATA", "test_files/priv_SQ.dcm": "NO_PIXEL_DATA",
    "test_files/no_meta_group_length.dcm": "NO_PIXEL_DATA",
}
HEADER_ONLY = "test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/"  # CT headers without images
VALID_COMPRESSED = ("test_files/MR_small_RLE.dcm", "test_files/MR_small_jp2klossless.dcm",
                    "test_files/MR_small_jpeg_ls_lossless.dcm", "test_files/SC_ybr_full_422_uncompressed.dcm",
                    "test_files/image_dfl.dcm", "dicom_files/MRImageStorage_JPG2000_Lossless.dcm",
                    "dicom_files/SCImageStorage_Deflated.dcm")


def test_pydicom_and_pynetdicom_test_files_are_stored_or_refused_for_a_true_reason(store, settings):
    """Was: 72 quarantined, valid RLE, JPEG 2000, JPEG-LS and YBR_FULL_422 images among them as TRUNCATED."""
    roots = [PYDICOM_FILES, PYNETDICOM_FILES]
    files = {str(p.relative_to(root.parent)): p for root in roots for p in sorted(root.rglob("*")) if p.is_file()}
    summary = import_paths(store, roots, settings)
    refused = {}
    for q in summary.quarantined:
        path = Path(q["file"])
        root = next(r for r in roots if path.is_relative_to(r))
        refused[str(path.relative_to(root.parent))] = q["reason_code"]
    expected = {name: code for name, code in REFUSED.items() if name in files}
    expected.update({name: "NO_PIXEL_DATA" for name in files if name.startswith(HEADER_ONLY)})
    assert refused == expected
    skipped = sum(1 for name, path in files.items()
                  if Path(name).name == "DICOMDIR" or is_media_directory(path.read_bytes()[:1024]))
    assert summary.stored + summary.duplicates + len(refused) + skipped == len(files)
    stored = {row[0]: row[1] for row in store.db.execute("SELECT sop_instance_uid, path FROM instances")}
    for name in VALID_COMPRESSED:
        original = pydicom.dcmread(files[name])
        copy = pydicom.dcmread(store.home / stored[original.SOPInstanceUID])
        assert np.array_equal(copy.pixel_array, original.pixel_array), name


def test_real_ct_is_stored_whatever_its_transfer_syntax(store, settings):
    folders = [CT / "tcia-pancreas-ct-chest-abdomen", CT / "totalseg-example-j2k", CT / "dcm-qa-ct-ge",
               CT / "dcmqi-ct-3slice"]
    if not all(f.is_dir() for f in folders):
        pytest.skip(f"real test data not found under {CT} (it lives in ../shared/data beside the repository)")
    summary = import_paths(store, folders, settings)
    assert {q["reason_code"] for q in summary.quarantined} <= {"NOT_DICOM"}  # LICENSE files
    assert summary.stored >= 134 + 20 + 28 + 3


def test_header_only_and_cut_short_get_different_words(store, settings, synthetic_chest, tmp_path):
    data = min(synthetic_chest.glob("*.dcm")).read_bytes()
    pixels = data.index(b"\xe0\x7f\x10\x00")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "header-only.dcm").write_bytes(data[:pixels])
    (folder / "cut-in-pixels.dcm").write_bytes(data[:pixels + 1000])
    (folder / "cut-in-header.dcm").write_bytes(data[:pixels // 2 + 3])
    summary = import_paths(store, [folder], settings)
    assert _reasons(summary) == {"header-only.dcm": "NO_PIXEL_DATA", "cut-in-pixels.dcm": "TRUNCATED",
                                 "cut-in-header.dcm": "TRUNCATED"}
    words = {q["reason_code"]: q["reason"] for q in summary.quarantined}
    assert "cut short" in words["TRUNCATED"] and "cut short" not in words["NO_PIXEL_DATA"]


def test_a_damaged_pixel_data_length_is_not_called_cut_short(store, settings, synthetic_chest, tmp_path):
    data = bytearray(min(synthetic_chest.glob("*.dcm")).read_bytes())
    at = data.index(b"\xe0\x7f\x10\x00OW") + 8
    data[at:at + 4] = struct.pack("<L", 10 * 2**20)
    (tmp_path / "length.dcm").write_bytes(bytes(data))
    summary = import_paths(store, [tmp_path / "length.dcm"], settings)
    assert _reasons(summary) == {"length.dcm": "INVALID_HEADER"}
    assert "128 x 128" in summary.quarantined[0]["reason"]


# --- only regular files are opened -----------------------------------------------------------------------------

def _import_within(store, settings, paths, seconds=20.0):
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=import_paths(store, paths, settings)),
                              daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the import hangs"
    return result["summary"]


def test_fifo_given_as_the_import_path_is_refused_without_being_opened(store, settings, tmp_path):
    """Was: the import hung forever on the FIFO."""
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    summary = _import_within(store, settings, [fifo])
    assert _reasons(summary) == {"pipe.dcm": "NOT_REGULAR_FILE"}
    assert store.db.execute("SELECT path FROM quarantine").fetchall() == [(None,)]


def test_fifo_socket_and_device_in_a_folder_are_refused_and_the_rest_imported(store, settings, synthetic_chest,
                                                                              tmp_path):
    import socket

    folder = tmp_path / "usb"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(min(synthetic_chest.glob("*.dcm")).read_bytes())
    os.mkfifo(folder / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "socket"))
    expected = {"fifo": "NOT_REGULAR_FILE", "socket": "NOT_REGULAR_FILE"}
    try:
        os.mknod(folder / "null", 0o600 | 0o020000, os.makedev(1, 3))
        expected["null"] = "NOT_REGULAR_FILE"
    except PermissionError:
        pass  # not root: no device node to try
    try:
        summary = _import_within(store, settings, [folder])
    finally:
        sock.close()
    assert _reasons(summary) == expected and summary.stored == 1


def test_file_names_that_are_not_utf8_get_a_quarantine_row(store, settings, tmp_path):
    """Was: UnicodeEncodeError, the file in quarantine with no row."""
    folder = tmp_path / "in"
    folder.mkdir()
    name = os.fsdecode(b"scan-\xff\xfe.dcm")
    (folder / name).write_bytes(b"not dicom at all" * 10)
    summary = import_paths(store, [folder], settings)
    assert [q["reason_code"] for q in summary.quarantined] == ["NOT_DICOM"]
    rows = store.db.execute("SELECT original_name, path FROM quarantine").fetchall()
    assert len(rows) == 1 and rows[0][0].endswith("scan-??.dcm") and rows[0][1]
    assert len(list((store.home / "quarantine").rglob("*.bin"))) == 1


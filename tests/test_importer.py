"""Bad input: each bad file quarantined with a reason, every good one stored, memory bounded."""

import os
import tracemalloc
import zipfile
from pathlib import Path

import pydicom

from appliance.ingest.importer import import_paths
from appliance.store.database import counts


def _huge_declared(source, out):
    """A valid-looking CT header declaring 65535 x 65535 pixels with a tiny pixel data element."""
    ds = pydicom.dcmread(source)
    ds.Rows = ds.Columns = 65535
    ds.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    ds.PixelData = b"\0" * 64
    ds.save_as(out)


def _truncated_pixels(source, out):
    data = source.read_bytes()
    out.write_bytes(data[: len(data) - 5000])


def make_bad_folder(root, good):
    """Good series mixed with truncated, random, non-DICOM, zero-byte, huge and deeply nested files."""
    (root / "good").mkdir(parents=True)
    files = sorted(good.glob("*.dcm"))
    for path in files:
        (root / "good" / path.name).write_bytes(path.read_bytes())
    (root / "empty.dcm").write_bytes(b"")
    (root / "random.dcm").write_bytes(os.urandom(70_000))
    (root / "notes.txt").write_text("not an image\n")
    (root / "header-only.dcm").write_bytes(files[0].read_bytes()[:300])
    _truncated_pixels(files[1], root / "truncated.dcm")
    _huge_declared(files[2], root / "huge.dcm")
    deep = root
    for level in range(12):
        deep = deep / f"level{level}"
    deep.mkdir(parents=True)
    (deep / "deep.dcm").write_bytes(files[3].read_bytes())  # a duplicate of a good file, deep down
    (root / "broken.zip").write_bytes(b"PK\x03\x04" + os.urandom(200))
    return len(files)


EXPECTED_REASONS = {"empty.dcm": "EMPTY_FILE", "random.dcm": "NOT_DICOM", "notes.txt": "NOT_DICOM",
                    "header-only.dcm": "TRUNCATED", "truncated.dcm": "TRUNCATED", "huge.dcm": "IMAGE_TOO_LARGE",
                    "broken.zip": "DAMAGED_ARCHIVE"}


def test_bad_files_are_quarantined_and_good_ones_stored(store, settings, synthetic_chest, tmp_path):
    good = make_bad_folder(tmp_path / "in", synthetic_chest)
    tracemalloc.start()
    summary = import_paths(store, [tmp_path / "in"], settings)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert summary.stored == good and summary.duplicates == 1
    reasons = {os.path.basename(q["file"]): q["reason_code"] for q in summary.quarantined}
    assert reasons == EXPECTED_REASONS
    assert all(q["reason"] for q in summary.quarantined)
    assert counts(store.db)["quarantined"] == len(EXPECTED_REASONS)
    assert peak < 64 * 2**20, f"import peaked at {peak / 2**20:.0f} MiB of Python memory"
    # quarantined bytes are kept for review, filed under a generated name
    kept = store.db.execute("SELECT path FROM quarantine WHERE reason_code = 'TRUNCATED'").fetchall()
    assert all((store.home / p[0]).exists() for p in kept)


def test_nothing_already_stored_is_lost_by_a_later_bad_import(store, settings, synthetic_chest, tmp_path):
    import_paths(store, [synthetic_chest], settings)
    before = {r[0]: r[1] for r in store.db.execute("SELECT sop_instance_uid, sha256 FROM instances")}
    make_bad_folder(tmp_path / "in", synthetic_chest)
    import_paths(store, [tmp_path / "in"], settings)
    after = {r[0]: r[1] for r in store.db.execute("SELECT sop_instance_uid, sha256 FROM instances")}
    assert after == before


def test_zip_archive_members_are_imported_and_unsafe_ones_refused(store, settings, synthetic_chest, tmp_path):
    archive = tmp_path / "study.zip"
    files = sorted(synthetic_chest.glob("*.dcm"))[:5]
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            zf.write(path, f"DICOM/{path.name}")
        zf.writestr("../../escape.dcm", files[0].read_bytes())
        zf.writestr("bomb.bin", b"\0" * (50 * 2**20))
    summary = import_paths(store, [archive], settings)
    assert summary.stored == 5
    reasons = sorted(q["reason_code"] for q in summary.quarantined)
    assert reasons == ["UNSAFE_ARCHIVE", "UNSAFE_ARCHIVE"]
    assert not (tmp_path.parent / "escape.dcm").exists()


def test_symbolic_links_are_not_followed(store, settings, synthetic_chest, tmp_path):
    folder = tmp_path / "usb"
    folder.mkdir()
    (folder / "link").symlink_to(synthetic_chest, target_is_directory=True)
    summary = import_paths(store, [folder], settings)
    assert summary.stored == 0 and not summary.quarantined


def test_files_too_large_are_refused_without_reading_them_whole(store, settings, synthetic_chest, tmp_path):
    store.max_bytes = 10_000
    summary = import_paths(store, [min(synthetic_chest.glob("*.dcm"))], settings)
    assert [q["reason_code"] for q in summary.quarantined] == ["FILE_TOO_LARGE"]


def test_a_dicomdir_under_another_name_is_recognised_by_its_sop_class_and_not_stored(store, settings, tmp_path,
                                                                                     synthetic_chest):
    import shutil

    from pydicom.fileset import FileSet

    from appliance.ingest.importer import import_paths

    folder = tmp_path / "cd"
    shutil.copytree(synthetic_chest, folder / "IMAGES")
    (tmp_path / "staged").mkdir()
    FileSet().write(tmp_path / "staged")  # an empty DICOMDIR: enough for its file meta
    (tmp_path / "staged" / "DICOMDIR").rename(folder / "DIRFILE")  # as Philips names it
    summary = import_paths(store, [folder], settings)
    images = len(list(synthetic_chest.glob("*.dcm")))
    assert summary.stored == images and summary.skipped == 1
    assert [Path(q["file"]).name for q in summary.quarantined] == ["ground_truth.json"]  # the phantom's answer key
    studies = store.db.execute("SELECT count(*) FROM studies").fetchone()[0]
    assert studies == 1, "the directory record is not a study of its own"

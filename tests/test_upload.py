"""Browser upload's import path: many files or a zip, a size limit, nothing kept from a refused upload."""

import io
import zipfile

import pytest

from appliance.ingest.upload import UploadTooLarge, receive_upload


def _parts(paths):
    return [(p.name, open(p, "rb")) for p in paths]


def test_files_and_a_zip_are_imported(store, settings, synthetic_chest):
    files = sorted(synthetic_chest.glob("*.dcm"))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in files[20:]:
            zf.write(path, path.name)
    archive.seek(0)
    parts = _parts(files[:20]) + [("../../study.zip", archive)]
    summary = receive_upload(parts, store, settings)
    assert summary.stored == 40 and not summary.quarantined
    assert len(summary.series) == 1
    assert store.db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0  # the web UI queues, once all is in
    assert not any((store.home / "uploads").iterdir())  # the spool is emptied


def test_too_large_upload_is_refused_and_nothing_is_kept(store, settings, synthetic_chest):
    small = settings.replace(max_upload_bytes=100_000)
    with pytest.raises(UploadTooLarge) as info:
        receive_upload(_parts(sorted(synthetic_chest.glob("*.dcm"))), store, small)
    assert info.value.http_status == 413
    assert store.db.execute("SELECT count(*) FROM instances").fetchone()[0] == 0
    assert not any((store.home / "uploads").iterdir())

"""Hostile zip archives: damaged members, bombs, zip slip, nested archives, odd names. Each refusal is a
quarantine row with its reason, what is kept of it is bounded, and the rest of the archive is imported."""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from appliance.errors import Rejected
from appliance.ingest.importer import import_paths
from appliance.store import quarantine


def _reasons(summary) -> dict[str, str]:
    return {q["file"].split(":", 1)[-1]: q["reason_code"] for q in summary.quarantined}


def _zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _data_offset(archive: bytes, name: str) -> int:
    """Where the (compressed) data of member ``name`` begins in ``archive``."""
    info = zipfile.ZipFile(io.BytesIO(archive)).getinfo(name)
    header = info.header_offset
    name_length, extra_length = struct.unpack("<HH", archive[header + 26:header + 30])
    return header + 30 + name_length + extra_length


def _good(synthetic_chest, count: int) -> dict[str, bytes]:
    return {f"DICOM/{p.name}": p.read_bytes() for p in sorted(synthetic_chest.glob("*.dcm"))[:count]}


def _kept_bytes(store) -> int:
    return sum(p.stat().st_size for p in (store.home / "quarantine").rglob("*.bin"))


def test_corrupt_deflate_member_is_quarantined_and_the_rest_imported(store, settings, synthetic_chest, tmp_path):
    """Was: zlib.error, a traceback."""
    members = _good(synthetic_chest, 3) | {"bad.dcm": min(synthetic_chest.glob("*.dcm")).read_bytes()}
    data = bytearray(_zip(tmp_path / "a.zip", members).read_bytes())
    at = _data_offset(bytes(data), "bad.dcm")
    data[at:at + 64] = b"\xff" * 64  # an invalid deflate block
    (tmp_path / "a.zip").write_bytes(bytes(data))
    summary = import_paths(store, [tmp_path / "a.zip"], settings)
    assert _reasons(summary) == {"bad.dcm": "DAMAGED_ARCHIVE"} and summary.stored == 3
    assert store.db.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 1


def test_crc_error_in_a_member_is_quarantined_and_the_rest_imported(store, settings, synthetic_chest, tmp_path):
    """Was: zipfile.BadZipFile while reading, a traceback."""
    members = _good(synthetic_chest, 3) | {"crc.dcm": min(synthetic_chest.glob("*.dcm")).read_bytes()}
    data = bytearray(_zip(tmp_path / "a.zip", members, zipfile.ZIP_STORED).read_bytes())
    data[_data_offset(bytes(data), "crc.dcm") + 2000] ^= 0xFF
    (tmp_path / "a.zip").write_bytes(bytes(data))
    summary = import_paths(store, [tmp_path / "a.zip"], settings)
    assert _reasons(summary) == {"crc.dcm": "DAMAGED_ARCHIVE"} and summary.stored == 3
    assert "checksum" in summary.quarantined[0]["reason"]
    assert not list(store.tmp_dir.iterdir())


def test_member_name_marked_utf8_that_is_not_is_a_damaged_archive_row(store, settings, synthetic_chest, tmp_path):
    """Was: UnicodeEncodeError / UnicodeDecodeError, a traceback and a quarantined file with no row."""
    data = _zip(tmp_path / "a.zip", {"sc\u00e9n.dcm": b"x" * 100}).read_bytes()
    (tmp_path / "a.zip").write_bytes(data.replace("\u00e9".encode(), b"\xff\xfe"))
    summary = import_paths(store, [tmp_path / "a.zip", min(synthetic_chest.glob("*.dcm"))], settings)
    assert [q["reason_code"] for q in summary.quarantined] == ["DAMAGED_ARCHIVE"] and summary.stored == 1
    assert "UTF-8" in summary.quarantined[0]["reason"]
    rows = store.db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    assert rows == 1 and len(list((store.home / "quarantine").rglob("*.bin"))) == 1


def test_refused_member_with_a_legacy_name_is_kept_with_its_row(store, settings, tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("notes-\u00ff\u00fe.txt")  # cp437 name, no UTF-8 flag
        zf.writestr(info, b"not an image")
    summary = import_paths(store, [archive], settings)
    assert [q["reason_code"] for q in summary.quarantined] == ["NOT_DICOM"]
    name, path = store.db.execute("SELECT original_name, path FROM quarantine").fetchone()
    assert name.startswith("a.zip:notes-") and (store.home / path).is_file()


def _zeros_zip(path: Path, members: int, size: int) -> Path:
    """``members`` members of ``size`` zero bytes each, written by hand (compressing 3 GB would take a while)."""
    zeros = bytes(size)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = squeeze.compress(zeros) + squeeze.flush()
    crc = zlib.crc32(zeros)
    local, central = bytearray(), bytearray()
    for n in range(members):
        name = f"zeros/{n:05d}.bin".encode()
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(packed), size, len(name), 0)
        local += name + packed
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(packed), size,
                               len(name), 0, 0, 0, 0, 0, offset) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, members, members, len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def test_3000_members_of_1_mib_zeros_are_refused_at_once_keeping_little(store, settings, tmp_path):
    """Was: 444 MB written into quarantine in 120 s (the ratio check applied only to members over 1 MiB)."""
    archive = _zeros_zip(tmp_path / "bomb.zip", 3000, 2**20)
    assert archive.stat().st_size < 4 * 2**20
    t0 = time.perf_counter()
    summary = import_paths(store, [archive], settings)
    assert time.perf_counter() - t0 < 5
    assert [q["reason_code"] for q in summary.quarantined] == ["UNSAFE_ARCHIVE"] and summary.stored == 0
    assert "zip bomb" in summary.quarantined[0]["reason"]
    assert _kept_bytes(store) <= settings.quarantine_sample_bytes


def test_whole_archive_limits_on_size_and_member_count(store, settings, tmp_path):
    archive = _zeros_zip(tmp_path / "many.zip", 50, 1024)
    small = settings.replace(max_zip_members=10)
    assert "50 files" in import_paths(store, [archive], small).quarantined[0]["reason"]
    small = settings.replace(max_zip_bytes=10_000)
    assert "unpacks to" in import_paths(store, [archive], small).quarantined[0]["reason"]


def test_a_bomb_member_keeps_only_a_sample_and_cannot_be_retried(store, settings, synthetic_chest, tmp_path):
    archive = _zip(tmp_path / "a.zip", _good(synthetic_chest, 2) | {"bomb.bin": bytes(20 * 2**20)})
    summary = import_paths(store, [archive], settings)
    assert _reasons(summary) == {"bomb.bin": "UNSAFE_ARCHIVE"} and summary.stored == 2
    assert _kept_bytes(store) == settings.quarantine_sample_bytes
    row = store.db.execute("SELECT id, size_bytes FROM quarantine").fetchone()
    assert row[1] == 20 * 2**20
    with pytest.raises(Rejected, match="Only the first 64 KiB"):
        quarantine.retry(store, row[0])
    assert store.db.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 1  # kept for the admin


def test_zip_slip_members_are_refused_kept_whole_and_can_be_retried(store, settings, synthetic_chest, tmp_path):
    image = min(synthetic_chest.glob("*.dcm")).read_bytes()
    names = ["../../escape.dcm", "/etc/abs.dcm", "..\\..\\windows.dcm", "C:/drive.dcm"]
    archive = _zip(tmp_path / "slip.zip", dict.fromkeys(names, image))
    summary = import_paths(store, [archive], settings)
    assert _reasons(summary) == dict.fromkeys(names, "UNSAFE_ARCHIVE")
    assert not (tmp_path.parent / "escape.dcm").exists() and not Path("/etc/abs.dcm").exists()
    first = store.db.execute("SELECT id FROM quarantine ORDER BY id").fetchone()[0]
    assert quarantine.retry(store, first).status == "stored"  # kept whole: an admin may still accept it


def test_nested_zip_is_not_opened(store, settings, synthetic_chest, tmp_path):
    inner = _zip(tmp_path / "inner.zip", _good(synthetic_chest, 2)).read_bytes()
    archive = _zip(tmp_path / "outer.zip", _good(synthetic_chest, 1) | {"inner.zip": inner})
    summary = import_paths(store, [archive], settings)
    assert _reasons(summary) == {"inner.zip": "UNSAFE_ARCHIVE"} and summary.stored == 1
    assert "inside" in summary.quarantined[0]["reason"]


def test_encrypted_member_is_refused_as_unsupported(store, settings, synthetic_chest, tmp_path):
    data = bytearray(_zip(tmp_path / "a.zip", _good(synthetic_chest, 1) | {"secret.dcm": b"x" * 100}).read_bytes())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("secret.dcm")
    data[info.header_offset + 6] |= 1  # the encrypted flag, in the local header and in the central directory
    data[bytes(data).rindex(b"PK\x01\x02") + 8] |= 1  # the last entry there: secret.dcm
    (tmp_path / "a.zip").write_bytes(bytes(data))
    summary = import_paths(store, [tmp_path / "a.zip"], settings)
    assert _reasons(summary) == {"secret.dcm": "UNSUPPORTED_ARCHIVE"} and summary.stored == 1
    assert "encrypted" in summary.quarantined[0]["reason"]


def test_a_damaged_archive_keeps_a_sample_and_says_so(store, settings, tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04" + bytes(200_000))
    summary = import_paths(store, [tmp_path / "broken.zip"], settings)
    assert [q["reason_code"] for q in summary.quarantined] == ["DAMAGED_ARCHIVE"]
    assert _kept_bytes(store) == settings.quarantine_sample_bytes

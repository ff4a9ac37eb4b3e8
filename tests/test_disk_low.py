"""Imports stop below the low-disk watermark, and a full disk is DISK_LOW, never a file's fault; what was
stored stays stored, no scratch file is left, the CLI says so in one line and exits non-zero."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from appliance import serve
from appliance.errors import DiskLow
from appliance.ingest import importer
from appliance.ingest.importer import import_paths
from appliance.ingest.upload import receive_upload
from appliance.store import files
from appliance.store.instances import open_store
from appliance.synth.writer import SynthOptions, write_series

Usage = namedtuple("Usage", "total used free")


def _stored_files_exist(store) -> int:
    paths = [store.home / row[0] for row in store.db.execute("SELECT path FROM instances")]
    assert all(p.is_file() for p in paths)
    return len(paths)


def test_import_stops_below_the_watermark_and_keeps_what_was_stored(store, settings, synthetic_chest, monkeypatch):
    calls = []

    def usage(path):
        calls.append(path)
        return Usage(10**12, 0, (2048 if len(calls) <= 5 else 100) * 2**20)

    monkeypatch.setattr(importer.shutil, "disk_usage", usage)
    with pytest.raises(DiskLow) as info:
        import_paths(store, sorted(synthetic_chest.glob("*.dcm")), settings)
    assert info.value.reason_code.value == "DISK_LOW"
    reason = info.value.reason
    assert "100 MiB" in reason and "1024 MiB" in reason and "after 5 new image" in reason
    assert _stored_files_exist(store) == 5
    assert store.db.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0  # the files are not at fault
    assert not list(store.tmp_dir.iterdir())


def test_no_space_left_while_writing_is_disk_low_never_unreadable(store, settings, synthetic_chest, monkeypatch):
    """Was: every file printed as UNREADABLE "No space left on device", exit 0."""
    class Full:
        """A new file on a disk with no space left."""

        def __init__(self, path, mode):
            self.handle = open(path, mode)  # noqa: SIM115 - closed by __exit__

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(files, "open", Full, raising=False)
    with pytest.raises(DiskLow, match="disk is full"):
        import_paths(store, sorted(synthetic_chest.glob("*.dcm")), settings.replace(disk_low_watermark_mb=0))
    assert store.db.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0
    assert not list(store.tmp_dir.iterdir())


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (root only); skipped, saying why, where it cannot be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({run.stderr.strip() or 'not root'}); "
                    "the monkeypatched tests above cover the same paths")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_stops_the_import_with_disk_low(small_disk, tmp_path):
    from appliance import config

    series = tmp_path / "series"
    write_series(series, SynthOptions(slices=24, size=512, seed=5))  # ~12 MiB, twice the disk
    settings = config.load(environ={}, home=str(small_disk / "home"), disk_low_watermark_mb=0)
    store = open_store(settings)
    with pytest.raises(DiskLow):
        import_paths(store, sorted(series.glob("*.dcm")), settings)
    stored = _stored_files_exist(store)
    assert 0 < stored < 24
    codes = {row[0] for row in store.db.execute("SELECT reason_code FROM quarantine")}
    assert not codes, codes
    assert not [p for p in store.tmp_dir.iterdir() if p.suffix in (".part", ".inflated")]


def _appliance(*args, home, **env):
    environ = dict(os.environ, APPLIANCE_HOME=str(home), **env)
    return subprocess.run([sys.executable, "-m", "appliance.cli", *map(str, args)], capture_output=True,
                          text=True, env=environ, timeout=300)


@pytest.mark.parametrize("command", ["import", "analyze"])
def test_cli_below_the_watermark_prints_one_disk_low_line_and_exits_non_zero(command, synthetic_chest, tmp_path):
    run = _appliance(command, synthetic_chest, home=tmp_path / "home", APPLIANCE_DISK_LOW_WATERMARK_MB="100000000")
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: DISK_LOW: ")
    assert "Traceback" not in run.stderr and "UNREADABLE" not in run.stdout


def test_cli_import_ledger_records_the_stopped_import(synthetic_chest, tmp_path):
    from appliance.store.database import open_database

    _appliance("import", synthetic_chest, home=tmp_path / "home", APPLIANCE_DISK_LOW_WATERMARK_MB="100000000")
    row = open_database(tmp_path / "home").execute("SELECT state, stored FROM imports").fetchone()
    assert tuple(row) == ("failed", 0)


def test_upload_that_falls_below_the_watermark_is_disk_low_and_nothing_stays_spooled(store, settings,
                                                                                      synthetic_chest, monkeypatch):
    checks = []

    def usage(path):
        checks.append(path)
        return Usage(10**12, 0, (2048 if len(checks) <= 10 else 100) * 2**20)

    monkeypatch.setattr(importer.shutil, "disk_usage", usage)
    parts = [(p.name, io.BytesIO(p.read_bytes())) for p in sorted(synthetic_chest.glob("*.dcm"))]
    with pytest.raises(DiskLow) as info:
        receive_upload(parts, store, settings)
    assert info.value.http_status == 507
    assert not any((store.home / "uploads").iterdir())
    assert store.db.execute("SELECT count(*) FROM instances").fetchone()[0] == 0


def test_drop_folder_below_the_watermark_keeps_the_files_for_later(store, settings, synthetic_chest, capsys):
    incoming = store.home / "incoming"
    shutil.copytree(synthetic_chest, incoming / "usb")
    low = settings.replace(disk_low_watermark_mb=10**8)
    assert serve.drain_incoming(store, low, sorted(incoming.iterdir())) is False
    assert "error: DISK_LOW: " in capsys.readouterr().out
    assert len(list((incoming / "usb").glob("*.dcm"))) == 40  # imported once space is freed
    assert serve.drain_incoming(store, settings, sorted(incoming.iterdir())) is True
    assert not any(incoming.iterdir()) and _stored_files_exist(store) == 40


def test_quarantined_bytes_count_toward_the_watermark(store, settings, tmp_path, monkeypatch):
    """Free space is measured before each file, quarantined ones included: a stream of junk stops too."""
    folder = tmp_path / "junk"
    folder.mkdir()
    for n in range(10):
        (folder / f"{n}.bin").write_bytes(os.urandom(2**20))
    free = [1030 * 2**20]

    def usage(path: Path):
        kept = sum(p.stat().st_size for p in (store.home / "quarantine").rglob("*.bin"))
        return Usage(10**12, kept, free[0] - kept)

    monkeypatch.setattr(importer.shutil, "disk_usage", usage)
    with pytest.raises(DiskLow, match="7 quarantined"):
        import_paths(store, [folder], settings)

"""systemd units (verified by systemd-analyze), and importing a medium as the USB service does."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import systemd_units
from appliance.ingest.usb import MOUNT_OPTIONS, mount_command, mount_point_for

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_units_render_without_placeholders(tmp_path):
    written = systemd_units.install(tmp_path, user="appliance", home=Path("/var/lib/appliance"),
                                    venv=Path(sys.prefix), engines=tmp_path)
    names = {p.name for p in written}
    assert {"appliance-dicom.service", "appliance-worker.service", "appliance-web.service",
            "appliance-import@.service", "appliance-build-engines.service", "appliance-export.service",
            "appliance-export.timer", "99-appliance-usb.rules"} <= names
    for path in written:  # @NAME@ placeholders, not systemd's @group system call sets
        assert not re.search(r"@[A-Z]+@", path.read_text()), path.name
    worker = (tmp_path / "appliance-worker.service").read_text()
    assert "Type=notify" in worker and "WatchdogSec=" in worker and "ProtectSystem=strict" in worker
    assert "MemoryMax=" in (tmp_path / "appliance-dicom.service").read_text()


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)")
def test_units_pass_systemd_analyze_verify(tmp_path):
    written = systemd_units.install(tmp_path, user="root", home=tmp_path / "home", venv=Path(sys.prefix),
                                    engines=tmp_path)
    units = [str(p) for p in written if p.suffix in (".service", ".timer") and "@" not in p.name]
    units.append(str(tmp_path / "appliance-import@sdb1.service"))
    shutil.copy(tmp_path / "appliance-import@.service", units[-1])
    run = subprocess.run([SYSTEMD_ANALYZE, "verify", *units], capture_output=True, text=True,
                         env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
    assert run.returncode == 0, run.stdout + run.stderr


MAX_EXPOSURE = 3.0
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")


def _offline_security_review() -> bool:
    if SYSTEMD_ANALYZE is None:
        return False
    run = subprocess.run([SYSTEMD_ANALYZE, "security", "--help"], capture_output=True, text=True)
    return "--offline" in run.stdout


@pytest.mark.skipif(not _offline_security_review(),
                    reason="systemd-analyze security --offline needs systemd 250 or later (Debian package systemd)")
def test_every_service_is_hardened_to_exposure_3_or_less(tmp_path, capsys):
    """`systemd-analyze security` rates each unit from 0 (locked down) to 10 (unprotected)."""
    written = systemd_units.install(tmp_path, user="appliance", home=Path("/var/lib/appliance"),
                                    venv=Path(sys.prefix), engines=tmp_path / "engines")
    services = [p for p in written if p.suffix == ".service" and "@" not in p.name]
    services.append(tmp_path / "appliance-import@sdb1.service")
    shutil.copy(tmp_path / "appliance-import@.service", services[-1])
    exposure = {}
    for unit in services:
        run = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
                             capture_output=True, text=True, env=dict(os.environ, SYSTEMD_COLORS="0"))
        found = EXPOSURE.search(run.stdout + run.stderr)
        assert found, f"{unit.name}: no exposure level in the review: {run.stdout[-500:]} {run.stderr[-500:]}"
        exposure[unit.name] = float(found.group(1))
    with capsys.disabled():
        print("\nsystemd-analyze security exposure: " + ", ".join(f"{name} {level:.1f}"
                                                               for name, level in sorted(exposure.items())))
    assert {name for name, level in exposure.items() if level > MAX_EXPOSURE} == set(), exposure


def test_usb_medium_is_mounted_read_only_and_named_safely():
    assert MOUNT_OPTIONS.split(",")[:4] == ["ro", "nosuid", "nodev", "noexec"]
    assert mount_command("/dev/sdb1", Path("/run/appliance/usb/sdb1"))[:3] == ["mount", "-o", MOUNT_OPTIONS]
    assert mount_point_for("/dev/../../etc/sdb1").name == "sdb1"
    assert mount_point_for("/dev/sd b;rm").parent == Path("/run/appliance/usb")


def test_import_of_a_medium_queues_its_series_and_summarises(synthetic_chest, tmp_path):
    medium = tmp_path / "usb"
    shutil.copytree(synthetic_chest, medium / "DICOM" / "A")
    (medium / "autorun.inf").write_text("[autorun]\n")
    env = dict(os.environ, APPLIANCE_HOME=str(tmp_path / "home"))
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "import", str(medium), "--json"],
                         capture_output=True, text=True, env=env)
    doc = json.loads(run.stdout)
    assert doc["stored"] == 40 and doc["queued_series"] == 1
    assert sorted(q["reason_code"] for q in doc["quarantined"]) == ["NOT_DICOM", "NOT_DICOM"]
    from appliance.store.database import open_database

    jobs = open_database(tmp_path / "home").execute("SELECT state, priority FROM jobs").fetchall()
    assert jobs == [("queued", 1)]

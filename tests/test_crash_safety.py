"""kill -9 of the receiver and the worker during a 1,000-instance send: nothing acknowledged is lost.

Real processes (`appliance dicom`, `appliance worker`) and DCMTK's storescu; the receiver is killed
twice at random moments and restarted; the sender re-sends what was not acknowledged, as a PACS would.
"""

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.store.database import open_database
from appliance.synth.writer import SynthOptions, write_series

from .test_dicom_receiver import ECHOSCU, STORESCU, free_port, needs_dcmtk

INSTANCES = int(os.environ.get("APPLIANCE_CRASH_TEST_INSTANCES", "1000"))
KILLS = int(os.environ.get("APPLIANCE_CRASH_TEST_KILLS", "3"))  # bench/kill_rounds.py runs 100


def _env(home: Path, port: int) -> dict:
    return dict(os.environ, APPLIANCE_HOME=str(home), APPLIANCE_DICOM_PORT=str(port),
                APPLIANCE_DICOM_BIND_ADDRESS="127.0.0.1", APPLIANCE_DISK_LOW_WATERMARK_MB="0",
                APPLIANCE_QUIET_PERIOD_SECONDS="1", APPLIANCE_LOG_LEVEL="WARNING")


def _start(command: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "appliance.cli", command], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_echo(port: int) -> None:
    for _ in range(150):
        if subprocess.run([str(ECHOSCU), "-aec", "APPLIANCE", "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError("receiver did not come up")


def _acknowledged(output: str) -> set[str]:
    """Files storescu saw answered with Success (it logs the file, then the response)."""
    done, current = set(), None
    for line in output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            done.add(current)
    return done


@needs_dcmtk
@pytest.mark.slow
def test_kill_9_during_send_loses_no_acknowledged_instance(tmp_path):
    series = tmp_path / "series"
    write_series(series, SynthOptions(slices=INSTANCES, size=64, region="chest-abdomen", seed=31))
    files = sorted(str(p) for p in series.glob("*.dcm"))
    home, port = tmp_path / "home", free_port()
    env = _env(home, port)
    receiver = _start("dicom", env)
    acknowledged: set[str] = set()
    rng = random.Random(7)
    try:
        _wait_for_echo(port)
        for kill in range(KILLS + 1):  # sends cut by kill -9, then one that completes
            remaining = [f for f in files if f not in acknowledged]
            sender = subprocess.Popen([str(STORESCU), "-v", "-aec", "APPLIANCE", "127.0.0.1", str(port), *remaining],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if kill < KILLS:
                time.sleep(rng.uniform(0.5, 1.5))
                receiver.send_signal(signal.SIGKILL)
                receiver.wait()
            out, _ = sender.communicate(timeout=300)
            acknowledged |= _acknowledged(out)
            if kill < KILLS:
                receiver = _start("dicom", env)  # start-up sweeps what the kill left half-written
                _wait_for_echo(port)
        assert len(acknowledged) == INSTANCES
    finally:
        receiver.send_signal(signal.SIGKILL)
        receiver.wait()
    db = open_database(home)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {row[0] for row in db.execute("SELECT path FROM instances")}
    assert len(stored) == INSTANCES
    assert all((home / p).exists() for p in stored)

    # the worker is killed while the series is being analysed; after restart it is analysed exactly once
    worker = _start("worker", env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not db.execute("SELECT 1 FROM jobs WHERE state='running'").fetchone():
            time.sleep(0.05)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        worker = _start("worker", env)
        while time.monotonic() < deadline and not db.execute("SELECT 1 FROM jobs WHERE state='done'").fetchone():
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert db.execute("SELECT state FROM jobs").fetchall() == [("done",)]
    assert db.execute("SELECT count(*) FROM analyses WHERE superseded = 0").fetchone()[0] == 1
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

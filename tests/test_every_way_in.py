"""One analysis path: a series dropped into incoming/, one imported with `appliance import`, one uploaded in the
browser and one sent by C-STORE each reach a real Orthanc as SR + key images + Encapsulated PDF; and a data
directory shared by a receiver under load and an importer in a loop loses no acknowledged image."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from appliance.synth.writer import SynthOptions, write_series

from .conftest import need_data
from .test_dicom_receiver import STORESCU, needs_dcmtk
from .test_outputs_pacs import free_port, needs_orthanc, orthanc_get, start_orthanc
from .web_helpers import csrf, login, make_accounts, web_settings

APPLIANCE = [sys.executable, "-m", "appliance.cli"]


def _env(home: Path, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_HOME"] = str(home)
    env.update({f"APPLIANCE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def _wait_for_echo(port: int) -> None:
    for _ in range(100):
        if subprocess.run(["/usr/bin/echoscu", "-aec", "APPLIANCE", "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the receiver did not answer C-ECHO")


def _series(root: Path, name: str, seed: int) -> tuple[Path, str]:
    folder = root / name
    truth = write_series(folder, SynthOptions(slices=40, size=128, region="chest", seed=seed))
    (folder / "ground_truth.json").unlink()
    study = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    assert truth["series_instance_uid"]
    return folder, str(study)


def _modalities_by_study(http_port: int) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for instance in orthanc_get(http_port, "/instances"):
        tags = orthanc_get(http_port, f"/instances/{instance}/simplified-tags")
        found.setdefault(tags["StudyInstanceUID"], set()).add(tags["Modality"])
    return found


def _upload(home: Path, folder: Path) -> None:
    """The technician's upload through the web endpoint (Flask's client, the real app over the same data)."""
    from appliance.web import create_app

    settings = web_settings(home.parent)
    client = create_app(settings).test_client()
    assert login(client, "tech").status_code == 302
    parts = [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(folder.glob("*.dcm"))]
    answer = client.post("/import/upload", data={"files": parts, "final": "1", "csrf_token": csrf(client, "/import")},
                         content_type="multipart/form-data")
    assert answer.status_code == 200 and answer.get_json()["queued_series"] == 1, answer.get_data(as_text=True)


@needs_orthanc
@needs_dcmtk
@pytest.mark.slow
def test_every_way_in_reaches_the_pacs_as_sr_key_images_and_pdf(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    make_accounts(home)
    pacs_port, dicom_port = free_port(), free_port()
    orthanc, http_port = start_orthanc(tmp_path / "orthanc", pacs_port)
    env = _env(home, pacs_destinations=f"ORTHANC@127.0.0.1:{pacs_port}", dicom_port=dicom_port,
               web_port=free_port(), quiet_period_seconds=1, first_start_sample="false", outbox_backoff_seconds=1)
    studies = {}
    serve = subprocess.Popen([*APPLIANCE, "serve", "--poll-seconds", "0.5"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_echo(dicom_port)
        folder, studies["drop"] = _series(tmp_path, "drop", 101)
        shutil.copytree(folder, home / "incoming" / "from-usb")
        folder, studies["import"] = _series(tmp_path, "import", 102)
        run = subprocess.run([*APPLIANCE, "import", str(folder)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        folder, studies["upload"] = _series(tmp_path, "upload", 103)
        _upload(home, folder)
        folder, studies["c-store"] = _series(tmp_path, "cstore", 104)
        sent = subprocess.run([str(STORESCU), "-aec", "APPLIANCE", "127.0.0.1", str(dicom_port),
                               *map(str, sorted(folder.glob("*.dcm")))], capture_output=True, text=True)
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 240
        found: dict[str, set[str]] = {}
        while time.monotonic() < deadline:
            found = _modalities_by_study(http_port)
            if all(found.get(uid) == {"SR", "OT", "DOC"} for uid in studies.values()):
                break
            time.sleep(1)
        missing = {way: found.get(uid) for way, uid in studies.items() if found.get(uid) != {"SR", "OT", "DOC"}}
        assert not missing, f"these ways in did not reach the PACS: {missing}"
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            out, _ = serve.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            out, _ = serve.communicate()
        orthanc.terminate()
        orthanc.wait(timeout=30)
    assert "Traceback" not in out, out
    assert out.count("model lung-segmentation: ") == 1, out  # one registry, its sessions kept across jobs


@needs_dcmtk
@pytest.mark.slow
def test_a_concurrent_importer_never_costs_the_receiver_an_acknowledged_image(tmp_path):
    """DCMTK storescu sends the real 134-slice series again and again while `appliance import` runs in a loop."""
    series = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    files = sorted(str(p) for p in series.glob("*.dcm"))
    home, port = tmp_path / "home", free_port()
    env = _env(home, dicom_port=port)
    log = open(tmp_path / "receiver.log", "w")  # noqa: SIM115 - closed after the receiver stops
    receiver = subprocess.Popen([*APPLIANCE, "dicom"], env=env, stdout=log, stderr=subprocess.STDOUT)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    stop = tmp_path / "stop"
    script = f"while [ ! -e {stop} ]; do {' '.join(APPLIANCE)} import {empty} >/dev/null 2>&1; done"
    loop = subprocess.Popen(["bash", "-c", script], env=env)
    rounds = int(os.environ.get("APPLIANCE_TEST_SEND_ROUNDS", "3"))
    try:
        _wait_for_echo(port)
        for n in range(rounds):
            sent = subprocess.run([str(STORESCU), "-aec", "APPLIANCE", "127.0.0.1", str(port), *files],
                                  capture_output=True, text=True)
            assert sent.returncode == 0, (f"send {n + 1} aborted: {sent.stderr[-2000:]}\nreceiver: "
                                          f"{(tmp_path / 'receiver.log').read_text()[-3000:]}")
    finally:
        stop.touch()
        loop.wait(timeout=120)
        receiver.send_signal(signal.SIGINT)
        try:
            receiver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            receiver.kill()
        log.close()
    from appliance.store.database import open_database

    db = open_database(home)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db.execute("SELECT path, sha256 FROM instances").fetchall()
    assert len(rows) == len(files)
    for path, _sha in rows:
        pydicom.dcmread(home / path, stop_before_pixels=True)  # on disk and readable


@pytest.mark.slow
def test_the_worklist_shows_a_running_jobs_progress_moving(tmp_path):
    """A worker analyses a 160-slice study while the technician's worklist polls /api/progress."""
    from appliance.web import create_app

    home = tmp_path / "home"
    home.mkdir()
    make_accounts(home)
    folder = tmp_path / "study"
    write_series(folder, SynthOptions(slices=160, size=512, region="chest", seed=5))
    (folder / "ground_truth.json").unlink()
    env = _env(home, quiet_period_seconds=0, demonstration=1)  # every pack runs: a job with more steps to watch
    run = subprocess.run([*APPLIANCE, "import", str(folder)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    uid = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
    client = create_app(web_settings(tmp_path)).test_client()
    assert login(client, "tech").status_code == 302
    worker = subprocess.Popen([*APPLIANCE, "worker", "--once"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    seen: list[tuple[str, float | None]] = []
    while worker.poll() is None:
        doc = client.get(f"/api/progress?study={uid}").get_json()[uid]
        seen.append((doc["status"], doc["progress"]))
        time.sleep(0.1)
    assert worker.returncode == 0, worker.stderr.read()
    running = [p for status, p in seen if status == "running" and p is not None]
    assert len(set(running)) >= 3, seen  # it moved, more than once, while the job ran
    assert running == sorted(running) and 0.0 <= running[0] < running[-1] < 1.0
    assert client.get(f"/api/progress?study={uid}").get_json()[uid]["status"] == "done"

"""The DICOM receiver against DCMTK's echoscu and storescu (an independent peer), on loopback."""

import concurrent.futures
import hashlib
import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from appliance import config
from appliance.ingest import dicom_server
from appliance.ingest.dicom_server import Caller, is_allowed, parse_allowed_callers
from appliance.store.database import open_database

from .conftest import need_data

ECHOSCU, STORESCU = Path("/usr/bin/echoscu"), Path("/usr/bin/storescu")
needs_dcmtk = pytest.mark.skipif(not (ECHOSCU.exists() and STORESCU.exists()),
                                 reason="DCMTK is not installed (Debian package dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def receiver(tmp_path):
    """Start a receiver on a free loopback port; yields (settings, port) and stops it after."""
    started = []

    def start(**overrides):
        port = free_port()
        values = {"home": str(tmp_path / "home"), "dicom_allowed_callers": "*@127.0.0.1", "disk_low_watermark_mb": 0,
                  "dicom_network_timeout": 5.0, "dicom_acse_timeout": 5.0}
        values.update(overrides)
        settings = config.load(environ={}, **values)
        open_database(settings.home_path)
        started.append(dicom_server.start(settings, port=port, address="127.0.0.1"))
        return settings, port

    yield start
    for stop in started:
        stop()


def echo(port: int, calling: str = "ECHOSCU", called: str = "APPLIANCE") -> subprocess.CompletedProcess:
    return subprocess.run([str(ECHOSCU), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def store(port: int, files, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run([str(STORESCU), "-aet", calling, "-aec", "APPLIANCE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def pixel_sha256(ds) -> str:
    return hashlib.sha256(ds.PixelData).hexdigest()


def test_allow_list_parsing():
    callers = parse_allowed_callers("CT01@10.0.0.5, *@127.0.0.1, PACS")
    assert callers == (Caller("CT01", "10.0.0.5"), Caller("*", "127.0.0.1"), Caller("PACS", "*"))
    assert is_allowed(callers, "ANY", "127.0.0.1") and is_allowed(callers, "PACS", "192.168.1.9")
    assert not is_allowed(callers, "CT01", "10.0.0.6")


@needs_dcmtk
def test_echo(receiver):
    _, port = receiver()
    run = echo(port)
    assert run.returncode == 0, run.stderr


@needs_dcmtk
def test_real_series_over_eight_concurrent_associations_loses_nothing(receiver):
    folder = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    files = sorted(folder.glob("*.dcm"))
    settings, port = receiver()
    groups = [files[i::8] for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda g: store(port, g), groups))
    assert all(r.returncode == 0 for r in runs), [r.stderr[-500:] for r in runs]
    db = open_database(settings.home_path)
    rows = dict(db.execute("SELECT sop_instance_uid, path FROM instances"))
    assert len(rows) == len(files)
    import pydicom

    # storescu re-encodes sequences with explicit lengths, so file bytes differ; every element and
    # the pixel data's SHA-256 must not
    for f in files:
        sent = pydicom.dcmread(f)
        stored = pydicom.dcmread(settings.home_path / rows[sent.SOPInstanceUID])
        assert pixel_sha256(stored) == pixel_sha256(sent)
        assert stored == sent
    # the same study again: still one copy of each instance
    assert store(port, files[:20]).returncode == 0
    assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == len(files)


@needs_dcmtk
def test_caller_not_on_the_allow_list_is_rejected_and_audited(receiver):
    settings, port = receiver(dicom_allowed_callers="SCANNER@127.0.0.1")
    refused = echo(port, calling="INTRUDER")
    assert refused.returncode != 0
    db = open_database(settings.home_path)
    assert db.execute("SELECT actor, action FROM audit_log").fetchall() == [
        ("INTRUDER@127.0.0.1", "dicom_association_refused")]
    assert echo(port, calling="SCANNER").returncode == 0  # the service is still up


@needs_dcmtk
def test_wrong_called_ae_title_is_rejected(receiver):
    _, port = receiver()
    assert echo(port, called="SOMEONE_ELSE").returncode != 0


@needs_dcmtk
def test_low_disk_answers_out_of_resources_and_writes_nothing(receiver, synthetic_chest):
    settings, port = receiver(disk_low_watermark_mb=10**9)
    run = store(port, sorted(synthetic_chest.glob("*.dcm"))[:3])
    assert run.returncode != 0  # storescu reports the failed stores
    db = open_database(settings.home_path)
    assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 0
    tmp = settings.home_path / "instances" / ".tmp"
    assert not tmp.exists() or not os.listdir(tmp)


@needs_dcmtk
def test_unacceptable_image_gets_a_cannot_understand_status_and_is_quarantined(receiver, synthetic_chest, tmp_path):
    import pydicom

    ds = pydicom.dcmread(min(synthetic_chest.glob("*.dcm")))
    ds.Rows = ds.Columns = 65535  # declares 8 GB of pixels, carries 64 bytes
    ds.PixelData = b"\0" * 64
    ds.save_as(tmp_path / "huge.dcm")
    settings, port = receiver()
    run = subprocess.run([str(STORESCU), "-v", "-aec", "APPLIANCE", "127.0.0.1", str(port), str(tmp_path / "huge.dcm")],
                         capture_output=True, text=True, timeout=60)
    assert "Error: CannotUnderstand" in run.stdout + run.stderr or "0xc000" in (run.stdout + run.stderr).lower()
    db = open_database(settings.home_path)
    assert db.execute("SELECT reason_code FROM quarantine").fetchall() == [("IMAGE_TOO_LARGE",)]
    assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 0


@needs_dcmtk
def test_sent_series_is_analysed_after_its_quiet_period_without_anyone_pressing_a_button(receiver, synthetic_chest):
    import threading
    import time

    from appliance.jobs.worker import Worker

    settings, port = receiver(quiet_period_seconds=1.0)
    stop = threading.Event()
    worker = Worker(settings)
    thread = threading.Thread(target=worker.run, args=(stop, 0.2), daemon=True)
    thread.start()
    try:
        assert store(port, sorted(synthetic_chest.glob("*.dcm"))).returncode == 0
        db = open_database(settings.home_path)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if db.execute("SELECT state FROM jobs").fetchall() == [("done",)]:
                break
            time.sleep(0.2)
        assert db.execute("SELECT state FROM jobs").fetchall() == [("done",)]
        assert db.execute("SELECT status FROM series").fetchone()[0] == "analyzed"
        assert db.execute("SELECT count(*) FROM results").fetchone()[0] >= 2
    finally:
        stop.set()
        thread.join(timeout=30)


def _assoc_rq_bytes(port_calling="RAWPEER"):
    """An A-ASSOCIATE-RQ proposing Verification, encoded by pynetdicom's PDU classes."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = port_calling
    primitive.called_ae_title = "APPLIANCE"
    context = build_context("1.2.840.10008.1.1")
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _recv_all(sock, timeout):
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


@needs_dcmtk
def test_malformed_pdu_is_dropped_and_the_service_stays_up(receiver):
    _, port = receiver()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"\x09\x00" + os.urandom(64))  # no such PDU type
        _recv_all(sock, 5)
    assert echo(port).returncode == 0


@needs_dcmtk
def test_oversize_pdu_ends_the_association_and_the_service_stays_up(receiver):
    _, port = receiver(dicom_max_pdu=16384, dicom_network_timeout=2.0)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_assoc_rq_bytes())
        accepted = sock.recv(6)
        assert accepted[:1] == b"\x02"  # A-ASSOCIATE-AC
        _recv_all(sock, 0.5)
        # a P-DATA-TF declaring 64 MiB, far beyond the 16 KiB we advertised
        sock.sendall(b"\x04\x00" + struct.pack(">I", 64 * 2**20) + b"\0" * 1024)
        reply = _recv_all(sock, 10)
    assert reply == b"" or reply[:1] == b"\x07"  # connection closed or A-ABORT
    assert echo(port).returncode == 0


@needs_dcmtk
def test_idle_association_is_closed_after_the_network_timeout(receiver):
    import time

    _, port = receiver(dicom_network_timeout=1.0)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_assoc_rq_bytes())
        t0 = time.monotonic()
        data = _recv_all(sock, 15)
        waited = time.monotonic() - t0
    assert data[:1] == b"\x02" and waited < 10  # accepted, then released/aborted by us, not by our 15 s wait
    assert echo(port).returncode == 0


@needs_dcmtk
def test_associations_beyond_the_maximum_are_refused_until_one_ends(receiver):
    _, port = receiver(dicom_max_associations=1, dicom_network_timeout=30.0)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_assoc_rq_bytes())
        assert sock.recv(6)[:1] == b"\x02"  # the one allowed association is open
        assert echo(port).returncode != 0  # a second caller is rejected (local limit exceeded)
    import time

    for _ in range(50):  # once the first ends, callers are served again
        if echo(port).returncode == 0:
            break
        time.sleep(0.1)
    assert echo(port).returncode == 0

"""The DICOM receiver against DCMTK's echoscu and storescu (an independent peer), on loopback."""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import config
from appliance.ingest import dicom_server
from appliance.ingest.dicom_guard import (
    MAX_CONTROL_PDU,
    P_DATA_SLACK,
    Caller,
    ConnectionLimits,
    PDUStream,
    Refusal,
    RefusalLedger,
    is_allowed,
    p_data_limit,
    parse_allowed_callers,
)
from appliance.store.database import open_database

from .conftest import need_data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import receiver_abuse  # the bench's socket helpers: one implementation of the attacks' plumbing

ECHOSCU, STORESCU = Path("/usr/bin/echoscu"), Path("/usr/bin/storescu")
needs_dcmtk = pytest.mark.skipif(not (ECHOSCU.exists() and STORESCU.exists()),
                                 reason="DCMTK is not installed (Debian package dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receivers:
    """Receivers started on free loopback ports for one test; ``stop()`` stops them (audit rows flushed)."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list = []

    def __call__(self, **overrides):
        """Start a receiver; returns (settings, port)."""
        port = free_port()
        values = {"home": str(self.tmp_path / "home"), "dicom_allowed_callers": "*@127.0.0.1",
                  "disk_low_watermark_mb": 0, "dicom_network_timeout": 5.0, "dicom_acse_timeout": 5.0}
        values.update(overrides)
        settings = config.load(environ={}, **values)
        open_database(settings.home_path)
        self.started.append(dicom_server.start(settings, port=port, address="127.0.0.1"))
        return settings, port

    def stop(self) -> None:
        while self.started:
            self.started.pop()()


@pytest.fixture
def receiver(tmp_path):
    """Start receivers on free loopback ports (``receiver(**settings)`` -> (settings, port)); stopped after."""
    receivers = Receivers(tmp_path)
    yield receivers
    receivers.stop()


def echo(port: int, calling: str = "ECHOSCU", called: str = "APPLIANCE") -> subprocess.CompletedProcess:
    return subprocess.run([str(ECHOSCU), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def store(port: int, files, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run([str(STORESCU), "-aet", calling, "-aec", "APPLIANCE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def pixel_sha256(ds) -> str:
    return hashlib.sha256(ds.PixelData).hexdigest()


def test_pdu_headers_over_the_limits_are_refused_as_they_complete():
    stream = PDUStream(max_p_data=p_data_limit(16384))
    release_rq = b"\x05\x00" + struct.pack(">I", 4) + b"\0" * 4
    p_data_at_limit = b"\x04\x00" + struct.pack(">I", 16384 + P_DATA_SLACK)
    assert stream.feed(release_rq[:3]) is None and stream.feed(release_rq[3:]) is None  # headers split anywhere
    assert stream.feed(p_data_at_limit) is None
    assert stream.feed(b"\0" * (16384 + P_DATA_SLACK)) is None  # its body: not mistaken for headers
    assert stream.feed(b"\x04\x00" + struct.pack(">I", 64 * 2**20)) is Refusal.PDU_TOO_LONG
    assert PDUStream(None).feed(b"\x01\x00" + struct.pack(">I", MAX_CONTROL_PDU + 1)) is Refusal.PDU_TOO_LONG
    assert PDUStream(None).feed(b"\x04\x00" + struct.pack(">I", 2**31)) is None  # dicom_max_pdu = 0: no limit
    assert PDUStream(None).feed(b"\x09\x00" + struct.pack(">I", 4)) is Refusal.UNKNOWN_PDU


def test_refusal_ledger_writes_the_first_refusal_at_once_and_the_rest_of_the_minute_as_one_count():
    now = [0.0]
    ledger = RefusalLedger(window_s=60, max_callers=2, clock=lambda: now[0])
    ledger.refused("dicom_association_refused", "INTRUDER@10.0.0.9", Refusal.CALLER_NOT_ALLOWED)
    assert ledger.wake.is_set()
    first = ledger.due()
    assert [(r.caller, r.count, r.first) for r in first] == [("INTRUDER@10.0.0.9", 1, True)]
    ledger.wake.clear()
    for _ in range(99):
        ledger.refused("dicom_association_refused", "INTRUDER@10.0.0.9", Refusal.CALLER_NOT_ALLOWED)
    assert not ledger.wake.is_set() and ledger.due() == []  # the rest waits for the window's end
    for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):  # more callers than it counts apart
        ledger.refused("dicom_connection_refused", address, Refusal.ADDRESS_NOT_ALLOWED)
    now[0] = 61.0
    rows = ledger.due()
    assert sorted((r.caller, r.count) for r in rows) == [("*", 2), ("10.0.0.1", 1), ("INTRUDER@10.0.0.9", 99)]
    assert sum(r.count for r in first + rows) == 103
    assert ledger.due(final=True) == []


def test_connection_limits_per_address_and_waiting():
    limits = ConnectionLimits(per_address=2, waiting=3)
    assert limits.open("10.0.0.1") is None and limits.open("10.0.0.1") is None
    assert limits.open("10.0.0.1") is Refusal.TOO_MANY_FROM_ADDRESS
    assert limits.open("10.0.0.2") is None
    assert limits.open("10.0.0.3") is Refusal.TOO_MANY_WAITING  # three already wait for their first PDU
    limits.associating()  # one of them associated: it holds its address's place, no longer a waiting one
    assert limits.open("10.0.0.3") is None
    limits.close("10.0.0.1", waiting=False)
    assert limits.open("10.0.0.1") is Refusal.TOO_MANY_WAITING
    limits.close("10.0.0.2", waiting=True)
    assert limits.open("10.0.0.1") is None


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
    settings, port = receiver(dicom_max_associations_per_address=8)  # a PACS sending on 8 associations at once
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
    assert "Association Rejected" in refused.stdout + refused.stderr
    assert echo(port, calling="SCANNER").returncode == 0  # the service is still up
    receiver.stop()
    db = open_database(settings.home_path)
    rows = db.execute("SELECT actor, action, detail FROM audit_log").fetchall()
    assert [(actor, action, json.loads(detail)["count"]) for actor, action, detail in rows] == [
        ("INTRUDER@127.0.0.1", "dicom_association_refused", 1)]


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
        sock.sendall(receiver_abuse.association_request("RAWPEER"))
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
        sock.sendall(receiver_abuse.association_request("RAWPEER"))
        t0 = time.monotonic()
        data = _recv_all(sock, 15)
        waited = time.monotonic() - t0
    assert data[:1] == b"\x02" and waited < 10  # accepted, then released/aborted by us, not by our 15 s wait
    assert echo(port).returncode == 0


@needs_dcmtk
def test_associations_beyond_the_maximum_are_refused_until_one_ends(receiver):
    _, port = receiver(dicom_max_associations=1, dicom_network_timeout=30.0)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(receiver_abuse.association_request("RAWPEER"))
        assert sock.recv(6)[:1] == b"\x02"  # the one allowed association is open
        assert echo(port).returncode != 0  # a second caller is rejected (local limit exceeded)
    import time

    for _ in range(50):  # once the first ends, callers are served again
        if echo(port).returncode == 0:
            break
        time.sleep(0.1)
    assert echo(port).returncode == 0


# --- abuse: idle holders, oversize PDUs, a full disk, refusal floods -------------------------------------------

def _echo_until_success(port: int, seconds: float) -> float | None:
    """Seconds until a real echoscu succeeded, retrying until ``seconds`` have passed; None if it never did."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if echo(port).returncode == 0:
            return time.monotonic() - t0
        time.sleep(0.2)
    return None


@needs_dcmtk
def test_idle_connections_from_another_host_do_not_block_a_real_caller(receiver):
    # regression: 8 idle TCP connections held all 8 association slots for 30 s
    # the idle ones are not closed by the first-PDU timeout during this test: the per-address limit serves the caller
    _, port = receiver(dicom_allowed_callers="*@127.0.0.1,*@127.0.0.2", dicom_acse_timeout=30.0,
                       dicom_first_pdu_timeout=30.0, dicom_max_associations_per_address=4)
    idle = [receiver_abuse.connect(port, "127.0.0.2") for _ in range(12)]
    try:
        waited = _echo_until_success(port, 3.0)
        assert waited is not None and waited < 3.0
    finally:
        for sock in idle:
            sock.close()


@needs_dcmtk
def test_connection_that_sends_no_association_request_is_closed_after_the_first_pdu_timeout(receiver):
    _, port = receiver(dicom_acse_timeout=30.0, dicom_first_pdu_timeout=1.0, dicom_max_associations_per_address=4)
    idle = [receiver_abuse.connect(port) for _ in range(8)]  # the caller's own address: every slot it may hold is taken
    try:
        waited = _echo_until_success(port, 6.0)
        assert waited is not None and waited < 5.0
        closed = [receiver_abuse.wait_closed(sock, 5.0) for sock in idle]
        assert all(c is not None for c in closed), closed
    finally:
        for sock in idle:
            sock.close()


def test_association_request_dripped_slower_than_the_first_pdu_timeout_is_closed(receiver):
    _, port = receiver(dicom_first_pdu_timeout=1.0)
    t0 = time.monotonic()
    with receiver_abuse.connect(port) as sock:
        with contextlib.suppress(OSError):
            for byte in receiver_abuse.association_request("RAWPEER"):  # a byte every 50 ms: 12 s for the whole request
                sock.send(bytes([byte]))
                time.sleep(0.05)
        assert receiver_abuse.wait_closed(sock, 5.0) is not None
    assert time.monotonic() - t0 < 4.0


def test_connections_beyond_the_per_address_limit_are_closed_at_once(receiver):
    _, port = receiver(dicom_allowed_callers="*@127.0.0.2", dicom_first_pdu_timeout=10.0,
                       dicom_max_associations_per_address=2)
    held = [receiver_abuse.connect(port, "127.0.0.2") for _ in range(2)]
    try:
        time.sleep(0.3)
        extra = receiver_abuse.connect(port, "127.0.0.2")
        assert receiver_abuse.wait_closed(extra, 2.0) is not None
        assert all(receiver_abuse.wait_closed(sock, 0.3) is None for sock in held)  # the first two are still waited for
    finally:
        for sock in held:
            sock.close()


def test_address_not_on_the_allow_list_is_closed_before_anything_is_read(receiver):
    _, port = receiver(dicom_allowed_callers="SCANNER@127.0.0.1", dicom_first_pdu_timeout=10.0)
    with receiver_abuse.connect(port, "127.0.0.3") as sock:
        assert receiver_abuse.wait_closed(sock, 2.0) is not None


def test_association_request_claiming_a_megabyte_is_refused_before_its_body(receiver):
    _, port = receiver(dicom_first_pdu_timeout=10.0)
    with receiver_abuse.connect(port) as sock:
        sock.sendall(b"\x01\x00" + struct.pack(">I", 2**20) + b"\0" * 64)
        assert receiver_abuse.wait_closed(sock, 2.0) is not None


def _vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _send_oversize_pdata(port: int, claimed: int) -> tuple[int, float]:
    """Associate, then send a P-DATA-TF header claiming ``claimed`` bytes and stream its body until refused.

    Returns (body bytes the receiver let in before closing, seconds until it closed).
    """
    with receiver_abuse.connect(port) as sock:
        sock.sendall(receiver_abuse.association_request("RAWPEER"))
        assert sock.recv(6)[:1] == b"\x02"  # A-ASSOCIATE-AC
        _recv_all(sock, 0.3)
        t0 = time.monotonic()
        sock.sendall(b"\x04\x00" + struct.pack(">I", claimed))
        sent, chunk = 0, b"\0" * 2**20
        sock.settimeout(5.0)
        try:
            while sent < claimed and time.monotonic() - t0 < 10:
                sent += sock.send(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        closed = receiver_abuse.wait_closed(sock, 5.0)
        return sent, (time.monotonic() - t0 if closed is not None else float("inf"))


@pytest.fixture
def receiver_process(tmp_path):
    """`appliance dicom` in its own process on a free loopback port; yields (pid, port)."""
    port = free_port()
    env = dict(os.environ, APPLIANCE_HOME=str(tmp_path / "proc-home"), APPLIANCE_DICOM_PORT=str(port),
               APPLIANCE_DICOM_BIND_ADDRESS="127.0.0.1", APPLIANCE_DICOM_ALLOWED_CALLERS="*@127.0.0.1",
               APPLIANCE_DISK_LOW_WATERMARK_MB="0", APPLIANCE_DICOM_NETWORK_TIMEOUT="10")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "dicom"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _echo_until_success(port, 60.0) is not None, "the receiver did not start"
        yield proc.pid, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@needs_dcmtk
def test_pdata_claiming_64_mib_is_refused_before_its_body_is_read(receiver_process):
    # regression: a P-DATA-TF claiming 64 MiB (we advertise 256 KiB) was read in full: RSS 83 -> 280 MB
    pid, port = receiver_process
    peak_before = _vm_kib(pid, "VmHWM")
    sent, seconds = _send_oversize_pdata(port, 64 * 2**20)
    growth_mib = (_vm_kib(pid, "VmHWM") - peak_before) / 1024
    assert seconds < 3.0, seconds
    assert sent < 16 * 2**20, sent  # what the sockets' buffers took before the close, not 64 MiB
    assert growth_mib < 8, growth_mib
    assert echo(port).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MiB tmpfs (needs root); unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path, leave_bytes: int) -> None:
    """Write a filler file so that about ``leave_bytes`` stay free on ``folder``'s file system."""
    import shutil

    free = shutil.disk_usage(folder).free
    with open(folder / "filler.bin", "wb") as out:
        remaining = max(0, free - leave_bytes)
        while remaining > 0:
            n = min(remaining, 2**20)
            out.write(b"\xff" * n)
            remaining -= n


@needs_dcmtk
def test_full_disk_answers_out_of_resources_and_leaves_no_scratch_file(small_disk, receiver, synthetic_chest):
    # regression: ENOSPC while writing was answered 0xC211 (Unable to process)
    settings, port = receiver(home=str(small_disk / "home"), disk_low_watermark_mb=0)
    assert echo(port).returncode == 0  # the store and its database exist before the disk fills
    _fill(small_disk, leave_bytes=400 * 1024)
    files = sorted(synthetic_chest.glob("*.dcm"))
    run = subprocess.run([str(STORESCU), "-v", "--no-halt", "-aec", "APPLIANCE", "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    responses = [line for line in out.splitlines() if "Received Store Response" in line]
    assert len(responses) == len(files), out[-2000:]
    assert any("OutOfResources" in line for line in responses), out[-2000:]  # DCMTK names 0xA7xx so
    assert all("Success" in line or "OutOfResources" in line for line in responses), out[-2000:]
    assert not list((settings.home_path / "instances").rglob("*.part"))
    (small_disk / "filler.bin").unlink()  # once there is room again, the same images are taken
    assert store(port, files).returncode == 0
    db = open_database(settings.home_path)
    assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == len(files)


def test_flood_of_refused_associations_writes_a_few_audit_rows_that_count_them_all(receiver):
    # regression: 202 refused associations wrote 202 audit rows in 4.4 s
    settings, port = receiver(dicom_allowed_callers="SCANNER@127.0.0.1")
    request = receiver_abuse.association_request(calling="INTRUDER")
    for _ in range(200):
        with receiver_abuse.connect(port) as sock:
            sock.sendall(request)
            assert _recv_all(sock, 5)[:1] == b"\x03"  # A-ASSOCIATE-RJ
    receiver.stop()  # the last window's count is written when the receiver stops
    db = open_database(settings.home_path)
    rows = db.execute("SELECT actor, action, detail FROM audit_log").fetchall()
    assert 1 <= len(rows) <= 4, rows
    assert {(actor, action) for actor, action, _ in rows} == {("INTRUDER@127.0.0.1", "dicom_association_refused")}
    assert sum(json.loads(detail)["count"] for _, _, detail in rows) == 200

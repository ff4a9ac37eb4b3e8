"""`appliance doctor` against a real data directory: real receiver, web UI, worker lock, PACS peers, packs.

A full disk is simulated as the receiver sees one: ``disk_low_watermark_mb`` set above the free space.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import cli, config, doctor
from appliance.ingest import dicom_server
from appliance.jobs.owner import WorkerLock
from appliance.store.database import audit, open_database, utcnow
from appliance.store.datadir import DataDirectory

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Settings:
    """A data directory with its database, on free loopback ports, no PACS; the CLI reads the same."""
    values = {"APPLIANCE_HOME": str(tmp_path / "home"), "APPLIANCE_DICOM_PORT": str(free_port()),
              "APPLIANCE_WEB_PORT": str(free_port()), "APPLIANCE_DICOM_BIND_ADDRESS": "127.0.0.1",
              "APPLIANCE_DICOM_ALLOWED_CALLERS": "*@127.0.0.1", "APPLIANCE_DISK_LOW_WATERMARK_MB": "0"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = config.load(environ=values)
    open_database(settings.home_path).conn.close()
    return settings


def by_name(report: dict, name: str) -> dict:
    return next(r for r in report["checks"] if r["check"] == name)


@pytest.fixture
def receiver(site: config.Settings) -> Iterator[None]:
    stop = dicom_server.start(site, port=site.dicom_port, address="127.0.0.1")
    yield
    assert stop is not None
    stop()


@pytest.fixture
def web(site: config.Settings) -> Iterator[None]:
    """The real web UI (waitress) on the site's web port."""
    from waitress.server import create_server

    from appliance.web import create_app

    server = create_server(create_app(site), host="127.0.0.1", port=site.web_port, threads=1)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield
    server.close()
    thread.join(timeout=5)


@pytest.fixture
def verification_scp() -> Iterator[int]:
    """A PACS that answers C-ECHO (pynetdicom Verification SCP) on a free loopback port."""
    from pynetdicom import AE, VerificationPresentationContexts

    ae = AE(ae_title="PACS")
    ae.supported_contexts = VerificationPresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


def test_a_stopped_receiver_is_a_problem_with_its_fix(site):
    report = doctor.run_checks(site)
    row = by_name(report, "receiver")
    assert row["status"] == doctor.PROBLEM and f"port {site.dicom_port}" in row["detail"]
    assert "systemctl restart appliance-dicom" in row["fix"]
    assert report["ok"] is False


def test_a_running_receiver_is_ok_with_the_address_it_listens_on(site, receiver):
    report = doctor.run_checks(site)
    assert by_name(report, "receiver") == {"check": "receiver", "status": doctor.OK,
                                           "detail": f"listening on 127.0.0.1:{site.dicom_port}", "fix": ""}
    ports = by_name(report, "ports")
    assert ports["status"] == doctor.WARNING and "only from this box" in ports["detail"]
    assert "dicom_bind_address" in ports["fix"]


def test_a_full_disk_is_a_problem_with_its_fix(site):
    free_mb = shutil.disk_usage(site.home_path).free // 2**20
    full = site.replace(disk_low_watermark_mb=free_mb + 10_000)  # the receiver would refuse images: as full
    row = by_name(doctor.run_checks(full), "data directory")
    assert row["status"] == doctor.PROBLEM and row["detail"].startswith("disk nearly full")
    assert "free space" in row["fix"]
    assert by_name(doctor.run_checks(site), "data directory")["status"] == doctor.OK


def test_an_unreachable_pacs_is_a_problem_and_a_reachable_one_ok_within_seconds(site, verification_scp):
    closed = free_port()
    both = site.replace(pacs_destinations=f"PACS@127.0.0.1:{verification_scp}, GONE@127.0.0.1:{closed}")
    started = time.monotonic()
    report = doctor.run_checks(both)
    assert time.monotonic() - started < 5.0
    reachable = by_name(report, f"pacs PACS@127.0.0.1:{verification_scp}")
    assert reachable["status"] == doctor.OK and "answered C-ECHO" in reachable["detail"]
    gone = by_name(report, f"pacs GONE@127.0.0.1:{closed}")
    assert gone["status"] == doctor.PROBLEM and "does not answer" in gone["detail"]
    assert f"127.0.0.1:{closed}" in gone["fix"] and "C-ECHO" in gone["fix"]


def test_a_tampered_pack_is_a_problem(site, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(REPO / "engines" / "lung-segmentation", engines / "lung-segmentation")
    model = engines / "lung-segmentation" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0xFF
    model.write_bytes(bytes(data))
    report = doctor.run_checks(site.replace(engines_dir=str(engines)))
    row = by_name(report, "pack lung-segmentation")
    assert row["status"] == doctor.PROBLEM and "PACK_TAMPERED" in row["detail"] and "reinstall" in row["fix"]


def test_a_pack_whose_signature_no_longer_holds_is_a_problem(site, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance.inference import trust

    engines = tmp_path / "engines"
    shutil.copytree(REPO / "engines" / "lung-segmentation", engines / "lung-segmentation")
    trust.sign_pack(engines / "lung-segmentation", Ed25519PrivateKey.generate(), "someone")
    row = by_name(doctor.run_checks(site.replace(engines_dir=str(engines))), "pack lung-segmentation")
    assert row["status"] == doctor.PROBLEM and "UNTRUSTED_SIGNER" in row["detail"]


def test_a_worker_is_seen_by_its_lock(site):
    assert by_name(doctor.run_checks(site), "worker")["status"] == doctor.PROBLEM
    lock = WorkerLock(DataDirectory(site.home_path))
    try:
        assert by_name(doctor.run_checks(site), "worker")["status"] == doctor.OK
    finally:
        lock.release()


def test_set_aside_results_are_a_problem_saying_where_to_retry(site):
    db = open_database(site.home_path)
    db.table("outbox").insert({"destination": "PACS@10.0.0.2:104", "sop_instance_uid": "1.2.3", "path": "x.dcm",
                               "state": "set_aside", "attempts": 3, "created_at": utcnow()})
    row = by_name(doctor.run_checks(site), "outbox")
    assert row["status"] == doctor.PROBLEM and "1 refused by the PACS" in row["detail"]
    assert "Admin -> Results the PACS refused -> retry or discard" in row["fix"]


def test_a_clock_behind_the_newest_record_is_a_problem(site):
    audit(open_database(site.home_path), "test", "something")
    ctx = doctor.Context(site, now=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=2))
    try:
        row = doctor.check_clock(ctx)[0]
    finally:
        ctx.close()
    assert row["status"] == doctor.PROBLEM and "timedatectl" in row["fix"]
    assert by_name(doctor.run_checks(site), "clock")["status"] == doctor.OK


def test_a_check_that_fails_is_reported_not_raised(site):
    def broken(ctx: doctor.Context) -> list[doctor.Row]:
        raise OSError("disk went away")

    report = doctor.run_checks(site, checks=[("broken", broken), ("version", doctor.check_version)])
    assert report["checks"][0] == {"check": "broken", "status": doctor.PROBLEM,
                                   "detail": "check failed: OSError: disk went away",
                                   "fix": "read the detail to the support line; the other checks still ran"}
    assert report["checks"][1]["status"] == doctor.OK


def test_json_shape_and_exit_status(site, capsys):
    rc = cli.main(["doctor", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["ok"] is False and doc["version"]
    assert {"version", "data directory", "database", "clock", "receiver", "web", "worker", "ports", "pacs",
            "gpu", "export", "outbox"} <= {r["check"] for r in doc["checks"]}
    for r in doc["checks"]:
        assert set(r) == {"check", "status", "detail", "fix"} and r["status"] in ("ok", "warning", "problem")
        assert r["status"] == "ok" or r["fix"]
    rc = cli.main(["doctor"])
    text = capsys.readouterr().out
    assert rc == 1 and "FAIL  receiver" in text and "fix: start it: systemctl restart appliance-dicom" in text


def test_everything_running_exits_zero(site, receiver, web, capsys):
    lock = WorkerLock(DataDirectory(site.home_path))
    try:
        rc = cli.main(["doctor", "--json"])
    finally:
        lock.release()
    doc = json.loads(capsys.readouterr().out)
    problems = [r for r in doc["checks"] if r["status"] == "problem"]
    assert problems == [] and rc == 0 and doc["ok"] is True
    assert by_name(doc, "web")["detail"] == f"listening on 127.0.0.1:{site.web_port}"


def test_an_imported_pack_changed_after_its_import_is_a_problem(site, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance import signing
    from appliance.inference import pack_import, trust

    from .test_packs_import import make_pack

    key = Ed25519PrivateKey.generate()
    (tmp_path / "partner.pub").write_text(signing.public_text(key.public_key()))
    trust.trust_key(site.home_path, tmp_path / "partner.pub")
    done = pack_import.import_pack(make_pack(tmp_path / "usb", "lung-segmentation", "1.1.0", key),
                                   site.home_path, site.engines_path)
    row = by_name(doctor.run_checks(site), "pack lung-segmentation")
    assert row["status"] == doctor.OK and "1.1.0 (imported)" in row["detail"] and "Partner" in row["detail"]
    with open(done.pack.path / "LICENSE", "a") as f:
        f.write("changed on the box")
    row = by_name(doctor.run_checks(site), "pack lung-segmentation 1.1.0")
    assert row["status"] == doctor.PROBLEM and "PACK_TAMPERED" in row["detail"]


def test_the_install_prefix_of_a_bundle_layout_is_found_from_the_venv(tmp_path):
    venv = tmp_path / "opt" / "versions" / "0.2.0" / "venv"
    venv.mkdir(parents=True)
    (tmp_path / "opt" / "current").symlink_to("versions/0.2.0")
    assert doctor.install_prefix(tmp_path / "opt" / "current" / "venv") == tmp_path / "opt"
    assert doctor.install_prefix(venv) == tmp_path / "opt"
    assert doctor.install_prefix(REPO / ".venv") is None


def test_listening_sockets_are_read_with_their_addresses(site):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert doctor.bound_addresses(port, doctor.listening_sockets()) == ["127.0.0.1"]
    assert doctor.bound_addresses(port, doctor.listening_sockets()) == []


def test_the_https_certificate_is_checked_once_the_proxy_is_set_up(site: config.Settings) -> None:
    from appliance import https

    assert by_name(doctor.run_checks(site, [("https", doctor.check_https)]), "https")["status"] == doctor.OK
    proxied = site.replace(web_behind_proxy=True)
    missing = by_name(doctor.run_checks(proxied, [("https", doctor.check_https)]), "https")
    assert missing["status"] == doctor.PROBLEM and "appliance https setup" in missing["fix"]
    https.site_certificate(site.home_path, ["localhost"], "Clinic A")
    valid = by_name(doctor.run_checks(proxied, [("https", doctor.check_https)]), "https")
    days = int(re.search(r"valid for (\d+) more days", valid["detail"])[1])
    assert valid["status"] == doctor.OK and 823 <= days <= 825

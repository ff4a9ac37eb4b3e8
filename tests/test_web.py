"""The web UI through Flask's test client: accounts and safety, worklist, study, review, report, upload, admin."""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pypdf import PdfReader

from appliance.jobs.intake import analyze_paths
from appliance.store.database import open_database
from appliance.web import bind_address, create_app
from tests.web_helpers import PASSWORDS, csrf, login, make_accounts, web_settings


@pytest.fixture
def client(app_settings):
    return create_app(app_settings, environ={}).test_client()


@pytest.fixture(scope="module")
def analysed_home(tmp_path_factory, synthetic_chest):
    """A data directory holding one analysed synthetic study, shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("web")
    settings = web_settings(tmp)
    analyze_paths([synthetic_chest], settings)
    make_accounts(settings.home_path)
    return settings


def _audit(home: Path, action: str) -> list[dict]:
    db = open_database(home)
    try:
        return list(db.query("SELECT * FROM audit_log WHERE action = ? ORDER BY id", [action]))
    finally:
        db.conn.close()


def _study_uid(client) -> str:
    return re.search(r"/study/([0-9.]+)", client.get("/").get_data(as_text=True)).group(1)


# accounts and safety

def test_unauthenticated_requests_go_to_login(client):
    for path in ("/", "/import", "/admin/", "/study/1.2.3", "/study/1.2.3/report.pdf"):
        response = client.get(path)
        assert response.status_code == 302 and "/login" in response.headers["Location"], path
    assert client.get("/api/progress").status_code == 401


def test_fresh_install_has_no_account_and_first_admin_is_made_from_loopback_only(tmp_path):
    settings = web_settings(tmp_path)
    client = create_app(settings, environ={}).test_client()
    page = client.get("/login").get_data(as_text=True)
    assert "Create the first admin account" in page
    token = csrf(client, "/setup")
    remote = client.post("/setup", data={"username": "boss", "password": "long enough pw", "confirm": "long enough pw",
                                         "csrf_token": token}, environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert remote.status_code == 403
    weak = client.post("/setup", data={"username": "boss", "password": "short", "confirm": "short",
                                       "csrf_token": token})
    assert weak.status_code == 200 and "at least 10 characters" in weak.get_data(as_text=True)
    made = client.post("/setup", data={"username": "boss", "password": "long enough pw", "confirm": "long enough pw",
                                       "csrf_token": token})
    assert made.status_code == 302
    assert client.get("/setup").status_code == 302  # once only
    assert client.post("/login", data={"username": "boss", "password": "long enough pw",
                                       "csrf_token": token}).status_code == 302


def test_login_without_csrf_token_is_refused(client):
    response = client.post("/login", data={"username": "admin", "password": PASSWORDS["admin"]})
    assert response.status_code == 400
    assert client.get("/").status_code == 302  # not signed in


def test_state_changing_requests_need_the_csrf_token(client):
    login(client, "admin")
    assert client.post("/logout").status_code == 400
    assert client.post("/admin/settings", data={"name": "site_name", "value": "X"}).status_code == 400


def test_sixth_wrong_password_within_a_minute_is_429(client, app_settings):
    token = csrf(client)
    codes = [client.post("/login", data={"username": "tech", "password": f"wrong {i}", "csrf_token": token}).status_code
             for i in range(6)]
    assert codes == [401] * 5 + [429]
    # the right password is refused too while the limit lasts for this browser, which is not a known
    # device of the account, so guessing gains nothing (tests/test_web_security.py: known devices)
    right = client.post("/login", data={"username": "tech", "password": PASSWORDS["tech"], "csrf_token": token})
    assert right.status_code == 429 and 1 <= int(right.headers["Retry-After"]) <= 60
    assert len(_audit(app_settings.home_path, "login_failed")) == 5


def test_session_cookie_flags_and_security_headers(client):
    response = login(client, "tech")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    page = client.get("/")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Cache-Control"] == "no-store"


def test_secure_cookies_behind_tls(tmp_path):
    settings = web_settings(tmp_path, web_secure_cookies=True)
    make_accounts(settings.home_path)
    client = create_app(settings, environ={}).test_client()
    assert "Secure" in login(client, "tech").headers["Set-Cookie"]


def test_idle_session_must_log_in_again(tmp_path):
    settings = web_settings(tmp_path, web_idle_timeout_minutes=0.5)
    make_accounts(settings.home_path)
    client = create_app(settings, environ={}).test_client()
    login(client, "tech")
    assert client.get("/").status_code == 200
    with client.session_transaction() as session:
        session["seen"] = time.time() - 20
    assert client.get("/api/progress").status_code == 200  # polling is allowed but is not activity
    with client.session_transaction() as session:
        assert time.time() - session["seen"] >= 20
        session["seen"] = time.time() - 31
    assert client.get("/").status_code == 302


def test_roles(client):
    login(client, "tech")
    assert client.get("/admin/").status_code == 403
    assert client.get("/admin/users").status_code == 403
    token = csrf(client, "/")
    assert client.post("/study/1.2.3/review", data={"result_id": 1, "decision": "confirmed",
                                                    "csrf_token": token}).status_code == 403
    client = client.application.test_client()
    login(client, "rad")
    assert client.get("/import").status_code == 403
    assert client.get("/admin/").status_code == 403


def test_logins_are_audited(client, app_settings):
    login(client, "rad")
    assert [r["actor"] for r in _audit(app_settings.home_path, "login")] == ["rad"]


def test_one_database_connection_per_request_closed_at_teardown(app_settings):
    import sqlite3

    from appliance.web.db import get_db

    app = create_app(app_settings, environ={})
    with app.test_request_context("/"):
        first = get_db()
        assert get_db() is first and first["users"].count > 0
    with pytest.raises(sqlite3.ProgrammingError):  # closed when the request's app context ended
        first.execute("SELECT 1")


def test_bind_address_stays_on_loopback_until_an_admin_exists(tmp_path):
    settings = web_settings(tmp_path, web_host="0.0.0.0")
    host, why = bind_address(settings)
    assert host == "127.0.0.1" and "first admin" in why
    make_accounts(settings.home_path)
    assert bind_address(settings) == ("0.0.0.0", None)


def test_users_command_reads_the_password_from_stdin(tmp_path):
    import subprocess
    import sys

    home = tmp_path / "home"
    env = {"APPLIANCE_HOME": str(home), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "users", "add", "amina", "--role", "technician"],
                         input="a good long password\n", capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    weak = subprocess.run([sys.executable, "-m", "appliance.cli", "users", "add", "bob", "--role", "admin"],
                          input="short\n", capture_output=True, text=True, env=env)
    assert weak.returncode == 1 and "ACCOUNT" in weak.stderr
    client = create_app(web_settings(tmp_path), environ={}).test_client()
    token = csrf(client)
    assert client.post("/login", data={"username": "amina", "password": "a good long password",
                                       "csrf_token": token}).status_code == 302


# worklist, study, viewer, review, report

def test_worklist_lists_the_study_with_flags_and_filters(analysed_home):
    client = create_app(analysed_home, environ={}).test_client()
    login(client, "tech")
    page = client.get("/").get_data(as_text=True)
    assert "PHANTOM" in page and "chest-covid19" in page and "s-done" in page
    assert "No study matches" in client.get("/?q=nobody-by-that-name").get_data(as_text=True)
    assert "PHANTOM" in client.get("/?q=phantom synthetic3").get_data(as_text=True)  # name components spaced
    assert "PHANTOM" in client.get("/?q=SYN-000003").get_data(as_text=True)  # patient ID, any case
    assert "No study matches" in client.get("/?q=%25").get_data(as_text=True)  # a literal % is no wildcard
    flagged = client.get("/?flagged=1").get_data(as_text=True)
    assert ("PHANTOM" in flagged) == ("flag on" in page)
    assert "PHANTOM" in client.get("/?status=done").get_data(as_text=True)
    assert "No study matches" in client.get("/?status=failed").get_data(as_text=True)
    uid = _study_uid(client)
    progress = client.get(f"/api/progress?study={uid}").get_json()
    assert progress[uid]["status"] == "done"
    assert {f["model"] for f in progress[uid]["flags"]} >= {"chest-covid19"}


def test_study_page_shows_models_banner_key_images_and_viewer(analysed_home):
    client = create_app(analysed_home, environ={}).test_client()
    login(client, "tech")
    uid = _study_uid(client)
    page = client.get(f"/study/{uid}").get_data(as_text=True)
    assert "chest-covid19" in page and "onnxruntime" in page and "Not validated on clinical data" in page
    assert "SARS-CoV-2 CT-scan dataset" in page  # the model's own note on what it was trained on
    key = re.search(r'src="(/result/\d+/key/\d+\.png)"', page).group(1)
    image = client.get(key)
    assert image.status_code == 200 and image.data[:4] == b"\x89PNG"
    assert _audit(analysed_home.home_path, "study_viewed")[-1]["object"] == uid
    assert "Confirm finding" not in page  # technicians do not review


def test_viewer_serves_hu_of_the_stored_images_in_stacking_order(analysed_home):
    client = create_app(analysed_home, environ={}).test_client()
    login(client, "tech")
    page = client.get(f"/study/{_study_uid(client)}").get_data(as_text=True)
    base = re.search(r'data-base="([^"]+)"', page).group(1)
    index = client.get(f"{base}/viewer.json").get_json()
    assert index["slices"] == 40 and "chest-covid19" in index["overlays"]
    doc = json.loads((analysed_home.home_path / "artefacts").glob("*/*/viewer.json").__next__().read_text())
    for k in (0, 17, 39):
        response = client.get(f"{base}/slice/{k}")
        hu = np.frombuffer(response.data, dtype="<i2").reshape(int(response.headers["X-Rows"]), -1)
        ds = pydicom.dcmread(analysed_home.home_path / doc["frames"][k]["path"])
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, expected.astype(np.int16))
    positions = [float(pydicom.dcmread(analysed_home.home_path / f["path"], stop_before_pixels=True)
                       .ImagePositionPatient[2]) for f in doc["frames"]]
    assert positions == sorted(positions) or positions == sorted(positions, reverse=True)
    overlay = client.get(f"{base}/overlay/chest-covid19/20.png")
    assert overlay.status_code == 200 and overlay.data[:4] == b"\x89PNG"
    assert client.get(f"{base}/slice/40").status_code == 404
    assert client.get(f"{base}/overlay/..%2F..%2Fetc/1.png").status_code == 404


def test_radiologist_review_is_stored_audited_and_shown(analysed_home):
    client = create_app(analysed_home, environ={}).test_client()
    login(client, "rad")
    uid = _study_uid(client)
    page = client.get(f"/study/{uid}").get_data(as_text=True)
    result_id = re.search(r'name="result_id" value="(\d+)"', page).group(1)
    token = csrf(client, f"/study/{uid}")
    response = client.post(f"/study/{uid}/review", data={"result_id": result_id, "decision": "rejected",
                                                          "comment": "motion artefact", "csrf_token": token})
    assert response.status_code == 302
    page = client.get(f"/study/{uid}").get_data(as_text=True)
    assert "motion artefact" in page and "Reviewed by rad" in page
    entry = _audit(analysed_home.home_path, "review")[-1]
    assert entry["actor"] == "rad" and json.loads(entry["detail"])["decision"] == "rejected"
    db = open_database(analysed_home.home_path)
    assert db.execute("SELECT count(*) FROM jobs WHERE kind = 'report' AND state = 'queued'").fetchone()[0] == 1
    db.conn.close()
    bad = client.post(f"/study/{uid}/review", data={"result_id": result_id, "decision": "maybe", "csrf_token": token})
    assert bad.status_code == 400


@pytest.mark.parametrize(("language", "expected"), [("en", "CT screening report"), ("fr", "Compte rendu de dépistage"),
                                                   ("es", "Informe de cribado")])
def test_report_pdf_in_three_languages(analysed_home, language, expected):
    client = create_app(analysed_home, environ={}).test_client()
    login(client, "tech")
    uid = _study_uid(client)
    response = client.get(f"/study/{uid}/report.pdf", headers={"Accept-Language": language})
    assert response.status_code == 200 and response.mimetype == "application/pdf"
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(response.data)).pages)
    text = re.sub(r"\s+", " ", text)
    assert expected in text and "PHANTOM SYNTHETIC3" in text and "chest-covid19" in text
    assert {"en": "research use only", "fr": "usage de recherche", "es": "solo para investigación"}[language] in text
    assert json.loads(_audit(analysed_home.home_path, "report_exported")[-1]["detail"])["language"] == language
    html = client.get(f"/study/{uid}/report", headers={"Accept-Language": language}).get_data(as_text=True)
    assert expected in html


# upload

def _dicom_parts(folder: Path) -> list[tuple[io.BytesIO, str]]:
    return [(io.BytesIO(p.read_bytes()), p.name) for p in sorted(folder.glob("*.dcm"))]


def test_upload_in_batches_queues_the_series_on_the_last(client, app_settings, synthetic_chest):
    login(client, "tech")
    token = csrf(client, "/import")
    parts = _dicom_parts(synthetic_chest)
    first = client.post("/import/upload", data={"files": parts[:25], "csrf_token": token},
                        content_type="multipart/form-data")
    assert first.status_code == 200, first.get_data(as_text=True)
    body = first.get_json()
    assert body["stored"] == 25 and body["queued_series"] == 0
    db = open_database(app_settings.home_path)
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0  # nothing analysed half-sent
    last = client.post("/import/upload", data={"files": parts[25:] + [(io.BytesIO(b"not dicom"), "notes.txt")],
                                               "upload_id": body["upload_id"], "final": "1", "csrf_token": token},
                       content_type="multipart/form-data").get_json()
    assert last["stored"] == 15 and last["queued_series"] == 1
    assert last["quarantined"][0]["reason_code"] == "NOT_DICOM"
    assert db.execute("SELECT state FROM jobs").fetchall() == [("queued",)]
    row = db.execute("SELECT state, stored, quarantined, series FROM imports").fetchone()
    assert row == ("done", 40, 1, 1)
    assert _audit(app_settings.home_path, "import")[-1]["actor"] == "tech"
    page = client.get("/import").get_data(as_text=True)
    assert "NOT_DICOM" in page and "notes.txt" in page


def test_upload_of_a_zip(client, app_settings, synthetic_chest, tmp_path):
    login(client, "tech")
    token = csrf(client, "/import")
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(synthetic_chest.glob("*.dcm")):
            z.write(p, f"study/{p.name}")
    body = client.post("/import/upload", data={"files": [(io.BytesIO(archive.read_bytes()), "series.zip")],
                                               "final": "1", "csrf_token": token},
                       content_type="multipart/form-data").get_json()
    assert body["stored"] == 40 and body["queued_series"] == 1


def test_oversize_upload_is_413(tmp_path, synthetic_chest):
    settings = web_settings(tmp_path, max_upload_bytes=200_000)
    make_accounts(settings.home_path)
    client = create_app(settings, environ={}).test_client()
    login(client, "tech")
    token = csrf(client, "/import")
    response = client.post("/import/upload", data={"files": _dicom_parts(synthetic_chest), "csrf_token": token},
                           content_type="multipart/form-data")
    assert response.status_code == 413 and "larger" in response.get_json()["message"]
    assert not list((settings.home_path / "instances").rglob("*.dcm"))


def test_admin_retries_and_deletes_quarantined_files(client, app_settings, synthetic_chest):
    login(client, "admin")
    token = csrf(client, "/import")
    parts = [(io.BytesIO(b"garbage"), "a.bin"), (io.BytesIO(b"more garbage"), "b.bin")]
    client.post("/import/upload", data={"files": parts, "final": "1", "csrf_token": token},
                content_type="multipart/form-data")
    db = open_database(app_settings.home_path)
    ids = [r[0] for r in db.execute("SELECT id FROM quarantine ORDER BY id")]
    assert len(ids) == 2
    assert client.post(f"/quarantine/{ids[0]}/delete", data={"csrf_token": token}).status_code == 302
    assert client.post(f"/quarantine/{ids[1]}/retry", data={"csrf_token": token}).status_code == 302
    rows = db.execute("SELECT original_name, reason_code FROM quarantine").fetchall()
    assert rows == [("b.bin", "NOT_DICOM")]  # refused again, kept once with today's reason
    assert _audit(app_settings.home_path, "quarantine_delete") and _audit(app_settings.home_path, "quarantine_retry")


# admin

def test_admin_pages_and_settings_change_is_saved_and_audited(client, app_settings):
    login(client, "admin")
    for path in ("/admin/", "/admin/dicom", "/admin/users", "/admin/audit", "/admin/settings"):
        assert client.get(path).status_code == 200, path
    page = client.get("/admin/").get_data(as_text=True)
    assert "chest-covid19" in page and "onnxruntime" in page and "TensorRT" in page
    token = csrf(client, "/admin/settings")
    client.post("/admin/settings", data={"name": "site_name", "value": "Clinic of St John's", "csrf_token": token})
    toml = (app_settings.home_path / "appliance.toml").read_text()
    assert 'site_name = "Clinic of St John\'s"' in toml
    refused = client.post("/admin/settings", data={"name": "dicom_port", "value": "eleven", "csrf_token": token},
                          follow_redirects=True)
    assert "Not saved" in refused.get_data(as_text=True)
    changed = json.loads(_audit(app_settings.home_path, "settings_changed")[-1]["detail"])
    assert changed["value"] == "Clinic of St John's"
    client.post("/admin/dicom", data={"dicom_ae_title": "CLINIC", "dicom_port": "104",
                                      "dicom_allowed_callers": "CT01@10.0.0.5",
                                      "pacs_destinations": "PACS@10.0.0.7:104", "csrf_token": token})
    assert 'dicom_allowed_callers = "CT01@10.0.0.5"' in (app_settings.home_path / "appliance.toml").read_text()


def test_admin_manages_users_but_not_the_last_admin(client, app_settings):
    login(client, "admin")
    token = csrf(client, "/admin/users")
    client.post("/admin/users", data={"action": "add", "username": "nurse", "password": "nurse password",
                                      "role": "technician", "csrf_token": token})
    page = client.post("/admin/users", data={"action": "change", "username": "admin", "role": "technician",
                                             "csrf_token": token}, follow_redirects=True).get_data(as_text=True)
    assert "last admin" in page
    assert "nurse" in client.get("/admin/users").get_data(as_text=True)
    assert _audit(app_settings.home_path, "user_added")[-1]["object"] == "nurse"


def test_c_echo_button_reports_an_unreachable_pacs(tmp_path):
    settings = web_settings(tmp_path, pacs_destinations="PACS@127.0.0.1:9")
    make_accounts(settings.home_path)
    client = create_app(settings, environ={}).test_client()
    login(client, "admin")
    token = csrf(client, "/admin/dicom")
    page = client.post("/admin/dicom/echo", data={"destination": "PACS@127.0.0.1:9", "csrf_token": token},
                       follow_redirects=True).get_data(as_text=True)
    assert "No association with PACS@127.0.0.1:9" in page


def test_no_page_loads_an_asset_from_outside_the_box(analysed_home):
    client = create_app(analysed_home, environ={}).test_client()
    login(client, "admin")
    uid = _study_uid(client)
    for path in ("/", f"/study/{uid}", f"/study/{uid}/report", "/import", "/admin/", "/admin/settings"):
        html = client.get(path).get_data(as_text=True)
        assert not re.search(r'(src|href)="(https?:)?//', html), path


def test_c_echo_button_reports_a_pacs_that_answers(tmp_path):
    import socket

    from appliance.ingest import dicom_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer_settings = web_settings(tmp_path / "peer", dicom_ae_title="PEERPACS")
    stop = dicom_server.start(peer_settings, port=port, address="127.0.0.1")
    try:
        settings = web_settings(tmp_path, pacs_destinations=f"PEERPACS@127.0.0.1:{port}")
        make_accounts(settings.home_path)
        client = create_app(settings, environ={}).test_client()
        login(client, "admin")
        token = csrf(client, "/admin/dicom")
        page = client.post("/admin/dicom/echo", data={"destination": f"PEERPACS@127.0.0.1:{port}", "csrf_token": token},
                           follow_redirects=True).get_data(as_text=True)
        assert f"C-ECHO to PEERPACS@127.0.0.1:{port} succeeded" in page
        assert json.loads(_audit(settings.home_path, "dicom_echo")[-1]["detail"])["ok"] is True
    finally:
        stop()


def test_every_page_title_is_plain_text(analysed_home):
    """Regression: a template block closed in the wrong place put the admin page's markup into its <title>."""
    client = create_app(analysed_home, environ={}).test_client()
    login(client, "admin")
    uid = _study_uid(client)
    for path in ("/", f"/study/{uid}", f"/study/{uid}/report", "/import", "/admin/", "/admin/dicom", "/admin/users",
                 "/admin/audit", "/admin/settings"):
        html = client.get(path).get_data(as_text=True)
        assert re.search(r"<title>[^<]*</title>", html), path


def test_worklist_lists_the_latest_arrival_first_whatever_its_study_date(client, app_settings):
    from appliance.store.database import write_transaction

    db = open_database(app_settings.home_path)
    with write_transaction(db):
        for uid, study_date, arrived in (("1.2.3.1", "20070101", "2026-12-01T10:00:00"),
                                         ("1.2.3.2", "20261130", "2026-11-30T10:00:00")):
            db.table("studies").insert({"study_instance_uid": uid, "study_date": study_date, "study_time": "",
                                        "created_at": arrived, "updated_at": arrived, "status": "queued"})
    login(client, "tech")
    page = client.get("/").get_data(as_text=True)
    assert page.index('data-study="1.2.3.1"') < page.index('data-study="1.2.3.2"')  # 2007 study arrived today
    by_date = client.get("/?sort=study_date").get_data(as_text=True)
    assert by_date.index('data-study="1.2.3.2"') < by_date.index('data-study="1.2.3.1"')


def test_measurements_without_a_decision_get_no_review_buttons(analysed_home):
    client = create_app(analysed_home, environ={}).test_client()
    login(client, "rad")
    page = client.get(f"/study/{_study_uid(client)}").get_data(as_text=True)
    articles = dict(re.findall(r'data-model="([^"]+)">(.*?)</article>', page, re.DOTALL))
    assert "series-qa" in articles and "chest-covid19" in articles
    for model in ("series-qa", "lungs-classical", "lung-segmentation"):
        assert "Confirm finding" not in articles.get(model, ""), model
    assert "Confirm finding" in articles["chest-covid19"]

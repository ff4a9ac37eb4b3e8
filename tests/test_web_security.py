"""Web UI security, each test named after what broke: open redirects, sessions that outlived logout and
password resets, 500s on hostile parameters and files, lockouts anyone could trigger, common passwords."""

from __future__ import annotations

import io
import subprocess
import sys

import pydicom
import pytest

from appliance.store import users
from appliance.store.database import open_database
from appliance.web import create_app
from tests.web_helpers import PASSWORDS, csrf, login

SESSION_COOKIE = "appliance_session"
DEVICE_COOKIE = "appliance_device"


@pytest.fixture
def app(app_settings):
    return create_app(app_settings, environ={})


@pytest.fixture
def client(app):
    return app.test_client()


def _signed_in(client) -> bool:
    return client.get("/").status_code == 200


def _post_login(client, name: str, password: str, address: str = "127.0.0.1"):
    token = csrf(client)
    return client.post("/login", data={"username": name, "password": password, "csrf_token": token},
                       environ_base={"REMOTE_ADDR": address})


# 1. open redirect: only same-site paths are redirect targets

# raw query strings as an attacker writes them, each a way browsers lead off the site
OFF_SITE = ["%2F%09%2Fevil.example", "//evil.example", "%2F%2Fevil.example", "/%5Cevil.example", "%5C%5Cevil.example",
            "%2F%5C%2Fevil.example", "https://evil.example/", "https%3A%2F%2Fevil.example", "javascript:alert(1)",
            "%2F%0D%0ALocation:%20https://evil.example", "%0D%0A%2F%2Fevil.example", "%2F%0A%2Fevil.example",
            "%20%2F%2Fevil.example", "http:/evil.example", "%2F%00%2Fevil.example", "evil.example",
            "%2F%E3%80%80%2Fevil.example", "%EF%BC%8F%EF%BC%8Fevil.example", "///evil.example"]


@pytest.mark.parametrize("target", OFF_SITE)
def test_login_next_never_leads_off_the_site(client, target):
    token = csrf(client)
    response = client.post(f"/login?next={target}", data={"username": "tech", "password": PASSWORDS["tech"],
                                                           "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == "/", target


@pytest.mark.parametrize("target", OFF_SITE)
def test_language_next_never_leads_off_the_site(client, target):
    from urllib.parse import unquote

    token = csrf(client)
    response = client.post("/language", data={"lang": "fr", "next": unquote(target), "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == "/", target


def test_same_site_next_is_kept(client):
    token = csrf(client)
    response = client.post("/login?next=%2Fstudy%2F1.2.3%3Fx%3D1", data={"username": "tech",
                                                                       "password": PASSWORDS["tech"],
                                                                       "csrf_token": token})
    assert response.headers["Location"] == "/study/1.2.3?x=1"
    response = client.post("/language", data={"lang": "es", "next": "/import?q=a%20b", "csrf_token": csrf(client, "/")})
    assert response.headers["Location"] == "/import?q=a%20b"


def test_the_login_page_sends_a_signed_out_visitor_back_where_they_were(client):
    response = client.get("/admin/audit?page=2")
    assert response.status_code == 302
    following = client.post(response.headers["Location"], data={"username": "admin", "password": PASSWORDS["admin"],
                                                                "csrf_token": csrf(client)})
    assert following.headers["Location"] == "/admin/audit?page=2"


# 2. sessions end: logout, password change, admin reset and disabling end every session of the account

def test_a_cookie_saved_before_logout_no_longer_works(client):
    login(client, "tech")
    saved = client.get_cookie(SESSION_COOKIE).value
    client.post("/logout", data={"csrf_token": csrf(client, "/")})
    assert not _signed_in(client)
    client.set_cookie(SESSION_COOKIE, saved)
    response = client.get("/")
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    assert client.get("/api/progress").status_code == 401


def test_logout_ends_the_accounts_sessions_on_other_browsers(app):
    here, there = app.test_client(), app.test_client()
    login(here, "rad")
    login(there, "rad")
    assert _signed_in(here) and _signed_in(there)
    here.post("/logout", data={"csrf_token": csrf(here, "/")})
    assert not _signed_in(there)
    login(there, "rad")  # signing in again works
    assert _signed_in(there)


def test_an_admins_password_reset_ends_the_users_sessions(app):
    tech, admin = app.test_client(), app.test_client()
    login(tech, "tech")
    saved = tech.get_cookie(SESSION_COOKIE).value
    login(admin, "admin")
    response = admin.post("/admin/users", data={"action": "password", "username": "tech",
                                                "password": "orchid tunnel maple 83", "csrf_token": csrf(admin, "/")})
    assert response.status_code == 302
    assert not _signed_in(tech)
    tech.set_cookie(SESSION_COOKIE, saved)
    assert not _signed_in(tech)
    assert _signed_in(admin)  # the admin's own session is not the tech's
    assert _post_login(tech, "tech", PASSWORDS["tech"]).status_code == 401
    assert _post_login(tech, "tech", "orchid tunnel maple 83").status_code == 302


def test_an_admin_resetting_their_own_password_stays_signed_in_elsewhere_not(app):
    here, there = app.test_client(), app.test_client()
    login(here, "admin")
    login(there, "admin")
    here.post("/admin/users", data={"action": "password", "username": "admin", "password": "orchid tunnel maple 83",
                                    "csrf_token": csrf(here, "/")})
    assert _signed_in(here) and not _signed_in(there)


def test_changing_ones_own_password_ends_the_other_sessions(app):
    here, there = app.test_client(), app.test_client()
    login(here, "tech")
    login(there, "tech")
    saved = here.get_cookie(SESSION_COOKIE).value
    token = csrf(here, "/account/password")
    wrong = here.post("/account/password", data={"current": "not it at all", "password": "orchid tunnel maple 83",
                                                 "confirm": "orchid tunnel maple 83", "csrf_token": token},
                      follow_redirects=True)
    assert "current password is wrong" in wrong.get_data(as_text=True) and _signed_in(there)
    common = here.post("/account/password", data={"current": PASSWORDS["tech"], "password": "qwertyuiop",
                                                  "confirm": "qwertyuiop", "csrf_token": token}, follow_redirects=True)
    assert "most common passwords" in common.get_data(as_text=True) and _signed_in(there)
    changed = here.post("/account/password", data={"current": PASSWORDS["tech"], "password": "orchid tunnel maple 83",
                                                   "confirm": "orchid tunnel maple 83", "csrf_token": token})
    assert changed.status_code == 302
    assert _signed_in(here) and not _signed_in(there)
    here.set_cookie(SESSION_COOKIE, saved)  # this browser's cookie from before the change
    assert not _signed_in(here)
    assert _post_login(there, "tech", "orchid tunnel maple 83").status_code == 302


def test_disabling_an_account_ends_its_sessions_for_good(app):
    rad, admin = app.test_client(), app.test_client()
    login(rad, "rad")
    saved = rad.get_cookie(SESSION_COOKIE).value
    login(admin, "admin")
    token = csrf(admin, "/")
    admin.post("/admin/users", data={"action": "change", "username": "rad", "role": "radiologist", "disabled": "1",
                                     "csrf_token": token})
    assert not _signed_in(rad)
    admin.post("/admin/users", data={"action": "change", "username": "rad", "role": "radiologist",
                                     "csrf_token": token})
    rad.set_cookie(SESSION_COOKIE, saved)  # enabled again: the old session stays ended
    assert not _signed_in(rad)


def test_a_session_ended_elsewhere_is_told_why(app):
    here, there = app.test_client(), app.test_client()
    login(here, "tech")
    login(there, "tech")
    here.post("/logout", data={"csrf_token": csrf(here, "/")})
    page = there.get("/", follow_redirects=True).get_data(as_text=True)
    assert "Your session has ended" in page


# 3. no 500 from a hostile parameter or file (the route x role matrix is tests/test_web_matrix.py)

@pytest.mark.parametrize("page", ["9223372036854775808", "-9223372036854775809", "1e9", "abc", "%0D%0A", "%E2%80%8F",
                                  "99999999999999999999999999999999", "0", "-1", "1" * 5000])
def test_huge_negative_or_non_numeric_page_numbers_are_clamped(client, page):
    login(client, "admin")
    for path in ("/", "/admin/audit"):
        assert client.get(f"{path}?page={page}").status_code == 200, (path, page)


def test_huge_ids_in_paths_and_forms_are_4xx(client):
    login(client, "admin")
    token = csrf(client, "/")
    huge = "9223372036854775808"
    assert client.get(f"/result/{huge}/key/0.png").status_code == 404
    assert client.post(f"/quarantine/{huge}/delete", data={"csrf_token": token}).status_code == 404
    assert client.post("/import/upload", data={"upload_id": huge, "csrf_token": token},
                       content_type="multipart/form-data").status_code == 200
    rad = client.application.test_client()
    login(rad, "rad")
    assert rad.post("/study/1.2.3/review", data={"result_id": huge, "decision": "confirmed",
                                                 "csrf_token": csrf(rad, "/")}).status_code == 400


def test_crlf_in_next_is_no_500(client):
    token = csrf(client)
    response = client.post("/login?next=%2F%0D%0ASet-Cookie:%20x%3D1", data={"username": "tech",
                                                                           "password": PASSWORDS["tech"],
                                                                           "csrf_token": token})
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert "x=1" not in str(response.headers)


def test_upload_of_an_instance_number_beyond_64_bits_is_stored(client, synthetic_chest):
    """Regression: an InstanceNumber beyond SQLite's 64-bit integers took the upload request down with a 500."""
    ds = pydicom.dcmread(min(synthetic_chest.glob("*.dcm")))
    ds.InstanceNumber = "99999999999999999999"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    crash = io.BytesIO()
    ds.save_as(crash, enforce_file_format=True)
    login(client, "tech")
    token = csrf(client, "/import")
    response = client.post("/import/upload", data={"files": [(io.BytesIO(crash.getvalue()), "crash.dcm")],
                                                   "csrf_token": token}, content_type="multipart/form-data")
    assert response.status_code == 200 and response.get_json()["stored"] == 1


def test_upload_of_a_file_the_import_path_did_not_foresee_is_422_not_500(client, app_settings, monkeypatch):
    from appliance.web import importing

    def unforeseen(*args, **kwargs):
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(importing, "receive_upload", unforeseen)
    login(client, "tech")
    token = csrf(client, "/import")
    response = client.post("/import/upload", data={"files": [(io.BytesIO(b"x"), "crash.dcm")],
                                                   "csrf_token": token}, content_type="multipart/form-data")
    assert 400 <= response.status_code < 500
    body = response.get_json()
    assert body["error"] == "IMPORT_FAILED" and "could not be imported" in body["message"]
    db = open_database(app_settings.home_path)
    assert db.execute("SELECT state FROM imports WHERE id = ?", [body["upload_id"]]).fetchone() == ("failed",)
    db.conn.close()
    assert client.get("/import").status_code == 200  # the service goes on


# 4. lockout: a known device passes, one address cannot lock accounts out

def _wrong(client, name: str, n: int, address: str) -> list[int]:
    token = csrf(client)
    return [client.post("/login", data={"username": name, "password": f"wrong guess {i}", "csrf_token": token},
                        environ_base={"REMOTE_ADDR": address}).status_code for i in range(n)]


def test_throttled_unknown_browsers_get_429_with_retry_after(client):
    assert _wrong(client, "admin", 5, "10.0.0.66") == [401] * 5
    response = _post_login(client, "admin", PASSWORDS["admin"], "10.0.0.66")
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_a_known_device_signs_in_while_others_guess_its_password(app):
    owner = app.test_client()
    assert _post_login(owner, "admin", PASSWORDS["admin"], "10.0.0.5").status_code == 302
    assert owner.get_cookie(DEVICE_COOKIE) is not None
    owner.post("/logout", data={"csrf_token": csrf(owner, "/")})
    # 4 x 5 guesses from four addresses: the account is throttled for every browser that is not a known device
    for n in range(4):
        assert _wrong(app.test_client(), "admin", 5, f"10.0.1.{n}") == [401] * 5
    stranger = app.test_client()
    refused = _post_login(stranger, "admin", PASSWORDS["admin"], "10.0.2.1")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    # the admin's own browser is let through, from the same address as a guesser too
    assert _post_login(owner, "admin", PASSWORDS["admin"], "10.0.1.0").status_code == 302
    assert _signed_in(owner)


def test_a_known_device_is_throttled_by_its_own_wrong_passwords(app):
    owner = app.test_client()
    assert _post_login(owner, "tech", PASSWORDS["tech"]).status_code == 302
    owner.post("/logout", data={"csrf_token": csrf(owner, "/")})
    assert _wrong(owner, "tech", 5, "127.0.0.1") == [401] * 5
    assert _post_login(owner, "tech", PASSWORDS["tech"]).status_code == 429
    # its failures were its own: another browser at another address is not held back by them
    assert _post_login(app.test_client(), "tech", PASSWORDS["tech"], "10.0.0.9").status_code == 302


def test_a_device_known_for_one_account_is_unknown_for_another(app):
    browser = app.test_client()
    assert _post_login(browser, "tech", PASSWORDS["tech"], "10.0.0.7").status_code == 302
    assert _wrong(app.test_client(), "admin", 5, "10.0.0.7") == [401] * 5
    assert _post_login(browser, "admin", PASSWORDS["admin"], "10.0.0.7").status_code == 429


def test_a_forged_device_cookie_counts_for_nothing(app):
    owner = app.test_client()
    assert _post_login(owner, "admin", PASSWORDS["admin"]).status_code == 302
    cookie = owner.get_cookie(DEVICE_COOKIE).value
    forger = app.test_client()
    forger.set_cookie(DEVICE_COOKIE, cookie[:-3] + ("AAA" if not cookie.endswith("AAA") else "BBB"))
    assert _wrong(forger, "admin", 5, "10.0.0.8") == [401] * 5
    assert _post_login(forger, "admin", PASSWORDS["admin"], "10.0.0.8").status_code == 429


def test_many_user_names_from_one_address_lock_no_account(app):
    """Regression: 12 wrong user names from one address locked every account for that address."""
    guesser = app.test_client()
    for n in range(12):
        assert _wrong(guesser, f"nobody{n}", 1, "10.0.0.50") == [401]
    colleague = app.test_client()  # same address (the clinic's NAT), a browser new to this account
    assert _post_login(colleague, "tech", PASSWORDS["tech"], "10.0.0.50").status_code == 302
    # beyond the per-address limit only that address's unknown browsers wait; its known devices do not
    for n in range(30):
        _wrong(guesser, f"other{n}", 1, "10.0.0.50")
    assert _post_login(app.test_client(), "rad", PASSWORDS["rad"], "10.0.0.50").status_code == 429
    colleague.post("/logout", data={"csrf_token": csrf(colleague, "/")})
    assert _post_login(colleague, "tech", PASSWORDS["tech"], "10.0.0.50").status_code == 302
    assert _post_login(app.test_client(), "rad", PASSWORDS["rad"], "10.0.0.51").status_code == 302


# 5. common passwords are refused wherever a password is set

COMMON = ["password1", "iloveyou", "qwertyuiop", "QwertyUIOP", "iloveyou12345", "Password123!"]


@pytest.mark.parametrize("password", COMMON)
def test_common_passwords_are_refused(app_settings, password):
    db = open_database(app_settings.home_path)
    try:
        with pytest.raises(users.AccountError, match=r"common|too easy"):
            users.add_user(db, "newcomer", password, "technician", actor="test")
        with pytest.raises(users.AccountError, match=r"common|too easy"):
            users.set_password(db, "tech", password, actor="test")
    finally:
        db.conn.close()


@pytest.mark.parametrize("password", ["password1", "iloveyou", "qwertyuiop"])
def test_the_most_common_passwords_are_named_as_such(password):
    with pytest.raises(users.AccountError, match="most common passwords"):
        users.check_password_rules(password, "newcomer")


def test_a_long_random_passphrase_is_accepted(app_settings):
    import secrets

    db = open_database(app_settings.home_path)
    try:
        users.add_user(db, "newcomer", "tartan kettle lagoon 47 sunrise", "technician", actor="test")
        users.set_password(db, "newcomer", secrets.token_urlsafe(24), actor="test")
        users.set_password(db, "newcomer", "x" * 40 + secrets.token_hex(40), actor="test")  # beyond zxcvbn's 72
    finally:
        db.conn.close()


def test_a_password_leaning_on_the_user_name_is_refused():
    with pytest.raises(users.AccountError, match="too easy"):
        users.check_password_rules("technician pw 1", "tech")


def test_admin_pages_refuse_common_passwords(client):
    login(client, "admin")
    token = csrf(client, "/admin/users")
    page = client.post("/admin/users", data={"action": "add", "username": "nurse", "password": "iloveyou12345",
                                             "role": "technician", "csrf_token": token}, follow_redirects=True)
    assert "too easy to guess" in page.get_data(as_text=True)
    assert "nurse" not in client.get("/admin/users").get_data(as_text=True)


def test_users_command_refuses_a_common_password(tmp_path):
    env = {"APPLIANCE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "users", "add", "bob", "--role", "admin"],
                         input="qwertyuiop\n", capture_output=True, text=True, env=env)
    assert run.returncode == 1
    assert run.stderr.startswith("error: ACCOUNT: ") and "most common passwords" in run.stderr


def test_audit_log_filters_by_action_and_actor(client):
    login(client, "admin")
    client.post("/login", data={"username": "tech", "password": "wrong guess", "csrf_token": csrf(client, "/")})
    logins = client.get("/admin/audit?action=login").get_data(as_text=True)
    assert "login_failed" not in logins.split("<tbody", 1)[1] and ">login<" in logins
    failed = client.get("/admin/audit?action=login_failed&actor=tech").get_data(as_text=True)
    assert failed.split("<tbody", 1)[1].count("<tr") == 1
    assert client.get("/admin/audit?action=login_failed&actor=admin").get_data(as_text=True).split(
        "<tbody", 1)[1].count("<tr") == 0

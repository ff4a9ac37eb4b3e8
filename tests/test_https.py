"""Remote reading over HTTPS: the site certificate, the admin's own certificate, the nginx proxy and the web UI
behind it, checked with a real nginx, Python's ssl and Debian's Chromium trusting the site CA."""

from __future__ import annotations

import datetime
import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import cli, config, https
from appliance.web import bind_address, create_app
from tests.web_helpers import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PASSWORDS,
    free_port,
    login,
    make_accounts,
    wait_until_listening,
    web_settings,
)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CERTUTIL = shutil.which("certutil")
UPLOAD_LIMIT = 64 * 2**20


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- certificates -----------------------------------------------------------------------------------------


def test_site_certificate_is_signed_by_the_site_ca_for_the_names_given(tmp_path):
    made = https.site_certificate(tmp_path, ["ct.clinic.example", "192.168.1.5", "localhost"], "Clinic A")
    files = https.TLSFiles.of(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.certificate.read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer does not match
    assert sorted(made.names) == ["192.168.1.5", "ct.clinic.example", "localhost"] and made.site_ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 3640 <= (ca.not_valid_after_utc - ca.not_valid_before_utc).days <= 3651
    assert 824 <= (server.not_valid_after_utc - server.not_valid_before_utc).days <= 826
    for key in (files.key, files.ca_key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert files.folder.stat().st_mode & 0o077 == 0


def test_setup_again_keeps_the_site_ca_and_issues_a_new_certificate_only_for_new_names(tmp_path):
    first = https.site_certificate(tmp_path, ["localhost"])
    files = https.TLSFiles.of(tmp_path)
    ca_before, cert_before = files.ca_certificate.read_bytes(), files.certificate.read_bytes()
    again = https.site_certificate(tmp_path, ["localhost"])
    assert first.issued and not again.issued and files.certificate.read_bytes() == cert_before
    renamed = https.site_certificate(tmp_path, ["localhost", "ct.clinic.example"])
    assert renamed.issued and files.certificate.read_bytes() != cert_before
    assert files.ca_certificate.read_bytes() == ca_before  # radiologists trust the CA once


def test_a_damaged_site_ca_is_refused_and_a_damaged_server_certificate_replaced(tmp_path):
    https.site_certificate(tmp_path, ["localhost"])
    files = https.TLSFiles.of(tmp_path)
    files.certificate.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert https.days_left(files.certificate) is None  # the admin page says "not set up", no error
    assert https.site_certificate(tmp_path, ["localhost"]).issued
    files.ca_key.write_bytes(b"garbage")
    with pytest.raises(https.CertificateRefused) as refused:
        https.site_certificate(tmp_path, ["localhost", "ct.clinic.example"])
    assert refused.value.reason_code == "SITE_CA_UNREADABLE"


def _own(tmp_path: Path, *, days: int = 365, start_days: int = -1):
    ca, ca_key = https.make_site_ca("Hospital")
    now = datetime.datetime.now(datetime.timezone.utc)
    cert, key = https.issue_server_certificate(ca, ca_key, ["ct.hospital.example"],
                                               now=now + datetime.timedelta(days=start_days))
    if days < 0:
        cert, key = https.issue_server_certificate(ca, ca_key, ["ct.hospital.example"],
                                                   now=now - datetime.timedelta(days=900))
    return cert, key


def test_own_certificate_with_a_mismatching_key_is_refused(tmp_path):
    cert, _key = _own(tmp_path)
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(https.CertificateRefused) as refused:
        https.check_own_certificate(_pem(cert), _key_pem(other))
    assert refused.value.reason_code == "KEY_MISMATCH"


@pytest.mark.parametrize(("cert_bytes", "key_bytes", "code"), [
    (b"not a certificate", None, "CERT_UNREADABLE"),
    (None, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "KEY_UNREADABLE"),
])
def test_own_certificate_that_does_not_parse_is_refused(tmp_path, cert_bytes, key_bytes, code):
    cert, key = _own(tmp_path)
    with pytest.raises(https.CertificateRefused) as refused:
        https.check_own_certificate(cert_bytes or _pem(cert), key_bytes or _key_pem(key))
    assert refused.value.reason_code == code


def test_own_certificate_expired_or_not_yet_valid_is_refused(tmp_path):
    expired, key = _own(tmp_path, days=-1)
    with pytest.raises(https.CertificateRefused) as refused:
        https.check_own_certificate(_pem(expired), _key_pem(key))
    assert refused.value.reason_code == "CERT_EXPIRED"
    future, key = _own(tmp_path, start_days=30)
    with pytest.raises(https.CertificateRefused) as refused:
        https.check_own_certificate(_pem(future), _key_pem(key))
    assert refused.value.reason_code == "CERT_NOT_YET_VALID"


def test_cli_refuses_a_mismatching_key_and_writes_nothing(tmp_path, monkeypatch, capsys):
    cert, _key = _own(tmp_path)
    (tmp_path / "own.pem").write_bytes(_pem(cert))
    (tmp_path / "wrong.key").write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    code = cli.main(["https", "setup", "--out", str(tmp_path / "proxy"), "--cert", str(tmp_path / "own.pem"),
                     "--key", str(tmp_path / "wrong.key")])
    assert code == 1 and "refused: KEY_MISMATCH" in capsys.readouterr().err
    assert not (tmp_path / "proxy").exists() and not https.TLSFiles.of(tmp_path / "home").certificate.exists()


def test_cli_takes_the_admins_own_certificate(tmp_path, monkeypatch, capsys):
    cert, key = _own(tmp_path)
    (tmp_path / "own.pem").write_bytes(_pem(cert))
    (tmp_path / "own.key").write_bytes(_key_pem(key))
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    assert cli.main(["https", "setup", "--out", str(tmp_path / "proxy"), "--cert", str(tmp_path / "own.pem"),
                     "--key", str(tmp_path / "own.key")]) == 0
    files = https.TLSFiles.of(tmp_path / "home")
    assert files.certificate.read_bytes() == _pem(cert) and files.key.stat().st_mode & 0o777 == 0o600
    assert "ct.hospital.example" in capsys.readouterr().out
    assert cli.main(["https", "ca"]) == 1  # no site CA: the hospital's own CA is trusted already
    assert "NO_SITE_CA" in capsys.readouterr().err


def _etc_snapshot() -> dict[str, float]:
    found = {}
    for folder in (Path("/etc/appliance"), Path("/etc/systemd/system"), Path("/etc/nginx")):
        if folder.is_dir():
            found.update({str(p): p.stat().st_mtime for p in folder.rglob("*")})
    return found


def test_setup_into_a_folder_touches_nothing_in_etc_nor_the_settings(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    before = _etc_snapshot()
    assert cli.main(["https", "setup", "--out", str(tmp_path / "proxy"), "--hostname", "localhost",
                     "--port", "8443", "--http-port", "8081"]) == 0
    assert _etc_snapshot() == before
    assert sorted(p.name for p in (tmp_path / "proxy").iterdir()) == ["appliance-https.service", "nginx.conf"]
    assert not config.config_path(home).exists()  # the settings change only with --install
    conf = (tmp_path / "proxy" / "nginx.conf").read_text()
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in conf and 'Strict-Transport-Security "max-age=31536000"' in conf
    assert "return 301 https://$host:8443$request_uri;" in conf
    assert f"client_max_body_size {config.load().max_upload_bytes};" in conf
    assert "proxy_pass http://127.0.0.1:8080;" in conf
    assert str(https.TLSFiles.of(home).key) in conf
    unit = (tmp_path / "proxy" / "appliance-https.service").read_text()
    assert f"-c {https.SYSTEM_CONFIG}" in unit and "User=appliance" in unit
    assert "web_behind_proxy = true" in capsys.readouterr().out  # what --install would set
    assert cli.main(["https", "ca"]) == 0
    assert capsys.readouterr().out.startswith("-----BEGIN CERTIFICATE-----")


def test_install_turns_on_the_proxy_settings(tmp_path, monkeypatch, capsys):
    """--install writes where systemd and nginx read (here redirected to a folder) and saves the two settings."""
    home = tmp_path / "home"
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    monkeypatch.setattr(https, "SYSTEM_CONFIG", tmp_path / "etc" / "nginx-https.conf")
    monkeypatch.setattr(https, "SYSTEM_UNIT", tmp_path / "etc" / https.UNIT_NAME)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no systemctl to call here
    assert cli.main(["https", "setup", "--install", "--hostname", "localhost"]) == 0
    assert https.SYSTEM_CONFIG.is_file() and https.SYSTEM_UNIT.is_file()
    saved = config.load()
    assert saved.web_behind_proxy and saved.web_secure_cookies
    assert "systemctl enable --now appliance-https.service" in capsys.readouterr().out
    assert cli.main(["https", "show"]) == 0 and "824 days left" in capsys.readouterr().out


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (apt-get install nginx-light)")
def test_generated_config_passes_nginx_t(tmp_path):
    https.site_certificate(tmp_path / "home", ["localhost"])
    opts = https.ProxyOptions(https.TLSFiles.of(tmp_path / "home"), 8080, UPLOAD_LIMIT, port=free_port(),
                              http_port=free_port(), listen_address="127.0.0.1")
    https.write_proxy(tmp_path / "proxy", opts, user="appliance", home=tmp_path / "home")
    prefix = _prefix(tmp_path)
    check = subprocess.run([NGINX, "-t", "-c", str(tmp_path / "proxy" / "nginx.conf"), "-p", f"{prefix}/",
                            "-e", str(prefix / "logs" / "error.log")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (package systemd)")
def test_the_proxy_unit_verifies_and_is_hardened(tmp_path):
    unit = tmp_path / https.UNIT_NAME
    unit.write_text(https.systemd_unit(https.SYSTEM_CONFIG, "appliance", Path("/var/lib/appliance")))
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="warning", SYSTEMD_COLORS="0")
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    review = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, env=env)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", review.stdout + review.stderr)
    if found is None:
        pytest.skip("this systemd-analyze has no offline security review (systemd 250 or later)")
    assert float(found.group(1)) <= 3.0  # as every other unit of the appliance (tests/test_systemd_and_usb.py)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing files to another account needs root")
def test_as_root_the_keys_go_to_the_data_directorys_owner(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    https.site_certificate(home, ["localhost"])
    https.give_to_owner(home)
    files = https.TLSFiles.of(home)
    for path in (files.folder, files.key, files.ca_key, files.certificate):
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path


# --- the web UI behind the proxy (Flask test client) ------------------------------------------------------


def test_forwarded_headers_count_only_from_the_loopback_proxy(tmp_path):
    settings = web_settings(tmp_path, web_behind_proxy=True, web_secure_cookies=True)
    make_accounts(settings.home_path)
    client = create_app(settings, environ={}).test_client()
    proxied = client.get("/login", headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"},
                         environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert proxied.headers["Strict-Transport-Security"] == "max-age=31536000"
    spoofed = client.get("/login", headers={"X-Forwarded-Proto": "https"}, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert "Strict-Transport-Security" not in spoofed.headers  # not the proxy: plain HTTP as it came
    plain = create_app(web_settings(tmp_path / "plain"), environ={}).test_client()
    assert "Strict-Transport-Security" not in plain.get("/login", headers={"X-Forwarded-Proto": "https"},
                                                         environ_base={"REMOTE_ADDR": "127.0.0.1"}).headers


def test_behind_the_proxy_the_ui_listens_on_loopback_only(tmp_path):
    settings = web_settings(tmp_path, web_host="0.0.0.0", web_behind_proxy=True)
    make_accounts(settings.home_path)  # an admin exists: without the proxy 0.0.0.0 would be used
    host, why = bind_address(settings)
    assert host == "127.0.0.1" and why and "web_behind_proxy" in why
    assert bind_address(settings.replace(web_behind_proxy=False))[0] == "0.0.0.0"


def test_admin_downloads_the_site_ca(tmp_path):
    settings = web_settings(tmp_path)
    make_accounts(settings.home_path)
    client = create_app(settings, environ={}).test_client()
    login(client, "admin")
    assert client.get("/admin/https/site-ca.pem").status_code == 404
    assert "https setup" in client.get("/admin/").get_data(as_text=True)
    https.site_certificate(settings.home_path, ["localhost"])
    response = client.get("/admin/https/site-ca.pem")
    assert response.status_code == 200 and "attachment" in response.headers["Content-Disposition"]
    assert response.data == https.TLSFiles.of(settings.home_path).ca_certificate.read_bytes()
    assert "/admin/https/site-ca.pem" in client.get("/admin/").get_data(as_text=True)
    login(tech := create_app(settings, environ={}).test_client(), "tech")
    assert tech.get("/admin/https/site-ca.pem").status_code == 403


# --- a real nginx in front of `appliance web`, Chromium trusting the site CA --------------------------------


def _prefix(tmp_path: Path) -> Path:
    prefix = tmp_path / "nginx"
    for sub in ("logs", "temp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    return prefix


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """`appliance web` behind nginx with the config `appliance https setup --out` wrote, on free loopback ports."""
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    root = tmp_path_factory.mktemp("https")
    home, ports = root / "home", {"web": free_port(), "https": free_port(), "http": free_port()}
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_WEB_PORT": str(ports["web"]),
           "APPLIANCE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT), "APPLIANCE_WEB_HOST": "0.0.0.0",
           "APPLIANCE_WEB_SECURE_COOKIES": "1", "APPLIANCE_WEB_BEHIND_PROXY": "1"}
    make_accounts(home)
    setup = subprocess.run([sys.executable, "-m", "appliance.cli", "https", "setup", "--out", str(root / "proxy"),
                            "--hostname", "127.0.0.1", "--hostname", "localhost", "--listen", "127.0.0.1",
                            "--port", str(ports["https"]), "--http-port", str(ports["http"])],
                           env=env, capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr
    prefix = _prefix(root)
    user = ["user root;"] if os.geteuid() == 0 else []  # workers read the spool under a 0700 pytest folder
    with open(root / "web.log", "w") as web_log, open(root / "nginx.log", "w") as nginx_log:
        web = subprocess.Popen([sys.executable, "-m", "appliance.cli", "web"], env=env, stdout=web_log,
                               stderr=subprocess.STDOUT)
        nginx = subprocess.Popen([NGINX, "-c", str(root / "proxy" / "nginx.conf"), "-p", f"{prefix}/",
                                  "-e", str(prefix / "logs" / "error.log"), "-g", " ".join(["daemon off;", *user])],
                                 stdout=nginx_log, stderr=subprocess.STDOUT)
        try:
            wait_until_listening(web, ports["web"], root / "web.log", "appliance web")
            wait_until_listening(nginx, ports["https"], root / "nginx.log", "nginx")
            yield {"root": root, "home": home, "ports": ports, "ca": https.TLSFiles.of(home).ca_certificate,
                   "url": f"https://127.0.0.1:{ports['https']}"}
        finally:
            nginx.terminate()
            web.terminate()
            nginx.wait(timeout=30)
            web.wait(timeout=30)


@pytest.mark.slow
def test_the_web_ui_listens_on_loopback_although_web_host_says_every_address(proxied):
    log = (proxied["root"] / "web.log").read_text()
    assert f"Web UI on http://127.0.0.1:{proxied['ports']['web']}/" in log and "web_behind_proxy" in log


@pytest.mark.slow
def test_plain_http_only_redirects_to_https(proxied):
    for method in ("GET", "POST"):
        conn = http.client.HTTPConnection("127.0.0.1", proxied["ports"]["http"], timeout=10)
        conn.request(method, "/study/1.2.3?tab=viewer", headers={"Host": f"127.0.0.1:{proxied['ports']['http']}"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 301, (method, response.status)
        assert response.getheader("Location") == f"{proxied['url']}/study/1.2.3?tab=viewer"
        assert b"login" not in body.lower()  # nothing of the UI over plain HTTP


@pytest.mark.slow
def test_the_certificate_verifies_with_the_site_ca_only(proxied):
    port = proxied["ports"]["https"]
    for name in ("127.0.0.1", "localhost"):
        context = ssl.create_default_context(cafile=str(proxied["ca"]))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                context.wrap_socket(sock, server_hostname=name) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]
    with pytest.raises(ssl.SSLCertVerificationError), socket.create_connection(("127.0.0.1", port)) as sock, \
            ssl.create_default_context().wrap_socket(sock, server_hostname="127.0.0.1"):
        pass  # the system's CAs alone do not vouch for it


def _handshake(port: int, maximum: ssl.TLSVersion, cafile: Path) -> str | None:
    context = ssl.create_default_context(cafile=str(cafile))
    with warnings.catch_warnings():  # offering TLS 1.0 and 1.1 is deprecated: the point of the test
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # this client offers old versions; the server must refuse them
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        return tls.version()


@pytest.mark.slow
def test_tls_1_1_is_refused_and_1_2_accepted(proxied):
    port = proxied["ports"]["https"]
    assert _handshake(port, ssl.TLSVersion.TLSv1_2, proxied["ca"]) == "TLSv1.2"
    for old in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1):
        with pytest.raises(ssl.SSLError, match="TLSV1_ALERT_PROTOCOL_VERSION"):  # the server says no
            _handshake(port, old, proxied["ca"])


@pytest.fixture(scope="module")
def chromium_trusting_the_site_ca(proxied):
    """Debian's Chromium with the site CA in the NSS database of its own $HOME (as a radiologist's computer)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    if CERTUTIL is None:
        pytest.skip("certutil is not installed (apt-get install libnss3-tools)")
    home = proxied["root"] / "radiologist"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run([CERTUTIL, "-d", f"sql:{nssdb}", "-N", "--empty-password"], check=True, capture_output=True)
    subprocess.run([CERTUTIL, "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "appliance site CA",
                    "-i", str(proxied["ca"])], check=True, capture_output=True)
    from playwright.sync_api import sync_playwright

    def launch(home: Path):
        return p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                 env={**os.environ, "HOME": str(home)})

    with sync_playwright() as p:
        browser = launch(home)
        yield browser, launch
        browser.close()


@pytest.mark.slow
def test_chromium_logs_in_over_https_with_secure_cookies_and_hsts(proxied, chromium_trusting_the_site_ca):
    url = proxied["url"]
    context = chromium_trusting_the_site_ca[0].new_context(ignore_https_errors=False)
    page = context.new_page()
    response = page.goto(url + "/")
    assert page.url.startswith(url + "/login") and response is not None and response.ok
    assert response.headers["strict-transport-security"] == "max-age=31536000"
    page.fill("input[name=username]", "rad")
    page.fill("input[name=password]", PASSWORDS["rad"])
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(url) + r"/(\?.*)?$"))
    assert page.locator("text=rad").count() > 0
    session = {c["name"]: c for c in context.cookies(url)}["appliance_session"]
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Lax"
    assert all(c["secure"] for c in context.cookies(url))
    assert page.evaluate("() => window.isSecureContext") is True
    page.goto(f"http://127.0.0.1:{proxied['ports']['http']}/")  # typed without https: sent there
    assert page.url == url + "/"
    context.close()


@pytest.mark.slow
def test_chromium_without_the_site_ca_refuses_the_certificate(proxied, chromium_trusting_the_site_ca, tmp_path):
    browser = chromium_trusting_the_site_ca[1](tmp_path)  # a $HOME whose NSS database trusts nothing extra
    page = browser.new_context(ignore_https_errors=False).new_page()
    with pytest.raises(Exception, match="ERR_CERT_AUTHORITY_INVALID"):
        page.goto(proxied["url"] + "/login")
    browser.close()

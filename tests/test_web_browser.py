"""The web UI in a real browser: Debian's Chromium, headless, driven by Playwright, against `appliance serve`.

A technician uploads a real CT series and watches it finish; a radiologist reads it in the viewer,
reviews a finding and downloads the PDF. Security checks run against the same server.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pypdf import PdfReader

from tests.conftest import need_data
from tests.web_helpers import CHROMIUM, PASSWORDS, ROLES, wait_until_listening
from tests.web_helpers import free_port as _free_port

UPLOAD_LIMIT = 100 * 2**20

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`appliance serve` on free loopback ports, with the three accounts made from the shell."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    home = tmp_path_factory.mktemp("serve") / "home"
    port = _free_port()
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_WEB_PORT": str(port),
           "APPLIANCE_DICOM_PORT": str(_free_port()), "APPLIANCE_QUIET_PERIOD_SECONDS": "2",
           "APPLIANCE_FIRST_START_SAMPLE": "false", "APPLIANCE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
           "APPLIANCE_DEMONSTRATION": "1"}  # as `make run` starts it: every pack runs, with its banner
    for name, role in ROLES.items():
        subprocess.run([sys.executable, "-m", "appliance.cli", "users", "add", name, "--role", role],
                       input=PASSWORDS[name] + "\n", text=True, env=env, check=True, capture_output=True)
    with open(home / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_until_listening(proc, port, home / "serve.log", "appliance serve")
        yield url, home
        proc.terminate()
        proc.wait(timeout=30)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _login(page, url: str, name: str) -> None:
    page.goto(url + "/")
    assert "/login" in page.url
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/(\?.*)?$"))


def test_technician_uploads_and_radiologist_reads_reviews_and_downloads_the_pdf(server, browser, tmp_path):
    series = need_data("ct", "tcia-pancreas-ct-chest-abdomen")
    url, _home = server
    files = sorted(str(p) for p in series.rglob("*") if p.is_file() and _is_dicom(p))
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    external = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)

    _login(page, url, "tech")
    page.click("text=Import")
    page.set_input_files("input[data-files]", files)
    page.wait_for_selector("[data-upload-status][data-done]", timeout=120_000)
    status = page.inner_text("[data-upload-status]")
    assert page.get_attribute("[data-upload-status]", "data-done") == "1", status
    assert f"{len(files)} new images" in status and "1 series queued" in status

    page.click("text=Worklist")
    row = page.locator("tr[data-study]").first
    row.locator(".s-done").wait_for(timeout=180_000)  # the page's own live refresh shows it finish
    assert "chest-covid19" in row.inner_text()
    context.clear_cookies()

    _login(page, url, "rad")
    page.locator("tr[data-study] a").first.click()
    page.wait_for_selector("text=chest-covid19")
    assert page.locator(".research-banner").count() >= 1
    stage = page.locator(".viewer-stage").first
    stage.wait_for()
    page.wait_for_function("() => Number(document.querySelector('.viewer-stage').dataset.drawn || 0) >= 1")
    first = int(stage.get_attribute("data-slice"))
    stage.hover()
    page.mouse.wheel(0, 120)
    page.wait_for_function(f"() => document.querySelector('.viewer-stage').dataset.slice !== '{first}'")
    after_wheel = int(stage.get_attribute("data-slice"))
    assert abs(after_wheel - first) == 1
    box = stage.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 100)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 140, steps=5)
    page.mouse.up()
    page.wait_for_function(f"() => document.querySelector('.viewer-stage').dataset.slice === '{after_wheel + 10}'")
    stage.focus()
    page.keyboard.press("b")
    page.wait_for_function("() => document.querySelector('.viewer-stage').dataset.window === 'bone'")
    page.click("button[data-window=lung]")
    page.wait_for_function("() => document.querySelector('.viewer-stage').dataset.window === 'lung'")
    # the canvas shows an image, not a blank: many distinct grey levels
    levels = page.evaluate("""() => {
        const c = document.querySelector('.viewer-stage canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set(); for (let i = 0; i < d.length; i += 4) seen.add(d[i]); return seen.size; }""")
    assert levels > 50

    result = page.locator("article.result[data-model=chest-covid19]")
    result.locator("textarea[name=comment]").fill("Ground-glass not seen; artefact.")
    result.locator("button[value=rejected]").click()
    page.wait_for_selector("text=Review saved.")
    assert "Ground-glass not seen; artefact." in page.locator("article.result[data-model=chest-covid19]").inner_text()

    with page.expect_download() as download_info:
        page.click("[data-testid=pdf]")
    pdf_path = tmp_path / "report.pdf"
    download_info.value.save_as(pdf_path)
    text = re.sub(r"\s+", " ", " ".join(p.extract_text() for p in PdfReader(pdf_path).pages))
    assert "CT screening report" in text and "chest-covid19" in text
    assert "Reviewed by rad" in text and "rejected" in text and "research use only" in text
    assert not external, f"the pages loaded assets from outside the box: {external[:5]}"
    context.close()


def test_security_in_the_browser(server, browser, tmp_path):
    url, home = server
    context = browser.new_context()
    page = context.new_page()
    # unauthenticated: redirected to the login page
    page.goto(url + "/admin/")
    assert "/login" in page.url
    # wrong role: 403
    _login(page, url, "tech")
    assert page.goto(url + "/admin/").status == 403
    # a cross-site page that posts to the appliance without the CSRF token: refused
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (attacker / "index.html").write_text(
        f'<form id="f" method="post" action="{url}/admin/settings"><input name="name" value="dicom_allowed_callers">'
        f'<input name="value" value="*@*"></form><script>document.getElementById("f").submit()</script>')
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(attacker), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with page.expect_response(lambda r: r.url.startswith(url) and r.request.method == "POST") as posted:
            page.goto(f"http://localhost:{httpd.server_address[1]}/index.html")
        assert posted.value.status in (400, 403)
    finally:
        httpd.shutdown()
    assert not (home / "appliance.toml").exists()
    # an upload over the limit: 413 and nothing kept
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.goto(url + "/import").text()).group(1)
    response = page.request.post(url + "/import/upload", headers={"X-CSRFToken": token},
                                 multipart={"files": {"name": "big.dcm", "mimeType": "application/dicom",
                                                      "buffer": b"\0" * (UPLOAD_LIMIT + 1024)}})
    assert response.status == 413
    context.close()
    # the sixth wrong password within a minute: 429
    context = browser.new_context()
    page = context.new_page()
    codes = []
    for i in range(6):
        page.goto(url + "/login")
        page.fill("input[name=username]", "admin")
        page.fill("input[name=password]", f"wrong {i}")
        with page.expect_response(lambda r: r.request.method == "POST") as answer:
            page.click("button[type=submit]")
        codes.append(answer.value.status)
    assert codes == [401] * 5 + [429]
    context.close()
    shutil.rmtree(attacker)

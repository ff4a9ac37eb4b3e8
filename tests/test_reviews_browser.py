"""Reviews in a real browser (Debian's Chromium through Playwright) against `appliance serve`: a radiologist
rejects a flag, the same folder is dropped again, and the rejection carries over the re-analysis on the
worklist (its live refresh included), the study page and the report."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.store.database import open_database, utcnow, write_transaction
from tests.test_web_browser import _login
from tests.web_helpers import CHROMIUM, PASSWORDS, ROLES, wait_until_listening
from tests.web_helpers import free_port as _free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`appliance serve` with the three accounts and a site threshold at which the classifier flags the study."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    home = tmp_path_factory.mktemp("reviews") / "home"
    port = _free_port()
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_WEB_PORT": str(port),
           "APPLIANCE_DICOM_PORT": str(_free_port()), "APPLIANCE_QUIET_PERIOD_SECONDS": "2",
           "APPLIANCE_FIRST_START_SAMPLE": "false", "APPLIANCE_DEMONSTRATION": "1"}
    for name, role in ROLES.items():
        subprocess.run([sys.executable, "-m", "appliance.cli", "users", "add", name, "--role", role],
                       input=PASSWORDS[name] + "\n", text=True, env=env, check=True, capture_output=True)
    db = open_database(home)
    with write_transaction(db):
        db.table("operating_points").insert({"model": "chest-covid19", "model_version": "1.0.0", "threshold": 0.01,
                                             "recorded_by": "test", "recorded_at": utcnow()})
    db.conn.close()
    with open(home / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        wait_until_listening(proc, port, home / "serve.log", "appliance serve")
        yield f"http://127.0.0.1:{port}", home
        proc.terminate()
        proc.wait(timeout=30)


def _drop(series: Path, home: Path, name: str) -> None:
    """Copy the series into the drop folder whole (copied beside it, then renamed in)."""
    staging = home / f"staging-{name}"
    shutil.copytree(series, staging)
    staging.rename(home / "incoming" / name)


def _row_when(page, url: str, selector: str, timeout_s: float = 120.0):
    """The worklist's study row once ``selector`` matches inside it (reloading until the study is listed)."""
    deadline = time.monotonic() + timeout_s
    while page.locator("tr[data-study]").count() == 0:
        assert time.monotonic() < deadline, "the dropped study never reached the worklist"
        time.sleep(0.5)
        page.goto(url + "/")
    row = page.locator("tr[data-study]").first
    row.locator(selector).wait_for(timeout=timeout_s * 1000)  # the page's own live refresh, or already there
    return row


def test_a_rejected_flag_stays_rejected_after_the_same_folder_is_analysed_again(server, browser, synthetic_chest):
    url, home = server
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    _login(page, url, "rad")
    _drop(synthetic_chest, home, "first")
    row = _row_when(page, url, ".s-done")
    assert row.locator('[data-review-state="flagged, not reviewed"]').inner_text() == "flagged, not reviewed"
    assert row.locator(".flag.on").count() == 1
    assert "flagged" in (row.get_attribute("class") or "")

    page.check("input[data-filter-unreviewed]")
    page.click("form.filters button")
    page.wait_for_url(re.compile(r".*unreviewed=1.*"))
    assert page.locator("tr[data-study]").count() == 1

    page.locator("tr[data-study] a").first.click()
    article = page.locator('article[data-model="chest-covid19"]')
    article.locator("textarea[name=comment]").fill("streak artefact, no opacity")
    article.locator("button[value=rejected]").click()
    page.wait_for_selector("text=Review saved.", timeout=90_000)  # the worker may be writing the report meanwhile
    assert "Reviewed by rad" in article.locator("[data-review]").inner_text()

    page.goto(url + "/?unreviewed=1")
    assert page.locator("tr[data-study]").count() == 0
    page.goto(url + "/")
    badge = page.locator('tr[data-study] [data-review-state="flag rejected"]')
    assert badge.inner_text() == "flag rejected by rad"

    _drop(synthetic_chest, home, "again")  # a new analysis supersedes the reviewed one
    db = open_database(home, read_only=True)
    deadline = time.monotonic() + 120
    while db.execute("SELECT count(*) FROM analyses").fetchone()[0] < 2:
        assert time.monotonic() < deadline, "the second analysis never finished"
        time.sleep(0.5)
    db.conn.close()
    page.goto(url + "/")
    row = _row_when(page, url, '.s-done')
    assert row.locator('[data-review-state="flag rejected"]').inner_text() == "flag rejected by rad"
    assert row.locator(".flag.on").count() == 0
    assert row.locator('.flag.rejected[data-review="flag rejected"]').count() == 1
    assert "flagged" not in (row.get_attribute("class") or "").split()

    row.locator("a").first.click()
    review = page.locator('article[data-model="chest-covid19"] [data-review]')
    assert review.get_attribute("data-review-state") == "rejected"
    assert "carried over from the earlier analysis" in review.inner_text()
    assert "streak artefact" in review.inner_text()
    page.click("text=Printable report")
    text = page.locator("article.a4").inner_text()
    assert "FLAGGED for review" not in text and "flag rejected by the radiologist" in text
    context.close()

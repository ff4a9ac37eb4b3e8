"""DICOM outputs (SR, key-image SC, Encapsulated PDF report) written, read back and checked.

Store-and-forward is tested against Orthanc.
"""

import io
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pypdf import PdfReader

from appliance import config
from appliance.ingest.importer import import_paths
from appliance.jobs.worker import Worker
from appliance.outputs import outbox
from appliance.store.database import write_transaction

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
needs_orthanc = pytest.mark.skipif(not Path(ORTHANC).exists(),
                                   reason="Orthanc is not installed (Debian package orthanc)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_orthanc(tmp: Path, dicom_port: int) -> tuple[subprocess.Popen, int]:
    http_port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps({
        "Name": "TEST-PACS", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [], "SyncStorageArea": True}))
    proc = subprocess.Popen([ORTHANC, str(tmp / "config.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=1)
            return proc, http_port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("Orthanc did not start")


def orthanc_get(http_port: int, path: str):
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10).read())


def _analysed_worker(tmp_path, synthetic_chest, destinations: str) -> Worker:
    settings = config.load(environ={}, home=str(tmp_path / "home"), quiet_period_seconds=0.0, demonstration=True,
                           pacs_destinations=destinations, outbox_backoff_seconds=3600.0)
    worker = Worker(settings)
    import_paths(worker.store, [synthetic_chest], settings)
    assert worker.run_once()
    return worker


def test_destination_parsing():
    assert outbox.parse_destinations("PACS@10.0.0.2:104, ORTHANC@127.0.0.1:4242") == (
        outbox.Destination("PACS", "10.0.0.2", 104), outbox.Destination("ORTHANC", "127.0.0.1", 4242))
    with pytest.raises(ValueError, match="is not AE@host:port"):
        outbox.parse_destinations("PACS@nowhere")


def test_outputs_are_written_read_back_and_reference_the_study(tmp_path, synthetic_chest):
    import highdicom as hd

    worker = _analysed_worker(tmp_path, synthetic_chest, "")
    files = sorted((tmp_path / "home" / "artefacts").rglob("dicom/*.dcm"))
    modalities = sorted(pydicom.dcmread(f).Modality for f in files)
    assert modalities[0] == "DOC" and modalities[-1] == "SR" and modalities.count("OT") == len(files) - 2 >= 1
    study = pydicom.dcmread(next(synthetic_chest.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    sr = hd.sr.srread(next(f for f in files if f.name.startswith("sr-")))
    assert sr.StudyInstanceUID == study
    groups = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    covid = groups["chest-covid19 1.0.0"]
    assert {(q.name.meaning, q.value.meaning) for q in covid.get_qualitative_evaluations()} >= {
        ("Validated on clinical data", "No"), ("Radiologist review", "Not reviewed")}
    sc = pydicom.dcmread(next(f for f in files if f.name.startswith("ot-")))
    assert sc.pixel_array.ndim == 3 and sc.StudyInstanceUID == study
    doc = pydicom.dcmread(next(f for f in files if f.name.startswith("doc-")))
    assert doc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and doc.StudyInstanceUID == study
    assert doc.MIMETypeOfEncapsulatedDocument == "application/pdf" and doc.BurnedInAnnotation == "YES"
    pdf = bytes(doc.EncapsulatedDocument)[:doc.EncapsulatedDocumentLength]
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert "CT screening report" in text and "chest-covid19" in text and "PHANTOM" in text
    assert worker.store.db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0  # no PACS configured


@needs_orthanc
def test_results_reach_orthanc_and_wait_while_it_is_down(tmp_path, synthetic_chest):
    dicom_port = free_port()
    worker = _analysed_worker(tmp_path, synthetic_chest, f"ORTHANC@127.0.0.1:{dicom_port}")
    db = worker.store.db
    produced = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    assert produced >= 2
    worker.forward()  # PACS down: nothing dropped, retried later
    rows = db.execute("SELECT state, attempts, error FROM outbox").fetchall()
    assert all(state == "queued" and attempts == 1 and "cannot associate" in error for state, attempts, error in rows)
    proc, http_port = start_orthanc(tmp_path / "orthanc", dicom_port)
    try:
        with write_transaction(db):
            db.execute("UPDATE outbox SET not_before = ''")  # the backoff has passed
        worker.forward()
        assert db.execute("SELECT count(*) FROM outbox WHERE state = 'sent'").fetchone()[0] == produced
        assert orthanc_get(http_port, "/statistics")["CountInstances"] == produced
        modalities = {orthanc_get(http_port, f"/instances/{i}/simplified-tags")["Modality"]
                      for i in orthanc_get(http_port, "/instances")}
        assert modalities == {"SR", "OT", "DOC"}
        doc = next(i for i in orthanc_get(http_port, "/instances")
                   if orthanc_get(http_port, f"/instances/{i}/simplified-tags")["Modality"] == "DOC")
        pdf = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/instances/{doc}/pdf", timeout=10).read()
        assert pdf.startswith(b"%PDF")  # Orthanc opens the report
        worker.forward()  # nothing is sent twice
        assert orthanc_get(http_port, "/statistics")["CountInstances"] == produced
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_review_sends_the_reviewed_report_and_sr_again(tmp_path, synthetic_chest):
    import highdicom as hd

    from appliance.jobs import queue
    from appliance.store.database import utcnow

    worker = _analysed_worker(tmp_path, synthetic_chest, "PACS@127.0.0.1:9")
    db = worker.store.db
    before = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    result_id, series, study = db.execute("SELECT r.id, r.series_instance_uid, s.study_instance_uid FROM results r "
                                          "JOIN series s USING (series_instance_uid) WHERE r.model = 'chest-covid19'"
                                          ).fetchone()
    with write_transaction(db):
        db.table("reviews").insert({"result_id": result_id, "study_instance_uid": study, "series_instance_uid": series,
                              "model": "chest-covid19", "decision": "confirmed", "comment": "", "reviewer": "dr_a",
                              "at": utcnow()})
    queue.enqueue_series(db, series, study, priority=1, kind=queue.REPORT)
    assert worker.run_once()
    assert db.execute("SELECT state FROM jobs WHERE kind = 'report'").fetchone()[0] == "done"
    rows = db.execute("SELECT path FROM outbox ORDER BY id").fetchall()
    assert len(rows) == before + 2  # the SR with the review state, and the report
    sr = hd.sr.srread(worker.store.home / rows[-2][0])
    groups = {g.tracking_identifier.split()[0]: g for g in sr.content.get_image_measurement_groups()}
    evaluations = {q.name.meaning: q.value.meaning for q in groups["chest-covid19"].get_qualitative_evaluations()}
    assert evaluations["Radiologist review"] == "Confirmed by a radiologist"
    doc = pydicom.dcmread(worker.store.home / rows[-1][0])
    pdf = bytes(doc.EncapsulatedDocument)[:doc.EncapsulatedDocumentLength]
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert "Reviewed by dr_a" in text and "confirmed" in text
    # the study stays "done" on the worklist while its report is re-sent
    from appliance.store.studies import study as study_doc
    assert study_doc(db, study)["status"] == "done"


# --- a PACS that refuses: objects set aside with its status and comment, retried or discarded -----------


class ScriptedPACS:
    """A real pynetdicom Storage SCP answering each C-STORE with ``status`` (and ``comment``); keeps what it stored."""

    def __init__(self, status: int, comment: str = ""):
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        self.status, self.comment = status, comment
        self.stored: list[str] = []
        self.studies: set[str] = set()  # Study Instance UIDs of what it stored
        self.calls = 0
        ae = AE(ae_title="SCRIPTED")
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        self.calls += 1
        if self.status != 0x0000:
            answer = pydicom.Dataset()
            answer.Status, answer.ErrorComment = self.status, self.comment
            return answer
        self.stored.append(str(event.dataset.SOPInstanceUID))
        self.studies.add(str(event.dataset.get("StudyInstanceUID", "")))
        return 0x0000

    @property
    def destination(self) -> str:
        return f"SCRIPTED@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def scripted_pacs():
    peers: list[ScriptedPACS] = []

    def make(status: int, comment: str = "") -> ScriptedPACS:
        peers.append(ScriptedPACS(status, comment))
        return peers[-1]
    yield make
    for peer in peers:
        peer.close()


def _due_now(db) -> None:
    with write_transaction(db):
        db.execute("UPDATE outbox SET not_before = ''")  # the backoff has passed


def _worker_for(tmp_path, synthetic_chest, destination: str, **settings) -> Worker:
    settings = config.load(environ={}, home=str(tmp_path / "home"), quiet_period_seconds=0.0, demonstration=True,
                           pacs_destinations=destination, outbox_backoff_seconds=3600.0, **settings)
    worker = Worker(settings)
    import_paths(worker.store, [synthetic_chest], settings)
    assert worker.run_once()
    return worker


def test_status_classes_follow_the_standard():
    assert not outbox.Outcome(0xA700).permanent and not outbox.Outcome(0xA7FF).permanent  # out of resources
    assert not outbox.Outcome(outbox.UNREACHABLE).permanent
    for code in (0xA900, 0xC000, 0xCFFF, 0x0122, 0x0124, outbox.ASSOCIATION_REJECTED):
        assert outbox.Outcome(code).permanent, hex(code)
    assert outbox.Outcome(0xB000).stored and not outbox.Outcome(0xB000).permanent
    assert outbox.status_meaning(0xA900) == "Data Set Does Not Match SOP Class"
    assert outbox.status_meaning(0x0122) == "Refused: SOP Class Not Supported"


def test_a_permanent_refusal_is_set_aside_after_bounded_tries_and_retry_reaches_an_accepting_pacs(
        tmp_path, synthetic_chest, scripted_pacs):
    from appliance.web import create_app
    from tests.web_helpers import csrf, login, make_accounts

    pacs = scripted_pacs(0xA900, "SOP class mismatch in test")
    worker = _worker_for(tmp_path, synthetic_chest, pacs.destination, pacs_max_attempts=3)
    db = worker.store.db
    produced = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    for attempt in range(1, 4):
        _due_now(db)
        worker.forward()
        assert pacs.calls == produced * attempt
    rows = db.execute("SELECT state, status, status_meaning, error_comment, attempts FROM outbox").fetchall()
    assert rows == [("set_aside", 0xA900, "Data Set Does Not Match SOP Class", "SOP class mismatch in test", 3)] \
        * produced
    _due_now(db)
    worker.forward()  # set aside: not sent again
    assert pacs.calls == produced * 3 and not pacs.stored

    study = db.execute("SELECT study_instance_uid FROM studies").fetchone()[0]
    app = create_app(worker.settings, environ={})
    make_accounts(worker.settings.home_path)
    client = app.test_client()
    login(client, "admin")
    admin_page = client.get("/admin/").get_data(as_text=True)
    assert admin_page.count("data-outbox-id=") == produced
    assert "0xA900" in admin_page and "SOP class mismatch in test" in admin_page and study in admin_page
    study_page = client.get(f"/study/{study}").get_data(as_text=True)
    assert "0xA900" in study_page and "SOP class mismatch in test" in study_page

    first, second = (r[0] for r in db.execute("SELECT id FROM outbox ORDER BY id LIMIT 2").fetchall())
    token = csrf(client, "/admin/")
    client.post("/admin/outbox", data={"action": "retry", "outbox_id": first, "csrf_token": token})
    client.post("/admin/outbox", data={"action": "discard", "outbox_id": second, "csrf_token": token})
    assert db.execute("SELECT state FROM outbox WHERE id = ?", [first]).fetchone()[0] == "queued"
    assert db.execute("SELECT state FROM outbox WHERE id = ?", [second]).fetchone()[0] == "discarded"
    actions = [r[0] for r in db.execute("SELECT action FROM audit_log WHERE action LIKE 'outbox_%' ORDER BY id")]
    assert actions == ["outbox_retry", "outbox_discard"]

    pacs.status = 0x0000  # the PACS was fixed: the retried object goes through, the discarded one never does
    worker.forward()
    sent = db.execute("SELECT sop_instance_uid FROM outbox WHERE state = 'sent'").fetchall()
    assert [uid for (uid,) in sent] == pacs.stored and len(pacs.stored) == 1
    assert client.get("/admin/").get_data(as_text=True).count("data-outbox-id=") == produced - 2


def test_out_of_resources_keeps_retrying_and_is_never_set_aside(tmp_path, synthetic_chest, scripted_pacs):
    pacs = scripted_pacs(0xA700, "disk full")
    worker = _worker_for(tmp_path, synthetic_chest, pacs.destination, pacs_max_attempts=2)
    db = worker.store.db
    for _ in range(4):
        _due_now(db)
        worker.forward()
    states = db.execute("SELECT DISTINCT state, attempts, refusals, status FROM outbox").fetchall()
    assert states == [("queued", 4, 0, 0xA700)]
    backoff = db.execute("SELECT min(not_before) FROM outbox").fetchone()[0]
    assert backoff > db.execute("SELECT max(created_at) FROM outbox").fetchone()[0]  # waits before the next try


@needs_orthanc
def test_send_results_again_resends_a_studys_outputs_to_orthanc(tmp_path, synthetic_chest):
    """Results made before a PACS was configured reach it with "send results again"; a second time re-queues
    them all (sent before included)."""
    from appliance.web import create_app
    from tests.web_helpers import csrf, login, make_accounts

    worker = _analysed_worker(tmp_path, synthetic_chest, "")
    db = worker.store.db
    with write_transaction(db):
        db.execute("DELETE FROM outputs")  # as for results made before outputs were recorded: built again
    dicom_port = free_port()
    proc, http_port = start_orthanc(tmp_path / "orthanc", dicom_port)
    try:
        app = create_app(worker.settings, environ={})
        make_accounts(worker.settings.home_path)
        admin = app.test_client()
        login(admin, "admin")
        admin.post("/admin/dicom", data={"dicom_ae_title": "APPLIANCE", "dicom_port": "11112",
                                         "dicom_allowed_callers": "*@127.0.0.1",
                                         "pacs_destinations": f"ORTHANC@127.0.0.1:{dicom_port}",
                                         "csrf_token": csrf(admin, "/admin/dicom")})
        tech = app.test_client()
        login(tech, "tech")
        study = db.execute("SELECT study_instance_uid FROM studies").fetchone()[0]
        page = tech.post(f"/study/{study}/send-again", data={"csrf_token": csrf(tech, f"/study/{study}")},
                         follow_redirects=True).get_data(as_text=True)
        queued = db.execute("SELECT count(*) FROM outbox WHERE state = 'queued'").fetchone()[0]
        assert queued >= 3 and f"{queued} object(s) queued for the PACS again." in page
        worker.forward()  # the worker takes up the destination saved since it started
        assert orthanc_get(http_port, "/statistics")["CountInstances"] == queued
        modalities = {orthanc_get(http_port, f"/instances/{i}/simplified-tags")["Modality"]
                      for i in orthanc_get(http_port, "/instances")}
        assert modalities == {"SR", "OT", "DOC"}
        tech.post(f"/study/{study}/send-again", data={"csrf_token": csrf(tech, f"/study/{study}")})
        assert db.execute("SELECT count(*) FROM outbox WHERE state = 'queued'").fetchone()[0] == queued
        worker.forward()
        assert db.execute("SELECT count(*) FROM outbox WHERE state = 'sent'").fetchone()[0] == queued
        assert orthanc_get(http_port, "/statistics")["CountInstances"] == queued  # the same objects again
        assert db.execute("SELECT count(*) FROM audit_log WHERE action = 'results_sent_again'").fetchone()[0] == 2
        radiologist = app.test_client()
        login(radiologist, "rad")
        assert radiologist.post(f"/study/{study}/send-again",
                                data={"csrf_token": csrf(radiologist, f"/study/{study}")}).status_code == 403
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_admin_sees_a_refused_object_in_the_browser_and_retries_it(tmp_path, synthetic_chest, scripted_pacs):
    """Chromium (Playwright) against the web UI served by waitress: the set-aside object is listed with the
    PACS's status and comment; Retry queues it again and the accepting PACS receives it."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    import threading

    from playwright.sync_api import sync_playwright
    from waitress.server import create_server

    from appliance.web import create_app
    from tests.web_helpers import CHROMIUM_ARGS, PASSWORDS, make_accounts

    pacs = scripted_pacs(0xA900, "refused by the test PACS")
    worker = _worker_for(tmp_path, synthetic_chest, pacs.destination, pacs_max_attempts=1)
    worker.forward()
    db = worker.store.db
    produced = db.execute("SELECT count(*) FROM outbox WHERE state = 'set_aside'").fetchone()[0]
    assert produced >= 3
    make_accounts(worker.settings.home_path)
    port = free_port()
    server = create_server(create_app(worker.settings, environ={}), host="127.0.0.1", port=port, threads=2)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/login")
            page.fill("input[name=username]", "admin")
            page.fill("input[name=password]", PASSWORDS["admin"])
            page.click("button[type=submit]")
            page.goto(f"http://127.0.0.1:{port}/admin/")
            rows = page.locator("[data-outbox-refused] tr[data-outbox-id]")
            assert rows.count() == produced
            first = rows.first
            assert "0xA900" in first.inner_text() and "refused by the test PACS" in first.inner_text()
            retried = int(first.get_attribute("data-outbox-id"))
            first.locator("[data-testid=outbox-retry]").click()
            page.wait_for_load_state()
            assert "Queued again for SCRIPTED@127.0.0.1" in page.content()
            assert page.locator("[data-outbox-refused] tr[data-outbox-id]").count() == produced - 1
            browser.close()
    finally:
        server.close()
    pacs.status = 0x0000
    worker.forward()
    assert pacs.stored == [db.execute("SELECT sop_instance_uid FROM outbox WHERE id = ?", [retried]).fetchone()[0]]


def test_results_of_a_study_whose_uids_were_emptied_reach_the_pacs_with_the_stored_study_uid(
        tmp_path, synthetic_chest, scripted_pacs):
    """Anonymised input with emptied Study and Series UIDs: the SR build crashed (KeyError: '') and the PDF
    went out with an empty Study Instance UID; now every object carries the UID the study was filed under."""
    from appliance.dicomfile.uids import is_valid_uid

    anonymised = tmp_path / "anonymised"
    anonymised.mkdir()
    for path in sorted(synthetic_chest.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
        ds.save_as(anonymised / path.name)
    pacs = scripted_pacs(0x0000)
    worker = _worker_for(tmp_path, anonymised, pacs.destination)
    worker.forward()
    db = worker.store.db
    [study] = [uid for (uid,) in db.execute("SELECT study_instance_uid FROM studies")]
    assert is_valid_uid(study)
    sent = db.execute("SELECT count(*) FROM outbox WHERE state = 'sent'").fetchone()[0]
    assert sent == len(pacs.stored) >= 3 and pacs.studies == {study}


def _content_items(items):
    for item in items:
        yield item
        yield from _content_items(item.get("ContentSequence", []))


def test_sr_is_a_tid1500_measurement_report_with_units_sites_and_review_states(tmp_path, synthetic_chest):
    """The SR of an analysed generated chest, read back: coded measurements with UCUM units and finding sites
    (lung volume right = the result's value in ml), flag and review per model, no JSON text left."""
    import highdicom as hd

    from appliance.jobs.intake import analyze_paths
    from appliance.outputs.dicom_objects import PRIVATE_SCHEME, build_sr

    settings = config.load(environ={}, home=str(tmp_path / "home"), demonstration=True)
    results = analyze_paths([synthetic_chest], settings)["studies"][0]["series"][0]["results"]
    for n, result in enumerate(results, start=1):
        result["id"] = n
    covid_id = next(r["id"] for r in results if r["model"] == "chest-covid19")
    reference = pydicom.dcmread(next(synthetic_chest.glob("*.dcm")), stop_before_pixels=True)
    data = io.BytesIO()
    build_sr([reference], results, {covid_id: {"decision": "rejected"}}).save_as(data, enforce_file_format=True)
    raw = pydicom.dcmread(io.BytesIO(data.getvalue()))
    assert raw.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert raw.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    texts = [str(i.TextValue) for i in _content_items(raw.ContentSequence) if "TextValue" in i]
    assert not any("{" in t or "[" in t for t in texts), texts
    sr = hd.sr.srread(io.BytesIO(data.getvalue()))
    groups = {g.tracking_identifier.split()[0]: g for g in sr.content.get_image_measurement_groups()}
    assert set(groups) == {r["model"] for r in results}
    lungs = next(r for r in results if r["model"] in ("lung-segmentation", "lungs-classical"))
    right = next(f for f in lungs["findings"] if f["name"] == "right lung")
    volumes = {(m.finding_sites[0].value.value, m.finding_sites[0].laterality.meaning): m
               for m in groups[lungs["model"]].get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))}
    right_volume = volumes[("39607008", "Right")]
    assert right_volume.value == right["volume_ml"]
    assert (right_volume.unit.value, right_volume.unit.scheme_designator) == ("ml", "UCUM")
    air = [m for m in groups["series-qa"].get_measurements() if m.name.value == "AIRHU"]
    assert air and air[0].unit.value == "[hnsf'U]"
    opacity = [m for m in groups["chest-opacity"].get_measurements() if m.name.value == "OPACITY"]
    assert {m.unit.value for m in opacity} == {"%"} and len(opacity) == 2
    evaluations = {q.name.meaning: q.value.meaning for q in groups["chest-covid19"].get_qualitative_evaluations()}
    covid = next(r for r in results if r["model"] == "chest-covid19")
    assert evaluations == {"Flagged for review": "Yes" if covid["flagged"] else "No",
                           "Validated on clinical data": "No", "Radiologist review": "Rejected by a radiologist"}
    assert "Radiologist review" not in {q.name.meaning for q in groups["series-qa"].get_qualitative_evaluations()}

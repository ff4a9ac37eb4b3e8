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


def test_a_review_sends_the_reviewed_report_again(tmp_path, synthetic_chest):
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
    assert len(rows) == before + 1
    doc = pydicom.dcmread(worker.store.home / rows[-1][0])
    pdf = bytes(doc.EncapsulatedDocument)[:doc.EncapsulatedDocumentLength]
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert "Reviewed by dr_a" in text and "confirmed" in text
    # the study stays "done" on the worklist while its report is re-sent
    from appliance.store.studies import study as study_doc
    assert study_doc(db, study)["status"] == "done"


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

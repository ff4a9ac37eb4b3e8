"""Files whose UIDs an anonymiser emptied or wrote as UUIDs are filed under stable valid UIDs, analysed,
and every output made for them carries valid UIDs (the store's, never the file's)."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from appliance.dicomfile.uids import is_valid_uid, valid_uid
from appliance.jobs.intake import analyze_paths
from appliance.series.volume import load_series
from appliance.store.database import counts, open_database
from appliance.synth.writer import SynthOptions, write_series

from .conftest import need_data

DCMCJPEG = shutil.which("dcmcjpeg")
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
STUDY_UUID = "8e1c3f2a-5b7d-4c1e-9a0f-3d2b6c4e8f10"
SERIES_UUID = "urn:uuid:0b9f5a3c-2d4e-4f6a-8b1c-7e9d0a2f4c6b"


def _anonymised_like_the_covid_set(folder: Path, out: Path) -> None:
    """Copy the series in ``folder`` as the public COVID-19 CT set has it: Siemens, JPEG Lossless, Study and
    Series Instance UIDs written as UUIDs, SOP Instance UID empty (in the data set and in the file meta)."""
    out.mkdir(parents=True)
    for path in sorted(folder.glob("*.dcm")):
        subprocess.run([DCMCJPEG, "+e1", str(path), str(out / path.name)], check=True, capture_output=True)
        ds = pydicom.dcmread(out / path.name)
        ds.Manufacturer = "SIEMENS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY_UUID, SERIES_UUID, ""
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(out / path.name)


@pytest.fixture(scope="module")
def covid_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the conformant series, the same series as the anonymiser wrote it)."""
    if DCMCJPEG is None:
        pytest.skip("dcmcjpeg is not installed (Debian package dcmtk): it writes the JPEG Lossless files")
    root = tmp_path_factory.mktemp("covid-like")
    write_series(root / "original", SynthOptions(slices=16, size=96, region="chest", seed=11))
    _anonymised_like_the_covid_set(root / "original", root / "anonymised")
    return root / "original", root / "anonymised"


def _uid_values(ds: pydicom.Dataset) -> list[tuple[str, str]]:
    """Every UID value of ``ds``, its file meta and sequences, by keyword."""
    found: list[tuple[str, str]] = []

    def collect(_: pydicom.Dataset, element: pydicom.DataElement) -> None:
        if element.VR == "UI":
            values = element.value if element.VM > 1 else [element.value]
            found.extend((element.keyword, str(v)) for v in values)

    ds.file_meta.walk(collect)
    ds.walk(collect)
    return found


def _outputs(home: Path) -> list[pydicom.Dataset]:
    files = sorted((home / "artefacts").rglob("dicom/*.dcm"))
    assert files, "no outputs were written"
    return [pydicom.dcmread(f) for f in files]


def _assert_every_uid_valid(outputs: list[pydicom.Dataset]) -> None:
    for ds in outputs:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            assert ds.get(keyword), (ds.Modality, keyword)
        bad = [(k, v) for k, v in _uid_values(ds) if v and not UID(v).is_valid]
        assert not bad, (ds.Modality, bad)


def test_a_uuid_uid_becomes_2_25_and_the_uuids_integer():
    """PS3.5 B.2: a UUID is the UID 2.25.<its 128-bit integer, decimal>."""
    expected = "2.25." + str(uuid.UUID(STUDY_UUID).int)
    assert valid_uid(STUDY_UUID) == expected
    assert valid_uid(STUDY_UUID.upper()) == expected and valid_uid("{" + STUDY_UUID + "}") == expected
    assert valid_uid(SERIES_UUID) == "2.25." + str(uuid.UUID(SERIES_UUID[9:]).int)
    assert valid_uid("1.2.840.10008.1") == "1.2.840.10008.1"  # a UID stays itself


def test_values_that_are_not_uids_map_to_one_valid_uid_each():
    bad = ["1." * 40 + "1", "1.2.3.abc", "../../../../etc/passwd", "1.2.3/4", "1.2.3\\4", "ÆØÅ"]
    mapped = [valid_uid(v) for v in bad]
    assert mapped == [valid_uid(v) for v in bad]  # the same every time
    assert len(set(mapped)) == len(bad)
    assert all(is_valid_uid(m) and UID(m).is_valid and m.startswith("2.25.") for m in mapped)


def test_uuid_study_and_series_uids_and_an_empty_sop_uid_are_filed_under_derived_uids(store, covid_like):
    """The public COVID-19 set's files were all quarantined as INVALID_UID (NOTHING_USABLE)."""
    _, anonymised = covid_like
    files = sorted(anonymised.glob("*.dcm"))
    accepted = []
    for path in files:
        with open(path, "rb") as f:
            accepted.append(store.accept(f, source="test", original_name=path.name))
    assert counts(store.db)["quarantined"] == 0
    assert {a.header.study_instance_uid for a in accepted} == {valid_uid(STUDY_UUID)}
    assert {a.header.series_instance_uid for a in accepted} == {valid_uid(SERIES_UUID)}
    sop_uids = {a.header.sop_instance_uid for a in accepted}
    assert len(sop_uids) == len(files) and all(UID(u).is_valid for u in sop_uids)
    for a, path in zip(accepted, files):
        assert a.path.is_relative_to(store.home / "instances") and a.path.read_bytes() == path.read_bytes()
    row = store.db.execute("SELECT original_uids FROM instances LIMIT 1").fetchone()
    assert json.loads(row[0]) == {"StudyInstanceUID": STUDY_UUID, "SeriesInstanceUID": SERIES_UUID,
                                  "SOPInstanceUID": ""}
    with open(files[3], "rb") as f:  # the same file again: the same derived SOP Instance UID
        again = store.accept(f, source="test", original_name="again.dcm")
    assert again.status == "duplicate" and again.header.sop_instance_uid == accepted[3].header.sop_instance_uid


def test_files_with_valid_uids_keep_no_original_uids(store, synthetic_chest):
    path = min(synthetic_chest.glob("*.dcm"))
    with open(path, "rb") as f:
        store.accept(f, source="test", original_name=path.name)
    assert store.db.execute("SELECT original_uids FROM instances").fetchone()[0] is None


def test_jpeg_lossless_series_with_uuid_uids_is_analysed_and_its_outputs_carry_valid_uids(settings, covid_like):
    original, anonymised = covid_like
    assert pydicom.dcmread(min(anonymised.glob("*.dcm"))).file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    doc = analyze_paths([anonymised], settings)
    assert doc["import"]["quarantined"] == [] and doc["import"]["stored"] == 16
    [study] = doc["studies"]
    [series] = study["series"]
    assert study["study_instance_uid"] == valid_uid(STUDY_UUID)
    assert series["status"] == "analyzed", (series["reason_code"], series["reason"])
    assert series["slices"] == 16 and series["results"]
    assert {p["reason_code"] for p in series["problems"]} >= {"INVALID_UID", "MISSING_UID"}
    outputs = _outputs(settings.home_path)
    _assert_every_uid_valid(outputs)
    assert {ds.StudyInstanceUID for ds in outputs} == {valid_uid(STUDY_UUID)}
    sr = next(ds for ds in outputs if ds.Modality == "SR")
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    [referenced] = evidence.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == valid_uid(SERIES_UUID)
    stored = {r[0] for r in open_database(settings.home_path).execute("SELECT sop_instance_uid FROM instances")}
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedSOPSequence} <= stored
    # the decoded volume is the conformant series' own
    ours = load_series(sorted(anonymised.glob("*.dcm")), settings)
    assert np.array_equal(ours.hu, load_series(sorted(original.glob("*.dcm")), settings).hu)


def test_outputs_of_a_study_whose_uids_were_emptied_carry_valid_uids(settings):
    """The SR build failed with KeyError: '' and the PDF went out with an empty Study Instance UID."""
    folder = need_data("ct", "totalseg-example-j2k")
    doc = analyze_paths([folder], settings)
    [study] = doc["studies"]
    [series] = study["series"]
    assert series["status"] == "analyzed", (series["reason_code"], series["reason"])
    outputs = _outputs(settings.home_path)
    assert {"SR", "DOC"} <= {ds.Modality for ds in outputs}
    _assert_every_uid_valid(outputs)
    assert {ds.StudyInstanceUID for ds in outputs} == {study["study_instance_uid"]}

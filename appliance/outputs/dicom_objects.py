"""DICOM outputs of one analysed series, built with highdicom.

- a Comprehensive SR holding a TID 1500 Measurement Report: one TID 1501 group per model result, tracked by
  the model's id and version, its algorithm identified (TID 4019), its measurements coded (SCT, DCM, this
  appliance's 99CTSCREEN scheme) with UCUM units and finding sites, and its flag, validation status and
  review state as qualitative evaluations; referencing the analysed images;
- one Secondary Capture per key image (PNG with overlay), in the patient's study;
- the study's PDF report as Encapsulated PDF (highdicom has no builder for it: written
  with pydicom, module by module from PS3.3 A.45.1).

Every object names the patient's study, series and images by the UIDs the store filed them under,
never by what the files wrote: an anonymiser's emptied or UUID-form UIDs were replaced by valid
derived ones on import (:mod:`appliance.dicomfile.uids`), and the outputs carry those. Objects are
written, read back and checked (every UID valid) before they are queued for a PACS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from appliance import __version__
from appliance.dicomfile.uids import is_valid_uid, valid_uid
from appliance.outputs.report import is_reviewed
from appliance.store.instances import StoredInstance

MANUFACTURER = "CT screening appliance"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PDF_SERIES_NUMBER = 9903
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                          "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                          "StudyDescription")
# Codes: DCM, SCT and UCUM where the standard has one; this appliance's own concepts in its private scheme
PRIVATE_SCHEME = "99CTSCREEN"
CT_PROCEDURE = ("77477000", "SCT", "Computerized axial tomography")
# this appliance as the device observer: one UID, the same on every site and run
DEVICE_OBSERVER_UID = generate_uid(entropy_srcs=[MANUFACTURER])
LUNG = ("39607008", "SCT", "Lung")
PANCREAS = ("15776009", "SCT", "Pancreas")
PANCREAS_PARTS = {"head": ("64163001", "SCT", "Head of pancreas"), "body": ("40133006", "SCT", "Body of pancreas"),
                  "tail": ("73239005", "SCT", "Tail of pancreas")}
RIGHT, LEFT, BOTH = ("24028007", "SCT", "Right"), ("7771000", "SCT", "Left"), ("51440002", "SCT", "Right and left")
YES, NO = ("373066001", "SCT", "Yes"), ("373067005", "SCT", "No")
VOLUME = ("118565006", "SCT", "Volume")
DIAMETER = ("81827009", "SCT", "Diameter")
UNITS = {"ml": ("ml", "UCUM", "milliliter"), "%": ("%", "UCUM", "percent"),
         "HU": ("[hnsf'U]", "UCUM", "Hounsfield unit"), "mm": ("mm", "UCUM", "millimeter"),
         "1": ("1", "UCUM", "no units")}


def _private(value: str, meaning: str) -> tuple[str, str, str]:
    return value, PRIVATE_SCHEME, meaning


FLAGGED = _private("FLAGGED", "Flagged for review")
VALIDATED = _private("VALIDATED", "Validated on clinical data")
REVIEW = _private("REVIEW", "Radiologist review")
REVIEW_STATES = {"confirmed": _private("CONFIRMED", "Confirmed by a radiologist"),
                 "rejected": _private("REJECTED", "Rejected by a radiologist"),
                 "needs re-review": _private("REREVIEW", "Needs re-review: the earlier review no longer applies"),
                 None: _private("NOTREVIEWED", "Not reviewed")}
SCORE, THRESHOLD = _private("SCORE", "Model score"), _private("THRESHOLD", "Decision threshold")
OPACITY = _private("OPACITY", "Lung opacity, percent of lung volume")
GROUND_GLASS = _private("GGO", "Ground-glass opacity, percent of lung volume")
CONSOLIDATION = _private("CONSOL", "Consolidation, percent of lung volume")
LAA = {-950: _private("LAA950", "Low-attenuation area below -950 HU, percent of lung"),
       -910: _private("LAA910", "Low-attenuation area below -910 HU, percent of lung")}
MEAN_LUNG_DENSITY = _private("MLD", "Mean lung density")
AIR_ATTENUATION, IMAGE_NOISE = _private("AIRHU", "Air attenuation"), _private("NOISE", "Image noise in air")
SCAN_LENGTH = _private("SCANLEN", "Scan length")
PROBABILITY = _private("PROB", "Lesion probability")
# the unit of a result's score and threshold (a classifier's are probabilities: no unit)
SCORE_UNITS = {"series-qa": "HU", "chest-opacity": "%", "lung-emphysema": "%"}


def _code(triple):
    import highdicom as hd

    return hd.sr.CodedConcept(value=triple[0], scheme_designator=triple[1], meaning=triple[2])


def _site(location, laterality=None):
    import highdicom as hd

    return hd.sr.FindingSite(_code(location), laterality=_code(laterality) if laterality else None)


def _measurement(name, value, unit: str, sites=()):
    import highdicom as hd

    return hd.sr.Measurement(name=_code(name), value=float(value), unit=_code(UNITS[unit]),
                             finding_sites=list(sites) or None)


def _measurements(result: dict[str, Any]) -> list:
    """TID 300 measurements of ``result``, each with its UCUM unit and, where it has one, its finding site."""
    found = {f.get("name"): f for f in result["findings"] if isinstance(f, dict)}
    out = []
    sides = {"right": RIGHT, "left": LEFT}
    for side, laterality in sides.items():
        if f"{side} lung" in found:
            out.append(_measurement(VOLUME, found[f"{side} lung"]["volume_ml"], "ml", [_site(LUNG, laterality)]))
    if "lungs" in found:
        out.append(_measurement(VOLUME, found["lungs"]["total_volume_ml"], "ml", [_site(LUNG, BOTH)]))
    for row in (found.get("opacity by lung") or {}).get("rows") or []:
        site = [_site(LUNG, sides.get(row.get("lung"), BOTH))]
        for name, key in ((OPACITY, "opacity_percent"), (GROUND_GLASS, "ground_glass_percent"),
                          (CONSOLIDATION, "consolidation_percent")):
            if row.get(key) is not None:
                out.append(_measurement(name, row[key], "%", site))
    if "emphysema" in found:
        e = found["emphysema"]
        out += [_measurement(LAA[t], e[f"laa{-t}_percent"], "%", [_site(LUNG, BOTH)]) for t in LAA
                if e.get(f"laa{-t}_percent") is not None]
        if e.get("mean_lung_hu") is not None:
            out.append(_measurement(MEAN_LUNG_DENSITY, e["mean_lung_hu"], "HU", [_site(LUNG, BOTH)]))
    if "air calibration" in found and "air_hu" in found["air calibration"]:
        out += [_measurement(AIR_ATTENUATION, found["air calibration"]["air_hu"], "HU"),
                _measurement(IMAGE_NOISE, found["air calibration"]["noise_hu"], "HU")]
    if "coverage" in found:
        out.append(_measurement(SCAN_LENGTH, found["coverage"]["length_mm"], "mm"))
    if "pancreas (localised)" in found:
        out.append(_measurement(VOLUME, found["pancreas (localised)"]["volume_ml"], "ml", [_site(PANCREAS)]))
    lesion = found.get("lesion candidate") or found.get("most suspicious region")
    if lesion is not None:
        site = [_site(_pancreas_part(result, lesion))]
        out.append(_measurement(PROBABILITY, lesion["probability"], "1", site))
        if lesion.get("diameter_mm"):
            out.append(_measurement(DIAMETER, lesion["diameter_mm"], "mm", site))
    if result.get("score") is not None and result.get("threshold") is not None:
        unit = SCORE_UNITS.get(result["model"], "1")
        out += [_measurement(SCORE, result["score"], unit), _measurement(THRESHOLD, result["threshold"], unit)]
    return out


def _pancreas_part(result: dict[str, Any], lesion: dict[str, Any]):
    """The SCT code of the part of the pancreas the lesion lies in (the same rule as the sentence)."""
    from appliance.outputs.findings_text import pancreas_part

    part = pancreas_part(result, lesion.get("centre_mm") or [0.0], lambda text, **kw: text)
    return PANCREAS_PARTS.get(part.removeprefix("pancreatic "), PANCREAS)


def _evaluations(result: dict[str, Any], review: dict[str, Any] | None) -> list:
    """Flagged or not, validated or not, and the radiologist's decision, as coded qualitative evaluations."""
    import highdicom as hd

    out = [hd.sr.QualitativeEvaluation(_code(FLAGGED), _code(YES if result["flagged"] else NO)),
           hd.sr.QualitativeEvaluation(_code(VALIDATED), _code(YES if result["validated"] else NO))]
    if not is_reviewed(result):
        return out  # a measurement carries no decision to confirm or reject
    decision = (review or {}).get("state") or (review or {}).get("decision")
    out.append(hd.sr.QualitativeEvaluation(_code(REVIEW), _code(REVIEW_STATES.get(decision, REVIEW_STATES[None]))))
    return out


def _finding_type(model: str):
    if model.startswith(("lung", "chest")):
        return _code(LUNG)
    return _code(PANCREAS) if model.startswith("abdomen-pancreas") else None


def _group(result: dict[str, Any], review: dict[str, Any] | None):
    """One TID 1501 group per model result: tracked by the model's id, its algorithm identified (TID 4019)."""
    import highdicom as hd

    model = f"{result['model']} {result['model_version']}"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=model[:64]),
        algorithm_id=hd.sr.AlgorithmIdentification(name=result["model"], version=result["model_version"],
                                                   parameters=[f"{result['backend']} {result['precision']}"]),
        finding_type=_finding_type(result["model"]), measurements=_measurements(result) or None,
        qualitative_evaluations=_evaluations(result, review))


def build_sr(evidence: list[pydicom.Dataset], results: list[dict[str, Any]],
             reviews: dict[int, dict[str, Any]] | None = None) -> pydicom.Dataset:
    """A Comprehensive SR holding a TID 1500 Measurement Report: one measurement group per model result with its
    measurements (UCUM units, coded finding sites), flag, validation status and review state (``reviews``: the
    latest review of each result, by result id)."""
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes

    reviews = reviews or {}
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=__version__))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(CT_PROCEDURE),
        imaging_measurements=[_group(r, reviews.get(r.get("id", -1))) for r in results])
    scheme = CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name="CT screening appliance concepts",
                                                  responsible_organization=MANUFACTURER)
    return hd.sr.ComprehensiveSR(
        evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description="AI screening results", software_versions=__version__, coding_schemes=[scheme])


def build_key_image(reference: pydicom.Dataset, png: Path, instance_number: int, series_uid: str) -> pydicom.Dataset:
    """A Secondary Capture of one key image (RGB PNG with overlay) in the reference image's study."""
    import highdicom as hd
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=instance_number, manufacturer=MANUFACTURER,
        series_description="AI key images (NOT for diagnosis)", patient_orientation=("L", "P"))
    sc.BurnedInAnnotation = "YES"  # the model's validation notice is part of the pixels
    return sc


def build_encapsulated_pdf(reference: pydicom.Dataset, pdf: bytes, title: str) -> pydicom.Dataset:
    """An Encapsulated PDF instance of ``pdf`` in the reference image's patient and study."""
    import datetime

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    now = datetime.datetime.now()
    ds = pydicom.Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:  # Patient and General Study modules, as in the images
        setattr(ds, keyword, reference.get(keyword, ""))
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF_STORAGE, generate_uid()
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "DOC", generate_uid(), PDF_SERIES_NUMBER
    ds.SeriesDescription = "AI screening report (NOT for diagnosis)"
    ds.Manufacturer, ds.SoftwareVersions, ds.ConversionType = MANUFACTURER, __version__, "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the report names the patient
    ds.DocumentTitle = title[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _conformant(reference: pydicom.Dataset) -> pydicom.Dataset:
    """The reference image with values highdicom would refuse made empty (a scanner's odd Patient's Sex
    must not stop the results from reaching the PACS)."""
    if str(reference.get("PatientSex", "")) not in ("", "M", "F", "O"):
        reference.PatientSex = ""
    return reference


def _valid_uids(ds: pydicom.Dataset) -> None:
    """Replace every UID value in ``ds`` (sequences included) that is not a UID by the valid UID the
    store derives from it (:func:`valid_uid`): a UUID-form Frame of Reference UID must not reach the PACS."""
    def fix(dataset: pydicom.Dataset, element: pydicom.DataElement) -> None:
        if element.VR != "UI" or element.VM != 1:
            return
        value = str(element.value or "").strip()
        if value and not is_valid_uid(value):
            element.value = valid_uid(value)

    ds.walk(fix)


def reference_dataset(instance: StoredInstance) -> pydicom.Dataset:
    """The header of a stored image as the outputs copy it: patient and study as the image has them,
    the study, series and image named by the store's UIDs, and no value highdicom would refuse."""
    reference = _conformant(pydicom.dcmread(instance.path, stop_before_pixels=True))
    _valid_uids(reference)
    reference.SOPClassUID, reference.SOPInstanceUID = instance.sop_class_uid, instance.sop_instance_uid
    reference.StudyInstanceUID = instance.study_instance_uid
    reference.SeriesInstanceUID = instance.series_instance_uid
    meta = getattr(reference, "file_meta", None)
    if meta is not None:
        meta.MediaStorageSOPClassUID = instance.sop_class_uid
        meta.MediaStorageSOPInstanceUID = instance.sop_instance_uid
    return reference


def invalid_uids(ds: pydicom.Dataset) -> list[str]:
    """Keywords of the UID values in ``ds`` (file meta and sequences included) that are not valid UIDs,
    and of the Study, Series, SOP Class or SOP Instance UID when missing."""
    bad = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID") if not ds.get(k)]

    def check(dataset: pydicom.Dataset, element: pydicom.DataElement) -> None:
        values = element.value if element.VM > 1 else [element.value]
        if element.VR == "UI" and any(v and not is_valid_uid(str(v)) for v in values):
            bad.append(element.keyword or str(element.tag))

    for part in (getattr(ds, "file_meta", None), ds):
        if part is not None:
            part.walk(check)
    return bad


def _write_and_check(ds: pydicom.Dataset, out_dir: Path, study_uid: str) -> Path:
    """Write ``ds`` durably under its modality and SOP Instance UID, read it back, check it."""
    import io

    from appliance.durable import write_bytes_durably

    path = out_dir / f"{ds.Modality.lower()}-{ds.SOPInstanceUID}.dcm"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_bytes_durably(buffer.getvalue(), path)
    back = pydicom.dcmread(path)
    if back.SOPInstanceUID != ds.SOPInstanceUID or back.StudyInstanceUID != study_uid:
        raise ValueError(f"{path.name} did not read back as written")
    bad = invalid_uids(back)
    if bad:
        raise ValueError(f"{path.name} has UIDs that are not valid: {', '.join(bad)}")
    return path


def write_report_object(reference: StoredInstance, pdf: bytes, title: str, out_dir: Path) -> Path:
    """The study report alone as Encapsulated PDF (sent again after a review), in the study of the stored
    image ``reference``; returns its path."""
    return _write_and_check(build_encapsulated_pdf(reference_dataset(reference), pdf, title), out_dir,
                            reference.study_instance_uid)


def write_reviewed_sr(reference: StoredInstance, results: list[dict[str, Any]], out_dir: Path) -> Path:
    """The series' SR again, its results as the store has them now (each with its ``id`` and ``review``, as
    :func:`appliance.store.studies.study` gives them): every decision carries the radiologist's review state."""
    states = {r["id"]: {"state": str(getattr(r.get("review"), "state", "") or "") or None} for r in results}
    return _write_and_check(build_sr([reference_dataset(reference)], results, states), out_dir,
                            reference.study_instance_uid)


def write_outputs(record: dict[str, Any], images: list[StoredInstance], out_dir: Path,
                  report_pdf: tuple[bytes, str] | None = None, home: Path | None = None) -> list[Path]:
    """Build, write and read back the SR, key images and (given ``(pdf, title)``) the report of an analysed
    series of stored ``images``; returns their paths. Key images are found relative to the data directory
    ``home``."""
    import highdicom as hd

    evidence = [reference_dataset(i) for i in images[:1]]
    objects = [build_sr(evidence, record["results"])]
    sc_series = hd.UID()
    root = home or Path.cwd()
    pngs = [root / f["key_image"] for r in record["results"] for f in r["findings"] if f.get("key_image")]
    objects += [build_key_image(evidence[0], png, k + 1, sc_series) for k, png in enumerate(pngs)]
    if report_pdf is not None:
        objects.append(build_encapsulated_pdf(evidence[0], *report_pdf))
    return [_write_and_check(ds, out_dir, images[0].study_instance_uid) for ds in objects]

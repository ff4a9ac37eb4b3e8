"""DICOM outputs of one analysed series, built with highdicom.

- a Comprehensive SR: one container per model with its identity, validation
  status, score, threshold, flag and findings, referencing the analysed images;
- one Secondary Capture per key image (PNG with overlay), in the patient's study;
- the study's PDF report as Encapsulated PDF (highdicom has no builder for it: written
  with pydicom, module by module from PS3.3 A.45.1).

Every object names the patient's study, series and images by the UIDs the store filed them under,
never by what the files wrote: an anonymiser's emptied or UUID-form UIDs were replaced by valid
derived ones on import (:mod:`appliance.dicomfile.uids`), and the outputs carry those. Objects are
written, read back and checked (every UID valid) before they are queued for a PACS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from appliance import __version__
from appliance.dicomfile.uids import is_valid_uid, valid_uid
from appliance.store.instances import StoredInstance

MANUFACTURER = "CT screening appliance"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
PDF_SERIES_NUMBER = 9903
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                          "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
                          "StudyDescription")
REPORT_TITLE = ("126000", "DCM", "Imaging Measurement Report")
ALGORITHM_NAME = ("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = ("111003", "DCM", "Algorithm Version")
COMMENT = ("121106", "DCM", "Comment")
FINDING = ("121071", "DCM", "Finding")


def _code(triple):
    import highdicom as hd

    return hd.sr.CodedConcept(value=triple[0], scheme_designator=triple[1], meaning=triple[2])


def _text(name, value: str):
    import highdicom as hd

    return hd.sr.TextContentItem(name=_code(name), value=value[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def build_sr(evidence: list[pydicom.Dataset], results: list[dict[str, Any]]) -> pydicom.Dataset:
    """A Comprehensive SR with every model's result for the series of ``evidence``."""
    import highdicom as hd

    containers = []
    for result in results:
        container = hd.sr.ContainerContentItem(name=_code(("121070", "DCM", "Findings")),
                                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence(_items(result))
        containers.append(container)
    root = hd.sr.ContainerContentItem(name=_code(REPORT_TITLE))
    root.ContentSequence = hd.sr.ContentSequence(containers)
    return hd.sr.ComprehensiveSR(
        evidence=evidence, content=root, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description="AI screening results", software_versions=__version__)


def _items(result: dict[str, Any]) -> list:
    import highdicom as hd

    items = [
        _text(ALGORITHM_NAME, result["model"]), _text(ALGORITHM_VERSION, result["model_version"]),
        _text(COMMENT, f"backend {result['backend']} {result['precision']}; "
                       + ("validated" if result["validated"] else "NOT VALIDATED: " + (result.get("notice") or ""))),
    ]
    if result["score"] is not None:
        items.append(hd.sr.NumContentItem(name=_code(("C0449820", "UMLS", "Score")), value=float(result["score"]),
                                          unit=codes.UCUM.NoUnits,
                                          relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    flag = "FLAGGED for review" if result["flagged"] else "not flagged"
    threshold = "" if result["threshold"] is None else f" at threshold {result['threshold']}"
    items.append(_text(FINDING, f"{flag}{threshold}"))
    for finding in result["findings"]:
        items.append(_text(FINDING, json.dumps({k: v for k, v in finding.items() if k != "key_image"})))
    return items


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
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

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

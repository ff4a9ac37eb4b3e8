"""DICOM outputs of one analysed series, built with highdicom.

- a Comprehensive SR: one container per model with its identity, validation
  status, score, threshold, flag and findings, referencing the analysed images;
- one Secondary Capture per key image (PNG with overlay), in the patient's study;
- the study's PDF report as Encapsulated PDF (highdicom has no builder for it: written
  with pydicom, module by module from PS3.3 A.45.1).

Objects are written, read back and checked before they are queued for a PACS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from appliance import __version__

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
    return path


def write_report_object(reference_path: Path, pdf: bytes, title: str, out_dir: Path) -> Path:
    """The study report alone as Encapsulated PDF (sent again after a review); returns its path."""
    reference = _conformant(pydicom.dcmread(reference_path, stop_before_pixels=True))
    return _write_and_check(build_encapsulated_pdf(reference, pdf, title), out_dir, reference.StudyInstanceUID)


def write_outputs(record: dict[str, Any], image_paths: list[Path], out_dir: Path,
                  report_pdf: tuple[bytes, str] | None = None, home: Path | None = None) -> list[Path]:
    """Build, write and read back the SR, key images and (given ``(pdf, title)``) the report of an analysed
    series; returns their paths. Key images are found relative to the data directory ``home``."""
    import highdicom as hd


    evidence = [_conformant(pydicom.dcmread(p, stop_before_pixels=True)) for p in image_paths[:1]]
    objects = [build_sr(evidence, record["results"])]
    sc_series = hd.UID()
    root = home or Path.cwd()
    pngs = [root / f["key_image"] for r in record["results"] for f in r["findings"] if f.get("key_image")]
    objects += [build_key_image(evidence[0], png, k + 1, sc_series) for k, png in enumerate(pngs)]
    if report_pdf is not None:
        objects.append(build_encapsulated_pdf(evidence[0], *report_pdf))
    return [_write_and_check(ds, out_dir, evidence[0].StudyInstanceUID) for ds in objects]

"""Odd and hostile values in CT headers: tolerated where other readers tolerate them (and said so),
otherwise a rejection naming the instance; never a failed analysis."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from appliance.errors import ReasonCode, SeriesRejected
from appliance.jobs.intake import analyze_paths
from appliance.series.values import parse_number
from appliance.series.volume import load_series
from appliance.synth.writer import SynthOptions, write_series

Mutation = Callable[[pydicom.Dataset], None]


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 slices of 64 x 64, the series every mutant is made from."""
    out = tmp_path_factory.mktemp("hostile") / "good"
    write_series(out, SynthOptions(slices=12, size=64, region="chest", seed=21))
    (out / "ground_truth.json").unlink()
    return out


def written_as(keyword: str, text: str) -> Mutation:
    """Write ``text`` as the value of ``keyword`` byte for byte, as a careless writer would (pydicom refuses
    to make such a value itself)."""
    def mutate(ds: pydicom.Dataset) -> None:
        if keyword not in ds:
            setattr(ds, keyword, "1")
        ds[keyword]._value = text
    return mutate


def without(keyword: str) -> Mutation:
    def mutate(ds: pydicom.Dataset) -> None:
        del ds[keyword]
    return mutate


def set_to(keyword: str, value: object) -> Mutation:
    def mutate(ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)
    return mutate


def mutant(source: Path, out: Path, mutation: Mutation, slices: tuple[int, ...] | None = (5,)) -> Path:
    """A copy of the series in ``source`` as a series of its own, with ``mutation`` applied to ``slices``
    (all when None)."""
    out.mkdir(parents=True)
    series = generate_uid(entropy_srcs=[str(out)])
    for index, path in enumerate(sorted(source.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series, str(index)])
        if slices is None or index in slices:
            mutation(ds)
        ds.save_as(out / path.name)
    return out


def codes(problems) -> set[tuple[str, str]]:
    return {(p.reason_code.value, "rejected" if p.fatal else "corrected") for p in problems}


# --- tolerance: numbers with trailing characters ------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [("0.976562u", 0.976562), ("120\x00", 120.0), ("3mm", 3.0),
                                         ("-1024 ", -1024.0), (" 1.5", 1.5), ("+2e-3x", 0.002)])
def test_numbers_with_trailing_characters_are_read_as_other_readers_read_them(text, value):
    number = parse_number(text)
    assert number is not None and number.value == pytest.approx(value)
    assert number.trailing == (text.strip(" ") != text.strip(" \x00umx"))


@pytest.mark.parametrize("text", ["1,5", "1.2.3", "nan", "inf", "-Infinity", "1e999", "abc", "", "12a3"])
def test_a_value_that_may_mean_another_number_is_not_read_past(text):
    """'1,5' is a decimal comma, not 1 with junk after it; NaN and infinity are no image's values."""
    assert parse_number(text) is None


def test_trailing_junk_in_is_and_ds_values_is_read_and_noted(small_series, tmp_path, settings):
    """'0.976562u' in Rescale Slope, a NUL after Rescale Intercept, 'mm' after Pixel Spacing and a letter
    after Instance Number raised ValueError in series/headers.py: the analysis failed."""
    def junk(ds: pydicom.Dataset) -> None:
        for keyword, text in (("RescaleSlope", "0.976562u"), ("RescaleIntercept", "-1024\x00"),
                              ("PixelSpacing", "0.78125\\0.78125mm"), ("InstanceNumber", f"{ds.InstanceNumber}a")):
            written_as(keyword, text)(ds)

    good = load_series(sorted(small_series.glob("*.dcm")), settings)
    odd = load_series(sorted(mutant(small_series, tmp_path / "junk", junk, None).glob("*.dcm")), settings)
    assert codes(odd.plan.problems) == {("MALFORMED_NUMBER", "corrected")}
    reasons = " ".join(p.reason for p in odd.plan.problems)
    assert "'0.976562u'" in reasons and "'-1024\\x00'" in reasons and "12 image(s)" in reasons
    expected = np.rint((good.hu.astype(np.float64) + 1024) * 0.976562 - 1024)
    assert np.abs(odd.hu - expected).max() <= 1
    assert odd.spacing_mm_zyx[1:] == pytest.approx((0.78125, 0.78125))


# --- tolerance: a missing position from Slice Location -------------------------------------------------

def test_missing_image_position_is_taken_from_slice_location(small_series, tmp_path, settings):
    good = load_series(sorted(small_series.glob("*.dcm")), settings)
    odd = load_series(sorted(mutant(small_series, tmp_path / "nopos", without("ImagePositionPatient"),
                                    (4, 7)).glob("*.dcm")), settings)
    assert codes(odd.plan.problems) == {("MISSING_POSITION", "corrected")}
    assert np.array_equal(odd.hu, good.hu) and np.allclose(odd.plan.affine(), good.plan.affine())


@pytest.mark.parametrize("case", ["no slice location", "slice location disagrees", "most positions missing",
                                  "tilted series"])
def test_missing_image_position_is_not_guessed_when_the_series_does_not_agree(case, small_series, tmp_path,
                                                                              settings):
    source, slices = small_series, (4,)
    mutation = without("ImagePositionPatient")
    if case == "no slice location":
        def mutation(ds: pydicom.Dataset) -> None:
            del ds.ImagePositionPatient, ds.SliceLocation
    elif case == "slice location disagrees":
        def mutation(ds: pydicom.Dataset) -> None:
            ds.SliceLocation = str(float(ds.SliceLocation) + (1.0 if ds.InstanceNumber % 2 else 0.0))
            if ds.InstanceNumber == 5:
                del ds.ImagePositionPatient
        slices = None
    elif case == "most positions missing":
        slices = tuple(range(7))
    else:
        source = tmp_path / "tilted"
        write_series(source, SynthOptions(slices=12, size=64, region="chest", seed=21, tilt_deg=12))
    with pytest.raises(SeriesRejected) as info:
        load_series(sorted(mutant(source, tmp_path / "odd", mutation, slices).glob("*.dcm")), settings)
    assert info.value.reason_code == ReasonCode.MISSING_POSITION


# --- a bad slice names its instance --------------------------------------------------------------------

@pytest.mark.parametrize(("keyword", "text", "says"), [
    ("RescaleSlope", "nan", "RescaleSlope 'nan' is not a number"),
    ("RescaleSlope", "inf", "RescaleSlope 'inf' is not a number"),
    ("RescaleIntercept", "NaN", "RescaleIntercept 'NaN' is not a number"),
    ("RescaleSlope", "0", "RescaleSlope '0' is not a usable slope"),
    ("PixelSpacing", "0\\0.7", "PixelSpacing '0\\0.7' is not two positive numbers"),
    ("ImagePositionPatient", "nan\\0\\0", "is not 3 numbers"),
    ("ImageOrientationPatient", "0\\0\\0\\0\\0\\0", "is not two unit directions at right angles"),
])
def test_a_non_finite_or_impossible_value_rejects_the_series_naming_its_instance(keyword, text, says, small_series,
                                                                                 tmp_path, settings):
    folder = mutant(small_series, tmp_path / "bad", written_as(keyword, text))
    victim = pydicom.dcmread(sorted(folder.glob("*.dcm"))[5], stop_before_pixels=True).SOPInstanceUID
    with pytest.raises(SeriesRejected) as info:
        load_series(sorted(folder.glob("*.dcm")), settings)
    assert info.value.reason_code == ReasonCode.CORRUPT_PIXEL_DATA
    assert f"Instance {victim}" in info.value.reason and says in info.value.reason


# --- no mutant fails its analysis ----------------------------------------------------------------------

CORRUPT, MISSING_POSITION = "CORRUPT_PIXEL_DATA", "MISSING_POSITION"
# name: (mutation, slices it is applied to (None: all), the series' reason code (None: analysed))
MUTATIONS: dict[str, tuple[Mutation, tuple[int, ...] | None, str | None]] = {
    "slope with a letter after it": (written_as("RescaleSlope", "0.976562u"), None, None),
    "slope not a number": (written_as("RescaleSlope", "abc"), (5,), CORRUPT),
    "slope NaN": (written_as("RescaleSlope", "nan"), (5,), CORRUPT),
    "slope infinite": (written_as("RescaleSlope", "inf"), None, CORRUPT),
    "intercept NaN": (written_as("RescaleIntercept", "NaN"), (5,), CORRUPT),
    "intercept with a NUL": (written_as("RescaleIntercept", "-1024\x00"), None, None),
    "spacing with units": (written_as("PixelSpacing", "0.78125\\0.78125mm"), None, None),
    "spacing zero": (written_as("PixelSpacing", "0\\0"), (5,), CORRUPT),
    "spacing one number": (written_as("PixelSpacing", "0.7"), (5,), CORRUPT),
    "position NaN": (written_as("ImagePositionPatient", "nan\\0\\0"), (5,), CORRUPT),
    "position missing": (without("ImagePositionPatient"), (5,), None),
    "position missing everywhere": (without("ImagePositionPatient"), None, MISSING_POSITION),
    "orientation zero": (written_as("ImageOrientationPatient", "0\\0\\0\\0\\0\\0"), (5,), CORRUPT),
    "orientation missing": (without("ImageOrientationPatient"), (5,), CORRUPT),
    "instance number with a letter": (written_as("InstanceNumber", "12a"), (5,), None),
    "instance number not a number": (written_as("InstanceNumber", "x"), None, None),
    "12-bit pixels": (set_to("BitsAllocated", 12), (5,), CORRUPT),
    "no bits stored": (set_to("BitsStored", 0), None, CORRUPT),
    "pixel representation 2": (set_to("PixelRepresentation", 2), (5,), CORRUPT),
    "rows zero": (set_to("Rows", 0), None, CORRUPT),
    "one slice smaller": (set_to("Rows", 63), (5,), CORRUPT),
    "no rows": (without("Rows"), (5,), CORRUPT),
    # quarantined on import as TRUNCATED: the series lacks a slice (too many for 12)
    "pixel data cut short": (lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]), (5,), "MISSING_SLICES"),
}


def _damaged_jpeg2000(tmp_path: Path) -> Path:
    folder = tmp_path / "j2k"
    write_series(folder, SynthOptions(slices=12, size=64, region="chest", seed=22, transfer_syntax="jpeg2000"))
    (folder / "ground_truth.json").unlink()
    victim = sorted(folder.glob("*.dcm"))[5]
    data = bytearray(victim.read_bytes())
    siz = data.index(b"\xff\x4f\xff\x51") + 4  # the codestream's image size segment, zeroed: the file still
    data[siz:siz + 8] = bytes(8)  # ends as it should, only a decoder sees the damage
    victim.write_bytes(bytes(data))
    return folder


def test_every_mutated_series_ends_analyzed_or_rejected_with_a_code(small_series, tmp_path, settings, caplog):
    """38 of 1,103 stored mutants raised during analysis (bad DS strings, NaN rescale, odd sizes): their jobs
    failed and were retried instead of the series being refused with a reason."""
    folders = {name: mutant(small_series, tmp_path / f"m{k:02d}", mutation, slices)
               for k, (name, (mutation, slices, _)) in enumerate(MUTATIONS.items())}
    folders["compressed pixel data damaged"] = _damaged_jpeg2000(tmp_path)
    expected = {name: code for name, (_, _, code) in MUTATIONS.items()} | {"compressed pixel data damaged": CORRUPT}
    with caplog.at_level(logging.ERROR):
        doc = analyze_paths(list(folders.values()), settings)
    by_uid = {s["series_instance_uid"]: s for study in doc["studies"] for s in study["series"]}
    outcomes = {}
    for name, folder in folders.items():
        series = by_uid[pydicom.dcmread(min(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID]
        assert series["status"] in ("analyzed", "rejected"), (name, series["reason_code"], series["reason"])
        assert series["status"] == "analyzed" or series["reason"], name
        outcomes[name] = series["reason_code"]
    assert outcomes == expected
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an analysis raised"


def test_one_slice_with_min_slices_1_is_too_few_slices(small_series, tmp_path, settings):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(min(small_series.glob("*.dcm")), one)
    doc = analyze_paths([one], settings.replace(min_slices=1))
    [series] = doc["studies"][0]["series"]
    assert series["status"] == "rejected" and series["reason_code"] == "TOO_FEW_SLICES"


def test_a_reader_fault_rejects_the_series_as_unreadable_and_is_logged(small_series, settings, monkeypatch,
                                                                       caplog):
    """Anything but a rejection raised while reading a series is the series' (UNREADABLE_SERIES), not a
    job failed and retried; its traceback still reaches the log."""
    import appliance.series.volume

    def broken(paths):
        raise TypeError("a fault of this program")

    monkeypatch.setattr(appliance.series.volume, "read_frames", broken)
    with caplog.at_level(logging.ERROR):
        doc = analyze_paths([small_series], settings)
    [series] = doc["studies"][0]["series"]
    assert series["status"] == "rejected" and series["reason_code"] == "UNREADABLE_SERIES"
    assert "TypeError" in series["reason"]
    assert any(r.exc_info and "a fault of this program" in str(r.exc_info[1]) for r in caplog.records)


def test_a_frame_whose_rescale_is_not_finite_is_refused_when_decoded(small_series, settings):
    """series/pixels.py turned a NaN intercept into ValueError ('cannot convert float NaN to integer')."""
    import dataclasses

    from appliance.series.pixels import decode_volume

    volume = load_series(sorted(small_series.glob("*.dcm")), settings)
    for change in ({"rescale_intercept": float("nan")}, {"rescale_slope": float("inf")}):
        frames = [dataclasses.replace(f, **change) if k == 3 else f for k, f in enumerate(volume.frames)]
        with pytest.raises(SeriesRejected) as info:
            decode_volume(frames, workers=1)
        assert info.value.reason_code == ReasonCode.CORRUPT_PIXEL_DATA
        assert f"Instance {frames[3].sop_instance_uid}" in info.value.reason


def test_every_reason_code_is_documented():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "series-checks.md").read_text()
    assert [code.value for code in ReasonCode if f"`{code.value}`" not in docs] == []

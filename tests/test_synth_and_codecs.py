"""Synthetic series round trips: tilt, missing slices, compressed transfer syntaxes, Enhanced CT."""

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from appliance.errors import ReasonCode, SeriesRejected
from appliance.series.volume import load_series
from appliance.synth.phantom import LUNG, NOISE_HU
from appliance.synth.writer import GROUND_TRUTH_NAME, SynthOptions, write_series


def _load(folder, settings):
    return load_series(sorted(folder.glob("*.dcm")), settings)


def test_synthetic_series_has_realistic_densities(synthetic_chest, settings):
    volume = _load(synthetic_chest, settings)
    assert volume.hu.shape == (40, 128, 128)
    chest_slice = volume.hu[int(volume.hu.shape[0] * 0.75)]
    lung = (chest_slice > LUNG - 3 * NOISE_HU) & (chest_slice < LUNG + 3 * NOISE_HU)
    assert lung.mean() > 0.1  # a tenth of the field of view is aerated lung
    assert abs(np.median(chest_slice[lung]) - LUNG) < NOISE_HU
    truth = json.loads((synthetic_chest / GROUND_TRUTH_NAME).read_text())
    assert truth["series_instance_uid"] == pydicom.dcmread(next(synthetic_chest.glob("*.dcm"))).SeriesInstanceUID


def test_gantry_tilt_correction_recovers_the_upright_anatomy(tmp_path, settings):
    common = {"slices": 60, "size": 128, "region": "abdomen", "seed": 5}
    write_series(tmp_path / "upright", SynthOptions(**common))
    write_series(tmp_path / "tilted", SynthOptions(**common, tilt_deg=12))
    upright = _load(tmp_path / "upright", settings)
    tilted = _load(tmp_path / "tilted", settings)
    assert tilted.plan.problems[0].reason_code == ReasonCode.GANTRY_TILT
    assert np.allclose(tilted.plan.direction[:, 1], [0, 1, 0], atol=1e-6)
    # sample both at the same patient positions well inside the scanned range
    rng = np.random.default_rng(1)
    zyx = np.column_stack([rng.integers(20, 40, 3000), rng.integers(20, 100, 3000), rng.integers(10, 118, 3000)])
    world = upright.world(zyx)
    inv = np.linalg.inv(tilted.plan.affine())
    xyz = np.rint(np.column_stack([world, np.ones(len(world))]) @ inv.T)[:, :3].astype(int)
    ok = (xyz >= 0).all(axis=1) & (xyz < np.array(tilted.hu.shape[::-1])).all(axis=1)
    a = upright.hu[zyx[ok, 0], zyx[ok, 1], zyx[ok, 2]].astype(float)
    b = tilted.hu[xyz[ok, 2], xyz[ok, 1], xyz[ok, 0]].astype(float)
    assert ok.mean() > 0.9
    # same anatomy: differences are noise plus partial volume at edges, not misplaced organs
    assert np.median(np.abs(a - b)) < 3 * NOISE_HU


def test_missing_slices_are_interpolated_back(tmp_path, settings):
    write_series(tmp_path / "full", SynthOptions(slices=60, size=64, seed=2))
    write_series(tmp_path / "gappy", SynthOptions(slices=60, size=64, seed=2, missing_slices=2))
    full, gappy = _load(tmp_path / "full", settings), _load(tmp_path / "gappy", settings)
    assert gappy.slices == 58 and gappy.hu.shape == full.hu.shape
    assert gappy.plan.problems[0].reason_code == ReasonCode.MISSING_SLICES


@pytest.mark.parametrize("syntax", ["implicit", "rle", "jpeg2000"])
def test_transfer_syntaxes_decode_to_the_same_volume(syntax, tmp_path, settings):
    write_series(tmp_path / "ref", SynthOptions(slices=12, size=64, seed=4))
    write_series(tmp_path / syntax, SynthOptions(slices=12, size=64, seed=4, transfer_syntax=syntax))
    assert np.array_equal(_load(tmp_path / "ref", settings).hu, _load(tmp_path / syntax, settings).hu)


GDCMCONV = shutil.which("gdcmconv")


@pytest.mark.skipif(GDCMCONV is None, reason="gdcmconv is not installed (Debian package libgdcm-tools)")
@pytest.mark.parametrize(("flag", "uid"),
                         [("--jpeg", "1.2.840.10008.1.2.4.70"), ("--jpegls", "1.2.840.10008.1.2.4.80")])
def test_jpeg_lossless_and_jpeg_ls_from_gdcm_decode(flag, uid, tmp_path, settings):
    write_series(tmp_path / "ref", SynthOptions(slices=12, size=64, seed=4))
    (tmp_path / "conv").mkdir()
    for path in sorted((tmp_path / "ref").glob("*.dcm")):
        subprocess.run([GDCMCONV, flag, str(path), str(tmp_path / "conv" / path.name)], check=True)
    assert pydicom.dcmread(next((tmp_path / "conv").glob("*.dcm"))).file_meta.TransferSyntaxUID == uid
    assert np.array_equal(_load(tmp_path / "ref", settings).hu, _load(tmp_path / "conv", settings).hu)


def test_multiframe_enhanced_ct_matches_its_single_frames(tmp_path, settings):
    highdicom = pytest.importorskip("highdicom")
    write_series(tmp_path / "ref", SynthOptions(slices=12, size=64, seed=6))
    frames = [pydicom.dcmread(p) for p in sorted((tmp_path / "ref").glob("*.dcm"))]
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        frames, series_instance_uid=highdicom.UID(), series_number=2, sop_instance_uid=highdicom.UID(),
        instance_number=1)
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced.dcm")
    ref, mf = _load(tmp_path / "ref", settings), _load(tmp_path / "mf", settings)
    assert mf.slices == 12
    assert np.array_equal(ref.hu, mf.hu)
    assert np.allclose(ref.plan.affine(), mf.plan.affine())


def test_damaged_compressed_data_is_corrupt_pixel_data(tmp_path, settings):
    write_series(tmp_path / "j2k", SynthOptions(slices=12, size=64, seed=4, transfer_syntax="jpeg2000"))
    victim = sorted((tmp_path / "j2k").glob("*.dcm"))[5]
    data = bytearray(victim.read_bytes())
    data[-300:-8] = b"\xff" * 292  # keep the sequence delimiter: the header still looks complete
    victim.write_bytes(bytes(data))
    with pytest.raises(SeriesRejected) as info:
        _load(tmp_path / "j2k", settings)
    assert info.value.reason_code == ReasonCode.CORRUPT_PIXEL_DATA


def test_undecodable_transfer_syntax_is_named(tmp_path, settings):
    write_series(tmp_path / "s", SynthOptions(slices=12, size=64, seed=4, transfer_syntax="jpeg2000"))
    for path in (tmp_path / "s").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: video, never CT
        ds.save_as(path)
    with pytest.raises(SeriesRejected) as info:
        _load(tmp_path / "s", settings)
    assert info.value.reason_code == ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX
    assert "MPEG2" in info.value.reason

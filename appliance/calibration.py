"""INT8 calibration sets: representative inputs for each model, by the name its manifest gives.

A model pack ships its calibration inputs (``calibration.npz``, written by
the pack generators in ``training/`` with :func:`write_calibration_file`), so
a box without the developer data calibrates on the same inputs. The functions
here make those inputs: :data:`CALIBRATION_SETS` maps the name a manifest gives
(``[calibration] inputs = "chest-covid19"``) to the plain function that makes
them, prepared exactly as the pipeline prepares them for the model; the
builder calls one only for a pack that ships no file. The inference layer
never imports this module: ``build_engines.py`` and ``appliance build-engines``
hand the mapping to :func:`appliance.inference.build.build_all`.

Synthetic phantoms (:mod:`appliance.synth`) are used here, never in the
pipelines that run on patients.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import Settings
from appliance.inference import build
from appliance.pipelines import chest_covid19
from appliance.pipelines import pancreas_geometry as geo
from appliance.pipelines.chest_preprocess import prepare_gray
from appliance.pipelines.lungs import segment
from appliance.series.volume import CTVolume, load_series
from appliance.synth.phantom import make_phantom
from appliance.synth.writer import SynthOptions, write_series

# real CT and training images (developer data), used when the shared data folder sits next to the repository
# or APPLIANCE_SHARED_DATA names it
SHARED_DATA = Path(os.environ.get("APPLIANCE_SHARED_DATA", "")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")
CHEST_CT = SHARED_DATA / "ct" / "tcia-pancreas-ct-chest-abdomen"
COVID_CT_IMAGES = SHARED_DATA / "covid-ct" / "sars-cov-2-ct-scan"
COVID_CT_IMAGE_STRIDE = 20  # every 20th training image: a spread of both classes, quick to prepare
CALIBRATION_LUNG_SLICES = 32  # per CT series
LOCALIZER_PHANTOMS = 12
LOCALIZER_CRANIOCAUDAL_MM = (0.0, 384.0)
CLASSIFIER_PHANTOMS = 32
CLASSIFIER_CENTRE_JITTER_MM = 5.0  # the localiser's centroid is never exact
CALIBRATION_FILE = "calibration.npz"  # shipped in a pack, listed in its manifest's [files]
CALIBRATION_DTYPE = np.float16


def _chest_series_inputs(volume: CTVolume) -> np.ndarray:
    return chest_covid19.model_inputs(volume, chest_covid19.lung_slices(segment(volume), CALIBRATION_LUNG_SLICES))[0]


def chest_lung_slices(settings: Settings) -> np.ndarray:
    """``chest-covid19`` inputs (N, 1, 128, 128): lung slices of real chest CT (when the shared data
    folder is present), training-set images, and a synthetic phantom's lungs."""
    items: list[np.ndarray] = []
    if CHEST_CT.exists():
        items.append(_chest_series_inputs(load_series(sorted(CHEST_CT.glob("*.dcm")), settings)))
    if COVID_CT_IMAGES.exists():
        from PIL import Image

        files = sorted(COVID_CT_IMAGES.glob("*/*.jpg"))[::COVID_CT_IMAGE_STRIDE]
        items.append(np.stack([prepare_gray(np.asarray(Image.open(f).convert("L")))[None] for f in files]))
    with tempfile.TemporaryDirectory() as tmp:
        write_series(Path(tmp), SynthOptions(slices=40, size=256, region="chest", seed=99))
        volume = load_series(sorted(Path(tmp).glob("*.dcm")), settings.replace(min_slices=1))
        items.append(_chest_series_inputs(volume))
    return np.concatenate(items).astype(np.float32)


def pancreas_localizer_scans(settings: Settings) -> np.ndarray:
    """``pancreas-localizer`` inputs: synthetic phantom scans at 6 mm, with and without lesions
    (one shape, padded)."""
    items = []
    rng = np.random.default_rng(5)
    for k in range(LOCALIZER_PHANTOMS):
        phantom = make_phantom(50_000 + k, ("pancreas-hypo",) if k % 2 else ())
        zs, ys, xs = geo.localizer_axes(*LOCALIZER_CRANIOCAUDAL_MM)
        hu = phantom.sample(xs[None, None, :], ys[None, :, None], zs[:, None, None], rng)
        items.append(geo.pad_to_multiple(geo.localizer_input(hu))[None])
    return np.stack(items).astype(np.float32)


def pancreas_crops(settings: Settings) -> np.ndarray:
    """``abdomen-pancreas`` inputs: 2 mm crops around phantom pancreases, with and without lesions."""
    items = []
    rng = np.random.default_rng(6)
    for k in range(CLASSIFIER_PHANTOMS):
        phantom = make_phantom(60_000 + k, (("pancreas-hypo", "pancreas-iso")[k % 2],) if k % 3 else ())
        pancreas = next(s for s in phantom.structures if s.name == "pancreas")
        zs, ys, xs = geo.crop_axes(np.array(pancreas.center) + rng.normal(0, CLASSIFIER_CENTRE_JITTER_MM, 3))
        crop = phantom.sample(xs[None, None, :], ys[None, :, None], zs[:, None, None], rng)
        items.append(geo.crop_input(crop)[None])
    return np.stack(items).astype(np.float32)


# the names manifests use in ``[calibration] inputs``
CALIBRATION_SETS: Mapping[str, build.CalibrationSet] = {
    "chest-covid19": chest_lung_slices,
    "pancreas-localizer": pancreas_localizer_scans,
    "abdomen-pancreas": pancreas_crops,
}


def write_calibration_file(folder: Path, inputs: np.ndarray) -> Path:
    """Write a pack's ``calibration.npz``: ``inputs`` (N, ...) as float16 (half the size; the
    builder casts them back to float32), compressed. The same inputs give the same bytes."""
    path = folder / CALIBRATION_FILE
    arrays: dict[str, Any] = {build.CALIBRATION_ARRAY: np.asarray(inputs).astype(CALIBRATION_DTYPE)}
    np.savez_compressed(path, **arrays)
    return path


def build_all(settings: Settings, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Build every model pack (INT8 models, TensorRT engines, parity reports), calibrating each on
    the inputs it ships, or on its set from :data:`CALIBRATION_SETS` when it ships none; what
    ``appliance build-engines`` runs."""
    return build.build_all(settings, calibration=CALIBRATION_SETS, say=say)

"""Make the model pack engines/lung-segmentation from the published lung U-Net in the shared data folder.

Rebuilds the network from its state dict (training/lung_unet.py), exports ONNX (opset 17, dynamic batch,
height and width), checks it against the published ONNX export, and writes the parity set
(``evaluation.npz``: real and synthetic slices at the 256x256 input, labelled with the full-resolution FP32
mask), the INT8 calibration inputs (``calibration.npz``), the licence and the manifest with every file's
SHA-256. Deterministic: the same shared folder gives the same pack.

Run:  .venv/bin/python -m training.pack_lung_segmentation      (needs torch==2.13.0, the training extra)
      .venv/bin/python -m training.pack_lung_segmentation --build-only   (INT8 from calibration.npz + parity)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from appliance.inference.packs import write_pack
from appliance.pipelines import lung_segmentation as ls
from training import lung_unet

ENGINES = Path(__file__).resolve().parents[1] / "engines"
PACK_ID = "lung-segmentation"
REAL_SERIES = lung_unet.SHARED / "ct" / "tcia-pancreas-ct-chest-abdomen"
SYNTH_SEED = 21
EVAL_REAL, EVAL_SYNTH = 16, 8
CALIB_REAL, CALIB_SYNTH = 16, 8
INPUT_SIZE = 256
NOTICE = ("Not validated at this site: a published research model (trained on 8 LCTSC 2017 chest CT cases) "
          "checked here only against its own full-resolution output and the classical lung mask on one real "
          "series. Lung volumes are for orientation, not for clinical decisions.")
LICENCE_NOTICE = "MIT, Copyright (c) knottwill (UNet-Small); the notice is in LICENSE"


def manifest(reference_diff: float) -> dict:
    return {
        "id": PACK_ID,
        "version": "1.0.0",
        "task": "segmentation",
        "kind": "measurement",
        "body_region": "chest",
        "validated": False,
        "validation_note": NOTICE,
        "architecture": ("2-D U-Net: 3 down + 3 up blocks of two 3x3 conv + batch norm + ReLU, 16-32-64-128 "
                         "channels, 3x3 transposed-conv upsampling, 1x1 conv + sigmoid; 536,913 parameters"),
        "intended_use": ("Lung mask (right and left lung) of chest CT for lung volumes and as the lung region of "
                         "the chest models; the classical HU-threshold mask is the fallback and the cross-check."),
        "known_limits": ("Trained on 8 adult planning CTs; small false positives in air outside the body (removed "
                         "with the body mask); dense consolidation may be missed. At the 256x256 input the thin "
                         "posterior costophrenic recesses at the lung bases are missed (the lowest 3-4 slices at "
                         "3 mm); Dice 0.975 against the 512x512 input on the real series. Intrapulmonary vessels "
                         "are inside the mask (as in the LCTSC contours), so volumes exceed HU-threshold volumes."),
        "series": {"modality": "CT", "min_slices": 10, "max_slice_thickness_mm": 10.0,
                   "required_coverage": "chest (lungs)"},
        "input": {"name": "x", "shape": [1, INPUT_SIZE, INPUT_SIZE], "min_shape": [1, 64, 64],
                  "max_shape": [1, 512, 512], "layout": "NCHW", "dtype": "float32", "in_plane_stride": 2,
                  "spacing": "none: the 512x512 axial slice mean-pooled 2x2 (about 2 mm pixels)",
                  "normalisation": ("stored pixel value = HU + 1024, no windowing, no scaling; height and width "
                                    "any multiple of 8 (the appliance crops to the body box: zero is air)")},
        "outputs": [{"name": "prob", "shape": ["batch", 1, "height", "width"],
                     "meaning": "lung probability per pixel (both lungs one class)"}],
        "decision": {"output": "prob", "threshold": 0.5,
                     "operating_point": ("probability 0.5 per pixel, as trained; the lung mask is then split "
                                         "into right and left lung and cleaned (appliance/pipelines/"
                                         "lung_segmentation.py)")},
        "training": {"data": "LCTSC 2017 (AAPM Lung CT Segmentation Challenge), 8 of the 12 training cases",
                     "licence": LICENCE_NOTICE,
                     "provenance": ("knottwill/UNet-Small, UNet_wdk24.pt; rebuilt and exported by "
                                    "training/lung_unet.py and training/pack_lung_segmentation.py"),
                     "reference_export_max_abs_diff": reference_diff},
        "evaluation": {"file": "evaluation.npz",
                       "description": (f"{EVAL_REAL} slices of the real TCIA chest-abdomen series and {EVAL_SYNTH} "
                                       f"of a synthetic chest (seed {SYNTH_SEED}) at the 256x256 input, stored "
                                       "values as int16; labels y = the full-resolution (512, FP32) mask "
                                       "sampled every second pixel"),
                       "licence": ("CC BY 4.0 (TCIA Pancreatic-CT-CBCT-SEG, Hong et al. 2021, "
                                   "doi:10.7937/TCIA.ESHQ-4D90) and Apache-2.0 (synthetic phantom slices)")},
        "calibration": {"file": "calibration.npz", "inputs": PACK_ID,
                        "licence": ("CC BY 4.0 (TCIA Pancreatic-CT-CBCT-SEG, Hong et al. 2021, "
                                    "doi:10.7937/TCIA.ESHQ-4D90) and Apache-2.0 (synthetic phantom slices)"),
                        "description": (f"{CALIB_REAL} real chest-abdomen and {CALIB_SYNTH} synthetic chest slices "
                                        "at the 256x256 input, stored values (HU + 1024, int16)")},
        "precisions": {"allowed": ["fp32", "fp16", "int8"],
                       "tolerance": {"max_abs_diff": 0.3, "min_decision_agreement": 0.99,
                                     "max_metric_drop": 0.03}},
    }


def _volumes() -> tuple[np.ndarray, np.ndarray]:
    """HU of the real series and of a synthetic chest (24 slices, 512x512)."""
    from appliance import config
    from appliance.series.volume import load_series
    from appliance.synth.writer import SynthOptions, write_series

    with tempfile.TemporaryDirectory() as tmp:
        settings = config.load(environ={}, home=str(Path(tmp) / "home"))
        real = load_series(sorted(REAL_SERIES.glob("*.dcm")), settings).hu
        write_series(Path(tmp) / "synth", SynthOptions(slices=24, size=512, region="chest", seed=SYNTH_SEED))
        synth = load_series(sorted((Path(tmp) / "synth").glob("*.dcm")), settings).hu
    return real, synth


def _lung_slices(hu: np.ndarray) -> np.ndarray:
    """Slices with at least 20 cm2 of air-density tissue inside the patient (a rough lung range)."""
    air = ((hu > -950) & (hu < -500)).sum(axis=(1, 2))
    return np.flatnonzero(air >= 0.02 * hu.shape[1] * hu.shape[2])


def _pick(indices: np.ndarray, count: int, offset: float) -> np.ndarray:
    positions = (np.arange(count) + offset) / count
    return indices[(positions * (len(indices) - 1)).round().astype(int)]


def _stored(hu: np.ndarray) -> np.ndarray:
    """256x256 network inputs as int16 stored values (the 2x2 mean rounded; it moves no pixel by more
    than 0.5 HU)."""
    return np.rint(ls.pooled(hu)).clip(-32768, 32767).astype(np.int16)[:, None]


def _labels(model: Path, hu: np.ndarray) -> np.ndarray:
    """Full-resolution FP32 lung mask (512 input) on the 256 grid, uint8."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = ls.pooled(hu, 1)[:, None]
    probs = np.concatenate([session.run(None, {"x": x[i:i + 4]})[0] for i in range(0, len(x), 4)])
    return (probs[:, :, ::2, ::2] >= 0.5).astype(np.uint8)


def shipped_calibration(pack) -> dict:
    """The calibration mapping for ``build_pack``: this pack's own ``calibration.npz``."""
    def inputs(settings) -> np.ndarray:
        with np.load(pack.file(pack.manifest["calibration"]["file"])) as data:
            return data["inputs"].astype(np.float32)

    return {PACK_ID: inputs}


def build(folder: Path) -> None:
    """QDQ INT8 models from the shipped calibration inputs and the parity gate, as build_engines.py does."""
    from appliance import config
    from appliance.inference.build import build_pack
    from appliance.inference.packs import load_pack

    pack = load_pack(folder)
    with tempfile.TemporaryDirectory() as home:
        settings = config.load(environ={}, home=home)
        build_pack(pack, settings, calibration=shipped_calibration(pack), say=print)
    print((folder / "parity.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ENGINES / PACK_ID)
    parser.add_argument("--build", action="store_true", help="then build INT8 and check parity")
    parser.add_argument("--build-only", action="store_true", help="only build INT8 and check parity")
    args = parser.parse_args()
    folder = args.out
    if args.build_only:
        build(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model.onnx"
    lung_unet.export(lung_unet.load(), model)
    diff = lung_unet.max_abs_diff(model, lung_unet.SOURCE / lung_unet.REFERENCE_ONNX, lung_unet.reference_slices())
    print(f"model.onnx vs the published ONNX export: max abs diff {diff:.3g}")
    (folder / "LICENSE").unlink(missing_ok=True)
    shutil.copyfile(lung_unet.SOURCE / "LICENSE", folder / "LICENSE")
    real, synth = _volumes()
    real_lung, synth_lung = _lung_slices(real), np.arange(len(synth))
    eval_hu = np.concatenate([real[_pick(real_lung, EVAL_REAL, 0.0)], synth[_pick(synth_lung, EVAL_SYNTH, 0.0)]])
    calib_hu = np.concatenate([real[_pick(real_lung, CALIB_REAL, 0.5)], synth[_pick(synth_lung, CALIB_SYNTH, 0.5)]])
    np.savez_compressed(folder / "evaluation.npz", x=_stored(eval_hu), y=_labels(model, eval_hu))
    np.savez_compressed(folder / "calibration.npz", inputs=_stored(calib_hu))
    pack = write_pack(folder, manifest(round(diff, 9)),
                      ["model.onnx", "evaluation.npz", "calibration.npz", "LICENSE"])
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(folder.iterdir()))
    print(f"wrote {pack.path} ({pack.id} {pack.version}): {sizes}")
    if args.build:
        build(folder)


if __name__ == "__main__":
    main()

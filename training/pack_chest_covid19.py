"""Turn a training run of the chest COVID-19 classifier into the model pack engines/chest-covid19.

Run after training:  python -m training.pack_chest_covid19 --run training/out/chest-covid19
The pack ships its INT8 calibration inputs (calibration.npz), made here from the developer data, so a box
without that data builds the same INT8 model. To remake only those and the manifest of an existing pack
(model and evaluation set untouched):  python -m training.pack_chest_covid19 --calibration-only
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from appliance import config
from appliance.calibration import CALIBRATION_FILE, CALIBRATION_SETS, write_calibration_file
from appliance.inference.packs import write_pack
from appliance.pipelines.chest_preprocess import INPUT_SIZE, LUNG_WINDOW

ENGINES = Path(__file__).resolve().parents[1] / "engines"
NOTICE = ("Research use only, not for clinical decisions: trained on the SARS-CoV-2 CT-scan dataset "
          "(non-commercial licence, cropped slice images from one source); it has not been validated on patients "
          "at this site. Check it on local cases with `appliance evaluate` before relying on it.")
CALIBRATION_LICENCE = ("CC BY-NC-SA 4.0, non-commercial use only: derived from the SARS-CoV-2 CT-scan images "
                       "(Soares et al. 2020, CC BY-NC-SA 4.0) and the TCIA chest CT of Pancreatic-CT-CBCT-SEG "
                       "(Hong et al. 2021, doi:10.7937/TCIA.ESHQ-4D90, CC BY 4.0); phantom slices Apache-2.0")
CALIBRATION_DESCRIPTION = ("prepared model inputs (float16): lung slices of a real chest CT (TCIA), every 20th "
                           "training image, lung slices of a synthetic phantom")
FILES = ["model.onnx", "evaluation.npz", "training-report.json", CALIBRATION_FILE]


def manifest(report: dict) -> dict:
    test = report["test"]
    return {
        "id": "chest-covid19",
        "version": "1.0.0",
        "task": "classification",
        "kind": "classifier",  # its evaluation does not hold across sources: off until a site evaluates it
        "body_region": "chest",
        "validated": False,
        "validation_note": NOTICE,
        "architecture": (f"2-D CNN, 4 double-conv blocks (16-32-64-128 channels), 1x1 score map averaged to the "
                         f"image logit (the map is the class activation map); {report['parameters']} parameters"),
        "intended_use": "Flag chest CT studies whose lungs look like COVID-19 pneumonia, for a radiologist's review.",
        "known_limits": ("Slice-level split without patient IDs makes the in-domain figures optimistic; a similar "
                         "model fell to AUC 0.55 on slices from another source. Other pneumonias, motion and "
                         "contrast may be flagged. Adult chest CT only."),
        "series": {"modality": "CT", "min_slices": 10, "max_slice_thickness_mm": 10.0,
                   "required_coverage": "lungs (at least 3 axial slices with lung)"},
        "input": {"name": "image", "shape": [1, INPUT_SIZE, INPUT_SIZE], "layout": "NCHW", "dtype": "float32",
                  "window": list(LUNG_WINDOW), "spacing": "none: lung-field crop resized to the input size",
                  "normalisation": "per-image zero mean, unit variance"},
        "outputs": [{"name": "probability", "shape": ["batch", 1], "meaning": "slice probability of COVID-19"},
                    {"name": "cam", "shape": ["batch", 1, INPUT_SIZE // 16, INPUT_SIZE // 16],
                     "meaning": "class activation map (logits)"}],
        "decision": {"output": "probability", "threshold": report["threshold"]["value"],
                     "operating_point": report["threshold"]["operating_point"],
                     "aggregation": "study score = mean of the highest quarter of slice probabilities"},
        "training": {"data": report["data"], "licence": "CC BY-NC-SA 4.0 (data); model for research use only",
                     "provenance": "training/chest_covid19.py, seed " + str(report["split"]["seed"]),
                     "split": report["split"]["method"], "epochs": report["epochs"]},
        "metrics": {"test_" + k: v["value"] for k, v in test.items() if k != "n"},
        "evaluation": {"file": "evaluation.npz",
                       "description": "200 held-out test slices of the training source, prepared model inputs"},
        "calibration": {"file": CALIBRATION_FILE, "inputs": "chest-covid19", "licence": CALIBRATION_LICENCE,
                        "description": CALIBRATION_DESCRIPTION},
        "precisions": {"allowed": ["fp32", "fp16", "int8"],
                       "tolerance": {"max_abs_diff": 0.08, "min_decision_agreement": 0.97, "max_metric_drop": 0.01}},
    }


def write_calibration(folder: Path) -> Path:
    """calibration.npz of the pack: the ``chest-covid19`` calibration set, made from the developer data."""
    inputs = CALIBRATION_SETS["chest-covid19"](config.load(environ={}))
    return write_calibration_file(folder, inputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=Path("training/out/chest-covid19"))
    parser.add_argument("--calibration-only", action="store_true",
                        help="remake calibration.npz and the manifest of the existing pack, nothing else")
    args = parser.parse_args()
    folder = ENGINES / "chest-covid19"
    if args.calibration_only:
        report = json.loads((folder / "training-report.json").read_text())
    else:
        report = json.loads((args.run / "report.json").read_text())
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.run / "model.onnx", folder / "model.onnx")
        shutil.copy(args.run / "evaluation_set.npz", folder / "evaluation.npz")
        (folder / "training-report.json").write_text(json.dumps(report, indent=2))
    write_calibration(folder)
    pack = write_pack(folder, manifest(report), FILES)
    print(f"wrote {pack.path} ({pack.id} {pack.version}, threshold {pack.threshold})")


if __name__ == "__main__":
    main()

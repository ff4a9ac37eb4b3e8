"""Turn a training run of the chest COVID-19 classifier into the model pack engines/chest-covid19.

Run after training:  python -m training.pack_chest_covid19 --run training/out/chest-covid19
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from appliance.inference.packs import write_pack
from appliance.pipelines.chest_preprocess import INPUT_SIZE, LUNG_WINDOW

ENGINES = Path(__file__).resolve().parents[1] / "engines"
NOTICE = ("Research use only, not for clinical decisions: trained on the SARS-CoV-2 CT-scan dataset "
          "(non-commercial licence, cropped slice images from one source); it has not been validated on patients "
          "at this site. Check it on local cases with `appliance evaluate` before relying on it.")


def manifest(report: dict) -> dict:
    test = report["test"]
    return {
        "id": "chest-covid19",
        "version": "1.0.0",
        "task": "classification",
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
        "calibration": {"inputs": "chest-covid19",
                        "description": "lung slices of real chest CT, training images, synthetic phantoms"},
        "precisions": {"allowed": ["fp32", "fp16", "int8"],
                       "tolerance": {"max_abs_diff": 0.08, "min_decision_agreement": 0.97, "max_metric_drop": 0.01}},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=Path("training/out/chest-covid19"))
    args = parser.parse_args()
    report = json.loads((args.run / "report.json").read_text())
    folder = ENGINES / "chest-covid19"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.run / "model.onnx", folder / "model.onnx")
    shutil.copy(args.run / "evaluation_set.npz", folder / "evaluation.npz")
    (folder / "training-report.json").write_text(json.dumps(report, indent=2))
    pack = write_pack(folder, manifest(report), ["model.onnx", "evaluation.npz", "training-report.json"])
    print(f"wrote {pack.path} ({pack.id} {pack.version}, threshold {pack.threshold})")


if __name__ == "__main__":
    main()

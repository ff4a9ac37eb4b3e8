"""Train the two-stage pancreas pipeline on synthetic phantoms and export both stages as ONNX.

Stage 1 (``pancreas-localizer``): a small 3-D U-Net on the whole scan resampled to 6 mm voxels
finds the pancreas. Stage 2 (``abdomen-pancreas``): a 3-D fully convolutional network on a
2 mm crop around it outputs a lesion probability map; its maximum is the study score. Shaped like
the published PANDA system, trained only on the project's synthetic phantoms (realistic HU,
noise, anatomical variation, subtle iso- and hypo-attenuating lesions): a synthetic-data
demonstration, not for clinical use.

Run (CPU, ~20 min on 2 cores):  python -m training.abdomen_pancreas --out training/out/pancreas
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from appliance.metrics import binary_metrics, youden_threshold
from appliance.pipelines import pancreas_geometry as geo
from appliance.synth.phantom import make_phantom
from training.common import seed_everything

LESION_KINDS = ("pancreas-hypo", "pancreas-iso")


def conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.InstanceNorm3d(c_out, affine=True),
                         nn.LeakyReLU(0.1, inplace=True))


class UNet3D(nn.Module):
    """Two-level 3-D U-Net; input sizes must be multiples of 4."""

    def __init__(self, width: int = 8):
        super().__init__()
        w = width
        self.enc1, self.enc2, self.mid = conv(1, w), conv(w, 2 * w), conv(2 * w, 4 * w)
        self.dec2, self.dec1 = conv(6 * w, 2 * w), conv(3 * w, w)
        self.out = nn.Conv3d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        m = self.mid(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return torch.sigmoid(self.out(d1))


def phantom_case(seed: int, lesion: str | None, rng: np.random.Generator):
    """(stage-1 input, pancreas mask, stage-2 input, lesion mask) sampled straight from a phantom."""
    phantom = make_phantom(seed, (lesion,) if lesion else ())
    pancreas = next(s for s in phantom.structures if s.name == "pancreas")
    noise_rng = np.random.default_rng(seed + 7)
    z0 = float(rng.uniform(-20, 60))  # scans start at different levels
    z1 = float(rng.uniform(260, 560))
    zs, ys, xs = geo.localizer_axes(z0, z1)
    z, y, x = zs[:, None, None], ys[None, :, None], xs[None, None, :]
    hu = phantom.sample(x, y, z, noise_rng) + rng.normal(0, 6)
    hu = hu + noise_rng.standard_normal(hu.shape, dtype=np.float32) * float(rng.uniform(0, 10))
    mask = pancreas.inside(x, y, z)
    # stage 2: crop around the true centre plus the localiser's typical error
    centre = np.array(pancreas.center) + rng.normal(0, 6, 3)
    cz, cy, cx = geo.crop_axes(centre)
    z2, y2, x2 = cz[:, None, None], cy[None, :, None], cx[None, None, :]
    crop = phantom.sample(x2, y2, z2, noise_rng)
    extra = float(rng.uniform(0, 8))
    crop = crop + noise_rng.standard_normal(crop.shape, dtype=np.float32) * extra
    lesion_mask = np.zeros(crop.shape, dtype=bool)
    for e in phantom.lesions:
        lesion_mask |= np.broadcast_to(e.inside(x2, y2, z2), crop.shape)
    return geo.localizer_input(hu), mask, geo.crop_input(crop), lesion_mask


def make_cases(count: int, seed0: int, rng: np.random.Generator) -> list:
    cases = []
    for k in range(count):
        lesion = LESION_KINDS[k % 4 // 2] if k % 4 in (1, 3) else None  # half of the phantoms carry a lesion
        cases.append(phantom_case(seed0 + k, lesion, rng) + (int(lesion is not None),))
    return cases


def dice_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def pad4(a: np.ndarray) -> np.ndarray:
    return geo.pad_to_multiple(a, 4, value=-1.0 if a.dtype != bool else 0)


def pad_to(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)], constant_values=-1.0)


def fit(name: str, pairs, epochs: int, loss_fn) -> UNet3D:
    """Train a fresh UNet3D on (input, target) array pairs, one phantom per step."""
    model = UNet3D(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        total = 0.0
        for x, y in pairs:
            xt = torch.from_numpy(x)[None, None]
            yt = torch.from_numpy(y.astype(np.float32))[None, None]
            loss = loss_fn(model(xt), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        print(f"{name} epoch {epoch + 1}: loss {total / len(pairs):.4f}", flush=True)
    return model


def localizer_loss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p, y) + dice_loss(p, y)


def lesion_loss(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    weight = 1 + 20 * y  # lesions are small: weigh their voxels up
    return F.binary_cross_entropy(p, y, weight=weight) + (dice_loss(p, y) if y.sum() > 0 else 0)


def train_localizer(cases, epochs: int) -> UNet3D:
    return fit("localizer", [(pad4(x), pad4(mask)) for x, mask, *_ in cases], epochs, localizer_loss)


def train_classifier(cases, epochs: int) -> UNet3D:
    return fit("classifier", [(crop, lesion) for _, _, crop, lesion, _ in cases], epochs, lesion_loss)


def evaluate(localizer, classifier, cases) -> dict:
    localizer.eval()
    classifier.eval()
    dices, scores, labels, errors = [], [], [], []
    with torch.no_grad():
        for x, mask, crop, _, label in cases:
            p = localizer(torch.from_numpy(pad4(x))[None, None])[0, 0].numpy()[: x.shape[0], : x.shape[1], : x.shape[2]]
            pred = p >= 0.5
            dices.append(2 * (pred & mask).sum() / max(pred.sum() + mask.sum(), 1))
            if pred.any() and mask.any():
                errors.append(float(np.linalg.norm((np.argwhere(pred).mean(0) - np.argwhere(mask).mean(0))
                                                   * geo.LOCALIZER_SPACING_MM)))
            lesion_map = classifier(torch.from_numpy(crop)[None, None])[0, 0].numpy()
            scores.append(geo.lesion_score(lesion_map))
            labels.append(label)
    return {"dice": float(np.mean(dices)), "centroid_error_mm": float(np.median(errors)) if errors else None,
            "scores": np.array(scores), "labels": np.array(labels)}


def export(model: nn.Module, shape: tuple[int, ...], path: Path, output: str, dynamic_spatial: bool) -> None:
    model.eval()
    axes = {0: "batch"}
    if dynamic_spatial:
        axes.update({2: "z", 3: "y", 4: "x"})
    torch.onnx.export(model, (torch.zeros(1, 1, *shape),), str(path), input_names=["volume"],
                      output_names=[output], dynamic_axes={"volume": axes, output: axes}, opset_version=17,
                      dynamo=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("training/out/pancreas"))
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--validation", type=int, default=40)
    parser.add_argument("--test", type=int, default=80)
    parser.add_argument("--epochs", type=int, default=8, help="localiser epochs")
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--localizer-cases", type=int, default=60, help="training phantoms the localiser sees")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261123)
    args = parser.parse_args()
    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    train = make_cases(args.train, 100_000, rng)
    val = make_cases(args.validation, 200_000, rng)
    test = make_cases(args.test, 300_000, rng)
    print(f"phantoms made [{time.time() - t0:.0f} s]", flush=True)
    localizer = train_localizer(train[: args.localizer_cases], args.epochs)
    classifier = train_classifier(train, args.classifier_epochs)
    v = evaluate(localizer, classifier, val)
    threshold = youden_threshold(v["labels"], v["scores"])
    t = evaluate(localizer, classifier, test)
    report = {
        "data": "synthetic phantoms from appliance.synth (no patient data)",
        "phantoms": {"train": args.train, "validation": args.validation, "test": args.test,
                     "lesions": "half of each part: pancreas-hypo (-35 HU) and pancreas-iso (-12 HU), radius 6-12 mm"},
        "threshold": {"value": round(threshold, 4), "operating_point": "Youden J on the validation phantoms"},
        "localizer": {"test_dice": round(t["dice"], 4), "test_centroid_error_mm": t["centroid_error_mm"]},
        "test": binary_metrics(t["labels"], t["scores"], threshold, seed=args.seed),
        "test_by_kind": {},
        "epochs": {"localizer": args.epochs, "classifier": args.classifier_epochs},
        "localizer_cases": args.localizer_cases, "seconds": round(time.time() - t0, 1),
    }
    for name, pick in (("hypo", 1), ("iso", 3)):
        idx = [i for i in range(len(test)) if i % 4 in (0, 2, pick)]
        report["test_by_kind"][name] = binary_metrics(t["labels"][idx], t["scores"][idx], threshold, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    export(localizer, tuple(pad4(train[0][0]).shape), args.out / "localizer.onnx", "pancreas", True)
    export(classifier, geo.CROP_SHAPE, args.out / "classifier.onnx", "lesion", False)
    shapes = [pad4(c[0]).shape for c in test[:8]]
    common = tuple(max(s[i] for s in shapes) for i in range(3))
    x1 = np.stack([pad_to(pad4(c[0]), common)[None] for c in test[:8]])
    np.savez_compressed(args.out / "localizer_eval.npz", x=x1.astype(np.float16))
    x2 = np.stack([c[2][None] for c in test])
    np.savez_compressed(args.out / "classifier_eval.npz", x=x2.astype(np.float16), y=t["labels"])
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("localizer", "threshold")}, indent=1))
    print(json.dumps({k: v["value"] for k, v in report["test"].items()}, indent=1))


if __name__ == "__main__":
    main()

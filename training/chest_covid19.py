"""Train the chest COVID-19 slice classifier and export it as ONNX.

Data: ``../shared/data/covid-ct/sars-cov-2-ct-scan/{covid,non-covid}`` (SARS-CoV-2 CT-scan
dataset, Soares et al. 2020, CC BY-NC-SA 4.0: research use only). Fixed-seed stratified split
70/15/15; the threshold is chosen on the validation part; the test part is used once, at the end.
The split is by slice: the set has no patient IDs, so one patient's slices can fall on both sides
and the test figures are optimistic.

Run (CPU, ~10 min on 2 cores):  python -m training.chest_covid19 --out training/out/chest-covid19
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from appliance.metrics import auc, binary_metrics, youden_threshold
from appliance.pipelines.chest_preprocess import INPUT_SIZE, prepare_gray
from training.common import seed_everything, stratified_split

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid-ct" / "sars-cov-2-ct-scan"
CLASSES = ("non-covid", "covid")


class ChestNet(nn.Module):
    """Small CNN; the class activation map is the score map before global average pooling."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout2d(0.2)
        self.score = nn.Conv2d(c_in, 1, 1)  # per-location logit: averaging it gives the image logit

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.score(self.dropout(self.features(x)))
        logit = cam.mean(dim=(2, 3))
        return torch.sigmoid(logit), cam


def load_images() -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels, names = [], [], []
    for label, cls in enumerate(CLASSES):
        for path in sorted((DATA / cls).glob("*.jpg")):
            gray = np.asarray(Image.open(path).convert("L"))
            images.append(prepare_gray(gray))
            labels.append(label)
            names.append(f"{cls}/{path.name}")
    return np.stack(images)[:, None], np.array(labels), names


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Geometry (rotation, scale, shift, flip) and intensity (gamma, contrast, blur, noise) randomisation."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) - 0.5) * math.radians(20)
    scale = 0.85 + 0.3 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    unit = (x - lo) / (hi - lo + 1e-6)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.8)
    x = unit ** gamma
    if torch.rand(1, generator=gen) < 0.5:
        x = F.avg_pool2d(x, 3, stride=1, padding=1)
    x = x + torch.randn(x.shape, generator=gen) * 0.03 * torch.rand(n, 1, 1, 1, generator=gen)
    return (x - x.mean(dim=(1, 2, 3), keepdim=True)) / (x.std(dim=(1, 2, 3), keepdim=True) + 1e-3)


def predict(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch]))[0][:, 0].numpy())
    return np.concatenate(out)


def train(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    x, y, names = load_images()
    train_idx, val_idx, test_idx = stratified_split(y, seed=args.seed)
    print(f"{len(x)} images ({y.sum()} covid) -> train {len(train_idx)}, val {len(val_idx)}, test {len(test_idx)}"
          f" [{time.time() - t0:.0f} s]")
    model = ChestNet()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * math.ceil(len(train_idx) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    xt, yt = torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx]).float()
    best_auc, best_state, history = -1.0, None, []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch):
            b = order[i:i + args.batch]
            prob, _ = model(augment(xt[b], gen))
            loss = F.binary_cross_entropy(prob[:, 0].clamp(1e-6, 1 - 1e-6), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(b)
        val_auc = auc(y[val_idx], predict(model, x[val_idx]))
        history.append({"epoch": epoch + 1, "loss": round(total / len(order), 4), "val_auc": round(val_auc, 4)})
        print(f"epoch {epoch + 1}: loss {total / len(order):.4f} val AUC {val_auc:.4f} [{time.time() - t0:.0f} s]")
        if val_auc > best_auc:
            best_auc, best_state = val_auc, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    val_scores = predict(model, x[val_idx])
    threshold = youden_threshold(y[val_idx], val_scores)
    test_scores = predict(model, x[test_idx])
    report = {
        "data": "SARS-CoV-2 CT-scan dataset (Soares et al. 2020), CC BY-NC-SA 4.0",
        "split": {"method": "stratified by class, by slice (no patient IDs)", "seed": args.seed,
                  "train": len(train_idx), "validation": len(val_idx), "test": len(test_idx)},
        "threshold": {"value": round(threshold, 4), "operating_point": "Youden J on the validation part"},
        "validation": binary_metrics(y[val_idx], val_scores, threshold, seed=args.seed),
        "test": binary_metrics(y[test_idx], test_scores, threshold, seed=args.seed),
        "published_baseline": {"model": "xDNN", "f1": 0.973, "split": "random"},
        "history": history, "epochs": args.epochs, "seconds": round(time.time() - t0, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    export(model, args.out / "model.onnx")
    np.savez_compressed(args.out / "evaluation_set.npz", x=x[test_idx][:200].astype(np.float16),
                        y=y[test_idx][:200], names=np.array(names)[test_idx][:200])
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["test"], indent=1))
    return report


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(2, 1, INPUT_SIZE, INPUT_SIZE)
    torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["probability", "cam"],
                      dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}, "cam": {0: "batch"}},
                      opset_version=17, dynamo=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("training/out/chest-covid19"))
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=20261123)
    train(parser.parse_args())


if __name__ == "__main__":
    main()

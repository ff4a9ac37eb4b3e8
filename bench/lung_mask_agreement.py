"""Agreement of the learned lung mask with the classical one on the real series in the shared data folder.

Per lung: volumes and Dice on the half-resolution grid; where they disagree: Dice and areas by part of the
lung (apical fifth, middle, basal fifth of the lung's slices), the slices of largest disagreement with what
lies there (mean HU of the pixels only one mask has), and the cost of the classical cross-check at stride 2
and stride 4. Writes side-by-side PNGs of the worst slices to bench/out/lung-agreement/.

Run: .venv/bin/python bench/lung_mask_agreement.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
OUT = HERE / "out" / "lung-agreement"
SHARED = Path(os.environ.get("APPLIANCE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SERIES = ("tcia-pancreas-ct-chest-abdomen", "totalseg-example-j2k", "dcmqi-ct-3slice", "dcm-qa-ct-ge")

from appliance import config  # noqa: E402
from appliance.inference.backends.onnxruntime import OnnxRuntimeSession  # noqa: E402
from appliance.inference.packs import load_pack  # noqa: E402
from appliance.pipelines import lung_segmentation as ls  # noqa: E402
from appliance.pipelines import lungs  # noqa: E402
from appliance.series.volume import load_series  # noqa: E402


def parts(seg: lungs.Segmentation, volume) -> dict[str, np.ndarray]:
    """Slice indices of the apical fifth, the middle and the basal fifth of the lung range."""
    found = np.flatnonzero(seg.lungs.any(axis=(1, 2)))
    if len(found) == 0:
        return {}
    fifth = max(1, len(found) // 5)
    cranial_first = ls._cranial_first(volume)
    apical, basal = (found[:fifth], found[-fifth:]) if cranial_first else (found[-fifth:], found[:fifth])
    return {"apical fifth": apical, "middle": found[fifth:-fifth], "basal fifth": basal}


def save_png(volume, learned, classical, k: int, path: Path) -> None:
    """Lung-window slice k with the learned mask in red and the classical in green (yellow where both)."""
    from PIL import Image

    hu = volume.hu[k, ::2, ::2].astype(np.float32)
    grey = np.clip((hu + 1350) / 1500 * 255, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    a, b = learned.lungs[k] > 0, classical.lungs[k] > 0
    rgb[a & ~b] = [255, 40, 40]
    rgb[b & ~a] = [40, 255, 40]
    rgb[a & b] = rgb[a & b] * 0.6 + np.array([255, 255, 0]) * 0.4
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def compare(name: str, volume, session, pack) -> None:
    t0 = time.perf_counter()
    learned = ls.segment(volume, session, pack)
    learned_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    classical = lungs.segment(volume)
    classical_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    coarse = lungs.segment(volume, stride=4)
    coarse_s = time.perf_counter() - t0
    print(f"\n## {name}: {volume.hu.shape[0]} slices, {volume.spacing_mm_zyx[0]:.2f} mm")
    print(f"learned {learned_s:.2f} s; classical stride 2 {classical_s:.2f} s, stride 4 {coarse_s:.2f} s")
    for label, side in ((1, "right"), (2, "left")):
        a, b = learned.lungs == label, classical.lungs == label
        ml = volume.voxel_volume_ml * 4
        coarse_dice = ls.cross_check_findings(learned, coarse)[0]["dice"][f"{side} lung"]
        print(f"{side} lung: learned {a.sum() * ml:.0f} mL, classical {b.sum() * ml:.0f} mL, Dice {ls.dice(a, b):.3f}"
              f" (vs classical at stride 4: {coarse_dice:.3f}); slices learned "
              f"{_range(a)} classical {_range(b)}")
    print(f"coverage (learned): {ls.coverage(learned, volume)['note']}  classical: "
          f"{lungs.coverage(classical, volume)['note']}")
    if not learned.lungs.any() and not classical.lungs.any():
        return
    hu = volume.hu[:, ::2, ::2]
    for part, slices in parts(learned if learned.lungs.any() else classical, volume).items():
        a, b = learned.lungs[slices] > 0, classical.lungs[slices] > 0
        only_a, only_b = a & ~b, b & ~a
        print(f"  {part:13} slices {slices.min()}-{slices.max()}: Dice {ls.dice(a, b):.3f}; learned only "
              f"{only_a.sum()} px (mean {_mean(hu[slices], only_a)} HU), classical only {only_b.sum()} px "
              f"(mean {_mean(hu[slices], only_b)} HU)")
    union = (learned.lungs > 0) | (classical.lungs > 0)
    per_slice = np.array([ls.dice(learned.lungs[k] > 0, classical.lungs[k] > 0) if union[k].any() else 1.0
                          for k in range(len(union))])
    worst = np.argsort(per_slice)[:4]
    OUT.mkdir(parents=True, exist_ok=True)
    for k in sorted(worst):
        a, b = learned.lungs[k] > 0, classical.lungs[k] > 0
        path = OUT / f"{name}-slice{k:03d}.png"
        save_png(volume, learned, classical, int(k), path)
        print(f"  slice {k}: Dice {per_slice[k]:.3f}, learned only {(a & ~b).sum()} px (mean "
              f"{_mean(hu[k], a & ~b)} HU), classical only {(b & ~a).sum()} px (mean {_mean(hu[k], b & ~a)} HU) "
              f"-> {path.relative_to(REPO)}")


def _range(mask: np.ndarray) -> str:
    found = np.flatnonzero(mask.any(axis=(1, 2)))
    return f"{found.min()}-{found.max()}" if len(found) else "none"


def _mean(hu: np.ndarray, mask: np.ndarray) -> str:
    return f"{hu[mask].mean():.0f}" if mask.any() else "-"


def main() -> int:
    pack = load_pack(REPO / "engines" / "lung-segmentation")
    session = OnnxRuntimeSession(pack.file("model.onnx"), "fp32", 2)
    settings = config.load(environ={}, home=tempfile.mkdtemp())
    for name in SERIES:
        folder = SHARED / "ct" / name
        if not folder.exists():
            print(f"{name}: not found at {folder}")
            continue
        try:
            volume = load_series(sorted(p for p in folder.rglob("*") if p.is_file() and "LICENSE" not in p.name
                                        and p.suffix.lower() not in (".txt", ".md", ".json")), settings)
        except Exception as exc:  # a series the loader refuses says why and the others still run
            print(f"\n## {name}: not loaded ({exc})")
            continue
        compare(name, volume, session, pack)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lung opacity and emphysema measurements against known truth: synthetic lesions in a real CT, and 2-D masks.

1. Synthetic opacities (ground glass with the scan's noise, texture and the vessels kept; consolidation) of known
   volume, central and subpleural, inserted into the lungs of the real chest-abdomen CT: measured vs inserted mL,
   per-slice ranking AUC of opacity_fraction (slices with an insert vs clean slices), false-positive percent on
   the clean series, for the naive band (-700..-100 HU in an eroded mask), the full method and each suppression
   switched off.
2. The COVID-SemiSeg 2-D slices with infection masks (8-bit JPEG, window estimated per image from the lung's air
   and the soft tissue): pixel Dice and slice-level correlation of the opacity map with the masks.
3. Low-attenuation (-980 HU) regions of known volume: %LAA measured vs inserted.
4. Time of both measurements on a 300-slice chest.

The lung segmentation is a parameter (``--segment module:function``, default the classical one), so the figures
can be measured again with another lung mask producing the same Segmentation.

Run: .venv/bin/python bench/opacity_checks.py [--segment appliance.pipelines.lungs:segment] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from appliance import config
from appliance.metrics import auc
from appliance.pipelines import chest_opacity, lung_emphysema, lungs
from appliance.pipelines.lung_regions import crop_lungs
from appliance.series.geometry import VolumePlan
from appliance.series.volume import CTVolume, load_series

DATA = Path(os.environ.get("APPLIANCE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CT_SERIES = DATA / "ct" / "tcia-pancreas-ct-chest-abdomen"
SEMISEG = DATA / "covid-ct" / "infnet-covid-semiseg" / "Dataset"
NAIVE_BAND_HU = (-700.0, -100.0)
VESSEL_ABOVE_PARENCHYMA_HU = 200.0  # what a lesion insert keeps of the original as vessel
EDGE_MM = 2.0  # soft edge of an inserted lesion (partial volume)
POSITIVE_SLICE_CM2 = 0.5  # a slice counts as holding the insert from this cross-section on
Segmenter = Callable[[CTVolume], lungs.Segmentation]
ABLATIONS = {
    "full method": chest_opacity.Suppression(),
    "no vessel suppression": chest_opacity.Suppression(vessels=False),
    "no airway walls": chest_opacity.Suppression(airway_walls=False),
    "no rim handling": chest_opacity.Suppression(rim=False),
    "no dependent correction": chest_opacity.Suppression(dependent=False),
}


def load_ct(folder: Path = CT_SERIES) -> CTVolume:
    settings = config.load(environ={}, home=str(Path("/tmp") / "opacity-checks-home"))
    return load_series(sorted(folder.glob("*.dcm")), settings)


def learned(volume: CTVolume) -> lungs.Segmentation:
    """The appliance's lung mask: the lung-segmentation pack, else the classical one."""
    from appliance.inference.registry import shared_registry
    from appliance.pipelines.lung_segmentation import segment_or_fallback

    return segment_or_fallback(volume, shared_registry(config.load(environ={})))[0]


def segmenter(spec: str) -> Segmenter:
    if spec == "learned":
        return learned
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "segment")


def with_hu(volume: CTVolume, hu: np.ndarray) -> CTVolume:
    return dataclasses.replace(volume, hu=hu)


# --- lesion insertion -------------------------------------------------------------------------------------------

def full_res_lung(volume: CTVolume, seg: lungs.Segmentation) -> np.ndarray:
    """The lung mask (enclosed holes filled) on the full-resolution grid, bool (z, y, x)."""
    crop = crop_lungs(volume, seg)
    grid = np.zeros(seg.lungs.shape, dtype=bool)
    rows, cols = crop.sides.shape[1:]
    grid[crop.z0:crop.z0 + crop.sides.shape[0], crop.y0:crop.y0 + rows, crop.x0:crop.x0 + cols] = crop.sides > 0
    s = seg.stride
    full = np.repeat(np.repeat(grid, s, axis=1), s, axis=2)
    return full[:, : volume.hu.shape[1], : volume.hu.shape[2]]


def pick_centre(volume: CTVolume, lung: np.ndarray, radius_mm: float, where: str,
                rng: np.random.Generator) -> np.ndarray:
    """A voxel (z, y, x) deep in the lung ("central") or at ~radius/2 from its surface ("subpleural")."""
    step = 4
    small = lung[:, ::step, ::step]
    dz, dy, dx = volume.spacing_mm_zyx
    # the volume's first and last slices bound the lung too (a lung cut by the scan range is not deep there)
    depth = ndimage.distance_transform_edt(np.pad(small, 1), sampling=(dz, dy * step, dx * step))[1:-1, 1:-1, 1:-1]
    if where == "central":
        ok = depth >= min(radius_mm + 5.0, 0.8 * depth.max())
    else:
        ok = small & (depth <= max(3.0, 0.4 * radius_mm)) & (depth >= 1.0)
        ok[:, : small.shape[1] // 3] = False  # lateral or posterior pleura, away from the anterior junction
    candidates = np.argwhere(ok)
    z, y, x = candidates[rng.integers(len(candidates))]
    return np.array([z, y * step, x * step])


def lesion_weight(volume: CTVolume, centre: np.ndarray, volume_ml: float, rng: np.random.Generator,
                  lung: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Soft (partial-volume) irregular lesion weight 0..1 in a box around ``centre``, within the lung."""
    radius = (3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    spacing = np.array(volume.spacing_mm_zyx)
    half = np.ceil((radius * 1.5 + 2 * EDGE_MM) / spacing).astype(int)
    box = tuple(slice(max(0, c - h), min(n, c + h + 1)) for c, h, n in zip(centre, half, volume.hu.shape))
    grids = np.meshgrid(*[(np.arange(b.start, b.stop) - c) * sp for b, c, sp in zip(box, centre, spacing)],
                        indexing="ij")
    axes = rng.uniform(0.8, 1.25, 3)
    distance = np.sqrt(sum((g / a) ** 2 for g, a in zip(grids, axes)))
    wobble = ndimage.gaussian_filter(rng.standard_normal(distance.shape), sigma=4.0 / spacing)
    wobble *= 0.15 * radius / max(float(wobble.std()), 1e-6)
    weight = np.clip((radius + wobble - distance) / EDGE_MM + 0.5, 0.0, 1.0) * lung[box]
    return weight.astype(np.float32), box


def insert_lesion(volume: CTVolume, lung: np.ndarray, centre: np.ndarray, volume_ml: float, target_hu: float,
                  rng: np.random.Generator, keep_vessels: bool) -> tuple[CTVolume, np.ndarray, float]:
    """The volume with a lesion blended in, its voxel mask (weight >= 0.5) and its volume (mL).

    Parenchyma is replaced by the smoothed target density plus the scan's own noise (the original minus its
    local mean) and a low-frequency texture; ground glass keeps the vessels that run through it.
    """
    weight, box = lesion_weight(volume, centre, volume_ml, rng, lung)
    original = volume.hu[box].astype(np.float32)
    local = ndimage.uniform_filter(original, size=(1, 5, 5))
    noise = np.clip(original - local, -120, 120)
    texture = ndimage.gaussian_filter(rng.standard_normal(original.shape), sigma=(1, 3, 3)).astype(np.float32)
    texture *= (40.0 if keep_vessels else 20.0) / max(float(texture.std()), 1e-6)
    lesion = target_hu + texture + noise
    blended = original * (1 - weight) + lesion * weight
    if keep_vessels:  # vessels: clearly brighter than the parenchyma around them and than the lesion
        parenchyma = float(np.median(original[weight > 0])) if (weight > 0).any() else -850.0
        vessel = (original > parenchyma + VESSEL_ABOVE_PARENCHYMA_HU) & (original > blended)
        blended = np.where(vessel, original, blended)
    hu = volume.hu.copy()
    hu[box] = np.clip(np.round(blended), -1024, 3071).astype(np.int16)
    mask = np.zeros(volume.hu.shape, dtype=bool)
    mask[box] = weight >= 0.5
    return with_hu(volume, hu), mask, float(mask.sum() * volume.voxel_volume_ml)


# --- the measurements compared ----------------------------------------------------------------------------------

def naive_map(volume: CTVolume, seg: lungs.Segmentation) -> tuple[np.ndarray, np.ndarray]:
    """(opacity voxels, lung voxels) of the naive band in a once-eroded lung mask, on the stride grid."""
    lung = ndimage.binary_erosion(seg.lungs > 0, structure=np.ones((1, 3, 3), bool))
    hu = volume.hu[:, ::seg.stride, ::seg.stride]
    return lung & (hu >= NAIVE_BAND_HU[0]) & (hu <= NAIVE_BAND_HU[1]), lung


def method_map(volume: CTVolume, seg: lungs.Segmentation,
               suppression: chest_opacity.Suppression) -> tuple[np.ndarray, np.ndarray]:
    """(opacity voxels, lung voxels) of the measurement on the whole stride grid."""
    maps = chest_opacity.opacity_maps(volume, seg, suppression)
    c = maps.crop
    opacity = np.zeros(seg.lungs.shape, dtype=bool)
    lung = np.zeros(seg.lungs.shape, dtype=bool)
    where = (slice(c.z0, c.z0 + c.sides.shape[0]), slice(c.y0, c.y0 + c.sides.shape[1]),
             slice(c.x0, c.x0 + c.sides.shape[2]))
    opacity[where] = maps.opacity()
    lung[where] = c.lung()
    return opacity, lung


def all_maps(volume: CTVolume, seg: lungs.Segmentation) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {"naive band": naive_map(volume, seg)}
    out.update({name: method_map(volume, seg, s) for name, s in ABLATIONS.items()})
    return out


def fractions(opacity: np.ndarray, lung: np.ndarray) -> np.ndarray:
    area = lung.sum(axis=(1, 2))
    return np.where(area > 0, opacity.sum(axis=(1, 2)) / np.maximum(area, 1), 0.0)


# --- checks -----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    kind: str  # ground glass / consolidation
    where: str  # central / subpleural
    ml: float
    target_hu: float


CASES = [Case(kind, where, ml, hu) for kind, hu in (("ground glass", -500.0), ("consolidation", -30.0))
         for where in ("central", "subpleural") for ml in (1.0, 5.0, 20.0, 50.0)]


def opacity_inserts(volume: CTVolume, segment: Segmenter, cases: list[Case], resegment: bool = True,
                    seed: int = 7) -> None:
    """Inserted lesions measured back; ``resegment`` False keeps the clean scan's lung mask (one that includes
    every lesion, as a mask following the lung's outline rather than its air would)."""
    print(f"\n=== lung mask: {'segmented again after the insert' if resegment else 'the clean scan mask'} ===")
    seg = segment(volume)
    lung = full_res_lung(volume, seg)
    clean = all_maps(volume, seg)
    voxel_ml = volume.voxel_volume_ml * seg.stride ** 2
    print("\nfalse-positive opacity on the clean series (percent of lung):")
    for name, (op, lu) in clean.items():
        print(f"  {name:26s} {100 * op.sum() / max(lu.sum(), 1):6.2f} %")
    labels: list[np.ndarray] = []
    scores: dict[str, list[np.ndarray]] = {name: [] for name in clean}
    print("\ninserted vs measured opacity (mL; measured = opacity within 5 mm of the insert; extra = change elsewhere)")
    header = f"  {'kind':14s} {'where':10s} {'target':>6s} {'ins mL':>7s} " + " ".join(f"{n[:14]:>14s}"
                                                                                       for n in clean)
    print(header)
    rng = np.random.default_rng(seed)
    for case in cases:
        centre = pick_centre(volume, lung, (3 * case.ml * 1000 / (4 * np.pi)) ** (1 / 3), case.where, rng)
        moved, mask, inserted_ml = insert_lesion(volume, lung, centre, case.ml, case.target_hu, rng,
                                                 keep_vessels=case.kind == "ground glass")
        seg2 = segment(moved) if resegment else seg
        maps = all_maps(moved, seg2)
        small = mask[:, ::seg.stride, ::seg.stride]
        near = ndimage.binary_dilation(small, iterations=max(1, int(round(5.0 / (volume.spacing_mm_zyx[1] * 2)))))
        cells = []
        for name, (op, _) in maps.items():
            extra = ((op & ~near).sum() - (clean[name][0] & ~near).sum()) * voxel_ml
            cells.append(f"{(op & near).sum() * voxel_ml:6.1f}/{extra:+6.1f}")
        print(f"  {case.kind:14s} {case.where:10s} {case.target_hu:6.0f} {inserted_ml:7.1f} " + " ".join(
            f"{c:>14s}" for c in cells))
        area_cm2 = mask.sum(axis=(1, 2)) * volume.spacing_mm_zyx[1] * volume.spacing_mm_zyx[2] / 100.0
        has_lung = maps["naive band"][1].any(axis=(1, 2)) | maps["full method"][1].any(axis=(1, 2))
        keep = has_lung & ((area_cm2 >= POSITIVE_SLICE_CM2) | (area_cm2 == 0))
        labels.append((area_cm2 >= POSITIVE_SLICE_CM2)[keep])
        for name, (op, lu) in maps.items():
            scores[name].append(fractions(op, lu)[keep])
    y = np.concatenate(labels)
    print(f"\nper-slice ranking AUC of opacity_fraction, slices with an insert ({int(y.sum())}) vs clean "
          f"({int((~y).sum())}):")
    for name, s in scores.items():
        print(f"  {name:26s} {auc(y, np.concatenate(s)):.3f}")


def emphysema_inserts(volume: CTVolume, segment: Segmenter, sizes_ml: tuple[float, ...] = (10.0, 50.0, 150.0),
                      seed: int = 11) -> None:
    seg = segment(volume)
    lung = full_res_lung(volume, seg)
    crop = crop_lungs(volume, seg)
    measured, below = lung_emphysema.laa_masks(crop, float(volume.spacing_mm_zyx[0]))
    base = {t: int(m.sum()) for t, m in below.items()}
    print("\nlow-attenuation inserts (-980 HU, scan noise kept): inserted mL vs measured change in LAA mL")
    print(f"  {'inserted mL':>11s} {'LAA-950 mL':>11s} {'LAA-910 mL':>11s} {'%LAA-950':>9s} {'%LAA-910':>9s}")
    rng = np.random.default_rng(seed)
    for ml in sizes_ml:
        moved, union = volume, np.zeros(volume.hu.shape, dtype=bool)
        for _part in range(max(1, int(ml // 25))):  # several regions, as emphysema is
            centre = pick_centre(moved, lung, (3 * min(ml, 25) * 1000 / (4 * np.pi)) ** (1 / 3), "central", rng)
            moved, mask, _ = insert_lesion(moved, lung, centre, min(ml, 25.0), -980.0, rng, keep_vessels=True)
            union |= mask
        total = float(union.sum() * volume.voxel_volume_ml)
        crop2 = crop_lungs(moved, segment(moved))
        measured2, below2 = lung_emphysema.laa_masks(crop2, float(volume.spacing_mm_zyx[0]))
        n = max(int(measured2.sum()), 1)
        d = {t: (int(m.sum()) - base[t]) * crop.voxel_ml for t, m in below2.items()}
        print(f"  {total:11.1f} {d[-950]:11.1f} {d[-910]:11.1f} {100 * below2[-950].sum() / n:9.2f} "
              f"{100 * below2[-910].sum() / n:9.2f}")
    n0 = max(int(measured.sum()), 1)
    print(f"  (clean series: %LAA-950 {100 * base[-950] / n0:.2f}, %LAA-910 {100 * base[-910] / n0:.2f})")


def timing(volume: CTVolume, segment: Segmenter, slices: int = 300, zoom: float = 1.0) -> None:
    """Both measurements on a 300-slice chest made by repeating the lung slices (all 300 with lung), its
    in-plane content enlarged ``zoom`` times about the centre (a larger chest: a larger lung box)."""
    seg = segment(volume)
    lung_slices = np.flatnonzero(seg.lungs.any(axis=(1, 2)))
    order = np.resize(np.concatenate([lung_slices, lung_slices[::-1]]), slices)
    rows, cols = volume.hu.shape[1:]
    r = np.clip(((np.arange(rows) - rows / 2) / zoom + rows / 2).astype(int), 0, rows - 1)
    c = np.clip(((np.arange(cols) - cols / 2) / zoom + cols / 2).astype(int), 0, cols - 1)
    big = with_hu(volume, volume.hu[order][:, r][:, :, c])
    big.plan = dataclasses.replace(volume.plan, target_z_mm=np.arange(slices) * volume.spacing_mm_zyx[0])
    s = seg.stride
    big_lungs = seg.lungs[order][:, r[::s] // s][:, :, c[::s] // s]
    big_seg = lungs.Segmentation(np.ones(big_lungs.shape, bool), big_lungs, s)
    seconds = []
    for module in (chest_opacity, lung_emphysema):  # in this order the second reuses the first's lung crop
        t0 = time.perf_counter()
        module.run(big, big_seg, None)
        seconds.append(time.perf_counter() - t0)
    box = crop_lungs(big, big_seg).hu.shape
    print(f"  {slices} slices, lung box {box[1]}x{box[2]} at stride {s}: chest-opacity {seconds[0]:.2f} s, "
          f"lung-emphysema {seconds[1]:.2f} s, together {sum(seconds):.2f} s")


# --- COVID-SemiSeg 2-D slices -----------------------------------------------------------------------------------

def grey_to_hu(grey: np.ndarray) -> tuple[np.ndarray, str] | tuple[None, str]:
    """HU from an 8-bit lung-window slice: darkest lung air -> -1000 HU, soft-tissue mode -> +40 HU."""
    if (grey >= 250).mean() > 0.08:
        return None, "soft tissue saturated (narrow window)"
    hist = np.bincount(grey.ravel(), minlength=256)
    tissue = 100 + int(np.argmax(hist[100:250]))
    air = float(np.percentile(grey, 0.5))
    if tissue - air < 80:
        return None, "no separate air and soft-tissue levels"
    return -1000.0 + (grey.astype(np.float32) - air) * 1040.0 / (tissue - air), "ok"


MID = 5  # the measured slice of the stack made from one 2-D slice


def slice_volume(hu2d: np.ndarray, pixel_mm: float = 0.7) -> CTVolume:
    """A five-slice axial volume repeating one 2-D slice (the middle one is then a mid-lung slice, off the
    lung's top and base)."""
    n = 2 * MID + 1
    hu = np.repeat(np.clip(hu2d, -1024, 3071).astype(np.int16)[None], n, axis=0)
    plan = VolumePlan(order=np.arange(n), source_z_mm=np.arange(n) * 1.0, target_z_mm=np.arange(n) * 1.0,
                      shear_mm_per_row=0.0, shear_mm_per_column=0.0, shape_zyx=hu.shape,
                      spacing_mm_zyx=(1.0, pixel_mm, pixel_mm), origin=np.zeros(3), direction=np.eye(3),
                      tilt_deg=0.0, problems=())
    return CTVolume(hu=hu, plan=plan, slices=n, excluded=[], seconds={})


def lung_mask_2d(volume: CTVolume, lesion: np.ndarray | None = None) -> lungs.Segmentation:
    """Lungs of a cropped 2-D slice: dark regions not touching the image border, holes filled, split at mid-width;
    with ``lesion`` (full-resolution bool), the lesion is added to the lungs (a mask that includes the disease)."""
    s = 2
    hu = volume.hu[MID, ::s, ::s]
    dark = ndimage.binary_opening(hu < -400, iterations=1)
    labels, count = ndimage.label(dark)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sums = np.bincount(labels.ravel(), weights=hu.ravel().astype(np.float64), minlength=count + 1)
    means = sums / np.maximum(sizes, 1)
    low, high = lungs.LUNG_MEAN_HU  # aerated lung, not the air around the body (as lungs.py decides)
    area_mm2 = sizes * (volume.spacing_mm_zyx[1] * s) ** 2
    keep = [i for i in range(1, count + 1) if area_mm2[i] > 300 and low < means[i] < high]
    lung = np.isin(labels, keep)
    if lesion is not None:
        lung |= lesion[::s, ::s][: lung.shape[0], : lung.shape[1]]
    lung = ndimage.binary_fill_holes(lung)
    sides = np.zeros(lung.shape, dtype=np.uint8)
    sides[:, : lung.shape[1] // 2][lung[:, : lung.shape[1] // 2]] = 1
    sides[:, lung.shape[1] // 2:][lung[:, lung.shape[1] // 2:]] = 2
    stack = np.repeat(sides[None], volume.hu.shape[0], axis=0)
    return lungs.Segmentation(body=np.ones(stack.shape, bool), lungs=stack, stride=s)


def semiseg_check(lesion_in_mask: bool) -> None:
    from PIL import Image

    pairs = []
    for images, masks in (("TestingSet/MultiClassInfection-Test/Imgs", "TestingSet/MultiClassInfection-Test/GT"),
                          ("TrainingSet/MultiClassInfection-Train/Imgs", "TrainingSet/MultiClassInfection-Train/GT")):
        for image in sorted((SEMISEG / images).glob("*.jpg")):
            mask = SEMISEG / masks / (image.stem + ".png")
            if mask.is_file():
                pairs.append((image, mask))
    methods = ["naive band", "full method", "no dependent correction", "no rim handling", "no vessel suppression"]
    dice: dict[str, list[float]] = {m: [] for m in methods}
    frac: dict[str, list[float]] = {m: [] for m in methods}
    truth_frac, skipped = [], {}
    for image, mask_path in pairs:
        grey = np.asarray(Image.open(image).convert("L"))
        truth = np.asarray(Image.open(mask_path))
        hu, why = grey_to_hu(grey)
        if hu is None:
            skipped[image.name] = why
            continue
        volume = slice_volume(hu)
        seg = lung_mask_2d(volume, truth > 0 if lesion_in_mask else None)
        if not seg.lungs.any():
            skipped[image.name] = "no lung found"
            continue
        t = (truth[::2, ::2] > 0)[: seg.lungs.shape[1], : seg.lungs.shape[2]]
        lung = seg.lungs[MID] > 0
        truth_frac.append(float((t & lung).sum() / max(lung.sum(), 1)))
        for m in methods:
            op, lu = naive_map(volume, seg) if m == "naive band" else method_map(volume, seg, ABLATIONS[m])
            o = op[MID]
            dice[m].append(2 * float((o & t & lung).sum()) / max(float(o.sum() + (t & lung).sum()), 1.0))
            frac[m].append(float(o.sum() / max(lu[MID].sum(), 1)))
    from scipy.stats import spearmanr

    print(f"\nCOVID-SemiSeg 2-D slices, lung mask {'with' if lesion_in_mask else 'without'} the masked lesions "
          f"added: {len(truth_frac)} used, {len(skipped)} skipped "
          f"({', '.join(sorted(set(skipped.values())))})")
    print(f"  {'method':26s} {'mean Dice':>9s} {'Spearman(frac)':>15s} {'mean frac':>9s}  (truth mean frac "
          f"{np.mean(truth_frac):.3f})")
    for m in methods:
        rho = spearmanr(frac[m], truth_frac).statistic
        print(f"  {m:26s} {np.mean(dice[m]):9.3f} {rho:15.3f} {np.mean(frac[m]):9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment", default="learned",
                        help="lung segmentation: 'learned' (the appliance's: lung-segmentation pack, else "
                             "classical) or module:function taking a CTVolume, returning a Segmentation")
    parser.add_argument("--quick", action="store_true", help="two insert sizes instead of four")
    parser.add_argument("--only", choices=["opacity", "semiseg", "emphysema", "timing"], default=None)
    args = parser.parse_args()
    segment = segmenter(args.segment)
    if not CT_SERIES.is_dir():
        raise SystemExit(f"real CT not found at {CT_SERIES} (set APPLIANCE_SHARED_DATA)")
    volume = load_ct()
    cases = [c for c in CASES if not args.quick or c.ml in (5.0, 20.0)]
    if args.only in (None, "timing"):
        print("time of both measurements:")
        timing(volume, segment)
        timing(volume, segment, zoom=1.4)
    if args.only in (None, "opacity"):
        opacity_inserts(volume, segment, cases)
        opacity_inserts(volume, segment, cases, resegment=False)
    if args.only in (None, "emphysema"):
        emphysema_inserts(volume, segment)
    if args.only in (None, "semiseg") and SEMISEG.is_dir():
        semiseg_check(lesion_in_mask=False)
        semiseg_check(lesion_in_mask=True)


if __name__ == "__main__":
    main()

"""What the synthetic-data pancreas pipeline outputs on real CT, and how well its localiser finds a real pancreas.

Two real anatomies have TotalSegmentator label maps (a model output, not manual ground truth; label 7 =
pancreas): the 20-slice JPEG 2000 upper-abdomen series (DICOM) and the 3 mm abdominal CT of TotalSegmentator's
tests (NIfTI, HU). On each, the localiser's pancreas mask (its probability map at 0.5 on the 6 mm grid, taken
back to the scan's own voxel grid) is compared with the label: Dice, and the distance between the two centroids
in mm. Whether the pipeline accepts the mask (largest component of at least 5 mL) is reported apart. On the TCIA
pancreatic-cancer planning CT the pipeline's outputs are reported as they are. Nothing here is a clinical
validation.

Run:  python -m training.pancreas_real_check
(the data folder is ../shared/data beside the repository, or the one APPLIANCE_SHARED_DATA names)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from appliance import config
from appliance.inference.registry import Registry
from appliance.pipelines import abdomen_pancreas
from appliance.pipelines import pancreas_geometry as geo
from appliance.series.geometry import VolumePlan
from appliance.series.volume import CTVolume, load_series

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("APPLIANCE_SHARED_DATA", "") or REPO.parent / "shared" / "data")
CT = DATA / "ct"
TCIA_SERIES = CT / "tcia-pancreas-ct-chest-abdomen"
J2K_SERIES = CT / "totalseg-example-j2k"
J2K_LABELS = CT / "totalseg-example-j2k.labels-totalsegmentator.nii.gz"
NIFTI_CT = CT / "totalseg-example-3mm" / "example_ct_sm.nii.gz"
NIFTI_LABELS = CT / "totalseg-example-3mm" / "example_seg.nii.gz"
PANCREAS_LABEL = 7  # TotalSegmentator v2 class order
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def load_dicom_series(folder: Path, settings: config.Settings) -> CTVolume:
    return load_series(sorted(p for p in folder.iterdir() if p.is_file() and p.name not in ("LICENSE", "Citations")),
                       settings)


def volume_from_nifti(path: Path) -> CTVolume:
    """A NIfTI HU volume as the series loader would give it: ``hu[z, y, x]`` with x towards the patient's
    left, y towards posterior, z towards head (LPS), i.e. the voxel order of an axial DICOM series."""
    import nibabel

    img = nibabel.as_closest_canonical(nibabel.load(path))  # voxel axes towards R, A, S
    data = np.asanyarray(img.dataobj)
    ni, nj, nk = data.shape
    flip = np.array([[-1.0, 0, 0, ni - 1], [0, -1.0, 0, nj - 1], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    affine = RAS_TO_LPS @ img.affine @ flip  # voxel axes towards L, P, S
    spacing_xyz = np.linalg.norm(affine[:3, :3], axis=0)
    hu = np.rint(data[::-1, ::-1, :]).astype(np.int16).transpose(2, 1, 0)
    positions = np.arange(nk) * spacing_xyz[2]
    plan = VolumePlan(order=np.arange(nk), source_z_mm=positions, target_z_mm=positions, shear_mm_per_row=0.0,
                      shear_mm_per_column=0.0, shape_zyx=hu.shape, spacing_mm_zyx=tuple(spacing_xyz[::-1]),
                      origin=affine[:3, 3], direction=affine[:3, :3] / spacing_xyz, tilt_deg=0.0, problems=())
    return CTVolume(hu=np.ascontiguousarray(hu), plan=plan, slices=nk, excluded=[], seconds={})


def label_on_volume(volume: CTVolume, labels: Path, label: int = PANCREAS_LABEL) -> np.ndarray:
    """The label map's ``label`` voxels on the volume's voxel grid (nearest label voxel by patient position)."""
    import nibabel

    img = nibabel.load(labels)
    data = np.asanyarray(img.dataobj)
    to_voxel = np.linalg.inv(RAS_TO_LPS @ img.affine)
    rows, cols = np.indices(volume.hu.shape[1:])
    out = np.zeros(volume.hu.shape, dtype=bool)
    for k in range(volume.hu.shape[0]):
        lps = volume.world(np.stack([np.full(rows.shape, k), rows, cols], axis=-1)).reshape(-1, 3)
        ijk = np.rint(lps @ to_voxel[:3, :3].T + to_voxel[:3, 3]).astype(int)
        inside = np.all((ijk >= 0) & (ijk < data.shape), axis=1)
        hit = np.zeros(len(ijk), dtype=bool)
        hit[inside] = data[ijk[inside, 0], ijk[inside, 1], ijk[inside, 2]] == label
        out[k] = hit.reshape(rows.shape)
    return out


def localiser_probability(volume: CTVolume, session) -> tuple[np.ndarray, np.ndarray]:
    """(pancreas probability on the 6 mm grid, zoom factors), run exactly as the pipeline runs it."""
    small, factors = abdomen_pancreas._to_localizer_grid(volume)
    x = geo.pad_to_multiple(geo.localizer_input(small))[None, None]
    prob = session.run({"volume": x})["pancreas"][0, 0][: small.shape[0], : small.shape[1], : small.shape[2]]
    return prob, factors


def on_volume_grid(volume: CTVolume, small: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """A 6 mm grid mask on the volume's voxel grid (the pipeline's index mapping: small = voxel * factor)."""
    axes = [np.clip(np.rint(np.arange(n) * f), 0, m - 1).astype(int)
            for n, f, m in zip(volume.hu.shape, factors, small.shape, strict=True)]
    return small[np.ix_(*axes)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def centroid_mm(volume: CTVolume, mask: np.ndarray) -> np.ndarray:
    """Centroid (LPS, mm) of a mask on the volume's voxel grid."""
    return volume.world(np.argwhere(mask).mean(axis=0))


def localiser_guess(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the localiser's pancreas mask: its map at 0.5, where it places the pancreas: that mask, or the most
    probable voxel when the mask is empty), both on the 6 mm grid."""
    mask = prob >= abdomen_pancreas.PANCREAS_THRESHOLD
    if mask.any():
        return mask, mask
    guess = np.zeros_like(mask)
    guess[np.unravel_index(int(np.argmax(prob)), prob.shape)] = True
    return mask, guess


def pipeline_verdict(volume: CTVolume, session) -> str:
    """What the pipeline makes of the localiser's map (largest component of at least 5 mL)."""
    try:
        abdomen_pancreas.localize(volume, session)
    except abdomen_pancreas.NotApplicable as exc:
        return f"not applicable: {exc}"
    return "pancreas found"


def _mm(point: np.ndarray) -> list[float]:
    return [round(float(v), 1) for v in point]


def localisation(volume: CTVolume, session, reference: np.ndarray) -> dict[str, Any]:
    """Dice and centroid distance (mm) of the localiser's pancreas mask against ``reference`` (a mask on the
    volume's grid), and the pipeline's verdict. With no voxel at 0.5 the Dice is 0 and the most probable voxel
    stands for the localiser's position."""
    prob, factors = localiser_probability(volume, session)
    small_mask, small_guess = localiser_guess(prob)
    mask = on_volume_grid(volume, small_mask, factors)
    centre = centroid_mm(volume, on_volume_grid(volume, small_guess, factors))
    truth = centroid_mm(volume, reference)
    ml = volume.voxel_volume_ml
    return {"dice": round(dice(mask, reference), 4),
            "centroid_error_mm": round(float(np.linalg.norm(centre - truth)), 1),
            "centroid_mm": _mm(centre), "reference_centroid_mm": _mm(truth),
            "localised_ml": round(float(mask.sum() * ml), 1), "reference_ml": round(float(reference.sum() * ml), 1),
            "max_probability": round(float(prob.max()), 3), "pipeline": pipeline_verdict(volume, session)}


def real_anatomies(registry: Registry, settings: config.Settings) -> dict[str, dict[str, Any]]:
    """The localiser against TotalSegmentator's pancreas on the JPEG 2000 series and the 3 mm NIfTI scan."""
    session = registry.session(registry.pack("pancreas-localizer"))[0]
    j2k = load_dicom_series(J2K_SERIES, settings)
    nifti = volume_from_nifti(NIFTI_CT)
    return {"j2k": localisation(j2k, session, label_on_volume(j2k, J2K_LABELS)),
            "3mm": localisation(nifti, session, label_on_volume(nifti, NIFTI_LABELS))}


def run(folder: Path, registry: Registry, settings) -> dict:
    volume = load_dicom_series(folder, settings)
    loc, pack = registry.pack("pancreas-localizer"), registry.pack("abdomen-pancreas")
    try:
        result = abdomen_pancreas.run(volume, registry.session(loc)[0], loc, registry.session(pack)[0], pack, None)
    except abdomen_pancreas.NotApplicable as exc:
        return {"not_applicable": str(exc)}
    return {"score": result.score, "threshold": result.threshold, "flagged": result.flagged,
            "findings": result.findings}


def describe(d: dict) -> str:
    if "not_applicable" in d:
        return f"not applicable: {d['not_applicable']}"
    loc = next(f for f in d["findings"] if f["name"] == "pancreas (localised)")
    flag = "FLAGGED" if d["flagged"] else "not flagged"
    return (f"pancreas localised at {loc['centroid_mm']} mm (LPS), {loc['volume_ml']} mL at 6 mm; lesion score "
            f"{d['score']:.3f} against threshold {d['threshold']} -> {flag}")


def describe_localisation(d: dict) -> str:
    return (f"localiser mask Dice {d['dice']:.2f} against TotalSegmentator's pancreas ({d['localised_ml']} mL "
            f"against {d['reference_ml']} mL), centroid {d['centroid_error_mm']} mm away "
            f"(largest probability {d['max_probability']}; pipeline: {d['pipeline']})")


def doc_text(doc: dict) -> list[str]:
    return ["### On real CT (not a validation)", "",
            f"- TCIA pancreatic-cancer planning CT (134 slices): {describe(doc['tcia'])}.",
            f"- JPEG 2000 upper-abdomen example (20 slices at 2 mm, DICOM): {describe_localisation(doc['j2k'])}.",
            f"- TotalSegmentator's 3 mm abdominal CT (NIfTI): {describe_localisation(doc['3mm'])}.",
            "",
            ("TotalSegmentator's label maps are a model's output, not manual ground truth; Dice is measured on each "
             "scan's own voxel grid with the localiser's 6 mm mask taken back to it. Perfect separation of held-out "
             "phantoms says the phantom task is easy, not that the model works: a localiser trained only on "
             "phantoms does not find a real pancreas reliably (see the figures above), and a flag on the real "
             "pancreatic-cancer scan is not evidence of detection. These lines say what it does, reproducibly "
             "(`python -m training.pancreas_real_check`).")]


def main() -> None:
    settings = config.load(environ={}, min_slices=1)
    registry = Registry(settings)
    doc = {"tcia": run(TCIA_SERIES, registry, settings), **real_anatomies(registry, settings)}
    print(json.dumps(doc, indent=2))
    text = doc_text(doc)
    print("\n".join(text))
    for name in ("abdomen-pancreas", "pancreas-localizer"):
        out = REPO / "docs" / "models" / f"{name}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()

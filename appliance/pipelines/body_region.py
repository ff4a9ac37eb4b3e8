"""What part of the body an axial CT series covers (head, neck, chest, abdomen, pelvis), with the evidence.

Up to :data:`SAMPLED_SLICES` slices are read at about :data:`SAMPLE_PIXEL_MM` pixels. On each, the body is
the largest connected part above :data:`BODY_HU` with its holes filled; its cross-section, the aerated lung
and the gas inside it and its bone are measured (:class:`SliceSigns`). Each sampled slice gets one label,
by these rules in this order:

``head``     a ring of bone (> :data:`SKULL_HU`) around most directions of the outline, within
             :data:`RIM_MM` of it, enclosing brain-density tissue (:data:`BRAIN_HU`) over most of the inside,
             a small cross-section and no lung; or a small cross-section that is largely bone (skull base, face)
``chest``    aerated lung (:data:`LUNG_HU`) over at least :data:`LUNG_FRACTION` of the cross-section
``pelvis``   a large bone part on each side of the midline (iliac wings, femoral heads), no lung
``neck``     a small cross-section with an airway (gas below :data:`GAS_HU` near the midline) inside, no lung
``abdomen``  a large cross-section with little or no lung

A slice whose label differs from its two equal neighbours takes theirs; abdomen or pelvis above the lungs
is the thoracic inlet and shoulders (neck), head or neck below them abdomen (as is a neck below abdomen).
Runs of one label become :class:`RegionExtent` s with their slice range and patient z range (LPS, +z is
cranial). Pure numpy and scipy on sampled slices: a few hundred ms for a 300-slice 512 x 512 volume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage

from appliance.inference.packs import BODY_REGIONS
from appliance.series.volume import CTVolume

BODY_HU = -500
LUNG_HU = (-980, -400)  # aerated lung parenchyma; airway and bowel gas read lower
GAS_HU = -980
SKULL_HU = 700
BRAIN_HU = (15, 65)
PELVIC_BONE_HU = 250
RIM_MM = 20.0  # scalp and skull lie within this distance of the outline
SAMPLED_SLICES = 48
SAMPLE_PIXEL_MM = 4.0
MIN_BODY_CM2 = 25.0  # less than this is no body (above the vertex, below the feet, a phantom's end)
SMALL_CROSS_SECTION_CM2 = 350.0  # an adult head or neck is smaller; a trunk larger
ABDOMEN_MIN_CM2 = 200.0
LUNG_FRACTION = 0.10
NO_LUNG_FRACTION = 0.05
SKULL_RING_COVERAGE = 0.6  # share of 10-degree directions from the centre crossing the bone ring
BRAIN_FRACTION = 0.5
HEAD_BONE_FRACTION = 0.12  # skull base and face: a small cross-section largely bone
PELVIC_WING_CM2 = 6.0  # the largest bone part on each side of the midline
AIRWAY_MIN_CM2 = 0.5
MIDLINE_FRACTION = 0.25  # an airway lies within this share of the half-width from the midline; bowel gas anywhere
MIN_EXTENT_MM = 20.0  # a region shorter than this along the body is not said to be covered
ANGLE_BINS = 36


@dataclasses.dataclass(frozen=True)
class SliceSigns:
    """What one sampled slice shows: areas in cm², fractions of the cross-section or of the inside."""

    area_cm2: float
    lung_fraction: float
    gas_cm2: float  # gas (< GAS_HU) inside the body near its midline, as an airway lies
    skull_ring: float  # share of directions from the centre whose rim holds bone > SKULL_HU
    brain_fraction: float  # share of the inside (deeper than RIM_MM) at brain density
    bone_fraction: float  # share of the cross-section above SKULL_HU
    wings_cm2: tuple[float, float]  # largest bone part (> PELVIC_BONE_HU) right and left of the midline


@dataclasses.dataclass(frozen=True)
class RegionExtent:
    """One run of slices showing one region: ``slices`` first and last volume slice, z in mm (patient)."""

    region: str
    first_slice: int
    last_slice: int
    from_mm: float  # the lower (caudal) end
    to_mm: float  # the upper (cranial) end
    evidence: str

    @property
    def length_mm(self) -> float:
        return self.to_mm - self.from_mm

    def as_dict(self) -> dict[str, Any]:
        return {"region": self.region, "from_mm": self.from_mm, "to_mm": self.to_mm,
                "slices": [self.first_slice, self.last_slice], "evidence": self.evidence}

    def describe(self) -> str:
        return (f"the {self.region} (z {self.from_mm:g} to {self.to_mm:g} mm, slices {self.first_slice}-"
                f"{self.last_slice}: {self.evidence})")


@dataclasses.dataclass(frozen=True)
class BodyRegions:
    """The regions a series covers, head first; ``determined`` is False when it could not be told (not axial)."""

    extents: tuple[RegionExtent, ...]
    determined: bool = True
    note: str = ""

    def covers(self, region: str) -> bool:
        """Whether at least :data:`MIN_EXTENT_MM` of ``region`` is in the series."""
        return sum(e.length_mm for e in self.extents if e.region == region) >= MIN_EXTENT_MM

    @property
    def covered(self) -> list[str]:
        return [r for r in BODY_REGIONS if self.covers(r)]

    def describe(self) -> str:
        """In words, e.g. ``the head (z -60 to 180 mm, slices 0-95: a bone ring ...)``."""
        if not self.determined:
            return f"an undetermined body region ({self.note})"
        kept = [e for e in self.extents if self.covers(e.region)]
        return " and ".join(e.describe() for e in kept) if kept else "no body region that could be recognised"

    def as_finding(self) -> dict[str, Any]:
        """The series QA finding: ``regions`` (region, from_mm, to_mm, slices [first, last], evidence) and
        ``covers``, the regions at least :data:`MIN_EXTENT_MM` long."""
        finding: dict[str, Any] = {"name": "body region", "covers": self.covered,
                                   "regions": [e.as_dict() for e in self.extents]}
        if not self.determined:
            finding["result"] = f"not determined: {self.note}"
        return finding


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _skull_ring(rim_bone: np.ndarray, centre: tuple[float, float]) -> float:
    rows, cols = np.nonzero(rim_bone)
    if rows.size == 0:
        return 0.0
    angles = np.arctan2(rows - centre[0], cols - centre[1])
    bins = np.unique(((angles + np.pi) / (2 * np.pi) * ANGLE_BINS).astype(int) % ANGLE_BINS)
    return bins.size / ANGLE_BINS


def _wings(hu: np.ndarray, body: np.ndarray, centre_col: float, pixel_cm2: float) -> tuple[float, float]:
    labels, count = ndimage.label(body & (hu > PELVIC_BONE_HU))
    if count == 0:
        return 0.0, 0.0
    flat = labels.ravel()
    pixels = np.bincount(flat, minlength=count + 1)[1:]
    column_sums = np.bincount(flat, weights=np.tile(np.arange(labels.shape[1]), labels.shape[0]),
                              minlength=count + 1)[1:]
    cols, sizes = column_sums / pixels, pixels * pixel_cm2
    half_width = max(1.0, float(np.ptp(np.nonzero(body.any(axis=0))[0])) / 2)
    right = sizes[cols < centre_col - 0.3 * half_width]  # the patient's right is the image's left (LPS)
    left = sizes[cols > centre_col + 0.3 * half_width]
    return float(right.max(initial=0.0)), float(left.max(initial=0.0))


def slice_signs(hu: np.ndarray, pixel_mm: tuple[float, float]) -> SliceSigns | None:
    """Measure one axial slice (HU, pixel size in mm, rows and columns); None when it shows no body."""
    pixel_cm2 = pixel_mm[0] * pixel_mm[1] / 100.0
    body = ndimage.binary_fill_holes(_largest(hu > BODY_HU))
    area = float(body.sum()) * pixel_cm2
    if area < MIN_BODY_CM2:
        return None
    inside = hu[body]
    depth = ndimage.distance_transform_cdt(body, metric="chessboard") * min(pixel_mm)  # mm, a lower bound
    rim, core = body & (depth <= RIM_MM), depth > RIM_MM
    centre = ndimage.center_of_mass(body)
    cols = np.nonzero(body.any(axis=0))[0]
    midline = np.abs(np.arange(hu.shape[1]) - centre[1]) <= MIDLINE_FRACTION * (cols[-1] - cols[0]) / 2
    core_hu = hu[core]
    brain = float(np.mean((core_hu >= BRAIN_HU[0]) & (core_hu <= BRAIN_HU[1]))) if core_hu.size else 0.0
    return SliceSigns(
        area_cm2=area,
        lung_fraction=float(np.mean((inside > LUNG_HU[0]) & (inside < LUNG_HU[1]))),
        gas_cm2=float(np.sum(body[:, midline] & (hu[:, midline] <= GAS_HU))) * pixel_cm2,
        skull_ring=_skull_ring(rim & (hu > SKULL_HU), (float(centre[0]), float(centre[1]))),
        brain_fraction=brain,
        bone_fraction=float(np.mean(inside > SKULL_HU)),
        wings_cm2=_wings(hu, body, float(centre[1]), pixel_cm2))


def label(signs: SliceSigns | None) -> str | None:
    """The region one slice shows by the rules of this module, or None."""
    if signs is None:
        return None
    small, no_lung = signs.area_cm2 < SMALL_CROSS_SECTION_CM2, signs.lung_fraction < NO_LUNG_FRACTION
    skull = signs.skull_ring >= SKULL_RING_COVERAGE and signs.brain_fraction >= BRAIN_FRACTION
    if small and no_lung and (skull or signs.bone_fraction >= HEAD_BONE_FRACTION):
        return "head"
    if signs.lung_fraction >= LUNG_FRACTION:
        return "chest"
    if no_lung and min(signs.wings_cm2) >= PELVIC_WING_CM2:
        return "pelvis"
    if small and signs.gas_cm2 >= AIRWAY_MIN_CM2:
        return "neck"
    if signs.area_cm2 >= ABDOMEN_MIN_CM2:
        return "abdomen"
    return None


def evidence(region: str, signs: list[SliceSigns]) -> str:
    """The measurements behind a run of ``region`` slices, in words (medians over its sampled slices)."""
    def median(values: list[float]) -> float:
        return float(np.median(values))

    area = median([s.area_cm2 for s in signs])
    lung = median([s.lung_fraction for s in signs])
    if region == "head":
        return (f"a bone ring (> {SKULL_HU} HU) in {median([s.skull_ring for s in signs]):.0%} of directions "
                f"around brain-density tissue ({BRAIN_HU[0]} to {BRAIN_HU[1]} HU, "
                f"{median([s.brain_fraction for s in signs]):.0%} of the inside), bone "
                f"{median([s.bone_fraction for s in signs]):.0%} of a {area:.0f} cm² cross-section, no lung")
    if region == "chest":
        return f"aerated lung ({LUNG_HU[0]} to {LUNG_HU[1]} HU) over {lung:.0%} of a {area:.0f} cm² cross-section"
    if region == "pelvis":
        right, left = median([s.wings_cm2[0] for s in signs]), median([s.wings_cm2[1] for s in signs])
        return f"bone wings on both sides ({right:.0f} and {left:.0f} cm²) in a {area:.0f} cm² cross-section, no lung"
    if region == "neck":
        return (f"a small cross-section ({area:.0f} cm²) with an airway "
                f"({median([s.gas_cm2 for s in signs]):.1f} cm² of gas), no lung")
    return f"a {area:.0f} cm² soft-tissue cross-section with aerated lung over {lung:.0%} of it"


def _smooth(labels: list[str | None]) -> list[str | None]:
    """A lone label between two equal neighbours takes theirs."""
    out = list(labels)
    for k in range(1, len(labels) - 1):
        if labels[k - 1] == labels[k + 1] != labels[k]:
            out[k] = labels[k - 1]
    return out


def _in_order(labels: list[str | None], z_mm: np.ndarray) -> list[str | None]:
    """Anatomy in its order along the body, taking the lungs as the landmark: abdomen or pelvis cranial to every
    lung slice is the thoracic inlet and shoulders (neck); head or neck caudal to them is abdomen. Without lungs,
    a neck caudal to abdomen slices is bowel gas in a small abdomen."""
    chest = [z for z, r in zip(z_mm, labels) if r == "chest"]
    if chest:
        top, bottom = max(chest), min(chest)
        labels = ["neck" if r in ("abdomen", "pelvis") and z > top else r for z, r in zip(z_mm, labels)]
        return ["abdomen" if r in ("head", "neck") and z < bottom else r for z, r in zip(z_mm, labels)]
    abdomen = [z for z, r in zip(z_mm, labels) if r == "abdomen"]
    if abdomen:
        labels = ["abdomen" if r == "neck" and z < max(abdomen) else r for z, r in zip(z_mm, labels)]
    return labels


def _sampled(count: int) -> np.ndarray:
    return np.unique(np.linspace(0, count - 1, min(count, SAMPLED_SLICES)).round().astype(int))


def _extents(labels: list[str | None], signs: list[SliceSigns | None], index: np.ndarray,
             z_of_slice: np.ndarray) -> tuple[RegionExtent, ...]:
    """Runs of one label -> extents, each reaching half-way to the next sampled slice."""
    out, start, last = [], 0, len(labels) - 1
    for k in range(1, len(labels) + 1):
        if k <= last and labels[k] == labels[start]:
            continue
        region = labels[start]
        if region is not None:
            first = 0 if start == 0 else int(index[start - 1] + index[start]) // 2 + 1
            end = len(z_of_slice) - 1 if k - 1 == last else int(index[k - 1] + index[k]) // 2
            z = z_of_slice[[first, end]]
            run = [s for s in signs[start:k] if s is not None]
            out.append(RegionExtent(region, first, end, round(float(z.min()), 1), round(float(z.max()), 1),
                                    evidence(region, run)))
        start = k
    return tuple(sorted(out, key=lambda e: -e.to_mm))


def slice_z_mm(volume: CTVolume) -> np.ndarray:
    """Patient z (mm) of the centre of every slice of the volume."""
    z, rows, cols = volume.hu.shape
    centre = np.column_stack([np.arange(z), np.full(z, (rows - 1) / 2), np.full(z, (cols - 1) / 2)])
    return volume.world(centre)[:, 2]


def determine(volume: CTVolume) -> BodyRegions:
    """The regions ``volume`` covers, with their slice and z ranges and the evidence."""
    if not volume.plan.is_axial:
        return BodyRegions((), determined=False, note="the series is not axial; regions are read on axial slices")
    _, dy, dx = volume.spacing_mm_zyx
    stride = max(1, round(SAMPLE_PIXEL_MM / max(dy, dx)))
    pixel_mm = (dy * stride, dx * stride)
    index = _sampled(volume.hu.shape[0])
    signs = [slice_signs(volume.hu[k, ::stride, ::stride], pixel_mm) for k in index]
    z_of_slice = slice_z_mm(volume)
    labels = _in_order(_smooth([label(s) for s in signs]), z_of_slice[index])
    return BodyRegions(_extents(labels, signs, index, z_of_slice))

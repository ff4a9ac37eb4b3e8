"""An anatomical CT phantom defined in patient space (LPS, mm), sampled plane by plane.

Every structure is an ellipsoid or cylinder with a realistic density (HU);
anatomy varies with the seed (size and position of body and organs). The
phantom spans z = 0 mm (lower abdomen) to 560 mm (lung apices): abdomen
below ``CHEST_START_MM``, chest above. :func:`make_head_phantom` is a head and neck (skull ring around
brain, ventricles, sinuses, cervical spine and airway) from z = -40 mm (neck) to 190 mm (vertex). Lesions
are spheres with their own density, written as ground truth beside the series.
"""

from __future__ import annotations

import dataclasses

import numpy as np

REGIONS_MM = {"abdomen": (0.0, 260.0), "chest": (250.0, 560.0), "chest-abdomen": (0.0, 560.0),
              "head": (-40.0, 190.0)}  # the head phantom (make_head_phantom) has its own space: neck to vertex
CHEST_START_MM = 255.0
AIR, FAT, MUSCLE, BONE, MARROW = -1000.0, -100.0, 45.0, 700.0, 250.0
LUNG, BLOOD, LIVER, SPLEEN, KIDNEY, PANCREAS = -850.0, 40.0, 60.0, 50.0, 35.0, 45.0
BRAIN, CSF, SKULL, SCALP = 35.0, 8.0, 1200.0, 30.0
NOISE_HU = 12.0
LESION_KINDS = {
    "pancreas-hypo": ("pancreas", -35.0),  # hypo-attenuating pancreatic lesion (HU relative to pancreas)
    "pancreas-iso": ("pancreas", -12.0),   # subtle, nearly iso-attenuating
    "lung-nodule": ("right lung", 880.0),  # solid nodule in aerated lung
    "liver-hypo": ("liver", -40.0),
}


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
    name: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float
    additive: bool = False  # lesions add to what is there; organs replace it

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        cx, cy, cz = self.center
        rx, ry, rz = self.radii
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    def z_range(self) -> tuple[float, float]:
        return self.center[2] - self.radii[2], self.center[2] + self.radii[2]


@dataclasses.dataclass(frozen=True)
class Phantom:
    """Structures painted in order (later ones over earlier ones), plus the lesions."""

    body_radii: tuple[float, float]
    structures: tuple[Ellipsoid, ...]
    lesions: tuple[Ellipsoid, ...]
    seed: int

    def sample(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """HU at patient positions x, y, z (broadcastable arrays, mm), with scanner noise."""
        shape = np.broadcast(x, y, z).shape
        hu = np.full(shape, AIR, dtype=np.float32)
        zmin, zmax = float(np.min(z)), float(np.max(z))
        for s in self.structures + self.lesions:
            lo, hi = s.z_range()
            if hi < zmin or lo > zmax:
                continue
            mask = np.broadcast_to(s.inside(x, y, z), shape)
            if s.additive:
                hu[mask] += s.hu
            else:
                hu[mask] = s.hu
        hu += rng.standard_normal(shape, dtype=np.float32) * NOISE_HU
        return hu


def _long(name: str, cx: float, cy: float, z0: float, z1: float, rx: float, ry: float, hu: float) -> Ellipsoid:
    """A structure running along z from z0 to z1 (a very elongated ellipsoid)."""
    return Ellipsoid(name, (cx, cy, (z0 + z1) / 2), (rx, ry, (z1 - z0) / 2), hu)


def _upper_trunk(bx: float, by: float, lungs: list[Ellipsoid]) -> list[Ellipsoid]:
    """Chest wall and shoulders around the lungs wherever the body ellipsoid tapers off or is narrower than the
    lungs (painted first, so the body ellipsoid is unchanged where it reaches): lungs lie inside the body."""
    rx = max([bx] + [abs(e.center[0]) + e.radii[0] + 25 for e in lungs])
    ry = max([by] + [abs(e.center[1]) + e.radii[1] + 25 for e in lungs])
    return [_long("upper trunk", 0, 0, 250, 760, rx, ry, FAT),
            _long("upper trunk muscle", 0, 0, 250, 760, rx - 15, ry - 15, MUSCLE)]


def make_phantom(seed: int = 0, lesions: tuple[str, ...] = ()) -> Phantom:
    """A phantom whose anatomy varies with ``seed``; ``lesions`` are keys of :data:`LESION_KINDS`."""
    rng = np.random.default_rng(seed)
    j = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731 - anatomical jitter, mm
    bx, by = 165.0 + j(20), 115.0 + j(15)
    spine_y = by - 45
    s: list[Ellipsoid] = [
        _long("body", 0, 0, -40, 600, bx, by, FAT),
        _long("muscle", 0, 0, -40, 600, bx - 15, by - 15, MUSCLE),
        _long("vertebral bodies", 0, spine_y, -40, 600, 20, 18, MARROW),
        _long("spinal canal", 0, spine_y + 25, -40, 600, 8, 8, 10.0),
        _long("aorta", 18 + j(3), spine_y - 30, -40, 520, 12, 12, BLOOD),
    ]
    for k in range(24):  # ribs: thin bony bands around the chest wall, every 25 mm
        z = 270 + 12 * k + j(2)
        s.append(Ellipsoid(f"rib {k}", (0, 0, z), (bx - 8, by - 8, 4), BONE))
        s.append(Ellipsoid(f"intercostal {k}", (0, 0, z), (bx - 14, by - 14, 5), MUSCLE))
    lung_z0, lung_z1 = 285 + j(10), 555 + j(5)
    s += [
        _long("right lung", -75 + j(5), 5 + j(5), lung_z0, lung_z1 + 40, 60 + j(6), 80 + j(8), LUNG),
        _long("left lung", 75 + j(5), 5 + j(5), lung_z0 + 10, lung_z1 + 40, 55 + j(6), 78 + j(8), LUNG),
        Ellipsoid("heart", (20 + j(5), -25 + j(5), 330 + j(10)), (60, 50, 55), BLOOD),
        _long("trachea", 0, -10, 430, 600, 9, 9, AIR),
        Ellipsoid("liver", (-70 + j(8), -5 + j(6), 215 + j(8)), (85 + j(8), 75 + j(6), 60 + j(6)), LIVER),
        Ellipsoid("spleen", (95 + j(6), 35 + j(5), 215 + j(8)), (30, 45, 40), SPLEEN),
        Ellipsoid("right kidney", (-70 + j(5), spine_y - 5, 150 + j(8)), (28, 25, 55), KIDNEY),
        Ellipsoid("left kidney", (70 + j(5), spine_y - 5, 160 + j(8)), (28, 25, 55), KIDNEY),
        Ellipsoid("pancreas", (15 + j(5), spine_y - 55 + j(4), 185 + j(6)), (70 + j(6), 14, 18), PANCREAS),
        _long("vertebral cortex", 0, spine_y, -40, 600, 23, 21, BONE),
        _long("vertebral bodies", 0, spine_y, -40, 600, 20, 18, MARROW),
        _long("spinal canal", 0, spine_y + 25, -40, 600, 8, 8, 10.0),
        _long("aorta", 18, spine_y - 30, -40, 520, 12, 12, BLOOD),
    ]
    s[:0] = _upper_trunk(bx, by, [e for e in s if e.name.endswith(" lung")])
    for k in range(10):  # bowel gas pockets in the lower abdomen
        s.append(Ellipsoid(f"bowel gas {k}", (j(100), -40 + j(40), 40 + j(80)), (8 + j(4), 8 + j(4), 10), AIR))
    placed = []
    by_name = {e.name: e for e in s}
    for k, kind in enumerate(lesions):
        organ_name, delta = LESION_KINDS[kind]
        organ = by_name[organ_name]
        radius = float(rng.uniform(6, 12))
        offset = [float(rng.uniform(-0.4, 0.4)) * (r - radius) for r in organ.radii]
        cx, cy, cz = organ.center
        center = (cx + offset[0], cy + offset[1], cz + offset[2])
        placed.append(Ellipsoid(f"lesion {k}: {kind}", center, (radius,) * 3, delta, additive=True))
    return Phantom(body_radii=(bx, by), structures=tuple(s), lesions=tuple(placed), seed=seed)


def make_head_phantom(seed: int = 0) -> Phantom:
    """A head and neck whose size varies with ``seed``: scalp, a skull ring (cortical bone) around brain with
    ventricles, air sinuses and mastoids at the skull base, and below it the neck with airway and spine."""
    rng = np.random.default_rng(seed)
    j = lambda scale: float(rng.uniform(-scale, scale))  # noqa: E731 - anatomical jitter, mm
    hx, hy, hz, cz = 72.0 + j(5), 92.0 + j(6), 88.0 + j(4), 100.0  # skull outer radii and centre height, mm
    s: list[Ellipsoid] = [
        _long("neck", 0, 10, -40, 60, 58 + j(4), 62 + j(4), FAT),
        _long("neck muscle", 0, 10, -40, 60, 50, 54, MUSCLE),
        _long("cervical vertebrae", 0, 25, -40, 40, 13, 12, MARROW),
        _long("cervical cortex", 0, 25, -40, 40, 15, 14, BONE),
        _long("cervical marrow", 0, 25, -40, 40, 12, 11, MARROW),
        _long("spinal canal", 0, 45, -40, 45, 7, 7, 10.0),
        _long("airway", 0, -25, -40, 45, 9, 8, AIR),
        Ellipsoid("face", (0, -35, 35), (55, 55, 40), MUSCLE),
        Ellipsoid("scalp", (0, 0, cz), (hx + 6, hy + 6, hz + 6), SCALP),
        Ellipsoid("skull", (0, 0, cz), (hx, hy, hz), SKULL),
        Ellipsoid("brain", (0, 0, cz), (hx - 7, hy - 7, hz - 7), BRAIN),
        Ellipsoid("right lateral ventricle", (-10, 5, cz + 10), (6, 25, 12), CSF),
        Ellipsoid("left lateral ventricle", (10, 5, cz + 10), (6, 25, 12), CSF),
        Ellipsoid("right maxillary sinus", (-25, -60, 20), (14, 15, 16), AIR),
        Ellipsoid("left maxillary sinus", (25, -60, 20), (14, 15, 16), AIR),
        Ellipsoid("right mastoid", (-55, 30, 20), (8, 10, 10), AIR),
        Ellipsoid("left mastoid", (55, 30, 20), (8, 10, 10), AIR),
    ]
    return Phantom(body_radii=(hx + 6, hy + 6), structures=tuple(s), lesions=(), seed=seed)

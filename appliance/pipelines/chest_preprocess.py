"""Image preparation shared by training and inference of the chest COVID-19 classifier.

The same steps run on a JPEG slice of the training set and on an axial slice
of a CT volume: render in the lung window (W 1500, L -600) to 8-bit grey,
crop to the lung fields (dark regions enclosed by the body), resize to
``INPUT_SIZE`` square and standardise each image to zero mean and unit
variance. Cropping to the lungs and per-image standardisation remove much of
what differs between sources (field of view, figure borders, display window).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

INPUT_SIZE = 128
LUNG_WINDOW = (-600.0, 1500.0)  # level, width (HU)
DARK_LEVEL = 110  # grey value (0-255) below which lung-window pixels are air or lung
MIN_LUNG_FRACTION = 0.02  # of the image, for a dark region to count as lung
CROP_MARGIN = 0.08


def window_to_gray(hu: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU -> 8-bit grey in the given window."""
    lo = level - width / 2
    scaled = (hu.astype(np.float32) - lo) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def lung_box(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) around the lung fields, or None when none are found."""
    dark = gray < DARK_LEVEL
    labels, count = ndimage.label(dark)
    if count == 0:
        return None
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))) - {0}
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = [k for k in range(1, count + 1) if k not in border and sizes[k] >= MIN_LUNG_FRACTION * dark.size]
    if not keep:
        return None
    rows, cols = np.nonzero(np.isin(labels, keep))
    h, w = gray.shape
    mr, mc = int(CROP_MARGIN * h), int(CROP_MARGIN * w)
    return max(0, rows.min() - mr), min(h, rows.max() + mr + 1), max(0, cols.min() - mc), min(w, cols.max() + mc + 1)


def prepare_gray(gray: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """8-bit lung-window image -> standardised float32 (size, size), cropped to the lungs."""
    box = lung_box(gray)
    if box is not None:
        top, bottom, left, right = box
        gray = gray[top:bottom, left:right]
    resized = np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return standardise(resized)


def standardise(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    return (image - image.mean()) / max(float(image.std()), 1.0)

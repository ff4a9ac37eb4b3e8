"""Image preparation shared by training and inference of the chest COVID-19 classifier.

The same steps run on a JPEG slice of the training set and on an axial slice
of a CT volume: render in the lung window (W 1500, L -600) to 8-bit grey,
crop to the body outline (the largest region brighter than lung), resize to
``INPUT_SIZE`` square and standardise each image to zero mean and unit
variance. Cropping to the body and per-image standardisation remove much of
what differs between sources (field of view, figure borders, display window).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

INPUT_SIZE = 128
LUNG_WINDOW = (-600.0, 1500.0)  # level, width (HU)
DARK_LEVEL = 110  # grey value (0-255) below which lung-window pixels are air or lung
MIN_BODY_FRACTION = 0.05  # of the image, for the bright region to count as the body
CROP_MARGIN = 0.02
OPENING_FRACTION = 0.012  # of the image side: thicker than a table top, thinner than a chest wall


def window_to_gray(hu: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU -> 8-bit grey in the given window."""
    lo = level - width / 2
    scaled = (hu.astype(np.float32) - lo) * (255.0 / width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def body_box(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) around the body: the largest region brighter than lung.

    Cropping to the body outline, not to the dark lung fields, keeps consolidated
    (bright) lung inside the crop and leaves out the table, air and figure borders.
    """
    # opening cuts thin bright structures (the table, its mattress line) off the body
    iterations = max(1, round(OPENING_FRACTION * min(gray.shape)))
    labels, count = ndimage.label(ndimage.binary_opening(gray >= DARK_LEVEL, iterations=iterations))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)))
    h, w = gray.shape
    if len(rows) < MIN_BODY_FRACTION * gray.size:
        return None
    mr, mc = int(CROP_MARGIN * h), int(CROP_MARGIN * w)
    return max(0, rows.min() - mr), min(h, rows.max() + mr + 1), max(0, cols.min() - mc), min(w, cols.max() + mc + 1)


def prepare_gray(gray: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """8-bit lung-window image -> standardised float32 (size, size), cropped to the lungs."""
    box = body_box(gray)
    if box is not None:
        top, bottom, left, right = box
        gray = gray[top:bottom, left:right]
    resized = np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return standardise(resized)


def standardise(image: np.ndarray) -> np.ndarray:
    image = image.astype(np.float32)
    return (image - image.mean()) / max(float(image.std()), 1.0)

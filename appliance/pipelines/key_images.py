"""Key images: RGB slices with an overlay, and the model's validation notice burned in at the top.

The notice travels with the pixels, so a radiologist who sees the image in a PACS, without the
appliance's screens around it, still reads that the model is not validated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BANNER_HEIGHT_FRACTION = 0.06
BANNER_COLOUR = (160, 0, 0)


def save_key_image(rgb: np.ndarray, path: Path, notice: str | None) -> None:
    """Write ``rgb`` (H, W, 3) as PNG, with ``notice`` (if any) on a red banner across the top."""
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if notice:
        draw = ImageDraw.Draw(image)
        height = max(12, int(image.height * BANNER_HEIGHT_FRACTION))
        draw.rectangle([0, 0, image.width, height], fill=BANNER_COLOUR)
        draw.text((4, max(0, (height - 11) // 2)), notice.upper()[:120], fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)

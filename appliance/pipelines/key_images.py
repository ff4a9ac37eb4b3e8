"""Key images: RGB slices with an overlay, and a validation warning burned in at the top.

The warning travels with the pixels, so a radiologist who sees the image in a PACS, without the
appliance's screens around it, still reads that the model is not validated. Key images are made once, at
analysis time, and read at every site whatever its language: the banner says it in each of the appliance's
languages (English, French, Spanish), short enough to fit a 128-pixel image; the model's full note is in the
report and the SR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BANNER_HEIGHT_FRACTION = 0.06
BANNER_COLOUR = (160, 0, 0)
BANNER_LINES = ("NOT VALIDATED", "NON VALIDÉ", "NO VALIDADO")
BANNER_TEXT = " · ".join(BANNER_LINES)
MIN_FONT_PX = 7
LINE_PX = 9  # a stacked line's height on small images
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")  # Pillow's own font has no accented capitals


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.truetype(str(FONT), size) if FONT.is_file() else ImageFont.load_default(size=size)


def _width(text: str, font) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)


def banner_layout(width: int, height: int) -> tuple[list[str], ImageFont.FreeTypeFont | ImageFont.ImageFont, int]:
    """(lines, font, banner height): the warning on one line at the largest font up to the banner's height that
    fits ``width``; on an image too narrow for that at MIN_FONT_PX, one language per line."""
    for size in range(max(MIN_FONT_PX, height - 2), MIN_FONT_PX - 1, -1):
        font = _font(size)
        if _width(BANNER_TEXT, font) <= width - 8:
            return [BANNER_TEXT], font, height
    size = MIN_FONT_PX
    while size > 5 and max(_width(line, _font(size)) for line in BANNER_LINES) > width - 4:
        size -= 1
    return list(BANNER_LINES), _font(size), LINE_PX * len(BANNER_LINES) + 2


def save_key_image(rgb: np.ndarray, path: Path, notice: str | None) -> None:
    """Write ``rgb`` (H, W, 3) as PNG; when the model is not validated (``notice`` given) the warning of
    BANNER_LINES goes on a red banner across the top."""
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if notice:
        draw = ImageDraw.Draw(image)
        lines, font, height = banner_layout(image.width, max(12, int(image.height * BANNER_HEIGHT_FRACTION)))
        draw.rectangle([0, 0, image.width, height], fill=BANNER_COLOUR)
        step = height / len(lines)
        for k, line in enumerate(lines):
            draw.text((4, step * (k + 0.5)), line, fill=(255, 255, 255), font=font, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)

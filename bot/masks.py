"""Masks members give for inpainting: an uploaded mask (``/inpaint``) or cells of a grid (Vary (Region)).

A mask is a PNG where white means "change this". An upload may instead be an image with
transparency, where transparent means change (what many editors export when you erase). Either
way it is decoded with the same guards as an /img2img upload, resized to the image it goes with,
and refused when it selects nothing or everything. What comes out is an 8-bit grey PNG at the
image's size, the form the engine's ``GenerationParams.mask`` takes.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from bot.inputs import MAX_INPUT_PIXELS, BadInput
from engine.features.masks import repaint_area

#: The grid drawn over an image for Vary (Region): cells numbered 1..9, row by row.
GRID = 3
#: Share of pixels that must be selected, and left, for a mask to mean something.
MIN_SHARE = 0.002


def _png(mask: Image.Image) -> bytes:
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def check_coverage(mask: Image.Image) -> None:
    """Refuse a mask that selects nothing, or everything (that is a new image: use /imagine)."""
    histogram = mask.histogram()
    total = mask.width * mask.height
    selected = sum(histogram[128:]) / total
    if selected < MIN_SHARE:
        raise BadInput(
            "The mask selects nothing to change: paint the area to change white (or make it "
            "transparent) and the rest black."
        )
    if selected > 1 - MIN_SHARE:
        raise BadInput(
            "The mask selects the whole image: to make a new image use /imagine, or leave the part to keep black."
        )


def load_mask(data: bytes, size: tuple[int, int], *, formats: tuple[str, ...] = ("PNG", "WEBP")) -> bytes:
    """An uploaded mask as a grey PNG of ``size``: white (or, in an image with transparency,
    transparent) means change. Refuses what /img2img refuses, and masks of nothing or everything."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise BadInput(
                f"The mask is {image.width}x{image.height}; masks up to "
                f"{MAX_INPUT_PIXELS // 1_000_000} megapixels are accepted."
            )
        image.seek(0)
        image.load()
        mask = repaint_area(ImageOps.exif_transpose(image))
    except BadInput:
        raise
    except Image.DecompressionBombError:
        raise BadInput("The mask is too large.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInput(f"The mask could not be read as an image ({type(e).__name__}); send a PNG.") from None
    mask = mask.resize(size, Image.Resampling.BILINEAR).point(lambda v: 255 if v >= 128 else 0)
    check_coverage(mask)
    return _png(mask)


def cells_mask(size: tuple[int, int], cells: Iterable[int], grid: int = GRID) -> bytes:
    """The mask of grid ``cells`` (1-based, row by row) of an image of ``size``."""
    width, height = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for cell in cells:
        row, col = divmod(cell - 1, grid)
        draw.rectangle(
            (col * width // grid, row * height // grid, (col + 1) * width // grid - 1, (row + 1) * height // grid - 1),
            fill=255,
        )
    check_coverage(mask)
    return _png(mask)


def grid_overlay(png: bytes, grid: int = GRID) -> bytes:
    """The image with its numbered grid drawn over it, for choosing cells."""
    with Image.open(io.BytesIO(png)) as source:
        image = source.convert("RGB")
    draw = ImageDraw.Draw(image)
    width, height = image.size
    font = ImageFont.load_default(size=max(12, min(width, height) // (grid * 3)))
    for i in range(1, grid):
        draw.line((i * width // grid, 0, i * width // grid, height), fill=(255, 255, 255), width=2)
        draw.line((0, i * height // grid, width, i * height // grid), fill=(255, 255, 255), width=2)
    for cell in range(1, grid * grid + 1):
        row, col = divmod(cell - 1, grid)
        x, y = col * width // grid + 6, row * height // grid + 4
        draw.text((x, y), str(cell), fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return _png(image)

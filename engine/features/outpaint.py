"""Outpainting canvases: Zoom Out, Pan and Make Square as an (image, mask) pair for a masked job.

Each helper puts the finished image on a larger canvas and masks the new area (white = paint
here). The new area is pre-filled with the colours at the image's edges spread outwards
(:func:`engine.features.masks.fill_masked`) plus some noise, so that the sampler starts from something
that continues the picture rather than from flat grey. The canvas keeps within ``max_pixels``
(the configured maximum image size, width x height): when the enlarged canvas would be bigger,
canvas and image are scaled down together. Its sides are multiples of 8 (the latent grid).

The job to queue is a masked img2img job with ``init_image`` = the canvas, ``mask`` = the mask,
``width, height = canvas.image.size`` and strength 1 (the new area is made from scratch; the
image itself is kept by the mask). Pure functions on PIL images: no torch, no model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from engine.errors import GenerationError
from engine.features.masks import fill_masked

#: Zoom Out factors Midjourney offers.
ZOOM_FACTORS = (1.5, 2.0)
#: Pan direction -> where the image sits on the wider canvas (0 = left/top, 1 = right/bottom).
PAN_ANCHORS = {"left": (1.0, 0.5), "right": (0.0, 0.5), "up": (0.5, 1.0), "down": (0.5, 0.0)}
#: Pan extends the canvas by this share of the image's size towards one side.
PAN_SHARE = 0.5
#: Standard deviation (of 255) of the noise added to the pre-filled area.
FILL_NOISE = 24.0
GRID = 8


class Canvas(NamedTuple):
    """A canvas to outpaint: ``image`` (RGB) with the new area pre-filled, ``mask`` (L, 255 = new area)."""

    image: Image.Image
    mask: Image.Image


def zoom_out(image: Image.Image, factor: float, max_pixels: int, seed: int = 0) -> Canvas:
    """The image in the middle of a canvas ``factor`` times its size (1.5 or 2: Midjourney's Zoom Out)."""
    if factor <= 1:
        raise ValueError(f"zoom factor {factor}: must be more than 1")
    return _extend(image, (image.width * factor, image.height * factor), (0.5, 0.5), max_pixels, seed)


def pan(image: Image.Image, direction: str, max_pixels: int, seed: int = 0) -> Canvas:
    """The canvas extended by half the image's size towards ``direction`` (left, right, up, down)."""
    if direction not in PAN_ANCHORS:
        raise ValueError(f"pan direction {direction!r}: use one of {', '.join(PAN_ANCHORS)}")
    wide = direction in ("left", "right")
    size = (image.width * (1 + PAN_SHARE), image.height) if wide else (image.width, image.height * (1 + PAN_SHARE))
    return _extend(image, size, PAN_ANCHORS[direction], max_pixels, seed)


def make_square(image: Image.Image, max_pixels: int, seed: int = 0) -> Canvas:
    """The image centred on a square canvas as wide as its longer side."""
    if image.width == image.height:
        raise GenerationError("The image is square already: Make Square is for images wider or taller than that.")
    side = max(image.size)
    return _extend(image, (side, side), (0.5, 0.5), max_pixels, seed)


def canvas_scale(size: tuple[float, float], max_pixels: int) -> float:
    """The scale (at most 1) at which a canvas of ``size``, its sides rounded up to the grid, fits ``max_pixels``."""
    width, height = size
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    while _on_grid(width * scale) * _on_grid(height * scale) > max_pixels and scale > 1e-3:
        scale *= 0.99
    return scale


def _on_grid(length: float) -> int:
    return max(GRID, math.ceil(length / GRID - 1e-9) * GRID)


def _extend(
    image: Image.Image, size: tuple[float, float], anchor: tuple[float, float], max_pixels: int, seed: int
) -> Canvas:
    """``image`` placed at ``anchor`` on a canvas of ``size`` (scaled to the budget), the rest masked and filled."""
    image = image.convert("RGB")
    scale = canvas_scale(size, max_pixels)
    canvas_w, canvas_h = _on_grid(size[0] * scale), _on_grid(size[1] * scale)
    if scale < 1:
        image = image.resize(
            (min(round(image.width * scale), canvas_w), min(round(image.height * scale), canvas_h)),
            Image.Resampling.LANCZOS,
        )
    left = round((canvas_w - image.width) * anchor[0])
    top = round((canvas_h - image.height) * anchor[1])
    canvas = Image.new("RGB", (canvas_w, canvas_h), (127, 127, 127))
    canvas.paste(image, (left, top))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    filled = np.asarray(fill_masked(canvas, mask), dtype=np.float64)
    new_area = np.asarray(mask)[..., None] > 0
    noise = np.random.default_rng(seed).normal(0, FILL_NOISE, filled.shape)
    out = np.where(new_area, np.clip(np.rint(filled + noise), 0, 255), filled)
    return Canvas(Image.fromarray(out.astype(np.uint8), "RGB"), mask)

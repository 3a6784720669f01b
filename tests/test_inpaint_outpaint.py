"""Zoom Out, Pan and Make Square canvases: their sizes, where the image stays, the filled new area."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from engine.errors import GenerationError
from engine.features.masks import feather_reach
from engine.features.outpaint import make_square, pan, zoom_out
from engine.pipeline import Pipeline
from engine.types import GenerationRequest
from tolerance import image_array

BIG = 4096 * 4096  # a budget that never scales


def picture(width: int, height: int, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def kept_box(mask: Image.Image) -> tuple[int, int, int, int]:
    """Where the mask keeps the image (its black part)."""
    return ImageOps.invert(mask).getbbox()


def assert_image_at(canvas, image: Image.Image, left: int, top: int) -> None:
    box = (left, top, left + image.width, top + image.height)
    assert kept_box(canvas.mask) == box
    assert np.array_equal(np.asarray(canvas.image.crop(box)), np.asarray(image))
    mask = np.asarray(canvas.mask)
    assert (mask[top : box[3], left : box[2]] == 0).all() and (
        mask == 255
    ).sum() == mask.size - image.width * image.height


@pytest.mark.parametrize(("factor", "size", "at"), [(1.5, (768, 768), (128, 128)), (2.0, (1024, 1024), (256, 256))])
def test_zoom_out_centres_the_image_on_a_larger_canvas(factor, size, at):
    image = picture(512, 512)
    canvas = zoom_out(image, factor, BIG)
    assert canvas.image.size == canvas.mask.size == size
    assert_image_at(canvas, image, *at)


@pytest.mark.parametrize(
    ("direction", "size", "at"),
    [
        ("left", (768, 384), (256, 0)),
        ("right", (768, 384), (0, 0)),
        ("up", (512, 576), (0, 192)),
        ("down", (512, 576), (0, 0)),
    ],
)
def test_pan_extends_by_half_towards_one_side(direction, size, at):
    image = picture(512, 384)
    canvas = pan(image, direction, BIG)
    assert canvas.image.size == size
    assert_image_at(canvas, image, *at)


def test_make_square_centres_the_image_and_refuses_a_square_one():
    image = picture(512, 384)
    canvas = make_square(image, BIG)
    assert canvas.image.size == (512, 512)
    assert_image_at(canvas, image, 0, 64)
    with pytest.raises(GenerationError, match="square already"):
        make_square(picture(64, 64), BIG)


def test_odd_sizes_give_a_canvas_on_the_latent_grid_that_holds_the_whole_image():
    image = picture(500, 333)
    canvas = make_square(image, BIG)
    assert canvas.image.size == (504, 504)
    left, top, right, bottom = kept_box(canvas.mask)
    assert (right - left, bottom - top) == (500, 333)
    assert_image_at(canvas, image, left, top)


@pytest.mark.parametrize(
    "make",
    [
        lambda im, budget: zoom_out(im, 2.0, budget),
        lambda im, budget: pan(im, "right", budget),
        lambda im, budget: make_square(im, budget),
    ],
)
def test_the_canvas_is_scaled_down_to_the_pixel_budget(make):
    image = picture(768, 512)
    budget = 768 * 768
    canvas = make(image, budget)
    width, height = canvas.image.size
    assert width * height <= budget and width % 8 == 0 and height % 8 == 0
    left, top, right, bottom = kept_box(canvas.mask)
    scaled = image.resize((right - left, bottom - top), Image.Resampling.LANCZOS)
    assert abs((right - left) / (bottom - top) - 768 / 512) < 0.01  # the image keeps its shape
    assert_image_at(canvas, scaled, left, top)


def test_the_new_area_continues_the_edge_colours_with_some_noise():
    red = Image.new("RGB", (64, 64), (220, 30, 30))
    canvas = zoom_out(red, 2.0, BIG, seed=3)
    new = np.asarray(canvas.image)[np.asarray(canvas.mask) > 0].astype(float)
    assert abs(new[:, 0].mean() - 220) < 5 and abs(new[:, 1].mean() - 30) < 5
    assert 10 < new[:, 0].std() < 40  # noisy, not flat
    assert np.array_equal(np.asarray(zoom_out(red, 2.0, BIG, seed=3).image), np.asarray(canvas.image))  # pure


def test_a_zoomed_out_canvas_outpaints_and_keeps_the_image(tiny_model):
    image = picture(48, 48)
    canvas = zoom_out(image, 1.5, 96 * 96)
    width, height = canvas.image.size
    buffers = []
    for part in canvas:
        buffer = io.BytesIO()
        part.save(buffer, format="PNG")
        buffers.append(buffer.getvalue())
    result = Pipeline(tiny_model).generate(
        GenerationRequest.of(
            1,
            prompt="a wide view",
            seed=2,
            steps=3,
            width=width,
            height=height,
            init_image=buffers[0],
            mask=buffers[1],
            strength=1.0,
        )
    )
    out = image_array(result.images[0].png)
    left, top, right, bottom = kept_box(canvas.mask)
    reach = feather_reach(4)
    inner = out[top + reach : bottom - reach, left + reach : right - reach]
    assert np.array_equal(inner, image_array(image)[reach:-reach, reach:-reach])


@pytest.mark.slow
def test_masks_and_canvases_are_made_without_torch():
    # The bot prepares zoom and pan canvases and checks masks without loading the engine.
    code = """
import io, sys
from PIL import Image
from engine.features.masks import blur_mask, crop_region, read_mask
from engine.features.outpaint import zoom_out
canvas = zoom_out(Image.new("RGB", (64, 48), (9, 9, 9)), 1.5, 512 * 512)
buffer = io.BytesIO()
canvas.mask.save(buffer, format="PNG")
mask = blur_mask(read_mask(buffer.getvalue(), canvas.image.size), 4)
assert crop_region(mask, 8, 64, 64) is not None
print(sorted(name for name in ("torch", "diffusers") if name in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

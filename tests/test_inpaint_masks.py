"""engine/features/masks.py on its own: reading masks, the feather's reach, the "only masked" box, the fill."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.errors import GenerationError
from engine.features.masks import blur_mask, crop_region, feather_reach, fill_masked, gaussian_blur, read_mask


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def box_mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def test_masks_are_binary_white_or_transparent_means_repaint():
    grey = Image.new("L", (8, 8), 100)
    grey.paste(200, (0, 0, 4, 8))
    assert np.array_equal(np.unique(np.asarray(read_mask(png(grey), (8, 8)))), [0, 255])
    assert np.asarray(read_mask(png(grey), (8, 8)))[:, :4].min() == 255
    erased = Image.new("LA", (8, 8), (0, 255))
    erased.paste((0, 0), (4, 0, 8, 8))
    assert np.array_equal(np.asarray(read_mask(png(erased), (8, 8))), np.asarray(box_mask((8, 8), (4, 0, 8, 8))))
    opaque = Image.new("RGBA", (8, 8), (255, 255, 255, 255))  # no transparency: its colours decide
    assert np.asarray(read_mask(png(opaque), (16, 16))).min() == 255
    with pytest.raises(GenerationError, match="mask could not be read"):
        read_mask(b"\x89PNG broken", (8, 8))


@pytest.mark.parametrize("radius", [1, 4, 9])
def test_the_feather_reaches_exactly_as_far_as_said(radius):
    size, box = (120, 100), (35, 30, 75, 70)
    feathered = np.asarray(blur_mask(box_mask(size, box), radius))
    reach = feather_reach(radius)
    x1, y1, x2, y2 = box
    inside = np.zeros(feathered.shape, dtype=bool)
    inside[y1 - reach : y2 + reach, x1 - reach : x2 + reach] = True
    assert not feathered[~inside].any()
    assert feathered[y1 + (y2 - y1) // 2, x1 - 1] > 0  # it does fade out past the edge
    assert feathered[y1 + (y2 - y1) // 2, x1 + (x2 - x1) // 2] >= 200  # and is (nearly) full inside


def test_the_only_masked_box_holds_mask_and_padding_at_the_job_shape():
    mask = box_mask((300, 200), (200, 20, 260, 40))  # 60 x 20 in a 300 x 200 image
    x1, y1, x2, y2 = crop_region(mask, 10, 64, 48)
    assert x1 <= 190 and y1 <= 10 and x2 >= 270 and y2 >= 50  # mask plus padding
    assert 0 <= x1 and 0 <= y1 and x2 <= 300 and y2 <= 200
    assert abs((x2 - x1) / (y2 - y1) - 64 / 48) < 0.02
    corner = crop_region(box_mask((300, 200), (0, 190, 5, 200)), 4, 64, 64)
    assert corner[0] == 0 and corner[3] == 200 and corner[2] - corner[0] == corner[3] - corner[1]
    assert crop_region(Image.new("L", (30, 30), 0), 4, 64, 64) is None


def test_fill_spreads_the_surrounding_colours_and_keeps_the_rest():
    image = Image.new("RGB", (64, 32), (250, 0, 0))
    image.paste((0, 0, 250), (32, 0, 64, 32))
    hole = box_mask((64, 32), (16, 8, 48, 24))
    filled = np.asarray(fill_masked(image, hole)).astype(int)
    kept = np.asarray(hole) == 0
    assert np.array_equal(filled[kept], np.asarray(image).astype(int)[kept])
    assert filled[16, 18, 0] > 150 > filled[16, 18, 2]  # near the red side: red
    assert filled[16, 45, 2] > 150 > filled[16, 45, 0]  # near the blue side: blue


@pytest.mark.parametrize("box", [(40, 30, 60, 50), (0, 0, 12, 90), (100, 70, 120, 100)])
def test_blurring_only_around_the_mask_gives_the_whole_image_blur(box):
    mask = box_mask((120, 100), box)
    whole = np.clip(np.rint(gaussian_blur(np.asarray(mask, dtype=np.float64), 5)), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(blur_mask(mask, 5)), whole)

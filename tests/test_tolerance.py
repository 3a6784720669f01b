"""tests/tolerance.py itself: the one allowance for a job alone and batched lets float rounding
through and catches a real difference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tolerance import assert_same_image, assert_same_latents


def test_a_few_pixels_off_by_one_pass_and_more_or_further_fail():
    image = np.random.default_rng(0).integers(1, 254, (64, 64, 3), dtype=np.uint8)
    rounded = image.copy()
    rounded[0, :4, 0] += 1  # 4 of 4096 pixels, by 1/255: rounding
    assert_same_image(image, rounded)
    with pytest.raises(AssertionError, match="5 of 4096 pixels differ"):
        five = rounded.copy()
        five[1, 0, 2] -= 1
        assert_same_image(image, five)
    with pytest.raises(AssertionError, match="by up to 2/255"):
        further = image.copy()
        further[0, 0, 0] += 2
        assert_same_image(image, further)


def test_latents_within_1e_4_pass_and_beyond_fail():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_same_latents(latents + 5e-5, latents)
    with pytest.raises(AssertionError):
        assert_same_latents(latents + 1e-3, latents)

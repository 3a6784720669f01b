"""One tolerance for "the same job gives the same image alone and batched", across the suite.

A job's computation does not depend on what shares its batch, but float rounding does depend on
the batch's size (matrix kernels block their sums differently) and on the machine: a job alone
and the same job among others agree to about 1e-5 in their latents, and once rounded to 8-bit
pixels a handful of values can land on the other side of a half. So every such test states the
same allowance: latents within 1e-4, and images with at most 0.1% of their pixels off, by at
most 1/255. A real mix-up (another job's noise, prompt, LoRA set or sampler) is far outside it.

(Not a test module: tests import it, as they import engine_harness.)
"""

from __future__ import annotations

import io

import numpy as np

#: Latents of the same job alone and batched: absolute and relative tolerance.
LATENT_TOLERANCE = 1e-4
#: Images of the same job: at most this share of pixels may differ, each channel by at most MAX_PIXEL_DIFF.
PIXEL_SHARE = 0.001
MAX_PIXEL_DIFF = 1


def assert_same_latents(a, b) -> None:
    """Latents (tensors) of the same job made alone and batched."""
    import torch

    torch.testing.assert_close(a, b, rtol=LATENT_TOLERANCE, atol=LATENT_TOLERANCE)


def image_array(image) -> np.ndarray:
    """PNG bytes, a PIL image or an array -> ``[h, w, channels]`` int16."""
    if isinstance(image, (bytes, bytearray)):
        from PIL import Image

        with Image.open(io.BytesIO(image)) as opened:
            image = np.asarray(opened.convert("RGB"))
    array = np.asarray(image).astype(np.int16)
    return array[..., None] if array.ndim == 2 else array


def assert_same_image(a, b) -> None:
    """Images (PNG bytes, PIL images or arrays) of the same job made alone and batched."""
    a, b = image_array(a), image_array(b)
    assert a.shape == b.shape, f"image sizes differ: {a.shape} vs {b.shape}"
    diff = np.abs(a - b).max(axis=-1)  # per pixel, its worst channel
    off = int((diff > 0).sum())
    allowed = int(PIXEL_SHARE * diff.size)
    assert diff.max() <= MAX_PIXEL_DIFF and off <= max(allowed, 1), (
        f"{off} of {diff.size} pixels differ (allowed {max(allowed, 1)}), by up to {diff.max()}/255 "
        f"(allowed {MAX_PIXEL_DIFF})"
    )

"""SD 1.x, 2.x and XL behind the family seam make the latents they made before it, bit for bit (issue 21):
every sampler, an img2img job and a variation-seed grid per family, against
``tests/data/sd_before_seam.npz``, written by the same script (``tests/sd_pixels.py``) with the
code as it was before the seam."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sd_pixels import family_latents, models

BEFORE = Path(__file__).parent / "data" / "sd_before_seam.npz"


@pytest.fixture(scope="module")
def today(tmp_path_factory) -> dict[str, np.ndarray]:
    """In one thread, as they were written: the CPU kernels' sums then run in the same order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return family_latents(models(tmp_path_factory.mktemp("seam")))
    finally:
        torch.set_num_threads(threads)


def test_every_family_and_sampler_gives_the_latents_it_gave_before_the_seam(today):
    before = np.load(BEFORE)
    assert sorted(before.files) == sorted(today)
    assert len(today) == 3 * 16  # 3 families x (14 samplers, img2img, a variation grid)
    for key in before.files:
        np.testing.assert_array_equal(today[key], before[key], err_msg=key)

"""Brownian-tree noise for the SDE samplers, one tree per image seeded with that image's seed.

The SDE samplers (DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE) add noise that must be the increment of
one Brownian motion over each step's sigma interval, or their images come out grainy. k-diffusion
(and AUTOMATIC1111 after it) draws those increments from a ``torchsde.BrownianTree`` per image,
seeded with the image's seed; so do we, on the CPU, so an image's noise depends only on its seed
and its own sigmas, never on what shares its batch or on the device.
"""

from __future__ import annotations

import torch
import torchsde
from torch import Tensor

#: torchsde's default resolution, as k-diffusion uses it; the tree rounds its ends to these digits.
TREE_TOL = 1e-6
TREE_DIGITS = 6


class BrownianNoise:
    """Standard-normal noise for sigma intervals of one image, as k-diffusion's BrownianTreeNoiseSampler."""

    def __init__(self, seed: int, shape: tuple[int, ...], sigma_min: float, sigma_max: float) -> None:
        self.seed, self.shape = seed, shape
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._low, self._high = round(sigma_min, TREE_DIGITS), round(sigma_max, TREE_DIGITS)
        self._tree: torchsde.BrownianTree | None = None  # built on first use: jobs that never draw pay nothing

    def tree(self) -> torchsde.BrownianTree:
        if self._tree is None:
            self._tree = torchsde.BrownianTree(
                self.sigma_min, torch.zeros(self.shape), self.sigma_max, entropy=self.seed, tol=TREE_TOL
            )
        return self._tree

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        """W(sigma_next) - W(sigma), scaled to unit variance."""
        # Clamped to the tree's rounded ends as torchsde would clamp them, without its warning: the
        # job's own sigma_max (or a level recomputed through exp(log(sigma))) can lie just outside.
        low, high = (min(max(v, self._low), self._high) for v in sorted((sigma, sigma_next)))
        w = self.tree()(low, high)
        if sigma > sigma_next:  # sampling walks down in sigma: the increment the other way round
            w = -w
        return w / abs(sigma_next - sigma) ** 0.5


def brownian_noises(seeds: list[int], shape: tuple[int, ...], sigmas: Tensor) -> list[BrownianNoise]:
    """One noise source per image over the job's range of sigmas (k-diffusion's: smallest nonzero to largest)."""
    sigma_min, sigma_max = float(sigmas[sigmas > 0].min()), float(sigmas.max())
    return [BrownianNoise(seed, shape, sigma_min, sigma_max) for seed in seeds]

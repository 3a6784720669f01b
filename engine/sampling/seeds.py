"""A job's randomness from its seeds, as AUTOMATIC1111 draws it (``modules/rng.py``): image ``i``
has a CPU generator seeded ``seed + i`` whose first draw is its initial noise (its later draws
are the ancestral samplers' noise), mixed with the variation seed's by :func:`slerp`.

Midjourney's ``--chaos`` is A1111's variation seed across a grid: every image's generator is
seeded with the job's seed and its noise mixed with its own seed ``seed + i``'s at strength
chaos/100, which is A1111's image with "Seed: seed, Variation seed: seed + i" (the PNG says so).
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.params import GenerationParams


def initial_noise(params: GenerationParams, shape: tuple[int, ...]) -> tuple[list[int], list[torch.Generator], Tensor]:
    """Each image's seed, generator and initial noise of ``shape`` (C, H, W), stacked."""
    seeds = [params.seed + i for i in range(params.count)]
    if params.chaos is not None:
        generators = [torch.Generator("cpu").manual_seed(params.seed) for _ in seeds]
        noises = [torch.randn(shape, generator=g) for g in generators]
        own = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds]
        return (
            seeds,
            generators,
            torch.stack([slerp(params.chaos / 100, n, o) for n, o in zip(noises, own, strict=True)]),
        )
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    noises = [torch.randn(shape, generator=g) for g in generators]
    if params.variation_seed is not None and params.variation_strength > 0:
        noises = [
            slerp(
                params.variation_strength,
                noise,
                torch.randn(shape, generator=torch.Generator("cpu").manual_seed(params.variation_seed + i)),
            )
            for i, noise in enumerate(noises)
        ]
    return seeds, generators, torch.stack(noises)


def slerp(t: float, a: Tensor, b: Tensor) -> Tensor:
    """AUTOMATIC1111's variation-seed mix of two ``(C, H, W)`` noises (``modules/rng.py``).

    A1111 interpolates on the sphere per vector along dim 1 (the latent's height): each
    (channel, column) of ``a`` and ``b`` is mixed with its own angle, which keeps the mix unit
    noise column by column. Only this formula gives A1111's image for a seed, variation seed and
    strength, so we keep its details: when the columns are almost parallel on average it mixes
    linearly, with the weights the other way round (``t`` on ``a``), which only happens when the
    two noises are nearly the same and the weights then hardly matter.
    """
    a_unit, b_unit = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    dot = (a_unit * b_unit).sum(1)  # [C, W]: one cosine per column
    if dot.mean() > 0.9995:
        return t * a + (1 - t) * b
    omega = dot.clamp(-1, 1).acos()
    sin_omega = omega.sin()
    return (torch.sin((1 - t) * omega) / sin_omega).unsqueeze(1) * a + (torch.sin(t * omega) / sin_omega).unsqueeze(
        1
    ) * b

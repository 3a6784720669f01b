"""Initial noise with a variation seed, against AUTOMATIC1111's formula (``modules/rng.py``).

A1111 draws each image's noise ``(C, H, W)`` from a CPU generator seeded with its seed, the
variation noise from one seeded with its variation seed, and mixes them by spherical
interpolation of every vector along dim 1: one angle per (channel, column). The reference here is
written from that definition, with einsum rather than our code's norms, so a shared slip would
have to be made twice.
"""

from __future__ import annotations

import pytest
import torch

from engine.pipeline import Pipeline
from engine.types import GenerationRequest


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> Pipeline:
    return Pipeline(tiny_model)


def a1111_variation_noise(shape, seed: int, variation_seed: int, strength: float) -> torch.Tensor:
    a = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    b = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(variation_seed))
    cos = torch.einsum("chw,chw->cw", a, b) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt())
    if cos.mean() > 0.9995:
        return a * strength + b * (1 - strength)  # A1111's linear fallback, weights as it has them
    omega = torch.arccos(cos)
    wa = (torch.sin((1 - strength) * omega) / torch.sin(omega))[:, None, :]
    wb = (torch.sin(strength * omega) / torch.sin(omega))[:, None, :]
    return wa * a + wb * b


def whole_tensor_slerp(shape, seed, variation_seed, strength) -> torch.Tensor:
    """What we did before: one angle for the whole tensor."""
    a = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    b = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(variation_seed))
    omega = ((a / a.norm()) * (b / b.norm())).sum().acos()
    return (torch.sin((1 - strength) * omega) * a + torch.sin(strength * omega) * b) / torch.sin(omega)


def initial_noise(pipeline: Pipeline, **fields) -> tuple[torch.Tensor, tuple[int, int, int]]:
    request = GenerationRequest.of(1, prompt="a fox", steps=4, width=64, height=48, sampler="euler_a", **fields)
    job = pipeline.prepare(request)
    return job.latents / job.sigmas[0].item(), tuple(job.latents.shape[1:])


@pytest.mark.parametrize("strength", [0.1, 0.5, 0.9])
def test_variation_noise_is_a1111s_per_column_slerp(pipeline, strength):
    noise, shape = initial_noise(pipeline, seed=11, variation_seed=999, variation_strength=strength, count=2)
    for i in range(2):  # image i: seed + i mixed with variation seed + i, as its infotext says
        expected = a1111_variation_noise(shape, 11 + i, 999 + i, strength)
        torch.testing.assert_close(noise[i], expected, rtol=1e-5, atol=1e-5)
        # The test tells the two formulas apart: the old whole-tensor mix is measurably off.
        assert (whole_tensor_slerp(shape, 11 + i, 999 + i, strength) - expected).abs().max() > 1e-3


def test_a_variation_seed_equal_to_the_seed_changes_nothing(pipeline):
    plain, _ = initial_noise(pipeline, seed=5)
    mixed, _ = initial_noise(pipeline, seed=5, variation_seed=5, variation_strength=0.4)
    torch.testing.assert_close(mixed, plain)

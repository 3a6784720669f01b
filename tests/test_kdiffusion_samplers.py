"""Each sampler against k-diffusion's own (tests/kdiffusion_ref, release 0.1.1.post1), to float precision.

Both run the same denoiser over the same float32 sigmas from the same start. Ancestral samplers get
the same standard-normal noise in the same order; the SDE samplers each build their Brownian trees
from the same per-image seeds, k-diffusion through its BrownianTreeNoiseSampler, ours through
engine.sampling.sde. Our loop is engine.sampling.samplers.sample, which walks the same per-row plan as the batch.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UniPCMultistepScheduler

from engine.sampling.samplers import SAMPLERS, sample
from engine.sampling.schedules import ModelSchedule, member_sigmas
from engine.sampling.sde import brownian_noises
from kdiffusion_ref import sampling as K

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SEEDS = [11, 12, 13]
SHAPE = (4, 6, 6)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def schedule() -> ModelSchedule:
    return ModelSchedule(EulerDiscreteScheduler(**SD_BETAS).alphas_cumprod)


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Smooth, nonlinear and dependent on sigma, so a wrong evaluation point shows."""
    s = sigma.view(-1, 1, 1, 1)
    return torch.tanh(x / (1 + s**2) ** 0.5) * (1 + 0.1 * torch.sin(s)) + 0.05 * x.roll(1, dims=-1) / (1 + s)


def start(sigmas: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(len(SEEDS), *SHAPE, generator=g) * sigmas[0]


def queued_noise():
    """The same standard-normal draws, in the same order, for both loops."""
    g = torch.Generator().manual_seed(99)
    return lambda *_: torch.randn(len(SEEDS), *SHAPE, generator=g)


def ours(name: str, sigmas: torch.Tensor) -> torch.Tensor:
    sampler = SAMPLERS[name]
    noise = None
    if sampler.brownian:
        trees = brownian_noises(SEEDS, SHAPE, sigmas)
        noise = lambda a, b: torch.stack([tree(a, b) for tree in trees])  # noqa: E731
    elif sampler.ancestral:
        noise = queued_noise()
    return sample(toy_denoiser, start(sigmas), sigmas, sampler, noise=noise)


def reference(function, sigmas: torch.Tensor, noise: str) -> torch.Tensor:
    kwargs = {}
    if noise == "brownian":
        x = start(sigmas)
        sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
        kwargs["noise_sampler"] = K.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=SEEDS)
    elif noise == "ancestral":
        kwargs["noise_sampler"] = queued_noise()
    return function(toy_denoiser, start(sigmas), sigmas, disable=True, **kwargs)


CASES = [
    ("euler", K.sample_euler, None),
    ("euler_a", K.sample_euler_ancestral, "ancestral"),
    ("dpmpp_2m", K.sample_dpmpp_2m, None),
    ("heun", K.sample_heun, None),
    ("lms", K.sample_lms, None),
    ("dpm2", K.sample_dpm_2, None),
    ("dpm2_a", K.sample_dpm_2_ancestral, "ancestral"),
    ("dpmpp_sde", K.sample_dpmpp_sde, "brownian"),
    ("dpmpp_2m_sde", K.sample_dpmpp_2m_sde, "brownian"),
    ("dpmpp_3m_sde", K.sample_dpmpp_3m_sde, "brownian"),
]


@pytest.mark.parametrize(("name", "function", "noise"), CASES, ids=[case[0] for case in CASES])
@pytest.mark.parametrize("schedule_type", ["automatic", "karras", "exponential"])
def test_sampler_matches_kdiffusion(schedule, name, function, noise, schedule_type):
    sampler = SAMPLERS[name]
    sigmas = member_sigmas(
        schedule, sampler.discretization, schedule_type, 9, discard_penultimate=sampler.discard_penultimate
    ).float()
    torch.testing.assert_close(ours(name, sigmas), reference(function, sigmas, noise), **TOLERANCE)


@pytest.mark.parametrize(("name", "function", "noise"), CASES, ids=[case[0] for case in CASES])
def test_sampler_matches_kdiffusion_for_img2img(schedule, name, function, noise):
    """A tail of the schedule (strength 0.6), where the first step starts without history."""
    sampler = SAMPLERS[name]
    sigmas = member_sigmas(
        schedule, sampler.discretization, "automatic", 12, strength=0.6, discard_penultimate=sampler.discard_penultimate
    ).float()
    torch.testing.assert_close(ours(name, sigmas), reference(function, sigmas, noise), **TOLERANCE)


def test_lcm_matches_automatic1111s_formula(schedule):
    """k-diffusion 0.1.1 has no LCM; AUTOMATIC1111's sample_lcm (modules/sd_samplers_lcm.py) jumps to
    the denoised image and renoises it to the next level, with the ancestral noise."""
    sigmas = member_sigmas(schedule, "normal", "automatic", 6).float()
    x, noise = start(sigmas), queued_noise()
    for i in range(len(sigmas) - 1):
        x = toy_denoiser(x, sigmas[i].expand(len(SEEDS)))
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise()
    torch.testing.assert_close(ours("lcm", sigmas), x, **TOLERANCE)


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
def test_unipc_matches_diffusers_unipc_multistep(steps):
    """k-diffusion has no UniPC; diffusers' UniPCMultistepScheduler (the UniPC authors' B(h) form,
    here with AUTOMATIC1111's defaults: order 3, bh1, lower order at the end, data prediction) runs
    on VP latents alpha * x over the same sigmas, fed the toy denoiser's noise prediction. Its bh1
    step to sigma 0 is NaN (B(h) is infinite there), so the reference ends at sigma_min; our step to 0
    lands on the denoised image, as every order-1 UniPC step to 0 does."""
    reference = UniPCMultistepScheduler(
        **SD_BETAS,
        solver_order=3,
        solver_type="bh1",
        lower_order_final=True,
        predict_x0=True,
        timestep_spacing="linspace",
        final_sigmas_type="sigma_min",
    )
    reference.set_timesteps(steps)
    sigmas = reference.sigmas.float()  # k-diffusion sigmas of its timesteps, then 0
    x = start(sigmas)
    vp = x / (1 + sigmas[0] ** 2) ** 0.5
    for i, t in enumerate(reference.timesteps):
        sigma = sigmas[i]
        x_k = vp * (1 + sigma**2) ** 0.5
        eps = (x_k - toy_denoiser(x_k, sigma.expand(len(SEEDS)))) / sigma
        vp = reference.step(eps, t, vp).prev_sample
    ended = vp * (1 + sigmas[-1] ** 2) ** 0.5  # back from VP latents at sigma_min
    torch.testing.assert_close(sample(toy_denoiser, x, sigmas, SAMPLERS["unipc"]), ended, **TOLERANCE)

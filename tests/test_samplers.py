"""Schedules and samplers, against diffusers' schedules and an exactly solvable model.

For data drawn from N(0, s^2) the ideal denoiser is known in closed form,
``D(x, sigma) = x * s^2 / (s^2 + sigma^2)``, and the probability-flow ODE maps noise ``x_T`` at
``sigma_max`` to ``x_T * s / sqrt(s^2 + sigma_max^2)``. So a sampler can be checked for what it
computes, not just for running.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from engine.sampling.samplers import SAMPLERS, sample
from engine.sampling.schedules import (
    ModelSchedule,
    ddim_sigmas,
    job_schedule,
    job_sigmas,
    karras_sigmas,
    latents_to_decode,
    normal_sigmas,
)
from engine.sampling.stages import N_COEFFS
from tolerance import assert_same_latents

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
DATA_STD = 1.0  # SD latents are about unit scale


@pytest.fixture(scope="module")
def schedule() -> ModelSchedule:
    return ModelSchedule(EulerDiscreteScheduler(**SD_BETAS).alphas_cumprod)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x * (DATA_STD**2 / (DATA_STD**2 + sigma**2)).view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------- schedules


def test_karras_sigmas_match_diffusers(schedule):
    reference = EulerDiscreteScheduler(**SD_BETAS, use_karras_sigmas=True)
    reference.set_timesteps(12)
    torch.testing.assert_close(karras_sigmas(schedule, 12).float(), reference.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_normal_sigmas_match_diffusers_linspace(schedule):
    reference = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace")
    reference.set_timesteps(10)  # 999 / 9 steps: integer timesteps, where both interpolations agree
    torch.testing.assert_close(normal_sigmas(schedule, 10).float(), reference.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_ddim_timesteps_are_a1111s_grid_down_to_timestep_1(schedule):
    sigmas = ddim_sigmas(schedule, 10)
    t = schedule.sigma_to_t(sigmas)
    torch.testing.assert_close(t, torch.arange(901, 0, -100, dtype=torch.float64))  # ends at 1, not sigma 0


def test_sigma_timestep_round_trip(schedule):
    t = torch.tensor([0.0, 3.3, 250.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t)


@pytest.mark.parametrize("discretization", ["normal", "karras", "ddim"])
def test_schedules_descend_to_zero(schedule, discretization):
    sigmas = job_sigmas(schedule, discretization, 7)
    # A1111's DDIM grid for 7 steps: 1, 143, ..., 995 (8 points, 7 steps), ending at timestep 1.
    assert len(sigmas) == 8 and sigmas[-1] == (schedule.sigmas[1] if discretization == "ddim" else 0)
    assert (sigmas[:-1] > sigmas[1:]).all()


def test_img2img_starts_part_way_down(schedule):
    full = job_sigmas(schedule, "normal", 20)
    half = job_sigmas(schedule, "normal", 20, strength=0.5)
    assert len(half) == 10 + 2  # int(0.5 * 20) steps plus one, as AUTOMATIC1111 runs them
    torch.testing.assert_close(half, full[-12:])
    assert len(job_sigmas(schedule, "normal", 20, strength=1.0)) == 21  # full strength ~ txt2img


# ---------------------------------------------------------------------------- samplers


def run_sampler(schedule, name: str, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 4096 scalar rows; returns (samples, the exact ODE solution from the same start)."""
    sampler = SAMPLERS[name]
    plan = job_schedule(schedule, sampler.discretization, steps)
    sigmas = plan.sigmas.float()
    generator = torch.Generator().manual_seed(seed)
    x_start = plan.start_latents(torch.randn(4096, 1, 1, 1, generator=generator)).float()
    out = sample(
        gaussian_denoiser, x_start, sigmas, sampler, noise=lambda *_: torch.randn(4096, 1, 1, 1, generator=generator)
    )
    # The ODE carries x_start at sigmas[0] to sigmas[-1] (0, or DDIM's timestep 1) by this factor.
    exact = x_start * ((DATA_STD**2 + sigmas[-1] ** 2) / (DATA_STD**2 + sigmas[0] ** 2)).sqrt()
    return latents_to_decode(out, float(sigmas[-1])), latents_to_decode(exact, float(sigmas[-1]))


def max_error(schedule, name: str, steps: int) -> float:
    out, exact = run_sampler(schedule, name, steps)
    return float((out - exact).abs().max())


@pytest.mark.parametrize(("name", "order"), [("euler", 1), ("ddim", 1), ("dpmpp_2m_karras", 2)])
def test_deterministic_samplers_converge_to_the_ode_solution_at_their_order(schedule, name, order):
    coarse, fine = max_error(schedule, name, 20), max_error(schedule, name, 60)
    assert fine < 0.1
    # Three times the steps: error / 3 for a first-order method, / 9 or better for second order.
    assert fine < coarse / (2.5 if order == 1 else 8)


def test_dpmpp_2m_karras_beats_euler_at_few_steps(schedule):
    assert max_error(schedule, "dpmpp_2m_karras", 10) < max_error(schedule, "euler", 10) / 2


def test_euler_ancestral_samples_the_data_distribution(schedule):
    coarse, _ = run_sampler(schedule, "euler_a", 20)
    fine, exact = run_sampler(schedule, "euler_a", 60)
    assert abs(fine.std().item() - DATA_STD) < 0.1 * DATA_STD
    assert abs(fine.std().item() - DATA_STD) < abs(coarse.std().item() - DATA_STD)
    assert abs(fine.mean().item()) < 0.05
    assert (fine - exact).abs().max() > 1  # fresh noise: not the deterministic path


@pytest.mark.parametrize("name", [name for name, sampler in SAMPLERS.items() if not sampler.stateful])
def test_a_step_is_row_wise(schedule, name):
    """Rows at different noise levels stepped together = each row stepped alone (cross-job batching)."""
    step = SAMPLERS[name].step
    g = torch.Generator().manual_seed(3)
    x, denoised, old_denoised, noise = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(4))
    sigma = torch.tensor([14.6, 2.0, 0.5])
    sigma_next = torch.tensor([9.1, 1.5, 0.0])
    old_sigma = torch.tensor([0.0, 3.0, 0.7])  # row 0 on its first step: no history
    together = step(x, denoised, sigma, sigma_next, old_denoised=old_denoised, old_sigma=old_sigma, noise=noise)
    for i in range(3):
        alone = step(
            x[i : i + 1],
            denoised[i : i + 1],
            sigma[i : i + 1],
            sigma_next[i : i + 1],
            old_denoised=old_denoised[i : i + 1],
            old_sigma=old_sigma[i : i + 1],
            noise=noise[i : i + 1],
        )
        assert_same_latents(together[i : i + 1], alone)
    if name != "lcm":  # LCM renoises to sigma_next: with sigma_next 0 it is the clean image plus nothing
        torch.testing.assert_close(together[2], denoised[2])  # the last step lands on the clean image
    assert torch.isfinite(together).all()


@pytest.mark.parametrize("name", [name for name, sampler in SAMPLERS.items() if sampler.stateful])
def test_a_stateful_step_is_row_wise(schedule, name):
    """Rows at different stages and with different history, stepped together = each alone."""
    sampler = SAMPLERS[name]
    g = torch.Generator().manual_seed(4)
    x, denoised, old_denoised, noise = (torch.randn(4, 4, 2, 2, generator=g) for _ in range(4))
    sigma = torch.tensor([14.6, 3.0, 1.2, 0.5])
    sigma_next = torch.tensor([9.1, 2.0, 0.9, 0.0])
    old_sigma = torch.tensor([0.0, 4.0, 1.5, 0.7])
    state = {name: torch.randn(4, 4, 2, 2, generator=g) for name in sampler.latent_state}
    state |= {name: torch.tensor([0.0, 0.0, 2.0, 0.9]) for name in sampler.row_state}
    state |= {
        "sigma_from": torch.tensor([14.6, 3.5, 1.4, 0.5]),
        "sigma_mid": torch.tensor([11.0, 2.4, 1.1, 0.0]),
        "stage": torch.tensor([0.0, 1.0, 0.0, 0.0]),
        "coeffs": torch.rand(4, N_COEFFS, generator=g),
    }
    kwargs = dict(old_denoised=old_denoised, old_sigma=old_sigma, noise=noise)
    together, updates = sampler.step(x, denoised, sigma, sigma_next, **kwargs, state=state)
    for i in range(4):
        pick = {key: value[i : i + 1] for key, value in kwargs.items()}
        alone, alone_updates = sampler.step(
            x[i : i + 1],
            denoised[i : i + 1],
            sigma[i : i + 1],
            sigma_next[i : i + 1],
            **pick,
            state={key: value[i : i + 1] for key, value in state.items()},
        )
        assert_same_latents(together[i : i + 1], alone)
        for key, value in alone_updates.items():
            assert_same_latents(updates[key][i : i + 1], value)
    assert torch.isfinite(together).all()

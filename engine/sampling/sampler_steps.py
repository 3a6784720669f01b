"""The sampler steps: one denoising step each, as pure functions over per-row sigmas.

:mod:`engine.sampling.samplers` explains why we have our own and pairs each step with its schedule and
plan in its registry; this module is only the arithmetic, after k-diffusion (Crowson) and the
papers each function names.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class StepFn(Protocol):
    def __call__(
        self,
        x: Tensor,
        denoised: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        *,
        old_denoised: Tensor,
        old_sigma: Tensor,
        noise: Tensor | None,
    ) -> Tensor: ...


def rows(sigma: Tensor) -> Tensor:
    """``[rows]`` -> ``[rows, 1, 1, 1]``, to scale whole latents per row."""
    return sigma.view(-1, 1, 1, 1)


def to_d(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """The probability-flow ODE's derivative dx/dsigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / rows(sigma)


def euler_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    return x + to_d(x, denoised, sigma) * rows(sigma_next - sigma)


def ancestral_split(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """Split the move to sigma_next into a deterministic part (down) and fresh noise (up), eta 1."""
    up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp_min(0).sqrt()
    up = torch.minimum(up, sigma_next)
    down = (sigma_next**2 - up**2).clamp_min(0).sqrt()
    return down, up


def dpmpp_2m_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
) -> Tensor:
    """DPM-Solver++(2M), multistep second order (Lu et al. 2022, Algorithm 2)."""
    # In t = -log(sigma): x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D, where D
    # extrapolates the denoised image linearly from the previous step when there is one. On a
    # row's first step (no history) and last step (sigma_next = 0) it is first order (DDIM).
    ratio = sigma_next / sigma
    second_order = (old_sigma > 0) & (sigma_next > 0)
    tiny = torch.finfo(sigma.dtype).tiny
    h = (sigma / sigma_next.clamp_min(tiny)).log()
    h_last = (old_sigma.clamp_min(tiny) / sigma).log()
    weight = torch.where(second_order, h / (2 * h_last.clamp_min(tiny)), torch.zeros_like(h))
    extrapolated = denoised + rows(weight) * (denoised - old_denoised)
    return rows(ratio) * x + rows(1 - ratio) * extrapolated


def ddim_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
) -> Tensor:
    """DDIM with eta 0 (Song et al. 2021, eq. 12), written in sigma-scaled latents."""
    # In k-diffusion's variables x_t / sqrt(alpha_t) the DDIM update keeps the predicted noise
    # and swaps the noise level: x_prev = x0 + sigma_prev * eps. This is A1111's update
    # (sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev) * e_t) divided by sqrt(a_prev); its timestep
    # grid and start/end scaling are the schedule's (engine.sampling.schedules.ddim_sigmas, JobSchedule).
    eps = (x - denoised) / rows(sigma)
    return denoised + rows(sigma_next) * eps


# ---------------------------------------------------------------------------- samplers with state
# These take the rows' own ``state`` (a dict of per-row tensors: the plan's "sigma_from",
# "sigma_mid" and "stage" and "coeffs" columns for the row's current engine step, and the
# sampler's history, zeros on a row's first step) and return the next x and the updated history.
# A second-order step is two engine steps (engine.sampling.stages): stage 0 moves to a trial point, stage 1
# evaluates there and finishes the step from the start point kept in the state. Rows of one
# sampler can be at different stages, so both branches are computed and each row takes its own.


class StagedStepFn(Protocol):
    def __call__(
        self,
        x: Tensor,
        denoised: Tensor,
        sigma: Tensor,
        sigma_next: Tensor,
        *,
        old_denoised: Tensor,
        old_sigma: Tensor,
        noise: Tensor | None,
        state: dict[str, Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


def _first_stage(state: dict[str, Tensor]) -> Tensor:
    return rows(state["stage"] == 0)


def heun_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1): an Euler trial
    step, then the average of the slopes at both ends; the last step (to sigma 0) is Euler's."""
    first, d = _first_stage(state), to_d(x, denoised, sigma)
    trial = x + d * rows(state["sigma_mid"] - sigma)  # sigma_mid is sigma_next here
    start, d_start = state["x_start"], state["d_start"]
    finished = start + (d_start + d) / 2 * rows(sigma_next - state["sigma_from"])
    return torch.where(first, trial, finished), {
        "x_start": torch.where(first, x, start),
        "d_start": torch.where(first, d, d_start),
    }


def dpm2_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPM-Solver-2 in Karras's form (Lu et al. 2022; Crowson's k-diffusion): the slope at the
    log-midpoint of the step, taken from the start; the last step is Euler's."""
    first, d = _first_stage(state), to_d(x, denoised, sigma)
    trial = x + d * rows(state["sigma_mid"] - sigma)  # sigma_mid is 0 on the last step: Euler to the end
    start = state["x_start"]
    finished = start + d * rows(sigma_next - state["sigma_from"])
    return torch.where(first, trial, finished), {"x_start": torch.where(first, x, start)}


def dpm2_ancestral_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPM2 to the ancestral step's sigma_down, then fresh noise up to sigma_next (k-diffusion)."""
    assert noise is not None, "dpm2_a draws fresh noise on its second stage"
    first, d = _first_stage(state), to_d(x, denoised, sigma)
    trial = x + d * rows(state["sigma_mid"] - sigma)
    start, sigma_from = state["x_start"], state["sigma_from"]
    down, up = ancestral_split(sigma_from, sigma_next)
    finished = start + d * rows(down - sigma_from) + noise * rows(up)
    return torch.where(first, trial, finished), {"x_start": torch.where(first, x, start)}


def dpmpp_sde_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPM-Solver++ (stochastic), r = 1/2 (Lu et al. 2022; Crowson's k-diffusion sample_dpmpp_sde)."""
    assert noise is not None, "dpmpp_sde draws Brownian noise on both stages"
    first, start, denoised_start = _first_stage(state), state["x_start"], state["denoised_start"]
    t = state["sigma_from"].log().neg()
    # Stage 0: an ancestral DPM-Solver++(1) step to the half-way level sigma_mid, plus its noise.
    down, up = ancestral_split(t.neg().exp(), state["sigma_mid"])
    t_down = down.log().neg()
    trial = rows(t_down.neg().exp() / t.neg().exp()) * x - rows((t - t_down).expm1()) * denoised + noise * rows(up)
    euler = x + to_d(x, denoised, sigma) * rows(sigma_next - sigma)  # the last step, to sigma 0
    trial = torch.where(rows(sigma_next > 0), trial, euler)
    # Stage 1: the whole step from the start with the half-way denoised image, plus its noise.
    down, up = ancestral_split(t.neg().exp(), sigma_next.log().neg().neg().exp())
    t_down = down.log().neg()
    finished = (
        rows(t_down.neg().exp() / t.neg().exp()) * start - rows((t - t_down).expm1()) * denoised + noise * rows(up)
    )
    return torch.where(first, trial, finished), {
        "x_start": torch.where(first, x, start),
        "denoised_start": torch.where(first, denoised, denoised_start),
    }


def dpmpp_2m_sde_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPM-Solver++(2M) SDE, midpoint variant, eta 1 (Lu et al. 2022; k-diffusion sample_dpmpp_2m_sde)."""
    assert noise is not None, "dpmpp_2m_sde draws Brownian noise every step"
    t, s = sigma.log().neg(), sigma_next.log().neg()
    h = s - t
    x_next = rows(sigma_next / sigma * h.neg().exp()) * x + rows((-h - h).expm1().neg()) * denoised
    h_last = t - old_sigma.log().neg()
    correction = rows(0.5 * (-h - h).expm1().neg() * (1 / (h_last / h))) * (denoised - old_denoised)
    x_next = torch.where(rows(old_sigma > 0), x_next + correction, x_next)
    x_next = x_next + noise * rows(sigma_next) * rows((-2 * h).expm1().neg().sqrt())
    return torch.where(rows(sigma_next > 0), x_next, denoised), {}


def dpmpp_3m_sde_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPM-Solver++(3M) SDE, eta 1 (Crowson's k-diffusion sample_dpmpp_3m_sde)."""
    assert noise is not None, "dpmpp_3m_sde draws Brownian noise every step"
    older_denoised, older_sigma = state["older_denoised"], state["older_sigma"]
    t, s = sigma.log().neg(), sigma_next.log().neg()
    h = s - t
    h_eta = h * 2
    x_next = rows(torch.exp(-h_eta)) * x + rows((-h_eta).expm1().neg()) * denoised
    h_1 = t - old_sigma.log().neg()
    h_2 = old_sigma.log().neg() - older_sigma.log().neg()
    phi_2 = h_eta.neg().expm1() / h_eta + 1
    # Third order, from two earlier steps.
    r0, r1 = h_1 / h, h_2 / h
    d1_0 = (denoised - old_denoised) / rows(r0)
    d1_1 = (old_denoised - older_denoised) / rows(r1)
    d1 = d1_0 + (d1_0 - d1_1) * rows(r0) / rows(r0 + r1)
    d2 = (d1_0 - d1_1) / rows(r0 + r1)
    third = x_next + rows(phi_2) * d1 - rows(phi_2 / h_eta - 0.5) * d2
    # Second order, from one earlier step.
    second = x_next + rows(phi_2) * ((denoised - old_denoised) / rows(h_1 / h))
    x_next = torch.where(rows(older_sigma > 0), third, torch.where(rows(old_sigma > 0), second, x_next))
    x_next = x_next + noise * rows(sigma_next) * rows((-2 * h).expm1().neg().sqrt())
    return torch.where(rows(sigma_next > 0), x_next, denoised), {
        "older_denoised": old_denoised,
        "older_sigma": old_sigma,
    }


def lms_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Linear multistep, order 4, on the probability-flow ODE (Crowson's k-diffusion sample_lms);
    the coefficients are the plan's (engine.sampling.stages.lms_coefficients), zero for missing history."""
    c = state["coeffs"]
    d, d1, d2, d3 = to_d(x, denoised, sigma), state["d1"], state["d2"], state["d3"]
    change = rows(c[:, 0]) * d + rows(c[:, 1]) * d1 + rows(c[:, 2]) * d2 + rows(c[:, 3]) * d3
    return x + change, {"d1": d, "d2": d1, "d3": d2}


def unipc_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """UniPC, multistep predictor-corrector, order 3, B(h) = h (Zhao et al. 2023): the corrector
    refines the previous step with this step's denoised image (no extra UNet call), then the
    predictor moves on; the weights are the plan's (engine.sampling.stages.unipc_coefficients)."""
    c, d2, d3 = state["coeffs"], state["denoised_2"], state["denoised_3"]

    def w(j: int) -> Tensor:
        return rows(c[:, j])

    corrected = w(0) * x + w(1) * state["last_sample"] + w(2) * denoised + w(3) * old_denoised + w(4) * d2 + w(5) * d3
    x_next = w(6) * corrected + w(7) * denoised + w(8) * old_denoised + w(9) * d2
    return x_next, {"last_sample": corrected, "denoised_2": old_denoised, "denoised_3": d2}


def euler_ancestral_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
    state: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Ancestral Euler (Crowson's k-diffusion, after Ho et al. 2020's ancestral sampling): Euler to
    sigma_down, then fresh noise up to sigma_next. The split depends on the sigmas only, so the plan
    carries it (engine.sampling.stages.euler_ancestral_plan): coeffs 0 is sigma_down - sigma, 1 is sigma_up."""
    assert noise is not None, "euler_a draws fresh noise every step"
    c = state["coeffs"]
    x = x + to_d(x, denoised, sigma) * rows(c[:, 0])
    return x + noise * rows(c[:, 1]), {}  # up is 0 on a row's last step, so no noise is left behind


def lcm_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
) -> Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023): jump to the denoised image, renoise to sigma_next."""
    assert noise is not None, "lcm draws fresh noise each step"
    return denoised + noise * rows(sigma_next)  # the plan gives zeros on the last step

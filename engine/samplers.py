"""Samplers: one denoising step each, as pure functions over per-row sigmas.

Why our own and not diffusers' schedulers: a diffusers scheduler object holds *one* timestep
index for the whole batch (``scheduler.step(model_output, t, sample)``), so every row must be at
the same step of the same schedule. Continuous batching across members needs the opposite: row 3
may be at step 2 of 30 with Euler a while row 4 is at step 17 of 20 with DPM++ 2M Karras. So,
after k-diffusion (Crowson), a sampler here is a function of the rows' own state only:

    step(x, denoised, sigma, sigma_next, *, old_denoised, old_sigma, noise) -> x_next

- ``x``, ``denoised``: ``[rows, C, H, W]``; ``denoised`` is the model's x0 for ``x`` at ``sigma``.
- ``sigma``, ``sigma_next``: ``[rows]``, each row's current and next noise level.
- ``old_denoised``, ``old_sigma``: each row's previous step (``old_sigma == 0`` on a row's
  first step), for multistep methods.
- ``noise``: standard normal ``[rows, C, H, W]`` drawn from each job's own generators, or
  ``None`` for samplers that are not ancestral.

The worker applies each sampler to the rows that use it, so rows of different jobs advance in
the same UNet call. A :class:`Sampler` in :data:`SAMPLERS` pairs a step with its discretization.

That is also why k-diffusion's own ``sample_*`` loops cannot be called here: each owns a whole
batch for a whole schedule and calls the model itself, where our rows of different jobs, at
different steps, share one UNet call per engine step. Its samplers are rewritten per row, and
``tests/test_kdiffusion_samplers.py`` checks each against its loop to float precision.

Samplers with more history (LMS, DPM++ 3M SDE) or two model evaluations per step (Heun, DPM2,
DPM2 a, DPM++ SDE) take one more argument, ``state``: a dict of per-row tensors that the batch
keeps with the rows, and return ``(x_next, updated state)`` (:class:`StagedStepFn`). A two-
evaluation step is two engine steps, laid out per job by its plan (engine.stages); the SDE
samplers' noise comes from each image's Brownian tree (engine.sde).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from engine.stages import (
    COEFFS,
    EVAL,
    FROM,
    MID,
    STAGE,
    TO,
    Plan,
    dpm2_ancestral_plan,
    dpm2_plan,
    dpmpp_sde_plan,
    heun_plan,
    lms_plan,
    one_stage_plan,
    unipc_plan,
)


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


def euler_ancestral_step(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    *,
    old_denoised: Tensor,
    old_sigma: Tensor,
    noise: Tensor | None,
) -> Tensor:
    """Ancestral Euler (Crowson's k-diffusion, after Ho et al. 2020's ancestral sampling)."""
    assert noise is not None, "euler_a draws fresh noise every step"
    down, up = ancestral_split(sigma, sigma_next)
    x = x + to_d(x, denoised, sigma) * rows(down - sigma)
    return x + noise * rows(up)  # up is 0 on a row's last step, so no noise is left behind


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
    # grid and start/end scaling are the schedule's (engine.schedules.ddim_sigmas, JobSchedule).
    eps = (x - denoised) / rows(sigma)
    return denoised + rows(sigma_next) * eps


# ---------------------------------------------------------------------------- samplers with state
# These take the rows' own ``state`` (a dict of per-row tensors: the plan's "sigma_from",
# "sigma_mid" and "stage" and "coeffs" columns for the row's current engine step, and the
# sampler's history, zeros on a row's first step) and return the next x and the updated history.
# A second-order step is two engine steps (engine.stages): stage 0 moves to a trial point, stage 1
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
    the coefficients are the plan's (engine.stages.lms_coefficients), zero for missing history."""
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
    predictor moves on; the weights are the plan's (engine.stages.unipc_coefficients)."""
    c, d2, d3 = state["coeffs"], state["denoised_2"], state["denoised_3"]

    def w(j: int) -> Tensor:
        return rows(c[:, j])

    corrected = w(0) * x + w(1) * state["last_sample"] + w(2) * denoised + w(3) * old_denoised + w(4) * d2 + w(5) * d3
    x_next = w(6) * corrected + w(7) * denoised + w(8) * old_denoised + w(9) * d2
    return x_next, {"last_sample": corrected, "denoised_2": old_denoised, "denoised_3": d2}


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


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Sampler:
    """A step function, the schedule it is run with by default, and what it needs per row."""

    name: str
    step: StepFn | StagedStepFn
    discretization: (
        str  # its "automatic" schedule: a key of engine.schedules' DISCRETIZATIONS, SCHEDULES or SAMPLER_OWN
    )
    ancestral: bool = False  # fresh noise from each image's generator, where its plan says
    brownian: bool = False  # fresh noise from each image's Brownian tree (engine.sde), where its plan says
    plan: Callable[[Tensor], Plan] = one_stage_plan
    latent_state: tuple[str, ...] = ()  # per-row history shaped like x (zeros at the start)
    row_state: tuple[str, ...] = ()  # per-row history, one number a row
    discard_penultimate: bool = False  # AUTOMATIC1111's discard_next_to_last_sigma
    stateful: bool = False  # ``step`` is a StagedStepFn: takes ``state=``, returns ``(x, updates)``

    @property
    def state(self) -> tuple[str, ...]:
        return self.latent_state + self.row_state


_EVERY_STEP = partial(one_stage_plan, noise="every")
_UNTIL_LAST = partial(one_stage_plan, noise="until_last")

SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler("euler", euler_step, "normal"),
    "euler_a": Sampler("euler_a", euler_ancestral_step, "normal", ancestral=True, plan=_EVERY_STEP),
    "dpmpp_2m_karras": Sampler("dpmpp_2m_karras", dpmpp_2m_step, "karras"),
    "ddim": Sampler("ddim", ddim_step, "ddim"),
    # AUTOMATIC1111's automatic schedule for each (modules/sd_samplers_kdiffusion.py).
    "dpmpp_2m": Sampler("dpmpp_2m", dpmpp_2m_step, "karras"),
    "dpmpp_2m_sde": Sampler(
        "dpmpp_2m_sde", dpmpp_2m_sde_step, "exponential", brownian=True, plan=_UNTIL_LAST, stateful=True
    ),
    "dpmpp_sde": Sampler(
        "dpmpp_sde",
        dpmpp_sde_step,
        "karras",
        brownian=True,
        plan=dpmpp_sde_plan,
        stateful=True,
        latent_state=("x_start", "denoised_start"),
    ),
    "dpmpp_3m_sde": Sampler(
        "dpmpp_3m_sde",
        dpmpp_3m_sde_step,
        "exponential",
        brownian=True,
        plan=_UNTIL_LAST,
        latent_state=("older_denoised",),
        row_state=("older_sigma",),
        discard_penultimate=True,
        stateful=True,
    ),
    "heun": Sampler("heun", heun_step, "normal", plan=heun_plan, latent_state=("x_start", "d_start"), stateful=True),
    "lms": Sampler("lms", lms_step, "normal", plan=lms_plan, latent_state=("d1", "d2", "d3"), stateful=True),
    "dpm2": Sampler(
        "dpm2", dpm2_step, "karras", plan=dpm2_plan, latent_state=("x_start",), discard_penultimate=True, stateful=True
    ),
    "dpm2_a": Sampler(
        "dpm2_a",
        dpm2_ancestral_step,
        "karras",
        ancestral=True,
        plan=dpm2_ancestral_plan,
        latent_state=("x_start",),
        discard_penultimate=True,
        stateful=True,
    ),
    "lcm": Sampler("lcm", lcm_step, "lcm", ancestral=True, plan=_UNTIL_LAST),
    "unipc": Sampler(
        "unipc",
        unipc_step,
        "normal",
        plan=unipc_plan,
        latent_state=("last_sample", "denoised_2", "denoised_3"),
        stateful=True,
    ),
}


def initial_state(sampler: Sampler, x: Tensor) -> dict[str, Tensor]:
    """A row's sampler history before its first step: zeros."""
    state = {name: torch.zeros_like(x) for name in sampler.latent_state}
    return state | {name: x.new_zeros(x.shape[0]) for name in sampler.row_state}


def plan_state(columns: Tensor) -> dict[str, Tensor]:
    """The plan's columns a stateful step reads, from the rows' ``[rows, COLUMNS]`` plan entries."""
    return {
        "sigma_from": columns[:, FROM],
        "sigma_mid": columns[:, MID],
        "stage": columns[:, STAGE],
        "coeffs": columns[:, COEFFS],
    }


def sample(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    sampler: Sampler,
    noise: Callable[[float, float], Tensor] | None = None,
) -> Tensor:
    """Run one sampler over a whole schedule (all rows at the same step): a reference loop.

    The batch (engine.batch) does the same per row; this is for tests and for reading what a step
    does. ``noise(sigma, sigma_next)``: fresh standard-normal noise for the rows over that interval.
    Returns the latents at the last sigma (``engine.schedules.latents_to_decode`` makes them
    what the VAE decodes).
    """
    plan = sampler.plan(sigmas)
    old_denoised, old_sigma = torch.zeros_like(x), x.new_zeros(x.shape[0])
    state = initial_state(sampler, x)
    for k in range(plan.engine_steps):
        columns = plan.table[k].to(x.device).expand(x.shape[0], -1)
        sigma, sigma_next = columns[:, EVAL].contiguous(), columns[:, TO].contiguous()
        denoised = denoiser(x, sigma)
        fresh = None
        if (sampler.ancestral or sampler.brownian) and noise is not None:
            fresh = noise(*plan.noise[k]) if plan.noise[k] is not None else torch.zeros_like(x)
        if sampler.stateful:
            x, updates = sampler.step(
                x,
                denoised,
                sigma,
                sigma_next,
                old_denoised=old_denoised,
                old_sigma=old_sigma,
                noise=fresh,
                state=state | plan_state(columns),
            )
            state = state | updates
        else:
            x = sampler.step(
                x, denoised, sigma, sigma_next, old_denoised=old_denoised, old_sigma=old_sigma, noise=fresh
            )
        old_denoised, old_sigma = denoised, sigma
    return x

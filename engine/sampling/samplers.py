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
evaluation step is two engine steps, laid out per job by its plan (engine.sampling.stages); the SDE
samplers' noise comes from each image's Brownian tree (engine.sampling.sde).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from engine.sampling.sampler_steps import (  # noqa: F401 - the steps, importable from here too
    StagedStepFn,
    StepFn,
    ancestral_split,
    ddim_step,
    dpm2_ancestral_step,
    dpm2_step,
    dpmpp_2m_sde_step,
    dpmpp_2m_step,
    dpmpp_3m_sde_step,
    dpmpp_sde_step,
    euler_ancestral_step,
    euler_step,
    heun_step,
    lcm_step,
    lms_step,
    rows,
    to_d,
    unipc_step,
)
from engine.sampling.stages import (
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
    euler_ancestral_plan,
    heun_plan,
    lms_plan,
    one_stage_plan,
    unipc_plan,
)

# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Sampler:
    """A step function, the schedule it is run with by default, and what it needs per row."""

    name: str
    step: StepFn | StagedStepFn
    discretization: (
        str  # its "automatic" schedule: a key of engine.sampling.schedules' DISCRETIZATIONS, SCHEDULES or SAMPLER_OWN
    )
    ancestral: bool = False  # fresh noise from each image's generator, where its plan says
    brownian: bool = False  # fresh noise from each image's Brownian tree (engine.sampling.sde), where its plan says
    plan: Callable[[Tensor], Plan] = one_stage_plan
    latent_state: tuple[str, ...] = ()  # per-row history shaped like x (zeros at the start)
    row_state: tuple[str, ...] = ()  # per-row history, one number a row
    discard_penultimate: bool = False  # AUTOMATIC1111's discard_next_to_last_sigma
    stateful: bool = False  # ``step`` is a StagedStepFn: takes ``state=``, returns ``(x, updates)``

    @property
    def state(self) -> tuple[str, ...]:
        return self.latent_state + self.row_state


_UNTIL_LAST = partial(one_stage_plan, noise="until_last")

SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler("euler", euler_step, "normal"),
    "euler_a": Sampler(
        "euler_a", euler_ancestral_step, "normal", ancestral=True, plan=euler_ancestral_plan, stateful=True
    ),
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

    The batch (engine.batching.batch) does the same per row; this is for tests and for reading what a step
    does. ``noise(sigma, sigma_next)``: fresh standard-normal noise for the rows over that interval.
    Returns the latents at the last sigma (``engine.sampling.schedules.latents_to_decode`` makes them
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

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor


class StepFn(Protocol):
    def __call__(self, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, *,
                 old_denoised: Tensor, old_sigma: Tensor, noise: Tensor | None) -> Tensor: ...


def rows(sigma: Tensor) -> Tensor:
    """``[rows]`` -> ``[rows, 1, 1, 1]``, to scale whole latents per row."""
    return sigma.view(-1, 1, 1, 1)


def to_d(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """The probability-flow ODE's derivative dx/dsigma (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / rows(sigma)


def euler_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, *,
               old_denoised: Tensor, old_sigma: Tensor, noise: Tensor | None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    return x + to_d(x, denoised, sigma) * rows(sigma_next - sigma)


def ancestral_split(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """Split the move to sigma_next into a deterministic part (down) and fresh noise (up), eta 1."""
    up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).clamp_min(0).sqrt()
    up = torch.minimum(up, sigma_next)
    down = (sigma_next**2 - up**2).clamp_min(0).sqrt()
    return down, up


def euler_ancestral_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, *,
                         old_denoised: Tensor, old_sigma: Tensor, noise: Tensor | None) -> Tensor:
    """Ancestral Euler (Crowson's k-diffusion, after Ho et al. 2020's ancestral sampling)."""
    assert noise is not None, "euler_a draws fresh noise every step"
    down, up = ancestral_split(sigma, sigma_next)
    x = x + to_d(x, denoised, sigma) * rows(down - sigma)
    return x + noise * rows(up)  # up is 0 on a row's last step, so no noise is left behind


def dpmpp_2m_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, *,
                  old_denoised: Tensor, old_sigma: Tensor, noise: Tensor | None) -> Tensor:
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


def ddim_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, *,
              old_denoised: Tensor, old_sigma: Tensor, noise: Tensor | None) -> Tensor:
    """DDIM with eta 0 (Song et al. 2021, eq. 12), written in sigma-scaled latents."""
    # In k-diffusion's variables x_t / sqrt(alpha_t) the DDIM update keeps the predicted noise
    # and swaps the noise level: x_prev = x0 + sigma_prev * eps. This is A1111's update
    # (sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev) * e_t) divided by sqrt(a_prev); its timestep
    # grid and start/end scaling are the schedule's (engine.schedules.ddim_sigmas, JobSchedule).
    eps = (x - denoised) / rows(sigma)
    return denoised + rows(sigma_next) * eps


@dataclass(frozen=True)
class Sampler:
    """A step function and the discretization of sigmas it is run with."""

    name: str
    step: StepFn
    discretization: str  # a key of engine.schedules.DISCRETIZATIONS
    ancestral: bool = False  # needs fresh noise each step


SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler("euler", euler_step, "normal"),
    "euler_a": Sampler("euler_a", euler_ancestral_step, "normal", ancestral=True),
    "dpmpp_2m_karras": Sampler("dpmpp_2m_karras", dpmpp_2m_step, "karras"),
    "ddim": Sampler("ddim", ddim_step, "ddim"),
}


def sample(denoiser: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor, sampler: Sampler,
           noise: Callable[[], Tensor] | None = None) -> Tensor:
    """Run one sampler over a whole schedule (all rows at the same step): a reference loop.

    The worker does the same per row; this is for tests and for reading what a step does.
    Returns the latents at the last sigma (``engine.schedules.latents_to_decode`` makes them
    what the VAE decodes).
    """
    old_denoised, old_sigma = torch.zeros_like(x), x.new_zeros(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma = x.new_full((x.shape[0],), float(sigmas[i]))
        sigma_next = x.new_full((x.shape[0],), float(sigmas[i + 1]))
        denoised = denoiser(x, sigma)
        fresh = noise() if sampler.ancestral and noise is not None else None
        x = sampler.step(x, denoised, sigma, sigma_next, old_denoised=old_denoised, old_sigma=old_sigma, noise=fresh)
        old_denoised, old_sigma = denoised, sigma
    return x

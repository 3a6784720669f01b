"""The rectified-flow noise model of Stable Diffusion 3.5 and Flux.1 (flow matching).

A latent at noise level ``sigma`` (0 to 1) is ``x = (1 - sigma) * x0 + sigma * noise``, and the
network predicts the velocity ``v = noise - x0``. This is ComfyUI's ``model_sampling`` CONST; we
follow it, and diffusers' ``FlowMatchEulerDiscreteScheduler`` for the sigmas, so that our samplers
stay the pure functions of :mod:`engine.sampling.sampler_steps`:

- the denoiser returns ``x0 = x - sigma * v`` (its input is not scaled: ``c_in = 1``);
- then ``(x - x0) / sigma = v``, so Euler's step ``x + (sigma_next - sigma) * d`` is exactly
  diffusers' flow-match Euler step, and Heun, DPM2 and LMS integrate the same ODE in sigma;
- DPM++ 2M runs its k-diffusion formula on these sigmas, as ComfyUI runs it on Flux;
- the ancestral and SDE samplers re-noise the VE way (``x0 + sigma * noise``), which is wrong here:
  ComfyUI has ``_RF`` variants for them. We have not written those yet, so a flow model refuses
  them by name (:data:`engine.families.FLOW_SAMPLERS`), and DDIM and LCM, which walk the UNet's 1000 training
  levels, too.

The schedule is diffusers' (each pipeline calls its scheduler its own way):

- Flux (:func:`flux_sigmas`): ``linspace(1, 1/steps, steps)``, shifted by ``mu`` from the image's
  token count when the scheduler uses dynamic shifting (dev), or by the static shift (schnell: 1);
- SD 3.5 (:func:`sd3_sigmas`): the scheduler's own ``set_timesteps(steps)``: evenly spaced from its
  largest to its smallest training sigma, each already shifted, and then shifted once more, as
  diffusers does;
- then sigma 0. img2img takes the tail of that schedule as for every model (AUTOMATIC1111's
  ``int(strength * steps) + 1`` steps), and noises the image to its first sigma the flow way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from engine.sampling.schedules import img2img_tail


@dataclass(frozen=True)
class FlowShift:
    """The scheduler config's shift: static, or dynamic from the image's token count (``mu``)."""

    shift: float = 1.0
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    num_train_timesteps: int = 1000

    @classmethod
    def from_config(cls, config: dict) -> FlowShift:
        return cls(
            shift=float(config.get("shift", 1.0)),
            dynamic=bool(config.get("use_dynamic_shifting", False)),
            base_shift=float(config.get("base_shift") or 0.5),
            max_shift=float(config.get("max_shift") or 1.15),
            base_seq_len=int(config.get("base_image_seq_len", 256)),
            max_seq_len=int(config.get("max_image_seq_len", 4096)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )

    def mu(self, image_tokens: int) -> float:
        """diffusers' ``calculate_shift``: linear in the token count between the base and max shifts."""
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return image_tokens * m + (self.base_shift - m * self.base_seq_len)

    def apply(self, sigmas: np.ndarray, image_tokens: int) -> np.ndarray:
        """Shift sigmas toward the noisy end (float32, in diffusers' order of operations)."""
        if self.dynamic:
            mu = self.mu(image_tokens)
            return (math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)).astype(np.float32)
        return (self.shift * sigmas / (1 + (self.shift - 1) * sigmas)).astype(np.float32)


def _with_zero(sigmas: np.ndarray) -> Tensor:
    return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)]).double()


def flux_sigmas(shift: FlowShift, steps: int, image_tokens: int) -> Tensor:
    """FluxPipeline's sigmas for ``steps``, then 0 (float64 of float32 values)."""
    # diffusers casts the pipeline's sigmas to float32 before it shifts them.
    return _with_zero(shift.apply(np.linspace(1.0, 1 / steps, steps).astype(np.float32), image_tokens))


def sd3_sigmas(shift: FlowShift, steps: int, image_tokens: int) -> Tensor:
    """StableDiffusion3Pipeline's sigmas for ``steps`` (the scheduler's ``set_timesteps``), then 0."""
    train = shift.num_train_timesteps
    levels = np.linspace(1, train, train, dtype=np.float32)[::-1].copy() / train
    if not shift.dynamic:  # the scheduler shifts its training levels once at construction
        levels = shift.shift * levels / (1 + (shift.shift - 1) * levels)
    largest, smallest = float(levels[0]) * train, float(levels[-1]) * train
    sigmas = np.linspace(largest, smallest, steps) / train
    return _with_zero(shift.apply(sigmas, image_tokens))


@dataclass(frozen=True)
class FlowSchedule:
    """One job's sigmas on a flow model, and how its first latents are made."""

    sigmas: Tensor  # float64 on the CPU, down to 0

    @property
    def noise_sigma(self) -> float:
        return float(self.sigmas[0])

    def start_latents(self, noise: Tensor, init: Tensor | None = None) -> Tensor:
        """``noise`` at sigma 1 (txt2img), or the init image noised to the first sigma."""
        return flow_noised(init, noise, self.noise_sigma)


def flow_noised(init: Tensor | None, noise: Tensor, sigma: float) -> Tensor:
    """diffusers' ``scale_noise``: ``sigma * noise + (1 - sigma) * init``."""
    if init is None:
        return noise * sigma
    return sigma * noise + (1.0 - sigma) * init


@dataclass(frozen=True)
class FlowNoise:
    """A flow family's noise model: the sigmas a job walks and what the network is given."""

    shift: FlowShift
    make_sigmas: object  # flux_sigmas or sd3_sigmas
    #: The network's timestep for a sigma (sigma * 1000: both pipelines make their timesteps so;
    #: Flux's denoiser divides by 1000 again, as FluxPipeline does).
    time_scale: float = 1000.0
    latent_scale: int = 8  # pixels per latent cell
    patch: int = 1  # latent cells per token side (Flux packs 2x2)

    def job_schedule(
        self, sampler, steps: int, strength: float | None, *, schedule_type: str, width: int, height: int
    ) -> FlowSchedule:
        """The family's own sigmas for the image's size (every flow sampler walks the same ones, and
        ``schedule_type`` is "automatic": checked before, FLOW_SCHEDULES)."""
        tokens = (height // (self.latent_scale * self.patch)) * (width // (self.latent_scale * self.patch))
        sigmas = self.make_sigmas(self.shift, steps, tokens)
        return FlowSchedule(img2img_tail(sigmas, steps, strength))

    def timesteps(self, sigma: Tensor) -> Tensor:
        """The network's timestep for each sigma, on the CPU (for the batch's tables)."""
        return (sigma.float().cpu() * self.time_scale).float()

    @staticmethod
    def input_scale(sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

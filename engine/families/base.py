"""What a model family provides to the engine: the seam every family plugs into.

A family (SD 1.x/2.x/XL, SD 3.5, Flux.1...) gives :func:`engine.families.runtime.family_parts`
one :class:`FamilyParts` for a loaded model, and :class:`engine.pipeline.Pipeline` reads only
these:

- a :class:`NoiseModel`: the sigmas a job walks for its sampler, schedule type, steps, size and
  img2img strength, and how its first latents are made from noise (and an init image);
- a denoiser, ``denoiser(x, sigma, cond) -> x0`` over a batch of rows, that also tells the batch
  each sigma's network timestep and input scale (made once per job into the batch's tables), and
  can be compiled (``engine.compile``);
- a prompt encoder whose ``conditioning(prompt, negative, rows=, guidance=, width=, height=,
  clip_skip=)`` gives one job's rows of conditioning, with a ``cat`` that joins jobs' rows (its
  guidance: CFG pairs, a distilled value per row, or none, is the family's own business);
- its latent channels (the VAE's) and the channels its network takes in (more for an
  inpainting UNet);
- ``FamilyParts.refusal(params)``: why a job asks something the family cannot do, in one line.

The family's traits that the bot needs without torch (pixel grid, samplers, defaults) are in
:mod:`engine.families` (``FAMILIES``). A new family adds its module here and one entry in
``runtime.FAMILY_PARTS`` and ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from engine.families import FamilyTraits
from engine.params import GenerationParams


class JobSchedule(Protocol):
    """One job's sigmas and its start latents (engine.sampling.schedules.JobSchedule,
    engine.families.flow.FlowSchedule)."""

    sigmas: Tensor

    def start_latents(self, noise: Tensor, init: Tensor | None = None) -> Tensor: ...


class NoiseModel(Protocol):
    def job_schedule(
        self,
        sampler: Any,
        steps: int,
        strength: float | None,
        *,
        schedule_type: str,
        width: int,
        height: int,
    ) -> JobSchedule: ...


@dataclass(frozen=True)
class FamilyParts:
    """A loaded model's family pieces (see the module doc)."""

    traits: FamilyTraits
    noise: NoiseModel
    denoiser: Any
    prompts: Any
    latent_channels: int  # the VAE's
    network_channels: int  # what the denoising network takes in (9 for an inpainting UNet)
    #: Why this family cannot run a job as asked, or None (the SD families refuse nothing here:
    #: every option applies to them).
    refusal: Callable[[GenerationParams], str | None] = lambda params: None

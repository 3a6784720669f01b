"""The Stable Diffusion 1.x, 2.x and XL family: a UNet over 4-channel latents, the variance-
preserving discrete noise model of its 1000 training levels (epsilon or v prediction), CLIP
encoders with AUTOMATIC1111's prompt syntax, and classifier-free guidance in row pairs.

Its pieces are :class:`engine.families.sd.denoiser.Denoiser` and :class:`engine.families.sd.denoiser.PromptEncoder` (the
network and the prompts), and :mod:`engine.sampling.schedules` (the sigmas, in k-diffusion's variables,
and AUTOMATIC1111's DDIM grid), which :class:`DiscreteNoise` puts behind the family seam.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.families import FAMILIES
from engine.families.base import FamilyParts
from engine.families.sd.denoiser import Denoiser, PromptEncoder
from engine.features.instruct_edit import INSTRUCT_CHANNELS, InstructDenoiser
from engine.sampling.schedules import JobSchedule, ModelSchedule, job_schedule


@dataclass(frozen=True)
class DiscreteNoise:
    """The SD families' noise model: ``x = x0 + sigma * noise`` over the training levels."""

    schedule: ModelSchedule

    def job_schedule(
        self, sampler, steps: int, strength: float | None, *, schedule_type: str, width: int, height: int
    ) -> JobSchedule:
        return job_schedule(
            self.schedule,
            sampler.discretization,
            steps,
            strength,
            schedule_type=schedule_type,
            discard_penultimate=sampler.discard_penultimate,
        )


def sd_parts(model) -> FamilyParts:
    schedule = ModelSchedule(model.alphas_cumprod)
    return FamilyParts(
        traits=FAMILIES[model.info.family],
        noise=DiscreteNoise(schedule),
        denoiser=(InstructDenoiser if model.unet.config.in_channels == INSTRUCT_CHANNELS else Denoiser)(
            model.unet, schedule, model.info.prediction_type
        ),
        prompts=PromptEncoder(
            model.text_encoders, model.tokenizers, model.device, model.dtype, embeddings_dir=model.embeddings_dir
        ),
        # An inpainting UNet takes 9 channels in (latents, mask, masked image) and gives 4 out.
        latent_channels=model.unet.config.out_channels,
        network_channels=model.unet.config.in_channels,
    )

"""The one registration of a family's pieces: a loaded model -> :class:`FamilyParts`.

:class:`engine.pipeline.Pipeline` asks here for a model's noise model, denoiser and prompt
encoder, and checks each job with :meth:`FamilyParts.refusal` before any work, so that an option
that does not apply to the model is refused in one line, never silently ignored.
"""

from __future__ import annotations

from engine.families import FAMILIES, FamilyTraits
from engine.families.base import FamilyParts
from engine.families.flux import FluxDenoiser, FluxPrompts, flux_noise
from engine.families.sd.parts import sd_parts
from engine.families.sd3 import SD3Denoiser, SD3Prompts, sd3_noise
from engine.params import GenerationParams


def flux_parts(model) -> FamilyParts:
    noise = flux_noise(model.scheduler_config, model.info.latent_scale)
    prompts = FluxPrompts(model.text_encoders, model.tokenizers, model.device, model.dtype)
    return _flow_parts(model, noise, FluxDenoiser(model.unet, noise), prompts)


def sd3_parts(model) -> FamilyParts:
    noise = sd3_noise(model.scheduler_config, model.info.latent_scale, model.unet.config.patch_size)
    joint_width = model.unet.config.joint_attention_dim
    prompts = SD3Prompts(model.text_encoders, model.tokenizers, model.device, model.dtype, joint_width)
    return _flow_parts(model, noise, SD3Denoiser(model.unet, noise), prompts)


def _flow_parts(model, noise, denoiser, prompts) -> FamilyParts:
    traits = FAMILIES[model.info.family]
    channels = model.vae.config.latent_channels
    return FamilyParts(traits, noise, denoiser, prompts, channels, channels, lambda p: flow_refusal(traits, p))


#: Family name -> its pieces for a loaded model of it.
FAMILY_PARTS = {"sd1": sd_parts, "sd2": sd_parts, "sdxl": sd_parts, "sd3": sd3_parts, "flux": flux_parts}


def family_parts(model) -> FamilyParts:
    return FAMILY_PARTS[model.info.family](model)


def flow_refusal(traits: FamilyTraits, params: GenerationParams) -> str | None:
    """Why a flow model cannot run this job as asked (one line that says what to do), or None."""
    label = traits.label
    if params.control_units:
        return f"ControlNet units apply to SD 1.x and SDXL models, not to {label} ones; pick such a model."
    if traits.samplers is not None and params.sampler not in traits.samplers:
        return (
            f"{label} models cannot use the {params.sampler} sampler (it re-noises the way SD models do); "
            f"pick one of {', '.join(traits.samplers)}."
        )
    if traits.schedules is not None and params.schedule not in traits.schedules:
        return f"{label} models walk their own schedule; leave the schedule type on automatic."
    if params.clip_skip > 1 and not traits.clip_skip:
        return f"CLIP skip does not apply to {label} models (their prompts are read by T5 too); leave it at 1."
    if params.negative_prompt.strip() and not traits.negative_prompt:
        return f"{label} models take no negative prompt (they are not guided by one); leave it out."
    return None

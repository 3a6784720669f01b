"""The flow families' pieces for a loaded model, and what a job may not ask of them.

:class:`engine.pipeline.Pipeline` asks here for a flow model's noise model, denoiser and prompt
encoder (the SD families' are :mod:`engine.denoiser` and :mod:`engine.schedules`), and checks a
job with :func:`flow_refusal` before any work, so that an option that does not apply to the
model is refused in one line, never silently ignored.
"""

from __future__ import annotations

from engine.families import FamilyTraits
from engine.families.flux import FluxDenoiser, FluxPrompts, flux_noise
from engine.families.sd3 import SD3Denoiser, SD3Prompts, sd3_noise
from engine.params import GenerationParams
from engine.prompt_syntax import lora_key

FLOW_NOISES = {"flux": flux_noise, "sd3": sd3_noise}


def flow_denoiser_and_prompts(model, noise):
    """``(denoiser, prompt encoder)`` for a loaded Flux or SD 3.5 model."""
    family = model.info.family
    if family == "flux":
        prompts = FluxPrompts(model.text_encoders, model.tokenizers, model.device, model.dtype)
        return FluxDenoiser(model.unet, noise), prompts
    prompts = SD3Prompts(
        model.text_encoders, model.tokenizers, model.device, model.dtype, model.unet.config.joint_attention_dim
    )
    return SD3Denoiser(model.unet, noise), prompts


def flow_refusal(traits: FamilyTraits, params: GenerationParams) -> str | None:
    """Why a flow model cannot run this job as asked (one line that says what to do), or None."""
    label = traits.label
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
    if lora_key(params.prompt):
        return f"LoRAs are not available on {label} models yet; take the <lora:...> tags out of the prompt."
    if params.is_hires:
        return f"The hires fix is not available on {label} models yet; leave hires at 1."
    return None

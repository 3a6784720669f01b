"""Model families: what is particular to SD 1.x/2.x/XL, SD 3.5 and Flux.1, and what they share.

This module is torch-free, so the bot's process can read a family's traits (its pixel grid,
guidance, samplers and defaults) without loading torch. The pieces that run the network live
beside it: :mod:`engine.families.flow` (the rectified-flow noise model and schedules),
:mod:`engine.families.flux` and :mod:`engine.families.sd3` (prompt encoders and denoisers). The
SD families' pieces are still :mod:`engine.families.sd.denoiser` and :mod:`engine.sampling.schedules` (see the README,
"Adding a model family", for what is left to move).
"""

from __future__ import annotations

from dataclasses import dataclass

#: How a family is guided: "cfg" (a prompt and a negative-prompt row per image, mixed per row),
#: "distilled" (one row per image, the guidance scale is an input of the network: Flux dev),
#: "none" (one row, no scale: Flux schnell).
GUIDANCE_KINDS = ("cfg", "distilled", "none")


@dataclass(frozen=True)
class FamilyTraits:
    """What the rest of the program may know about a family, without torch."""

    name: str
    label: str  # for people: "SD 1.x", "Flux.1"
    pixel_multiple: int  # sizes are multiples of this (8; 16 where latents are packed 2x2)
    flow: bool = False  # a rectified-flow model (engine.families.flow)
    #: Samplers the family can run (None: all of engine.params.SAMPLER_NAMES).
    samplers: tuple[str, ...] | None = None
    #: Schedule types it can run (None: all of engine.params.SCHEDULE_NAMES).
    schedules: tuple[str, ...] | None = None
    negative_prompt: bool = True  # whether a negative prompt has any effect
    clip_skip: bool = True  # whether CLIP skip applies (A1111's, on the CLIP encoders)
    default_steps: int | None = None  # None: generation.default_steps
    default_guidance: float | None = None  # None: generation.default_guidance
    default_sampler: str | None = None  # None: generation.default_sampler


FLOW_SAMPLERS = ("euler", "heun", "lms", "dpm2", "dpmpp_2m")
FLOW_SCHEDULES = ("automatic",)

FAMILIES: dict[str, FamilyTraits] = {
    "sd1": FamilyTraits("sd1", "SD 1.x", 8),
    "sd2": FamilyTraits("sd2", "SD 2.x", 8),
    "sdxl": FamilyTraits("sdxl", "SDXL", 8),
    "sd3": FamilyTraits(
        "sd3",
        "SD 3.5",
        16,
        flow=True,
        samplers=FLOW_SAMPLERS,
        schedules=FLOW_SCHEDULES,
        clip_skip=False,
        default_steps=28,
        default_guidance=4.5,
        default_sampler="euler",
    ),
    "flux": FamilyTraits(
        "flux",
        "Flux.1",
        16,
        flow=True,
        samplers=FLOW_SAMPLERS,
        schedules=FLOW_SCHEDULES,
        negative_prompt=False,
        clip_skip=False,
        default_steps=28,
        default_guidance=3.5,
        default_sampler="euler",
    ),
}


def traits(family: str) -> FamilyTraits:
    return FAMILIES[family]


def guidance_kind(family: str, guidance_embeds: bool = True) -> str:
    """How a loaded model of ``family`` is guided (Flux schnell has no guidance embedding)."""
    if family == "flux":
        return "distilled" if guidance_embeds else "none"
    return "cfg"

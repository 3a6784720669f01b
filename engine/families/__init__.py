"""Model families: what is particular to SD 1.x/2.x/XL, SD 3.5 and Flux.1, and what they share.

This module is torch-free, so the bot's process can read a family's traits (its pixel grid,
guidance, samplers, defaults) without loading torch. :data:`FAMILIES` is where a family's facts
are registered, and :data:`engine.families.runtime.FAMILY_PARTS` its pieces: the loaders, the
torch-free detection, the previews, the configuration and the bot read them from these two. The
pieces live beside this module: ``base.py`` (the seam), ``sd/`` (SD 1.x/2.x/XL: the UNet's
denoiser, CLIP prompts with A1111's syntax; their noise model wraps
:mod:`engine.sampling.schedules`, which the samplers share), ``sd3.py``, ``flux.py`` and
``flow*.py`` (the rectified-flow families).
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
    #: diffusers pipeline classes whose saved folders (``model_index.json``) hold this family.
    pipelines: tuple[str, ...] = ()
    #: Latent channel -> RGB factors of the cheap progress preview, and their bias (engine.preview).
    preview_factors: tuple[tuple[float, float, float], ...] = ()
    preview_bias: tuple[float, float, float] | None = None


FLOW_SAMPLERS = ("euler", "heun", "lms", "dpm2", "dpmpp_2m")

# Latent -> RGB previews, fitted by the community (SD1/SD2 and SDXL as AUTOMATIC1111 has them; SD
# 3.5's and Flux's 16 channels as ComfyUI's latent_formats, in the scaled latents' space).
SD_PREVIEW = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL_PREVIEW = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SD3_PREVIEW = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)
FLUX_PREVIEW = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLOW_SCHEDULES = ("automatic",)

FAMILIES: dict[str, FamilyTraits] = {
    "sd1": FamilyTraits(
        "sd1",
        "SD 1.x",
        8,
        pipelines=("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"),
        preview_factors=SD_PREVIEW,
    ),
    # A saved SD 2.x pipeline is a StableDiffusionPipeline too: told by its text encoder (detect.py).
    "sd2": FamilyTraits("sd2", "SD 2.x", 8, preview_factors=SD_PREVIEW),
    "sdxl": FamilyTraits(
        "sdxl",
        "SDXL",
        8,
        pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"),
        preview_factors=SDXL_PREVIEW,
        preview_bias=(0.1084, -0.0175, -0.0011),
    ),
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
        pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
        preview_factors=SD3_PREVIEW,
        preview_bias=(0.2394, 0.2135, 0.1925),
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
        pipelines=("FluxPipeline", "FluxImg2ImgPipeline"),
        preview_factors=FLUX_PREVIEW,
        preview_bias=(-0.0329, -0.0718, -0.0851),
    ),
}


def traits(family: str) -> FamilyTraits:
    return FAMILIES[family]


def family_of_pipeline(class_name: str) -> str | None:
    """The family a saved diffusers pipeline of this class holds (SD 2.x reads as SD 1.x here)."""
    return next((t.name for t in FAMILIES.values() if class_name in t.pipelines), None)


def guidance_kind(family: str, guidance_embeds: bool = True) -> str:
    """How a loaded model of ``family`` is guided (Flux schnell has no guidance embedding)."""
    if family == "flux":
        return "distilled" if guidance_embeds else "none"
    return "cfg"

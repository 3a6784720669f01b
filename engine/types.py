"""The engine's whole public API: what goes in, what comes out.

Everything outside ``engine/`` talks to the engine in these types only. They are plain
dataclasses so that the queue glue can build them from database rows and the bot can render
them without touching torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from engine.params import SAMPLER_NAMES, GenerationParams

__all__ = [
    "SAMPLER_NAMES",
    "Family",
    "GeneratedImage",
    "GenerationParams",
    "GenerationRequest",
    "GenerationResult",
    "ModelInfo",
    "Progress",
]

Family = Literal["sd1", "sd2", "sdxl", "sd3", "flux"]


@dataclass(frozen=True)
class GenerationRequest:
    """One job as the engine sees it: its id and its parameters (checked at the Discord boundary)."""

    job_id: int
    params: GenerationParams
    #: The job this one was made from (a reroll, variation, upscale or edit of it), for the PNG.
    parent_id: int | None = None

    @classmethod
    def of(cls, job_id: int, **params: Any) -> GenerationRequest:
        """``GenerationRequest.of(3, prompt="a fox", seed=1, steps=4)``: for tools and tests."""
        return cls(job_id, GenerationParams(**params))

    @property
    def is_img2img(self) -> bool:
        return self.params.is_img2img


@dataclass(frozen=True)
class Progress:
    """Sent to the event loop after each denoising step of a job."""

    job_id: int
    step: int
    total: int
    #: A small PNG decoded cheaply from the latents (no VAE), or None when not asked for.
    preview: bytes | None = None


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes  # PNG with the AUTOMATIC1111 ``parameters`` text chunk and our ``job_id``
    seed: int


@dataclass(frozen=True)
class GenerationResult:
    job_id: int
    images: list[GeneratedImage]
    #: AUTOMATIC1111 infotext of the first image (what the ``parameters`` chunk holds).
    infotext: str
    seconds: float = 0.0


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the program may know about the loaded checkpoint."""

    name: str
    family: Family
    prediction_type: str  # "epsilon" or "v_prediction"; "flow" for SD 3.5 and Flux
    default_size: int  # 512 for SD1, 768 for SD2-v, 1024 for SDXL
    latent_scale: int  # pixels per latent cell (8 for real checkpoints)
    #: AUTOMATIC1111's short hash of a single-file checkpoint (``engine.hashes``); None for a
    #: diffusers folder or a hub id, which have no one file to hash.
    file_hash: str | None = None
    #: An inpainting checkpoint (9-channel UNet): best for masked jobs, and runs every other job too.
    inpainting: bool = False
    #: How it is guided (engine.families.GUIDANCE_KINDS): "cfg", "distilled" (Flux dev), "none" (schnell).
    guidance: str = "cfg"
    extra: dict = field(default_factory=dict)

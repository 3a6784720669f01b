"""The engine's whole public API: what goes in, what comes out.

Everything outside ``engine/`` talks to the engine in these types only. They are plain
dataclasses so that the queue glue can build them from database rows and the bot can render
them without touching torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: Sampler ids we accept, mapped to the names AUTOMATIC1111 writes in its infotext.
SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
}

Family = Literal["sd1", "sd2", "sdxl"]


@dataclass(frozen=True)
class GenerationRequest:
    """One job as the engine sees it. Inputs are already checked at the Discord boundary.

    ``count`` images are made with seeds ``seed, seed + 1, ...`` (as AUTOMATIC1111 does).
    ``init_image`` (encoded PNG/JPEG/WebP bytes) turns the job into img2img with ``strength``.
    ``variation_seed``/``variation_strength`` mix the initial noise of ``seed`` with that of
    ``variation_seed`` (AUTOMATIC1111's "variation seed", slerp of the two noises).
    ``<lora:NAME:WEIGHT>`` tags in ``prompt`` apply LoRA files (:mod:`engine.lora`).
    """

    job_id: int
    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = "euler_a"
    count: int = 1
    init_image: bytes | None = None
    strength: float = 0.75
    variation_seed: int | None = None
    variation_strength: float = 0.0
    #: The configured model's name (``[models.<name>]``, or the default's display name); None: the default.
    model: str | None = None

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None


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
    prediction_type: str  # "epsilon" or "v_prediction"
    default_size: int  # 512 for SD1, 768 for SD2-v, 1024 for SDXL
    latent_scale: int  # pixels per latent cell (8 for real checkpoints)
    extra: dict = field(default_factory=dict)

"""New jobs made from old ones: reroll, variation, upscale and edit.

Each function takes the stored parent job and returns the fields of the new job for
``Queue.enqueue`` (without who asked and where: the caller adds those). Pure, apart from
drawing random seeds.
"""

from __future__ import annotations

import secrets
from typing import Any

from bot.inputs import enlarge
from db.models import Job, JobKind, ResultImage
from engine.settings import GenerationSettings

#: Variation strengths for the two "Vary" buttons, as AUTOMATIC1111's variation seed slider.
VARIATION_STRENGTH = {"subtle": 0.15, "strong": 0.5}
#: Grid V1-V4 buttons make clearly different siblings of the chosen image.
GRID_VARIATION = "strong"
#: Upscale: 2x with Lanczos, then an img2img pass at this strength adds detail ("hires fix").
UPSCALE_FACTOR = 2.0
UPSCALE_STRENGTH = 0.4

SEED_MAX = 2**32 - 1


def new_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def _copy(parent: Job) -> dict[str, Any]:
    """The generation parameters of ``parent``: what a reroll replays."""
    return dict(
        prompt=parent.prompt, negative_prompt=parent.negative_prompt, seed=parent.seed,
        steps=parent.steps, guidance=parent.guidance, width=parent.width, height=parent.height,
        sampler=parent.sampler, count=parent.count, strength=parent.strength,
        init_image=parent.init_image, variation_seed=None, variation_strength=0.0,
        model=parent.model, parent_id=parent.id,
    )


def reroll(parent: Job) -> dict[str, Any]:
    """Same parameters, new seed."""
    return _copy(parent) | dict(kind=JobKind.reroll, seed=new_seed())


def variation(parent: Job, image_seed: int, level: str) -> dict[str, Any]:
    """Noise mixed from the chosen image's seed and a new one (AUTOMATIC1111's variation seed)."""
    return _copy(parent) | dict(kind=JobKind.variation, seed=image_seed, variation_seed=new_seed(),
                                variation_strength=VARIATION_STRENGTH[level])


def upscale(parent: Job, image: ResultImage, gen: GenerationSettings) -> dict[str, Any] | None:
    """2x of one image by img2img over its enlargement; None when it is already the largest size."""
    big = enlarge(image.png, factor=UPSCALE_FACTOR, max_width=gen.max_width, max_height=gen.max_height)
    if big is None:
        return None
    return _copy(parent) | dict(kind=JobKind.upscale, seed=image.seed, count=1, width=big.width,
                                height=big.height, init_image=big.png, strength=UPSCALE_STRENGTH)


def edit(parent: Job, prompt: str, negative_prompt: str) -> dict[str, Any]:
    """New prompts, same seed and settings, so the change shows the effect of the words."""
    return _copy(parent) | dict(kind=JobKind.edit, prompt=prompt, negative_prompt=negative_prompt)

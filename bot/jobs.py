"""New jobs made from old ones: reroll, variation, upscale and edit.

Each function takes the stored parent job and returns a :class:`NewJob` (its kind, parameters
and parent) for the service to admit and queue for whoever asked. Pure, apart from drawing
random seeds and, for an upscale, resizing the image (call that one off the event loop).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from bot.inputs import enlarge
from db.models import Job, JobKind, ResultImage
from engine.params import SEED_MAX, GenerationParams, params_from_job
from engine.settings import GenerationSettings

#: Variation strengths for the two "Vary" buttons, as AUTOMATIC1111's variation seed slider.
VARIATION_STRENGTH = {"subtle": 0.15, "strong": 0.5}
#: Grid V1-V4 buttons make clearly different siblings of the chosen image.
GRID_VARIATION = "strong"
#: Upscale: 2x with Lanczos, then an img2img pass at this strength adds detail ("hires fix").
UPSCALE_FACTOR = 2.0
UPSCALE_STRENGTH = 0.4


@dataclass(frozen=True)
class NewJob:
    """A job to queue: what kind, with which parameters, made from which job (None: a command)."""

    kind: JobKind
    params: GenerationParams
    parent_id: int | None = None


def new_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def _replay(parent: Job) -> GenerationParams:
    """What a reroll replays: the parent's parameters, without its variation."""
    return params_from_job(parent).but(variation_seed=None, variation_strength=0.0)


def reroll(parent: Job) -> NewJob:
    """Same parameters, new seed."""
    return NewJob(JobKind.reroll, _replay(parent).but(seed=new_seed()), parent.id)


def variation(parent: Job, image_seed: int, level: str) -> NewJob:
    """Noise mixed from the chosen image's seed and a new one (AUTOMATIC1111's variation seed)."""
    params = _replay(parent).but(seed=image_seed, variation_seed=new_seed(),
                                 variation_strength=VARIATION_STRENGTH[level])
    return NewJob(JobKind.variation, params, parent.id)


def upscale(parent: Job, image: ResultImage, gen: GenerationSettings) -> NewJob | None:
    """2x of one image by img2img over its enlargement; None when it is already the largest size.
    Decodes, resizes and encodes a PNG (about half a second): run it in a thread."""
    big = enlarge(image.png, factor=UPSCALE_FACTOR, max_width=gen.max_width, max_height=gen.max_height)
    if big is None:
        return None
    params = _replay(parent).but(seed=image.seed, count=1, width=big.width, height=big.height,
                                 init_image=big.png, strength=UPSCALE_STRENGTH)
    return NewJob(JobKind.upscale, params, parent.id)


def edit(parent: Job, prompt: str, negative_prompt: str) -> NewJob:
    """New prompts, same seed and settings, so the change shows the effect of the words."""
    return NewJob(JobKind.edit, _replay(parent).but(prompt=prompt, negative_prompt=negative_prompt), parent.id)

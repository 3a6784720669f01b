"""Jobs with an upscaler (``GenerationParams.upscaler``): the U buttons' Subtle and Creative.

Both enlarge the job's init image with its upscaler to the job's size on the engine's thread
(:func:`upscaled_init`). "Creative" then runs img2img over it like any other job; "Subtle"
(``upscale_only``) is done there: :func:`upscale_result` writes its PNG (off the engine thread),
with the source's parameters and AUTOMATIC1111's postprocessing fields (:mod:`engine.metadata`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from engine.errors import EngineError, GenerationError, JobCancelled
from engine.features.masks import open_image
from engine.metadata import encode_png, infotext
from engine.serving.memory import free_memory
from engine.types import GeneratedImage, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from PIL import Image

    from engine.features.upscalers import Upscalers
    from engine.serving.finishing import Finisher, Ticket

log = logging.getLogger(__name__)


def upscaled_init(request: GenerationRequest, upscalers: Upscalers) -> Image.Image:
    """The job's init image, upright and RGB, enlarged by its upscaler to width x height."""
    image = open_image(request.params.init_image).convert("RGB")
    return upscalers.upscale_to(image, request.params.upscaler, request.params.size)


def upscale_result(
    request: GenerationRequest,
    image: Image.Image,
    model_name: str,
    model_hash: str | None,
    compress_level: int,
    started: float,
) -> GenerationResult:
    """An upscale-only job's result: the upscaled image as its one PNG, with the job's seed."""
    text = infotext(request, request.params.seed, model_name, model_hash)
    png = encode_png(image, text, request.job_id, compress_level)
    return GenerationResult(
        request.job_id, [GeneratedImage(png=png, seed=request.params.seed)], text, time.monotonic() - started
    )


def upscale_alone(
    ticket: Ticket, upscalers: Upscalers, finisher: Finisher, model_name: str, model_hash: str | None
) -> None:
    """Run an upscale-only job on the engine's thread, and hand its PNG to ``finisher`` to encode."""
    request, started = ticket.request, time.monotonic()
    try:
        if ticket.cancelled:
            raise JobCancelled(f"Job {request.job_id} was cancelled.")
        image = upscaled_init(request, upscalers)
    except EngineError as e:
        finisher.fail(ticket, e)
        return
    except Exception as e:  # out of GPU memory included: nothing else is held for this job
        log.exception("upscaling job %s failed", request.job_id)
        free_memory()
        finisher.fail(ticket, GenerationError(f"Upscaling failed ({type(e).__name__}: {e})."))
        return
    level = finisher.compress_level
    finisher.encoded(ticket, lambda: upscale_result(request, image, model_name, model_hash, level, started))

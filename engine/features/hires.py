"""Hires fix (AUTOMATIC1111's "Hires. fix"): a job's second pass at a larger size, in the batching engine.

Why two passes: a checkpoint draws well only near the size it was trained at; asked for twice that,
it repeats its subject across the canvas. So the job is made at its base size, upscaled, and given
a second img2img pass at ``hires_strength`` that adds detail at the larger size.

How it runs here: when a hires job's first pass takes its last step, the worker takes it out of
the batch and hands its latents to :func:`upscale_latents` (latent upscalers, on the device), or
its decoded images to the second pass (pixel upscalers: resized by :data:`PIXEL_UPSCALE` and
encoded again when the pass is prepared). The job then goes back in line as a :class:`SecondPass`
at the hires size, in its original place in the arrival order, so it forms or joins a batch of
that size like any other job. Its result depends only on its own parameters, never on what
shared either of its batches.

The second pass follows AUTOMATIC1111 (``modules/processing.py`` ``sample_hr_pass``):

- fresh noise from the job's own seeds: each image's generator is seeded again and draws noise of
  the hires latent shape (with the variation seed mixed in), as A1111's new ``ImageRNG`` does;
- the prompts are encoded at the hires size (SDXL's size conditioning sees it);
- A1111 passes the pass's steps explicitly (``hr_second_pass_steps or steps``), which makes
  ``setup_img2img_steps`` build a schedule of ``int(steps / strength)`` steps and walk exactly the
  last ``steps`` of it (see :func:`second_pass_schedule`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from engine.control_units import CONTROL_MODES, ControlUnit
from engine.errors import EngineError, GenerationError
from engine.families.base import JobSchedule, NoiseModel
from engine.features.upscalers import Upscalers
from engine.params import LATENT_UPSCALERS, GenerationParams
from engine.pipeline import Pipeline, PreparedJob, decode_error, nan_error
from engine.sampling.samplers import SAMPLERS, Sampler
from engine.sampling.schedules import UNET_SCALE_START
from engine.types import GenerationRequest

#: A pixel upscaler: the first pass's image and the factor to enlarge it by -> the larger image.
PixelUpscaler = Callable[[Image.Image, float], Image.Image]


def _resampling(method: Image.Resampling) -> PixelUpscaler:
    def upscale(image: Image.Image, scale: float) -> Image.Image:
        return image.resize((int(image.width * scale), int(image.height * scale)), method)

    return upscale


#: Built-in pixel upscalers by the name the member picks (``engine.params.PIXEL_UPSCALERS``), as
#: AUTOMATIC1111's ``UpscalerLanczos`` and ``UpscalerNearest`` do. Any other name is an upscaler
#: model of the ``[upscalers]`` folder (:mod:`engine.features.upscalers`).
PIXEL_UPSCALE: dict[str, PixelUpscaler] = {
    "Lanczos": _resampling(Image.Resampling.LANCZOS),
    "Nearest": _resampling(Image.Resampling.NEAREST),
}


@dataclass
class SecondPass:
    """A hires job between its passes: what its second pass starts from."""

    request: GenerationRequest  # the job at its hires size: what the batch and the memory limits see
    origin: GenerationRequest  # the job as asked, for its PNG's parameters
    steps_before: int  # the first pass's steps, which progress counts first
    latents: Tensor | None = None  # a latent upscaler's result, on the device
    images: list[Image.Image] | None = None  # a pixel upscaler's input: the first pass, decoded
    started: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> tuple[int, int]:
        return self.request.params.size


def second_pass_request(request: GenerationRequest) -> GenerationRequest:
    """The job at its hires size (everything else as asked)."""
    width, height = request.params.hires_size
    return dataclasses.replace(request, params=request.params.but(width=width, height=height))


def is_latent(upscaler: str) -> bool:
    return upscaler in LATENT_UPSCALERS


def upscale_latents(latents: Tensor, params: GenerationParams, latent_scale: int) -> Tensor:
    """The first pass's latents interpolated to the hires latent grid, with A1111's mode for the upscaler."""
    mode, antialias = LATENT_UPSCALERS[params.hires_upscaler]
    width, height = params.hires_size
    size = (height // latent_scale, width // latent_scale)
    return F.interpolate(latents, size=size, mode=mode, antialias=antialias)


def upscale_image(
    image: Image.Image, width: int, height: int, upscaler: str, models: Upscalers | None = None
) -> Image.Image:
    """AUTOMATIC1111's ``resize_image(0, ...)`` with an upscaler: enlarge by the larger of the two
    factors, then Lanczos to exactly the target (``int(w * scale)`` rounded to the latent grid).
    ``upscaler``: a built-in one, or a model of ``models`` (the ``[upscalers]`` folder) by name."""
    scale = max(width / image.width, height / image.height)
    if scale > 1 and upscaler in PIXEL_UPSCALE:
        image = PIXEL_UPSCALE[upscaler](image, scale)
    elif scale > 1:
        if models is None:
            raise GenerationError(f"The upscaler {upscaler!r} is not available here; use Latent or Lanczos.")
        image = models.upscale(image, upscaler, scale)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def after_first_pass(
    job: PreparedJob,
    steps: int,
    latent_scale: int,
    *,
    latents: Tensor | None = None,
    images: list[Image.Image | None] | None = None,
) -> SecondPass | EngineError:
    """What a finished first pass (its latents, or its decoded images) gives its second pass, or
    the error the job fails with (NaN latents, an image the VAE could not decode)."""
    if latents is not None:
        if not bool(torch.isfinite(latents).all()):  # one host sync per finished first pass
            return nan_error(job)
        latents = upscale_latents(latents, job.request.params, latent_scale)
    elif None in images:
        return decode_error(job)
    return SecondPass(second_pass_request(job.request), job.request, steps, latents, images, job.started)


def second_pass_schedule(noise: NoiseModel, sampler: Sampler, params: GenerationParams) -> JobSchedule:
    """The sigmas of the second pass, as AUTOMATIC1111 walks them.

    A1111's ``setup_img2img_steps`` with the steps given: a full schedule of
    ``int(steps / min(strength, 0.999))`` steps, entered at ``t_enc = steps - 1``, so the pass takes
    exactly ``steps`` steps (DDIM: ``steps - 1`` model calls, as A1111's timestep samplers do).
    :func:`engine.sampling.schedules.job_schedule` enters a schedule at ``int(strength * total)``; the
    strength handed to it is the one that lands on ``steps - 1`` exactly.
    """
    steps = params.hires_pass_steps
    total = int(steps / min(params.hires_strength, 0.999))
    entry = (steps - 0.5) / total  # int(entry * total) == steps - 1, and below 0.999 for any steps < 500
    width, height = params.size
    return noise.job_schedule(sampler, total, entry, schedule_type=params.schedule, width=width, height=height)


def second_pass_steps(params: GenerationParams) -> int:
    """The steps :func:`second_pass_schedule` walks, without building it (for the first pass's
    progress total): ``steps``; A1111's DDIM one model call fewer, as in any of its img2img jobs."""
    steps = params.hires_pass_steps
    if steps and SAMPLERS[params.sampler].discretization in UNET_SCALE_START:
        return max(steps - 2, 1)  # it keeps t_enc = steps - 1 grid points and walks between them
    return steps


def prepare_second_pass(pipeline: Pipeline, second: SecondPass, models: Upscalers | None = None) -> PreparedJob:
    """A hires job's second pass, ready to join a batch of its hires size (``models``: the
    upscaler models a pixel-space hires upscaler may name)."""
    request = second.request
    # 1. The job's LoRA set and prompts, encoded at the hires size.
    pipeline.use_loras(request)
    sampler = SAMPLERS[request.params.sampler]  # checked when the first pass was prepared
    cond = pipeline._unmasked_conditioning(request)
    # 2. What it starts from: the upscaled latents, or the upscaled images encoded again.
    if second.latents is not None:
        init = second.latents
    else:
        width, height = request.params.size
        upscaler = request.params.hires_upscaler
        upscaled = [upscale_image(image, width, height, upscaler, models) for image in second.images]
        init = torch.cat([pipeline.encode_image(image) for image in upscaled])
    # 3. The pass's sigmas, and fresh noise from the job's seeds at the hires latent shape.
    plan = second_pass_schedule(pipeline.noise, sampler, request.params)
    seeds, generators, noise = pipeline._initial_noise(request)
    latents = plan.start_latents(noise.to(pipeline.device), init=init)
    job = PreparedJob(
        request,
        sampler,
        plan.sigmas.float(),
        seeds,
        generators,
        latents,
        cond,
        started=second.started,
        origin=second.origin,
    )
    if request.params.control_units:  # 4. As A1111's ControlNet by default: its units guide this pass too
        job.cond = pipeline._controlled(job, hires_units(request.params.control_units))
    return job


def hires_units(units: tuple[ControlUnit, ...]) -> tuple[ControlUnit, ...]:
    """The units of a second pass: the A1111 extension forces its soft injection on canny units
    there ("use the soft weights with high-res fix can significantly reduce artifacts"), so a
    Balanced canny unit is scaled as "My prompt is more important" is."""
    soft = CONTROL_MODES[1]
    return tuple(
        dataclasses.replace(unit, control_mode=soft)
        if unit.module == "canny" and unit.control_mode == CONTROL_MODES[0]
        else unit
        for unit in units
    )

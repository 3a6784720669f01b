"""New jobs made from old ones: reroll, variation, upscale and edit.

Each function takes the stored parent job and returns a :class:`NewJob` (its kind, parameters
and parent) for the service to admit and queue for whoever asked. Pure, apart from drawing
random seeds, reading image headers and, for an upscale, listing the upscaler folder (call that
one off the event loop).
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass

from PIL import Image

from bot.inputs import enlarged_size
from db.models import Job, JobKind, ResultImage
from engine.config.settings import GenerationSettings
from engine.config.upscaler_settings import UpscalerSettings
from engine.features import outpaint
from engine.params import SEED_MAX, GenerationParams, params_from_job

#: Variation strengths for the two "Vary" buttons, as AUTOMATIC1111's variation seed slider.
VARIATION_STRENGTH = {"subtle": 0.15, "strong": 0.5}
#: Grid V1-V4 buttons make clearly different siblings of the chosen image.
GRID_VARIATION = "strong"
#: Upscale: 2x by the configured upscaler (``[upscalers]``, else Lanczos). Midjourney's names:
#: "subtle" is the upscaled image as it is; "creative" adds detail by an img2img pass over it at
#: this strength (as a hires fix does).
UPSCALE_FACTOR = 2.0
UPSCALE_STRENGTH = 0.4
UPSCALE_MODES = ("subtle", "creative")


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


def _of_image(params: GenerationParams, image_seed: int) -> GenerationParams:
    """``params`` as the image made with ``image_seed`` had them: its own Dynamic Prompts pick
    (not the template, which would draw again), no chaos (its noise is the seed's own)."""
    return params.but(prompt=params.image_prompt(image_seed), prompt_template=None, chaos=None)


def _from_image(parent: Job) -> GenerationParams:
    """What a job made from one result image replays: the parent's parameters at the image's own
    size (a hires job's images have its enlarged size), with no hires fix of its own (img2img)."""
    params = _replay(parent)
    width, height = params.hires_size
    return params.but(width=width, height=height, hires_scale=None)


def _from_result(parent: Job, image: ResultImage) -> GenerationParams:
    """:func:`_from_image` for ``image``, with its own prompt."""
    return _of_image(_from_image(parent), image.seed)


def reroll(parent: Job) -> NewJob:
    """Same parameters, new seed: a Dynamic Prompts template draws its picks again."""
    params = _replay(parent).but(seed=new_seed())
    return NewJob(JobKind.reroll, params.but(prompt=params.image_prompt(params.seed)), parent.id)


def variation(parent: Job, image_seed: int, level: str) -> NewJob:
    """Noise mixed from the chosen image's seed and a new one (AUTOMATIC1111's variation seed)."""
    params = _of_image(_replay(parent), image_seed).but(
        seed=image_seed, variation_seed=new_seed(), variation_strength=VARIATION_STRENGTH[level]
    )
    return NewJob(JobKind.variation, params, parent.id)


def upscaled_size(image: ResultImage, gen: GenerationSettings) -> tuple[int, int] | None:
    """The size an upscale of ``image`` gets, within the size limits; None: it is the largest already."""
    return enlarged_size(
        image.png,
        factor=UPSCALE_FACTOR,
        max_width=gen.max_width,
        max_height=gen.max_height,
        multiple=gen.pixel_multiple,
    )


def upscale(
    parent: Job, image: ResultImage, gen: GenerationSettings, mode: str, upscalers: UpscalerSettings
) -> NewJob | None:
    """2x of one image (``mode`` subtle or creative, see :data:`UPSCALE_MODES`), enlarged by the
    engine with the configured upscaler; None when it is already the largest size. The whole
    image is upscaled (a parent's mask is not kept). Lists the upscaler folder: run it in a thread."""
    size = upscaled_size(image, gen)
    if size is None:
        return None
    params = _from_result(parent, image).but(
        seed=image.seed,
        count=1,
        width=size[0],
        height=size[1],
        init_image=image.png,
        mask=None,
        strength=UPSCALE_STRENGTH,
        upscaler=upscalers.default_upscaler(),
        upscale_only=mode == "subtle",
    )
    return NewJob(JobKind.upscale, params, parent.id)


#: Vary (Region): how much the chosen cells change (the rest stays exactly as it was).
REGION_STRENGTH = 0.9


def region(parent: Job, image: ResultImage, mask_png: bytes, prompt: str) -> NewJob:
    """Repaint the masked cells of one image with ``prompt``; the rest of the image stays."""
    params = _from_result(parent, image).but(
        prompt=prompt, seed=new_seed(), count=1, init_image=image.png, mask=mask_png, strength=REGION_STRENGTH
    )
    return NewJob(JobKind.region, params, parent.id)


def words_edit(parent: Job, image: ResultImage, sentence: str, model: str) -> NewJob:
    """Edit with words: ``image`` changed as ``sentence`` says, by the InstructPix2Pix model
    ``model`` (engine.features.instruct_edit): an img2img job whose prompt is the instruction, at
    the image's size, with no negative prompt, references or chaos of the parent's."""
    params = _from_result(parent, image).but(
        prompt=sentence,
        negative_prompt="",
        seed=new_seed(),
        count=1,
        model=model,
        init_image=image.png,
        mask=None,
        strength=1.0,
        control_units=(),
    )
    return NewJob(JobKind.img2img, params, parent.id)


#: Zoom Out, Pan and Make Square repaint only the new part of the canvas (pre-filled with the
#: image's edge colours and noise by engine.features.outpaint), from scratch.
OUTPAINT_STRENGTH = 1.0


def _outpaint(
    parent: Job, image: ResultImage, kind: JobKind, canvas: Image.Image, mask: Image.Image, gen: GenerationSettings
) -> NewJob:
    canvas, mask = _within(canvas, mask, gen.max_width, gen.max_height, gen.pixel_multiple)
    params = _from_result(parent, image).but(
        seed=new_seed(),
        count=1,
        width=canvas.width,
        height=canvas.height,
        init_image=_png(canvas),
        mask=_png(mask),
        strength=OUTPAINT_STRENGTH,
    )
    return NewJob(kind, params, parent.id)


def _within(
    canvas: Image.Image, mask: Image.Image, max_width: int, max_height: int, multiple: int = 8
) -> tuple[Image.Image, Image.Image]:
    """The canvas (and its mask) scaled down, if need be, to the largest width and height allowed,
    on the model's grid (``multiple`` pixels)."""
    scale = min(1.0, max_width / canvas.width, max_height / canvas.height)
    if scale == 1.0 and canvas.width % multiple == 0 and canvas.height % multiple == 0:
        return canvas, mask
    grid = (int(canvas.width * scale) // multiple * multiple, int(canvas.height * scale) // multiple * multiple)
    size = (max(64, grid[0]), max(64, grid[1]))
    return canvas.resize(size, Image.Resampling.LANCZOS), mask.resize(size, Image.Resampling.NEAREST)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _image(result: ResultImage) -> Image.Image:
    with Image.open(io.BytesIO(result.png)) as image:
        return image.convert("RGB")


def zoom_out(parent: Job, image: ResultImage, factor: float, gen: GenerationSettings) -> NewJob:
    """The image in the middle of a canvas ``factor`` times as large (kept within the size limits),
    the new border drawn. Decodes and encodes PNGs: run it in a thread."""
    canvas, mask = outpaint.zoom_out(_image(image), factor, max_pixels=gen.max_width * gen.max_height, seed=image.seed)
    return _outpaint(parent, image, JobKind.zoom, canvas, mask, gen)


def pan(parent: Job, image: ResultImage, side: str, gen: GenerationSettings) -> NewJob:
    """The canvas extended by half its size towards ``side`` (left, right, up, down)."""
    canvas, mask = outpaint.pan(_image(image), side, max_pixels=gen.max_width * gen.max_height, seed=image.seed)
    return _outpaint(parent, image, JobKind.pan, canvas, mask, gen)


def make_square(parent: Job, image: ResultImage, gen: GenerationSettings) -> NewJob:
    """A non-square image filled out to a square."""
    canvas, mask = outpaint.make_square(_image(image), max_pixels=gen.max_width * gen.max_height, seed=image.seed)
    return _outpaint(parent, image, JobKind.square, canvas, mask, gen)


def edit(parent: Job, prompt: str, negative_prompt: str) -> NewJob:
    """New prompts, same seed and settings, so the change shows the effect of the words (the
    words typed: a Dynamic Prompts template is not kept)."""
    params = _replay(parent).but(prompt=prompt, negative_prompt=negative_prompt, prompt_template=None)
    return NewJob(JobKind.edit, params, parent.id)

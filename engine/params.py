"""A job's generation parameters: one frozen, typed value from the Discord command to the PNG.

The command boundary builds a :class:`GenerationParams` (member, server and configured defaults
filled in once, by the bot's admission service), the queue stores it in the ``jobs`` row's
columns of the same names (:func:`job_columns` / :func:`params_from_job`, the one mapping),
the engine generates from it, and metadata and messages render it. Torch-free, so the bot and
the database side use it without loading the engine.

Adding a parameter: a field here, the column of the same name in ``db/models.py`` with its
Alembic migration, and the command option. ``tests/test_params.py`` fails when a field has no
column (or a column that looks like a parameter has no field), and when a mapping drops one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from engine.control_units import ControlUnit, units_from_column, units_to_column

#: The built-in defaults, here only: ``GenerationSettings`` (config.toml) starts from these.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.0
DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_SAMPLER = "euler_a"
DEFAULT_STRENGTH = 0.75
DEFAULT_MASK_BLUR = 4
DEFAULT_INPAINT_PADDING = 32
#: AUTOMATIC1111's slider ranges: a wider blur only costs time (its kernel grows with it).
MAX_MASK_BLUR = 64
MAX_INPAINT_PADDING = 256

#: Hires fix (AUTOMATIC1111's "Hires. fix"): its denoising strength's default, and the scales we offer.
DEFAULT_HIRES_STRENGTH = 0.7
DEFAULT_HIRES_UPSCALER = "Latent"
MIN_HIRES_SCALE, MAX_HIRES_SCALE = 1.0, 4.0
#: AUTOMATIC1111's latent upscale modes (``modules/shared_items``): ``torch.nn.functional.interpolate``
#: of the first pass's latents with this mode and antialiasing, on the device.
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
#: Upscalers that work on the decoded image (then encoded again): the names, torch-free; the
#: functions are in :mod:`engine.features.hires`. An upscaler model is added to both by its name.
PIXEL_UPSCALERS = ("Lanczos", "Nearest")
HIRES_UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)

#: What the masked area starts from (AUTOMATIC1111's "Masked content"): the init image as it is,
#: its surroundings' colours, the seed's noise, or zero latents.
MASKED_CONTENT = ("original", "fill", "latent noise", "latent nothing")

#: Sampler ids we accept, mapped to the names AUTOMATIC1111 writes in its infotext.
SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "heun": "Heun",
    "lms": "LMS",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "lcm": "LCM",
    "unipc": "UniPC",
}

DEFAULT_SCHEDULE = "automatic"
#: Schedule type ids we accept, mapped to AUTOMATIC1111's ``Schedule type`` labels (its
#: modules/sd_schedulers.py). "automatic" is the sampler's own: Karras for DPM++ 2M, DPM++ SDE,
#: DPM2 and DPM2 a, Exponential for the multistep SDE samplers, Uniform for the others.
SCHEDULE_NAMES: dict[str, str] = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
}
#: What "automatic" is for each sampler (engine.sampling.samplers' ``discretization``, kept equal by a test),
#: torch-free for the infotext; None for DDIM, which has its own timesteps whatever the choice;
#: "lcm" is LCM's own levels, for which AUTOMATIC1111 writes no schedule type.
AUTOMATIC_SCHEDULES: dict[str, str | None] = {
    "euler": "uniform",
    "euler_a": "uniform",
    "dpmpp_2m_karras": "karras",
    "ddim": None,
    "dpmpp_2m": "karras",
    "dpmpp_2m_sde": "exponential",
    "dpmpp_sde": "karras",
    "dpmpp_3m_sde": "exponential",
    "heun": "uniform",
    "lms": "uniform",
    "dpm2": "karras",
    "dpm2_a": "karras",
    "lcm": "lcm",
    "unipc": "uniform",
}

SEED_MAX = 2**32 - 1


def parse_size(size: str) -> tuple[int, int] | tuple[None, None]:
    """``"512x768"`` -> ``(512, 768)``; anything else (not two positive multiples of 8) -> ``(None, None)``."""
    try:
        w, h = (int(part) for part in size.lower().split("x"))
    except ValueError:
        return None, None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        return None, None
    return w, h


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def size_text(width: int, height: int) -> str:
    return f"{width}x{height}"


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides a job's images; checked at the Discord boundary before it is built.

    ``count`` images are made with seeds ``seed, seed + 1, ...`` (as AUTOMATIC1111 does).
    ``init_image`` (encoded PNG/JPEG/WebP bytes) makes the job img2img with ``strength``.
    ``variation_seed``/``variation_strength`` mix the initial noise of ``seed`` with that of
    ``variation_seed`` (AUTOMATIC1111's "variation seed"). ``<lora:NAME:WEIGHT>`` tags in
    ``prompt`` apply LoRA files. ``model``: a configured model's name; None: the default.

    ``mask`` (PNG bytes, white or transparent = repaint; needs ``init_image``) makes the job an
    inpainting job: only the masked area changes, feathered by ``mask_blur`` pixels.
    ``inpaint_full_res`` ("only masked") generates just the masked area plus ``inpaint_padding``
    pixels at the job's size and pastes it back into the init image at its own size.
    ``masked_content``: one of :data:`MASKED_CONTENT`. See :mod:`engine.features.masks`.
    """

    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    sampler: str = DEFAULT_SAMPLER
    count: int = 1
    init_image: bytes | None = None
    strength: float = DEFAULT_STRENGTH
    variation_seed: int | None = None
    variation_strength: float = 0.0
    model: str | None = None
    #: CLIP skip (AUTOMATIC1111's "Clip skip"): 1 reads the text encoder's last layer, 2 the one before.
    clip_skip: int = 1
    mask: bytes | None = None
    mask_blur: int = DEFAULT_MASK_BLUR
    inpaint_full_res: bool = False
    inpaint_padding: int = DEFAULT_INPAINT_PADDING
    masked_content: str = "original"
    schedule: str = DEFAULT_SCHEDULE  # a key of SCHEDULE_NAMES
    #: Hires fix: made at ``width`` x ``height``, upscaled by ``hires_scale`` with ``hires_upscaler``
    #: (one of HIRES_UPSCALERS), then denoised again at ``hires_strength`` for ``hires_steps`` steps
    #: (0: ``steps``). None (or 1) is off; txt2img only, as in AUTOMATIC1111.
    hires_scale: float | None = None
    hires_steps: int = 0
    hires_upscaler: str = DEFAULT_HIRES_UPSCALER
    hires_strength: float = DEFAULT_HIRES_STRENGTH
    #: An upscaler (a model of ``upscalers.folder`` by name, or "Lanczos") that enlarges
    #: ``init_image`` to width x height before the job; None: the init image is fitted as it is.
    upscaler: str | None = None
    #: The upscaled init image is the result, with no diffusion pass ("Upscale (Subtle)", as
    #: AUTOMATIC1111's extras tab); False: img2img runs over it at ``strength`` ("Creative").
    upscale_only: bool = False
    #: Dynamic Prompts' template (``{a|b}`` variants, wildcards inlined; engine.prompt_templates):
    #: image ``i`` draws its prompt from it with its seed ``seed + i``; ``prompt`` is the first
    #: image's. None: every image has ``prompt``.
    prompt_template: str | None = None
    #: Seamless tiling (AUTOMATIC1111's "Tiling"): circular padding in the UNet's and VAE's convolutions.
    tiling: bool = False
    #: Midjourney's chaos, 0-100: the images share ``seed``'s noise, each mixed with its own seed's
    #: ``seed + i`` at strength chaos/100 (A1111's variation seed): 0 all alike, 100 unrelated.
    #: None: the images' noises are their own seeds' (as AUTOMATIC1111 makes a batch).
    chaos: int | None = None
    #: ControlNet units (AUTOMATIC1111's ControlNet extension; engine.control_units), at most 3:
    #: each a ControlNet by name, its image, preprocessor, weight, step window and modes.
    control_units: tuple[ControlUnit, ...] = ()

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    @property
    def is_masked(self) -> bool:
        return self.mask is not None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def is_hires(self) -> bool:
        return self.hires_scale is not None and self.hires_scale > 1 and not self.is_img2img

    @property
    def hires_size(self) -> tuple[int, int]:
        """The second pass's size: AUTOMATIC1111's ``int(width * scale)``, down to a multiple of 8
        (the latent grid; A1111 interpolates the latents to ``size // 8`` too)."""
        if not self.is_hires:
            return self.size
        return hires_size(self.width, self.height, self.hires_scale)

    @property
    def hires_pass_steps(self) -> int:
        """The second pass's steps (AUTOMATIC1111's ``hr_second_pass_steps or steps``); 0 without one."""
        return (self.hires_steps or self.steps) if self.is_hires else 0

    @property
    def sampler_label(self) -> str:
        return SAMPLER_NAMES.get(self.sampler, self.sampler)

    @property
    def schedule_label(self) -> str | None:
        """AUTOMATIC1111's ``Schedule type`` for this job, or None where it writes none.

        As AUTOMATIC1111 does: "automatic" is written as what it resolves to (DPM++ 2M: Karras),
        except where that is the model's own uniform spacing; DDIM has no schedule type.
        """
        automatic = AUTOMATIC_SCHEDULES.get(self.sampler)
        if automatic is None and self.sampler in AUTOMATIC_SCHEDULES:
            return None
        if self.schedule == DEFAULT_SCHEDULE:
            return SCHEDULE_NAMES.get(automatic) if automatic not in ("uniform", "lcm") else None
        return SCHEDULE_NAMES.get(self.schedule, self.schedule)

    def image_prompt(self, seed: int) -> str:
        """The prompt of this job's image made with ``seed`` (its variants drawn by that seed)."""
        if self.prompt_template is None:
            return self.prompt
        from engine.prompt_templates import image_prompt  # torch-free, read only by templated jobs

        return image_prompt(self.prompt_template, seed)

    def but(self, **changes: Any) -> GenerationParams:
        """A copy with ``changes`` (a reroll's new seed, an upscale's new size...)."""
        return replace(self, **changes)


#: The parameter names, which are also the names of their ``jobs`` columns.
PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GenerationParams))


class HasParamColumns(Protocol):
    """A stored job row (``db.models.Job``) as far as the mapping needs it."""

    prompt: str
    seed: int


def job_columns(params: GenerationParams) -> dict[str, Any]:
    """The ``jobs`` columns that store ``params`` (for ``Queue.enqueue``)."""
    columns = {name: getattr(params, name) for name in PARAM_NAMES}
    columns["control_units"] = units_to_column(params.control_units)  # JSON: db imports no engine type
    return columns


def params_from_job(job: HasParamColumns) -> GenerationParams:
    """The parameters of a stored job; columns left NULL by an old row take the type's defaults."""
    defaults = GenerationParams(prompt="", seed=0)
    values = {}
    for name in PARAM_NAMES:
        value = getattr(job, name)
        values[name] = getattr(defaults, name) if value is None and name not in _NULLABLE else value
    values["control_units"] = units_from_column(job.control_units)
    return GenerationParams(**values)


#: Parameters whose None is a value of its own (not "use the default").
_NULLABLE = frozenset(
    {"init_image", "variation_seed", "model", "mask", "hires_scale", "upscaler", "prompt_template", "chaos"}
)

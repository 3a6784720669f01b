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

#: The built-in defaults, here only: ``GenerationSettings`` (config.toml) starts from these.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.0
DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_SAMPLER = "euler_a"
DEFAULT_STRENGTH = 0.75

#: Sampler ids we accept, mapped to the names AUTOMATIC1111 writes in its infotext.
SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
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

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def sampler_label(self) -> str:
        return SAMPLER_NAMES.get(self.sampler, self.sampler)

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
    return {name: getattr(params, name) for name in PARAM_NAMES}


def params_from_job(job: HasParamColumns) -> GenerationParams:
    """The parameters of a stored job; columns left NULL by an old row take the type's defaults."""
    defaults = GenerationParams(prompt="", seed=0)
    values = {}
    for name in PARAM_NAMES:
        value = getattr(job, name)
        values[name] = getattr(defaults, name) if value is None and name not in _NULLABLE else value
    return GenerationParams(**values)


#: Parameters whose None is a value of its own (not "use the default").
_NULLABLE = frozenset({"init_image", "variation_seed", "model"})

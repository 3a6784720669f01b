"""Reading AUTOMATIC1111 parameters back from a PNG, for "Image info" and "Use these settings".

Any tool's PNG may carry them (AUTOMATIC1111, Forge, ComfyUI exports, other bots): a
``parameters`` text chunk in A1111's infotext layout, parsed by :mod:`engine.metadata`. What this
server does not allow (a sampler, too many steps, a size or model it does not offer) is replaced
by what it does, and each replacement is named in a note, so the member sees what changed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from bot import render
from bot.config import Config
from bot.inputs import BadInput, clean_text
from bot.policy import Asked
from engine.families import FAMILIES
from engine.metadata import parse_infotext
from engine.params import (
    DEFAULT_HIRES_UPSCALER,
    HIRES_UPSCALERS,
    MAX_HIRES_SCALE,
    SAMPLER_NAMES,
    SCHEDULE_NAMES,
    SEED_MAX,
    parse_size,
)
from engine.prompt_templates import escape

#: Fields shown by "Image info", in this order, when present.
SHOWN = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model",
    "Model hash",
    "Denoising strength",
    "Variation seed",
    "Variation seed strength",
    "Clip skip",
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "RNG",
    "Tiling",
)
_BY_LABEL = {label.lower(): sampler for sampler, label in SAMPLER_NAMES.items()}
_SCHEDULE_BY_LABEL = {label.lower(): schedule for schedule, label in SCHEDULE_NAMES.items()}


@dataclass(frozen=True)
class ReadBack:
    fields: dict[str, str]  # "Prompt", "Negative prompt", then the infotext's own keys
    job_id: int | None  # our own images say which job made them


def read_png_parameters(data: bytes) -> ReadBack:
    """The parameters of a PNG's ``parameters`` chunk; BadInput when it has none. Reads only the
    PNG's header and text chunks (Pillow does not decode the pixels for this)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise BadInput("That is not a PNG: only PNG files carry generation parameters.")
            chunks = dict(getattr(image, "text", {}) or {})
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadInput("That file could not be read as a PNG image.") from None
    text = chunks.get("parameters")
    if not text or not text.strip():
        raise BadInput("This image carries no generation parameters (no AUTOMATIC1111 `parameters` text).")
    job_id = chunks.get("job_id")
    return ReadBack(parse_infotext(text[:20000]), int(job_id) if job_id and job_id.isdigit() else None)


def info_text(read: ReadBack) -> str:
    """What "Image info" shows: prompts and the known fields, escaped."""
    lines = [f"**Prompt:** {render.escape(read.fields.get('Prompt', ''))}"]
    if read.fields.get("Negative prompt"):
        lines.append(f"**Negative:** {render.escape(read.fields['Negative prompt'])}")
    for key in SHOWN:
        if read.fields.get(key):
            lines.append(f"**{key}:** {render.escape(read.fields[key])}")
    others = [k for k in read.fields if k not in (*SHOWN, "Prompt", "Negative prompt", "Job id")]
    if others:
        lines.append("**Also:** " + render.escape(", ".join(f"{k}: {read.fields[k]}" for k in others)))
    return render.clip("\n".join(lines), 1900)


def _number(text: str | None, kind: type) -> float | int | None:
    try:
        return kind(float(text)) if kind is int else float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def sampler_of(fields: dict[str, str]) -> str | None:
    """Our sampler id for A1111's ``Sampler`` (and ``Schedule type``), None if we have none like it."""
    label = (fields.get("Sampler") or "").strip().lower()
    schedule = (fields.get("Schedule type") or "").strip().lower()
    if schedule and schedule != "automatic" and f"{label} {schedule}" in _BY_LABEL:
        return _BY_LABEL[f"{label} {schedule}"]
    return _BY_LABEL.get(label)


def settings_from(fields: dict[str, str], config: Config) -> tuple[Asked, list[str]]:
    """A new job's options from read-back parameters, within this bot's limits, and a note for
    every value that had to change."""
    notes: list[str] = []
    model = fields.get("Model")
    if model and model not in config.model_names:
        notes.append(f"model {model} is not configured here; {config.model.display_name} is used")
    chosen_model = model if model in config.model_names else None
    gen = config.generation_for(chosen_model)  # that model's family's choices and limits
    traits = FAMILIES.get(gen.family)
    prompt = clean_text(fields.get("Prompt", ""))[: config.discord.max_prompt_chars]
    if not prompt:
        raise BadInput("This image's parameters have no prompt to reuse.")
    if len(clean_text(fields.get("Prompt", ""))) > config.discord.max_prompt_chars:
        notes.append(f"the prompt was cut to {config.discord.max_prompt_chars} characters")
    negative = clean_text(fields.get("Negative prompt", ""))[: config.discord.max_prompt_chars] or None
    if negative and traits and not traits.negative_prompt:
        notes.append(f"{traits.label} models take no negative prompt; it was left out")
        negative = None
    steps = _number(fields.get("Steps"), int)
    if steps is not None and not 1 <= steps <= gen.max_steps:
        notes.append(f"steps {steps} → {min(max(steps, 1), gen.max_steps)} (the most allowed here)")
        steps = min(max(steps, 1), gen.max_steps)
    # Forge writes a guidance-distilled model's scale (Flux dev) as "Distilled CFG Scale", CFG scale 1.
    guidance = _number(fields.get("Distilled CFG Scale") or fields.get("CFG scale"), float)
    if guidance is not None and not 0 <= guidance <= gen.max_guidance:
        notes.append(f"CFG scale {guidance:g} → {min(max(guidance, 0.0), gen.max_guidance):g}")
        guidance = min(max(guidance, 0.0), gen.max_guidance)
    seed = _number(fields.get("Seed"), int)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        notes.append(f"seed {seed} is out of range; a new one was drawn")
        seed = None
    sampler = sampler_of(fields)
    if fields.get("Sampler") and sampler not in gen.samplers:
        notes.append(f"sampler {fields['Sampler']} is not offered here; {SAMPLER_NAMES[gen.default_sampler]} is used")
        sampler = None
    size = None
    if fields.get("Size"):
        width, height = parse_size(fields["Size"])
        if width is not None and f"{width}x{height}" in gen.sizes:
            size = (width, height)
        else:
            notes.append(f"size {fields['Size']} is not offered here; {gen.default_width}x{gen.default_height} is used")
    clip_skip = _number(fields.get("Clip skip"), int)
    if clip_skip is not None and not 1 <= clip_skip <= 12:
        notes.append(f"clip skip {clip_skip} → the model's default")
        clip_skip = None
    if clip_skip and clip_skip > 1 and traits and not traits.clip_skip:
        notes.append(f"clip skip does not apply to {traits.label} models; it was left out")
        clip_skip = None
    schedule = _SCHEDULE_BY_LABEL.get((fields.get("Schedule type") or "").strip().lower())
    if schedule in (None, "automatic") or sampler == "dpmpp_2m_karras" or schedule not in gen.schedules:
        schedule = None  # automatic, folded into the sampler's name, or not offered here
    hires = hires_from(fields, gen.max_steps, notes)
    tile = fields.get("Tiling") == "True"
    if tile and traits and traits.flow:
        notes.append(f"tiling does not apply to {traits.label} models; it was left out")
        tile = False
    return Asked(
        escape(prompt),  # the image's words as they are: its braces are not permutations or variants
        negative=negative,
        seed=seed,
        steps=steps,
        guidance=guidance,
        size=size,
        sampler=sampler,
        count=1,
        model=chosen_model,
        clip_skip=clip_skip,
        schedule=schedule,
        tile=tile,
        **hires,
    ), notes


def hires_from(fields: dict[str, str], max_steps: int, notes: list[str]) -> dict[str, float | int | str | None]:
    """The hires fix options of read-back parameters. As AUTOMATIC1111 reads them, the fix is on
    when ``Denoising strength`` comes with a hires field; ``Hires resize`` (a target size) becomes
    the factor that reaches it from ``Size``. The size limits are checked when the job is admitted."""
    if "Denoising strength" not in fields or not any(
        k in fields for k in ("Hires upscale", "Hires resize", "Hires upscaler")
    ):
        return {"hires": 1.0}  # off, whatever the member's default: the image was made without one
    scale = _number(fields.get("Hires upscale"), float)
    if scale is None and fields.get("Hires resize"):
        (width, height), (to_width, to_height) = parse_size(fields.get("Size", "")), parse_size(fields["Hires resize"])
        if width and to_width:
            scale = round(max(to_width / width, to_height / height), 2)
            notes.append(f"hires resize {fields['Hires resize']} → hires {scale:g}×")
    if scale is None:
        scale = 2.0  # AUTOMATIC1111's own default
    if not 1 <= scale <= MAX_HIRES_SCALE:
        notes.append(f"hires {scale:g}× → {min(max(scale, 1.0), MAX_HIRES_SCALE):g}×")
        scale = min(max(scale, 1.0), MAX_HIRES_SCALE)
    steps = _number(fields.get("Hires steps"), int)
    if steps is not None and not 0 <= steps <= max_steps:
        notes.append(f"hires steps {steps} → {min(max(steps, 0), max_steps)}")
        steps = min(max(steps, 0), max_steps)
    upscaler = fields.get("Hires upscaler")
    if upscaler and upscaler not in HIRES_UPSCALERS:
        notes.append(f"hires upscaler {upscaler} is not offered here; {DEFAULT_HIRES_UPSCALER} is used")
        upscaler = None
    strength = _number(fields.get("Denoising strength"), float)
    if strength is not None and not 0.05 <= strength <= 1:
        notes.append(f"denoising strength {strength:g} → {min(max(strength, 0.05), 1.0):g}")
        strength = min(max(strength, 0.05), 1.0)
    return {"hires": scale, "hires_steps": steps, "hires_upscaler": upscaler, "hires_strength": strength}

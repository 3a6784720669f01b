"""The rules a new job must pass, and the defaults it takes: pure functions of plain values.

:func:`resolve` turns what a member asked (:class:`Asked`, None where an option was left out)
into the job's :class:`~engine.params.GenerationParams`: the member's defaults where still
allowed, then the server's default model and limits, then the configured defaults
(``GenerationSettings.params``, the one place those are filled in). :func:`gate` refuses, with
a :class:`~bot.inputs.BadInput` that says what to do, what the server or the queue does not
take. The service (:mod:`bot.service`) reads the database once and calls these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from datetime import datetime, timedelta
from typing import Any

import discord

from bot import render
from bot.inputs import BadInput
from db.community import DAY, Admission, MemberDefaults, ServerPolicy
from engine.config.settings import GenerationSettings
from engine.families import FAMILIES
from engine.params import HIRES_UPSCALERS, GenerationParams, size_text


@dataclass(frozen=True)
class Asked:
    """The options of /imagine or /img2img as the member gave them; None: left out. Every option
    but the prompt by name: the commands name many, all of one type or None."""

    prompt: str
    _: KW_ONLY
    negative: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    size: tuple[int, int] | None = None
    sampler: str | None = None
    count: int | None = None
    model: str | None = None
    strength: float | None = None
    style: str | None = None  # a server style's name (None: the member's default style, if any)
    clip_skip: int | None = None  # None: the model's own default (``clip_skip`` in its config table)
    schedule: str | None = None  # a schedule type (None: the configured default, "automatic" unless set)
    hires: float | None = None  # the hires fix's factor (None: the member's default; 1: off)
    hires_steps: int | None = None  # the second pass's steps (None or 0: the job's steps)
    hires_upscaler: str | None = None
    hires_strength: float | None = None  # the second pass's denoising strength
    # Midjourney's parameters in the prompt (bot.prompt_params) that no option asks:
    aspect: tuple[int, int] | None = None  # --ar W:H: the size nearest it, on the model's grid
    no: str | None = None  # --no a, b: added to the negative prompt
    chaos: int | None = None  # --chaos 0-100: how far a job's images differ
    tile: bool = False  # --tile: seamless tiling
    reference_mode: str | None = None  # what a reference image guides (bot.references; None: edges)
    reference_strength: float | None = None  # its ControlNet's weight (None: 1)


@dataclass(frozen=True)
class Asker:
    """Who asks, and where: enough to apply a server's rules."""

    guild_id: int | None
    user_id: int
    channel_id: int | None
    channel: Any  # the channel object when cached (for its NSFW flag), else None

    @classmethod
    def of(cls, interaction: discord.Interaction) -> Asker:
        return cls(interaction.guild_id, interaction.user.id, interaction.channel_id, interaction.channel)


def nsfw_match(prompt: str, words: tuple[str, ...]) -> str | None:
    """The first listed word or phrase that occurs in ``prompt`` as a whole word, or None."""
    for word in words:
        if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, re.IGNORECASE):
            return word
    return None


def resolve(
    asked: Asked,
    mine: MemberDefaults,
    policy: ServerPolicy,
    gen: GenerationSettings,
    model_names: tuple[str, ...],
    *,
    img2img: bool = False,
    model_clip_skip: Callable[[str | None], int] = lambda model: 1,
    generation_for: Callable[[str | None], GenerationSettings] | None = None,
) -> GenerationParams:
    """The job's parameters: what was asked, else the member's default (if the configuration
    still allows it), else the configured default narrowed to the server's limits. An img2img
    job without a size keeps the configured default here; the upload's shape replaces it.
    CLIP skip: asked, else the server's, else the model's own. A member's default hires fix is
    lowered to fit the size limits (off where none fits); an asked one is checked by :func:`hires_gate`.

    ``generation_for``: the configured defaults for the job's model (its family's: Flux's steps,
    sizes and samplers, engine.families.generation); what was asked that the model's family
    cannot do is refused here (:func:`family_gate`), and a member's default that it cannot use
    is left out."""
    model = asked.model
    if model is None and policy.default_model in model_names:
        model = policy.default_model  # the server's choice when the member made none
    if generation_for is not None:
        gen = generation_for(model)
    family_gate(asked, gen)
    steps = asked.steps
    if steps is None:
        default = mine.steps if mine.steps and mine.steps <= gen.max_steps else gen.default_steps
        steps = min(default, policy.max_steps or default)
    guidance = asked.guidance
    if guidance is None and mine.guidance is not None and mine.guidance <= gen.max_guidance:
        guidance = mine.guidance
    sampler = asked.sampler or (mine.sampler if mine.sampler in gen.samplers else None)
    schedule = asked.schedule or (mine.schedule if mine.schedule in gen.schedules else None)
    size = asked.size or (None if img2img else default_size(mine, policy, gen))
    if asked.aspect is not None:
        size = aspect_size(
            asked.aspect, gen.default_width * gen.default_height, *max_size(policy, gen), gen.pixel_multiple
        )
    hires = asked.hires
    if hires is None:
        hires = member_hires(mine.hires_scale, size or (gen.default_width, gen.default_height), policy, gen)
    upscaler = asked.hires_upscaler or (mine.hires_upscaler if mine.hires_upscaler in HIRES_UPSCALERS else None)
    takes_negative = FAMILIES[gen.family].negative_prompt if gen.family else True
    negative = asked.negative or mine.negative_prompt or None
    if asked.no:  # Midjourney's --no: after the negative prompt there would be without it
        negative = ", ".join(
            part for part in (negative if negative is not None else gen.default_negative_prompt, asked.no) if part
        )
    params = gen.params(
        asked.prompt,
        seed=asked.seed,
        negative_prompt=negative if takes_negative else "",
        steps=steps,
        guidance=guidance,
        size=size,
        sampler=sampler,
        count=asked.count,
        strength=asked.strength,
        model=model,
        clip_skip=(asked.clip_skip or policy.clip_skip or model_clip_skip(model)) if _clip_skips(gen) else 1,
        schedule=schedule,
        hires_scale=None if img2img else hires,
        hires_steps=asked.hires_steps,
        hires_upscaler=upscaler,
        hires_strength=asked.hires_strength,
    )
    return params.but(tiling=asked.tile, chaos=asked.chaos)


def _clip_skips(gen: GenerationSettings) -> bool:
    return FAMILIES[gen.family].clip_skip if gen.family else True


def family_gate(asked: Asked, gen: GenerationSettings) -> None:
    """Refuse, in one line that says what to do, an option the model's family cannot use."""
    if not gen.family:
        return
    traits = FAMILIES[gen.family]
    label = f"{traits.label} models"
    if asked.sampler is not None and asked.sampler not in gen.samplers:
        raise BadInput(f"{label} cannot use the {asked.sampler} sampler; pick one of {', '.join(gen.samplers)}.")
    if asked.schedule is not None and asked.schedule not in gen.schedules:
        raise BadInput(f"{label} walk their own schedule; leave the schedule type out (automatic).")
    if (asked.negative or asked.no) and not traits.negative_prompt:
        raise BadInput(f"{label} take no negative prompt (they are not guided by one); leave it (or `--no`) out.")
    if asked.clip_skip and asked.clip_skip > 1 and not traits.clip_skip:
        raise BadInput(f"CLIP skip does not apply to {label} (T5 reads their prompts too); leave it out.")
    if asked.tile and traits.flow:  # a transformer has no convolutions to pad around
        raise BadInput(
            f"`--tile` wraps a UNet's convolutions, which {label} do not have; use an SD 1.x, 2.x or XL model."
        )
    if asked.size is not None and any(v % gen.pixel_multiple for v in asked.size):
        raise BadInput(f"{label} need sizes in multiples of {gen.pixel_multiple}; pick a listed size.")


def member_hires(
    scale: float | None, size: tuple[int, int], policy: ServerPolicy, gen: GenerationSettings
) -> float | None:
    """A member's default hires factor for a job of ``size``, lowered (to 0.01) to fit the largest
    size allowed here; None where even a little enlargement does not fit."""
    if not scale or scale <= 1:
        return None
    max_width, max_height = max_size(policy, gen)
    fitting = math.floor(min(scale, max_width / size[0], max_height / size[1]) * 100) / 100
    return fitting if fitting > 1 else None


def edit_model_gate(params: GenerationParams, edit_model: str) -> None:
    """The edit model (``discord.edit_model``, InstructPix2Pix) runs edits of a whole image only,
    as its engine refuses the rest (engine.features.instruct_edit): said here, before queueing."""
    if not edit_model or params.model != edit_model:
        return
    if not params.is_img2img:
        raise BadInput(f"{edit_model} edits images: press 🪄 Edit with words under a result, or use /img2img with it.")
    if params.is_masked or params.control_units:
        raise BadInput(f"{edit_model} changes the whole image: leave out the mask and the reference.")


def hires_gate(params: GenerationParams, policy: ServerPolicy, gen: GenerationSettings) -> None:
    """An asked hires fix within the size and steps limits here; BadInput saying what fits."""
    if not params.is_hires:
        return
    max_width, max_height = max_size(policy, gen)
    width, height = params.hires_size
    if width > max_width or height > max_height:
        largest = math.floor(min(max_width / params.width, max_height / params.height) * 100) / 100
        instead = f"use `hires:{largest:g}` or less" if largest > 1 else "pick a smaller size or leave `hires` out"
        raise BadInput(
            f"Hires {params.hires_scale:g}× makes {width}x{height} images; the largest allowed here is "
            f"{max_width}x{max_height}: {instead}."
        )
    if width % gen.pixel_multiple or height % gen.pixel_multiple:  # SD 3.5 and Flux: a 16-pixel grid
        raise BadInput(
            f"Hires {params.hires_scale:g}× makes {width}x{height} images, off this model's {gen.pixel_multiple}-pixel "
            "grid: pick a factor that keeps both sides multiples of it, such as 1.5 or 2."
        )
    max_steps = min(gen.max_steps, policy.max_steps or gen.max_steps)
    if params.hires_pass_steps > max_steps:
        raise BadInput(
            f"The hires pass may take at most {max_steps} steps here (it would take {params.hires_pass_steps}); "
            "lower `hires_steps`."
        )


def default_size(mine: MemberDefaults, policy: ServerPolicy, gen: GenerationSettings) -> tuple[int, int] | None:
    """The member's size if allowed, else the configured default (None), else the largest that fits."""

    def fits(size: tuple[int, int]) -> bool:
        return (policy.max_width is None or size[0] <= policy.max_width) and (
            policy.max_height is None or size[1] <= policy.max_height
        )

    if mine.width and size_text(mine.width, mine.height) in gen.sizes and fits((mine.width, mine.height)):
        return mine.width, mine.height
    if fits((gen.default_width, gen.default_height)):
        return None
    fitting = [size for size in gen.size_pairs if fits(size)]
    return max(fitting, key=lambda s: s[0] * s[1]) if fitting else None


#: A size this near the asked ratio (2%, log scale) counts as that ratio: the larger one is taken.
RATIO_TOLERANCE = 0.02


def aspect_size(aspect: tuple[int, int], area: int, max_width: int, max_height: int, multiple: int) -> tuple[int, int]:
    """The size nearest ``aspect`` with at most ``area`` pixels (the model's default size's),
    within ``max_width`` x ``max_height``, both sides multiples of ``multiple`` (the model's grid).

    The largest such size is sought, not the most exact ratio at any size (16:9 is exact at
    256x144, a quarter of the pixels): widths from two grid steps below to one above the ideal width
    are weighed, each with the heights on the grid nearest its ratio; of these the largest within
    :data:`RATIO_TOLERANCE` of the ratio wins (else the nearest ratio)."""
    ratio = aspect[0] / aspect[1]
    scale = min(1.0, max_width / math.sqrt(area * ratio), max_height / math.sqrt(area / ratio))
    top = max(multiple, int(math.sqrt(area * ratio) * scale) // multiple * multiple)
    best: tuple[bool, int, float, tuple[int, int]] | None = None
    for width in range(max(multiple, top - 2 * multiple), min(top + multiple, max_width) + 1, multiple):
        ideal = width / ratio
        for height in {int(ideal // multiple) * multiple, int(math.ceil(ideal / multiple)) * multiple}:
            if height < multiple or height > max_height or width * height > area:
                continue
            error = abs(math.log(width / height / ratio))
            key = (error > RATIO_TOLERANCE, -width * height, error, (width, height))
            if best is None or key < best:
                best = key
    if best is None:  # nothing fits the area: the grid's smallest square
        return multiple, multiple
    return best[3]


def max_size(policy: ServerPolicy, gen: GenerationSettings) -> tuple[int, int]:
    """The largest width and height a job may have on this server."""
    return min(gen.max_width, policy.max_width or gen.max_width), min(
        gen.max_height, policy.max_height or gen.max_height
    )


def gate(asker: Asker, seen: Admission, params: GenerationParams, *, pending_limit: int, now: datetime) -> None:
    """Every rule a new job must pass: the server's (in a server) and the queue's pending limit;
    raises BadInput saying which and what to do. ``seen``: the service's one database read."""
    if asker.guild_id is not None:
        _server_gate(asker, seen, params, now)
    if seen.pending >= pending_limit:
        raise BadInput(
            f"You already have {seen.pending} jobs waiting (limit {pending_limit}). "
            "Wait for one to finish or /cancel one."
        )


def _server_gate(asker: Asker, seen: Admission, params: GenerationParams, now: datetime) -> None:
    policy = seen.policy
    if seen.barred:
        raise BadInput(
            "You have been barred from using this bot on this server. "
            "Ask the server's managers if you think this is a mistake."
        )
    if not channel_allowed(asker, policy):
        where = ", ".join(f"<#{c}>" for c in policy.allowed_channel_ids)
        raise BadInput(f"On this server I make images only in {where}. Try there.")
    if policy.paused:
        raise BadInput(
            "The server's managers have paused the image queue for now; no new jobs are taken. Try again later."
        )
    word = nsfw_match(params.prompt_template or params.prompt, policy.nsfw_words)  # every variant's words
    if word is not None and not is_nsfw_channel(asker):
        raise BadInput(
            f"“{render.escape(word)}” is on this server's NSFW list: prompts with it are "
            "allowed only in age-restricted channels."
        )
    if policy.max_steps is not None and params.steps > policy.max_steps:
        raise BadInput(f"This server allows at most {policy.max_steps} steps (you asked for {params.steps}).")
    if policy.max_count is not None and params.count > policy.max_count:
        raise BadInput(f"This server allows at most {policy.max_count} images per job (you asked for {params.count}).")
    if (
        policy.max_width is not None
        and params.width > policy.max_width
        or policy.max_height is not None
        and params.height > policy.max_height
    ):
        raise BadInput(
            f"This server allows images up to {policy.max_width}x{policy.max_height} "
            f"(this one is {params.width}x{params.height}); pick a smaller size."
        )
    if policy.pending_limit is not None and seen.pending >= policy.pending_limit:
        raise BadInput(
            f"You already have {seen.pending} jobs waiting (this server's limit is "
            f"{policy.pending_limit}). Wait for one to finish or /cancel one."
        )
    usage = seen.usage
    if policy.daily_limit is not None and usage.count >= policy.daily_limit:
        # The window slides: one more job is allowed when the oldest one in it is 24 hours old.
        again = (usage.first_at or now) + DAY
        raise BadInput(
            f"You have reached this server's limit of {policy.daily_limit} jobs in 24 hours. "
            f"You can make another {when(again)}."
        )
    if policy.cooldown_seconds and usage.last_at is not None:
        again = usage.last_at + timedelta(seconds=policy.cooldown_seconds)
        if again > now:
            wait = (again - now).total_seconds()
            raise BadInput(
                f"This server has a {policy.cooldown_seconds}-second cooldown between jobs. "
                f"Try again in {wait:.0f} s, {when(again)}."
            )


def channel_allowed(asker: Asker, policy: ServerPolicy) -> bool:
    if not policy.allowed_channel_ids:
        return True
    parent = getattr(asker.channel, "parent_id", None)  # a thread counts as its channel
    return asker.channel_id in policy.allowed_channel_ids or parent in policy.allowed_channel_ids


def is_nsfw_channel(asker: Asker) -> bool:
    is_nsfw = getattr(asker.channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def when(moment: datetime) -> str:
    """A time every member sees in their own timezone: "in 5 minutes (14:05)"."""
    ts = int(moment.timestamp()) + 1
    return f"<t:{ts}:R> (<t:{ts}:T>)"

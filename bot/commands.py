"""The slash commands: /imagine, /img2img, /queue, /cancel, /info and /help.

Limits come from ``config.toml``, so the commands are built at start-up by
:func:`build_commands` rather than at import time. Every option is checked twice with the same
numbers: Discord enforces the ranges and choices it is told about, and our transformers check
again (a client can send anything), answering out-of-range values with an ephemeral message
that says what is allowed. /help is generated from these same definitions.

This module deliberately does not use ``from __future__ import annotations``: discord.py reads
the option types from the annotations, which here are built from the configuration.
"""

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.app_commands import Choice, Transform

from bot import community, render
from bot.checks import within_deadline
from bot.inputs import (PILLOW_FORMATS, BadInput, check_attachment_meta, check_prompt, check_prompt_text,
                        load_init_image, warm_up_token_counter)
from bot.jobs import SEED_MAX, new_seed
from bot.views import describe_buttons
from db.models import JobKind
from engine.settings import GenerationSettings, parse_size
from engine.types import SAMPLER_NAMES

if TYPE_CHECKING:
    from bot.client import SDBot

log = logging.getLogger(__name__)


class Bounded(app_commands.Transformer):
    """A number option with a range, told to Discord and checked again here."""

    def __init__(self, name: str, kind: type, low: float, high: float) -> None:
        self.name, self.kind, self.low, self.high = name, kind, low, high

    @property
    def type(self) -> discord.AppCommandOptionType:
        return discord.AppCommandOptionType.integer if self.kind is int else discord.AppCommandOptionType.number

    @property
    def min_value(self) -> float:
        return self.low

    @property
    def max_value(self) -> float:
        return self.high

    def allowed(self) -> str:
        if self.kind is int:  # every digit: "0 to 4294967295", not "4.29497e+09"
            return f"`{self.name}` must be a whole number from {int(self.low)} to {int(self.high)}"
        return f"`{self.name}` must be a number from {self.low:g} to {self.high:g}"

    async def transform(self, interaction: discord.Interaction, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadInput(f"{self.allowed()}.")
        if isinstance(value, float) and (not math.isfinite(value) or self.kind is int and not value.is_integer()):
            raise BadInput(f"{self.allowed()}.")
        if not self.low <= value <= self.high:
            given = f"{value:g}" if isinstance(value, float) else str(value)[:24]
            raise BadInput(f"{self.allowed()} (you gave {given}).")
        return self.kind(value)


class OneOf(app_commands.Transformer):
    """A string option with fixed choices, told to Discord and checked again here."""

    def __init__(self, name: str, values: dict[str, str]) -> None:
        self.name, self.values = name, values  # value -> label

    @property
    def choices(self) -> list[Choice[str]]:
        return [Choice(name=label, value=value) for value, label in self.values.items()]

    async def transform(self, interaction: discord.Interaction, value: Any) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise BadInput(f"`{self.name}` must be one of: {', '.join(self.values)}.")
        return value


class Text(app_commands.Transformer):
    """A prompt: invisible characters removed, empty (when required) or over-long refused."""

    def __init__(self, name: str, max_chars: int, required: bool, label: str | None = None) -> None:
        self.name, self.max_chars, self.required = name, max_chars, required
        self.label = label or name  # how messages call it: "the negative prompt"

    @property
    def max_value(self) -> int:  # for strings, discord.py sends it as max_length
        return self.max_chars

    async def transform(self, interaction: discord.Interaction, value: Any) -> str:
        if not isinstance(value, str):
            raise BadInput(f"`{self.name}` must be text.")
        return check_prompt(value, max_chars=self.max_chars, name=self.label, required=self.required)


class ModelName(app_commands.Transformer):
    """A configured model's name, offered by autocomplete (names can outnumber Discord's 25 choices)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    async def autocomplete(self, interaction: discord.Interaction, value: Any) -> list[Choice[str]]:
        typed = str(value or "").lower()
        return [Choice(name=name, value=name) for name in self.names if typed in name.lower()][:25]

    async def transform(self, interaction: discord.Interaction, value: Any) -> str:
        if not isinstance(value, str) or value not in self.names:
            raise BadInput(f"`model` must be one of: {', '.join(self.names)}.")
        return value


def size_choices(gen: GenerationSettings) -> dict[str, str]:
    return {size: size for size in gen.sizes}


def build_commands(bot: "SDBot") -> list[app_commands.Command]:
    """The bot's slash commands, with the limits from ``bot.config``."""
    _warm_up_token_counter()
    gen = bot.config.generation
    max_chars = bot.config.discord.max_prompt_chars
    Prompt = Text("prompt", max_chars, True)
    Negative = Text("negative", max_chars, False, label="negative prompt")
    Seed = Bounded("seed", int, 0, SEED_MAX)
    Steps = Bounded("steps", int, 1, gen.max_steps)
    Guidance = Bounded("guidance", float, 0, gen.max_guidance)
    Count = Bounded("count", int, 1, gen.max_count)
    Strength = Bounded("strength", float, 0.05, 1.0)
    Size = OneOf("size", size_choices(gen))
    Sampler = OneOf("sampler", {s: SAMPLER_NAMES[s] for s in gen.samplers})
    Model = ModelName(bot.config.model_names)
    described = dict(
        prompt="What to draw",
        negative="What to keep out of the image",
        seed=f"Seed for the noise (0 to {SEED_MAX}); random when left out",
        steps=f"Denoising steps (1 to {gen.max_steps}, default {gen.default_steps})",
        guidance=f"How closely to follow the prompt (0 to {gen.max_guidance:g}, default {gen.default_guidance:g})",
        size=f"Width x height (default {gen.default_width}x{gen.default_height})",
        sampler=f"Sampler (default {SAMPLER_NAMES[gen.default_sampler]})",
        count=f"Images to make (1 to {gen.max_count}, default 1)",
    )
    model_help = f"Model (default {bot.config.model.display_name}); LoRA: <lora:name:0.8> in the prompt"

    @app_commands.command(name="imagine", description="Make images from a text prompt")
    @app_commands.describe(**described, model=model_help)
    async def imagine(interaction: discord.Interaction, prompt: Transform[str, Prompt],
                      negative: Transform[str, Negative] = "", seed: Transform[int, Seed] = None,
                      steps: Transform[int, Steps] = None, guidance: Transform[float, Guidance] = None,
                      size: Transform[str, Size] = None, sampler: Transform[str, Sampler] = None,
                      count: Transform[int, Count] = 1, model: Transform[str, Model] = None) -> None:
        options = dict(prompt=prompt, negative=negative, seed=seed, steps=steps, guidance=guidance, size=size,
                       sampler=sampler, count=count, model=model)
        await bot.guarded(interaction, _imagine(bot, interaction, options))

    @app_commands.command(name="img2img", description="Make images from an uploaded image and a prompt")
    @app_commands.describe(image="A PNG, JPEG or WebP image",
                           strength=f"How much to change the image (0.05 to 1, default {gen.default_strength:g})",
                           **described, model=model_help)
    async def img2img(interaction: discord.Interaction, image: discord.Attachment, prompt: Transform[str, Prompt],
                      strength: Transform[float, Strength] = None, negative: Transform[str, Negative] = "",
                      seed: Transform[int, Seed] = None, steps: Transform[int, Steps] = None,
                      guidance: Transform[float, Guidance] = None, size: Transform[str, Size] = None,
                      sampler: Transform[str, Sampler] = None, count: Transform[int, Count] = 1,
                      model: Transform[str, Model] = None) -> None:
        options = dict(prompt=prompt, negative=negative, seed=seed, steps=steps, guidance=guidance, size=size,
                       sampler=sampler, count=count, model=model)
        await bot.guarded(interaction, _img2img(bot, interaction, image, strength, options))

    @app_commands.command(name="queue", description="Your jobs and their places in line")
    async def queue(interaction: discord.Interaction) -> None:
        await bot.guarded(interaction, bot.show_queue(interaction))

    @app_commands.command(name="cancel", description="Cancel one of your jobs (your latest when no job is given)")
    @app_commands.describe(job="The job number (from the job's message)")
    async def cancel(interaction: discord.Interaction, job: Transform[int, Bounded("job", int, 1, 2**53)] = None) -> None:
        await bot.guarded(interaction, bot.cancel_command(interaction, job))

    @app_commands.command(name="info", description="Every parameter of a job, its seed and status")
    @app_commands.describe(job="The job number (from the job's message)")
    async def info(interaction: discord.Interaction, job: Transform[int, Bounded("job", int, 1, 2**53)]) -> None:
        await bot.guarded(interaction, bot.info_command(interaction, job))

    @app_commands.command(name="help", description="What the bot can do, and its limits")
    async def help_(interaction: discord.Interaction) -> None:
        text = help_text([imagine, img2img, queue, cancel, info, *community.commands_of(bot)], bot)
        await interaction.response.send_message(embed=discord.Embed(title="Stable Diffusion bot", description=text),
                                                ephemeral=True)
    return [imagine, img2img, queue, cancel, info, help_, *community.attach(bot)]


def _warm_up_token_counter() -> None:
    """Build the tokenizer that counts prompt tokens now, in a thread (about a second), rather
    than while the first member's command waits on it."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # built outside the bot (a test): the first count builds it
        return
    loop.run_in_executor(None, warm_up_token_counter).add_done_callback(_log_warm_up)


def _log_warm_up(future: "asyncio.Future[Any]") -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("the prompt token counter could not be built", exc_info=future.exception())


def generation_fields(gen: GenerationSettings, *, prompt: str, negative: str, seed: int | None,
                      steps: int | None, guidance: float | None, size: str | None, sampler: str | None,
                      count: int) -> dict[str, Any]:
    """Job fields from command options, with the configured defaults for what was left out."""
    width, height = parse_size(size) if size else (gen.default_width, gen.default_height)
    return dict(
        prompt=prompt,
        negative_prompt=negative or gen.default_negative_prompt,
        seed=new_seed() if seed is None else seed,
        steps=steps or gen.default_steps,
        guidance=gen.default_guidance if guidance is None else guidance,
        width=width, height=height,
        sampler=sampler or gen.default_sampler,
        count=count,
        strength=gen.default_strength,
    )


async def _job_fields(bot: "SDBot", interaction: discord.Interaction, options: dict[str, Any], *,
                      img2img: bool = False) -> tuple[dict[str, Any], str | None]:
    """The job's fields (member defaults, server policy) and a note on long prompts; refuses
    with BadInput what the server, the queue's pending limit or the engine would not take.
    Reads the database."""
    gen = bot.config.generation
    options = await community.check_new_job(interaction, gen, options, img2img=img2img)
    model = options.pop("model", None)
    note = await bot.run_check(check_prompt_text, options["prompt"], options["negative"],
                               bot.config.model_settings(model).lora_dir)
    return generation_fields(gen, **options) | dict(model=model), note


async def _imagine(bot: "SDBot", interaction: discord.Interaction, options: dict[str, Any]) -> None:
    """Check everything that needs the database within Discord's deadline, then queue the job."""
    fields, note = await within_deadline(bot, interaction, _job_fields(bot, interaction, options))
    await bot.submit(interaction, fields | dict(kind=JobKind.txt2img), note=note)


async def _img2img(bot: "SDBot", interaction: discord.Interaction, image: discord.Attachment,
                   strength: float | None, options: dict[str, Any]) -> None:
    """Check the upload before downloading it, then decode it safely and queue the job."""
    dc, gen = bot.config.discord, bot.config.generation
    check_attachment_meta(filename=image.filename, content_type=image.content_type, size=image.size,
                          url=image.url, allowed_types=dc.allowed_image_types, max_bytes=dc.max_attachment_bytes,
                          allowed_hosts=bot.allowed_hosts)

    async def prepare():
        fields, note = await _job_fields(bot, interaction, options, img2img=True)
        data = await bot.download(image.url, dc.max_attachment_bytes)
        forced = parse_size(options["size"]) if options["size"] else None
        init = await asyncio.to_thread(
            load_init_image, data, size=forced, max_width=gen.max_width, max_height=gen.max_height,
            target_area=gen.default_width * gen.default_height,
            formats=tuple(PILLOW_FORMATS[t] for t in dc.allowed_image_types))
        return fields, note, init

    # Usually this takes a fraction of a second, and a refusal can then be ephemeral. When it
    # takes longer, acknowledge first (Discord allows 3 seconds) and finish afterwards.
    fields, note, init = await within_deadline(bot, interaction, prepare())
    fields |= dict(kind=JobKind.img2img, init_image=init.png, width=init.width, height=init.height,
                   strength=gen.default_strength if strength is None else strength)
    await bot.submit(interaction, fields, note=note)


def help_text(commands: list[app_commands.Command], bot: "SDBot") -> str:
    """Every command with its options and limits, read from the command definitions."""
    lines = ["**Commands**"]
    for command in community.iter_commands(commands):  # groups: each subcommand
        lines.append(f"`/{command.qualified_name}`: {command.description}")
        for p in [] if command.parent else command.parameters:  # subcommands: one line, to fit
            limits = []
            if p.choices:
                limits.append("one of " + ", ".join(str(c.value) for c in p.choices))
            elif p.type is discord.AppCommandOptionType.string and p.max_value:
                limits.append(f"up to {p.max_value:g} characters")
            elif p.min_value is not None and p.max_value is not None and p.name != "job":
                limits.append(f"{p.min_value:g} to {p.max_value:g}")
            if p.type is discord.AppCommandOptionType.attachment:
                dc = bot.config.discord
                limits.append(", ".join(t.removeprefix("image/").upper() for t in dc.allowed_image_types)
                              + f", up to {dc.max_attachment_bytes / 1048576:.1f} MiB")
            extra = f" ({'; '.join(limits)})" if limits else ""
            optional = "" if p.required else " *optional*"
            lines.append(f"  • `{p.name}`{optional}: {p.description}{extra}")
    lines += ["", "**Buttons on results**", describe_buttons(),
              "", f"You can have {bot.config.queue.pending_limit} jobs waiting at a time."]
    return render.clip("\n".join(lines), 4096)

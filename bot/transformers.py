"""Option types for slash commands: each tells Discord its range or choices, and checks again.

Discord enforces what it is told, but a client can send anything, so every transformer checks
the value again and answers a bad one with an ephemeral message that says what is allowed.
:class:`Options` builds them once from ``config.toml`` for every cog; /help reads them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import discord
from discord import app_commands
from discord.app_commands import Choice

from bot.config import Config
from bot.inputs import BadInput, check_prompt
from bot.reach import service_of
from bot.references import REFERENCE_MODES
from engine.config.upscaler_settings import model_files
from engine.control_units import MAX_CONTROL_WEIGHT
from engine.params import (
    HIRES_UPSCALERS,
    MAX_HIRES_SCALE,
    MIN_HIRES_SCALE,
    SAMPLER_NAMES,
    SCHEDULE_NAMES,
    SEED_MAX,
    parse_size,
)

#: Discord's largest integer option value (a JSON number must stay exact in JavaScript).
DISCORD_INT_MAX = 2**53 - 1

#: Discord's limit on an option's choices (and on autocomplete's answers).
MAX_CHOICES = 25


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


class SizeChoice(OneOf):
    """A ``WxH`` choice, parsed here once: the command gets ``(width, height)``."""

    async def transform(self, interaction: discord.Interaction, value: Any) -> tuple[int, int] | None:
        chosen = await super().transform(interaction, value)
        width, height = parse_size(chosen)
        return None if width is None else (width, height)


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

    def __init__(self, names: tuple[str, ...], option: str = "model") -> None:
        self.names, self.option = names, option

    def matching(self, typed: Any) -> list[Choice[str]]:
        typed = str(typed or "").lower()
        return [Choice(name=name, value=name) for name in self.names if typed in name.lower()][:MAX_CHOICES]

    async def autocomplete(self, interaction: discord.Interaction, value: Any) -> list[Choice[str]]:
        return self.matching(value)

    async def transform(self, interaction: discord.Interaction, value: Any) -> str:
        if not isinstance(value, str) or value not in self.names:
            raise BadInput(f"`{self.option}` must be one of: {', '.join(self.names)}.")
        return value


class StyleName(app_commands.Transformer):
    """A server style's name, offered by autocomplete from the server's styles; whether it exists
    is checked when the job is admitted (styles change while the bot runs)."""

    async def autocomplete(self, interaction: discord.Interaction, value: Any) -> list[Choice[str]]:
        if interaction.guild_id is None:
            return []
        service = service_of(interaction)
        names = await service.run_check(service.styles.names, interaction.guild_id)
        typed = str(value or "").lower()
        return [Choice(name=name, value=name) for name in names if typed in name.lower()][:MAX_CHOICES]

    @property
    def max_value(self) -> int:  # for strings, discord.py sends it as max_length
        return 100

    async def transform(self, interaction: discord.Interaction, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise BadInput("`style` must be the name of one of this server's styles.")
        return value.strip()


def hires_upscalers(config: Config) -> list[str]:
    """The hires fix's upscalers a member may pick: the built-in ones, then the models of the
    ``[upscalers]`` folder (as many as Discord's 25 choices hold), read when the bot starts."""
    models = [name for name in model_files(config.upscalers.folder) if name not in HIRES_UPSCALERS]
    return [*HIRES_UPSCALERS, *models][:MAX_CHOICES]


@dataclass(frozen=True)
class Options:
    """Every option type the commands use, with the limits of this configuration."""

    prompt: Text
    negative: Text
    seed: Bounded
    steps: Bounded
    guidance: Bounded
    count: Bounded
    strength: Bounded
    size: SizeChoice
    sampler: OneOf
    model: ModelName
    job: Bounded
    style: StyleName
    clip_skip: Bounded
    schedule: OneOf
    hires: Bounded
    hires_steps: Bounded
    hires_upscaler: OneOf
    hires_strength: Bounded
    reference_mode: OneOf
    reference_strength: Bounded

    @classmethod
    def of(cls, config: Config) -> Options:
        gen, max_chars = config.generation, config.discord.max_prompt_chars
        return cls(
            prompt=Text("prompt", max_chars, True),
            negative=Text("negative", max_chars, False, label="negative prompt"),
            seed=Bounded("seed", int, 0, SEED_MAX),
            steps=Bounded("steps", int, 1, gen.max_steps),
            guidance=Bounded("guidance", float, 0, gen.max_guidance),
            count=Bounded("count", int, 1, gen.max_count),
            strength=Bounded("strength", float, 0.05, 1.0),
            size=SizeChoice("size", {size: size for size in gen.sizes}),
            sampler=OneOf("sampler", {s: SAMPLER_NAMES[s] for s in gen.samplers}),
            model=ModelName(config.model_names),
            job=Bounded("job", int, 1, DISCORD_INT_MAX),
            style=StyleName(),
            clip_skip=Bounded("clip_skip", int, 1, 12),
            schedule=OneOf("schedule", {s: SCHEDULE_NAMES[s] for s in gen.schedules}),
            hires=Bounded("hires", float, MIN_HIRES_SCALE, MAX_HIRES_SCALE),
            hires_steps=Bounded("hires_steps", int, 0, gen.max_steps),
            hires_upscaler=OneOf("hires_upscaler", {name: name for name in hires_upscalers(config)}),
            hires_strength=Bounded("hires_strength", float, 0.05, 1.0),
            reference_mode=OneOf("reference_mode", {mode: mode for mode in REFERENCE_MODES}),
            reference_strength=Bounded("reference_strength", float, 0.0, MAX_CONTROL_WEIGHT),
        )

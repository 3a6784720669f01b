"""The whole of ``config.toml`` for the bot process, parsed once into frozen dataclasses.

The engine's sections are parsed by ``engine.config.settings``; this module adds ``[queue]`` and
``[discord]`` and the token, which comes only from the ``DISCORD_TOKEN`` environment variable
(never from the file: a config file gets copied, pasted and committed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bot.safety.settings import SafetySettings, parse_safety
from engine.config.describe_settings import DescribeSettings
from engine.config.settings import (
    ConfigError,
    EngineSettings,
    GenerationSettings,
    ModelSettings,
    QueueSettings,
    check,
    parse_engine_sections,
    parse_queue_section,
    read_toml,
    section,
)
from engine.config.upscaler_settings import UpscalerSettings
from ops.settings import OpsConfigError, OpsSettings, parse_ops

__all__ = ["Config", "ConfigError", "DiscordSettings", "QueueSettings", "load_config"]


@dataclass(frozen=True)
class DiscordSettings:
    guild_ids: tuple[int, ...] = ()
    progress_interval: float = 2.0
    max_attachment_bytes: int = 8 * 1024 * 1024
    allowed_image_types: tuple[str, ...] = ("image/png", "image/jpeg", "image/webp")
    max_prompt_chars: int = 1000
    #: The model Edit with words runs on (a configured InstructPix2Pix model's name); "": no such button.
    edit_model: str = ""


@dataclass(frozen=True)
class Config:
    model: ModelSettings
    engine: EngineSettings
    generation: GenerationSettings
    queue: QueueSettings
    discord: DiscordSettings
    token: str
    models: tuple[ModelSettings, ...] = ()  # the other models (``[models.<name>]``), besides the default
    ops: OpsSettings = OpsSettings()  # ``[ops]``: the health and metrics endpoint (off by default)
    upscalers: UpscalerSettings = UpscalerSettings()  # ``[upscalers]``: the U buttons' models
    safety: SafetySettings = SafetySettings()  # ``[safety]``: the image classifier and its default policy
    describe: DescribeSettings = DescribeSettings()  # ``[describe]``: /describe's captioner ("": none)
    #: Each configured model's name -> ``generation`` for its family (engine.families.generation),
    #: set by the wiring once the families are known; a model not here takes ``generation``.
    by_model: tuple[tuple[str, GenerationSettings], ...] = ()

    def model_settings(self, name: str | None) -> ModelSettings:
        """The configured model called ``name``; the default model for None or a name not configured."""
        return next((m for m in self.models if m.display_name == name), self.model)

    def generation_for(self, name: str | None) -> GenerationSettings:
        """The defaults, choices and limits for a job of model ``name`` (None: the default model)."""
        name = name or self.model.display_name
        return next((gen for model, gen in self.by_model if model == name), self.generation)

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every configured model's name, the default first (what ``/imagine model`` offers)."""
        default = self.model.display_name
        return (default, *(m.display_name for m in self.models if m.display_name != default))


def load_config(
    path: str | Path = "config.toml", env: Mapping[str, str] = os.environ, *, require_token: bool = True
) -> Config:
    """Read and check config.toml and the environment; raise ConfigError with one clear line."""
    raw = read_toml(path)
    if "token" in raw.get("discord", {}):
        raise ConfigError(
            "discord.token: the bot token is never read from the file; "
            "remove it and set the DISCORD_TOKEN environment variable"
        )
    engine_part = parse_engine_sections(raw)
    queue = parse_queue_section(raw)
    discord: DiscordSettings = section(raw, "discord", DiscordSettings)
    safety = parse_safety(raw)
    try:
        ops = parse_ops(raw.get("ops", {}))
    except OpsConfigError as e:
        raise ConfigError(str(e)) from None

    for gid in discord.guild_ids:
        check(
            isinstance(gid, int) and gid > 0,
            "discord.guild_ids",
            gid,
            "server ids as numbers, e.g. [123456789012345678]",
        )
    check(
        0.5 <= discord.progress_interval <= 60,
        "discord.progress_interval",
        discord.progress_interval,
        "0.5 to 60 seconds",
    )
    check(
        1024 <= discord.max_attachment_bytes <= 100 * 1024 * 1024,
        "discord.max_attachment_bytes",
        discord.max_attachment_bytes,
        "1024 to 104857600 bytes",
    )
    for kind in discord.allowed_image_types:
        check(
            kind in ("image/png", "image/jpeg", "image/webp", "image/gif"),
            "discord.allowed_image_types",
            kind,
            "image/png, image/jpeg, image/webp or image/gif",
        )
    check(10 <= discord.max_prompt_chars <= 6000, "discord.max_prompt_chars", discord.max_prompt_chars, "10 to 6000")

    names = {m.display_name for m in (engine_part.model, *engine_part.models)}
    check(
        not discord.edit_model or discord.edit_model in names,
        "discord.edit_model",
        discord.edit_model,
        f'the name of a configured InstructPix2Pix model ({", ".join(sorted(names))}), or "" for none',
    )

    token = env.get("DISCORD_TOKEN", "").strip()
    if require_token and not token:
        raise ConfigError(
            "DISCORD_TOKEN is not set: create a bot in the Discord developer portal "
            "(see README, 'Create the Discord application') and run "
            "`DISCORD_TOKEN=<your bot token> .venv/bin/python -m bot`"
        )
    return Config(
        model=engine_part.model,
        engine=engine_part.engine,
        generation=engine_part.generation,
        queue=queue,
        discord=discord,
        token=token,
        models=engine_part.models,
        ops=ops,
        upscalers=engine_part.upscalers,
        describe=engine_part.describe,
        safety=safety,
    )

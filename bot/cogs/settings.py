"""/settings: a member's own defaults for /imagine and /img2img. (Annotations stay objects.)"""

import asyncio
from typing import Any

import discord
from discord import app_commands
from discord.app_commands import Transform
from discord.ext import commands

from bot.inputs import BadInput
from bot.service import JobService
from bot.texts import member_settings_text
from bot.transformers import OneOf, Options, Text
from db.community import MemberDefaults

#: Options of /settings set, in the order /settings show lists them.
MEMBER_OPTIONS = (
    "negative",
    "steps",
    "size",
    "sampler",
    "guidance",
    "schedule",
    "hires",
    "hires_upscaler",
    "private",
    "style",
)


def settings_cog(service: JobService, o: Options) -> commands.Cog:
    gen = service.config.generation
    Negative = Text("negative", service.config.discord.max_prompt_chars, False)
    Setting = OneOf("setting", {"all": "all", **{name: name for name in MEMBER_OPTIONS}})

    class Settings(
        commands.GroupCog, group_name="settings", group_description="Your defaults for /imagine and /img2img"
    ):
        def __init__(self, service: JobService) -> None:
            self.service = service
            self.community = service.community
            super().__init__()

        @app_commands.command(name="show", description="Show your defaults")
        async def show(self, interaction: discord.Interaction) -> None:
            await self.service.guarded(interaction, self._show(interaction))

        async def _show(self, interaction: discord.Interaction) -> None:
            mine = await self.service.run_check(self.community.member_defaults, interaction.user.id)
            await self.service.reply(interaction, member_settings_text(mine, gen) + await self._style_line(interaction))

        async def _style_line(self, interaction: discord.Interaction) -> str:
            if interaction.guild_id is None:
                return ""
            style = await self.service.run_check(
                self.service.styles.member_default, interaction.guild_id, interaction.user.id
            )
            return f"\nstyle on this server: **{style}**" if style else "\nstyle on this server: none"

        @app_commands.command(name="set", description="Set defaults used when you leave an option out")
        @app_commands.describe(
            negative="Your default negative prompt",
            steps=f"Steps (1 to {gen.max_steps})",
            size="Width x height",
            sampler="Sampler",
            guidance=f"Guidance (0 to {gen.max_guidance:g})",
            schedule="Schedule type",
            hires="Hires fix factor for /imagine (1: off); lowered where a server's size limit needs it",
            hires_upscaler="How the hires fix enlarges",
            private="Whether your results should be private",
            style="Your style on this server (one of its styles)",
        )
        async def set_(
            self,
            interaction: discord.Interaction,
            negative: Transform[str, Negative] = None,
            steps: Transform[int, o.steps] = None,
            size: Transform[str, o.size] = None,
            sampler: Transform[str, o.sampler] = None,
            guidance: Transform[float, o.guidance] = None,
            schedule: Transform[str, o.schedule] = None,
            hires: Transform[float, o.hires] = None,
            hires_upscaler: Transform[str, o.hires_upscaler] = None,
            private: bool = None,
            style: Transform[str, o.style] = None,
        ) -> None:
            changes: dict[str, Any] = {}
            if negative:
                changes["negative_prompt"] = negative
            if size is not None:
                changes["width"], changes["height"] = size
            for name, value in (
                ("steps", steps),
                ("sampler", sampler),
                ("guidance", guidance),
                ("schedule", schedule),
                ("hires_scale", hires),
                ("hires_upscaler", hires_upscaler),
                ("private_results", private),
            ):
                if value is not None:
                    changes[name] = value
            await self.service.guarded(interaction, self._set(interaction, changes, style))

        async def _set(self, interaction: discord.Interaction, changes: dict[str, Any], style: str | None) -> None:
            if not changes and style is None:
                raise BadInput(
                    "Give at least one option to set, e.g. `/settings set steps:30`. "
                    "`/settings show` lists your defaults."
                )
            if style is not None:
                if interaction.guild_id is None:
                    raise BadInput("Styles belong to a server; set your style there.")
                styles = self.service.styles
                if await self.service.run_check(styles.get, interaction.guild_id, style) is None:
                    raise BadInput(f"This server has no style called `{style}`; `/server style list` shows them.")
                await asyncio.to_thread(styles.set_member_default, interaction.guild_id, interaction.user.id, style)
            if changes:
                mine = await asyncio.to_thread(self.community.set_member_defaults, interaction.user.id, **changes)
            else:
                mine = await self.service.run_check(self.community.member_defaults, interaction.user.id)
            await self.service.reply(
                interaction, "Saved.\n" + member_settings_text(mine, gen) + await self._style_line(interaction)
            )

        @app_commands.command(name="reset", description="Go back to the bot's defaults (all, or one setting)")
        @app_commands.describe(setting="Which default to forget (all when left out)")
        async def reset(self, interaction: discord.Interaction, setting: Transform[str, Setting] = "all") -> None:
            await self.service.guarded(interaction, self._reset(interaction, setting))

        async def _reset(self, interaction: discord.Interaction, setting: str) -> None:
            user_id = interaction.user.id
            if setting in ("all", "style") and interaction.guild_id is not None:
                await asyncio.to_thread(self.service.styles.set_member_default, interaction.guild_id, user_id, None)
            if setting == "all":
                await asyncio.to_thread(self.community.reset_member_defaults, user_id)
                mine = MemberDefaults()
            elif setting == "style":
                mine = await self.service.run_check(self.community.member_defaults, user_id)
            else:
                columns = {
                    "negative": ["negative_prompt"],
                    "size": ["width", "height"],
                    "private": ["private_results"],
                    "hires": ["hires_scale"],
                }.get(setting, [setting])
                cleared = {c: (False if c == "private_results" else None) for c in columns}
                mine = await asyncio.to_thread(self.community.set_member_defaults, user_id, **cleared)
            await self.service.reply(
                interaction, "Reset.\n" + member_settings_text(mine, gen) + await self._style_line(interaction)
            )

    return Settings(service)

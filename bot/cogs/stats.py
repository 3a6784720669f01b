"""/stats: jobs, top members, waits and the queue, for the server's managers."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from bot import render
from bot.checks import require_manage_server
from bot.service import JobService
from bot.texts import stats_text


class StatsCog(commands.Cog, name="stats"):
    def __init__(self, service: JobService) -> None:
        self.service = service

    @app_commands.command(name="stats", description="Jobs, top members, waits and the queue (Manage Server)")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def stats(self, interaction: discord.Interaction) -> None:
        require_manage_server(interaction)
        numbers = await self.service.run_check(self.service.community.stats, interaction.guild_id)
        guild = interaction.guild

        def name(user_id: int) -> str:
            member = guild.get_member(user_id) if guild is not None else None
            return render.escape(member.display_name) if member is not None else f"<@{user_id}>"

        await self.service.reply(interaction, render.clip(stats_text(numbers, name), 2000))

"""Result buttons and 🔁 reactions: reroll, vary, upscale, edit, info, delete, cancel.

The buttons are :mod:`bot.views`' ``DynamicItem`` classes, registered here so that a press is
understood after any restart. A 🔁 reaction on a result queues a reroll for whoever reacted
(the result is found by its message id, so this too survives restarts).
"""

from __future__ import annotations

import logging

import discord
from discord.ext import commands

from bot import jobs, reference_menu, views, views_edit, views_instruct, views_safety
from bot.describe import UsePrompt
from bot.permutations import QueueThem
from bot.service import REROLL_EMOJI, JobService

log = logging.getLogger(__name__)


class ResultsCog(commands.Cog, name="results"):
    def __init__(self, service: JobService, bot: commands.Bot) -> None:
        self.service, self.bot = service, bot

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(
            *views.ITEMS,
            *views_edit.ITEMS,
            *views_safety.ITEMS,
            *views_instruct.ITEMS,
            *reference_menu.ITEMS,
            QueueThem,
            UsePrompt,
        )

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(
            *views.ITEMS,
            *views_edit.ITEMS,
            *views_safety.ITEMS,
            *views_instruct.ITEMS,
            *reference_menu.ITEMS,
            QueueThem,
            UsePrompt,
        )

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        if str(payload.emoji) != REROLL_EMOJI or self.bot.user is None or payload.user_id == self.bot.user.id:
            return
        if payload.member is not None and payload.member.bot:
            return
        parent = await self.service.run_check(self.service.queue.job_for_message, payload.message_id)
        if parent is None:
            return
        channel = self.bot.get_partial_messageable(payload.channel_id, guild_id=payload.guild_id)
        try:
            await self.service.submit_for_reaction(
                payload, jobs.reroll(parent), channel, self.bot.get_channel(payload.channel_id)
            )
        except discord.HTTPException as e:
            log.warning("reaction reroll of job %s failed: %s", parent.id, e)

"""Message context menus (right-click a message → Apps): "Image info", "Use these settings" and
"Use as reference" (a form for /imagine with the message's image as reference: bot/reference_menu.py).

They read AUTOMATIC1111 parameters from a PNG attached to any message, made by this bot or by
another tool (:mod:`bot.infotext`). The attachment passes the same type, size and host checks
as an /img2img upload before it is downloaded.
"""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands
from discord.ext import commands

from bot import infotext
from bot.inputs import BadInput, check_attachment_meta
from bot.jobs import NewJob
from bot.reference_menu import reference_modal
from bot.service import JobService
from db.models import JobKind


class ImageInfoCog(commands.Cog, name="image-info"):
    def __init__(self, service: JobService, bot: commands.Bot) -> None:
        self.service, self.bot = service, bot
        self.menus = (
            app_commands.ContextMenu(name="Image info", callback=self.image_info),
            app_commands.ContextMenu(name="Use these settings", callback=self.use_settings),
            app_commands.ContextMenu(name="Use as reference", callback=self.use_as_reference),
        )

    async def cog_load(self) -> None:
        for menu in self.menus:
            self.bot.tree.add_command(menu)

    async def cog_unload(self) -> None:
        for menu in self.menus:
            self.bot.tree.remove_command(menu.name, type=menu.type)

    async def image_info(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self.service.guarded(interaction, self._image_info(interaction, message))

    async def use_settings(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self.service.guarded(interaction, self._use_settings(interaction, message))

    async def use_as_reference(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await self.service.guarded(interaction, self._use_as_reference(interaction, message))

    async def _use_as_reference(self, interaction: discord.Interaction, message: discord.Message) -> None:
        await interaction.response.send_modal(reference_modal(self.service, message))

    async def _read(self, message: discord.Message) -> infotext.ReadBack:
        attachment = next(
            (
                a
                for a in message.attachments
                if (a.content_type or "").startswith("image/png") or a.filename.lower().endswith(".png")
            ),
            None,
        )
        if attachment is None:
            raise BadInput("That message has no PNG attached; generation parameters live in PNG files.")
        dc = self.service.config.discord
        check_attachment_meta(
            filename=attachment.filename,
            content_type=attachment.content_type or "image/png",
            size=attachment.size,
            url=attachment.url,
            allowed_types=("image/png",),
            max_bytes=dc.max_attachment_bytes,
            allowed_hosts=self.service.allowed_hosts,
        )
        data = await self.service.download(attachment.url, dc.max_attachment_bytes)
        return await asyncio.to_thread(infotext.read_png_parameters, data)

    async def _image_info(self, interaction: discord.Interaction, message: discord.Message) -> None:
        read = await self._read(message)
        text = infotext.info_text(read)
        if read.job_id is not None:
            job = await self.service.get_job(read.job_id)
            if job is not None and job.guild_id == interaction.guild_id:
                text = f"Made here as **job #{job.id}** (`/info job:{job.id}`).\n" + text
        await self.service.reply(interaction, text)

    async def _use_settings(self, interaction: discord.Interaction, message: discord.Message) -> None:
        read = await self._read(message)
        asked, notes = infotext.settings_from(read.fields, self.service.config)
        params, note = await self.service.admit(interaction, asked)
        changed = f"Changed to fit this server: {'; '.join(notes)}." if notes else None
        await self.service.submit(
            interaction, NewJob(JobKind.txt2img, params), note="\n".join(n for n in (changed, note) if n) or None
        )

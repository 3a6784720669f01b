"""/describe: four prompts for an uploaded image (Midjourney's), offered where ``[describe]
captioner`` is set. (Annotations stay objects: discord.py reads them.)

The upload is checked as /img2img's (type, size, host, the image filter, every server rule) and
queued as a job of its own kind; a worker's captioner writes the prompts (engine.features.describe)
and delivery posts them with a button each (bot.describe).
"""

import discord
from discord import app_commands
from discord.ext import commands

from bot.inputs import check_attachment_meta
from bot.jobs import NewJob
from bot.policy import Asked
from bot.service import JobService
from db.models import JobKind


class DescribeCog(commands.Cog, name="describe"):
    def __init__(self, service: JobService) -> None:
        self.service = service

    @app_commands.command(name="describe", description="Four prompts for an image")
    @app_commands.describe(image="A PNG, JPEG or WebP image, e.g. a photo whose style you want")
    async def describe(self, interaction: discord.Interaction, image: discord.Attachment) -> None:
        await self.service.guarded(interaction, self._describe(interaction, image))

    async def _describe(self, interaction: discord.Interaction, image: discord.Attachment) -> None:
        dc = self.service.config.discord
        check_attachment_meta(
            filename=image.filename,
            content_type=image.content_type,
            size=image.size,
            url=image.url,
            allowed_types=dc.allowed_image_types,
            max_bytes=dc.max_attachment_bytes,
            allowed_hosts=self.service.allowed_hosts,
        )
        params, _ = await self.service.admit(interaction, Asked(""), image)
        await self.service.submit(interaction, NewJob(JobKind.describe, params.but(count=1)))
